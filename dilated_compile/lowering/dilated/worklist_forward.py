"""Triton kernels of the work-list forward (imported only where triton is).

`forward_kernel` runs every work item of a dilated attention in one launch:
a program owns one item (head, pattern, segment, offset, query block) of one
batch element. Its query, key and value rows are read straight from q, k, v
at positions ``pos0 + i * rate`` (the dilation is a row stride), attention is
an online softmax in fp32 (scores in base 2), and the rows are written with
their log-sum-exp either straight into the output at their positions
(``COMPACT=False``: one pattern per head, the ``groups`` split; the program also
writes 0 and -inf at the positions of its block that its pattern does not
select) or into one compact row block per pattern (``COMPACT=True``: the
``longnet`` split, merged afterwards by `merge_kernel`).

An item is `ITEM_FIELDS` int32 values (head, pos0, rate, m, block, out_row0,
seg_start, seg_len, offset), see `worklist_items.py`.
"""

import triton
import triton.language as tl

from .worklist_loops import attend_keys


@triton.jit
def forward_kernel(
    Q, K, V, O, L, ITEMS, scale,
    q_sb, q_sh, q_sn, k_sb, k_sh, k_sn, v_sb, v_sh, v_sn,
    o_sb, o_sh, o_sn, l_sb, l_sh, l_sn,
    CAUSAL: tl.constexpr, COMPACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
):
    """Grid (items, batch). Writes out rows and their natural-log log-sum-exp. ``TMA``:
    rows are read and written through tensor descriptors of each item's run (Hopper's
    tensor memory accelerator), which needs every row 16-byte aligned and Triton's
    allocator set (`worklist_blocks.allocator_ready`)."""
    scale = tl.cast(scale, tl.float32)  # Inductor passes a Python float as fp64
    item = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    # the item's fields, loaded here rather than by a helper: Inductor's analysis of a kernel's
    # writes would take a helper's arguments (ITEMS) for written memory
    f = ITEMS + item * 9
    h, pos0, rate, m, blk = tl.load(f), tl.load(f + 1), tl.load(f + 2), tl.load(f + 3), tl.load(f + 4)
    orow0, seg_start, seg_len, offset = tl.load(f + 5), tl.load(f + 6), tl.load(f + 7), tl.load(f + 8)
    h = h.to(tl.int64)
    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    o_base = O + b * o_sb + h * o_sh
    l_base = L + b * l_sb + h * l_sh
    if not COMPACT:
        # positions of this block's rows that the item's pattern does not select: 0, -inf
        zero = tl.zeros([BLOCK_M, HEAD_DIM], dtype=O.dtype.element_ty)
        for other in range(0, rate):
            if other != offset:
                pos = (seg_start + other + rows * rate).to(tl.int64)
                ok = other + rows * rate < seg_len
                tl.store(o_base + pos[:, None] * o_sn + d[None, :], zero, mask=ok[:, None])
                tl.store(l_base + pos * l_sn, tl.full([BLOCK_M], float("-inf"), tl.float32), mask=ok)
    if blk * BLOCK_M < m:
        rows_ok = rows < m
        qrow = pos0.to(tl.int64) + rows.to(tl.int64) * rate
        k_ptr = K + b * k_sb + h * k_sh + pos0.to(tl.int64) * k_sn
        v_ptr = V + b * v_sb + h * v_sh + pos0.to(tl.int64) * v_sn
        k_row = rate.to(tl.int64) * k_sn
        v_row = rate.to(tl.int64) * v_sn
        if TMA:  # the item's run of q, k, v rows as (m, HEAD_DIM) tensors, row stride rate
            q = tl.make_tensor_descriptor(
                Q + b * q_sb + h * q_sh + pos0.to(tl.int64) * q_sn, shape=[m, HEAD_DIM],
                strides=[rate.to(tl.int64) * q_sn, 1], block_shape=[BLOCK_M, HEAD_DIM],
            ).load([blk * BLOCK_M, 0])
            k_ptr = tl.make_tensor_descriptor(k_ptr, shape=[m, HEAD_DIM], strides=[k_row, 1],
                                              block_shape=[BLOCK_N, HEAD_DIM])
            v_ptr = tl.make_tensor_descriptor(v_ptr, shape=[m, HEAD_DIM], strides=[v_row, 1],
                                              block_shape=[BLOCK_N, HEAD_DIM])
        else:
            q = tl.load(
                Q + b * q_sb + h * q_sh + qrow[:, None] * q_sn + d[None, :], mask=rows_ok[:, None], other=0.0
            )
        qk_scale = scale * 1.4426950408889634
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        if CAUSAL:
            lo = blk * BLOCK_M  # keys below the block: no mask (BLOCK_M is a multiple of BLOCK_N)
            acc, l_i, m_i = attend_keys(
                acc, l_i, m_i, q, k_ptr, v_ptr, k_row, v_row, rows, 0, 1, 0, lo, m, qk_scale, d,
                False, False, BLOCK_N, IEEE, TMA,
            )
            hi = tl.minimum(lo + BLOCK_M, m)
            acc, l_i, m_i = attend_keys(
                acc, l_i, m_i, q, k_ptr, v_ptr, k_row, v_row, rows, 0, 1, lo, hi, m, qk_scale, d,
                True, True, BLOCK_N, IEEE, TMA,
            )
        else:
            full = (m // BLOCK_N) * BLOCK_N
            acc, l_i, m_i = attend_keys(
                acc, l_i, m_i, q, k_ptr, v_ptr, k_row, v_row, rows, 0, 1, 0, full, m, qk_scale, d,
                False, False, BLOCK_N, IEEE, TMA,
            )
            acc, l_i, m_i = attend_keys(
                acc, l_i, m_i, q, k_ptr, v_ptr, k_row, v_row, rows, 0, 1, full, m, m, qk_scale, d,
                True, False, BLOCK_N, IEEE, TMA,
            )
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(l_i > 0, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        if COMPACT:
            orow = orow0.to(tl.int64) + rows
        else:
            orow = qrow
        if TMA:  # the item's run of output rows: compact, or at the queries' positions
            if COMPACT:
                o_run = o_base + orow0.to(tl.int64) * o_sn
                o_step = o_sn
            else:
                o_run = o_base + pos0.to(tl.int64) * o_sn
                o_step = rate.to(tl.int64) * o_sn
            tl.make_tensor_descriptor(o_run, shape=[m, HEAD_DIM], strides=[o_step, 1],
                                      block_shape=[BLOCK_M, HEAD_DIM]).store([blk * BLOCK_M, 0],
                                                                             out.to(O.dtype.element_ty))
        else:
            tl.store(o_base + orow[:, None] * o_sn + d[None, :], out.to(O.dtype.element_ty), mask=rows_ok[:, None])
        tl.store(l_base + orow * l_sn, lse, mask=rows_ok)


@triton.jit
def merge_kernel(
    CO, CL, O, L, PATTERNS, seq_len,
    co_sb, co_sh, cl_sb, cl_sh, o_sb, o_sh, o_sn, l_sb, l_sh, l_sn,
    N_PATTERNS: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Grid (position tiles, heads, batch): the ``longnet`` merge of the compact
    per-pattern rows (CO: rows of HEAD_DIM contiguous values, CL: their fp32 lse)
    into O and L by
    log-sum-exp. PATTERNS: (w, r, first row, rows per segment) per pattern."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n = tile * BLOCK + tl.arange(0, BLOCK)
    n_ok = n < seq_len
    d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([BLOCK, HEAD_DIM], dtype=tl.float32)
    top = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    cbase = b * co_sb + h.to(tl.int64) * co_sh
    lbase = b * cl_sb + h.to(tl.int64) * cl_sh
    for i in tl.static_range(N_PATTERNS):
        w = tl.load(PATTERNS + i * 4 + 0)
        r = tl.load(PATTERNS + i * 4 + 1)
        row0 = tl.load(PATTERNS + i * 4 + 2)
        per_seg = tl.load(PATTERNS + i * 4 + 3)
        seg = n // w
        inside = n - seg * w
        sel = n_ok & (inside % r == h % r)
        row = (row0 + seg * per_seg + inside // r).to(tl.int64)
        x = tl.load(CO + cbase + row[:, None] * HEAD_DIM + d[None, :], mask=sel[:, None], other=0.0).to(tl.float32)
        lp = tl.load(CL + lbase + row, mask=sel, other=float("-inf"))
        new_top = tl.maximum(top, lp)
        safe = tl.where(new_top == float("-inf"), 0.0, new_top)
        alpha = tl.exp(top - safe)
        beta = tl.exp(lp - safe)
        acc = acc * alpha[:, None] + x * beta[:, None]
        total = total * alpha + beta
        top = new_top
    has = total > 0
    res = acc / tl.where(has, total, 1.0)[:, None]
    lse = tl.where(has, top + tl.log(tl.where(has, total, 1.0)), float("-inf"))
    nn = n.to(tl.int64)
    tl.store(O + b * o_sb + h * o_sh + nn[:, None] * o_sn + d[None, :], res.to(O.dtype.element_ty), mask=n_ok[:, None])
    tl.store(L + b * l_sb + h * l_sh + nn * l_sn, lse, mask=n_ok)
