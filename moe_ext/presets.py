"""Published routing configurations of well-known MoE systems, as moe_ext.MoE keyword arguments."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["PRESETS", "Preset"]


@dataclass(frozen=True)
class Preset:
    name: str
    source: str
    settings: dict = field(default_factory=dict)
    # set only when the preset has a shared expert: its width as a multiple of ffn_hidden_size
    shared_expert_multiple: int = 0


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "switch",
            "Fedus et al. 2021, Switch Transformers (arXiv 2101.03961): top-1, capacity factor 1.25 train / 2.0 eval, "
            "fp32 router, multiplicative jitter, load-balancing loss 1e-2; router z-loss 1e-3 from ST-MoE "
            "(Zoph et al. 2022, arXiv 2202.08906)",
            dict(
                top_k=1,
                activation="relu",
                capacity_factor=1.25,
                eval_capacity_factor=2.0,
                min_capacity=4,
                score_func="softmax",
                normalize_weights=False,
                router_dtype=torch.float32,
                router_jitter=0.01,
                aux_loss_coef=1e-2,
                z_loss_coef=1e-3,
                drop_policy="position",
            ),
        ),
        Preset(
            "gshard",
            "Lepikhin et al. 2020, GShard (arXiv 2006.16668): top-2, capacity 2T/E, random routing of the 2nd "
            "expert, l_aux on first choices",
            dict(
                top_k=2,
                activation="relu",
                capacity_factor=1.0,
                score_func="softmax",
                normalize_weights=True,
                random_routing=True,
                aux_loss_type="gshard",
                aux_loss_coef=1e-2,
                drop_policy="position",
            ),
        ),
        Preset(
            "shazeer",
            "Shazeer et al. 2017, Outrageously Large Neural Networks (arXiv 1701.06538): noisy top-k gating "
            "(k=4), softmax over the kept logits, w_importance = w_load = 0.1",
            dict(
                top_k=4,
                activation="relu",
                noisy_gating=True,
                score_func="softmax",
                normalize_weights=True,
                importance_loss_coef=0.1,
                load_loss_coef=0.1,
                aux_loss_coef=0.0,
            ),
        ),
        Preset(
            "mixtral",
            "Jiang et al. 2024, Mixtral of Experts (arXiv 2401.04088) and transformers' MixtralConfig: 8 experts, "
            "top-2 of a softmax over all, renormalized, SwiGLU, router_aux_loss_coef 1e-3, dropless",
            dict(
                num_experts=8,
                top_k=2,
                activation="swiglu",
                score_func="softmax",
                normalize_weights=True,
                aux_loss_coef=1e-3,
            ),
        ),
        Preset(
            "grok1",
            "xAI grok-1 released model code (model.py Router/MoELayer): 8 experts, softmax over all in float32, "
            "top-2 probabilities used as weights without renormalizing, GeGLU experts with jax.nn.gelu's default "
            "tanh approximation",
            dict(
                num_experts=8,
                top_k=2,
                activation="geglu_tanh",
                score_func="softmax",
                normalize_weights=False,
                router_dtype=torch.float32,
                aux_loss_coef=0.0,
            ),
        ),
        Preset(
            "qwen3_moe",
            "transformers' Qwen3MoeConfig: 128 experts, top-8, norm_topk_prob False by default, SwiGLU, "
            "router_aux_loss_coef 1e-3",
            dict(
                num_experts=128,
                top_k=8,
                activation="swiglu",
                score_func="softmax",
                normalize_weights=False,
                aux_loss_coef=1e-3,
            ),
        ),
        Preset(
            "olmoe",
            "Muennighoff et al. 2024, OLMoE (arXiv 2409.02060): 64 experts, top-8, no renormalization, SwiGLU, "
            "load-balancing loss 1e-2 and router z-loss 1e-3",
            dict(
                num_experts=64,
                top_k=8,
                activation="swiglu",
                score_func="softmax",
                normalize_weights=False,
                aux_loss_coef=1e-2,
                z_loss_coef=1e-3,
            ),
        ),
        Preset(
            "deepseek_v3",
            "DeepSeek-AI 2024, DeepSeek-V3 (arXiv 2412.19437): 256 routed experts, top-8 of sigmoid scores, "
            "selection-only bias updated aux-loss-free (gamma 1e-3), 8 groups / top-4 groups, weights "
            "renormalized then scaled by 2.5, 1 shared expert, sequence-wise balance loss alpha 1e-4",
            dict(
                num_experts=256,
                top_k=8,
                activation="swiglu",
                score_func="sigmoid",
                normalize_weights=True,
                routed_scaling_factor=2.5,
                n_group=8,
                topk_group=4,
                selection_bias=True,
                bias_update_rate=1e-3,
                seq_aux_loss_coef=1e-4,
                aux_loss_coef=0.0,
            ),
            shared_expert_multiple=1,
        ),
        Preset(
            "expert_choice",
            "Zhou et al. 2022, Mixture-of-Experts with Expert Choice Routing (arXiv 2202.09368): each expert "
            "takes its top C = c * T / E tokens by softmax score, c = 2",
            dict(
                router="expert_choice",
                capacity_factor=2.0,
                activation="swiglu",
                score_func="softmax",
                aux_loss_coef=0.0,
            ),
        ),
    ]
}


def preset_table() -> str:
    """The README table: preset, what it sets, source."""
    lines = ["| preset | sets | source |", "|---|---|---|"]
    for preset in PRESETS.values():
        settings = ", ".join(f"`{k}={v}`" for k, v in preset.settings.items())
        if preset.shared_expert_multiple:
            settings += f", `shared_expert_size={preset.shared_expert_multiple} x ffn_hidden_size`"
        lines.append(f"| `{preset.name}` | {settings} | {preset.source} |")
    return "\n".join(lines)
