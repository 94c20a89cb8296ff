"""Swaps the sparse MoE blocks of Hugging Face transformers models for moe_ext layers, and back; importing it
registers the ``"moe_ext"`` experts implementation (:mod:`moe_ext.integrations.transformers_experts`).

    from moe_ext.integrations.transformers import swap_moe_layers, unswap_moe_layers

    model = MixtralForCausalLM.from_pretrained(path)
    swap_moe_layers(model)       # every sparse MoE block now runs on the moe_ext operators
    ...                          # train / generate as before: same outputs, router logits, aux loss
    unswap_moe_layers(model)     # the original block classes, holding the trained weights
    model.save_pretrained(out)   # a checkpoint the original model class loads

Supported blocks (each where the installed transformers has it): those of 45 families whose
router moe_ext's gating reproduces exactly -- Mixtral, the Qwen MoE line, OLMoE, FlexOlmo, the
DeepSeek-V2/V3 routers and their many users (GLM-4.5, dots1, Kimi-Linear, ...), GPT-OSS,
MiniMax, Granite, Ernie 4.5, Hunyuan, Cohere2, Mistral 4 and more: :func:`supported_families`
lists them, README's family table says why the others are not. A setting a family's router
has and moe_ext does not reproduce raises a ``ValueError`` naming it.

A swapped block is a :class:`MoEBlock`: its ``moe`` is a :class:`moe_ext.MoE` configured
to reproduce the block's math (routing, shared expert, biases, activation) and holding
its weights, and it returns what the block returned (GPT-OSS: also the router scores).

Router logits and the aux loss: transformers records ``router_logits`` with forward
hooks on the block's router module (``output_router_logits=True``) and computes the
load-balancing loss from them in the model's forward. A swapped block keeps, under
the router's attribute name (``gate`` / ``router``), a :class:`RouterOutputs` module
that shares the router's hooks and is called with the moe_ext routing (logits,
weights, indices), so the hooks record the same logits -- graph-connected to
``moe.router.weight`` -- and the model computes the same aux loss with the same
gradient. The moe_ext layer's own aux loss is therefore off (``aux_loss_coef=0``):
the model's loss already carries the aux term when the original did.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..convert import replace_modules
from ..layer import MoE
from .transformers_experts import (
    EXPERTS_IMPLEMENTATION,
    experts_forward,
    is_default_gate,
    register_experts_implementation,
)

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "MoEBlock",
    "RouterOutputs",
    "experts_forward",
    "supported_families",
    "swap_moe_layers",
    "unswap_moe_layers",
]

register_experts_implementation()

_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


@dataclass(frozen=True)
class _Family:
    """How one transformers MoE block maps onto moe_ext.MoE."""

    name: str
    module: str  # transformers.models.<module>.modeling_<module>
    block: str  # class name of the sparse MoE block
    router: str  # attribute of the router submodule inside the block
    routing: Callable[[nn.Module], dict]  # router module -> MoE routing keywords
    router_weight: str = "weight"  # path of the [E, H] router weight inside the router
    selection_bias: str | None = (
        None  # path in the block of the selection-only bias; None: <router>.e_score_correction_bias
    )
    shared_expert: str | None = None  # attribute of an always-on dense MLP (the block may hold None there)
    shared_expert_gate: str | None = None  # attribute of its sigmoid gate (Linear(H, 1))
    returns_router_scores: bool = False  # forward returns (hidden_states, router_scores)
    weights_in_logits_dtype: bool = True  # the router casts its top-k weights to the logits' dtype
    jitter_attr: str | None = None  # attribute of the block's input jitter (Mixtral)
    check: Callable[[nn.Module], None] | None = None  # raises ValueError for a block setting moe_ext lacks
    output_scale: str | None = None  # block attribute scaling the routed output: moe_ext scales the weights


def _softmax_routing(renormalize: bool | None = None) -> Callable[[nn.Module], dict]:
    """Softmax over all experts, top-k; renormalized always (Mixtral, MiniMax; GraniteMoE's softmax over the
    top-k logits is the same) or per ``router.norm_topk_prob``."""

    def routing(router: nn.Module) -> dict:
        normalize = renormalize if renormalize is not None else bool(router.norm_topk_prob)
        return dict(top_k=int(router.top_k), score_func="softmax", normalize_weights=normalize)

    return routing


def _deepseek_v3_routing(router: nn.Module) -> dict:
    # fp32 router logits, sigmoid scores, e_score_correction_bias for selection only, group-limited top-k
    # (a group scores the sum of its best two biased scores). GLM-4.5, dots1, EXAONE-MoE, Solar-Open and
    # MiMo-V2-Flash use this router verbatim.
    return dict(
        top_k=int(router.top_k),
        score_func="sigmoid",
        normalize_weights=bool(router.norm_topk_prob),
        routed_scaling_factor=float(router.routed_scaling_factor),
        n_group=int(router.num_group),
        topk_group=int(router.topk_group),
        selection_bias=True,
        router_dtype=torch.float32,
    )


def _deepseek_v2_routing(router: nn.Module) -> dict:
    # fp32 logits, softmax over all experts, top-k weights times routed_scaling_factor, never renormalized.
    if router.topk_method != "greedy":
        raise ValueError(
            f"swap_moe_layers: DeepSeek-V2 topk_method={router.topk_method!r} scores a group by its best "
            "expert; moe_ext's group-limited routing scores a group by its best two (DeepSeek-V3), so only "
            "topk_method='greedy' is reproduced"
        )
    return dict(
        top_k=int(router.top_k),
        score_func="softmax",
        normalize_weights=False,
        routed_scaling_factor=float(router.routed_scaling_factor),
        router_dtype=torch.float32,
    )


def _ernie_routing(router: nn.Module) -> dict:
    # fp32 softmax; moe_statics.e_score_correction_bias picks the experts only; the k weights are divided by
    # max(their sum, norm_min): their sum is at least k / E, so norm_min (1e-12) never binds.
    return dict(
        top_k=int(router.top_k),
        score_func="softmax",
        normalize_weights=True,
        selection_bias=True,
        router_dtype=torch.float32,
    )


def _hunyuan_routing(router: nn.Module) -> dict:
    # Softmax over all experts, top-k, renormalized; a float32 ``wg`` computes in float32.
    fp32 = router.wg.weight.dtype == torch.float32
    return dict(
        top_k=int(router.top_k),
        score_func="softmax",
        normalize_weights=True,
        router_dtype=torch.float32 if fp32 else None,
    )


def _cohere2_routing(router: nn.Module) -> dict:
    # Top-k of the logits, then softmax over those k (== softmax over all, renormalized) or sigmoid of those k
    # (renormalized per norm_topk_prob): a monotone score picks the same experts as the logits.
    if router.expert_selection_fn == "softmax":
        return dict(top_k=int(router.top_k), score_func="softmax", normalize_weights=True)
    return dict(top_k=int(router.top_k), score_func="sigmoid", normalize_weights=bool(router.norm_topk_prob))


def _sigmoid_routing(scale: str | None = None, normalize: bool | None = None, fp32: bool = False):
    """Sigmoid scores, a selection-only bias, no groups (MiniMax-M2, AFMoE, HY-V3, Laguna): renormalized
    always or per ``router.norm_topk_prob``, times ``router.<scale>``; ``fp32``: a float32 router matmul."""

    def routing(router: nn.Module) -> dict:
        return dict(
            top_k=int(router.top_k),
            score_func="sigmoid",
            normalize_weights=normalize if normalize is not None else bool(router.norm_topk_prob),
            routed_scaling_factor=float(getattr(router, scale)) if scale else 1.0,
            selection_bias=True,
            router_dtype=torch.float32 if fp32 else None,
        )

    return routing


def _flint_routing(router: nn.Module) -> dict:
    return {**_sigmoid_routing(fp32=True)(router), "selection_bias": False}


def _mistral4_routing(fp32: bool, normalize: bool | None = None) -> Callable[[nn.Module], dict]:
    """Softmax scores, groups scored by their best two, top-k weights renormalized and scaled. The experts of
    the dropped groups are masked to 0.0 (not -inf): the same picks while the kept groups hold top_k experts."""

    def routing(router: nn.Module) -> dict:
        group_size = router.num_experts // router.num_group
        if router.topk_group * group_size < router.top_k:
            raise ValueError(
                f"swap_moe_layers: {type(router).__name__} keeps {router.topk_group} groups of {group_size} experts, "
                f"fewer than top_k = {router.top_k}; transformers then picks masked experts, moe_ext does not"
            )
        return dict(
            top_k=int(router.top_k),
            score_func="softmax",
            normalize_weights=normalize if normalize is not None else bool(router.norm_topk_prob),
            routed_scaling_factor=float(router.routed_scaling_factor),
            n_group=int(router.num_group),
            topk_group=int(router.topk_group),
            router_dtype=torch.float32 if fp32 else None,
        )

    return routing


def _laguna_check(block: nn.Module) -> None:
    if block.gate.router_logit_softcapping > 0:
        raise ValueError(
            "swap_moe_layers: Laguna router_logit_softcapping > 0 softcaps the router logits (tanh); moe_ext's "
            "gating takes the logits as they are"
        )


def _hy_v3_check(block: nn.Module) -> None:
    if block.enable_moe_fp32_combine and block.experts.gate_up_proj.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            "swap_moe_layers: HY-V3 enable_moe_fp32_combine adds the routed and shared outputs in float32; moe_ext "
            "adds them in the layer's dtype (the same only for float32/float64 weights)"
        )


def _cohere2_check(block: nn.Module) -> None:
    if block.num_shared_experts > 0 and block.shared_expert_combination_strategy != "sum":
        raise ValueError(
            f"swap_moe_layers: Cohere2-MoE shared_expert_combination_strategy="
            f"{block.shared_expert_combination_strategy!r} halves the layer output; moe_ext adds the shared "
            "expert (only 'sum' is reproduced)"
        )


def _gpt_oss_routing(router: nn.Module) -> dict:
    # softmax over the top-k logits == softmax over all experts, top-k, renormalized.
    return dict(top_k=int(router.top_k), score_func="softmax", normalize_weights=True, router_bias=True)


_FAMILIES = (
    _Family("mixtral", "mixtral", "MixtralSparseMoeBlock", "gate", _softmax_routing(True),
            weights_in_logits_dtype=False, jitter_attr="jitter_noise"),
    _Family("qwen2_moe", "qwen2_moe", "Qwen2MoeSparseMoeBlock", "gate", _softmax_routing(),
            shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"),
    _Family("qwen3_moe", "qwen3_moe", "Qwen3MoeSparseMoeBlock", "gate", _softmax_routing()),
    _Family("olmoe", "olmoe", "OlmoeSparseMoeBlock", "gate", _softmax_routing()),
    _Family("deepseek_v3", "deepseek_v3", "DeepseekV3MoE", "gate", _deepseek_v3_routing,
            shared_expert="shared_experts", weights_in_logits_dtype=False),
    _Family("gpt_oss", "gpt_oss", "GptOssMLP", "router", _gpt_oss_routing, returns_router_scores=True),
    _Family("glm4_moe", "glm4_moe", "Glm4MoeMoE", "gate", _deepseek_v3_routing,
            shared_expert="shared_experts", weights_in_logits_dtype=False),
    _Family("dots1", "dots1", "Dots1MoE", "gate", _deepseek_v3_routing,
            shared_expert="shared_experts", weights_in_logits_dtype=False),
    _Family("exaone_moe", "exaone_moe", "ExaoneMoeSparseMoEBlock", "gate", _deepseek_v3_routing,
            shared_expert="shared_experts", weights_in_logits_dtype=False),
    _Family("solar_open", "solar_open", "SolarOpenMoE", "gate", _deepseek_v3_routing,
            shared_expert="shared_experts", weights_in_logits_dtype=False),
    _Family("mimo_v2_flash", "mimo_v2_flash", "MiMoV2FlashMoE", "gate", _deepseek_v3_routing,
            weights_in_logits_dtype=False),
    _Family("deepseek_v2", "deepseek_v2", "DeepseekV2Moe", "gate", _deepseek_v2_routing,
            shared_expert="shared_experts", weights_in_logits_dtype=False),
    _Family("qwen3_next", "qwen3_next", "Qwen3NextSparseMoeBlock", "gate", _softmax_routing(),
            shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"),
    _Family("flex_olmo", "flex_olmo", "FlexOlmoSparseMoeBlock", "gate", _softmax_routing()),
    _Family("minimax", "minimax", "MiniMaxSparseMoeBlock", "gate", _softmax_routing(True),
            weights_in_logits_dtype=False, jitter_attr="jitter_noise"),
    _Family("granitemoe", "granitemoe", "GraniteMoeMoE", "router", _softmax_routing(True)),
    _Family("granitemoeshared", "granitemoeshared", "GraniteMoeSharedMoE", "router", _softmax_routing(True)),
    _Family("ernie4_5_moe", "ernie4_5_moe", "Ernie4_5_MoeSparseMoeBlock", "gate", _ernie_routing,
            selection_bias="gate.moe_statics.e_score_correction_bias", shared_expert="shared_experts"),
    _Family("hunyuan_v1_moe", "hunyuan_v1_moe", "HunYuanMoEV1Moe", "gate", _hunyuan_routing,
            router_weight="wg.weight", shared_expert="shared_mlp"),
    _Family("cohere2_moe", "cohere2_moe", "Cohere2MoeSparseMoeBlock", "gate", _cohere2_routing,
            shared_expert="shared_experts", check=_cohere2_check),
    _Family("mellum", "mellum", "MellumSparseMoeBlock", "gate", _softmax_routing()),
    _Family("jamba", "jamba", "JambaSparseMoeBlock", "router", _softmax_routing(False)),
    _Family("granitemoe_swa", "granitemoe_swa", "GraniteMoeSWAMoE", "router", _softmax_routing(True)),
    _Family("granitemoehybrid", "granitemoehybrid", "GraniteMoeHybridMoE", "router", _softmax_routing(True)),
    _Family("aria", "aria", "AriaTextMoELayer", "router", _softmax_routing(True), shared_expert="shared_experts"),
    _Family("qwen3_5_moe", "qwen3_5_moe", "Qwen3_5MoeSparseMoeBlock", "gate", _softmax_routing(True),
            shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"),
    _Family("qwen3_vl_moe", "qwen3_vl_moe", "Qwen3VLMoeTextSparseMoeBlock", "gate", _softmax_routing(True)),
    _Family("qwen4_exp", "qwen4_exp", "Qwen4ExpTextSparseMoeBlock", "gate", _softmax_routing(),
            shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"),
    _Family("qwen3_omni_moe_thinker", "qwen3_omni_moe", "Qwen3OmniMoeThinkerTextSparseMoeBlock", "gate",
            _softmax_routing()),
    _Family("qwen3_omni_moe_talker", "qwen3_omni_moe", "Qwen3OmniMoeTalkerTextSparseMoeBlock", "gate",
            _softmax_routing(), shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"),
    _Family("glm4_moe_lite", "glm4_moe_lite", "Glm4MoeLiteMoE", "gate", _deepseek_v3_routing,
            shared_expert="shared_experts", weights_in_logits_dtype=False),
    _Family("glm4v_moe", "glm4v_moe", "Glm4vMoeTextMoE", "gate", _deepseek_v3_routing,
            shared_expert="shared_experts", weights_in_logits_dtype=False),
    _Family("glm_moe_dsa", "glm_moe_dsa", "GlmMoeDsaMoE", "gate", _deepseek_v3_routing,
            shared_expert="shared_experts", weights_in_logits_dtype=False),
    _Family("deepseek_v32", "deepseek_v32", "DeepseekV32MoE", "gate", _deepseek_v3_routing,
            shared_expert="shared_experts", weights_in_logits_dtype=False),
    _Family("kimi_linear", "kimi_linear", "KimiLinearMoE", "gate", _deepseek_v3_routing,
            shared_expert="shared_experts", weights_in_logits_dtype=False),
    _Family("bailing_hybrid", "bailing_hybrid", "BailingHybridMoE", "gate", _deepseek_v3_routing,
            shared_expert="shared_experts", weights_in_logits_dtype=False),
    _Family("dots3_note", "dots3_note", "Dots3NoteTextMoE", "gate", _deepseek_v3_routing,
            shared_expert="shared_experts", weights_in_logits_dtype=False),
    _Family("deepseek_ocr2", "deepseek_ocr2", "DeepseekOcr2TextMoe", "gate", _deepseek_v2_routing,
            shared_expert="shared_experts", weights_in_logits_dtype=False),
    _Family("unlimited_ocr", "unlimited_ocr", "UnlimitedOcrTextMoe", "gate", _deepseek_v2_routing,
            shared_expert="shared_experts", weights_in_logits_dtype=False),
    _Family("mistral4", "mistral4", "Mistral4MoE", "gate", _mistral4_routing(fp32=False),
            shared_expert="shared_experts", weights_in_logits_dtype=False),
    _Family("mistral_large4", "mistral_large4", "MistralLarge4TextMoE", "gate",
            _mistral4_routing(fp32=True, normalize=True), shared_expert="shared_experts",
            weights_in_logits_dtype=False),
    _Family("minimax_m2", "minimax_m2", "MiniMaxM2SparseMoeBlock", "gate", _sigmoid_routing(normalize=True),
            selection_bias="e_score_correction_bias", weights_in_logits_dtype=False, jitter_attr="jitter_noise"),
    _Family("afmoe", "afmoe", "AfmoeSparseMoeBlock", "router", _sigmoid_routing("route_scale", normalize=True),
            router_weight="gate.weight", selection_bias="expert_bias", shared_expert="shared_experts",
            weights_in_logits_dtype=False),
    _Family("hy_v3", "hy_v3", "HYV3MoE", "gate", _sigmoid_routing("router_scaling_factor", True, fp32=True),
            selection_bias="e_score_correction_bias", shared_expert="shared_experts",
            weights_in_logits_dtype=False, check=_hy_v3_check),
    _Family("laguna", "laguna", "LagunaSparseMoeBlock", "gate", _sigmoid_routing(normalize=True),
            shared_expert="shared_experts", check=_laguna_check, output_scale="routed_scaling_factor"),
    _Family("flint", "flint", "FlintSparseMoeBlock", "gate", _flint_routing, shared_expert="shared_expert",
            weights_in_logits_dtype=False),
)  # fmt: skip


def _block_class(family: _Family, imported_only: bool = False) -> type | None:
    """The family's block class; None if transformers lacks it (or, with ``imported_only``, has not
    imported its modeling module: then no model can hold such a block, and nothing is imported)."""
    name = f"transformers.models.{family.module}.modeling_{family.module}"
    if imported_only:
        modeling = sys.modules.get(name)
    else:
        try:
            modeling = importlib.import_module(name)
        except ImportError:
            return None
    return getattr(modeling, family.block, None)


def supported_families() -> dict[str, type]:
    """{family name: block class} for every supported family the installed transformers has."""
    classes = {family.name: _block_class(family) for family in _FAMILIES}
    return {name: cls for name, cls in classes.items() if cls is not None}


# ----- weights: transformers layouts <-> moe_ext layout ---------------------------------------------


def _gated_activation(act: nn.Module, where: str) -> str:
    kind = type(act).__name__
    if kind in ("SiLU", "SiLUActivation"):
        return "swiglu"
    if (kind == "GELU" and act.approximate == "none") or (kind == "GELUActivation" and act.act is nn.functional.gelu):
        return "geglu"
    raise ValueError(f"swap_moe_layers: {where} uses activation {kind}; moe_ext gated experts take SiLU or exact GELU")


def _mlp_layout(mlp: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """(gate [F, H], up [F, H], down [H, F]) of a gated MLP: gate_proj/up_proj/down_proj or w1/w3/w2 (Mixtral 4.x)."""
    names = ("gate_proj", "up_proj", "down_proj") if hasattr(mlp, "gate_proj") else ("w1", "w3", "w2")
    linears = [getattr(mlp, name, None) for name in names]
    if not all(isinstance(m, nn.Linear) and m.bias is None for m in linears):
        raise ValueError(f"swap_moe_layers: {type(mlp).__name__} is not a bias-free gated MLP (gate/up/down Linears)")
    return tuple(m.weight for m in linears)


def _read_experts(experts: nn.Module) -> tuple[dict, dict]:
    """MoE keywords and parameters {w_in, w_out[, b_in, b_out]} of a block's experts, in moe_ext layout.

    Reads the fused 3-D layout of transformers 5 (``gate_up_proj`` [E, 2F, H] or, transposed,
    [E, H, 2F], gate/up concatenated or interleaved, optional biases: the experts module's
    ``is_transposed`` / ``is_concatenated`` / ``has_bias``) and the per-expert layout of
    transformers 4 (an ``nn.ModuleList`` of gated MLPs).
    """
    if isinstance(experts, nn.ModuleList):
        gates, ups, downs = zip(*(_mlp_layout(mlp) for mlp in experts), strict=True)
        activation = _gated_activation(experts[0].act_fn, type(experts[0]).__name__)
        w_in = torch.cat([torch.stack(gates), torch.stack(ups)], dim=1).transpose(1, 2)  # [E, H, 2F]
        w_out = torch.stack(downs).transpose(1, 2)  # [E, F, H]
        return dict(activation=activation), dict(w_in=w_in, w_out=w_out)

    gate_up, down = experts.gate_up_proj, experts.down_proj
    if not getattr(experts, "is_transposed", False):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)  # -> [E, H, 2F], [E, F, H]
    if not getattr(experts, "is_concatenated", True):
        gate_up = torch.cat([gate_up[..., ::2], gate_up[..., 1::2]], dim=-1)
    params = dict(w_in=gate_up, w_out=down)
    if getattr(experts, "has_bias", False):
        b_in = experts.gate_up_proj_bias
        if not getattr(experts, "is_concatenated", True):
            b_in = torch.cat([b_in[..., ::2], b_in[..., 1::2]], dim=-1)
        params.update(b_in=b_in, b_out=experts.down_proj_bias)
    if type(experts).__name__ == "GptOssExperts":  # GPT-OSS's clamped SwiGLU
        options = dict(
            activation="clamped_swiglu", swiglu_alpha=float(experts.alpha), swiglu_limit=float(experts.limit)
        )
    elif hasattr(experts, "_apply_gate") and not is_default_gate(experts):
        raise ValueError(
            f"swap_moe_layers: {type(experts).__name__} gates with its own _apply_gate; moe_ext.MoE's activations "
            'are the plain SwiGLU/GeGLU and GPT-OSS\'s clamped SwiGLU (experts_implementation="moe_ext" serves it)'
        )
    elif hasattr(experts, "act_fn"):
        options = dict(activation=_gated_activation(experts.act_fn, type(experts).__name__))
    else:
        raise ValueError(f"swap_moe_layers: cannot tell the activation of {type(experts).__name__}")
    options["expert_bias"] = "b_in" in params
    return options, params


def _write_experts(experts: nn.Module, moe: MoE, prefix: str) -> dict:
    """The inverse of :func:`_read_experts`: the experts' state dict (keys under ``prefix``) from ``moe``."""
    w_in, w_out = moe.w_in.detach(), moe.w_out.detach()
    gate, up = w_in.chunk(2, dim=-1)  # [E, H, F] each
    if isinstance(experts, nn.ModuleList):
        names = ("gate_proj", "up_proj", "down_proj") if hasattr(experts[0], "gate_proj") else ("w1", "w3", "w2")
        state = {}
        for e in range(len(experts)):
            for name, weight in zip(names, (gate[e].T, up[e].T, w_out[e].T), strict=True):
                state[f"{prefix}{e}.{name}.weight"] = weight
        return state

    def interleave(a: Tensor, b: Tensor) -> Tensor:
        return torch.stack([a, b], dim=-1).flatten(-2)

    concatenated = getattr(experts, "is_concatenated", True)
    gate_up = torch.cat([gate, up], dim=-1) if concatenated else interleave(gate, up)
    down = w_out
    if not getattr(experts, "is_transposed", False):
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    state = {f"{prefix}gate_up_proj": gate_up, f"{prefix}down_proj": down}
    if moe.b_in is not None:
        b_gate, b_up = moe.b_in.detach().chunk(2, dim=-1)
        state[f"{prefix}gate_up_proj_bias"] = (
            torch.cat([b_gate, b_up], -1) if concatenated else interleave(b_gate, b_up)
        )
        state[f"{prefix}down_proj_bias"] = moe.b_out.detach()
    return state


