"""The drop-in MoE layer: router, stacked experts, and aux losses wired through the moe_ext operators."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops

__all__ = ["MoE", "RoutingStats", "aux_loss", "set_aux_loss_scale"]

_GATED = {"swiglu": F.silu, "geglu": F.gelu}
_PLAIN = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


class RoutingStats(NamedTuple):
    """Routing statistics of one forward, as tensors (reading a value syncs, building them does not).

    tokens_per_expert       [E] int64: assignments routed to each expert, before capacity.
    tokens_per_expert_kept  [E] int64: assignments each expert processed, after capacity.
    dropped                 []  int64: assignments dropped by capacity.
    load_imbalance          []  float: max / mean of tokens_per_expert (1.0 = perfectly balanced).
    load_cv                 []  float: coefficient of variation (std / mean) of tokens_per_expert.
    router_entropy          []  float: mean over tokens of the entropy (nats) of the router's
                                score distribution (scores renormalized to sum to 1).
    """

    tokens_per_expert: Tensor
    tokens_per_expert_kept: Tensor
    dropped: Tensor
    load_imbalance: Tensor
    load_cv: Tensor
    router_entropy: Tensor

    def as_dict(self) -> dict:
        """Python numbers and lists (this reads the tensors: one host sync)."""
        return {
            name: (value.tolist() if value.dim() else value.item()) for name, value in self._asdict().items()
        }


class _AuxLossInjector(torch.autograd.Function):
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


class MoE(nn.Module):
    """A sparse Mixture-of-Experts feed-forward layer: x [..., H] -> y [..., H], same shape and dtype.

    Each token is routed to ``top_k`` of ``num_experts`` expert FFNs and gets
    the routing-weighted sum of their outputs.

    Args:
        hidden_size: H, the model width.
        ffn_hidden_size: F, each expert's inner width.
        num_experts: E.
        top_k: k, experts per token.
        activation: "swiglu" | "geglu" (gated: w_in holds [gate | up], 2F wide)
            | "gelu" | "relu" | "silu".
        capacity_factor: None = dropless (no token ever dropped); otherwise each
            expert takes at most C = max(min_capacity, ceil(capacity_factor * T * k / E))
            assignments and the overflow is dropped per ``drop_policy``.
        score_func: "softmax" or "sigmoid" router scores.
        normalize_weights: renormalize the k weights to sum to 1 (Mixtral).
        aux_loss_coef: weight of the load-balancing loss (Switch/transformers formula).
        z_loss_coef: weight of the router z-loss (ST-MoE).
        aux_loss_mode: "auto": the weighted aux loss adds its gradient during the
            backward of whatever loss is computed from the output (no change to
            the training loop; ``layer.aux_loss`` is then a detached value for
            logging). "manual": ``layer.aux_loss`` keeps its graph and the user
            adds it to the loss (``moe_ext.aux_loss(model)`` sums all layers).
        drop_policy: "position" (first choices before second choices, then token
            order) or "probs" (highest routing weight kept first); capacity mode only.
        min_capacity: lower bound of C in capacity mode.
        routed_scaling_factor: multiplies the routing weights (DeepSeek-V3).
        n_group, topk_group: group-limited routing (DeepSeek-V3); 1, 1 = off.
        device, dtype: where and in which dtype to create the parameters.

    Parameters: ``router.weight`` [E, H] (as ``nn.Linear(H, E)``), ``w_in``
    [E, H, F or 2F] and ``w_out`` [E, F, H], initialized like ``nn.Linear``
    (uniform in +-1/sqrt(fan_in)).

    After each forward: ``layer.aux_loss`` (the weighted aux loss, a 0-d tensor)
    and ``layer.last_stats`` (a :class:`RoutingStats`).
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        top_k: int = 2,
        activation: str = "swiglu",
        capacity_factor: float | None = None,
        score_func: str = "softmax",
        normalize_weights: bool = True,
        aux_loss_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        aux_loss_mode: str = "auto",
        *,
        drop_policy: str = "position",
        min_capacity: int = 1,
        routed_scaling_factor: float = 1.0,
        n_group: int = 1,
        topk_group: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("ffn_hidden_size", ffn_hidden_size),
                            ("num_experts", num_experts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"MoE: {name} must be a positive int, got {value!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"MoE: top_k must satisfy 1 <= top_k <= num_experts = {num_experts}, got {top_k!r}")
        if activation not in _GATED and activation not in _PLAIN:
            raise ValueError(f"MoE: activation must be one of {sorted([*_GATED, *_PLAIN])}, got {activation!r}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"MoE: capacity_factor must be > 0 or None (dropless), got {capacity_factor!r}")
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"MoE: score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
        if aux_loss_mode not in ("auto", "manual"):
            raise ValueError(f"MoE: aux_loss_mode must be 'auto' or 'manual', got {aux_loss_mode!r}")
        if drop_policy not in ("position", "probs"):
            raise ValueError(f"MoE: drop_policy must be 'position' or 'probs', got {drop_policy!r}")
        if not isinstance(min_capacity, int) or min_capacity < 1:
            raise ValueError(f"MoE: min_capacity must be an int >= 1, got {min_capacity!r}")
        if n_group < 1 or num_experts % n_group or not 1 <= topk_group <= n_group:
            raise ValueError(
                f"MoE: n_group must divide num_experts and 1 <= topk_group <= n_group, got n_group={n_group}, "
                f"topk_group={topk_group}, num_experts={num_experts}"
            )
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.num_experts = num_experts
        self.top_k = top_k
        self.activation = activation
        self.capacity_factor = capacity_factor
        self.score_func = score_func
        self.normalize_weights = normalize_weights
        self.aux_loss_coef = float(aux_loss_coef)
        self.z_loss_coef = float(z_loss_coef)
        self.aux_loss_mode = aux_loss_mode
        self.aux_loss_scale = 1.0
        self.drop_policy = drop_policy
        self.min_capacity = min_capacity
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.n_group = n_group
        self.topk_group = topk_group

        factory = {"device": device, "dtype": dtype}
        in_width = 2 * ffn_hidden_size if activation in _GATED else ffn_hidden_size
        self.router = nn.Linear(hidden_size, num_experts, bias=False, **factory)
        self.w_in = nn.Parameter(torch.empty(num_experts, hidden_size, in_width, **factory))
        self.w_out = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size, **factory))
        # False = expert disabled: never selected, its tokens go to their next-best experts.
        # A buffer (not a parameter, not saved): toggling it changes no shape and forces no recompile.
        self.register_buffer("expert_mask", torch.ones(num_experts, dtype=torch.bool, device=device),
                             persistent=False)
        self.reset_parameters()
        self.aux_loss: Tensor | None = None
        self.last_stats: RoutingStats | None = None
        self.track_stats = True
        self._restriction: tuple[Tensor, Tensor] | None = None
        self._trace_sink = None  # set by moe_ext.trace_routing while a trace records

    def reset_parameters(self) -> None:
        """nn.Linear's default: uniform in +-1/sqrt(fan_in) for the router and every expert matrix."""
        self.router.reset_parameters()
        with torch.no_grad():
            self.w_in.uniform_(-1.0 / math.sqrt(self.hidden_size), 1.0 / math.sqrt(self.hidden_size))
            self.w_out.uniform_(-1.0 / math.sqrt(self.ffn_hidden_size), 1.0 / math.sqrt(self.ffn_hidden_size))

    # ----- expert control ---------------------------------------------------------------------------

    def _expert_ids(self, experts, what: str) -> list[int]:
        ids = [int(e) for e in (experts.tolist() if isinstance(experts, Tensor) else experts)]
        bad = [e for e in ids if not 0 <= e < self.num_experts]
        if bad:
            raise ValueError(f"MoE.{what}: experts must be in [0, num_experts = {self.num_experts}), got {bad}")
        return ids

    def disable_experts(self, experts) -> None:
        """Switches experts off: they are never selected and their tokens go to the next-best experts.

        With ``normalize_weights=True`` the weights renormalize over the experts
        that remain; with softmax scores the softmax runs over enabled experts
        only. Works in training and inference, and in a compiled model without
        recompiling (the mask is a buffer). At least ``top_k`` experts must stay on.
        """
        ids = self._expert_ids(experts, "disable_experts")
        mask = self.expert_mask.clone()
        mask[ids] = False
        if int(mask.sum()) < self.top_k:
            raise ValueError(
                f"MoE.disable_experts: disabling {sorted(set(ids))} leaves {int(mask.sum())} enabled experts, "
                f"fewer than top_k = {self.top_k}"
            )
        self.expert_mask.copy_(mask)

    def enable_experts(self, experts=None) -> None:
        """Switches experts back on (all of them when ``experts`` is None)."""
        if experts is None:
            self.expert_mask.fill_(True)
        else:
            self.expert_mask[self._expert_ids(experts, "enable_experts")] = True

    @property
    def disabled_experts(self) -> list[int]:
        return [e for e, on in enumerate(self.expert_mask.tolist()) if not on]

    def restrict_experts(self, token_mask: Tensor, allowed) -> _Restriction:
        """Routes the flagged tokens of the following forwards only to ``allowed`` experts.

        ``token_mask`` is a bool tensor over the input's leading dims (``x.shape[:-1]``);
        ``allowed`` lists expert ids (or is an [E] bool mask). Unflagged tokens
        route as usual. The restriction stays until :meth:`clear_restriction`;
        the returned handle is also a context manager that clears it on exit::

            with layer.restrict_experts(is_medical, allowed=[0, 3]):
                y = layer(x)
        """
        if not isinstance(token_mask, Tensor) or token_mask.dtype != torch.bool:
            raise ValueError("MoE.restrict_experts: token_mask must be a bool tensor over x.shape[:-1]")
        if isinstance(allowed, Tensor) and allowed.dtype == torch.bool:
            if allowed.shape != (self.num_experts,):
                raise ValueError(f"MoE.restrict_experts: allowed as a mask must have shape [{self.num_experts}]")
            allowed_mask = allowed.to(self.expert_mask.device).clone()
        else:
            allowed_mask = torch.zeros_like(self.expert_mask)
            allowed_mask[self._expert_ids(allowed, "restrict_experts")] = True
        if int((allowed_mask & self.expert_mask).sum()) < self.top_k:
            raise ValueError(
                f"MoE.restrict_experts: fewer than top_k = {self.top_k} allowed experts are enabled"
            )
        self._restriction = (token_mask.to(self.expert_mask.device), allowed_mask)
        return _Restriction(self)

    def clear_restriction(self) -> None:
        self._restriction = None

    @torch.no_grad()
    def clone_expert(self, src: int, dst: int, copy_router: bool = False) -> None:
        """Copies expert ``src``'s weights into slot ``dst`` (a redundant replica).

        With ``copy_router=True`` the router row is copied too, so ``dst`` scores
        exactly like ``src``: disable ``src`` and its tokens move to the replica.
        """
        src, dst = self._expert_ids([src, dst], "clone_expert")
        self.w_in[dst].copy_(self.w_in[src])
        self.w_out[dst].copy_(self.w_out[src])
        if copy_router:
            self.router.weight[dst].copy_(self.router.weight[src])

    def _routing_mask(self, leading_shape: torch.Size, num_tokens: int) -> Tensor:
        if self._restriction is None:
            return self.expert_mask
        token_mask, allowed = self._restriction
        if token_mask.shape != leading_shape:
            raise ValueError(
                f"MoE: the restrict_experts token_mask has shape {tuple(token_mask.shape)} but the input's "
                f"leading dims are {tuple(leading_shape)}; call clear_restriction() or restrict again"
            )
        flagged = token_mask.reshape(num_tokens, 1)
        return torch.where(flagged, (allowed & self.expert_mask).unsqueeze(0), self.expert_mask.unsqueeze(0))

    def extra_repr(self) -> str:
        capacity = "dropless" if self.capacity_factor is None else f"capacity_factor={self.capacity_factor}"
        return (
            f"hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, activation={self.activation}, {capacity}"
        )

    def capacity(self, num_tokens: int) -> int | None:
        """Rows per expert for a batch of ``num_tokens`` tokens (None when dropless)."""
        if self.capacity_factor is None:
            return None
        wanted = math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)
        return max(self.min_capacity, wanted)

    def _expert_ffn(self, x_sorted: Tensor, offsets: Tensor) -> Tensor:
        h = ops.grouped_mm(x_sorted, self.w_in, offsets)
        if self.activation in _GATED:
            gate, up = h.chunk(2, dim=-1)
            h = _GATED[self.activation](gate) * up
        else:
            h = _PLAIN[self.activation](h)
        return ops.grouped_mm(h, self.w_out, offsets)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoE: x must have shape [..., hidden_size = {self.hidden_size}], got {tuple(x.shape)}")
        if x.dtype != self.w_in.dtype:
            raise ValueError(
                f"MoE: x is {x.dtype} but the layer's parameters are {self.w_in.dtype}; "
                f"convert one of them (for example layer.to({x.dtype}))"
            )
        shape = x.shape
        tokens = x.reshape(-1, self.hidden_size)
        logits = self.router(tokens)
        weights, indices, scores = ops.topk_gating(
            logits, self.top_k, self.score_func, self.normalize_weights, None, self.routed_scaling_factor,
            self.n_group, self.topk_group, self._routing_mask(shape[:-1], tokens.shape[0]),
        )
        capacity = self.capacity(tokens.shape[0])
        priority = weights.detach() if capacity is not None and self.drop_policy == "probs" else None
        plan = ops.make_plan(indices, self.num_experts, capacity, priority)
        y_sorted = self._expert_ffn(ops.dispatch(tokens, plan), plan.offsets)
        y = ops.combine(y_sorted, weights, plan)

        aux = self._aux_loss(logits, scores, indices)
        if self.aux_loss_mode == "auto":
            if self.training and torch.is_grad_enabled() and aux.requires_grad:
                y = _AuxLossInjector.apply(y, aux, self.aux_loss_scale)
            aux = aux.detach()
        self.aux_loss = aux
        if self.track_stats:
            self.last_stats = _routing_stats(plan.counts, capacity, scores.detach())
        if self._trace_sink is not None:
            self._trace_sink.record(self, indices, weights.detach(), plan.row_of, shape[:-1])
        return y.reshape(shape)

    def _aux_loss(self, logits: Tensor, scores: Tensor, indices: Tensor) -> Tensor:
        aux = scores.new_zeros(())
        if self.aux_loss_coef != 0.0:
            aux = aux + self.aux_loss_coef * ops.load_balancing_loss(scores, indices, self.num_experts)
        if self.z_loss_coef != 0.0:
            aux = aux + self.z_loss_coef * ops.router_z_loss(logits)
        return aux


