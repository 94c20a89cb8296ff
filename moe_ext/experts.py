"""The expert computation for a given routing: stacked expert weights, dispatch -> grouped FFN -> combine."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import distributed, ops
from .activations import ACTIVATIONS, activate, in_width
from .distributed import EXPERT_PARAMETERS

__all__ = ["EXPERT_PARAMETERS", "Experts", "expert_ffn", "grouped_experts"]


def expert_ffn(
    x_sorted: Tensor,
    offsets: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
    activation: str | Callable[[Tensor], Tensor] = "swiglu",
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
) -> Tensor:
    """Rows grouped by expert (``offsets`` [E + 1]) -> act(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e].

    ``activation`` is a name (see :class:`Experts`) or a function of the rows [N, in width] -> [N, F]
    (a model's own gate, e.g. a clamped or softcapped SwiGLU, run on the grouped rows).
    """
    h = ops.grouped_mm(x_sorted, w_in, offsets)
    if b_in is not None:
        h = h + _per_row(b_in, offsets, h.shape[0])
    h = activation(h) if callable(activation) else activate(activation, h, swiglu_alpha, swiglu_limit)
    y = ops.grouped_mm(h, w_out, offsets)
    if b_out is not None:
        y = y + _per_row(b_out, offsets, y.shape[0])
    return y


def _per_row(bias: Tensor, offsets: Tensor, rows: int) -> Tensor:
    """[rows, width]: each row's expert's bias, the expert of a row read from the plan's offsets."""
    # No host sync: output_size is the row count.
    expert_of_row = torch.repeat_interleave(
        torch.arange(offsets.shape[0] - 1, device=offsets.device), offsets.diff(), output_size=rows
    )
    # index_select, not indexing: its backward (index_add_) sums rows in a fixed order, while
    # indexing's (index_put_ with accumulate) gives other bits at another thread count.
    return bias.index_select(0, expert_of_row)


def _apply_plan(
    hidden_states: Tensor,
    plan: ops.RoutingPlan,
    weights: Tensor,
    ffn: Callable[[Tensor, Tensor], Tensor],
    group,
    num_local_experts: int,
    observe: Callable[[Tensor, ops.RoutingPlan], None] | None = None,
) -> Tensor:
    x_sorted = ops.dispatch(hidden_states, plan)
    if group is None:
        y_sorted = ffn(x_sorted, plan.offsets)
    else:
        y_sorted = distributed.run_experts(ffn, x_sorted, plan.offsets, group, num_local_experts)
    if observe is not None:
        observe(y_sorted, plan)
    return ops.combine(y_sorted, weights, plan)


def grouped_experts(
    hidden_states: Tensor,
    indices: Tensor,
    weights: Tensor,
    w_in: Tensor,
    w_out: Tensor,
    b_in: Tensor | None = None,
    b_out: Tensor | None = None,
    *,
    activation: str = "swiglu",
    capacity: int | None = None,
    priority: Tensor | None = None,
    swiglu_alpha: float = 1.702,
    swiglu_limit: float = 7.0,
    expert_parallel_group: dist.ProcessGroup | None = None,
) -> Tensor:
    """The experts' output for a routing someone else made: y[t] = sum_j weights[t, j] * FFN_{indices[t, j]}(x[t]).

    The function form of :class:`Experts`, for callers that keep the weights themselves.

    Args:
        hidden_states: [T, H].
        indices: [T, k] int64 expert ids in [0, E).
        weights: [T, k] routing weights (any float dtype; differentiable).
        w_in: [E_local, H, F or 2F] (gated activations: [gate | up] columns), w_out [E_local, F, H];
            b_in [E_local, F or 2F] and b_out [E_local, H] optional. E_local = E, or E / W over an
            expert-parallel group of W ranks, where this rank holds experts [r * E / W, (r + 1) * E / W).
        activation: see :class:`Experts`.
        capacity: None = dropless; C = each expert takes at most C assignments, the rest dropped in
            (choice, token) order, or highest ``priority`` [T, k] first (``ops.make_plan``).
        expert_parallel_group: rows go to the ranks owning their experts and back (all_to_all; a
            collective: every rank of the group calls it the same number of times).

    Returns [T, H] in the dtype of the expert computation.
    """
    world = 1 if expert_parallel_group is None else dist.get_world_size(expert_parallel_group)
    plan = ops.make_plan(indices, w_in.shape[0] * world, capacity, priority)

    def ffn(x_sorted: Tensor, offsets: Tensor) -> Tensor:
        return expert_ffn(x_sorted, offsets, w_in, w_out, b_in, b_out, activation, swiglu_alpha, swiglu_limit)

    return _apply_plan(hidden_states, plan, weights, ffn, expert_parallel_group, w_in.shape[0])


def check_expert_sizes(owner: str, hidden_size, ffn_hidden_size, num_experts, activation) -> None:
    """Raises ValueError naming ``owner`` for a size that is not a positive int or an unknown activation."""
    for name, value in (
        ("hidden_size", hidden_size),
        ("ffn_hidden_size", ffn_hidden_size),
        ("num_experts", num_experts),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{owner}: activation must be one of {ACTIVATIONS}, got {activation!r}")


class Experts(nn.Module):
    """``num_experts`` expert FFNs with stacked weights, run for a routing given by the caller.

    ``experts(hidden_states [T, H], indices [T, k], weights [T, k]) -> [T, H]``: token t gets
    ``sum_j weights[t, j] * FFN_{indices[t, j]}(hidden_states[t])`` with
    ``FFN_e(x) = act(x @ w_in[e] + b_in[e]) @ w_out[e] + b_out[e]``, computed by dispatch ->
    grouped matmul -> fused activation -> grouped matmul -> combine (no loop over experts).
    ``capacity=C`` caps every expert at C assignments (the overflow adds nothing; ``priority``
    [T, k] picks which are kept, highest first); the default is dropless. Bring any router::

        experts = moe_ext.Experts(hidden_size=64, ffn_hidden_size=128, num_experts=8)
        weights, indices = my_router(x)             # [T, k] each
        y = experts(x, indices, weights)

    :class:`moe_ext.MoE` is an ``Experts`` with a router and the rest in front; the function
    :func:`grouped_experts` computes the same from weights held elsewhere.

    Args:
        hidden_size, ffn_hidden_size, num_experts: H, F, E.
        activation: "swiglu" | "geglu" | "geglu_tanh" | "clamped_swiglu" (gated: ``w_in``
            holds [gate | up], 2F wide) | "gelu" | "relu" | "silu".
        expert_bias: per-expert biases ``b_in`` [E, F or 2F] and ``b_out`` [E, H].
        swiglu_alpha, swiglu_limit: alpha and limit of "clamped_swiglu" (GPT-OSS: 1.702, 7.0).
        expert_parallel_group: shard the experts over the W ranks of this torch.distributed group:
            rank r holds experts [r * E / W, (r + 1) * E / W) and rows travel by all_to_all
            (see :mod:`moe_ext.distributed`); the ranks' settings are compared here (a collective).
        parallel_settings: further settings the ranks must agree on (compared in the same collective).
        device, dtype: of the parameters.

    Parameters: ``w_in`` [E, H, F or 2F], ``w_out`` [E, F, H] (and the biases), initialized like
    ``nn.Linear`` (uniform in +-1/sqrt(fan_in)); expert-parallel modules hold their
    ``num_local_experts`` experts, the same ones the single-process module gets from the same seed.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        activation: str = "swiglu",
        *,
        expert_bias: bool = False,
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
        expert_parallel_group: dist.ProcessGroup | None = None,
        parallel_settings: dict | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_expert_sizes(type(self).__name__, hidden_size, ffn_hidden_size, num_experts, activation)
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.num_experts = num_experts
        self.activation = activation
        self.swiglu_alpha = float(swiglu_alpha)
        self.swiglu_limit = float(swiglu_limit)
        factory = {"device": device, "dtype": dtype}
        settings = {"expert_bias": bool(expert_bias), "dtype": str(torch.empty((), **factory).dtype)}
        self._init_expert_parallel(expert_parallel_group, {**(parallel_settings or {}), **settings})
        local, width = self.num_local_experts, in_width(activation, ffn_hidden_size)
        self.w_in = nn.Parameter(torch.empty(local, hidden_size, width, **factory))
        self.w_out = nn.Parameter(torch.empty(local, ffn_hidden_size, hidden_size, **factory))
        self.b_in = nn.Parameter(torch.empty(local, width, **factory)) if expert_bias else None
        self.b_out = nn.Parameter(torch.empty(local, hidden_size, **factory)) if expert_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default for every expert matrix and bias: uniform in +-1/sqrt(fan_in)."""
        self.reset_expert_parameters()

    @torch.no_grad()
    def reset_expert_parameters(self) -> None:
        in_bound, out_bound = 1.0 / math.sqrt(self.hidden_size), 1.0 / math.sqrt(self.ffn_hidden_size)
        self._uniform_experts(self.w_in, in_bound)
        self._uniform_experts(self.w_out, out_bound)
        if self.b_in is not None:
            self._uniform_experts(self.b_in, in_bound)
            self._uniform_experts(self.b_out, out_bound)

    def _uniform_experts(self, param: Tensor, bound: float) -> None:
        """U(-bound, bound) init; an expert-parallel module draws every expert's block in turn and keeps its
        own, so it consumes the RNG stream as the single-process module does and holds the same experts."""
        if self.expert_parallel_group is None:
            param.uniform_(-bound, bound)
            return
        for expert in range(self.num_experts):
            block = torch.empty_like(param[0]).uniform_(-bound, bound)
            if (local := self._local_index(expert)) is not None:
                param[local].copy_(block)

    def _local_index(self, expert: int) -> int | None:
        """Index in w_in/w_out of global expert ``expert``, None when another rank holds it."""
        local = expert - self.expert_offset
        return local if 0 <= local < self.num_local_experts else None

    def _init_expert_parallel(self, group, settings: dict) -> None:
        self.expert_parallel_group = group
        self.expert_parallel_size, self.expert_parallel_rank = 1, 0
        self.num_local_experts, self.expert_offset = self.num_experts, 0
        if group is None:
            return
        owner = type(self).__name__
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                f"{owner}: expert_parallel_group needs an initialized torch.distributed (init_process_group)"
            )
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if rank < 0:
            raise ValueError(f"{owner}: this process is not a member of expert_parallel_group")
        if self.num_experts % world:
            raise ValueError(
                f"{owner}: num_experts = {self.num_experts} must be divisible by the expert_parallel_group size {world}"
            )
        sizes = {
            "hidden_size": self.hidden_size,
            "ffn_hidden_size": self.ffn_hidden_size,
            "num_experts": self.num_experts,
            "activation": self.activation,
        }
        distributed.check_same_config(group, {**sizes, **settings})
        self.expert_parallel_size, self.expert_parallel_rank = world, rank
        self.num_local_experts = self.num_experts // world
        self.expert_offset = rank * self.num_local_experts
        self.register_load_state_dict_pre_hook(_load_expert_shard)

    # ----- the computation --------------------------------------------------------------------------

    def expert_ffn(self, x_sorted: Tensor, offsets: Tensor) -> Tensor:
        """This process's experts on rows grouped by local expert (``offsets`` [num_local_experts + 1])."""
        return expert_ffn(
            x_sorted,
            offsets,
            self.w_in,
            self.w_out,
            self.b_in,
            self.b_out,
            self.activation,
            self.swiglu_alpha,
            self.swiglu_limit,
        )

    def apply_plan(
        self,
        hidden_states: Tensor,
        plan: ops.RoutingPlan,
        weights: Tensor,
        observe: Callable[[Tensor, ops.RoutingPlan], None] | None = None,
    ) -> Tensor:
        """dispatch -> experts (on their owners when expert-parallel) -> combine, for a plan over all E experts
        (``ops.make_plan`` or ``ops.expert_choice_plan``) and its weights ([T, k], or [T, E] for expert choice).
        ``observe(y_sorted, plan)`` sees the expert output rows of this process's tokens before combine."""
        return _apply_plan(
            hidden_states, plan, weights, self.expert_ffn, self.expert_parallel_group, self.num_local_experts, observe
        )

    def forward(
        self,
        hidden_states: Tensor,
        indices: Tensor,
        weights: Tensor,
        capacity: int | None = None,
        priority: Tensor | None = None,
    ) -> Tensor:
        """[T, H], [T, k] int64, [T, k] -> [T, H]; ``capacity``/``priority`` as in ``ops.make_plan``."""
        if (
            not isinstance(hidden_states, Tensor)
            or hidden_states.dim() != 2
            or hidden_states.shape[1] != self.hidden_size
        ):
            shape = tuple(hidden_states.shape) if isinstance(hidden_states, Tensor) else type(hidden_states).__name__
            raise ValueError(
                f"Experts: hidden_states must have shape [T, hidden_size = {self.hidden_size}], got {shape}"
            )
        plan = ops.make_plan(indices, self.num_experts, capacity, priority)
        return self.apply_plan(hidden_states, plan, weights)

    # ----- expert control ---------------------------------------------------------------------------

    @torch.no_grad()
    def copy_expert(self, src: int, dst: int) -> None:
        """Copies expert ``src``'s weights into slot ``dst``. Expert-parallel: a collective (every rank of
        the group calls it); the rank holding ``src`` sends its weights to the one holding ``dst``."""
        for param in [getattr(self, name) for name in EXPERT_PARAMETERS]:
            if param is None:
                continue
            if self.expert_parallel_group is None:
                param[dst].copy_(param[src])
                continue
            owner = src // self.num_local_experts
            source = self._local_index(src)
            block = param[source].clone() if source is not None else torch.empty_like(param[0])
            dist.broadcast(block, dist.get_global_rank(self.expert_parallel_group, owner), self.expert_parallel_group)
            if (target := self._local_index(dst)) is not None:
                param[target].copy_(block)

    def _parallel_repr(self) -> str:
        if self.expert_parallel_group is None:
            return ""
        last = self.expert_offset + self.num_local_experts - 1
        return f", expert_parallel={self.expert_parallel_size} (local experts {self.expert_offset}..{last})"

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, num_experts={self.num_experts}, "
            f"activation={self.activation}, bias={self.b_in is not None}{self._parallel_repr()}"
        )


def _load_expert_shard(
    module: Experts, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
) -> None:
    """load_state_dict pre-hook of expert-parallel modules: a full checkpoint (all E experts, as saved by a
    single-process module or moe_ext.distributed.full_state_dict) loads as this rank's share of it."""
    for name in EXPERT_PARAMETERS:
        key = prefix + name
        if getattr(module, name) is None or key not in state_dict:
            continue
        held = state_dict[key].shape[0] if state_dict[key].dim() else -1
        if held == module.num_experts:
            state_dict[key] = state_dict[key][module.expert_offset : module.expert_offset + module.num_local_experts]
        elif held != module.num_local_experts:
            errors.append(
                f"{key} holds {held} experts; this expert-parallel layer (num_experts = {module.num_experts} over "
                f"{module.expert_parallel_size} ranks) loads all {module.num_experts} (a full state dict, see "
                f"moe_ext.distributed.full_state_dict) or its own {module.num_local_experts}"
            )
