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

# The DeepSeek-V3 router (sigmoid, selection bias, groups scored by their best two, scaling), 16 experts in 4 groups.
GROUPED = dict(
    moe_intermediate_size=24,
    n_routed_experts=16,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
)

# DeepSeek's multi-head latent attention, tiny.
MLA = dict(q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)

# family (transformers model_type) -> config fields beyond COMMON.
FAMILIES = {
    "mixtral": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=6,
        num_experts_per_tok=2,
        norm_topk_prob=False,
    ),
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2, head_dim=8),
    "olmoe": dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    "deepseek_v3": dict(
        GROUPED,
        intermediate_size=48,
        n_shared_experts=1,
        first_k_dense_replace=1,  # layer 0 dense, layer 1 MoE
        **MLA,
    ),
    "gpt_oss": dict(
        intermediate_size=24,
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=8,
        sliding_window=8,
        swiglu_limit=0.1,  # small, so the clamps of the clamped SwiGLU are active
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "glm4_moe": dict(GROUPED, intermediate_size=48, n_shared_experts=1, first_k_dense_replace=0),
    "dots1": dict(GROUPED, intermediate_size=48, n_shared_experts=1, first_k_dense_replace=0),
    "exaone_moe": dict(
        GROUPED,
        intermediate_size=48,
        num_experts=8,
        num_shared_experts=1,
        first_k_dense_replace=0,
        mlp_layer_types=["sparse", "sparse"],
    ),
    "solar_open": dict(GROUPED, intermediate_size=48, n_shared_experts=1),
    "mimo_v2_flash": dict(GROUPED, intermediate_size=48, v_head_dim=8, mlp_layer_types=["sparse", "sparse"]),
    "deepseek_v2": dict(
        intermediate_size=48,
        moe_intermediate_size=24,
        n_routed_experts=6,
        n_shared_experts=1,
        num_experts_per_tok=2,
        topk_method="greedy",
        routed_scaling_factor=2.5,
        first_k_dense_replace=0,
        **MLA,
    ),
    "qwen3_next": dict(
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=6,
        num_experts_per_tok=2,
        head_dim=8,
        layer_types=["full_attention", "full_attention"],  # the gated-delta-net layers are slow in eager
    ),
    "flex_olmo": dict(intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "minimax": dict(
        intermediate_size=24,
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=8,
        layer_types=["full_attention", "full_attention"],
    ),
    "granitemoe": dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2),
    "granitemoeshared": dict(
        intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=16
    ),
    "ernie4_5_moe": dict(
        intermediate_size=48,
        moe_intermediate_size=24,
        moe_num_experts=6,
        moe_k=2,
        moe_num_shared_experts=1,
        moe_layer_start_index=0,
        moe_layer_end_index=1,
    ),
    "hunyuan_v1_moe": dict(intermediate_size=24, num_experts=4, moe_topk=2, head_dim=8),
    "cohere2_moe": dict(
        intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
        num_shared_experts=1,
        shared_expert_combination_strategy="sum",
    ),
}


def _family_param(name: str):
    available = name in supported_families()
    reason = f"the installed transformers {transformers.__version__} has no {name} model"
    return pytest.param(name, marks=pytest.mark.skipif(not available, reason=reason))


family_names = pytest.mark.parametrize("family", [_family_param(name) for name in FAMILIES])


def _perturb(block: nn.Module) -> None:
    """Peakier routing than the 0.02 init (zero-initialized routers get one), a selection-only bias that
    makes picks differ from the weight order, and no all-zero tensor (biases, zero-initialized experts)."""
    routers = [m for name, m in block.named_children() if name in ("gate", "router")]
    for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        if name.endswith("e_score_correction_bias"):
            tensor.normal_(0.0, 0.05)
        elif not tensor.any():
            tensor.normal_(0.0, 0.05)
    for router in routers:
        for name, weight in router.named_parameters():
            if weight.dim() == 2 and not name.endswith("e_score_correction_bias"):
                weight.mul_(5.0)


