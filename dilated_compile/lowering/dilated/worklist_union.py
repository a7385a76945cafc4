"""Triton kernels of the ``longnet`` work list as one softmax (imported only where triton is).

With the ``longnet`` split a query's output is one softmax over the union of
the keys its patterns give it (a key counted once per pattern). A program owns
one *union item*: rows ``pos0 + i * stride`` of one head, i in the item's block,
where ``stride`` is a multiple of every rate and the rows lie inside one segment
of every pattern, so each pattern selects all of the item's rows or none. Its
fields (`worklist_items.UNION_FIELDS`, then three per pattern) are (head, pos0,
stride, rows, block) and, per pattern, the pattern's selected positions in
that segment: (key_pos0, key_rate, key_count), key_count 0 where the pattern
does not select the rows.

- `union_forward_kernel`: an online softmax over every selected pattern's keys,
  written straight into the output and its log-sum-exp: no per-pattern rows, no
  merge pass.
- `union_backward_kernel`: the item's rows as keys (dk, dv: a loop over the
  queries of every pattern that selects them) and as queries (dq: the
  forward's loop), stored in place: every row belongs to exactly one item, so
  nothing is accumulated across programs. delta comes from
  `worklist_backward.prepare_kernel`.

Causal masks compare global positions (a key at or before its query).
"""

import triton
import triton.language as tl

from .worklist_loops import attend_keys, count_upto, key_bounds, key_grads, query_grads


@triton.jit
def _item_rows(pos0, stride, n_rows, blk, BLOCK_M: tl.constexpr):
    """The positions of block `blk` of an item's rows, which of them are rows, and the
    first and last of those."""
    t = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    first = pos0 + blk * BLOCK_M * stride
    last = pos0 + (tl.minimum(blk * BLOCK_M + BLOCK_M, n_rows) - 1) * stride
    return pos0 + t * stride, t < n_rows, first, last


@triton.jit
def _key_run(k_base, v_base, kpos0, krate, k_sn, v_sn):
    """Pointers to the first key and value row of a pattern's run, and its row strides."""
    return (k_base + kpos0.to(tl.int64) * k_sn, v_base + kpos0.to(tl.int64) * v_sn,
            krate.to(tl.int64) * k_sn, krate.to(tl.int64) * v_sn)


@triton.jit
def union_forward_kernel(
    Q, K, V, O, L, ITEMS, scale,
    q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn,
    o_sb, o_sh, o_sn, l_sb, l_sh, l_sn,
    N_PATTERNS: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
):
    """Grid (items, batch): the item's output rows and their natural-log log-sum-exp
    (0 and -inf where no pattern selects them)."""
    scale = tl.cast(scale, tl.float32)  # Inductor passes a Python float as fp64
    item = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    # the item's fields, loaded here rather than by a helper: Inductor's analysis of a kernel's
    # writes would take a helper's arguments (ITEMS) for written memory
    f = ITEMS + item * (5 + 3 * N_PATTERNS)
    h, pos0, stride, n_rows, blk = tl.load(f), tl.load(f + 1), tl.load(f + 2), tl.load(f + 3), tl.load(f + 4)
    h = h.to(tl.int64)
    qpos, rows_ok, q_first, q_last = _item_rows(pos0, stride, n_rows, blk, BLOCK_M)
    qpos64 = qpos.to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * q_sb + h * q_sh + qpos64[:, None] * q_sn + d[None, :], mask=rows_ok[:, None], other=0.0)
    qk_scale = scale * 1.4426950408889634
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for i in range(0, N_PATTERNS):
        kpos0 = tl.load(f + 5 + 3 * i)
        krate = tl.load(f + 6 + 3 * i)
        km = tl.load(f + 7 + 3 * i)
        k_ptr, v_ptr, k_row, v_row = _key_run(K + b * k_sb + h * k_sh, V + b * v_sb + h * v_sh, kpos0, krate,
                                              k_sn, v_sn)
        full, hi = key_bounds(q_first, q_last, kpos0, krate, km, CAUSAL, BLOCK_N)
        acc, l_i, m_i = attend_keys(
            acc, l_i, m_i, q, k_ptr, v_ptr, k_row, v_row, qpos, kpos0, krate, 0, full, km, qk_scale, d,
            False, CAUSAL, BLOCK_N, IEEE,
        )
        acc, l_i, m_i = attend_keys(
            acc, l_i, m_i, q, k_ptr, v_ptr, k_row, v_row, qpos, kpos0, krate, full, hi, km, qk_scale, d,
            True, CAUSAL, BLOCK_N, IEEE,
        )
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i > 0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    tl.store(O + b * o_sb + h * o_sh + qpos64[:, None] * o_sn + d[None, :], out.to(O.dtype.element_ty),
             mask=rows_ok[:, None])
    tl.store(L + b * l_sb + h * l_sh + qpos64 * l_sn, lse, mask=rows_ok)


