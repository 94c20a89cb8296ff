"""moe_ext as a transformers experts implementation: ``experts_implementation="moe_ext"`` for every experts class.

transformers 5 decorates the experts module of each MoE model with ``use_experts_implementation``
and looks its forward up by name in ``ALL_EXPERTS_FUNCTIONS``. :func:`register_experts_implementation`
(run when ``moe_ext.integrations.transformers`` is imported) adds ``"moe_ext"`` there::

    import moe_ext.integrations.transformers  # registers "moe_ext"

    model = AutoModelForCausalLM.from_pretrained(path, experts_implementation="moe_ext")
    model.set_experts_implementation("moe_ext")  # or switch a loaded model

The model's router, shared experts and weights stay as they are; its experts module runs
dispatch -> grouped matmul -> activation -> grouped matmul -> combine on moe_ext's operators.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..experts import expert_ffn

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "ExpertsLayout",
    "decorated_experts_classes",
    "experts_forward",
    "experts_layout",
    "is_default_gate",
    "register_experts_implementation",
]

EXPERTS_IMPLEMENTATION = "moe_ext"

# Experts classes whose eager forward runs every matmul in float32 whatever the weights' dtype.
_FLOAT32_EXPERTS = frozenset({"OpenAIPrivacyFilterExperts"})

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ExpertsLayout:
    """How one experts module stores its weights and what it computes between the two matmuls."""

    w_in: Tensor  # [E, H, in width]: gate_up_proj (its own column order) or up_proj (has_gate=False)
    w_out: Tensor  # [E, F, H]
    b_in: Tensor | None
    b_out: Tensor | None
    activation: str | Callable[[Tensor], Tensor]  # "swiglu" (moe_ext's fused op) or the module's own gate
    post_norm: nn.Module | None  # applied to each expert output row before the routing weight
    float32: bool  # the eager forward computes in float32


def _fail(module: nn.Module, why: str) -> ValueError:
    return ValueError(f'experts_implementation="moe_ext": cannot serve {type(module).__name__}: {why}')


def is_default_gate(module: nn.Module) -> bool:
    """Whether an experts module gates with transformers' default ``act_fn(gate) * up``."""
    from transformers.integrations.moe import _default_apply_gate

    return getattr(module._apply_gate, "__func__", None) is _default_apply_gate


def _is_silu(act: object) -> bool:
    from transformers.activations import SiLUActivation

    return act is nn.functional.silu or type(act) in (nn.SiLU, SiLUActivation)


def _activation(module: nn.Module) -> str | Callable[[Tensor], Tensor]:
    """moe_ext's fused SwiGLU where the module's gate is exactly silu(gate) * up on [gate | up] columns,
    otherwise the module's own function (its ``_apply_gate``, or ``act_fn`` when it has no gate)."""
    if not module.has_gate:
        if not callable(getattr(module, "act_fn", None)):
            raise _fail(module, "has_gate=False but no act_fn")
        return module.act_fn
    if not callable(getattr(module, "_apply_gate", None)):
        raise _fail(module, "it has no _apply_gate")
    if is_default_gate(module) and _is_silu(getattr(module, "act_fn", None)):
        return "swiglu"
    return module._apply_gate


def _weight(module: nn.Module, name: str, rank: int) -> Tensor:
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        raise _fail(module, f"it has no tensor {name}")
    if weight.dim() != rank or weight.shape[0] != module.num_experts:
        raise _fail(
            module,
            f"{name} has shape {tuple(weight.shape)}, expected {rank} dims led by num_experts = {module.num_experts}",
        )
    if weight.dtype not in _FLOAT_DTYPES:
        raise _fail(module, f"{name} is {weight.dtype}; moe_ext's grouped_mm takes float32/64, bfloat16, float16")
    return weight


def experts_layout(module: nn.Module) -> ExpertsLayout:
    """The weights of a ``use_experts_implementation`` experts module in moe_ext's layout ([E, in, out] views,
    no copy) and its activation; ValueError naming the class when moe_ext cannot run it."""
    flags = ("num_experts", "has_gate", "has_bias", "is_transposed")
    missing = [flag for flag in flags if not hasattr(module, flag)]
    if missing:
        raise _fail(module, f"it lacks {missing} (not a use_experts_implementation experts class?)")
    stem = "gate_up_proj" if module.has_gate else "up_proj"
    w_in, w_out = _weight(module, stem, 3), _weight(module, "down_proj", 3)
    if not module.is_transposed:  # stored [E, out, in], as nn.Linear
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    b_in = _weight(module, f"{stem}_bias", 2) if module.has_bias else None
    b_out = _weight(module, "down_proj_bias", 2) if module.has_bias else None
    post_norm = None
    if getattr(module, "has_post_expert_norm", False):
        post_norm = getattr(module, "post_expert_norm", None)
        if not callable(post_norm):
            raise _fail(module, "has_post_expert_norm=True but no post_expert_norm")
    return ExpertsLayout(
        w_in, w_out, b_in, b_out, _activation(module), post_norm, type(module).__name__ in _FLOAT32_EXPERTS
    )


