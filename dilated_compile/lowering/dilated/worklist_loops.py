"""Triton loops shared by the work-list kernels (imported only where triton is).

Rows and keys are addressed by position: a block of query rows at positions
`qpos` (or key rows at `kpos`), and one run of a pattern's selected positions
``pos0 + j * rate`` (j < count) read through a pointer to its first row and a
row stride. Causal masks compare these positions (a key at or before its
query). ``MASK`` loops mask the run's end (and, with ``CAUSAL``, the causal
edge); the others read whole blocks unmasked.
"""

import triton
import triton.language as tl


@triton.jit
def dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def count_upto(pos, start, rate):
    """How many of the positions start, start + rate, ... are <= pos (0 when pos < start)."""
    return tl.where(pos >= start, (pos - start) // rate + 1, 0)


@triton.jit
def key_bounds(first, last, kpos0, krate, km, CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
    """(full, hi) for query rows at positions first..last and keys kpos0 + j * krate
    (j < km): keys [0, full) need no mask (a multiple of BLOCK), keys [full, hi) do."""
    if CAUSAL:
        full = (tl.minimum(count_upto(first, kpos0, krate), km) // BLOCK) * BLOCK
        hi = tl.minimum(count_upto(last, kpos0, krate), km)
    else:
        full = (km // BLOCK) * BLOCK
        hi = km
    return full, hi


@triton.jit
def attend_keys(
    acc, l_i, m_i, q, k_ptr, v_ptr, k_row, v_row, qpos, kpos0, krate, j_lo, j_hi, km, qk_scale, d,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    TMA: tl.constexpr = False,
):
    """Fold keys [j_lo, j_hi) of one pattern (key j at position kpos0 + j * krate) into
    the online softmax of the query rows at positions `qpos`. ``TMA``: `k_ptr` and `v_ptr`
    are tensor descriptors of the pattern's keys and values (row j: key j; rows past
    the run read as 0), and `k_row`, `v_row` are unused."""
    for j0 in range(j_lo, j_hi, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N)
        jj = j.to(tl.int64)
        if TMA:
            k = k_ptr.load([j0, 0])
        elif MASK:
            k = tl.load(k_ptr + jj[:, None] * k_row + d[None, :], mask=(j < km)[:, None], other=0.0)
        else:
            k = tl.load(k_ptr + jj[:, None] * k_row + d[None, :])
        s = dot(q, tl.trans(k), IEEE) * qk_scale
        if MASK:
            keep = (j < km)[None, :]
            if CAUSAL:
                keep = keep & ((kpos0 + j * krate)[None, :] <= qpos[:, None])
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
        if MASK:  # a row may have no key yet: keep exp2 away from -inf - -inf
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if TMA:
            v = v_ptr.load([j0, 0])
        elif MASK:
            v = tl.load(v_ptr + jj[:, None] * v_row + d[None, :], mask=(j < km)[:, None], other=0.0)
        else:
            v = tl.load(v_ptr + jj[:, None] * v_row + d[None, :])
        acc = dot(p.to(v.dtype), v, IEEE) + acc
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def key_grads(
    dk, dv, k, v, q_ptr, q_row, do_ptr, do_row, lse_ptr, l_row, de_ptr, de_row, kpos, qpos0, qrate,
    i_lo, i_hi, qm, qk_scale, d,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_I: tl.constexpr, IEEE: tl.constexpr,
):
    """Add one pattern's queries [i_lo, i_hi) (query i at position qpos0 + i * qrate) to
    the dk (unscaled) and dv of the key rows at positions `kpos`."""
    for i0 in range(i_lo, i_hi, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        ii = i.to(tl.int64)
        if MASK:  # queries past the last: no score (lse +inf), no gradient
            ok = i < qm
            q = tl.load(q_ptr + ii[:, None] * q_row + d[None, :], mask=ok[:, None], other=0.0)
            do = tl.load(do_ptr + ii[:, None] * do_row + d[None, :], mask=ok[:, None], other=0.0)
            lse = tl.load(lse_ptr + ii * l_row, mask=ok, other=float("inf"))
            delta = tl.load(de_ptr + ii * de_row, mask=ok, other=0.0)
        else:
            q = tl.load(q_ptr + ii[:, None] * q_row + d[None, :])
            do = tl.load(do_ptr + ii[:, None] * do_row + d[None, :])
            lse = tl.load(lse_ptr + ii * l_row)
            delta = tl.load(de_ptr + ii * de_row)
        lse = lse * 1.4426950408889634
        s_t = dot(k, tl.trans(q), IEEE) * qk_scale  # (keys, queries)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASK:
            if CAUSAL:
                p_t = tl.where((qpos0 + i * qrate)[None, :] >= kpos[:, None], p_t, 0.0)
        dv = dot(p_t.to(do.dtype), do, IEEE) + dv
        dp_t = dot(v, tl.trans(do), IEEE)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = dot(ds_t.to(q.dtype), q, IEEE) + dk
    return dk, dv


@triton.jit
def query_grads(
    dq, q, do, lse, delta, k_ptr, k_row, v_ptr, v_row, qpos, kpos0, krate, j_lo, j_hi, km, qk_scale, d,
    MASK: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_J: tl.constexpr, IEEE: tl.constexpr,
):
    """Add one pattern's keys [j_lo, j_hi) to the dq (unscaled) of the query rows at `qpos`."""
    for j0 in range(j_lo, j_hi, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)
        jj = j.to(tl.int64)
        if MASK:
            k = tl.load(k_ptr + jj[:, None] * k_row + d[None, :], mask=(j < km)[:, None], other=0.0)
            v = tl.load(v_ptr + jj[:, None] * v_row + d[None, :], mask=(j < km)[:, None], other=0.0)
        else:
            k = tl.load(k_ptr + jj[:, None] * k_row + d[None, :])
            v = tl.load(v_ptr + jj[:, None] * v_row + d[None, :])
        p = tl.math.exp2(dot(q, tl.trans(k), IEEE) * qk_scale - lse[:, None])
        if MASK:
            keep = (j < km)[None, :]
            if CAUSAL:
                keep = keep & ((kpos0 + j * krate)[None, :] <= qpos[:, None])
            p = tl.where(keep, p, 0.0)
        dp = dot(do, tl.trans(v), IEEE)
        ds = p * (dp - delta[:, None])
        dq = dot(ds.to(k.dtype), k, IEEE) + dq
    return dq