class _Restriction:
    """Handle returned by MoE.restrict_experts; leaving its `with` block clears the restriction."""

    def __init__(self, layer: MoE) -> None:
        self.layer = layer

    def __enter__(self) -> _Restriction:
        return self

    def __exit__(self, *exc) -> None:
        self.layer.clear_restriction()


@torch.no_grad()
def _routing_stats(counts: Tensor, capacity: int | None, scores: Tensor) -> RoutingStats:
    kept = counts if capacity is None else counts.clamp(max=capacity)
    load = counts.to(scores.dtype)
    mean = load.mean()
    safe_mean = mean.clamp(min=torch.finfo(load.dtype).tiny)
    imbalance = torch.where(mean > 0, load.max() / safe_mean, torch.ones_like(mean))
    cv = torch.where(mean > 0, load.std(correction=0) / safe_mean, torch.zeros_like(mean))
    if scores.shape[0] > 0:
        p = scores / scores.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)
        entropy = torch.special.entr(p).sum(dim=-1).mean()
    else:
        entropy = scores.new_zeros(())
    return RoutingStats(counts, kept, counts.sum() - kept.sum(), imbalance, cv, entropy)


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of ``aux_loss`` over every moe_ext MoE layer in ``model`` (0 when none has run)."""
    losses = [m.aux_loss for m in model.modules() if isinstance(m, MoE) and m.aux_loss is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.float() for loss in losses]).sum()


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Scales the aux-loss gradient that auto mode injects, to match a scaled main loss.

    Use it when the training loss is multiplied before backward (gradient
    accumulation's 1/steps, a fixed loss scale) so the aux loss keeps its
    relative weight.
    """
    for module in model.modules():
        if isinstance(module, MoE):
            module.aux_loss_scale = float(scale)
