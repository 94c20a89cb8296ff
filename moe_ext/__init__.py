"""moe_ext: Mixture-of-Experts layers for PyTorch, backed by C++/CUDA operators."""

from . import distributed, memory, ops
from .convert import replace_modules, upcycle
from .experts import Experts
from .layer import MoE, RoutingStats, aux_loss, set_aux_loss_scale
from .monitor import ExpertFlag, ExpertHealth, ExpertUsage, GroupSkew, RoutingTrace, trace_routing
from .ops import RoutingPlan
from .recompute import checkpoint_context
from .replay import RoutingReplay, replay_routing

__version__ = "0.1.0"

__all__ = [
    "ExpertFlag",
    "ExpertHealth",
    "ExpertUsage",
    "Experts",
    "GroupSkew",
    "MoE",
    "RoutingPlan",
    "RoutingStats",
    "RoutingReplay",
    "RoutingTrace",
    "aux_loss",
    "checkpoint_context",
    "distributed",
    "memory",
    "ops",
    "replace_modules",
    "replay_routing",
    "upcycle",
    "set_aux_loss_scale",
    "trace_routing",
    "__version__",
]
