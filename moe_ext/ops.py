"""Typed wrappers of the moe_ext operators (torch.ops.moe_ext.*): gating, plan, dispatch, matmul, combine, losses."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import _library

_library.load()

__all__ = [
    "RoutingPlan",
    "as_output",
    "topk_gating",
    "forced_gating",
    "make_plan",
    "expert_choice_plan",
    "dispatch",
    "grouped_mm",
    "linear",
    "combine",
    "load_balancing_loss",
    "router_z_loss",
    "swiglu",
]


def _require_tensor(value, name: str) -> None:
    # The dispatcher's own message for None ("tensor does not have a device") names no argument.
    if not isinstance(value, Tensor):
        raise TypeError(f"moe_ext: {name} must be a torch.Tensor, got {type(value).__name__}")


def _require_plan(plan) -> None:
    if not (hasattr(plan, "row_of") and hasattr(plan, "token_of")):
        raise TypeError(
            f"moe_ext: plan must be a RoutingPlan (from make_plan or expert_choice_plan), got {type(plan).__name__}"
            "; wrap the raw op's tuple as ops.RoutingPlan(*plan)"
        )


class RoutingPlan(NamedTuple):
    """Where every (token, choice) assignment lives in the expert-sorted buffer.

    row_of   [T, k] int64: row of x_sorted holding assignment (t, j); -1 if dropped.
    token_of [N]    int64: source token of each row; -1 for an empty padded row.
    counts   [E]    int64: assignments routed to each expert before capacity.
    offsets  [E+1]  int64: rows of expert e are offsets[e]:offsets[e+1].
    """

    row_of: Tensor
    token_of: Tensor
    counts: Tensor
    offsets: Tensor


def topk_gating(
    logits: Tensor,
    k: int,
    score_func: str = "softmax",
    normalize: bool = True,
    bias: Tensor | None = None,
    scale: float = 1.0,
    n_group: int = 1,
    topk_group: int = 1,
    expert_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Routes every token to its k best experts.

    Args:
        logits: [T, E] router logits, any floating dtype.
        k: experts per token, 1 <= k <= E.
        score_func: "softmax" (over the enabled experts) or "sigmoid" (per expert).
        normalize: renormalize the k selected scores to sum to 1 (Mixtral);
            False keeps the raw scores (Switch, Qwen3-MoE default).
        bias: [E] selection-only bias added to the scores when choosing experts,
            never to the weights (DeepSeek-V3 ``e_score_correction_bias``).
        scale: routed scaling factor multiplied into the weights.
        n_group, topk_group: group-limited routing (DeepSeek-V3): the E experts
            form n_group groups, a group scores the sum of its best two
            selection values, and only the topk_group best groups are eligible.
        expert_mask: [E] bool, False = expert disabled: score 0, never selected.

    Returns:
        weights [T, k] (float32, float64 for float64 logits), differentiable;
        indices [T, k] int64 in descending selection order, ties to the lower
        expert index; scores [T, E] (softmax/sigmoid), differentiable.

    Non-finite logits (NaN anywhere; +inf or no finite enabled logit under
    softmax) raise a RuntimeError naming the token.
    """
    _require_tensor(logits, "logits")
    return torch.ops.moe_ext.topk_gating(
        logits, k, score_func, normalize, bias, float(scale), n_group, topk_group, expert_mask
    )


class _ForcedGating(torch.autograd.Function):
    """Weights at given experts with ``topk_gating``'s arithmetic; backward is its C++ backward."""

    @staticmethod
    def forward(ctx, logits, indices, score_func, normalize, scale, expert_mask):
        _, _, scores = torch.ops.moe_ext.topk_gating(logits, 1, score_func, False, None, 1.0, 1, 1, expert_mask)
        picked = scores.gather(1, indices)
        if normalize:
            # kernels::token_weights: s_j / (((s_0 + s_1) + ...) + eps) * scale, summed in choice order.
            total = picked[:, 0]
            for j in range(1, picked.shape[1]):
                total = total + picked[:, j]
            weights = picked / (total + _NORMALIZE_EPS).unsqueeze(1) * scale
        else:
            weights = picked * scale
        ctx.save_for_backward(scores, indices)
        ctx.config = (score_func, normalize, scale, logits.dtype)
        ctx.mark_non_differentiable(indices)
        return weights, indices, scores

    @staticmethod
    def backward(ctx, grad_weights, grad_indices, grad_scores):
        scores, indices = ctx.saved_tensors
        score_func, normalize, scale, dtype = ctx.config
        grad_logits = torch.ops.moe_ext.topk_gating_backward(
            grad_weights, grad_scores, scores, indices, score_func, normalize, scale, dtype
        )
        return grad_logits, None, None, None, None, None


_NORMALIZE_EPS = 1e-20  # kernels/gating.h kNormalizeEps


