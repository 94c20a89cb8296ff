"""The router: logits from the projection module (dtype, jitter, noise), then token-choice or expert-choice routing.

The projection is an ``nn.Module`` the layer calls (``router(x)``), so what wraps a module
(peft's LoRA, forward hooks) sees every routed batch; the policy around it is here as
functions of the layer's settings.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops, routing

__all__ = ["Logits", "Routing", "capacity", "expert_choice", "router_logits", "routing_mask", "token_choice"]


class Routing(NamedTuple):
    """The routing of one forward, returned by ``layer(x, return_routing=True)`` (tensors keep their graph).

    logits   [T, E]: the router logits the routing used (router dtype; with noisy
             gating in training, the noisy logits).
    weights  [T, k]: routing weights (float32, float64 for float64 logits);
             [T, E] for expert-choice routing (0 where an expert did not take the token).
    indices  [T, k] int64: chosen experts in descending selection order; None for expert choice.
    """

    logits: Tensor
    weights: Tensor
    indices: Tensor | None


class Logits(NamedTuple):
    """What the router computed: ``routed`` (the logits routing uses: noisy in training with noisy
    gating) and, with noisy gating only, the ``clean`` logits and the ``noise_std`` (for the load loss)."""

    routed: Tensor
    clean: Tensor | None
    noise_std: Tensor | None


def router_logits(
    router: nn.Module,
    noise: nn.Module | None,
    tokens: Tensor,
    *,
    router_dtype: torch.dtype | None,
    jitter: float,
    training: bool,
    generator: torch.Generator | None,
) -> Logits:
    """Calls the ``router`` projection module (and the ``noise`` one) on the tokens [T, H].

    ``router_dtype``: compute in at least this dtype (the Switch "fp32 router": an fp32 router upcasts
    bf16 but never downcasts a float64 layer, and autocast does not take it back down). ``jitter``:
    Switch's multiplicative input noise U(1 - eps, 1 + eps), training only. ``noise``: Shazeer's noisy
    top-k, N(0, 1) * softplus(x @ noise.weight^T) added to the logits in training.
    """
    if router_dtype is None:
        return _logits(router, noise, tokens, jitter, training, generator)
    dtype = torch.promote_types(router_dtype, tokens.dtype)
    with torch.autocast(tokens.device.type, enabled=False):
        return _logits(router, noise, tokens.to(dtype), jitter, training, generator)


def _logits(router, noise, router_input: Tensor, jitter: float, training: bool, generator) -> Logits:
    if training and jitter > 0:
        factor = torch.empty_like(router_input).uniform_(1.0 - jitter, 1.0 + jitter, generator=generator)
        router_input = router_input * factor
    logits = router(router_input)
    if noise is None:
        return Logits(logits, None, None)
    noise_std = F.softplus(noise(router_input))
    if not training:
        return Logits(logits, logits, noise_std)
    sample = torch.randn(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    return Logits(logits + sample * noise_std, logits, noise_std)


def capacity(factor: float | None, num_tokens: int, per_token: int, num_experts: int, min_capacity: int) -> int | None:
    """Rows per expert: max(min_capacity, ceil(factor * T * per_token / E)); None when ``factor`` is None."""
    if factor is None:
        return None
    # The (1 - 1e-12) keeps float rounding from bumping an exact quotient (1.1 * 10 / 11) up by one.
    wanted = math.ceil(factor * num_tokens * per_token / num_experts * (1 - 1e-12))
    return max(min_capacity, wanted)


def routing_mask(
    expert_mask: Tensor, restriction: tuple[Tensor, Tensor] | None, leading_shape: torch.Size, num_tokens: int
) -> Tensor:
    """The experts each token may use: ``expert_mask`` [E], or [T, E] where a restriction
    ``(token_mask over the leading dims, allowed [E])`` narrows the flagged tokens."""
    if restriction is None:
        return expert_mask
    token_mask, allowed = restriction
    if token_mask.shape != leading_shape:
        raise ValueError(
            f"MoE: the restrict_experts token_mask has shape {tuple(token_mask.shape)} but the input's "
            f"leading dims are {tuple(leading_shape)}; call clear_restriction() or restrict again"
        )
    flagged = token_mask.reshape(num_tokens, 1)
    return torch.where(flagged, (allowed & expert_mask).unsqueeze(0), expert_mask.unsqueeze(0))


def token_choice(
    logits: Tensor,
    mask: Tensor,
    *,
    num_experts: int,
    top_k: int,
    score_func: str,
    normalize: bool,
    selection_bias: Tensor | None,
    scale: float,
    n_group: int,
    topk_group: int,
    capacity: int | None,
    drop_policy: str,
    random_routing: bool,
    training: bool,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor, ops.RoutingPlan]:
    """(weights [T, k], indices [T, k], scores [T, E], plan): each token picks its top_k experts
    (``ops.topk_gating``); with a capacity, ``drop_policy`` and GShard's ``random_routing`` decide
    which assignments a full expert keeps."""
    weights, indices, scores = ops.topk_gating(
        logits, top_k, score_func, normalize, selection_bias, scale, n_group, topk_group, mask
    )
    priority = None
    if capacity is not None:
        # Random token selection is a training regularizer: evaluation keeps the position order.
        policy = "position" if drop_policy == "random" and not training else drop_policy
        priority = routing.drop_priority(policy, weights, generator)
        if random_routing and training:
            if priority is None:
                priority = torch.zeros_like(weights)
            drop = routing.gshard_second_expert_drop(weights, generator)
            priority = priority.masked_fill(drop, float("-inf"))
    plan = ops.make_plan(indices, num_experts, capacity, priority)
    return weights, indices, scores, plan


def expert_choice(
    logits: Tensor, mask: Tensor, *, score_func: str, capacity: int
) -> tuple[Tensor, None, Tensor, ops.RoutingPlan]:
    """(weights [T, E], None, scores [T, E], plan): each expert takes its ``capacity`` best tokens
    by per-token score (Zhou et al. 2022); weights are the scores where taken, 0 elsewhere."""
    _, _, scores = ops.topk_gating(logits, 1, score_func, False, None, 1.0, 1, 1, mask)
    plan = ops.expert_choice_plan(scores.detach(), capacity)
    weights = torch.where(plan.row_of >= 0, scores, torch.zeros_like(scores))
    return weights, None, scores, plan