# ----- the swapped block ----------------------------------------------------------------------------


class RouterOutputs(nn.Module):
    """Stands where a block's router was; called with the moe_ext routing, returns it as the router did.

    ``forward(hidden_states, logits, weights, indices) -> (logits, weights, indices)``:
    the router's own output tuple, so forward hooks registered on the router (which
    this module shares) -- transformers' ``output_router_logits`` recorder among them
    -- see what they saw before the swap.
    """

    def forward(self, hidden_states: Tensor, logits: Tensor, weights: Tensor, indices: Tensor):
        return logits, weights, indices


class MoEBlock(nn.Module):
    """A transformers sparse MoE block served by a :class:`moe_ext.MoE` (``self.moe``).

    ``forward(hidden_states [B, S, H])`` returns what the original block returned:
    the output [B, S, H] (GPT-OSS: ``(output, router_scores [B*S, k])``).
    ``unswap_moe_layers`` turns it back into the original block.
    """

    def __init__(self, family: _Family, moe: MoE, original: nn.Module, jitter_noise: float = 0.0) -> None:
        super().__init__()
        self.family = family.name
        self.moe = moe
        self.router_name = family.router
        self.returns_router_scores = family.returns_router_scores
        self.weights_in_logits_dtype = family.weights_in_logits_dtype
        self.jitter_noise = float(jitter_noise)
        router = RouterOutputs()
        _share_hooks(getattr(original, family.router), router)
        setattr(self, family.router, router)
        _share_hooks(original, self)
        # The original block, parameters on the meta device (no memory), kept outside the module
        # tree (not in .modules(), .parameters() or the state dict) for unswap_moe_layers.
        self.__dict__["_original"] = original

    def forward(self, hidden_states: Tensor):
        if self.training and self.jitter_noise > 0:
            # Mixtral's jitter: the whole block input (router and experts) times U(1 - eps, 1 + eps).
            noise = torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
            hidden_states = hidden_states * noise
        output, routing = self.moe(hidden_states, return_routing=True)
        weights = routing.weights.to(routing.logits.dtype) if self.weights_in_logits_dtype else routing.weights
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        getattr(self, self.router_name)(tokens, routing.logits, weights, routing.indices)
        if self.returns_router_scores:
            return output, weights
        return output

    def extra_repr(self) -> str:
        return f"family={self.family}"


