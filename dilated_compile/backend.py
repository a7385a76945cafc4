"""The `dilated` torch.compile backend: glue between the policy, the passes and Inductor."""

from __future__ import annotations

import difflib
import os
from typing import Any, Sequence

import torch
import torch.fx as fx

from .cache_key import cacheable_functions_patch
from .debug import debug_dir_from, trace_report, write_debug_dir
from .frames import current_frame, resolving
from .lowering.common.inlining import inductor_patches, inlining
from .passes import record, run_passes
from .policy.model import Policy
from .policy import load_policy
from .targets import note_frame

OWN_OPTIONS = ("policy", "mode", "debug_dir", "compiler")
# what compiles the rewritten graph: Inductor (the default); AOTAutograd running it op by op
# ("aot_eager", as torch.compile(backend="aot_eager")), which tells a difference that the rewrite
# makes from one that Inductor's code generation makes, in a fraction of the compile time; or
# nothing ("eager", as torch.compile(backend="eager")): the rewritten graph runs as captured, its
# attention functions with their own autograd, which tells the rewrite's own effect from AOTAutograd's
COMPILERS = ("inductor", "aot_eager", "eager")
COMPILER_ENV = "DILATED_COMPILER"


def _inductor_patches(options: dict[str, Any]) -> dict[str, Any]:
    """Inductor config patches from the options that are not ours; raises on unknown keys."""
    import torch._inductor.config as inductor_config

    known = set(inductor_config.get_config_copy())
    patches: dict[str, Any] = {}
    mode = options.get("mode")
    if mode is not None:
        patches.update(torch._inductor.list_mode_options(mode))
    for key, value in options.items():
        if key in OWN_OPTIONS:
            continue
        if key not in known:
            close = difflib.get_close_matches(key, [*OWN_OPTIONS, *known], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"backend='dilated': unknown option {key!r}{hint} Options are 'policy', 'mode', "
                "'debug_dir', 'compiler' and any torch._inductor.config setting."
            )
        patches[key] = value
    return patches


# Inductor's memory-planning sort (on by default) moves a ring step's transfer after the
# attention it should overlap and its wait before it, serialising every transfer in the
# backward (2 H200s, 16k tokens per rank: 2.7 of 17 ms). Graphs with rings keep their order.
RING_SETTINGS = {
    "reorder_for_peak_memory": (False, "off: keeps each ring transfer beside the attention it overlaps"),
}


def _settings_for(report, patches: dict[str, Any]) -> dict[str, str]:
    """Set in `patches` what a graph like `report`'s needs, unless the user set it; name -> why."""
    chosen = {}
    if report.rings_over_ranks:
        for name, (value, why) in RING_SETTINGS.items():
            if name not in patches:
                patches[name] = value
                chosen[name] = why
    return chosen


# AOTAutograd of torch 2.11-2.12 expects a compiled graph's incoming gradients (tangents) to be
# contiguous and copies any other layout on every backward. A rewritten attention returns its
# output stored (B, N, H, D), what the output projection reads, so its gradient arrives in that
# layout: as the graph's output (an attention compiled alone) that was one full-size copy per
# step (0.35 of 4.2 ms at 64k tokens, H200). torch 2.13 expects each output's own strides by
# default; graphs with a rewritten site get that on earlier versions too.
TANGENT_SETTING = "guess_tangent_strides_as_outputs"


def _functorch_patches(report) -> dict[str, bool]:
    """AOTAutograd config patches for a graph like `report`'s (recorded in its settings)."""
    import torch._functorch.config as functorch_config

    if getattr(functorch_config, TANGENT_SETTING, True) or not any(
        s.status == "rewritten" for s in report.sites
    ):
        return {}
    report.inductor_settings[f"functorch.{TANGENT_SETTING}"] = (
        "on: a gradient that arrives in an output's own layout is used as it is, not copied; "
        "torch 2.13's default"
    )
    return {TANGENT_SETTING: True}


def policy_from_options(options: dict[str, Any] | None) -> Policy:
    """The policy named in the backend options; raises if there is none."""
    if not options or "policy" not in options:
        raise ValueError(
            "backend='dilated' needs a policy: "
            "torch.compile(model, backend='dilated', options={'policy': 'policy.yaml'})"
        )
    return load_policy(options["policy"])


def compiler_from(options: dict[str, Any]) -> str:
    """The compiler named by the option `compiler` or the environment variable DILATED_COMPILER."""
    name = options.get("compiler") or os.environ.get(COMPILER_ENV) or "inductor"
    if name not in COMPILERS:
        close = difflib.get_close_matches(str(name), COMPILERS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"backend='dilated': unknown compiler {name!r}{hint} Compilers are "
                         + ", ".join(repr(c) for c in COMPILERS) + ".")
    return name


def _check_settings_apply(compiler: str, user_patches: dict[str, Any]) -> None:
    """Raise if the user's Inductor settings (options or `mode`) would have no effect."""
    if compiler != "inductor" and user_patches:
        raise ValueError(
            f"backend='dilated': compiler {compiler!r} does not run Inductor, so the Inductor settings "
            f"{sorted(user_patches)} would have no effect; remove them or use compiler 'inductor'."
        )


def _warm_compile_workers() -> None:
    """Start Inductor's compile workers now, as ``backend="inductor"`` does when it is
    first called: they take seconds to start, and the rewrite's kernels are handed to
    them while the graph is traced (lowering/common/precompile.py)."""
    try:
        from torch._inductor.async_compile import maybe_warm_pool
    except ImportError:  # an optimisation only
        return
    maybe_warm_pool()


def dilated_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[torch.Tensor],
    *,
    options: dict[str, Any] | None = None,
    mode: str | None = None,
    **_: Any,
):
    """Rewrite the attention the policy selects, then compile with Inductor (or `compiler`)."""
    from torch._inductor.compile_fx import compile_fx

    options = dict(options or {})
    if mode is not None:
        options.setdefault("mode", mode)
    compiler = compiler_from(options)
    if compiler == "inductor":
        _warm_compile_workers()
    patches = _inductor_patches(options)
    _check_settings_apply(compiler, patches)
    policy = policy_from_options(options)
    # AOTAutograd's cache accepts the rewritten graph's calls of this package's
    # functions only when they are marked; the mark's value keys the caches on
    # this package's code and the policy (see cache_key.py).
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "unsafe_marked_cacheable_functions"):
        patches.setdefault("unsafe_marked_cacheable_functions", cacheable_functions_patch(policy))
    frame = current_frame()  # site paths are absolute paths in the model (frames.py)
    with resolving(frame):
        new_gm, report = run_passes(gm, policy)
    note_frame(frame, policy, report)  # same-class frames, and the once-per-model check
    report.inductor_settings = _settings_for(report, patches)
    aot_patches = _functorch_patches(report)
    record(report)
    trace_report(report)
    debug_dir = debug_dir_from(options)
    if debug_dir:
        write_debug_dir(report, debug_dir)
    with torch._functorch.config.patch(**aot_patches):
        if compiler != "inductor":
            return torch._dynamo.lookup_backend(compiler)(new_gm, example_inputs)
        with inlining():
            return compile_fx(new_gm, example_inputs, config_patches={**patches, **inductor_patches(patches)})
