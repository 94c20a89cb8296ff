"""The drop-in MoE layer: router, stacked experts, and aux losses wired through the moe_ext operators."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops, routing

__all__ = ["MoE", "Routing", "RoutingStats", "aux_loss", "set_aux_loss_scale"]

_GATED = {
    "swiglu": F.silu,
    "geglu": F.gelu,
    "geglu_tanh": lambda t: F.gelu(t, approximate="tanh"),
    "clamped_swiglu": None,
}  # clamped_swiglu: see _activate
_PLAIN = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}


# The per-expert tensors of a layer ([E, ...], or [E / W, ...] when expert-parallel).
EXPERT_PARAMETERS = ("w_in", "w_out", "b_in", "b_out")


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
        return {name: (value.tolist() if value.dim() else value.item()) for name, value in self._asdict().items()}


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
        activation: "swiglu" | "geglu" | "geglu_tanh" (tanh-approximate GELU, as Grok-1)
            (gated: w_in holds [gate | up], 2F wide)
            | "gelu" | "relu" | "silu" | "clamped_swiglu" (GPT-OSS, gated:
            g = min(gate, limit), u = clamp(up, -limit, limit),
            out = (u + 1) * g * sigmoid(alpha * g); see swiglu_alpha, swiglu_limit).
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
        drop_policy: which assignments a full expert keeps (capacity mode):
            "position" (first choices before second choices, then token order;
            Switch/GShard), "probs" (highest routing weight first), "bpr"
            (batch-prioritized routing, V-MoE), "random" (random token
            selection, DeepSpeed use_rts).
        min_capacity: lower bound of C in capacity mode.
        eval_capacity_factor: capacity factor in eval mode ("same" = capacity_factor;
            Switch evaluates at 2.0).
        routed_scaling_factor: multiplies the routing weights (DeepSeek-V3).
        n_group, topk_group: group-limited routing (DeepSeek-V3); 1, 1 = off.
        router: "token_choice" (each token picks top_k experts) or "expert_choice"
            (Zhou et al. 2022: each expert picks its C = ceil(capacity_factor * T / E)
            best tokens by softmax score; a token gets 0..E experts; top_k unused).
        router_dtype: dtype of the router matmul and logits (torch.float32 = the
            Switch "fp32 router" under bf16 training); None = the input dtype.
        router_jitter: Switch's multiplicative jitter: in training the router
            input is multiplied by U(1 - eps, 1 + eps) noise (0 = off).
        noisy_gating: Shazeer et al. 2017 noisy top-k: in training the logits get
            N(0, 1) * softplus(x @ noise.weight^T) noise (``noise`` is a learned
            ``nn.Linear(H, E)``, zero-initialized).
        importance_loss_coef, load_loss_coef: Shazeer's CV(importance)^2 and
            CV(smooth load)^2 losses (noisy_gating only for the load loss).
        aux_loss_type: "switch" (count every one of the k choices; transformers'
            formula) or "gshard" (count first choices only, as GShard's l_aux).
        random_routing: GShard's random routing of the second expert (top_k = 2,
            capacity mode): kept only if 2 * g2 / (g1 + g2) > U[0, 1).
        selection_bias: a buffer ``selection_bias`` [E] added to the scores for
            selection only (DeepSeek-V3 e_score_correction_bias).
        bias_update_rate: aux-loss-free balancing (DeepSeek-V3): after each
            training forward, selection_bias += rate * sign(mean load - load_e),
            outside autograd. Needs selection_bias=True.
        seq_aux_loss_coef: weight of DeepSeek-V3's sequence-wise balance loss
            (sequences = the input's second-to-last dim).
        shared_expert_size: F of an always-on dense shared expert (0 = none);
            it uses the layer's activation.
        shared_expert_gate: scale the shared expert by sigmoid(x @ w) (Qwen2-MoE).
        expert_bias: per-expert biases ``b_in`` [E, F or 2F] and ``b_out`` [E, H].
        router_bias: give the router a bias ``router.bias`` [E] (GPT-OSS): the logits
            are x @ router.weight^T + router.bias, so the bias moves both the
            selection and the weights (unlike selection_bias). Zero-initialized.
        swiglu_alpha, swiglu_limit: alpha and limit of activation="clamped_swiglu"
            (GPT-OSS: 1.702, 7.0); unused by the other activations.
        generator: torch.Generator for jitter, noise, random routing and random
            drops (None = the global RNG, seeded by torch.manual_seed).
        expert_parallel_group: a torch.distributed process group of W ranks over
            which the experts are sharded (expert parallelism): each rank holds
            experts [r * E / W, (r + 1) * E / W), routes its own tokens and
            exchanges rows with the owners by all_to_all (see
            :mod:`moe_ext.distributed`). E must be divisible by W; the ranks'
            settings are compared at construction (a collective). None = every
            expert on this process.
        device, dtype: where and in which dtype to create the parameters.

    Parameters: ``router.weight`` [E, H] (as ``nn.Linear(H, E)``), ``w_in``
    [E, H, F or 2F] and ``w_out`` [E, F, H], initialized like ``nn.Linear``
    (uniform in +-1/sqrt(fan_in)). Expert-parallel layers hold their
    ``num_local_experts`` = E / W experts in ``w_in``/``w_out``; on CPU they hold
    exactly the experts [r * E / W, (r + 1) * E / W) that the single-process layer
    would get from the same seed.

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
        eval_capacity_factor: float | None | str = "same",
        routed_scaling_factor: float = 1.0,
        n_group: int = 1,
        topk_group: int = 1,
        router: str = "token_choice",
        router_dtype: torch.dtype | None = None,
        router_jitter: float = 0.0,
        noisy_gating: bool = False,
        importance_loss_coef: float = 0.0,
        load_loss_coef: float = 0.0,
        aux_loss_type: str = "switch",
        random_routing: bool = False,
        selection_bias: bool = False,
        bias_update_rate: float = 0.0,
        seq_aux_loss_coef: float = 0.0,
        shared_expert_size: int = 0,
        shared_expert_gate: bool = False,
        expert_bias: bool = False,
        router_bias: bool = False,
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
        generator: torch.Generator | None = None,
        expert_parallel_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("hidden_size", hidden_size),
            ("ffn_hidden_size", ffn_hidden_size),
            ("num_experts", num_experts),
        ):
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
        if drop_policy not in ("position", "probs", "bpr", "random"):
            raise ValueError(f"MoE: drop_policy must be 'position', 'probs', 'bpr' or 'random', got {drop_policy!r}")
        if router not in ("token_choice", "expert_choice"):
            raise ValueError(f"MoE: router must be 'token_choice' or 'expert_choice', got {router!r}")
        if router == "expert_choice" and capacity_factor is None:
            raise ValueError("MoE: router='expert_choice' needs a capacity_factor (tokens per expert = cf * T / E)")
        if aux_loss_type not in ("switch", "gshard"):
            raise ValueError(f"MoE: aux_loss_type must be 'switch' or 'gshard', got {aux_loss_type!r}")
        if random_routing and (top_k != 2 or capacity_factor is None):
            raise ValueError("MoE: random_routing (GShard) needs top_k=2 and a capacity_factor")
        if bias_update_rate and not selection_bias:
            raise ValueError("MoE: bias_update_rate needs selection_bias=True")
        if not 0.0 <= router_jitter < 1.0:
            raise ValueError(f"MoE: router_jitter must be in [0, 1), got {router_jitter!r}")
        if load_loss_coef and not noisy_gating:
            raise ValueError("MoE: load_loss_coef (Shazeer's smooth load loss) needs noisy_gating=True")
        if not isinstance(shared_expert_size, int) or shared_expert_size < 0:
            raise ValueError(f"MoE: shared_expert_size must be an int >= 0, got {shared_expert_size!r}")
        if shared_expert_gate and not shared_expert_size:
            raise ValueError("MoE: shared_expert_gate needs shared_expert_size > 0")
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
        self.eval_capacity_factor = capacity_factor if eval_capacity_factor == "same" else eval_capacity_factor
        self.router_type = router
        self.router_dtype = router_dtype
        self.router_jitter = float(router_jitter)
        self.noisy_gating = noisy_gating
        self.importance_loss_coef = float(importance_loss_coef)
        self.load_loss_coef = float(load_loss_coef)
        self.aux_loss_type = aux_loss_type
        self.random_routing = random_routing
        self.bias_update_rate = float(bias_update_rate)
        self.seq_aux_loss_coef = float(seq_aux_loss_coef)
        self.generator = generator
        self.swiglu_alpha = float(swiglu_alpha)
        self.swiglu_limit = float(swiglu_limit)

        factory = {"device": device, "dtype": dtype}
        self._init_expert_parallel(expert_parallel_group, expert_bias, torch.empty((), **factory).dtype)
        local = self.num_local_experts
        in_width = 2 * ffn_hidden_size if activation in _GATED else ffn_hidden_size
        self.router = nn.Linear(hidden_size, num_experts, bias=router_bias, **factory)
        self.w_in = nn.Parameter(torch.empty(local, hidden_size, in_width, **factory))
        self.w_out = nn.Parameter(torch.empty(local, ffn_hidden_size, hidden_size, **factory))
        self.b_in = nn.Parameter(torch.empty(local, in_width, **factory)) if expert_bias else None
        self.b_out = nn.Parameter(torch.empty(local, hidden_size, **factory)) if expert_bias else None
        self.noise = nn.Linear(hidden_size, num_experts, bias=False, **factory) if noisy_gating else None
        if selection_bias:
            self.register_buffer("selection_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
        else:
            self.selection_bias = None
        self.shared_expert = (
            _DenseFFN(hidden_size, shared_expert_size, activation, swiglu_alpha, swiglu_limit, **factory)
            if shared_expert_size
            else None
        )
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False, **factory) if shared_expert_gate else None
        # False = expert disabled: never selected, its tokens go to their next-best experts.
        # A buffer (not a parameter, not saved): toggling it changes no shape and forces no recompile.
        self.register_buffer("expert_mask", torch.ones(num_experts, dtype=torch.bool, device=device), persistent=False)
        self.reset_parameters()
        self.aux_loss: Tensor | None = None
        self.last_stats: RoutingStats | None = None
        self.track_stats = True
        self._restriction: tuple[Tensor, Tensor] | None = None
        self._trace_sink = None  # set by moe_ext.trace_routing while a trace records

    @classmethod
    def from_preset(cls, name: str, hidden_size: int, ffn_hidden_size: int, **overrides) -> MoE:
        """A layer configured as a published system: switch, gshard, shazeer, mixtral, grok1,
        qwen3_moe, olmoe, deepseek_v3, expert_choice (see moe_ext.presets.PRESETS for the
        settings and their sources). ``num_experts`` defaults to the system's own where it
        has one (8 otherwise); any keyword overrides the preset."""
        from .presets import PRESETS

        if name not in PRESETS:
            raise ValueError(f"MoE.from_preset: unknown preset {name!r}; choose from {sorted(PRESETS)}")
        preset = PRESETS[name]
        kwargs = {"num_experts": 8, **preset.settings}
        if preset.shared_expert_multiple:
            kwargs["shared_expert_size"] = preset.shared_expert_multiple * ffn_hidden_size
        kwargs.update(overrides)
        return cls(hidden_size, ffn_hidden_size, **kwargs)

    def reset_parameters(self) -> None:
        """nn.Linear's default: uniform in +-1/sqrt(fan_in) for the router and every expert matrix.

        A router bias (router_bias=True) starts at zero."""
        self.router.reset_parameters()
        if self.router.bias is not None:
            nn.init.zeros_(self.router.bias)
        with torch.no_grad():
            in_bound, out_bound = 1.0 / math.sqrt(self.hidden_size), 1.0 / math.sqrt(self.ffn_hidden_size)
            self._uniform_experts(self.w_in, in_bound)
            self._uniform_experts(self.w_out, out_bound)
            if self.b_in is not None:
                self._uniform_experts(self.b_in, in_bound)
                self._uniform_experts(self.b_out, out_bound)
            if self.noise is not None:
                self.noise.weight.zero_()  # start noise-free: softplus(0) = ln 2 std, learned from there
        for module in (self.shared_expert, self.shared_expert_gate):
            if module is not None:
                module.reset_parameters()

    def _uniform_experts(self, param: Tensor, bound: float) -> None:
        """U(-bound, bound) init; an expert-parallel layer draws every expert's block in turn and keeps its
        own, so it consumes the RNG stream as the single-process layer does and holds the same experts."""
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

    # ----- expert parallelism -----------------------------------------------------------------------

    def _init_expert_parallel(self, group, expert_bias: bool, dtype: torch.dtype) -> None:
        self.expert_parallel_group = group
        self.expert_parallel_size, self.expert_parallel_rank = 1, 0
        self.num_local_experts, self.expert_offset = self.num_experts, 0
        if group is None:
            return
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("MoE: expert_parallel_group needs an initialized torch.distributed (init_process_group)")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        if rank < 0:
            raise ValueError("MoE: this process is not a member of expert_parallel_group")
        if self.num_experts % world:
            raise ValueError(
                f"MoE: num_experts = {self.num_experts} must be divisible by the expert_parallel_group size {world}"
            )
        from .distributed import check_same_config

        check_same_config(
            group,
            {
                "hidden_size": self.hidden_size,
                "ffn_hidden_size": self.ffn_hidden_size,
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "activation": self.activation,
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "min_capacity": self.min_capacity,
                "router": self.router_type,
                "expert_bias": bool(expert_bias),
                "dtype": str(dtype),
            },
        )
        self.expert_parallel_size, self.expert_parallel_rank = world, rank
        self.num_local_experts = self.num_experts // world
        self.expert_offset = rank * self.num_local_experts
        self.register_load_state_dict_pre_hook(_load_expert_shard)

    def _run_experts(self, x_sorted: Tensor, offsets: Tensor) -> Tensor:
        if self.expert_parallel_group is None:
            return self._expert_ffn(x_sorted, offsets)
        from .distributed import run_experts

        return run_experts(self, x_sorted, offsets)

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
            raise ValueError(f"MoE.restrict_experts: fewer than top_k = {self.top_k} allowed experts are enabled")
        self._restriction = (token_mask.to(self.expert_mask.device), allowed_mask)
        return _Restriction(self)

    def clear_restriction(self) -> None:
        self._restriction = None

    @torch.no_grad()
    def clone_expert(self, src: int, dst: int, copy_router: bool = False) -> None:
        """Copies expert ``src``'s weights into slot ``dst`` (a redundant replica).

        With ``copy_router=True`` the router row is copied too, so ``dst`` scores
        exactly like ``src``: disable ``src`` and its tokens move to the replica.
        Expert-parallel layers: a collective (every rank of the group calls it);
        the rank holding ``src`` sends its weights to the one holding ``dst``.
        """
        src, dst = self._expert_ids([src, dst], "clone_expert")
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
        if copy_router:
            self.router.weight[dst].copy_(self.router.weight[src])
            if self.router.bias is not None:
                self.router.bias[dst].copy_(self.router.bias[src])

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
        parallel = ""
        if self.expert_parallel_group is not None:
            last = self.expert_offset + self.num_local_experts - 1
            parallel = f", expert_parallel={self.expert_parallel_size} (local experts {self.expert_offset}..{last})"
        return (
            f"hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, activation={self.activation}, {capacity}{parallel}"
        )

    def capacity(self, num_tokens: int) -> int | None:
        """Rows per expert for a batch of ``num_tokens`` tokens (None when dropless).

        Token choice: max(min_capacity, ceil(cf * T * k / E)); expert choice:
        max(min_capacity, ceil(cf * T / E)). The eval-mode factor applies when
        ``self.training`` is False.
        """
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        if factor is None:
            return None
        per_token = 1 if self.router_type == "expert_choice" else self.top_k
        # The (1 - 1e-12) keeps float rounding from bumping an exact quotient (1.1 * 10 / 11) up by one.
        wanted = math.ceil(factor * num_tokens * per_token / self.num_experts * (1 - 1e-12))
        return max(self.min_capacity, wanted)

    def _expert_ffn(self, x_sorted: Tensor, offsets: Tensor) -> Tensor:
        h = ops.grouped_mm(x_sorted, self.w_in, offsets)
        expert_of_row = None
        if self.b_in is not None:
            # [N] expert of every row, from the plan's offsets (no host sync: output_size is N).
            expert_of_row = torch.repeat_interleave(
                torch.arange(offsets.shape[0] - 1, device=offsets.device), offsets.diff(), output_size=h.shape[0]
            )
            # index_select, not indexing: its backward (index_add_) sums rows in a fixed order, while
            # indexing's (index_put_ with accumulate) gives other bits at another thread count.
            h = h + self.b_in.index_select(0, expert_of_row)
        h = _activate(self.activation, h, self.swiglu_alpha, self.swiglu_limit)
        y = ops.grouped_mm(h, self.w_out, offsets)
        if expert_of_row is not None:
            y = y + self.b_out.index_select(0, expert_of_row)
        return y

    def _router_logits(self, tokens: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(logits used for routing, clean logits, noise std); the last two only with noisy gating."""
        if self.router_dtype is None:
            return self._router_logits_in(tokens, self.router.weight, self.router.bias)
        # "at least" router_dtype: an fp32 router upcasts bf16 but never downcasts a float64 layer, and
        # autocast does not take it back down (the point of Switch's fp32 router under bf16 training).
        dtype = torch.promote_types(self.router_dtype, tokens.dtype)
        bias = self.router.bias
        with torch.autocast(tokens.device.type, enabled=False):
            return self._router_logits_in(
                tokens.to(dtype), self.router.weight.to(dtype), None if bias is None else bias.to(dtype)
            )

    def _router_logits_in(self, router_input: Tensor, weight: Tensor, bias: Tensor | None):
        # ops.linear, not F.linear: its weight gradient does not depend on the thread count (see ops.linear).
        if self.training and self.router_jitter > 0:
            noise = torch.empty_like(router_input).uniform_(
                1.0 - self.router_jitter, 1.0 + self.router_jitter, generator=self.generator
            )
            router_input = router_input * noise
        logits = ops.linear(router_input, weight, bias)
        if self.noise is None:
            return logits, None, None
        noise_std = F.softplus(ops.linear(router_input, self.noise.weight.to(weight.dtype)))
        if not self.training:
            return logits, logits, noise_std
        sample = torch.randn(logits.shape, generator=self.generator, device=logits.device, dtype=logits.dtype)
        return logits + sample * noise_std, logits, noise_std

    def forward(self, x: Tensor, return_routing: bool = False) -> Tensor | tuple[Tensor, Routing]:
        """y [..., H]; with ``return_routing=True`` the tuple (y, :class:`Routing`)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"MoE: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"MoE: x must have shape [..., hidden_size = {self.hidden_size}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"MoE: x must be a floating-point tensor, got {x.dtype}")
        if x.device != self.w_in.device:
            raise ValueError(
                f"MoE: x is on {x.device} but the layer's parameters are on {self.w_in.device}; "
                f"move one of them (for example layer.to({str(x.device)!r}))"
            )
        if x.dtype != self.w_in.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"MoE: x is {x.dtype} but the layer's parameters are {self.w_in.dtype}; "
                f"convert one of them (for example layer.to({x.dtype}))"
            )
        shape = x.shape
        tokens = x.reshape(-1, self.hidden_size)
        logits, clean_logits, noise_std = self._router_logits(tokens)
        capacity = self.capacity(tokens.shape[0])
        mask = self._routing_mask(shape[:-1], tokens.shape[0])
        if self.router_type == "expert_choice":
            # Scores are the per-token softmax; each expert then picks its best tokens.
            _, _, scores = ops.topk_gating(logits, 1, self.score_func, False, None, 1.0, 1, 1, mask)
            plan = ops.expert_choice_plan(scores.detach(), capacity)
            weights = torch.where(plan.row_of >= 0, scores, torch.zeros_like(scores))
            indices = None
        else:
            weights, indices, scores = ops.topk_gating(
                logits,
                self.top_k,
                self.score_func,
                self.normalize_weights,
                self.selection_bias,
                self.routed_scaling_factor,
                self.n_group,
                self.topk_group,
                mask,
            )
            priority = None
            if capacity is not None:
                # Random token selection is a training regularizer: evaluation keeps the position order.
                policy = "position" if self.drop_policy == "random" and not self.training else self.drop_policy
                priority = routing.drop_priority(policy, weights, self.generator)
                if self.random_routing and self.training:
                    if priority is None:
                        priority = torch.zeros_like(weights)
                    drop = routing.gshard_second_expert_drop(weights, self.generator)
                    priority = priority.masked_fill(drop, float("-inf"))
            plan = ops.make_plan(indices, self.num_experts, capacity, priority)
            if self.bias_update_rate and self.training:
                counts = plan.counts
                if self.expert_parallel_group is not None:
                    # The bias is replicated: update it from the loads of the whole group, the same on every rank.
                    counts = counts.clone()
                    dist.all_reduce(counts, group=self.expert_parallel_group)
                routing.balance_bias_update(self.selection_bias, counts, self.bias_update_rate)
        y_sorted = self._run_experts(ops.dispatch(tokens, plan), plan.offsets)
        y = ops.combine(y_sorted, weights, plan)
        if self.shared_expert is not None:
            shared = self.shared_expert(tokens)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(ops.linear(tokens, self.shared_expert_gate.weight)) * shared
            y = y + shared

        aux = self._aux_loss(logits, scores, indices, weights, clean_logits, noise_std, shape[:-1])
        if self.aux_loss_mode == "auto":
            if self.training and torch.is_grad_enabled() and aux.requires_grad:
                y = _AuxLossInjector.apply(y, aux, self.aux_loss_scale)
            aux = aux.detach()
        self.aux_loss = aux
        if self.track_stats:
            # Rows an expert filled: exact under any drop rule (capacity overflow or -inf priority).
            kept = None
            if capacity is not None:
                kept = (plan.token_of.reshape(self.num_experts, capacity) >= 0).sum(-1)
            self.last_stats = _routing_stats(plan.counts, kept, scores.detach())
        if self._trace_sink is not None:
            traced = indices if indices is not None else _expert_choice_indices(plan.row_of)
            self._trace_sink.record(self, traced, weights.detach(), plan.row_of, shape[:-1])
        if return_routing:
            return y.reshape(shape), Routing(logits, weights, indices)
        return y.reshape(shape)

    def _aux_loss(self, logits, scores, indices, weights, clean_logits, noise_std, leading_shape) -> Tensor:
        aux = scores.new_zeros(())
        if self.aux_loss_coef != 0.0 and indices is not None:
            counted = indices[:, :1] if self.aux_loss_type == "gshard" else indices
            aux = aux + self.aux_loss_coef * ops.load_balancing_loss(scores, counted, self.num_experts)
        if self.z_loss_coef != 0.0:
            aux = aux + self.z_loss_coef * ops.router_z_loss(logits)
        if self.importance_loss_coef != 0.0:
            gates = weights if indices is None else torch.zeros_like(scores).scatter(1, indices, weights)
            aux = aux + self.importance_loss_coef * routing.cv_squared(gates.sum(0))
        if self.load_loss_coef != 0.0 and self.training:
            dtype = torch.promote_types(logits.dtype, torch.float32)
            load = routing.noisy_topk_load(clean_logits.to(dtype), logits.to(dtype), noise_std.to(dtype), self.top_k)
            aux = aux + self.load_loss_coef * routing.cv_squared(load)
        if self.seq_aux_loss_coef != 0.0 and indices is not None:
            aux = aux + self.seq_aux_loss_coef * routing.sequence_aux_loss(
                scores, indices, self.num_experts, leading_shape
            )
        return aux


def _activate(activation: str, h: Tensor, alpha: float = 1.702, limit: float = 7.0) -> Tensor:
    if activation == "clamped_swiglu":
        # GPT-OSS: both halves clamped (the gate from above only), sigmoid sharpened by alpha, up offset by 1.
        gate, up = h.chunk(2, dim=-1)
        gate = gate.clamp(min=None, max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    if activation == "swiglu":
        # One fused op (a single pass each way) instead of chunk + silu + mul and their autograd.
        return ops.swiglu(h.reshape(-1, h.shape[-1])).reshape(*h.shape[:-1], h.shape[-1] // 2)
    if activation in _GATED:
        gate, up = h.chunk(2, dim=-1)
        return _GATED[activation](gate) * up
    return _PLAIN[activation](h)


class _DenseFFN(nn.Module):
    """An always-on dense expert (shared expert): w_in [H, F or 2F], w_out [F, H], same activation."""

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
        in_width = 2 * ffn_hidden_size if activation in _GATED else ffn_hidden_size
        self.activation = activation
        self.w_in = nn.Linear(hidden_size, in_width, bias=False, device=device, dtype=dtype)
        self.w_out = nn.Linear(ffn_hidden_size, hidden_size, bias=False, device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        self.w_in.reset_parameters()
        self.w_out.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        h = _activate(self.activation, ops.linear(x, self.w_in.weight), self.swiglu_alpha, self.swiglu_limit)
        return ops.linear(h, self.w_out.weight)


def _load_expert_shard(module: MoE, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
    """load_state_dict pre-hook of expert-parallel layers: a full checkpoint (all E experts, as saved by a
    single-process layer or moe_ext.distributed.full_state_dict) loads as this rank's share of it."""
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