def forced_gating(
    logits: Tensor,
    indices: Tensor,
    score_func: str = "softmax",
    normalize: bool = True,
    scale: float = 1.0,
    expert_mask: Tensor | None = None,
    validate: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """``topk_gating`` with the experts given instead of chosen: (weights [T, k], indices, scores [T, E]).

    The weights and every gradient are bitwise those ``topk_gating`` gives when it chooses
    ``indices`` itself (same scores, same sums in the same order, the same C++ backward), so a
    replayed routing trains exactly as the routing it replays. ``indices`` [T, k]: distinct experts
    per token in [0, E), each enabled by ``expert_mask`` ([E] or [T, E]); anything else raises
    (``validate=False`` skips that check and its host sync, for indices checked already).
    """
    _require_tensor(logits, "logits")
    _require_tensor(indices, "indices")
    if logits.dim() != 2:
        raise ValueError(f"forced_gating: logits must be [T, E], got shape {tuple(logits.shape)}")
    T, E = logits.shape
    if indices.dim() != 2 or indices.shape[0] != T or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(
            f"forced_gating: indices must be an integer [T = {T}, k] tensor, got {indices.dtype} {tuple(indices.shape)}"
        )
    if indices.device != logits.device:
        raise ValueError(f"forced_gating: indices are on {indices.device} but logits on {logits.device}")
    indices = indices.long().contiguous()
    k = indices.shape[1]
    if not 1 <= k <= E:
        raise ValueError(f"forced_gating: indices must name 1 <= k <= E = {E} experts per token, got k = {k}")
    if validate:
        problem = forced_indices_problem(indices, E, expert_mask)
        if problem is not None:
            raise ValueError(f"forced_gating: {problem}")
    return _ForcedGating.apply(logits, indices, score_func, normalize, float(scale), expert_mask)


def forced_indices_problem(indices: Tensor, num_experts: int, expert_mask: Tensor | None = None) -> str | None:
    """What is wrong with experts [T, k] given per token (None: nothing): each must be in
    [0, num_experts), distinct within its token and enabled by ``expert_mask`` ([E] or [T, E]).
    One host sync."""
    T, k = indices.shape
    if T == 0:
        return None
    E = num_experts
    in_range = (indices >= 0) & (indices < E)
    safe = indices.clamp(0, E - 1)
    ordered = safe.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1) if k > 1 else torch.zeros_like(in_range[:, 0])
    enabled = torch.ones_like(in_range)
    if expert_mask is not None:
        enabled = expert_mask.to(indices.device).expand(T, E).gather(1, safe)
    bad = torch.stack([~in_range.all(1), repeated, ~enabled.all(1)])
    if not bool(bad.any()):
        return None
    what = ["an expert outside [0, E)", "the same expert twice", "a disabled expert"]
    first = int(bad.any(1).nonzero()[0])
    token = int(bad[first].nonzero()[0])
    return f"token {token}'s experts {indices[token].tolist()} name {what[first]} (E = {E})"


def make_plan(
    indices: Tensor, num_experts: int, capacity: int | None = None, priority: Tensor | None = None
) -> RoutingPlan:
    """Lays the (token, choice) assignments out by expert. Not differentiable.

    Dropless (capacity=None): N = T*k rows grouped by expert, tokens in order.
    capacity=C: N = E*C, expert e owns rows [e*C, (e+1)*C); overflow is dropped
    in (choice, token) order -- every first choice before any second choice, as
    in Switch/GShard -- or, with ``priority`` [T, k], highest priority kept first;
    an assignment whose priority is -inf is always dropped (random routing).
    Output shapes depend only on input shapes (no host sync).
    """
    _require_tensor(indices, "indices")
    row_of, token_of, counts, offsets = torch.ops.moe_ext.make_plan(indices, num_experts, capacity, priority)
    return RoutingPlan(row_of, token_of, counts, offsets)


def expert_choice_plan(scores: Tensor, capacity: int) -> RoutingPlan:
    """Expert-choice routing (Zhou et al. 2022): every expert takes its ``capacity`` best tokens.

    scores [T, E]; expert e takes the min(capacity, T) tokens with the highest
    scores[:, e] (ties to the lower token index) into rows e*C, e*C+1, ... in
    token order. ``row_of`` is [T, E] (a token may get 0..E experts; -1 where
    expert e did not take token t), so ``combine`` takes [T, E] weights, e.g.
    ``scores.where(plan.row_of >= 0, 0)``. Not differentiable.
    """
    _require_tensor(scores, "scores")
    row_of, token_of, counts, offsets = torch.ops.moe_ext.expert_choice_plan(scores, capacity)
    return RoutingPlan(row_of, token_of, counts, offsets)


