"""Which kernel runs a dilated attention on CUDA (`lowering/dilated/kernel_choice.py`):
the cost rule's picks, the DILATED_WORKLIST override, and the site report's words.
Pure Python over plans: no GPU needed."""

import pytest
import torch

from dilated_compile.lowering.dilated import kernel_choice as kc
from dilated_compile.lowering.dilated.plan import SMALL_PART_TILES, make_plan

SHORT = ((512, 1024, 2048, 4096), (1, 2, 4, 8))
LONGNET_32K = ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12))


def _choice(n, seg_rates, split, causal=False, dtype=torch.bfloat16, device="cuda", d=128):
    plan = make_plan(16, n, *seg_rates, split)
    return kc._choose(plan, 1, d, dtype, device, causal, kc.setting(), None)


def test_short_sites_run_the_work_list_long_longnet_sites_the_gathered_blocks(monkeypatch):
    monkeypatch.delenv("DILATED_WORKLIST", raising=False)
    short = _choice(8192, SHORT, "groups")
    assert (short.forward, short.backward) == (kc.WORKLIST, kc.WORKLIST)
    assert short.reason.startswith("cost rule")
    long = _choice(32768, LONGNET_32K, "longnet", causal=True)
    assert (long.forward, long.backward) == (kc.BLOCKS, kc.BLOCKS)
    # the estimate grows with the work: a longer sequence never costs less
    plans = [make_plan(16, n, *LONGNET_32K, "longnet") for n in (8192, 32768, 65536)]
    costs = [kc.estimated_ms(p, 1, 128, False, kc.WORKLIST, "backward") for p in plans]
    assert costs == sorted(costs) and costs[0] < costs[-1]


def test_a_union_backward_pays_no_atomic_sums(monkeypatch):
    """At 16k ``longnet`` (64-row union items) the work list's backward runs as one softmax
    and is estimated without the merged path's atomic sums: the rule picks it there,
    and the gathered blocks once DILATED_WORKLIST_UNION=off brings the sums back."""
    monkeypatch.delenv("DILATED_WORKLIST", raising=False)
    plan = make_plan(16, 16384, *SHORT, "longnet", SMALL_PART_TILES, 132)  # the plan on an H100
    picks = {}
    for value in ("auto", "off"):
        monkeypatch.setenv("DILATED_WORKLIST_UNION", value)
        picks[value] = (kc.estimated_ms(plan, 1, 128, False, kc.WORKLIST, "backward"),
                        kc._choose(plan, 1, 128, torch.bfloat16, "cuda", False, "auto", None).backward)
    rows = 16 * 16384 * 128
    assert picks["off"][0] == pytest.approx(picks["auto"][0] + 3 * 4 * rows * 4 / (kc.ATOMIC_TB_S * 1e9))
    assert (picks["auto"][1], picks["off"][1]) == (kc.WORKLIST, kc.BLOCKS)


@pytest.mark.parametrize("value, want", [("on", kc.WORKLIST), ("off", kc.BLOCKS)])
def test_setting_overrides_the_rule(monkeypatch, value, want):
    monkeypatch.setenv("DILATED_WORKLIST", value)
    for n, seg_rates, split in ((8192, SHORT, "groups"), (32768, LONGNET_32K, "longnet")):
        c = _choice(n, seg_rates, split)
        assert (c.forward, c.backward) == (want, want) and f"DILATED_WORKLIST={value}" in c.reason


def test_what_the_work_list_cannot_run_goes_to_the_gathered_blocks(monkeypatch):
    monkeypatch.delenv("DILATED_WORKLIST", raising=False)
    assert _choice(8192, SHORT, "groups", device="cpu").reason == "not CUDA"
    assert "fp16/bf16" in _choice(8192, SHORT, "groups", dtype=torch.float32).reason
    assert "head dim 96" in _choice(8192, SHORT, "groups", d=96).reason
    monkeypatch.setenv("DILATED_WORKLIST", "on")  # the override cannot run what the kernel lacks: said
    with pytest.warns(UserWarning, match=r"DILATED_WORKLIST=on: .* \(not CUDA\); it runs as gathered blocks"):
        assert _choice(8192, SHORT, "groups", device="cpu").forward == kc.BLOCKS
    monkeypatch.setenv("DILATED_KERNEL", "flash")
    with pytest.warns(UserWarning, match="DILATED_KERNEL=flash forces a block kernel"):
        assert "DILATED_KERNEL=flash" in _choice(8192, SHORT, "groups").reason


def test_bad_setting_says_what_is_expected(monkeypatch):
    monkeypatch.setenv("DILATED_WORKLIST", "yes")
    with pytest.raises(ValueError, match="expected auto, on or off"):
        kc.setting()


def test_site_report_words(monkeypatch):
    monkeypatch.delenv("DILATED_WORKLIST", raising=False)
    words = kc.describe_site(*SHORT, "groups", (1, 16, 8192, 128), torch.bfloat16, "cuda:0", True)
    assert words.startswith("kernel: work list (cost rule") and "forward est." in words
    words = kc.describe_site(*LONGNET_32K, "longnet", (1, 16, 32768, 128), torch.bfloat16, "cuda:0", False)
    assert words.startswith("kernel: gathered blocks (cost rule")
    assert kc.describe_site(*SHORT, "groups", (1, 16, 64, 16), torch.float32, "cpu", False) == (
        "kernel: gathered blocks (not CUDA)"
    )
    n = object()  # a length the graph does not fix (a symbolic size)
    assert "chosen per shape at run time" in kc.describe_site(
        *SHORT, "groups", (1, 16, n, 128), torch.bfloat16, "cuda", False
    )
    assert kc.describe_site(*SHORT, "groups", None, torch.bfloat16, "cuda", False) is None


def test_site_report_words_follow_the_override(monkeypatch):
    monkeypatch.setenv("DILATED_WORKLIST", "on")
    n = object()  # a symbolic length
    assert kc.describe_site(*SHORT, "groups", (1, 16, n, 128), torch.bfloat16, "cuda", False) == (
        "kernel: work list (DILATED_WORKLIST=on)"
    )
    monkeypatch.setenv("DILATED_WORKLIST", "off")
    assert kc.describe_site(*SHORT, "groups", (1, 16, 8192, 128), torch.bfloat16, "cuda", False) == (
        "kernel: gathered blocks (DILATED_WORKLIST=off)"
    )