@triton.jit
def union_backward_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, ITEMS, scale,
    q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, do_sb, do_sh, do_sn,
    l_sb, l_sh, l_sn, de_sb, de_sh, de_sn, g_sb, g_sh, g_sn,
    N_PATTERNS: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
    HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
):
    """Grid (items, batch): dk, dv and dq of the item's rows (DQ, DK, DV share the
    strides g_*), 0 where no pattern selects them."""
    scale = tl.cast(scale, tl.float32)  # Inductor passes a Python float as fp64
    item = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    f = ITEMS + item * (5 + 3 * N_PATTERNS)  # the item's fields, loaded here (see union_forward_kernel)
    h, pos0, stride, n_rows, blk = tl.load(f), tl.load(f + 1), tl.load(f + 2), tl.load(f + 3), tl.load(f + 4)
    h = h.to(tl.int64)
    pos, rows_ok, first, last = _item_rows(pos0, stride, n_rows, blk, BLOCK_M)
    pos64 = pos.to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    qk_scale = scale * 1.4426950408889634
    q_base = Q + b * q_sb + h * q_sh
    k_base = K + b * k_sb + h * k_sh
    v_base = V + b * v_sb + h * v_sh
    do_base = DO + b * do_sb + h * do_sh
    l_base = LSE + b * l_sb + h * l_sh
    de_base = DELTA + b * de_sb + h * de_sh
    rows_2d = pos64[:, None]
    # --- the rows as keys: dk, dv over the queries of every pattern that selects them
    k = tl.load(k_base + rows_2d * k_sn + d[None, :], mask=rows_ok[:, None], other=0.0)
    v = tl.load(v_base + rows_2d * v_sn + d[None, :], mask=rows_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for i in range(0, N_PATTERNS):
        p0 = tl.load(f + 5 + 3 * i)
        prate = tl.load(f + 6 + 3 * i)
        pm = tl.load(f + 7 + 3 * i)
        p0_64 = p0.to(tl.int64)
        r64 = prate.to(tl.int64)
        if CAUSAL:
            # queries before the first key see none of the rows; from the last key on, all of them
            lo = (tl.minimum(count_upto(first - 1, p0, prate), pm) // BLOCK_I) * BLOCK_I
            mid = tl.minimum(count_upto(last - 1, p0, prate), pm)
            mid = tl.minimum(((mid + BLOCK_I - 1) // BLOCK_I) * BLOCK_I, pm)
        else:
            lo = 0
            mid = 0
        full = tl.maximum((pm // BLOCK_I) * BLOCK_I, mid)
        args = (q_base + p0_64 * q_sn, r64 * q_sn, do_base + p0_64 * do_sn, r64 * do_sn,
                l_base + p0_64 * l_sn, r64 * l_sn, de_base + p0_64 * de_sn, r64 * de_sn)
        dk, dv = key_grads(
            dk, dv, k, v, *args, pos, p0, prate, lo, mid, pm, qk_scale, d, True, CAUSAL, BLOCK_I, IEEE,
        )
        dk, dv = key_grads(
            dk, dv, k, v, *args, pos, p0, prate, mid, full, pm, qk_scale, d, False, CAUSAL, BLOCK_I, IEEE,
        )
        dk, dv = key_grads(
            dk, dv, k, v, *args, pos, p0, prate, full, pm, pm, qk_scale, d, True, False, BLOCK_I, IEEE,
        )
    g_base = b * g_sb + h * g_sh
    g_off = g_base + rows_2d * g_sn + d[None, :]
    tl.store(DK + g_off, (dk * scale).to(DK.dtype.element_ty), mask=rows_ok[:, None])
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=rows_ok[:, None])
    # --- the rows as queries: dq over the keys of every pattern that selects them
    q = tl.load(q_base + rows_2d * q_sn + d[None, :], mask=rows_ok[:, None], other=0.0)
    do = tl.load(do_base + rows_2d * do_sn + d[None, :], mask=rows_ok[:, None], other=0.0)
    lse = tl.load(l_base + pos64 * l_sn, mask=rows_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(de_base + pos64 * de_sn, mask=rows_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for i in range(0, N_PATTERNS):
        kpos0 = tl.load(f + 5 + 3 * i)
        krate = tl.load(f + 6 + 3 * i)
        km = tl.load(f + 7 + 3 * i)
        k_ptr, v_ptr, k_row, v_row = _key_run(k_base, v_base, kpos0, krate, k_sn, v_sn)
        full, hi = key_bounds(first, last, kpos0, krate, km, CAUSAL, BLOCK_I)
        dq = query_grads(
            dq, q, do, lse, delta, k_ptr, k_row, v_ptr, v_row, pos, kpos0, krate, 0, full, km, qk_scale, d,
            False, CAUSAL, BLOCK_I, IEEE,
        )
        dq = query_grads(
            dq, q, do, lse, delta, k_ptr, k_row, v_ptr, v_row, pos, kpos0, krate, full, hi, km, qk_scale, d,
            True, CAUSAL, BLOCK_I, IEEE,
        )
    tl.store(DQ + g_off, (dq * scale).to(DQ.dtype.element_ty), mask=rows_ok[:, None])
