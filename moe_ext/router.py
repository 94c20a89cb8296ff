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
from .recompute import ForcedRouting

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
    forced: ForcedRouting | None = None,
) -> tuple[Tensor, Tensor, Tensor, ops.RoutingPlan]:
    """(weights [T, k], indices [T, k], scores [T, E], plan): each token picks its top_k experts
    (``ops.topk_gating``); with a capacity, ``drop_policy`` and GShard's ``random_routing`` decide
    which assignments a full expert keeps.

    ``forced``: use its experts (``ops.forced_gating``: the weights and gradients the layer's own
    choice of them would give), its weights if it has them, and its drops if it has them. The
    random draws happen as without it, so the generator ends in the same state."""
    if forced is None:
        weights, indices, scores = ops.topk_gating(
            logits, top_k, score_func, normalize, selection_bias, scale, n_group, topk_group, mask
        )
    else:
        weights, indices, scores = ops.forced_gating(
            logits, forced.indices, score_func, normalize, scale, mask, validate=False
        )
        if forced.weights is not None:
            weights = forced.weights.to(device=weights.device, dtype=weights.dtype)
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
    if forced is not None and forced.dropped is not None and capacity is not None:
        # Rows are laid out in token order whatever the priority: keeping exactly the recorded
        # assignments gives the recorded plan.
        priority = torch.zeros_like(weights).masked_fill(forced.dropped.to(weights.device), float("-inf"))
    plan = ops.make_plan(indices, num_experts, capacity, priority)
    return weights, indices, scores, plan


def expert_choice(
    logits: Tensor, mask: Tensor, *, score_func: str, capacity: int, forced: ForcedRouting | None = None
) -> tuple[Tensor, None, Tensor, ops.RoutingPlan]:
    """(weights [T, E], None, scores [T, E], plan): each expert takes its ``capacity`` best tokens
    by per-token score (Zhou et al. 2022); weights are the scores where taken, 0 elsewhere.

    ``forced``: its ``indices`` [T, E] (the expert id where the expert takes the token, -1 elsewhere)
    replace the experts' choice, at most ``capacity`` tokens each."""
    _, _, scores = ops.topk_gating(logits, 1, score_func, False, None, 1.0, 1, 1, mask)
    if forced is None:
        plan = ops.expert_choice_plan(scores.detach(), capacity)
    else:
        plan = _forced_expert_choice_plan(forced.indices.to(scores.device), capacity)
    weights = torch.where(plan.row_of >= 0, scores, torch.zeros_like(scores))
    if forced is not None and forced.weights is not None:
        weights = forced.weights.to(device=weights.device, dtype=weights.dtype)
    return weights, None, scores, plan


def _forced_expert_choice_plan(taken_by: Tensor, capacity: int) -> ops.RoutingPlan:
    """The expert-choice plan in which expert e takes the tokens t with taken_by[t, e] == e (token order);
    ``taken_by`` is checked already (``forced_expert_choice_problem``)."""
    T, E = taken_by.shape
    experts = torch.arange(E, device=taken_by.device)
    taken = taken_by.long() == experts
    counts = taken.sum(0)
    rank = taken.long().cumsum(0) - 1
    row_of = torch.where(taken, experts * capacity + rank, torch.full_like(rank, -1))
    # Untaken entries write to one spare slot past the end (no host sync, unlike boolean indexing).
    token_of = torch.full((E * capacity + 1,), -1, dtype=torch.long, device=taken_by.device)
    tokens = torch.arange(T, device=taken_by.device).unsqueeze(1).expand(T, E)
    token_of.scatter_(0, torch.where(taken, row_of, E * capacity).flatten(), tokens.flatten())
    token_of = token_of[:-1]
    offsets = torch.arange(E + 1, device=taken_by.device) * capacity
    return ops.RoutingPlan(row_of, token_of, counts, offsets)


def forced_expert_choice_problem(taken_by: Tensor, capacity: int, mask: Tensor) -> str | None:
    """What is wrong with a given expert-choice routing [T, E] (None: nothing): entry [t, e] must be
    e (expert e takes token t) or -1, no expert takes more than ``capacity`` tokens, and none takes
    a token ``mask`` ([E] or [T, E]) disables for it. One host sync."""
    T, E = taken_by.shape
    taken = taken_by.long() == torch.arange(E, device=taken_by.device)
    counts = taken.sum(0)
    bad = torch.stack(
        [((taken_by.long() != -1) & ~taken).any(), (counts > capacity).any(), (taken & ~mask.expand(T, E)).any()]
    )
    if not bool(bad.any()):
        return None
    if bad[0]:
        return "entry [t, e] must be e (expert e takes token t) or -1 (it does not)"
    if bad[1]:
        e = int((counts > capacity).nonzero()[0])
        return f"expert {e} takes {int(counts[e])} tokens, more than the layer's capacity of {capacity}"
    t, e = (taken & ~mask.expand(T, E)).nonzero()[0].tolist()
    return f"disabled expert {e} takes token {t}"