def _plan_without_sentinels(indices: Tensor, num_experts: int) -> ops.RoutingPlan:
    """make_plan for indices that may hold sentinels >= num_experts (expert parallelism: a token's expert lives
    on another rank). A sentinel assignment becomes a dropped one (row_of -1) and its row an empty one
    (token_of -1): it adds nothing to the output and gets no gradient, as in transformers' eager loop."""
    sentinel = indices >= num_experts
    plan = ops.make_plan(indices.masked_fill(sentinel, num_experts - 1), num_experts)
    sentinel_row = torch.zeros_like(plan.token_of, dtype=torch.bool)
    sentinel_row = sentinel_row.scatter(0, plan.row_of.reshape(-1), sentinel.reshape(-1))
    row_of, token_of = plan.row_of.masked_fill(sentinel, -1), plan.token_of.masked_fill(sentinel_row, -1)
    return plan._replace(row_of=row_of, token_of=token_of)


def experts_forward(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The ``"moe_ext"`` experts implementation: ``module``'s experts on its routing, through moe_ext's operators.

    ``hidden_states`` [T, H], ``top_k_index`` [T, k] (entries >= num_experts are expert-parallel sentinels:
    no contribution, no gradient), ``top_k_weights`` [T, k] -> [T, H] in the dtype of ``hidden_states``.
    Honours the class's layout flags (transposed, biases, has_gate, has_post_expert_norm) and its own
    ``_apply_gate`` (interleaved or clamped gates, softcaps, ...); the fused SwiGLU op runs only where the
    gate is the plain ``silu(gate) * up``.
    """
    layout = experts_layout(module)
    shape = hidden_states.shape
    if hidden_states.dim() < 1 or shape[-1] != layout.w_in.shape[1]:
        raise _fail(module, f"hidden_states has shape {tuple(shape)}, expected [T, {layout.w_in.shape[1]}]")
    compute_dtype = torch.float32 if layout.float32 else layout.w_in.dtype
    weights = [w if w is None else w.to(compute_dtype) for w in (layout.w_in, layout.w_out, layout.b_in, layout.b_out)]
    x = hidden_states.reshape(-1, shape[-1]).to(compute_dtype)
    indices = top_k_index.reshape(x.shape[0], -1).long()
    plan = _plan_without_sentinels(indices, module.num_experts)
    y_sorted = expert_ffn(ops.dispatch(x, plan), plan.offsets, *weights, activation=layout.activation)
    if layout.post_norm is not None:
        y_sorted = layout.post_norm(y_sorted)
    routing_weights = top_k_weights.reshape(indices.shape)
    if layout.float32:
        routing_weights = routing_weights.float()
    return ops.as_output(ops.combine(y_sorted, routing_weights, plan).to(hidden_states.dtype), shape)


def register_experts_implementation() -> bool:
    """Registers :func:`experts_forward` as ``"moe_ext"`` in transformers' ``ALL_EXPERTS_FUNCTIONS``;
    False (nothing registered) when the installed transformers has no experts interface."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return False
    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, experts_forward)
    return True


def decorated_experts_classes() -> list[type]:
    """Every experts class the installed transformers decorates with ``use_experts_implementation``: the
    classes ``"moe_ext"`` serves. Imports each ``transformers.models.*.modeling_*`` module that uses the
    decorator (seconds: many modules)."""
    import transformers.integrations.moe as hf_moe
    import transformers.models

    root = os.path.dirname(transformers.models.__file__)
    classes = []
    for family in sorted(os.listdir(root)):
        folder = os.path.join(root, family)
        if not os.path.isdir(folder):
            continue
        for file in sorted(os.listdir(folder)):
            if not (file.startswith("modeling_") and file.endswith(".py")):
                continue
            with open(os.path.join(folder, file), encoding="utf-8") as source:
                if "use_experts_implementation" not in source.read():
                    continue
            modeling = importlib.import_module(f"transformers.models.{family}.{file[:-3]}")
            for cls in vars(modeling).values():
                forward = getattr(cls, "forward", None) if inspect.isclass(cls) else None
                code = getattr(forward, "__code__", None)
                if code is not None and code.co_filename == hf_moe.__file__ and cls.__module__ == modeling.__name__:
                    classes.append(cls)
    return classes
