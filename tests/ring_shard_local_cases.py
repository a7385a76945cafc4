"""Ring cases of `tests/ring_worker.py`: attention that no ring covers while the sequence is
sharded attends within the shard; the user is warned unless a rule declares it with
`ring: false`, and under `strict: true` it is an error on every rank."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from dilated_compile import ring_attention
from dilated_compile.sharding import ring_info, shard

from .ring_common import N_LOCAL, CaseFailure, _full_inputs, _local_qkv, _SDPA, expect_error


class _Block(torch.nn.Module):
    """`attn` twice with a graph break between: the block's own frames hold its attention."""

    def __init__(self):
        super().__init__()
        self.attn = _SDPA(True)

    def forward(self, x, k, v):
        x = self.attn(x, k, v)
        torch._dynamo.graph_break()
        return self.attn(x, k, v)


class _RingThenBlocks(torch.nn.Module):
    """`first` under the ring rule, then two `_Block`s: the blocks' frames hold no ring site,
    and Dynamo compiles them for `blocks.0` and runs that code for `blocks.1` too."""

    def __init__(self):
        super().__init__()
        self.first = _SDPA(True)
        self.blocks = torch.nn.ModuleList([_Block(), _Block()])

    def forward(self, q, k, v):
        x = self.first(q, k, v)  # no loop over the blocks: Dynamo runs a frame whose loop
        x = self.blocks[0](x, k, v)  # body breaks the graph eagerly, `first` included
        return self.blocks[1](x, k, v)


def _within_shard_policy(second: dict | None, strict: bool = False) -> dict:
    """A ring rule for `first`, then `second` (a rule for the other attention, or none)."""
    rules = [{"match": "first", "attention": "dense", "ring": {"layout": "contiguous"}}]
    return {"version": 1, "strict": strict, "rules": rules + ([second] if second else [])}


def _run_capturing_stderr(model, *args) -> tuple[torch.Tensor, str]:
    """model(*args) under no_grad, and what it wrote to stderr (warnings as Python shows them
    by default)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), torch.no_grad():
        out = model(*args)
    return out, err.getvalue()


def _check_within_shard_output(out: torch.Tensor, q, k, v, local_calls: int) -> None:
    """`first` is a ring over the whole sequence; the `local_calls` attention calls after it
    attend within the shard."""
    want = ring_attention(q, k, v, is_causal=True)
    for _ in range(local_calls):
        want = F.scaled_dot_product_attention(want, k, v, is_causal=True)
    if not torch.allclose(out, want, atol=1e-5, rtol=1e-5):
        raise CaseFailure(f"output differs from ring then shard-local attention by {(out - want).abs().max():.3g}")


def _block_sites(reports) -> list:
    return [s for r in reports for s in r.sites if s.module.startswith("blocks.")]


def shard_local_warned_case() -> None:
    """Attention modules that no rule matches: every rank's user sees one ShardLocalWarning
    for each (blocks.0.attn, in two compiled frames, and blocks.1.attn, which runs blocks.0's
    compiled code), naming it and the fix; they attend within the shard; the report says so."""
    import dilated_compile

    torch._dynamo.reset()
    dilated_compile.clear_reports()
    q, k, v = (shard(t, 2, "contiguous") for t in _full_inputs(ring_info()[0], N_LOCAL, torch.float32, 9)[:3])
    model = torch.compile(_RingThenBlocks(), backend="dilated", options={"policy": _within_shard_policy(None)})
    out, err = _run_capturing_stderr(model, q, k, v)
    _check_within_shard_output(out, q, k, v, local_calls=4)
    told = [line for line in err.splitlines() if "ShardLocalWarning" in line]
    for path in ("blocks.0.attn", "blocks.1.attn"):
        want = (f"attention in {path} (sdpa) attends within each rank's shard only", "no rule matches it",
                f'{{match: "{path}", attention: dense, ring: false}}')
        if sum(all(w in line for w in want) for line in told) != 1:
            raise CaseFailure(f"want one ShardLocalWarning with {want}; stderr:\n{err[-3000:]}")
    if len(told) != 2:
        raise CaseFailure(f"want two ShardLocalWarnings, got {len(told)}:\n{err[-3000:]}")
    reasons = [s.reason for s in _block_sites(dilated_compile.reports())]
    if len(reasons) != 2 or not all("attends within this rank's shard only" in r for r in reasons):
        raise CaseFailure(f"site report reasons for the blocks: {reasons}")


class _FirstThenSecond(torch.nn.Module):
    """`first` then `second`, one frame: a ring site and another site in one graph."""

    def __init__(self):
        super().__init__()
        self.first, self.second = _SDPA(True), _SDPA(True)

    def forward(self, q, k, v):
        return self.second(self.first(q, k, v), k, v)


def shard_local_declared_case() -> None:
    """`ring: false` on the second attention module: no warning; its output is attention
    within the shard; the site report says "local (declared)"."""
    import dilated_compile

    torch._dynamo.reset()
    dilated_compile.clear_reports()
    q, k, v = (shard(t, 2, "contiguous") for t in _full_inputs(ring_info()[0], N_LOCAL, torch.float32, 9)[:3])
    policy = _within_shard_policy({"match": "second", "attention": "dense", "ring": False})
    model = torch.compile(_FirstThenSecond(), backend="dilated", options={"policy": policy})
    out, err = _run_capturing_stderr(model, q, k, v)
    _check_within_shard_output(out, q, k, v, local_calls=1)
    if "ShardLocalWarning" in err or "shard only" in err:
        raise CaseFailure(f"a warning for a module declared local:\n{err[-3000:]}")
    became = [s.attention for r in dilated_compile.reports() for s in r.sites if s.module == "second"]
    if became != ["dense (unchanged); local (declared)"]:
        raise CaseFailure(f"site report for 'second': {became}")


def bad_backend_shard_local_strict() -> None:
    """Under `strict: true` a second attention whose rule has no ring is an error on every
    rank (at compile time, after the ranks agreed on the ring sites), not a hang."""
    torch._dynamo.reset()
    policy = _within_shard_policy({"match": "second", "attention": "dense"}, strict=True)
    model = torch.compile(_FirstThenSecond(), backend="dilated", options={"policy": policy})
    q, k, v = _local_qkv(N_LOCAL)
    expect_error(Exception, ("is strict", "attention in second (sdpa) attends within each rank's shard only",
                             "rules[1] 'second' has no ring", "add `ring: false` to rules[1]"),
                 lambda: model(q, k, v))


def shard_local_cases(world: int) -> dict[str, Callable[[], None]]:
    """The cases of this block for `world` ranks (four small forward graphs through Inductor,
    at world size 2 only)."""
    out: dict[str, Callable[[], None]] = {}
    if world == 2:
        out["backend-shard-local-warned"] = shard_local_warned_case
        out["backend-shard-local-declared"] = shard_local_declared_case
    if world in (2, 3):
        out["bad-backend-shard-local-strict"] = bad_backend_shard_local_strict
    return out
