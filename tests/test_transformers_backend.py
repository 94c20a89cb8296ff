"""The "moe_ext" transformers experts implementation against transformers' eager experts: every decorated
experts class on its own (outputs and every gradient, empty experts, expert-parallel sentinels), and whole
tiny models of many families (logits, a training step, generate, save_pretrained / from_pretrained)."""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from transformers import PreTrainedConfig  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: E402

import moe_ext.integrations.transformers  # noqa: E402, F401  (registers "moe_ext")
from moe_ext.integrations.transformers_experts import (  # noqa: E402
    decorated_experts_classes,
    experts_forward,
    experts_layout,
)

# transformers 5.23 (the pinned version) decorates 65 experts classes in 64 families. A new class makes
# this count fail, so that it gets looked at (and its family added to the tables below) instead of
# passing unseen.
EXPECTED_CLASSES = 65
CLASSES = decorated_experts_classes()
CLASS_IDS = [cls.__name__ for cls in CLASSES]

HIDDEN, FFN, NUM_EXPERTS, TOP_K, TOKENS = 8, 6, 4, 2, 7
# Config fields that size an experts module, under every name the families use.
EXPERT_SIZES = dict(
    hidden_size=HIDDEN,
    moe_hidden_size=HIDDEN,
    intermediate_size=FFN,
    moe_intermediate_size=FFN,
    expert_intermediate_size=FFN,
    num_experts=NUM_EXPERTS,
    n_routed_experts=NUM_EXPERTS,
    num_local_experts=NUM_EXPERTS,
    moe_num_experts=NUM_EXPERTS,
    num_experts_per_tok=TOP_K,
)
# Classes whose gate is a function of its own (clamped, softcapped, float32...): moe_ext's fused SwiGLU must not run.
OWN_GATE = {
    "BeamExperts",
    "DeepseekV4Experts",
    "Glm5NextTextExperts",
    "GptOssExperts",
    "HYV4Experts",
    "Inkling2Experts",
    "MiniMaxM3VLExperts",
    "OpenAIPrivacyFilterExperts",
}

# Classes whose eager math rounds to float32 somewhere whatever the dtype (the gate, the post-expert norm,
# the sum over experts, every matmul): float64 runs match to float32's tolerance only (a last-bit
# difference in a float64 matmul, or another summation order, can flip a float32 rounding).
FLOAT32_MATH = {"BeamExperts", "Inkling2Experts", "MuseSparkExperts", "OpenAIPrivacyFilterExperts"}


def test_every_decorated_class_is_found():
    assert len(CLASSES) == EXPECTED_CLASSES, sorted(CLASS_IDS)
    assert len({cls.__module__ for cls in CLASSES}) == EXPECTED_CLASSES - 1  # Qwen3-Omni: thinker and talker
    assert ALL_EXPERTS_FUNCTIONS["moe_ext"] is experts_forward


def _config_classes(cls: type) -> list[type]:
    """The family's config classes, the one named most like ``cls`` first (Qwen3OmniMoeThinkerText...)."""
    configs = importlib.import_module(cls.__module__.replace(".modeling_", ".configuration_"))
    found = [
        c
        for c in vars(configs).values()
        if inspect.isclass(c) and issubclass(c, PreTrainedConfig) and c.__module__ == configs.__name__
    ]

    def shared_prefix(c: type) -> int:
        return len(os.path.commonprefix([c.__name__, cls.__name__]))

    return sorted(found, key=lambda c: (-shared_prefix(c), c.__name__))


def _set_sizes(config: PreTrainedConfig) -> PreTrainedConfig:
    for name, value in EXPERT_SIZES.items():
        if hasattr(config, name):
            try:
                setattr(config, name, value)
            except Exception:  # noqa: BLE001 -- Ernie 4.5 VL's strict field: a list of sizes (text, vision)
                setattr(config, name, [value, value])
    return config


