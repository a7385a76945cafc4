"""The Triton kernel behind `combine.py` (imported only where triton is).

`combine_kernel` writes BLOCK_N positions of one (batch, head) of the
sequence-major output; `add_part` folds one part of the plan into the
tile's accumulators. `PARTS` is `combine._descriptor`'s flat tuple of 19
compile-time ints per part.
"""

import triton
import triton.language as tl


@triton.jit
def part_meets(h, tile, H0, H1, HSTEP, START, SEG, NSEGS, BLOCK_N: tl.constexpr):
    """Whether a part's head set holds head h and its range meets this tile."""
    member = (h >= H0) & (h < H1) & ((h - H0) % HSTEP == 0)
    return member & (tile * BLOCK_N < START + NSEGS * SEG) & (tile * BLOCK_N + BLOCK_N > START)


@triton.jit
def part_rows(n, h, H0, HSTEP, OFFSET, RATE, START, SEG):
    """(head index in the part, segment, row in the segment's block, selected) of positions n."""
    rel = n - START
    seg = rel // SEG
    pos = rel - seg * SEG
    return (h - H0) // HSTEP, seg, pos // RATE, (rel >= 0) & (pos % RATE == OFFSET)


@triton.jit
def add_part(
    acc, top, total, out_ptr, lse_ptr, n, d, d_ok, h, b, tile,
    H0: tl.constexpr, H1: tl.constexpr, HSTEP: tl.constexpr, OFFSET: tl.constexpr,
    RATE: tl.constexpr, START: tl.constexpr, SEG: tl.constexpr, NSEGS: tl.constexpr,
    O0: tl.constexpr, OB: tl.constexpr, OS: tl.constexpr, OA: tl.constexpr, OM: tl.constexpr,
    L0: tl.constexpr, LB: tl.constexpr, LS: tl.constexpr, LA: tl.constexpr, LM: tl.constexpr,
    MERGE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Fold one part's rows for head h and this tile into (acc, top, total)."""
    if part_meets(h, tile, H0, H1, HSTEP, START, SEG, NSEGS, BLOCK_N):
        a, seg, row, sel = part_rows(n, h, H0, HSTEP, OFFSET, RATE, START, SEG)
        sel = sel & (seg < NSEGS)
        o_off = O0 + b * OB + seg * OS + a * OA + row * OM
        x = tl.load(
            out_ptr + o_off[:, None] + d[None, :], mask=sel[:, None] & d_ok[None, :], other=0.0
        ).to(tl.float32)
        if MERGE:
            l_off = L0 + b * LB + seg * LS + a * LA + row * LM
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


@triton.jit
def add_part_k(
    acc, top, total, out_ptr, lse_ptr, n, d, d_ok, h, b, tile,
    PARTS: tl.constexpr, K: tl.constexpr, MERGE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """`add_part` for part K of the plan's descriptor PARTS."""
    return add_part(
        acc, top, total, out_ptr, lse_ptr, n, d, d_ok, h, b, tile,
        PARTS[K * 19 + 1], PARTS[K * 19 + 2], PARTS[K * 19 + 3], PARTS[K * 19 + 4],
        PARTS[K * 19 + 5], PARTS[K * 19 + 6], PARTS[K * 19 + 7], PARTS[K * 19 + 8],
        PARTS[K * 19 + 9], PARTS[K * 19 + 10], PARTS[K * 19 + 11], PARTS[K * 19 + 12],
        PARTS[K * 19 + 13], PARTS[K * 19 + 14], PARTS[K * 19 + 15], PARTS[K * 19 + 16],
        PARTS[K * 19 + 17], PARTS[K * 19 + 18], MERGE, BLOCK_N,
    )


@triton.jit
def _picked(ptrs, call, s, N_DST: tl.constexpr):
    """``ptrs[s][call]`` for a run-time s < N_DST (a select, so the kernel's code is
    not repeated per tensor; the pointers' alignment carries through)."""
    p = ptrs[0][call]
    for t in tl.static_range(1, N_DST):
        p = tl.where(s == t, ptrs[t][call], p)
    return p


@triton.jit
def _picked_dst(ptrs, s, N_DST: tl.constexpr):
    p = ptrs[0]
    for t in tl.static_range(1, N_DST):
        p = tl.where(s == t, ptrs[t], p)
    return p


@triton.jit
def combine_kernel(
    srcs, lses, dsts, dst_lse, seq_len,
    dst_sb, dst_sn, dst_sh, lse_sb, lse_sn, lse_sh,
    PARTS: tl.constexpr, N_PARTS: tl.constexpr, MERGE: tl.constexpr, N_DST: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``dsts[s]`` (sequence-major, one layout for all s) from the blocks ``srcs[s]``
    (call c's in ``srcs[s][c]``): merged by log-sum-exp with the calls' ``lses``
    into `dst_lse` (MERGE, one output), or summed (N_DST outputs in one launch: dq,
    dk and dv). The grid's last axis is batch x N_DST; a program picks its tensor's
    pointers at run time, so the code is not repeated per tensor."""
    tile, h = tl.program_id(0), tl.program_id(1)
    s = tl.program_id(2) % N_DST
    b = (tl.program_id(2) // N_DST).to(tl.int64)  # offsets pass 2**31 elements at 1M tokens
    n = tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    top = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k in tl.static_range(N_PARTS):
        acc, top, total = add_part_k(
            acc, top, total, _picked(srcs, PARTS[k * 19], s, N_DST), lses[PARTS[k * 19]],
            n, d, d_ok, h, b, tile, PARTS, k, MERGE, BLOCK_N,
        )
    n_ok = n < seq_len
    dst_off = b * dst_sb + n * dst_sn + h * dst_sh
    if MERGE:
        has = total > 0
        res = acc / tl.where(has, total, 1.0)[:, None]
        lse = tl.where(has, top + tl.log(tl.where(has, total, 1.0)), float("-inf"))
        tl.store(dst_lse + b * lse_sb + n * lse_sn + h * lse_sh, lse, mask=n_ok)
    else:
        res = acc
    dst = _picked_dst(dsts, s, N_DST)
    tl.store(
        dst + dst_off[:, None] + d[None, :],
        res.to(dst.dtype.element_ty),
        mask=n_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def gather_part(
    bufs, srcs, src_strides, bufs_l, src_l, l_sb, l_sn, l_sh, n, n_ok, d, d_ok, h, b, tile,
    CALL: tl.constexpr, H0: tl.constexpr, H1: tl.constexpr, HSTEP: tl.constexpr,
    OFFSET: tl.constexpr, RATE: tl.constexpr, START: tl.constexpr, SEG: tl.constexpr,
    NSEGS: tl.constexpr, O0: tl.constexpr, OB: tl.constexpr, OS: tl.constexpr,
    OA: tl.constexpr, OM: tl.constexpr, L0: tl.constexpr, LB: tl.constexpr, LS: tl.constexpr,
    LA: tl.constexpr, LM: tl.constexpr, N_SRC: tl.constexpr, HAS_LSE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Copy the tile's rows that one part selects for head h from each source into
    that source's block of the part's call."""
    if part_meets(h, tile, H0, H1, HSTEP, START, SEG, NSEGS, BLOCK_N):
        a, seg, row, sel = part_rows(n, h, H0, HSTEP, OFFSET, RATE, START, SEG)
        sel = sel & (seg < NSEGS) & n_ok
        o_off = O0 + b * OB + seg * OS + a * OA + row * OM
        mask = sel[:, None] & d_ok[None, :]
        for s in tl.static_range(N_SRC):
            stride = src_strides[s]
            src_off = b * stride[0] + n * stride[1] + h * stride[2]
            x = tl.load(srcs[s] + src_off[:, None] + d[None, :], mask=mask)
            buf = bufs[s][CALL]
            tl.store(buf + o_off[:, None] + d[None, :], x.to(buf.dtype.element_ty), mask=mask)
        if HAS_LSE:
            xl = tl.load(src_l + b * l_sb + n * l_sn + h * l_sh, mask=sel)
            tl.store(bufs_l[CALL] + L0 + b * LB + seg * LS + a * LA + row * LM, xl, mask=sel)


@triton.jit
def gather_kernel(
    bufs, srcs, src_strides, bufs_l, src_l, seq_len, l_sb, l_sn, l_sh,
    PARTS: tl.constexpr, N_PARTS: tl.constexpr, N_SRC: tl.constexpr, HAS_LSE: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The gather of (B, N, H, D) sources (and, with HAS_LSE, one (B, N, H)
    source) into the blocks of every call in PARTS: `bufs[s][c]` is source s's
    block of call c. One program reads each of its rows once per part that
    selects it."""
    tile, h = tl.program_id(0), tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    n = tile.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    n_ok = n < seq_len
    for k in tl.static_range(N_PARTS):
        gather_part(
            bufs, srcs, src_strides, bufs_l, src_l, l_sb, l_sn, l_sh, n, n_ok, d, d_ok, h, b, tile,
            PARTS[k * 19], PARTS[k * 19 + 1], PARTS[k * 19 + 2], PARTS[k * 19 + 3],
            PARTS[k * 19 + 4], PARTS[k * 19 + 5], PARTS[k * 19 + 6], PARTS[k * 19 + 7],
            PARTS[k * 19 + 8], PARTS[k * 19 + 9], PARTS[k * 19 + 10], PARTS[k * 19 + 11],
            PARTS[k * 19 + 12], PARTS[k * 19 + 13], PARTS[k * 19 + 14], PARTS[k * 19 + 15],
            PARTS[k * 19 + 16], PARTS[k * 19 + 17], PARTS[k * 19 + 18], N_SRC, HAS_LSE, BLOCK_N,
        )