def _share_hooks(source: nn.Module, target: nn.Module) -> None:
    """Makes ``target`` use ``source``'s hook dicts (the same objects: a hook added to either fires on both)."""
    for name in _HOOK_DICTS:
        if hasattr(source, name):
            setattr(target, name, getattr(source, name))


def _install_output_capture_hooks(model: nn.Module) -> None:
    """Installs transformers' output-capturing hooks now (it would do it lazily at the first
    ``output_router_logits=True``), so they sit on the routers before the swap and move with them."""
    try:
        from transformers.modeling_utils import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # before transformers 5 there were no capture hooks (nor blocks in the 5.x form)
        return

    def installed(module: nn.Module) -> bool:
        return getattr(module, "_output_capturing_hooks_installed", False)

    def visit(module: nn.Module) -> None:
        if isinstance(module, PreTrainedModel):
            if installed(module):
                return
            nested = (m for m in module.modules() if m is not module and isinstance(m, PreTrainedModel))
            if not any(installed(m) for m in nested):
                # Installing on the outermost model hooks its nested models too, as transformers would;
                # where a nested model already has its hooks, install below it instead (no duplicates).
                maybe_install_capturing_hooks(module)
                return
        for child in module.children():
            visit(child)

    visit(model)


def _lookup(module: nn.Module, path: str) -> Tensor:
    """The parameter or buffer at dotted ``path`` inside ``module``."""
    owner, _, name = path.rpartition(".")
    return getattr(module.get_submodule(owner), name)


