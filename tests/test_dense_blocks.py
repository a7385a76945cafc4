"""`lowering/common/dense_blocks.py`: shape-grouped dense blocks against one masked attention.

The rings' steps run as dense blocks (full keys plus a causal diagonal) through
the fused kernels; the masked float32 attention of `ring_masked` over the same
(row, key) pairs is the definition they must match, forward and backward, with
rows that get no key at all left at 0 / -inf.
"""

import math

import pytest
import torch

from dilated_compile.lowering.common import dense_blocks
from dilated_compile.lowering.ring.masked import masked_attention, masked_attention_backward

from .tolerance import assert_within

# blocks over 9 rows and 12 keys: (rows, full keys, diagonal keys); row 8 gets nothing, key 4 and 11 none
BLOCKS = [
    ([0, 1, 2], [0, 1, 2, 3], []),
    ([3, 4], [5], [6, 7]),  # row 3 sees keys 5, 6; row 4 sees 5, 6, 7
    ([5, 6], [5], [8, 9]),  # same shape as the block above (one call), key 5 shared
    ([7], [6], [10]),  # key 6 is another block's diagonal key: gradients add up
]


def _mask(rows: int, keys: int, blocks=BLOCKS) -> torch.Tensor:
    mask = torch.zeros(rows, keys, dtype=torch.bool)
    for brows, full, diag in blocks:
        for t, i in enumerate(brows):
            mask[i, full] = True
            mask[i, diag[: t + 1]] = True
    return mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_blocks_equal_the_masked_attention_of_their_pairs(dtype):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 3, 12, 8, generator=g, dtype=torch.float64) for _ in range(2))
    groups = dense_blocks.group(BLOCKS)
    assert len(groups) == 3  # the two blocks of one shape share a call
    mask = _mask(9, 12)
    low = [x.to(dtype) for x in (q, k, v)]

    def check(got, want, what):  # the tolerance rule, against dense SDPA of these keys (square)
        assert_within(got, want, low[1], low[1], low[2], is_causal=False, scale=0.3, what=what)

    want_out, want_lse = masked_attention(q, k, v, mask, 0.3)
    out, lse = dense_blocks.attention(*low, groups, 0.3)
    check(out, want_out, "out")
    check(lse[:, :, :8], want_lse[:, :, :8], "lse")
    assert bool((out[:, :, 8] == 0).all()) and bool((lse[:, :, 8] == -math.inf).all())

    dout = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64)
    want = masked_attention_backward(dout, q, k, v, mask, want_out, want_lse, 0.3)
    got = dense_blocks.attention_backward(
        *(x.to(dtype) for x in (dout, q, k, v)), out, lse, groups, 0.3
    )
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        check(a, b, name)


# more pairs for some of the same rows (other keys): row 0 also sees key 11, row 3 key 4, and
# row 8 (nothing above) key 11
MORE = [([0, 8], [11], []), ([3], [4], [])]


def test_blocks_merge_into_earlier_results_of_the_same_rows():
    """`into` and `dq`: a second set of blocks over other keys of the same rows, merged into the
    first's out/lse in place and added to its dq, equals one masked attention over all pairs
    (how a rank merges its sources in the block-sparse key exchange)."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 9, 8, generator=g, dtype=torch.float64)
    k, v, dout = (torch.randn(2, 3, 12, 8, generator=g, dtype=torch.float64) for _ in range(3))
    dout = dout[:, :, :9]
    first, more = dense_blocks.group(BLOCKS), dense_blocks.group(MORE)
    mask = _mask(9, 12) | _mask(9, 12, MORE)
    want_out, want_lse = masked_attention(q, k, v, mask, 0.3)
    out, lse = dense_blocks.attention(q, k, v, first, 0.3)
    got = dense_blocks.attention(q, k, v, more, 0.3, into=(out, lse))
    assert got[0] is out and got[1] is lse  # in place
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse, want_lse)

    want = masked_attention_backward(dout, q, k, v, mask, want_out, want_lse, 0.3)
    dq, dk, dv = dense_blocks.attention_backward(dout, q, k, v, out, lse, first, 0.3)
    dq2, dk2, dv2 = dense_blocks.attention_backward(dout, q, k, v, out, lse, more, 0.3, dq=dq)
    assert dq2 is dq
    for name, a, b in zip(("dq", "dk", "dv"), (dq, dk + dk2, dv + dv2), want):
        torch.testing.assert_close(a, b, msg=name)


def test_group_rejects_a_diagonal_of_another_length():
    with pytest.raises(ValueError, match="diagonal keys must be as many as its rows"):
        dense_blocks.group([([0, 1], [], [3])])


def test_group_rejects_a_row_in_two_blocks():
    """Rows are written, not added, per block (forward and dq): a row's keys must be one block."""
    with pytest.raises(ValueError, match="a row in two blocks"):
        dense_blocks.group([([0, 1], [2], []), ([1], [3], [])])
    with pytest.raises(ValueError, match="a row in two blocks"):
        dense_blocks.group([([0, 0], [2], [])])


