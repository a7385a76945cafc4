"""The Triton kernels behind `combine.py` (imported only where triton is).

`combine_kernel` writes BLOCK_N positions of one (batch, head) of the
sequence-major output; `gather_kernel` copies them into the calls' blocks.
Both read the plan from `desc`, `combine._descriptor`'s int64 device tensor,
in a run-time loop over the parts that hold the program's head, so one
compiled kernel serves every plan with the same number of calls.
"""

import triton
import triton.language as tl

FIELDS: tl.constexpr = tl.constexpr(19)  # `combine.FIELDS` (not imported: combine imports this module)


@triton.jit
def part_geometry(fields):
    """(call, h_start, h_stop, h_step, offset, rate, start, seg_len, n_segs) of the
    part whose descriptor row starts at `fields`, as int32."""
    return (
        tl.load(fields).to(tl.int32), tl.load(fields + 1).to(tl.int32), tl.load(fields + 2).to(tl.int32),
        tl.load(fields + 3).to(tl.int32), tl.load(fields + 4).to(tl.int32), tl.load(fields + 5).to(tl.int32),
        tl.load(fields + 6).to(tl.int32), tl.load(fields + 7).to(tl.int32), tl.load(fields + 8).to(tl.int32),
    )


@triton.jit
def part_meets(tile, start, seg_len, n_segs, BLOCK_N: tl.constexpr):
    """Whether a part's range meets this tile (the head lists hold only parts whose
    head set holds the program's head; their empty padding part meets no tile)."""
    return (tile * BLOCK_N < start + n_segs * seg_len) & (tile * BLOCK_N + BLOCK_N > start)


@triton.jit
def part_rows(n, h, h0, hstep, offset, rate, start, seg_len, n_segs):
    """(head index in the part, segment, row in the segment's block, selected) of
    the int32 positions n."""
    rel = n - start
    seg = rel // seg_len
    pos = rel - seg * seg_len
    return (h - h0) // hstep, seg, pos // rate, (rel >= 0) & (pos % rate == offset) & (seg < n_segs)


@triton.jit
def block_offsets(strides, b, seg, a, row, ALIGN: tl.constexpr):
    """int64 element offsets, multiples of ALIGN, of rows in a block whose (base,
    per-batch, per-segment, per-head, per-row) strides are the five descriptor
    fields at `strides`. (The hint is given here, not by the caller: Triton 3.6
    drops a `multiple_of` put on an inlined call's result, and the loads and
    stores through these offsets then lose their 16-byte vectors.)"""
    return tl.multiple_of(
        tl.load(strides) + b * tl.load(strides + 1) + seg * tl.load(strides + 2)
        + a * tl.load(strides + 3) + row * tl.load(strides + 4),
        ALIGN,
    )


@triton.jit
def _picked(ptrs, i, N: tl.constexpr):
    """``ptrs[i]`` for a run-time i < N (a select, so the code is not repeated per
    tensor; the pointers' alignment carries through)."""
    p = ptrs[0]
    for t in tl.static_range(1, N):
        p = tl.where(i == t, ptrs[t], p)
    return p


