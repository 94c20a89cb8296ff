"""The drop-in MoE layer: router -> plan -> experts -> combine, with the shared expert, aux losses and stats."""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import ops, recompute, routing
from .aux_loss import AuxLossInjector, weighted_aux_loss
from .expert_control import ExpertControl
from .experts import Experts, check_expert_sizes
from .linear import Linear
from .ops import RoutingPlan
from .recompute import ForcedRouting
from .router import Routing, capacity, expert_choice, router_logits, routing_mask, token_choice
from .shared_expert import SharedExpert
from .stats import RoutingStats, routing_stats

__all__ = ["MoE", "Routing", "RoutingStats", "aux_loss", "set_aux_loss_scale"]


class MoE(ExpertControl, Experts):
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
        bias_update_group: the process group whose token loads drive that update:
            the loads are summed over it, so every rank of it holds the same bias.
            None = ``expert_parallel_group`` (this process's own loads without
            one). With data parallelism (DDP, FSDP, or expert parallelism inside
            data-parallel replicas), pass the group of every rank that holds the
            layer (``dist.group.WORLD``): otherwise each replica's bias follows
            its own tokens, and DDP's buffer broadcast then gives every rank
            rank 0's.
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

    Structure: ``MoE`` is a :class:`moe_ext.Experts` (the stacked expert weights and the
    dispatch -> grouped FFN -> combine computation, also usable on its own with any router)
    with, in front, the router projection ``router`` (a :class:`moe_ext.linear.Linear`, called
    as a module, so peft's LoRA and forward hooks apply to it), the routing policy of
    :mod:`moe_ext.router`, the optional ``shared_expert``, the aux losses of
    :mod:`moe_ext.aux_loss` and the statistics of :mod:`moe_ext.stats`.

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
        bias_update_group: dist.ProcessGroup | None = None,
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
        check_expert_sizes("MoE", hidden_size, ffn_hidden_size, num_experts, activation)
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"MoE: top_k must satisfy 1 <= top_k <= num_experts = {num_experts}, got {top_k!r}")
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
        if bias_update_group is not None and not isinstance(bias_update_group, dist.ProcessGroup):
            raise TypeError(
                "MoE: bias_update_group must be a torch.distributed ProcessGroup, "
                f"got {type(bias_update_group).__name__}"
            )
        if bias_update_group is not None and not bias_update_rate:
            raise ValueError("MoE: bias_update_group needs bias_update_rate (the update it synchronizes)")
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
        parallel_settings = {
            "top_k": top_k,
            "capacity_factor": capacity_factor,
            "eval_capacity_factor": capacity_factor if eval_capacity_factor == "same" else eval_capacity_factor,
            "min_capacity": min_capacity,
            "router": router,
        }
        super().__init__(
            hidden_size,
            ffn_hidden_size,
            num_experts,
            activation,
            expert_bias=expert_bias,
            swiglu_alpha=swiglu_alpha,
            swiglu_limit=swiglu_limit,
            expert_parallel_group=expert_parallel_group,
            parallel_settings=parallel_settings,
            device=device,
            dtype=dtype,
        )
        self.top_k = top_k
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
        self.eval_capacity_factor = parallel_settings["eval_capacity_factor"]
        self.router_type = router
        self.router_dtype = router_dtype
        self.router_jitter = float(router_jitter)
        self.noisy_gating = noisy_gating
        self.importance_loss_coef = float(importance_loss_coef)
        self.load_loss_coef = float(load_loss_coef)
        self.aux_loss_type = aux_loss_type
        self.random_routing = random_routing
        self.bias_update_rate = float(bias_update_rate)
        self.bias_update_group = bias_update_group
        self.seq_aux_loss_coef = float(seq_aux_loss_coef)
        self.generator = generator

        factory = {"device": device, "dtype": dtype}
        self.router = Linear(hidden_size, num_experts, bias=router_bias, **factory)
        self.noise = Linear(hidden_size, num_experts, bias=False, **factory) if noisy_gating else None
        if selection_bias:
            self.register_buffer("selection_bias", torch.zeros(num_experts, device=device, dtype=torch.float32))
        else:
            self.selection_bias = None
        self.shared_expert = (
            SharedExpert(hidden_size, shared_expert_size, activation, swiglu_alpha, swiglu_limit, **factory)
            if shared_expert_size
            else None
        )
        self.shared_expert_gate = Linear(hidden_size, 1, bias=False, **factory) if shared_expert_gate else None
        # False = expert disabled: never selected, its tokens go to their next-best experts.
        # A buffer (not a parameter, not saved): toggling it changes no shape and forces no recompile.
        self.register_buffer("expert_mask", torch.ones(num_experts, dtype=torch.bool, device=device), persistent=False)
        self.reset_parameters()
        self.aux_loss: Tensor | None = None
        self.last_stats: RoutingStats | None = None
        self.track_stats = True
        self._restriction: tuple[Tensor, Tensor] | None = None
        self._trace_sink = None  # set by moe_ext.trace_routing while a trace records
        self._replay = None  # set by moe_ext.replay_routing while a routing replays
        self._recomputed = False  # the last forward was a checkpoint recompute (not counted by ExpertUsage)
        self._health = None  # (HealthTracker, layer index) while an ExpertUsage(health=True) watches

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
        if "router" not in self._modules:
            return  # called by Experts.__init__ before the router exists; MoE.__init__ calls it once built
        self.router.reset_parameters()
        if self.router.bias is not None:
            nn.init.zeros_(self.router.bias)
        self.reset_expert_parameters()
        if self.noise is not None:
            with torch.no_grad():
                self.noise.weight.zero_()  # start noise-free: softplus(0) = ln 2 std, learned from there
        for module in (self.shared_expert, self.shared_expert_gate):
            if module is not None:
                module.reset_parameters()

    def extra_repr(self) -> str:
        capacity = "dropless" if self.capacity_factor is None else f"capacity_factor={self.capacity_factor}"
        return (
            f"hidden_size={self.hidden_size}, ffn_hidden_size={self.ffn_hidden_size}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, activation={self.activation}, {capacity}{self._parallel_repr()}"
        )

    def capacity(self, num_tokens: int) -> int | None:
        """Rows per expert for a batch of ``num_tokens`` tokens (None when dropless).

        Token choice: max(min_capacity, ceil(cf * T * k / E)); expert choice:
        max(min_capacity, ceil(cf * T / E)). The eval-mode factor applies when
        ``self.training`` is False.
        """
        factor = self.capacity_factor if self.training else self.eval_capacity_factor
        per_token = 1 if self.router_type == "expert_choice" else self.top_k
        return capacity(factor, num_tokens, per_token, self.num_experts, self.min_capacity)

    # ----- the forward ------------------------------------------------------------------------------

    def forward(self, x: Tensor, return_routing: bool = False) -> Tensor | tuple[Tensor, Routing]:
        """y [..., H]; with ``return_routing=True`` the tuple (y, :class:`Routing`)."""
        self._check_input(x)
        leading_shape = x.shape[:-1]
        tokens = x.reshape(-1, self.hidden_size)
        # Compiled graphs recompute inside the graph; replays are taken outside it (a graph break).
        compiling = torch.compiler.is_compiling()
        frame, recomputing = (None, False) if compiling else recompute.current()
        if recomputing:  # a checkpoint recompute under moe_ext.checkpoint_context: route as the first pass
            stash = recompute.take(frame, self, self._layer_name())
            forced, generator_state = stash.routing, stash.generator_state
        else:
            recomputing = False if compiling else self._check_plain_recompute()
            forced = _take_replay(self._replay, self, tokens.shape[0], leading_shape) if self._replay else None
            generator_state = None
            if frame is not None and self.generator is not None:
                generator_state = self.generator.get_state()
        with _generator_at(self.generator, generator_state if recomputing else None):
            logits = router_logits(
                self.router,
                self.noise,
                tokens,
                router_dtype=self.router_dtype,
                jitter=self.router_jitter,
                training=self.training,
                generator=self.generator,
            )
            weights, indices, scores, plan = self.route(
                logits.routed, leading_shape, forced=forced, update_bias=not recomputing
            )
        if frame is not None and not recomputing:
            recompute.store(frame, self, self._used_routing(forced, indices, plan), generator_state)
        self._recomputed = recomputing
        observe = None
        if self._health is not None and not recomputing:  # ExpertUsage(health=True): output norms per expert
            tracker, index = self._health
            observe = functools.partial(tracker.outputs, index)
        y = self.apply_plan(tokens, plan, weights, observe=observe)
        if self.shared_expert is not None:
            y = y + self._shared_expert(tokens)
        y = self._add_aux_loss(y, logits, scores, indices, weights, leading_shape)
        if not recomputing:  # statistics, usage and traces count each forward once
            self._record(plan, indices, weights, scores, leading_shape)
        y = ops.as_output(y, x.shape)  # not a view: see ops.as_output
        if return_routing:
            return y, Routing(logits.routed, weights, indices)
        return y

    def _check_input(self, x: Tensor) -> None:
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

    def route(
        self,
        logits: Tensor,
        leading_shape: torch.Size,
        forced: ForcedRouting | None = None,
        update_bias: bool = True,
    ) -> tuple[Tensor, Tensor | None, Tensor, RoutingPlan]:
        """(weights, indices, scores, plan) for router logits [T, E] under the layer's routing settings
        (token or expert choice, masks and restrictions, capacity and drop policy); in training with
        ``bias_update_rate`` (and ``update_bias``), also the aux-loss-free update of ``selection_bias``.
        ``forced``: the routing to use instead of choosing one (see :mod:`moe_ext.replay`)."""
        num_tokens = logits.shape[0]
        mask = routing_mask(self.expert_mask, self._restriction, leading_shape, num_tokens)
        rows = self.capacity(num_tokens)
        if self.router_type == "expert_choice":
            return expert_choice(logits, mask, score_func=self.score_func, capacity=rows, forced=forced)
        weights, indices, scores, plan = token_choice(
            logits,
            mask,
            num_experts=self.num_experts,
            top_k=self.top_k,
            score_func=self.score_func,
            normalize=self.normalize_weights,
            selection_bias=self.selection_bias,
            scale=self.routed_scaling_factor,
            n_group=self.n_group,
            topk_group=self.topk_group,
            capacity=rows,
            drop_policy=self.drop_policy,
            random_routing=self.random_routing,
            training=self.training,
            generator=self.generator,
            forced=forced,
        )
        if self.bias_update_rate and self.training and update_bias:
            counts = plan.counts
            group = self.bias_update_group if self.bias_update_group is not None else self.expert_parallel_group
            if group is not None:
                # The bias is replicated: update it from the loads of the whole group, the same on every rank.
                counts = counts.clone()
                dist.all_reduce(counts, group=group)
            routing.balance_bias_update(self.selection_bias, counts, self.bias_update_rate)
        return weights, indices, scores, plan

    # ----- replay and checkpoint recompute ----------------------------------------------------------

    def _layer_name(self) -> str:
        return getattr(self, "_trace_name", None) or f"layer {self.__class__.__name__}(E={self.num_experts})"

    def _draws_randomness(self) -> bool:
        """True when a training forward draws random numbers (jitter, noise, random routing or drops)."""
        dropping = self.capacity_factor is not None
        return bool(
            self.router_jitter > 0
            or self.noisy_gating
            or (dropping and (self.random_routing or self.drop_policy == "random"))
        )

    def _check_plain_recompute(self) -> bool:
        """True for a forward that autograd's engine runs (a recompute of a plain activation checkpoint);
        raises where that recompute would route otherwise than the first pass."""
        if not (recompute.in_backward() and self.training and torch.is_grad_enabled()):
            return False
        reasons = []
        if self.generator is not None and self._draws_randomness():
            reasons.append("draws from its own generator, which the checkpoint does not restore")
        if self.bias_update_rate:
            reasons.append("updated its selection_bias in the first pass")
        if self._replay is not None:
            reasons.append("replays a routing, and a plain recompute cannot tell which forward it repeats")
        if reasons:
            raise RuntimeError(
                f"MoE {self._layer_name()} runs inside backward (an activation-checkpoint recompute) and "
                f"{'; '.join(reasons)}: its recompute would route otherwise than its first pass. Checkpoint "
                "with torch.utils.checkpoint.checkpoint(..., use_reentrant=False, "
                "context_fn=moe_ext.checkpoint_context) (transformers: activation_checkpointing_kwargs="
                '{"use_reentrant": False, "context_fn": moe_ext.checkpoint_context})'
            )
        return True

    def _used_routing(self, forced: ForcedRouting | None, indices: Tensor | None, plan: RoutingPlan) -> ForcedRouting:
        """The routing this forward used, for its checkpoint recompute."""
        if indices is None:  # expert choice
            return ForcedRouting(_expert_choice_indices(plan.row_of), forced.weights if forced else None)
        dropped = plan.row_of < 0 if self.capacity(plan.row_of.shape[0]) is not None else None
        return ForcedRouting(indices, forced.weights if forced else None, dropped)

    def _shared_expert(self, tokens: Tensor) -> Tensor:
        shared = self.shared_expert(tokens)
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
        return shared

    def _add_aux_loss(self, y: Tensor, logits, scores, indices, weights, leading_shape) -> Tensor:
        """Stores the weighted aux loss in ``self.aux_loss``; in auto mode the output also carries its gradient."""
        aux = weighted_aux_loss(
            logits.routed,
            scores,
            indices,
            weights,
            balance=self.aux_loss_coef,
            balance_type=self.aux_loss_type,
            z=self.z_loss_coef,
            importance=self.importance_loss_coef,
            load=self.load_loss_coef,
            sequence=self.seq_aux_loss_coef,
            clean_logits=logits.clean,
            noise_std=logits.noise_std,
            top_k=self.top_k,
            leading_shape=leading_shape,
            training=self.training,
        )
        if self.aux_loss_mode == "auto":
            if self.training and torch.is_grad_enabled() and aux.requires_grad:
                y = AuxLossInjector.apply(y, aux, self.aux_loss_scale)
            aux = aux.detach()
        self.aux_loss = aux
        return y

    def _record(self, plan, indices, weights, scores, leading_shape) -> None:
        """``last_stats`` and, while a trace records, the trace."""
        if self.track_stats:
            # Rows an expert filled: exact under any drop rule (capacity overflow or -inf priority).
            kept, rows = None, self.capacity(plan.row_of.shape[0])
            if rows is not None:
                kept = (plan.token_of.reshape(self.num_experts, rows) >= 0).sum(-1)
            self.last_stats = routing_stats(plan.counts, kept, scores.detach())
        if self._health is not None:
            tracker, index = self._health
            tracker.routing(index, indices, weights, plan)
        if self._trace_sink is not None:
            traced = indices if indices is not None else _expert_choice_indices(plan.row_of)
            self._trace_sink.record(self, traced, weights.detach(), plan.row_of, leading_shape)


@torch.compiler.disable
def _take_replay(replay, layer: MoE, num_tokens: int, leading_shape: torch.Size) -> ForcedRouting:
    return replay.take(layer, num_tokens, leading_shape)


@contextlib.contextmanager
def _generator_at(generator: torch.Generator | None, state: Tensor | None):
    """Runs the block with ``generator`` in ``state`` (None: as it is), then puts its own state back."""
    if generator is None or state is None:
        yield
        return
    saved = generator.get_state()
    generator.set_state(state)
    try:
        yield
    finally:
        generator.set_state(saved)


def _expert_choice_indices(row_of: Tensor) -> Tensor:
    """[T, E] expert ids for a trace of expert-choice routing (-1 where the expert did not take the token)."""
    experts = torch.arange(row_of.shape[1], device=row_of.device).expand_as(row_of)
    return torch.where(row_of >= 0, experts, torch.full_like(experts, -1))


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