def test_index_tensors_are_remembered_per_tuple_object_in_eager_calls():
    values = (3, 1, 2)
    first = dense_blocks._index(values, "cpu", True)
    assert dense_blocks._index(values, "cpu", True) is first
    twin = tuple([3, 1, 2])  # equal, another object: its own entry
    assert dense_blocks._index(twin, "cpu", True) is not first
    assert dense_blocks._index(values, "cpu", False) is not first
    assert first.tolist() == [3, 1, 2]


def test_strided_finds_the_views_among_index_tuples():
    """`strided`: blocks of m entries first + j * stride + i * step, non-overlapping, within
    the length; anything else stays an index (gathered, scatter-added)."""
    s = dense_blocks.strided
    assert s((4, 5, 6, 7, 8, 9), 2, 12) == (4, 3, 2, 2, 1)  # consecutive blocks (a local window)
    assert s((0, 2, 4, 8, 10, 12), 3, 16) == (0, 2, 8, 3, 2)  # a dilated row of each segment
    assert s((5,), 1, 6) == (5, 1, 1, 1, 1)
    assert s((0, 1, 1, 2), 2, 4) is None  # blocks overlap: a key in two blocks is added twice
    assert s((5, 5), 1, 12) is None
    assert s((0, 1, 3, 4, 7, 8), 2, 12) is None  # irregular block starts
    assert s((0, 2, 3, 4), 2, 12) is None  # a later block steps differently
    assert s((0, 2, 8, 10), 2, 10) is None  # the last block's stride runs past the length
    assert s((), 1, 4) is None


# every block regular: query blocks of 2 rows see the two keys before them in full and their
# own positions as a causal square (a local window), and every other row (a dilation of 2)
REGULAR = [([2, 3], [0, 1], [2, 3]), ([4, 5], [2, 3], [4, 5]), ([6, 7], [4, 5], [6, 7])]
DILATED = [([0, 2, 4], [], [0, 2, 4]), ([6, 8, 10], [1, 3, 5], [6, 8, 10])]


@pytest.mark.parametrize("blocks", [REGULAR, DILATED], ids=["window", "dilated"])
@pytest.mark.parametrize("direct", [True, False], ids=["eager", "traced"])
def test_strided_blocks_equal_the_masked_attention_of_their_pairs(blocks, direct, monkeypatch):
    """Where every row and key set is a view (no gather, gradients added into views), eagerly
    and as the rings trace it, the blocks still equal the masked attention of their pairs."""
    groups = dense_blocks.group(blocks)
    for m, a, d, rows, full, diag in groups:
        for values, size in ((rows, m), (full, a), (diag, d)):
            assert not values or dense_blocks.strided(values, size, 12) is not None
    monkeypatch.setattr(dense_blocks, "_direct", lambda q: direct)
    g = torch.Generator().manual_seed(2)
    q, k, v, dout = (torch.randn(1, 3, 12, 8, generator=g, dtype=torch.float64) for _ in range(4))
    mask = _mask(12, 12, blocks)
    want_out, want_lse = masked_attention(q, k, v, mask, 0.3)
    out, lse = dense_blocks.attention(q, k, v, groups, 0.3)
    used = mask.any(dim=1)
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(lse[:, :, used], want_lse[:, :, used])
    want = masked_attention_backward(dout, q, k, v, mask, want_out, want_lse, 0.3)
    got = dense_blocks.attention_backward(dout, q, k, v, out, lse, groups, 0.3)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, msg=name)