@functools.cache
def _tiny_config(cls: type) -> PreTrainedConfig:
    """A config of ``cls``'s family that builds a tiny ``cls`` (H = 8, F = 6, E = 4)."""
    errors = []
    for config_class in _config_classes(cls):
        try:
            config = _set_sizes(config_class())
            with torch.device("meta"):
                module = _construct(cls, config)
        except Exception as error:  # noqa: BLE001 -- the family's other config classes are tried next
            errors.append(f"{config_class.__name__}: {error!r}")
            continue
        size = sum(p.numel() for p in module.parameters())
        if module.num_experts == NUM_EXPERTS and size < 10_000:
            return config
        errors.append(f"{config_class.__name__}: {size} parameters, {module.num_experts} experts")
    raise AssertionError(f"no tiny config builds {cls.__name__}: {errors}")


def _construct(cls: type, config: PreTrainedConfig):
    if isinstance(getattr(config, "moe_intermediate_size", None), list):
        return cls(config, intermediate_size=FFN)
    return cls(config)


def _tiny_experts(cls: type, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    module = _construct(cls, _tiny_config(cls)).to(dtype)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, dtype=torch.float64) * 0.7)
    return module


def _routing(dtype: torch.dtype, seed: int = 0):
    """T tokens, k = 2 distinct experts each among 0..2: expert 3 gets no token (an empty expert)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64) * 2).to(dtype)
    indices = torch.stack([torch.randperm(NUM_EXPERTS - 1, generator=g)[:TOP_K] for _ in range(TOKENS)])
    weights = torch.rand(TOKENS, TOP_K, generator=g, dtype=torch.float64).to(dtype) + 0.1
    grad = torch.randn(TOKENS, HIDDEN, generator=g, dtype=torch.float64).to(dtype)
    return x, indices, weights, grad


def _run(module, implementation: str, x, indices, weights, grad):
    """(output, [grad of x, grad of weights, grad of every parameter]) with the given experts implementation."""
    module.config._experts_implementation = implementation
    module.zero_grad(set_to_none=True)
    x, weights = x.clone().requires_grad_(), weights.clone().requires_grad_()
    out = module(x, indices, weights)
    out.backward(grad)
    grads = {"hidden_states": x.grad, "routing_weights": weights.grad}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return out.detach(), grads


def _assert_same(actual, expected, tolerance: float) -> None:
    out, grads = actual
    ref_out, ref_grads = expected
    torch.testing.assert_close(out, ref_out, rtol=tolerance, atol=tolerance)
    assert grads.keys() == ref_grads.keys()
    for name, ref in ref_grads.items():
        assert grads[name] is not None, name
        torch.testing.assert_close(grads[name], ref, rtol=tolerance, atol=tolerance, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-5)], ids=["f64", "f32"])
@pytest.mark.parametrize("cls", CLASSES, ids=CLASS_IDS)
def test_experts_match_eager(cls, dtype, tolerance):
    if cls.__name__ in FLOAT32_MATH:
        tolerance = max(tolerance, 1e-5)
    module = _tiny_experts(cls, dtype)
    layout = experts_layout(module)
    if cls.__name__ in OWN_GATE:
        assert layout.activation == module._apply_gate
    elif module.has_gate and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation", "function"):
        assert layout.activation == "swiglu"  # the plain SwiGLU: moe_ext's fused op
    routing = _routing(dtype, seed=len(cls.__name__))
    eager = _run(module, "eager", *routing)
    served = _run(module, "moe_ext", *routing)
    _assert_same(served, eager, tolerance)
    # Expert 3 got no token: its weights get an exact zero gradient (no garbage rows reached it).
    for name, param in module.named_parameters():
        if param.dim() >= 2 and param.shape[0] == NUM_EXPERTS:
            assert served[1][name][NUM_EXPERTS - 1].abs().max() == 0, name


@pytest.mark.parametrize("cls", CLASSES, ids=CLASS_IDS)
def test_sentinel_indices_add_nothing(cls):
    """Expert parallelism marks tokens routed to another rank's experts with index >= num_experts: they add
    nothing and get no gradient. Reference: eager with those assignments routed to expert 0 at weight 0."""
    module = _tiny_experts(cls, torch.float64)
    module._is_expert_parallel = True
    x, indices, weights, grad = _routing(torch.float64, seed=3)
    sentinel = torch.zeros_like(indices, dtype=torch.bool)
    sentinel[::2, 1] = True
    sentinel[1] = True  # a token with every expert elsewhere
    served = _run(module, "moe_ext", x, indices.masked_fill(sentinel, NUM_EXPERTS), weights, grad)
    out, grads = _run(module, "eager", x, indices.masked_fill(sentinel, 0), weights.masked_fill(sentinel, 0), grad)
    grads["routing_weights"] = grads["routing_weights"].masked_fill(sentinel, 0)
    _assert_same(served, (out, grads), 1e-5 if cls.__name__ in FLOAT32_MATH else 1e-10)
    assert served[0][1].abs().max() == 0 and served[1]["hidden_states"][1].abs().max() == 0


def test_unservable_class_raises_naming_it():
    module = _tiny_experts(CLASSES[0], torch.float32)
    module.gate_up_proj = torch.nn.Parameter(module.gate_up_proj.detach().to(torch.int8), requires_grad=False)
    module.config._experts_implementation = "moe_ext"
    x, indices, weights, _ = _routing(torch.float32)
    with pytest.raises(ValueError, match=f"cannot serve {CLASSES[0].__name__}: gate_up_proj is torch.int8"):
        module(x, indices, weights)


# ----- whole tiny models ------------------------------------------------------------------------------

VOCAB = 64
MODEL_SIZES = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    intermediate_size=24,
    moe_intermediate_size=8,
    shared_expert_intermediate_size=8,
    num_experts=4,
    n_routed_experts=4,
    num_local_experts=4,
    moe_num_experts=4,
    n_shared_experts=1,
    num_experts_per_tok=2,
    first_k_dense_replace=0,
    n_group=1,
    topk_group=1,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
# family -> config fields beyond MODEL_SIZES. Together they cover the layouts: interleaved, transposed,
# biased and clamped (GPT-OSS), has_gate=False (Nemotron-H), a clamped SwiGLU (DeepSeek-V4), the plain
# SwiGLU of the rest; shared experts, sigmoid and grouped routers, hybrid attention.
MODEL_FAMILIES = {
    "mixtral": {},
    "qwen2_moe": {},
    "qwen3_moe": {},
    "olmoe": {},
    "deepseek_v3": dict(
        head_dim=4, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, kv_lora_rank=8, q_lora_rank=None
    ),
    "deepseek_v4": {},
    "gpt_oss": {},
    "glm4_moe": {},
    "granitemoe": {},
    "granitemoeshared": {},
    "hunyuan_v1_moe": {},
    "ernie4_5_moe": {},
    "dots1": {},
    "phimoe": {},
    "flex_olmo": {},
    "exaone_moe": {},
    "solar_open": {},
    "minimax": {},
    "minimax_m2": {},
    "nemotron_h": dict(layers_block_type=["moe", "full_attention"]),  # no Mamba layer: its reference code is slow
    "cohere2_moe": {},
    "mimo_v2_flash": {},
}


def _tiny_model(family: str):
    config = transformers.AutoConfig.for_model(family, **{**MODEL_SIZES, **MODEL_FAMILIES[family]})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    experts = [m for m in model.modules() if type(m) in set(CLASSES)]
    assert experts, f"{family}: no decorated experts module in the tiny model"
    with torch.no_grad():  # some families initialize their experts to zero: make every expert count
        for module in experts:
            for param in module.parameters():
                param.normal_(0.0, 0.3)
    return model.eval()


def _logits(model, ids, implementation: str):
    model.set_experts_implementation(implementation)
    with torch.no_grad():
        return model(ids).logits


def _training_gradients(model, ids, implementation: str) -> dict:
    model.set_experts_implementation(implementation)
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the same draws for routers that sample in training (PhiMoE's sparsemixer)
    model(ids, labels=ids).loss.backward()
    model.eval()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def count_backend_calls(monkeypatch):
    """Counts the calls that reach moe_ext's experts forward through transformers' interface."""
    calls = []

    def counting(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return experts_forward(module, *args, **kwargs)

    monkeypatch.setitem(ALL_EXPERTS_FUNCTIONS._global_mapping, "moe_ext", counting)
    return calls


@pytest.mark.parametrize("family", sorted(MODEL_FAMILIES))
def test_tiny_model_matches_eager(family, tmp_path, count_backend_calls):
    model = _tiny_model(family)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))

    eager = _logits(model, ids, "eager")
    assert not count_backend_calls
    served = _logits(model, ids, "moe_ext")
    assert count_backend_calls, f"{family}: the moe_ext experts implementation never ran"
    torch.testing.assert_close(served, eager, rtol=1e-5, atol=1e-5)

    eager_grads = _training_gradients(model, ids, "eager")
    served_grads = _training_gradients(model, ids, "moe_ext")
    assert served_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(served_grads[name], grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")

    generated = {}
    for implementation in ("eager", "moe_ext"):
        model.set_experts_implementation(implementation)
        generated[implementation] = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert torch.equal(generated["moe_ext"], generated["eager"])

    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, experts_implementation="moe_ext").eval()
    assert loaded.config._experts_implementation == "moe_ext"
    calls = len(count_backend_calls)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, served, rtol=1e-6, atol=1e-6)
    assert len(count_backend_calls) > calls


def test_weights_reach_moe_ext_without_a_copy():
    """Mixtral's experts store [E, out, in]; moe_ext reads their transpose views as they are: no ATen op copies a
    tensor of a weight's shape in the forward or the backward, and each parameter's gradient has its layout."""
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    module = _tiny_experts(MixtralExperts, torch.float32)
    module.config._experts_implementation = "moe_ext"
    shapes = {tuple(p.shape) for p in module.parameters()}
    shapes |= {shape[:1] + shape[:0:-1] for shape in shapes}  # and their transposes
    x, indices, weights, grad = _routing(torch.float32)
    x.requires_grad_()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        module(x, indices, weights).backward(grad)
    copies = [
        (e.name, e.input_shapes)
        for e in prof.events()
        if e.name in ("aten::clone", "aten::copy_", "aten::contiguous")
        and any(tuple(shape) in shapes for shape in e.input_shapes if isinstance(shape, list))
    ]
    assert copies == [], copies
    for name, param in module.named_parameters():
        assert param.grad.stride() == param.stride(), name


def test_bench_hf_experts_smoke(tmp_path):
    """benchmarks/bench_hf_experts.py at tiny sizes: every family and implementation runs, checks pass, JSON written."""
    root = Path(__file__).resolve().parent.parent
    path = tmp_path / "bench_hf_experts.json"
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "bench_hf_experts.py"), "--quick", "--dtypes", "float32",
         "--repeats", "1", "--warmup", "1", "--min-seconds", "0", "--output", str(path)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(path.read_text())["runs"]
    assert sorted(r["family"] for r in runs) == ["deepseek_v3", "gpt_oss", "mixtral", "qwen3_moe"]
    for r in runs:
        assert set(r["results"]) == {"eager", "grouped_mm", "batched_mm", "moe_ext", "swap"}, r["family"]
        assert all(err <= 1e-4 for err in r["checks"].values()), (r["family"], r["checks"])
        for per_mode in r["results"].values():
            assert per_mode["forward"]["median_s"] > 0 and per_mode["forward+backward"]["median_s"] > 0
