"""The always-on dense expert beside the routed ones (Qwen2-MoE, DeepSeek-V3)."""

from __future__ import annotations

from torch import Tensor, nn

from .activations import activate, in_width
from .linear import Linear

__all__ = ["SharedExpert"]


class SharedExpert(nn.Module):
    """A dense FFN every token goes through: w_in [F or 2F, H], w_out [H, F] (``nn.Linear`` layout),
    with the routed experts' activation. (Its optional sigmoid gate is the layer's ``shared_expert_gate``.)"""

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        activation: str,
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.swiglu_alpha, self.swiglu_limit = float(swiglu_alpha), float(swiglu_limit)
        self.activation = activation
        width = in_width(activation, ffn_hidden_size)
        self.w_in = Linear(hidden_size, width, bias=False, device=device, dtype=dtype)
        self.w_out = Linear(ffn_hidden_size, hidden_size, bias=False, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        self.w_in.reset_parameters()
        self.w_out.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        return self.w_out(activate(self.activation, self.w_in(x), self.swiglu_alpha, self.swiglu_limit))