@triton.jit
def add_part(
    acc, top, total, part, fields, out_ptr, lse_ptr, n, d, d_ok, h, b, tile,
    MERGE: tl.constexpr, ALIGN: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Fold the rows for head h and this tile of one part (its `part_geometry`, its
    descriptor row at `fields`, its call's results at out_ptr and lse_ptr) into
    (acc, top, total)."""
    _, h0, _, hstep, offset, rate, start, seg_len, n_segs = part
    if part_meets(tile, start, seg_len, n_segs, BLOCK_N):
        a, seg, r, sel = part_rows(n, h, h0, hstep, offset, rate, start, seg_len, n_segs)
        o_off = block_offsets(fields + 9, b, seg, a, r, ALIGN)
        x = tl.load(
            out_ptr + o_off[:, None] + d[None, :], mask=sel[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        if MERGE:
            l_off = block_offsets(fields + 14, b, seg, a, r, 1)
            lp = tl.load(lse_ptr + l_off, mask=sel, other=float("-inf")).to(tl.float32)
            new_top = tl.maximum(top, lp)
            safe = tl.where(new_top == float("-inf"), 0.0, new_top)
            alpha = tl.exp(top - safe)
            beta = tl.exp(lp - safe)
            acc = acc * alpha[:, None] + x * beta[:, None]
            total = total * alpha + beta
            top = new_top
        else:
            acc += x
    return acc, top, total


@triton.jit(do_not_specialize=["n_parts", "per_head", "seq_len"])
def combine_kernel(
    srcs, lses, dsts, dst_lse, desc, n_parts, per_head, seq_len,
    dst_sb, dst_sn, dst_sh, lse_sb, lse_sn, lse_sh,
    MERGE: tl.constexpr, N_DST: tl.constexpr, N_CALLS: tl.constexpr, ALIGN: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``dsts[s]`` (sequence-major, one layout for all s) from the blocks of
    ``srcs[s * N_CALLS + c]`` (call c's result for output s): merged by
    log-sum-exp with the calls' ``lses`` into `dst_lse` (MERGE, one output), or
    summed (N_DST outputs in one launch: dq, dk and dv). The grid's last axis is
    batch x N_DST."""
    tile, h = tl.program_id(0), tl.program_id(1)
    s = tl.program_id(2) % N_DST
    b = (tl.program_id(2) // N_DST).to(tl.int64)  # offsets pass 2**31 elements at 1M tokens
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n64 = n.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    top = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    head_parts = desc + (n_parts + 1) * FIELDS + h * per_head
    for j in range(per_head):
        fields = desc + tl.load(head_parts + j) * FIELDS
        part = part_geometry(fields)
        acc, top, total = add_part(
            acc, top, total, part, fields, _picked(srcs, s * N_CALLS + part[0], N_DST * N_CALLS),
            _picked(lses, part[0], N_CALLS), n, d, d_ok, h, b, tile, MERGE, ALIGN, BLOCK_N,
        )
    n_ok = n < seq_len
    dst_off = b * dst_sb + n64 * dst_sn + h * dst_sh
    if MERGE:
        has = total > 0
        res = acc / tl.where(has, total, 1.0)[:, None]
        lse = tl.where(has, top + tl.log(tl.where(has, total, 1.0)), float("-inf"))
        tl.store(dst_lse + b * lse_sb + n64 * lse_sn + h * lse_sh, lse, mask=n_ok)
    else:
        res = acc
    dst = _picked(dsts, s, N_DST)
    tl.store(
        dst + dst_off[:, None] + d[None, :],
        res.to(dst.dtype.element_ty),
        mask=n_ok[:, None] & d_ok[None, :],
    )


@triton.jit(do_not_specialize=["n_parts", "per_head", "seq_len"])
def gather_kernel(
    bufs, srcs, src_strides, bufs_l, src_l, desc, n_parts, per_head, seq_len, l_sb, l_sn, l_sh,
    N_SRC: tl.constexpr, N_CALLS: tl.constexpr, HAS_LSE: tl.constexpr, ALIGN: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The gather of (B, N, H, D) sources (and, with HAS_LSE, one (B, N, H)
    source) into the blocks of every call in `desc`: ``bufs[s][c]`` is source s's
    block of call c, ``bufs_l[c]`` the lse's. One program reads each of
    its rows once per part that selects it."""
    tile, h = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    n64 = n.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    n_ok = n < seq_len
    head_parts = desc + (n_parts + 1) * FIELDS + h * per_head
    for j in range(per_head):
        fields = desc + tl.load(head_parts + j) * FIELDS
        call, h0, _, hstep, offset, rate, start, seg_len, n_segs = part_geometry(fields)
        if part_meets(tile, start, seg_len, n_segs, BLOCK_N):
            a, seg, r, sel = part_rows(n, h, h0, hstep, offset, rate, start, seg_len, n_segs)
            sel = sel & n_ok
            o_off = block_offsets(fields + 9, b, seg, a, r, ALIGN)
            mask = sel[:, None] & d_ok[None, :]
            for s in tl.static_range(N_SRC):
                stride = src_strides[s]
                src_off = b * stride[0] + n64 * stride[1] + h * stride[2]
                x = tl.load(srcs[s] + src_off[:, None] + d[None, :], mask=mask)
                buf = _picked(bufs[s], call, N_CALLS)
                tl.store(buf + o_off[:, None] + d[None, :], x.to(buf.dtype.element_ty), mask=mask)
            if HAS_LSE:
                xl = tl.load(src_l + b * l_sb + n64 * l_sn + h * l_sh, mask=sel)
                l_off = block_offsets(fields + 14, b, seg, a, r, 1)
                tl.store(_picked(bufs_l, call, N_CALLS) + l_off, xl, mask=sel)