def build(family: str, seed: int = 0):
    config = transformers.AutoConfig.for_model(family, **COMMON, **FAMILIES[family])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    blocks = blocks_of(model, family)
    assert blocks, f"{family}: the tiny model has no sparse MoE block"
    with torch.no_grad():
        for block in blocks:
            _perturb(block)
    return model


def blocks_of(model: nn.Module, family: str) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, supported_families()[family])]


def token_ids(batch: int = 2, length: int = 9, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


def has_aux_loss(output) -> bool:
    return getattr(output, "aux_loss", None) is not None  # the DeepSeek-V3 clones compute none


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    scale = expected.abs().max().clamp(min=1e-30)
    error = (actual - expected).abs().max() / scale
    assert error <= rel, f"max |diff| / max |expected| = {error.item():.3g} > {rel}"


@family_names
def test_swap_matches_logits_router_logits_and_aux_loss(family):
    model = build(family)
    n = len(blocks_of(model, family))
    ids = token_ids()
    with torch.no_grad():  # the first capture installs transformers' hooks before the swap
        before = model(ids, output_router_logits=True)
    assert swap_moe_layers(model) == n
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    assert len(blocks) == n and all(isinstance(b.moe, moe_ext.MoE) for b in blocks)
    assert not any(isinstance(m, supported_families()[family]) for m in model.modules())
    with torch.no_grad():
        after = model(ids, output_router_logits=True)

    assert_rel_close(after.logits, before.logits)
    assert len(after.router_logits) == len(before.router_logits) == n
    for got, want in zip(after.router_logits, before.router_logits, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert_rel_close(got, want)
    if has_aux_loss(before):
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
    n = swap_moe_layers(swapped)
    assert n == len(blocks_of(reference, family))

    out_ref = reference(**_train_inputs())
    out_swap = swapped(**_train_inputs())
    torch.testing.assert_close(out_swap.loss, out_ref.loss, rtol=1e-5, atol=0)
    assert len(out_swap.router_logits) == n
    if has_aux_loss(out_ref):
        torch.testing.assert_close(out_swap.aux_loss, out_ref.aux_loss, rtol=1e-5, atol=0)
    out_ref.loss.backward()
    out_swap.loss.backward()

    # Overwrite every parameter with its gradient and unswap: the layout conversion is linear,
    # so the "weights" that come back are the swapped model's gradients in the original names.
    with torch.no_grad():
        for p in swapped.parameters():
            p.copy_(p.grad)
    assert unswap_moe_layers(swapped) == n
    grads = dict(swapped.named_parameters())
    assert grads.keys() == {name for name, _ in reference.named_parameters()}
    for name, p in reference.named_parameters():
        if not p.requires_grad:  # Ernie 4.5's selection bias is a frozen parameter
            continue
        assert p.grad is not None, name
        scale = p.grad.abs().max().item()
        torch.testing.assert_close(grads[name].detach(), p.grad, rtol=1e-4, atol=1e-5 * scale + 1e-12, msg=name)


@family_names
def test_swap_train_unswap_save_reload(family, tmp_path):
    model = build(family)
    n = swap_moe_layers(model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(**_train_inputs()).loss
    loss.backward()
    optimizer.step()
    model.eval()
    ids = token_ids(seed=4)
    with torch.no_grad():
        trained = model(ids).logits

    assert unswap_moe_layers(model) == n
    assert not any(isinstance(m, MoEBlock) for m in model.modules())
    model.save_pretrained(tmp_path)
    model_class = type(model)
    reloaded, info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert len(blocks_of(reloaded, family)) == n
    with torch.no_grad():
        assert_rel_close(reloaded.eval()(ids).logits, trained)
        assert_rel_close(model(ids).logits, trained)
    # The trained weights really moved (the test would pass trivially otherwise).
    assert not torch.allclose(trained, build(family)(ids).logits.detach())


@family_names
def test_swap_and_unswap_count_and_are_idempotent(family):
    model = build(family)
    names = set(model.state_dict())
    n = len(blocks_of(model, family))
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


# The families whose transformers router keeps a float64 block in float64. The others compute their scores
# in float32 whatever the input (softmax(..., dtype=torch.float), or a float32 router matmul), where moe_ext
# routes in the input's precision: in float64 they agree to float32 rounding (1e-5, the float32 tolerance).
FLOAT64_ROUTERS = {"gpt_oss"}


def _block_run(block: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = block(x)
    out = out[0] if isinstance(out, tuple) else out
    (out * grad).sum().backward()
    return out.detach(), x.grad


@family_names
def test_block_float64_output_and_gradients(family):
    """One block on its own in float64: output, input gradient and every parameter's gradient."""
    model = build(family).double()
    model.set_experts_implementation("eager")  # grouped_mm has no float64 kernel
    block = blocks_of(model, family)[0]
    holder = nn.ModuleDict({"mlp": copy.deepcopy(block)})
    assert swap_moe_layers(holder) == 1
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 7, COMMON["hidden_size"], dtype=torch.float64, generator=generator)
    grad = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    rel = 1e-10 if family in FLOAT64_ROUTERS else 1e-5

    expected, expected_dx = _block_run(block, x, grad)
    actual, actual_dx = _block_run(holder["mlp"], x, grad)
    assert_rel_close(actual, expected, rel)
    assert_rel_close(actual_dx, expected_dx, rel)
    with torch.no_grad():
        for p in holder.parameters():
            p.copy_(p.grad)
    assert unswap_moe_layers(holder) == 1
    assert type(holder["mlp"]) is type(block)
    grads = dict(holder["mlp"].named_parameters())
    for name, p in block.named_parameters():
        if p.requires_grad:
            assert_rel_close(grads[name], p.grad, rel)


@pytest.mark.parametrize("selection, normalize", [("softmax", False), ("sigmoid", True), ("sigmoid", False)])
def test_cohere2_selection_functions(selection, normalize):
    if "cohere2_moe" not in supported_families():
        pytest.skip(f"the installed transformers {transformers.__version__} has no cohere2_moe model")
    settings = dict(FAMILIES["cohere2_moe"], expert_selection_fn=selection, norm_topk_prob=normalize)
    config = transformers.AutoConfig.for_model("cohere2_moe", **COMMON, **settings)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).double().eval()
    model.set_experts_implementation("eager")
    block = blocks_of(model, "cohere2_moe")[0]
    with torch.no_grad():
        _perturb(block)
    holder = nn.ModuleDict({"mlp": copy.deepcopy(block)})
    assert swap_moe_layers(holder) == 1
    x = torch.randn(3, 5, COMMON["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():  # transformers' softmax runs in float32 (see FLOAT64_ROUTERS), its sigmoid in float64
        assert_rel_close(holder["mlp"](x), block(x), 1e-5 if selection == "softmax" else 1e-10)


@pytest.mark.parametrize(
    "family, config, match",
    [
        ("deepseek_v2", dict(topk_method="group_limited_greedy", n_group=2, topk_group=1), "group_limited_greedy"),
        ("cohere2_moe", dict(shared_expert_combination_strategy="average"), "'average'"),
    ],
)
def test_unreproduced_router_settings_raise(family, config, match):
    if family not in supported_families():
        pytest.skip(f"the installed transformers {transformers.__version__} has no {family} model")
    config = transformers.AutoConfig.for_model(family, **COMMON, **{**FAMILIES[family], **config})
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=match):
        swap_moe_layers(model)
    assert not any(isinstance(m, MoEBlock) for m in model.modules())


# ----- families checked block by block (hybrid, multimodal or heavy-attention models) ------------------

BLOCK_SIZES = dict(
    hidden_size=COMMON["hidden_size"],
    intermediate_size=24,
    moe_intermediate_size=24,
    shared_expert_intermediate_size=16,
    shared_experts_intermediate_size=16,
    shared_intermediate_size=16,
    num_experts=16,
    n_routed_experts=16,
    num_local_experts=16,
    moe_num_experts=16,
    n_shared_experts=1,
    num_shared_experts=1,
    moe_num_shared_experts=1,
    num_experts_per_tok=2,
    moe_topk=2,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    mlp_bias=False,
    num_attention_heads=4,
    num_key_value_heads=2,
    mamba_n_heads=4,
)
# family -> (config model_type, config fields beyond BLOCK_SIZES).
BLOCK_FAMILIES = {
    "mellum": ("mellum", dict(norm_topk_prob=False)),
    "jamba": ("jamba", {}),
    "granitemoe_swa": ("granitemoe_swa", {}),
    "granitemoehybrid": ("granitemoehybrid", {}),
    "aria": ("aria_text", {}),
    "qwen3_5_moe": ("qwen3_5_moe_text", {}),
    "qwen3_vl_moe": ("qwen3_vl_moe_text", {}),
    "qwen4_exp": ("qwen4_exp_text", dict(norm_topk_prob=False)),
    "qwen3_omni_moe_thinker": ("qwen3_omni_moe_text", {}),
    "qwen3_omni_moe_talker": ("qwen3_omni_moe_talker_text", dict(norm_topk_prob=False)),
    "glm4_moe_lite": ("glm4_moe_lite", {}),
    "glm4v_moe": ("glm4v_moe_text", {}),
    "glm_moe_dsa": ("glm_moe_dsa", {}),
    "deepseek_v32": ("deepseek_v32", dict(norm_topk_prob=False)),
    "kimi_linear": ("kimi_linear", {}),
    "bailing_hybrid": ("bailing_hybrid", {}),
    "dots3_note": ("dots3_note_text", dict(num_key_value_heads=4)),
    "deepseek_ocr2": ("deepseek_ocr2_text", dict(topk_method="greedy")),
    "unlimited_ocr": ("unlimited_ocr_text", dict(topk_method="greedy")),
    "mistral4": ("mistral4", dict(norm_topk_prob=False)),
    "mistral_large4": ("mistral_large4_text", {}),
    "minimax_m2": ("minimax_m2", {}),
    "afmoe": ("afmoe", dict(route_scale=2.5)),
    "hy_v3": ("hy_v3", dict(router_scaling_factor=2.5)),
    "flint": ("flint", {}),
    "laguna": ("laguna", dict(routed_scaling_factor=2.5, moe_router_logit_softcapping=0.0)),
}


def build_block(family: str) -> nn.Module:
    model_type, overrides = BLOCK_FAMILIES[family]
    config = transformers.AutoConfig.for_model(model_type, **{**BLOCK_SIZES, **overrides})
    config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    block_class = supported_families()[family]
    torch.manual_seed(0)
    try:
        block = block_class(config)
    except TypeError:  # blocks built per layer
        block = block_class(config, layer_idx=1)
    block = block.double().eval()
    with torch.no_grad():
        for param in block.parameters():  # a standalone block gets no _init_weights: set every tensor
            param.normal_(0.0, 0.2)
        _perturb(block)
    return block


@pytest.mark.parametrize("family", [_family_param(name) for name in BLOCK_FAMILIES])
def test_block_family_output_router_logits_gradients_unswap(family):
    block = build_block(family)
    router_name = "router" if hasattr(block, "router") else "gate"
    recorded = []
    getattr(block, router_name).register_forward_hook(lambda _m, _args, out: recorded.append(out[0].detach()))
    holder = nn.ModuleDict({"mlp": copy.deepcopy(block)})  # the hook travels with the copy
    assert swap_moe_layers(holder) == 1
    assert isinstance(holder["mlp"].moe, moe_ext.MoE)
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(2, 7, COMMON["hidden_size"], dtype=torch.float64, generator=generator)
    grad = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    rel = 1e-10 if family in FLOAT64_ROUTERS else 1e-5  # float32 routing in transformers: see FLOAT64_ROUTERS

    expected, expected_dx = _block_run(block, x, grad)
    actual, actual_dx = _block_run(holder["mlp"], x, grad)
    assert_rel_close(actual, expected, rel)
    assert_rel_close(actual_dx, expected_dx, rel)
    assert len(recorded) == 2  # the router's hooks fire on the swapped block too, with the same logits
    assert_rel_close(recorded[1], recorded[0], rel)
    with torch.no_grad():
        for p in holder.parameters():
            p.copy_(p.grad)
    assert unswap_moe_layers(holder) == 1
    assert type(holder["mlp"]) is type(block)
    grads = dict(holder["mlp"].named_parameters())
    assert grads.keys() == dict(block.named_parameters()).keys()
    for name, p in block.named_parameters():
        if p.requires_grad:
            assert_rel_close(grads[name], p.grad, rel)


def test_laguna_softcapped_router_raises():
    if "laguna" not in supported_families():
        pytest.skip(f"the installed transformers {transformers.__version__} has no laguna model")
    block = build_block("laguna")
    block.gate.router_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="router_logit_softcapping"):
        swap_moe_layers(nn.ModuleDict({"mlp": block}))


def test_experts_with_their_own_gate_raise():
    """A gate other than act_fn(gate) * up (clamped, softcapped) has no moe_ext.MoE activation: no silent swap."""
    if "mellum" not in supported_families():
        pytest.skip(f"the installed transformers {transformers.__version__} has no mellum model")
    block = build_block("mellum")
    block.experts._apply_gate = lambda gate_up: torch.tanh(gate_up.chunk(2, dim=-1)[0])
    with pytest.raises(ValueError, match="gates with its own _apply_gate"):
        swap_moe_layers(nn.ModuleDict({"mlp": block}))


def test_readme_family_table_names_every_family():
    """README's family table: one row per family with a decorated experts class, its full-swap column
    "yes" exactly for the families swap_moe_layers supports."""
    import pathlib
    import re

    from moe_ext.integrations.transformers import _FAMILIES
    from moe_ext.integrations.transformers_experts import decorated_experts_classes

    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| yes \| (yes|no)\b", readme, flags=re.MULTILINE))
    families = {cls.__module__.split(".")[2] for cls in decorated_experts_classes()}
    assert rows.keys() == families
    swapped = {family.module for family in _FAMILIES if family.name in supported_families()}
    assert {family for family, swap in rows.items() if swap == "yes"} == swapped


@pytest.mark.parametrize("family", [_family_param("ernie4_5_moe"), _family_param("hunyuan_v1_moe")])
def test_float32_router_of_a_bfloat16_model_stays_float32(family):
    config = transformers.AutoConfig.for_model(family, **COMMON, **FAMILIES[family])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    blocks = blocks_of(model, family)
    with torch.no_grad():
        for block in blocks:
            _perturb(block)
    names = {name: p.dtype for name, p in model.named_parameters()}
    ids = token_ids()
    with torch.no_grad():
        before = model(ids, output_router_logits=True).router_logits
    assert swap_moe_layers(model) == len(blocks)
    swapped = [m for m in model.modules() if isinstance(m, MoEBlock)]
    assert all(b.moe.router.weight.dtype == torch.float32 and b.moe.w_in.dtype == torch.bfloat16 for b in swapped)
    with torch.no_grad():
        after = model(ids, output_router_logits=True).router_logits
    # The first block's input is the same bfloat16 embedding: its float32 logits agree to float32 rounding.
    assert after[0].dtype == before[0].dtype == torch.float32
    assert_rel_close(after[0], before[0], 1e-5)
    unswap_moe_layers(model)
    assert {name: p.dtype for name, p in model.named_parameters()} == names