def _to_meta(module: nn.Module) -> nn.Module:
    """Moves the parameters and saved buffers of ``module`` to the meta device (in place), freeing their memory."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None:
                sub._parameters[name] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        for name, buffer in list(sub._buffers.items()):
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                sub._buffers[name] = buffer.detach().to("meta")
    return module


def _selection_bias_path(family: _Family) -> str:
    return family.selection_bias or f"{family.router}.e_score_correction_bias"


def _shared_expert(family: _Family, block: nn.Module) -> nn.Module | None:
    return getattr(block, family.shared_expert) if family.shared_expert is not None else None


def _build_moe(family: _Family, block: nn.Module) -> MoE:
    if family.check is not None:
        family.check(block)
    router = getattr(block, family.router)
    router_weight = router.get_parameter(family.router_weight)
    options, params = _read_experts(block.experts)
    num_experts, ffn_hidden_size, hidden_size = params["w_out"].shape  # [E, F, H]
    if router_weight.shape != (num_experts, hidden_size):
        raise ValueError(
            f"swap_moe_layers: {type(block).__name__}.{family.router}.{family.router_weight} has shape "
            f"{tuple(router_weight.shape)}, expected [num_experts = {num_experts}, hidden = {hidden_size}]"
        )
    options.update(family.routing(router))
    if family.output_scale is not None:
        options["routed_scaling_factor"] = float(getattr(block, family.output_scale))
    params["router.weight"] = router_weight
    if options.get("router_bias"):
        params["router.bias"] = router.bias
    if options.get("selection_bias"):
        params["selection_bias"] = _lookup(block, _selection_bias_path(family)).reshape(num_experts)
    shared = _shared_expert(family, block)
    if shared is not None:
        gate, up, down = _mlp_layout(shared)
        if _gated_activation(shared.act_fn, type(shared).__name__) != options["activation"]:
            raise ValueError("swap_moe_layers: the shared expert's activation differs from the experts'")
        options["shared_expert_size"] = gate.shape[0]
        params["shared_expert.w_in.weight"] = torch.cat([gate, up], dim=0)
        params["shared_expert.w_out.weight"] = down
        if family.shared_expert_gate is not None:
            options["shared_expert_gate"] = True
            params["shared_expert_gate.weight"] = getattr(block, family.shared_expert_gate).weight
    reference = params["w_in"]
    moe = MoE(
        hidden_size,
        ffn_hidden_size,
        num_experts,
        aux_loss_coef=0.0,  # the model computes the aux loss from the recorded router logits
        device=reference.device,
        dtype=reference.dtype,
        **options,
    )
    if router_weight.dtype != reference.dtype:
        # A router kept in float32 in a bfloat16 model (Ernie 4.5, Hunyuan): moe_ext's router stays in it too
        # (it computes in router_dtype), so routing and the unswapped checkpoint keep their precision.
        if options.get("router_dtype") != router_weight.dtype:
            raise ValueError(
                f"swap_moe_layers: {type(block).__name__}'s router weight is {router_weight.dtype} but its experts "
                f"are {reference.dtype}, and the router does not compute in {router_weight.dtype}"
            )
        moe.router.to(router_weight.dtype)
    moe.load_state_dict({name: tensor.detach() for name, tensor in params.items()}, strict=True)
    return moe


def swap_moe_layers(model: nn.Module) -> int:
    """Replaces every supported transformers sparse MoE block in ``model`` by a moe_ext :class:`MoEBlock`.

    The new block holds the same weights (copied into moe_ext's stacked layout; the
    original parameters are released) and returns what the old one returned, so the
    model's logits, generated tokens, ``router_logits`` and aux loss are unchanged up to
    float rounding. Returns how many blocks were swapped (blocks already swapped are
    left alone). Build optimizers after swapping: the parameters are new tensors.
    """
    families = {cls: family for family in _FAMILIES if (cls := _block_class(family, imported_only=True)) is not None}
    if not any(isinstance(m, tuple(families)) for m in model.modules()):
        return 0
    _install_output_capture_hooks(model)

    def build(_name: str, block: nn.Module) -> nn.Module:
        family = families[type(block)]
        moe = _build_moe(family, block)
        jitter = float(getattr(block, family.jitter_attr, 0.0) or 0.0) if family.jitter_attr else 0.0
        swapped = MoEBlock(family, moe, _to_meta(block), jitter_noise=jitter)
        swapped.train(block.training)
        return swapped

    return replace_modules(model, lambda _name, m: type(m) in families, build)


def unswap_moe_layers(model: nn.Module) -> int:
    """Turns every :class:`MoEBlock` in ``model`` back into its original transformers block, with the
    current (possibly trained) weights, on their current device and dtype; returns how many.

    Afterwards ``model.save_pretrained`` writes a checkpoint the original model class loads.
    """
    families = {family.name: family for family in _FAMILIES}

    def build(_name: str, swapped: MoEBlock) -> nn.Module:
        family, moe, original = families[swapped.family], swapped.moe, swapped._original
        state = _write_experts(original.experts, moe, "experts.")
        state[f"{family.router}.{family.router_weight}"] = moe.router.weight.detach()
        if moe.router.bias is not None:
            state[f"{family.router}.bias"] = moe.router.bias.detach()
        if moe.selection_bias is not None:
            path = _selection_bias_path(family)
            state[path] = moe.selection_bias.reshape(_lookup(original, path).shape)
        shared = _shared_expert(family, original)
        if shared is not None:
            names = ("gate_proj", "up_proj", "down_proj") if hasattr(shared, "gate_proj") else ("w1", "w3", "w2")
            gate, up = moe.shared_expert.w_in.weight.detach().chunk(2, dim=0)
            for name, weight in zip(names, (gate, up, moe.shared_expert.w_out.weight.detach()), strict=True):
                state[f"{family.shared_expert}.{name}.weight"] = weight
            if family.shared_expert_gate is not None:
                state[f"{family.shared_expert_gate}.weight"] = moe.shared_expert_gate.weight.detach()
        state = {name: tensor.clone(memory_format=torch.contiguous_format) for name, tensor in state.items()}
        original.load_state_dict(state, strict=True, assign=True)
        stale = [name for name, t in [*original.named_parameters(), *original.named_buffers()] if t.is_meta]
        if stale:
            raise RuntimeError(f"unswap_moe_layers: {type(original).__name__} has no value for {stale}")
        original.train(swapped.training)
        del swapped.__dict__["_original"]
        return original

    return replace_modules(model, MoEBlock, build)