def dispatch(x: Tensor, plan: RoutingPlan) -> Tensor:
    """x [T, H] -> x_sorted [N, H]: row r holds x[plan.token_of[r]], zeros for empty rows."""
    _require_tensor(x, "x")
    _require_plan(plan)
    return torch.ops.moe_ext.dispatch(x, plan.token_of, plan.row_of)


def grouped_mm(x_sorted: Tensor, w: Tensor, offsets: Tensor) -> Tensor:
    """[N, in] x [E, in, out] -> [N, out]: rows offsets[e]:offsets[e+1] are multiplied by w[e].

    ``w`` is read as it is when row-major or when it is the ``.transpose(1, 2)`` view of a row-major
    [E, out, in] tensor (nn.Linear weights stacked, as transformers' experts store them); its gradient
    comes back with ``w``'s strides, so neither the forward nor the backward copies the weights. Any
    other non-contiguous ``w`` is copied to row-major first."""
    _require_tensor(x_sorted, "x_sorted")
    _require_tensor(w, "w")
    _require_tensor(offsets, "offsets")
    return torch.ops.moe_ext.grouped_mm(x_sorted, w, offsets)


def as_output(y: Tensor, shape) -> Tensor:
    """``y`` reshaped to ``shape``, as a tensor of its own to autograd (``_base`` is None), not a view.

    A module that returns a view lets an in-place op on its output (``h += layer(x)``) replace the
    output's autograd node, and with it any hook a wrapper put on the output: FSDP2's pre-backward
    all-gather is such a hook (it warns "returned a view tensor"). Like torch's own matmul, this
    shares ``y``'s storage without a copy (``aten._unsafe_view``); ``y`` must be a fresh result that
    nothing else holds or saved for backward.
    """
    if y._base is None and y.shape == shape:
        return y
    return torch.ops.aten._unsafe_view(y, shape)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., in] @ weight[out, in]^T (+ bias [out]) -> [..., out]: ``torch.nn.functional.linear``.

    The gradients are bitwise the same at every thread count: the weight gradient reduces over all
    tokens in fixed tiles, each one GEMM on one thread, and the bias gradient sums fixed blocks of
    rows in order. (torch's own CPU GEMM, MKL on Intel CPUs, splits that reduction between threads.)
    x, weight and bias share one dtype; under ``torch.autocast`` all three run in the autocast dtype.
    """
    _require_tensor(x, "x")
    _require_tensor(weight, "weight")
    if bias is not None:
        _require_tensor(bias, "bias")
    if x.dim() == 2:
        return torch.ops.moe_ext.linear(x, weight, bias)
    if x.dim() == 0:
        raise ValueError("moe_ext: x must have shape [..., in], got a 0-d tensor")
    y = torch.ops.moe_ext.linear(x.reshape(-1, x.shape[-1]), weight, bias)
    return as_output(y, (*x.shape[:-1], y.shape[-1]))


def combine(y_sorted: Tensor, weights: Tensor, plan: RoutingPlan) -> Tensor:
    """[N, H], [T, k] -> [T, H]: y[t] = sum_j weights[t, j] * y_sorted[row_of[t, j]]; dropped add nothing."""
    _require_tensor(y_sorted, "y_sorted")
    _require_tensor(weights, "weights")
    _require_plan(plan)
    return torch.ops.moe_ext.combine(y_sorted, weights, plan.row_of, plan.token_of)


def load_balancing_loss(scores: Tensor, indices: Tensor, num_experts: int) -> Tensor:
    """E * sum_e (count_e / T) * mean_t scores[t, e] (Switch Transformer; transformers' formula).

    count_e counts the (t, j) with indices[t, j] == e, so a perfectly balanced
    router scores k. Gradient flows into ``scores``. Zero when T == 0.
    """
    _require_tensor(scores, "scores")
    _require_tensor(indices, "indices")
    return torch.ops.moe_ext.load_balancing_loss(scores, indices, num_experts)


def router_z_loss(logits: Tensor) -> Tensor:
    """mean_t logsumexp(logits[t])**2 (ST-MoE); float32 at least; zero when T == 0.

    Logits are not checked for non-finite values (that would cost a host sync): a NaN, a +inf, or
    a token whose logits are all -inf makes the loss NaN; -inf beside a finite logit counts as
    exp(-inf) = 0 (a masked expert). ``topk_gating`` raises for such logits, so the layer never
    reaches this loss with them. E must be >= 1.
    """
    _require_tensor(logits, "logits")
    return torch.ops.moe_ext.router_z_loss(logits)


def swiglu(h: Tensor) -> Tensor:
    """h [N, 2F] = [gate | up] -> silu(gate) * up [N, F], fused (one pass forward, one backward).

    The activation between the two expert GEMMs of a SwiGLU expert (``w_in`` holds
    the gate columns first). Differentiable; float math uses a vectorizable exp
    (within 2 ulp of the C library's), float64 the C library's.
    """
    _require_tensor(h, "h")
    return torch.ops.moe_ext.swiglu(h)
