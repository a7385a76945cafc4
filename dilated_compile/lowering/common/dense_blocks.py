"""Attention of rows against gathered keys as dense blocks through the fused kernels.

The rings' partial attentions (dilated segments that span ranks, block-sparse
steps) allow a structured set of (row, key) pairs. Where that set splits into
blocks of rows that each see some keys in full and, with causal masking, a
causal square of keys at the rows' own positions, it runs as batched calls of
`kernels.block_attention` (cuDNN/flash on GPUs) instead of a masked float32
attention holding every score.

A *block* is (rows, full keys, diagonal keys): row indices, indices of the
keys every row of the block sees, and (possibly none) indices of keys at the
rows' own positions in the same order, which row t sees up to t. `group`
collects blocks of one shape into one batched call ``(m, a, d, rows, full,
diag)`` (m rows, a full keys, d diagonal keys per block, then the flat
indices block after block).
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from .block_kernels import accumulation_dtype, block_attention, block_attention_backward
from .merge import merge_by_lse

Group = tuple[int, int, int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]


def group(blocks: Iterable[tuple[Sequence[int], Sequence[int], Sequence[int]]]) -> tuple[Group, ...]:
    """Blocks (rows, full keys, diagonal keys) grouped by shape, in a fixed order."""
    groups: dict[tuple[int, int, int], tuple[list, list, list]] = {}
    seen: set[int] = set()
    for rows, full, diag in blocks:
        if diag and len(diag) != len(rows):
            raise ValueError("a block's diagonal keys must be as many as its rows")
        if not seen.isdisjoint(rows) or len(set(rows)) != len(rows):
            raise ValueError("a row in two blocks (or twice in one): a row's keys must be one block")
        seen.update(rows)
        acc = groups.setdefault((len(rows), len(full), len(diag)), ([], [], []))
        for out, part in zip(acc, (rows, full, diag)):
            out.extend(part)
    return tuple(
        (m, a, d, tuple(rows), tuple(full), tuple(diag))
        for (m, a, d), (rows, full, diag) in sorted(groups.items())
    )


def runs(rows: list[tuple[int, int]], step: int) -> list[list[tuple[int, int]]]:
    """Sorted (position, index) pairs cut into runs of consecutive positions `step` apart:
    the rows a causal square can serve together."""
    out = [[rows[0]]]
    for prev, row in zip(rows, rows[1:]):
        if row[0] == prev[0] + step:
            out[-1].append(row)
        else:
            out.append([row])
    return out


# Index tensors of plan tuples for eager calls, by (id of the tuple, device): plans are cached,
# so their tuples are the same objects on every call (hashing a tuple of thousands of indices
# would cost more than building the tensor). Each entry keeps its tuple, so a reused id
# cannot match. Bounded: past the bound the table starts over.
_INDICES: dict[tuple, tuple[tuple, object]] = {}
_INDICES_MAX = 4096


def _remembered(values: tuple, key: tuple, make):
    """make() for the tuple `values`, remembered under (id(values), *key)."""
    k = (id(values), *key)
    hit = _INDICES.get(k)
    if hit is not None and hit[0] is values:
        return hit[1]
    if len(_INDICES) >= _INDICES_MAX:
        _INDICES.clear()
    out = make()
    _INDICES[k] = (values, out)
    return out


def _index(values: tuple[int, ...], device, cached: bool) -> torch.Tensor:
    """`values` as a long tensor on `device`; remembered when `cached` (real tensors, eager)."""
    def make():
        return torch.tensor(values, dtype=torch.long, device=device)

    return _remembered(values, ("index", torch.device(device)), make) if cached else make()


def index_of(values: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A plan's index tuple as a long tensor on `like`'s device; remembered (by the tuple
    object) in eager calls on plain tensors. `values` must be a tuple the plan keeps."""
    return _index(values, like.device, _direct(like))


# A group's rows (or keys) as a strided view: (first, blocks, block stride, per block, step):
# entry i of block j is first + j * block_stride + i * step.
Strided = tuple[int, int, int, int, int]


def strided(values: tuple[int, ...], m: int, length: int) -> Strided | None:
    """`values` (blocks of m) as `Strided` when they are that regular, the blocks do not
    overlap and ``blocks * block_stride`` entries from the first fit in `length`; else None.

    Then the entries are a view (`take`, `put_`): no gather, and gradients added into a
    view instead of scatter-added (a local window's or a segment's rows are).
    """
    if not values or len(values) % m:
        return None
    blocks, first = len(values) // m, values[0]
    step = values[1] - first if m > 1 else 1
    span = (m - 1) * step + 1
    stride = values[m] - first if blocks > 1 else span
    if step < 1 or stride < span or first + blocks * stride > length:
        return None
    for j in range(blocks):
        base = first + j * stride
        if values[j * m : (j + 1) * m] != tuple(range(base, base + m * step, step)):
            return None
    return first, blocks, stride, m, step


class Rows:
    """A plan's index tuple (blocks of m along dim 2 of tensors `length` long) as a view
    where it is `strided`, else as an index tensor."""

    def __init__(self, values: tuple[int, ...], m: int, length: int, device, cached: bool):
        def make():
            return strided(values, m, length)

        self.m = m
        self.view = _remembered(values, ("strided", m, length), make) if cached else make()
        self.index = None if self.view is not None else _index(values, device, cached)


