"""The expert activations by name: gated ones take w_in's [gate | up] halves, plain ones the whole row."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops

__all__ = ["GATED", "PLAIN", "ACTIVATIONS", "activate", "in_width"]

GATED = {
    "swiglu": F.silu,
    "geglu": F.gelu,
    "geglu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "clamped_swiglu": None,
}  # clamped_swiglu: see activate
PLAIN = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}
ACTIVATIONS = sorted([*GATED, *PLAIN])


def in_width(activation: str, ffn_hidden_size: int) -> int:
    """Columns of w_in: 2F for a gated activation ([gate | up]), F otherwise."""
    return 2 * ffn_hidden_size if activation in GATED else ffn_hidden_size


def activate(activation: str, h: Tensor, alpha: float = 1.702, limit: float = 7.0) -> Tensor:
    """h [..., F or 2F] -> [..., F]; ``alpha`` and ``limit`` are clamped_swiglu's (GPT-OSS)."""
    if activation == "clamped_swiglu":
        # GPT-OSS: both halves clamped (the gate from above only), sigmoid sharpened by alpha, up offset by 1.
        gate, up = h.chunk(2, dim=-1)
        gate = gate.clamp(min=None, max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    if activation == "swiglu":
        # One fused op (a single pass each way) instead of chunk + silu + mul and their autograd.
        return ops.swiglu(h.reshape(-1, h.shape[-1])).reshape(*h.shape[:-1], h.shape[-1] // 2)
    if activation in GATED:
        gate, up = h.chunk(2, dim=-1)
        return GATED[activation](gate) * up
    return PLAIN[activation](h)
