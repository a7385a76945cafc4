"""Triton kernels of the work-list backward (imported only where triton is).

Three launches at most, from the forward's work items:

1. `prepare_kernel`: delta = rowsum(dO * O) per (batch, head, position), from
   the *merged* output (with ``longnet`` every pattern's backward uses the merged
   out and lse: that makes the gradient of the log-sum-exp merge exact); with
   ``ACCUMULATE`` it also zeroes the three fp32 gradient accumulators.
2. `backward_kernel`: one program per item (of one batch element). Its rows
   are a key block (dk, dv: a loop over the segment's query rows) and a query
   block (dq: a loop over its key rows). ``groups``: every row of a head belongs
   to exactly one item, so gradients are stored in place in the input dtype, and
   the program writes 0 at its block's rows of other offsets. ``longnet``, merged
   (where it does not run as one softmax, `worklist_union.py`): a row that several
   patterns select gets each pattern's contribution by an fp32 atomic add into the
   accumulators (sums in a run-dependent order: the result
   may differ between runs by fp32 rounding).
3. `cast_kernel` (``longnet``): the fp32 accumulators into dq, dk, dv.
"""

import triton
import triton.language as tl

from .worklist_loops import key_grads, query_grads


@triton.jit
def prepare_kernel(
    DO, O, DELTA, ACC0, ACC1, ACC2, seq_len,
    do_sb, do_sh, do_sn, o_sb, o_sh, o_sn, de_sb, de_sh, de_sn,
    ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Grid (position tiles, heads, batch): DELTA = rowsum(DO * O); with ``ACCUMULATE``
    zeroes the tile's rows of the three (B, N, H, D) fp32 accumulators."""
    tile = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    n = (tile * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    ok = n < seq_len
    d = tl.arange(0, HEAD_DIM)
    do = tl.load(DO + b * do_sb + h * do_sh + n[:, None] * do_sn + d[None, :], mask=ok[:, None], other=0.0)
    o = tl.load(O + b * o_sb + h * o_sh + n[:, None] * o_sn + d[None, :], mask=ok[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + b * de_sb + h * de_sh + n * de_sn, delta, mask=ok)
    if ACCUMULATE:
        heads = tl.num_programs(1)
        acc_off = (((b * seq_len + n) * heads + h) * HEAD_DIM)[:, None] + d[None, :]
        zero = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
        tl.store(ACC0 + acc_off, zero, mask=ok[:, None])
        tl.store(ACC1 + acc_off, zero, mask=ok[:, None])
        tl.store(ACC2 + acc_off, zero, mask=ok[:, None])


@triton.jit
def _put(ptr, val, mask, ACCUMULATE: tl.constexpr):
    if ACCUMULATE:
        tl.atomic_add(ptr, val, mask=mask)
    else:
        tl.store(ptr, val.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def backward_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, ITEMS, scale,
    q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn, do_sb, do_sh, do_sn,
    l_sb, l_sh, l_sn, de_sb, de_sh, de_sn, g_sb, g_sh, g_sn,
    CAUSAL: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr,
    HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
):
    """Grid (items, batch): dk, dv of the item's rows as keys, dq of its rows as
    queries. DQ, DK, DV share the strides g_* (the fp32 accumulators with
    ``ACCUMULATE``, else the gradients themselves)."""
    scale = tl.cast(scale, tl.float32)  # Inductor passes a Python float as fp64
    item = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    f = ITEMS + item * 9  # the item's fields, loaded here (see forward_kernel)
    h, pos0, rate, m, blk = tl.load(f), tl.load(f + 1), tl.load(f + 2), tl.load(f + 3), tl.load(f + 4)
    seg_start, seg_len, offset = tl.load(f + 6), tl.load(f + 7), tl.load(f + 8)
    h = h.to(tl.int64)
    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    g_base = b * g_sb + h * g_sh
    if not ACCUMULATE:  # rows of other offsets in this block: no gradient
        zero = tl.zeros([BLOCK_M, HEAD_DIM], dtype=DQ.dtype.element_ty)
        for other in range(0, rate):
            if other != offset:
                pos = (seg_start + other + rows * rate).to(tl.int64)
                ok = other + rows * rate < seg_len
                off = g_base + pos[:, None] * g_sn + d[None, :]
                tl.store(DQ + off, zero, mask=ok[:, None])
                tl.store(DK + off, zero, mask=ok[:, None])
                tl.store(DV + off, zero, mask=ok[:, None])
    if blk * BLOCK_M < m:
        rows_ok = rows < m
        p0 = pos0.to(tl.int64)
        r64 = rate.to(tl.int64)
        q_ptr = Q + b * q_sb + h * q_sh + p0 * q_sn
        k_ptr = K + b * k_sb + h * k_sh + p0 * k_sn
        v_ptr = V + b * v_sb + h * v_sh + p0 * v_sn
        do_ptr = DO + b * do_sb + h * do_sh + p0 * do_sn
        lse_ptr = LSE + b * l_sb + h * l_sh + p0 * l_sn
        de_ptr = DELTA + b * de_sb + h * de_sh + p0 * de_sn
        rr = rows.to(tl.int64)
        qk_scale = scale * 1.4426950408889634
        # --- the rows as keys: dk, dv
        k = tl.load(k_ptr + rr[:, None] * (r64 * k_sn) + d[None, :], mask=rows_ok[:, None], other=0.0)
        v = tl.load(v_ptr + rr[:, None] * (r64 * v_sn) + d[None, :], mask=rows_ok[:, None], other=0.0)
        dk = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if CAUSAL:
            lo = blk * BLOCK_M
            diag = tl.minimum(lo + BLOCK_M, m)
            dk, dv = key_grads(
                dk, dv, k, v, q_ptr, r64 * q_sn, do_ptr, r64 * do_sn, lse_ptr, r64 * l_sn, de_ptr,
                r64 * de_sn, rows, 0, 1, lo, diag, m, qk_scale, d, True, True, BLOCK_I, IEEE,
            )
            dk, dv = key_grads(
                dk, dv, k, v, q_ptr, r64 * q_sn, do_ptr, r64 * do_sn, lse_ptr, r64 * l_sn, de_ptr,
                r64 * de_sn, rows, 0, 1, diag, m, m, qk_scale, d, True, False, BLOCK_I, IEEE,
            )
        else:
            dk, dv = key_grads(
                dk, dv, k, v, q_ptr, r64 * q_sn, do_ptr, r64 * do_sn, lse_ptr, r64 * l_sn, de_ptr,
                r64 * de_sn, rows, 0, 1, 0, m, m, qk_scale, d, True, False, BLOCK_I, IEEE,
            )
        grow = p0 + rr * r64
        g_off = g_base + grow[:, None] * g_sn + d[None, :]
        _put(DK + g_off, dk * scale, rows_ok[:, None], ACCUMULATE)
        _put(DV + g_off, dv, rows_ok[:, None], ACCUMULATE)
        # --- the rows as queries: dq
        q = tl.load(q_ptr + rr[:, None] * (r64 * q_sn) + d[None, :], mask=rows_ok[:, None], other=0.0)
        do = tl.load(do_ptr + rr[:, None] * (r64 * do_sn) + d[None, :], mask=rows_ok[:, None], other=0.0)
        lse = tl.load(lse_ptr + rr * (r64 * l_sn), mask=rows_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(de_ptr + rr * (r64 * de_sn), mask=rows_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if CAUSAL:
            lo = blk * BLOCK_M
            dq = query_grads(
                dq, q, do, lse, delta, k_ptr, r64 * k_sn, v_ptr, r64 * v_sn, rows, 0, 1, 0, lo, m, qk_scale, d,
                False, False, BLOCK_I, IEEE,
            )
            dq = query_grads(
                dq, q, do, lse, delta, k_ptr, r64 * k_sn, v_ptr, r64 * v_sn, rows, 0, 1, lo,
                tl.minimum(lo + BLOCK_M, m), m, qk_scale, d, True, True, BLOCK_I, IEEE,
            )
        else:
            full = (m // BLOCK_I) * BLOCK_I
            dq = query_grads(
                dq, q, do, lse, delta, k_ptr, r64 * k_sn, v_ptr, r64 * v_sn, rows, 0, 1, 0, full, m, qk_scale, d,
                False, False, BLOCK_I, IEEE,
            )
            dq = query_grads(
                dq, q, do, lse, delta, k_ptr, r64 * k_sn, v_ptr, r64 * v_sn, rows, 0, 1, full, m, m, qk_scale, d,
                True, False, BLOCK_I, IEEE,
            )
        _put(DQ + g_off, dq * scale, rows_ok[:, None], ACCUMULATE)


@triton.jit
def cast_kernel(ACC0, ACC1, ACC2, DQ, DK, DV, numel, BLOCK: tl.constexpr):
    """Grid (element tiles, 3): accumulator t (fp32) into DQ, DK or DV (same layout)."""
    t = tl.program_id(1)
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = off < numel
    src = tl.where(t == 0, ACC0, tl.where(t == 1, ACC1, ACC2))
    dst = tl.where(t == 0, DQ, tl.where(t == 1, DK, DV))
    tl.store(dst + off, tl.load(src + off, mask=ok).to(DQ.dtype.element_ty), mask=ok)
