"""moe_ext: Mixture-of-Experts layers for PyTorch, backed by C++/CUDA operators."""

from . import ops
from .layer import MoE, RoutingStats, aux_loss, set_aux_loss_scale
from .ops import RoutingPlan

__version__ = "0.1.0"

__all__ = ["MoE", "RoutingPlan", "RoutingStats", "aux_loss", "ops", "set_aux_loss_scale", "__version__"]
