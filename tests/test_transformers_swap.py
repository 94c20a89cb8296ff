"""swap_moe_layers / unswap_moe_layers on tiny random-config transformers models, against the original blocks."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import moe_ext  # noqa: E402
from moe_ext.integrations.transformers import (  # noqa: E402
    MoEBlock,
    supported_families,
    swap_moe_layers,
    unswap_moe_layers,
)

VOCAB = 64
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    router_aux_loss_coef=0.1,  # large, so a wrong aux-loss gradient shows in the parameter gradients
)

# family -> (config class, causal-LM class, config overrides, number of sparse MoE blocks).
FAMILIES = {
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
        2,
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        ),
        2,
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2, head_dim=8),
        2,
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
        2,
    ),
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            intermediate_size=48,
            moe_intermediate_size=24,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            n_group=4,
            topk_group=2,
            first_k_dense_replace=1,  # layer 0 dense, layer 1 MoE
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_rope_head_dim=4,
            qk_nope_head_dim=4,
            v_head_dim=8,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
        ),
        1,
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            intermediate_size=24,
            num_local_experts=4,
            num_experts_per_tok=2,
            head_dim=8,
            sliding_window=8,
            swiglu_limit=0.1,  # small, so the clamps of the clamped SwiGLU are active
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        2,
    ),
}


def _family_param(name: str):
    available = name in supported_families()
    reason = f"the installed transformers {transformers.__version__} has no {name} model"
    return pytest.param(name, marks=pytest.mark.skipif(not available, reason=reason))


family_names = pytest.mark.parametrize("family", [_family_param(name) for name in FAMILIES])


def build(family: str, seed: int = 0):
    config_name, model_name, overrides, _ = FAMILIES[family]
    config = getattr(transformers, config_name)(**COMMON, **overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).float().eval()
    block_class = supported_families()[family]
    with torch.no_grad():
        for block in (m for m in model.modules() if isinstance(m, block_class)):
            router = block.router if family == "gpt_oss" else block.gate
            router.weight.mul_(5.0)  # peakier routing than the 0.02 init
            if family == "deepseek_v3":  # selection-only bias: picks differ from the weight order
                router.e_score_correction_bias.normal_(0.0, 0.05)
            if family == "gpt_oss":
                router.bias.normal_(0.0, 0.1)
                block.experts.gate_up_proj_bias.normal_(0.0, 0.05)
                block.experts.down_proj_bias.normal_(0.0, 0.05)
    return model


def token_ids(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def has_aux_loss(family: str) -> bool:
    return family != "deepseek_v3"  # DeepseekV3ForCausalLM returns router logits but computes no aux loss


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    scale = expected.abs().max().clamp(min=1e-30)
    error = (actual - expected).abs().max() / scale
    assert error <= rel, f"max |diff| / max |expected| = {error.item():.3g} > {rel}"


@family_names
def test_swap_matches_logits_router_logits_and_aux_loss(family):
    model = build(family)
    num_blocks = FAMILIES[family][3]
    ids = token_ids()
    with torch.no_grad():  # the first capture installs transformers' hooks before the swap
        before = model(ids, output_router_logits=True)
    assert swap_moe_layers(model) == num_blocks
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    assert len(blocks) == num_blocks and all(isinstance(b.moe, moe_ext.MoE) for b in blocks)
    assert not any(isinstance(m, supported_families()[family]) for m in model.modules())
    with torch.no_grad():
        after = model(ids, output_router_logits=True)

    assert_rel_close(after.logits, before.logits)
    assert len(after.router_logits) == len(before.router_logits) == num_blocks
    for got, want in zip(after.router_logits, before.router_logits, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert_rel_close(got, want)
    if has_aux_loss(family):
        torch.testing.assert_close(after.aux_loss, before.aux_loss, rtol=1e-5, atol=0)
    # The moe_ext layer's own routing statistics are live: every token got top_k experts.
    stats = blocks[0].moe.last_stats
    assert int(stats.tokens_per_expert.sum()) == ids.numel() * blocks[0].moe.top_k


@family_names
def test_greedy_generate_same_tokens(family):
    model = build(family)
    ids = token_ids(batch=2, length=5, seed=2)
    settings = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **settings)
    swap_moe_layers(model)
    assert torch.equal(model.generate(ids, **settings), expected)


def _train_inputs():
    ids = token_ids(batch=2, length=10, seed=3)
    return dict(input_ids=ids, labels=ids, output_router_logits=True)


@family_names
def test_training_step_same_loss_and_gradients(family):
    reference = build(family).train()
    swapped = copy.deepcopy(reference)  # never ran a capture: the swap itself must place the hooks
    swap_moe_layers(swapped)

    out_ref = reference(**_train_inputs())
    out_swap = swapped(**_train_inputs())
    torch.testing.assert_close(out_swap.loss, out_ref.loss, rtol=1e-5, atol=0)
    assert len(out_swap.router_logits) == FAMILIES[family][3]
    if has_aux_loss(family):
        torch.testing.assert_close(out_swap.aux_loss, out_ref.aux_loss, rtol=1e-5, atol=0)
    out_ref.loss.backward()
    out_swap.loss.backward()

    # Overwrite every parameter with its gradient and unswap: the layout conversion is linear,
    # so the "weights" that come back are the swapped model's gradients in the original names.
    with torch.no_grad():
        for p in swapped.parameters():
            p.copy_(p.grad)
    assert unswap_moe_layers(swapped) == FAMILIES[family][3]
    grads = dict(swapped.named_parameters())
    assert grads.keys() == {name for name, _ in reference.named_parameters()}
    for name, p in reference.named_parameters():
        assert p.grad is not None, name
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(grads[name].detach(), p.grad, rtol=1e-4, atol=1e-5 * scale + 1e-12, msg=name)


@family_names
def test_swap_train_unswap_save_reload(family, tmp_path):
    model = build(family)
    swap_moe_layers(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(**_train_inputs()).loss
    loss.backward()
    optimizer.step()
    model.eval()
    ids = token_ids(seed=4)
    with torch.no_grad():
        trained = model(ids).logits

    assert unswap_moe_layers(model) == FAMILIES[family][3]
    assert not any(isinstance(m, MoEBlock) for m in model.modules())
    model.save_pretrained(tmp_path)
    model_class = type(model)
    reloaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    block_class = supported_families()[family]
    assert sum(isinstance(m, block_class) for m in reloaded.modules()) == FAMILIES[family][3]
    with torch.no_grad():
        assert_rel_close(reloaded.eval()(ids).logits, trained)
        assert_rel_close(model(ids).logits, trained)
    # The trained weights really moved (the test would pass trivially otherwise).
    assert not torch.allclose(trained, build(family)(ids).logits.detach())


@family_names
def test_swap_and_unswap_count_and_are_idempotent(family):
    model = build(family)
    names = set(model.state_dict())
    n = FAMILIES[family][3]
    ids = token_ids(length=4)
    assert swap_moe_layers(model) == n
    assert swap_moe_layers(model) == 0
    swapped_names = set(model.state_dict())
    assert any(".moe.w_in" in name for name in swapped_names) and not any("experts." in k for k in swapped_names)
    with torch.no_grad():  # one recorded router-logits tensor per block: none lost, none twice
        assert len(model(ids, output_router_logits=True).router_logits) == n
    assert unswap_moe_layers(model) == n
    assert unswap_moe_layers(model) == 0
    assert set(model.state_dict()) == names
    with torch.no_grad():
        assert len(model(ids, output_router_logits=True).router_logits) == n


def test_per_expert_layout_is_read_and_written_back():
    """The transformers-4 layout (a ModuleList of gated MLPs) converts like the fused one."""
    if "qwen3_moe" not in supported_families():
        pytest.skip(f"the installed transformers {transformers.__version__} has no qwen3_moe model")
    modeling = importlib.import_module("transformers.models.qwen3_moe.modeling_qwen3_moe")
    model = build("qwen3_moe")
    fused = model.model.layers[0].mlp
    config = model.config
    x = torch.randn(2, 5, config.hidden_size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = fused(x)
    per_expert = nn.ModuleList()
    for e in range(config.num_experts):
        mlp = modeling.Qwen3MoeMLP(config, intermediate_size=config.moe_intermediate_size)
        gate, up = fused.experts.gate_up_proj[e].detach().chunk(2, dim=0)
        with torch.no_grad():
            mlp.gate_proj.weight.copy_(gate)
            mlp.up_proj.weight.copy_(up)
            mlp.down_proj.weight.copy_(fused.experts.down_proj[e])
        per_expert.append(mlp)
    fused.experts = per_expert
    holder = nn.ModuleDict({"mlp": fused})
    reference_weights = {k: v.clone() for k, v in fused.state_dict().items()}

    assert swap_moe_layers(holder) == 1
    with torch.no_grad():
        assert_rel_close(holder["mlp"](x), expected)
    assert unswap_moe_layers(holder) == 1
    restored = holder["mlp"].state_dict()
    assert restored.keys() == reference_weights.keys()
    for name, value in reference_weights.items():
        assert torch.equal(restored[name], value), name