def _window(x: torch.Tensor, view: Strided) -> torch.Tensor:
    """(B, h, blocks, m, ...) view of (B, h, L, ...) `x` at the `Strided` entries."""
    first, blocks, stride, m, step = view
    w = x.narrow(2, first, blocks * stride).unflatten(2, (blocks, stride))
    return w[:, :, :, : (m - 1) * step + 1 : step]


def take(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    """Entries `rows` of (B, h, L, ...) `x` as (B * blocks, h, m, ...) (a view where possible)."""
    if rows.view is None:
        return blocked(x, rows.index, rows.m)
    return _window(x, rows.view).movedim(2, 1).flatten(0, 1)


def put_(x: torch.Tensor, rows: Rows, y: torch.Tensor, add: bool) -> None:
    """Writes (or adds, `add`) (B * blocks, h, m, ...) `y` at entries `rows` of `x`, in place.
    Adding needs distinct entries (`strided` views have them; an index may repeat)."""
    if rows.view is None:
        src = unblocked(y, x.shape[0])
        (x.index_add_ if add else x.index_copy_)(2, rows.index, src)
        return
    dst = _window(x, rows.view)
    src = y.unflatten(0, (x.shape[0], -1)).movedim(1, 2)
    dst.add_(src) if add else dst.copy_(src)


def blocked(x: torch.Tensor, idx: torch.Tensor, m: int) -> torch.Tensor:
    """Entries `idx` (blocks of m, along dim 2) of (B, h, L, ...) `x` as (B * blocks, h, m, ...)."""
    return x.index_select(2, idx).unflatten(2, (-1, m)).movedim(2, 1).flatten(0, 1)


def unblocked(y: torch.Tensor, batch: int) -> torch.Tensor:
    """(B * blocks, h, m, ...) -> (B, h, blocks * m, ...): the inverse layout of `blocked`."""
    return y.unflatten(0, (batch, -1)).movedim(1, 2).flatten(2, 3)


def _direct(q: torch.Tensor) -> bool:
    """Call the fused kernels without their custom ops (and remember index tensors): on plain
    tensors outside Dynamo. Fake and functional tensors (AOTAutograd's trace; torch 2.11 does
    not count that as compiling) are subclasses."""
    return type(q) in (torch.Tensor, torch.nn.Parameter) and not torch.compiler.is_compiling()


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: tuple[Group, ...], scale: float,
    into: tuple[torch.Tensor, torch.Tensor] | None = None, merge: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of rows (B, h, R, D) against keys (B, h, M, D) in the accumulation dtype;
    rows in no block get 0 and -inf. With `into` (out, lse) of the same rows (possibly views),
    writes there in place, at the blocks' rows only, and returns it: merged by log-sum-exp
    with what the rows hold (their attention over other keys), or with ``merge=False``
    replacing it."""
    acc, direct = accumulation_dtype(q), _direct(q)
    if into is None:
        out = q.new_zeros((*q.shape[:3], v.shape[-1]), dtype=acc)
        lse = q.new_full(q.shape[:3], -math.inf, dtype=acc)
    else:
        out, lse = into
    held = into is not None and merge  # merge with what the rows hold
    for m, a, d, rows, full, diag in groups:
        at = Rows(rows, m, q.shape[2], q.device, direct)
        qb = take(q, at)
        outs, lses = [], []
        if held:  # what the rows hold already
            outs.append(take(out, at))
            lses.append(take(lse, at))
        for keys, n_keys, causal in ((full, a, False), (diag, d, True)):
            if n_keys:
                kat = Rows(keys, n_keys, k.shape[2], q.device, direct)
                res = block_attention(
                    qb, take(k, kat), take(v, kat), is_causal=causal, scale=scale, direct=direct,
                )
                outs.append(res.out)  # merged in the accumulation dtype (or converted below)
                lses.append(res.lse.to(acc))
        if len(outs) == held:  # no keys
            continue
        o, l = (outs[0].to(acc), lses[0]) if len(outs) == 1 else merge_by_lse(outs, lses)
        put_(out, at, o, add=False)  # in place: a copy of `out` per group else
        put_(lse, at, l, add=False)
    return out, lse


def attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, groups: tuple[Group, ...], scale: float, dq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of `attention` in the accumulation dtype, from the rows' (possibly merged)
    out and lse. With `dq` (accumulation dtype), adds the rows' query gradients to it in place
    and returns it."""
    acc, direct = accumulation_dtype(q), _direct(q)
    add_dq = dq is not None
    if dq is None:
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    dout = dout.to(q.dtype)
    for m, a, d, rows, full, diag in groups:
        at = Rows(rows, m, q.shape[2], q.device, direct)
        qb, ob, lb, gb = (take(x, at) for x in (q, out, lse, dout))
        gq_rows = None
        for keys, n_keys, causal in ((full, a, False), (diag, d, True)):
            if not n_keys:
                continue
            kat = Rows(keys, n_keys, k.shape[2], q.device, direct)
            gq, gk, gv = block_attention_backward(
                gb, qb, take(k, kat), take(v, kat), ob, lb,
                is_causal=causal, scale=scale, direct=direct,
            )
            gq_rows = gq.to(acc) if gq_rows is None else gq_rows + gq.to(acc)
            put_(dk, kat, gk.to(acc), add=True)  # in place, as in `attention`
            put_(dv, kat, gv.to(acc), add=True)
        if gq_rows is None:
            continue
        # each row is in one block (`group`): without a given dq a copy, not an add
        put_(dq, at, gq_rows, add=add_dq)
    return dq, dk, dv
