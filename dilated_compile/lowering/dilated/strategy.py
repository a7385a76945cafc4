"""Dilated attention, declared as a strategy (see `lowering.strategy`)."""

from __future__ import annotations

from ...policy.specs import DilatedSpec
from ..strategy import Functions, Strategy
from .arguments import decode_parameters, encode_parameters


def _site_arguments(spec: DilatedSpec) -> tuple[tuple, dict]:
    return (spec.segment_lengths, spec.dilation_rates), {"head_split": spec.head_split}


def _ring_parameters(spec: DilatedSpec) -> dict:
    return {
        "segment_lengths": spec.segment_lengths,
        "dilation_rates": spec.dilation_rates,
        "head_split": spec.head_split,
    }


def _describe(spec: DilatedSpec, n) -> str:
    return f"dilated {spec.head_split} w={list(spec.segment_lengths)} r={list(spec.dilation_rates)}"


def _kernel(spec: DilatedSpec, shape, dtype, device, is_causal: bool) -> str | None:
    from .kernel_choice import describe_site

    return describe_site(spec.segment_lengths, spec.dilation_rates, spec.head_split, shape, dtype, device, is_causal)


def _load() -> Functions:
    from .functions import FUNCTIONS

    return FUNCTIONS


STRATEGY = Strategy(
    name="dilated",
    spec_type=DilatedSpec,
    parameters=("segment_lengths", "dilation_rates", "head_split"),
    site_arguments=_site_arguments,
    ring_parameters=_ring_parameters,
    describe=_describe,
    encode=encode_parameters,
    decode=decode_parameters,
    load=_load,
    kernel=_kernel,
)
