"""Bitwise determinism across thread counts: every output and gradient of the layer, 1 to 4 threads.

The promise is that no bit of a result depends on how many threads run it, whatever BLAS library
and CPU torch uses. The hazard is the BLAS library's own threading: MKL on Intel CPUs splits the
reduction of a GEMM with a small output and a long reduction (the router's weight gradient, the
shared expert's gate) between threads. On AMD CPUs MKL takes other code paths that never split, so
a plain run there cannot see the hazard: ``test_again_with_intel_mkl_code_paths`` runs this module
once more in a subprocess where MKL takes the code paths it takes on Intel (tests/blas_paths), and
first checks that torch's own ``mm`` then does differ between thread counts.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import DTYPE_IDS, assert_bitwise_equal

import moe_ext
from moe_ext.presets import PRESETS

THREADS = (1, 2, 3, 4)  # 3 and 4 oversubscribe a 2-core machine: still valid thread counts

# Small layers, but T long enough that the weight-gradient reductions are long.
H, F, T = 64, 96, 1500
PRESET_OVERRIDES = {
    # Fewer experts than the published systems, same routing rules.
    "qwen3_moe": {"num_experts": 16},
    "olmoe": {"num_experts": 16},
    "deepseek_v3": {"num_experts": 32},
}
CONFIGS = {
    **{f"preset-{name}": ("preset", name, PRESET_OVERRIDES.get(name, {})) for name in PRESETS},
    "dropless-shared-gated-biases": (
        "plain",
        None,
        dict(num_experts=8, top_k=2, shared_expert_size=F, shared_expert_gate=True, expert_bias=True, router_bias=True),
    ),
    "capacity-probs-geglu": (
        "plain",
        None,
        dict(num_experts=8, top_k=2, capacity_factor=1.0, drop_policy="probs", activation="geglu", z_loss_coef=1e-3),
    ),
    "noisy-sigmoid-fp32-router": (
        "plain",
        None,
        dict(
            num_experts=8,
            top_k=2,
            noisy_gating=True,
            load_loss_coef=0.1,
            importance_loss_coef=0.1,
            score_func="sigmoid",
            router_dtype=torch.float32,
        ),
    ),
}
DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _build(config: str, dtype: torch.dtype) -> moe_ext.MoE:
    kind, preset, kwargs = CONFIGS[config]
    torch.manual_seed(0)
    if kind == "preset":
        layer = moe_ext.MoE.from_preset(preset, H, F, dtype=dtype, **kwargs)
    else:
        layer = moe_ext.MoE(H, F, dtype=dtype, **kwargs)
    with torch.no_grad():  # zero-initialized parts (noise projection, router bias) get values too
        for param in layer.parameters():
            if not param.any():
                param.uniform_(-0.1, 0.1)
    return layer


def _step(layer: moe_ext.MoE, state: dict, x: torch.Tensor, probe: torch.Tensor) -> dict:
    """One training forward and backward from the same parameters and RNG state: every result."""
    layer.load_state_dict(state)
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # jitter, noise, random routing, random drops
    x = x.detach().clone().requires_grad_(True)
    y = layer(x.reshape(-1, 500, x.shape[-1]))  # sequences of 500 (the sequence-wise aux loss)
    (y.reshape(x.shape).float() * probe).sum().backward()
    out = {"y": y.detach(), "grad x": x.grad, "aux_loss": layer.aux_loss.detach()}
    out.update({f"grad {n}": p.grad for n, p in layer.named_parameters() if p.grad is not None})
    out.update({f"buffer {n}": b.clone() for n, b in layer.named_buffers()})
    out.update({f"stats {n}": v for n, v in layer.last_stats._asdict().items()})
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_layer_bitwise_same_for_1_to_4_threads(config, dtype, restore_num_threads):
    layer = _build(config, dtype).train()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(T, H, generator=generator).to(dtype)
    probe = torch.randn(T, H, generator=generator)
    results = {}
    for threads in THREADS:
        torch.set_num_threads(threads)
        results[threads] = _step(layer, state, x, probe)
    # every parameter got a gradient (a layer part that silently trains nothing is not "deterministic")
    assert {f"grad {n}" for n, _ in layer.named_parameters()} <= set(results[1]), sorted(results[1])
    for threads in THREADS[1:]:
        assert results[threads].keys() == results[1].keys()
        for name, value in results[1].items():
            assert_bitwise_equal(results[threads][name], value, f"{config} {name}: {threads} threads vs 1")


def test_full_reductions_bitwise_same_for_1_to_4_threads(restore_num_threads):
    """Over 32768 tokens ATen's full reductions (sum/mean of a whole tensor) split between threads; the
    layer's aux losses and statistics must not depend on that."""
    torch.manual_seed(0)
    layer = moe_ext.MoE(
        8, 16, 4, top_k=2, z_loss_coef=1e-3, importance_loss_coef=0.1, seq_aux_loss_coef=1e-3, noisy_gating=True
    )
    layer.load_loss_coef = 0.1
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    # whether a split sum rounds differently depends on the values: a few inputs make a miss unlikely
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        x, probe = torch.randn(100_000, 8, generator=generator), torch.randn(100_000, 8, generator=generator)
        results = {}
        for threads in THREADS:
            torch.set_num_threads(threads)
            results[threads] = _step(layer, state, x, probe)
        for threads in THREADS[1:]:
            for name, value in results[1].items():
                assert_bitwise_equal(results[threads][name], value, f"input {seed}, {name}: {threads} threads vs 1")


