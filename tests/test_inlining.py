"""The inlined work list's Inductor settings (`lowering/common/inlining.py`): the
joint-graph pass that hands a graph constant to the Triton kernels that only read
it (no copy per call), and when the backend installs it."""

import pytest
import torch
import torch.fx

from dilated_compile.lowering.common import inlining

KERNEL = torch.ops.higher_order.triton_kernel_wrapper_functional
COPY = torch.ops.aten.lift_fresh_copy.default


def _graph(written: list[str], other_user: bool = False) -> torch.fx.Graph:
    """x, a constant's copy, and a kernel launch reading x as X and the copy as ITEMS."""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    constant = g.get_attr("_tensor_constant0")
    copy = g.call_function(COPY, (constant,))
    launch = g.call_function(KERNEL, (), {
        "kernel_idx": 0, "constant_args_idx": 0, "grid": [(1, 1, 1)], "tma_descriptor_metadata": {},
        "kwargs": {"X": x, "ITEMS": copy}, "tensors_to_clone": written,
    })
    outputs = [launch]
    if other_user:
        outputs.append(g.call_function(torch.ops.aten.add.Tensor, (copy, 1)))
    g.output(tuple(outputs))
    return g


def _copies(g: torch.fx.Graph) -> int:
    return len(g.find_nodes(op="call_function", target=COPY))


@pytest.mark.parametrize(
    "written, other_user, copies_left",
    [
        (["X"], False, 0),  # only read by the kernel: no copy
        ([], False, 0),
        (["X", "ITEMS"], False, 1),  # the kernel writes it: the copy stays
        (["X"], True, 1),  # another op uses it: the copy stays
    ],
)
def test_a_constant_only_kernels_read_is_not_copied(written, other_user, copies_left):
    g = _graph(written, other_user)
    inlining.ConstantsReadInPlace()(g)
    g.lint()
    assert _copies(g) == copies_left
    launch = g.find_nodes(op="call_function", target=KERNEL)[0]
    assert launch.kwargs["kwargs"]["ITEMS"].op == ("call_function" if copies_left else "get_attr")


def test_the_pass_is_installed_after_the_users_own_unless_inlining_is_off(monkeypatch):
    assert inlining.inductor_patches({}) == {}  # off by default
    monkeypatch.setenv("DILATED_INLINE", "on")
    ours = inlining.inductor_patches({})
    assert isinstance(ours["joint_custom_post_pass"], inlining.ConstantsReadInPlace)
    assert ours["joint_custom_post_pass"].uuid() == inlining.ConstantsReadInPlace().uuid()
    ran = []

    class Users(torch._inductor.custom_graph_pass.CustomGraphPass):
        def __call__(self, graph):
            ran.append(_copies(graph))

        def uuid(self):
            return b"users"

    def plain(graph):  # a pass without a uuid: Inductor then caches no graph
        ran.append(_copies(graph))

    ours_id = inlining.ConstantsReadInPlace().uuid()
    for users, uuid, count in ((Users(), (b"users", ours_id), 1), (plain, None, 1),
                               ([Users(), Users()], (b"users", b"users", ours_id), 2), ([Users(), plain], None, 2)):
        both = inlining.inductor_patches({"joint_custom_post_pass": users})["joint_custom_post_pass"]
        assert both.uuid() == uuid
        g = _graph(["X"])
        both(g)
        assert ran == [1] * count and _copies(g) == 0  # the user's passes first, then ours
        ran.clear()
        with torch._inductor.config.patch(joint_custom_post_pass=users):
            assert inlining.inductor_patches({})["joint_custom_post_pass"].users[0] is (
                users[0] if isinstance(users, list) else users)
    monkeypatch.setenv("DILATED_INLINE", "off")
    assert inlining.inductor_patches({}) == {}
    monkeypatch.setenv("DILATED_INLINE", "sometimes")
    with pytest.raises(ValueError, match="DILATED_INLINE='sometimes': expected on or off"):
        inlining.inductor_patches({})
