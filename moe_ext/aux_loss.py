"""The layer's auxiliary losses (balance, z, Shazeer's CV, sequence-wise) and the seed of their gradient."""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops, routing

__all__ = ["AuxLossInjector", "weighted_aux_loss"]


def weighted_aux_loss(
    logits: Tensor,
    scores: Tensor,
    indices: Tensor | None,
    weights: Tensor,
    *,
    balance: float,
    balance_type: str,
    z: float,
    importance: float,
    load: float,
    sequence: float,
    clean_logits: Tensor | None,
    noise_std: Tensor | None,
    top_k: int,
    leading_shape: torch.Size,
    training: bool,
) -> Tensor:
    """The weighted sum of the enabled losses, a 0-d tensor with its graph (a weight of 0 turns one off).

    balance: load-balancing loss (Switch / transformers), counting every one of the k choices
    (``balance_type="switch"``) or first choices only ("gshard"); z: router z-loss (ST-MoE);
    importance, load: CV(importance)^2 and CV(smooth load)^2 (Shazeer et al. 2017; load needs the
    noisy gating's clean logits and noise std, training only); sequence: DeepSeek-V3's
    sequence-wise balance loss. ``indices`` is None for expert choice: the losses that count
    choices are then skipped.
    """
    num_experts = scores.shape[-1]
    aux = scores.new_zeros(())
    if balance != 0.0 and indices is not None:
        counted = indices[:, :1] if balance_type == "gshard" else indices
        aux = aux + balance * ops.load_balancing_loss(scores, counted, num_experts)
    if z != 0.0:
        aux = aux + z * ops.router_z_loss(logits)
    if importance != 0.0:
        gates = weights if indices is None else torch.zeros_like(scores).scatter(1, indices, weights)
        aux = aux + importance * routing.cv_squared(gates.sum(0))
    if load != 0.0 and training:
        dtype = torch.promote_types(logits.dtype, torch.float32)
        smooth = routing.noisy_topk_load(clean_logits.to(dtype), logits.to(dtype), noise_std.to(dtype), top_k)
        aux = aux + load * routing.cv_squared(smooth)
    if sequence != 0.0 and indices is not None:
        aux = aux + sequence * routing.sequence_aux_loss(scores, indices, num_experts, leading_shape)
    return aux


class AuxLossInjector(torch.autograd.Function):
    """Identity on the layer output whose backward also seeds the aux loss with `scale`.

    The aux loss's gradient then reaches the router during the backward of any
    loss computed from the output, exactly as if it had been added to that loss.
    """

    @staticmethod
    def forward(ctx, output: Tensor, aux: Tensor, scale: float) -> Tensor:
        ctx.aux_shape = aux.shape
        ctx.aux_dtype = aux.dtype
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        seed = torch.full(ctx.aux_shape, ctx.scale, dtype=ctx.aux_dtype, device=grad_output.device)
        return grad_output, seed, None