@pytest.mark.parametrize("dtype", DTYPES, ids=[DTYPE_IDS[d] for d in DTYPES])
def test_transformers_experts_bitwise_same_for_1_to_4_threads(dtype, restore_num_threads):
    """The "moe_ext" experts implementation on transformers' [E, out, in] weights, which grouped_mm reads
    through their transposes: output, input and routing-weight gradients and weight gradients at 1 to 4
    threads. Rows per expert on both sides of the small-rows kernel's limit (a 4-token batch too)."""
    pytest.importorskip("transformers")
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralExperts

    import moe_ext.integrations.transformers  # noqa: F401  (registers "moe_ext")

    config = MixtralConfig(hidden_size=H, intermediate_size=F, num_local_experts=8, num_experts_per_tok=2)
    config._experts_implementation = "moe_ext"
    torch.manual_seed(0)
    experts = MixtralExperts(config).to(dtype)
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0.0, H**-0.5)
    for tokens in (T, 4):
        generator = torch.Generator().manual_seed(tokens)
        x = torch.randn(tokens, H, generator=generator).to(dtype)
        indices = torch.stack([torch.randperm(8, generator=generator)[:2] for _ in range(tokens)])
        weights = torch.rand(tokens, 2, generator=generator).to(dtype)
        probe = torch.randn(tokens, H, generator=generator).to(dtype)
        results = {}
        for threads in THREADS:
            torch.set_num_threads(threads)
            experts.zero_grad(set_to_none=True)
            xg, wg = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
            y = experts(xg, indices, wg)
            y.backward(probe)
            results[threads] = {"y": y.detach(), "grad x": xg.grad, "grad weights": wg.grad}
            results[threads].update({f"grad {n}": p.grad for n, p in experts.named_parameters()})
        for threads in THREADS[1:]:
            for name, value in results[1].items():
                assert_bitwise_equal(results[threads][name], value, f"T={tokens} {name}: {threads} threads vs 1")


# --------------------------------------------------------------------------------------------
# The same module again with MKL on the code paths of Intel CPUs
# --------------------------------------------------------------------------------------------

BLAS_PATHS = os.path.join(os.path.dirname(__file__), "blas_paths")
_CHILD = "MOE_EXT_TEST_INTEL_MKL_PATHS"


def _mkl_threads_the_reduction() -> bool:
    """Whether torch's own mm gives other bits at 2 threads than at 1 for a long reduction."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, 8, generator=generator), torch.randn(4096, 64, generator=generator)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = a.t() @ b
        torch.set_num_threads(2)
        two = a.t() @ b
    finally:
        torch.set_num_threads(n)
    return not torch.equal(one, two)


@pytest.mark.skipif(os.environ.get(_CHILD) == "1", reason="already the run on Intel MKL code paths")
def test_again_with_intel_mkl_code_paths(tmp_path):
    if "BLAS_INFO=mkl" not in torch.__config__.show():
        pytest.skip("torch is not built with MKL: the Intel MKL code paths do not exist here")
    library = tmp_path / "libmkl_intel_paths.so"
    subprocess.run(
        ["cc", "-shared", "-fPIC", "-O2", "-o", str(library), os.path.join(BLAS_PATHS, "mkl_intel_paths.c")],
        check=True,
    )
    env = dict(os.environ, LD_PRELOAD=str(library), **{_CHILD: "1"})
    # The hazard must be real in the child, or the run below proves nothing.
    canary = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
         "import test_determinism as t; print(t._mkl_threads_the_reduction())"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert canary.stdout.strip() == "True", (
        "with MKL on its Intel code paths, torch.mm should differ between 1 and 2 threads for a long reduction; "
        f"it did not (stdout {canary.stdout!r}, stderr {canary.stderr[-2000:]!r})"
    )
    # this module, and every op-level thread-count test
    here = os.path.dirname(__file__)
    files = [__file__] + [os.path.join(here, f) for f in ("test_linear.py", "test_ops.py", "test_activation.py")]
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "thread", *files],
        env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
    )  # fmt: skip
    assert run.returncode == 0, f"determinism tests fail on Intel MKL code paths:\n{run.stdout[-6000:]}"
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]