def _expert_choice_indices(row_of: Tensor) -> Tensor:
    """[T, E] expert ids for a trace of expert-choice routing (-1 where the expert did not take the token)."""
    experts = torch.arange(row_of.shape[1], device=row_of.device).expand_as(row_of)
    return torch.where(row_of >= 0, experts, torch.full_like(experts, -1))


class _Restriction:
    """Handle returned by MoE.restrict_experts; leaving its `with` block clears the restriction."""

    def __init__(self, layer: MoE) -> None:
        self.layer = layer

    def __enter__(self) -> _Restriction:
        return self

    def __exit__(self, *exc) -> None:
        self.layer.clear_restriction()


def _fixed_order_mean(values: Tensor, block: int = 4096) -> Tensor:
    """Mean of a 1-D tensor, summed in an order no thread count changes: ATen's reduction of a whole
    tensor of 32768 elements or more splits it between threads (one partial sum per thread); the sum of
    each fixed block of rows and then of the block sums does not."""
    n = values.shape[0]
    blocks = F.pad(values, (0, (-n) % block)).reshape(-1, block)
    return blocks.sum(1).sum() / n


@torch.no_grad()
def _routing_stats(counts: Tensor, kept: Tensor | None, scores: Tensor) -> RoutingStats:
    kept = counts if kept is None else kept
    load = counts.to(scores.dtype)
    mean = load.mean()
    safe_mean = mean.clamp(min=torch.finfo(load.dtype).tiny)
    imbalance = torch.where(mean > 0, load.max() / safe_mean, torch.ones_like(mean))
    cv = torch.where(mean > 0, load.std(correction=0) / safe_mean, torch.zeros_like(mean))
    if scores.shape[0] > 0:
        p = scores / scores.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)
        entropy = _fixed_order_mean(torch.special.entr(p).sum(dim=-1))
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
