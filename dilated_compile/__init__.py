"""dilated_compile: a torch.compile backend that rewrites attention as a policy file says.

    model = torch.compile(model, backend="dilated", options={"policy": "policy.yaml"})

The backend is registered through the `torch_dynamo_backends` entry point, so
user code need not import this package. The attention it produces is also
callable directly (`dilated_attention`), with a float64 reference beside it.
"""

from .lowering.block_sparse.attention import block_sparse_attention
from .lowering.dilated.attention import dilated_attention
from .lowering.ring.attention import ring_attention
from .sharding import register_group, shard, unshard
from .training import causal_lm_loss, shard_causal_lm_batch
from .hf_attention import register_layer_mask_attention
from .lowering.reference import block_sparse_reference, dense_reference, dilated_reference
from .passes import Report, RewriteError, ShardLocalWarning, WindowWarning
from .passes.report import clear_reports, reports
from .policy.model import Policy
from .policy.errors import PolicyError
from .policy import load_policy
from .explain import explain
from .shared_frames import SharedFrameError
from .targets import TargetWarning, check_targets
from . import dynamo_settings


def _register_backend() -> None:
    """Make backend="dilated" work also where the entry point is not installed."""
    import torch._dynamo

    if "dilated" not in torch._dynamo.list_backends(exclude_tags=()):
        from .backend import dilated_backend

        torch._dynamo.register_backend(dilated_backend, name="dilated")


_register_backend()
dynamo_settings.install()

__all__ = [
    "Policy",
    "PolicyError",
    "Report",
    "RewriteError",
    "ShardLocalWarning",
    "WindowWarning",
    "SharedFrameError",
    "TargetWarning",
    "block_sparse_attention",
    "block_sparse_reference",
    "causal_lm_loss",
    "check_targets",
    "clear_reports",
    "dense_reference",
    "dilated_attention",
    "dilated_reference",
    "explain",
    "load_policy",
    "register_group",
    "register_layer_mask_attention",
    "reports",
    "ring_attention",
    "shard",
    "shard_causal_lm_batch",
    "unshard",
]
