"""Scale and memory: a million tokens through the layer and the ops with peak memory linear in T,
int64 indexing past 2^31 elements, and a flat resident set over 1000 training steps.

Peak memory is the peak of live tensors while a call runs (benchmarks/_common.py's
peak_tensor_bytes: torch.profiler memory events), so it is deterministic; RSS is read from
/proc/self/status in a fresh subprocess so that no other test's allocations move it.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_close

import moe_ext
from moe_ext import ops

ROOT = Path(__file__).resolve().parent.parent


def _benchmark_common():
    spec = importlib.util.spec_from_file_location("moe_ext_benchmarks_common", ROOT / "benchmarks" / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


peak_tensor_bytes = _benchmark_common().peak_tensor_bytes

H, F, E, K = 8, 16, 8, 2
SMALL, LARGE = 250_000, 1_000_000


def available_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def report(name: str, T: int, seconds: float, peak: int) -> None:
    print(f"{name}: T = {T:,}: {seconds:.2f} s, peak {peak / 2**20:.0f} MiB ({peak / T:.0f} B/token)")


def assert_linear(peaks: dict[int, int], what: str) -> None:
    """Peak bytes grow like T: the per-token cost at the large size is within 5% of the small one
    (a T*log T or T^2 term, or a buffer sized by something other than T, would break this)."""
    per_token = {T: peak / T for T, peak in peaks.items()}
    small, large = per_token[SMALL], per_token[LARGE]
    assert 0.95 * small <= large <= 1.05 * small, f"{what}: bytes per token {per_token} are not constant"


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    return moe_ext.MoE(H, F, E, top_k=K)


def tokens(T: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(T, H, generator=torch.Generator().manual_seed(seed))


def test_million_tokens_layer_forward_and_training_step(layer):
    peaks_forward, peaks_train = {}, {}
    for T in (SMALL, LARGE):
        x = tokens(T)

        def forward(x=x):
            with torch.no_grad():
                return layer(x)

        def train_step(x=x):
            layer(x).pow(2).mean().backward()

        start = time.perf_counter()
        y = forward()
        seconds = time.perf_counter() - start
        peaks_forward[T] = peak_tensor_bytes(forward)
        report("layer forward", T, seconds, peaks_forward[T])
        assert y.shape == (T, H) and torch.isfinite(y).all()
        if T == LARGE:
            # Tokens are routed independently (dropless): a sample of rows equals the layer on those rows alone.
            rows = torch.randint(0, T, (512,), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                assert_close(y[rows], layer(x[rows]).double(), torch.float32, "rows of the 1M-token forward")
            assert layer.last_stats is not None

        layer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        train_step()
        seconds = time.perf_counter() - start
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
        peaks_train[T] = peak_tensor_bytes(train_step, setup=lambda: layer.zero_grad(set_to_none=True))
        report("layer forward + backward", T, seconds, peaks_train[T])
    assert_linear(peaks_forward, "layer forward")
    assert_linear(peaks_train, "layer forward + backward")


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
def test_million_tokens_ops(capacity_factor):
    w_in = torch.randn(E, H, F, generator=torch.Generator().manual_seed(2)) / math.sqrt(H)
    w_out = torch.randn(E, F, H, generator=torch.Generator().manual_seed(3)) / math.sqrt(F)
    router = torch.randn(H, E, generator=torch.Generator().manual_seed(4))

    def pipeline(x):
        logits = x @ router
        weights, indices, scores = ops.topk_gating(logits, K)
        capacity = None if capacity_factor is None else math.ceil(capacity_factor * x.shape[0] * K / E)
        plan = ops.make_plan(indices, E, capacity, None if capacity is None else weights)
        h = torch.relu(ops.grouped_mm(ops.dispatch(x, plan), w_in, plan.offsets))
        y = ops.combine(ops.grouped_mm(h, w_out, plan.offsets), weights, plan)
        losses = ops.load_balancing_loss(scores, indices, E), ops.router_z_loss(logits)
        return y, plan, indices, losses

    peaks = {}
    for T in (SMALL, LARGE):
        x = tokens(T, seed=5)
        start = time.perf_counter()
        y, plan, indices, losses = pipeline(x)
        seconds = time.perf_counter() - start
        peaks[T] = peak_tensor_bytes(lambda x=x: pipeline(x))
        report(f"ops pipeline ({'dropless' if capacity_factor is None else 'capacity'})", T, seconds, peaks[T])
        assert y.shape == (T, H) and torch.isfinite(y).all() and all(torch.isfinite(v) for v in losses)
        kept = plan.row_of >= 0
        rows = plan.row_of[kept]
        assert torch.equal(plan.counts, torch.bincount(indices.reshape(-1), minlength=E))
        assert rows.unique().numel() == rows.numel(), "two assignments share a row"
        assert torch.equal(plan.token_of[rows], torch.arange(T).unsqueeze(1).expand(T, K)[kept])
        if capacity_factor is None:
            assert bool(kept.all()), "dropless plan dropped an assignment"
    assert_linear(peaks, "ops pipeline")


# 2^27 features x 18 rows = 2.4e9 elements (4.8 GB in bfloat16): row r starts at element r * 2^27,
# past 2^31 for r >= 16 (and past 2^32 bytes), where an int32 offset would wrap.
BIG_H, BIG_TOKENS, BIG_K, BIG_E = 2**27, 2, 9, 3
BIG_BYTES_NEEDED = 12 * 2**30


@pytest.mark.slow
@pytest.mark.skipif(
    available_memory_bytes() < BIG_BYTES_NEEDED,
    reason=f"needs {BIG_BYTES_NEEDED / 2**30:.0f} GiB of free memory for a 4.8 GB dispatch buffer",
)
def test_dispatch_and_combine_past_two_to_the_31_elements():
    pattern = torch.arange(1, 8, dtype=torch.bfloat16).repeat(BIG_H // 7 + 1)[:BIG_H]
    x = torch.stack([pattern, pattern + 1])  # small integers: every sum below is exact in bfloat16
    indices = torch.arange(BIG_TOKENS * BIG_K).reshape(BIG_TOKENS, BIG_K) % BIG_E
    plan = ops.make_plan(indices, BIG_E)
    N = plan.token_of.shape[0]
    assert N * BIG_H > 2**31 and (N - 1) * BIG_H * x.element_size() > 2**32

    x_sorted = ops.dispatch(x, plan)
    for r in range(N):
        t = int(plan.token_of[r])
        assert torch.equal(x_sorted[r, :4096], x[t, :4096]) and torch.equal(x_sorted[r, -4096:], x[t, -4096:]), r
    assert torch.equal(x_sorted[N - 1], x[int(plan.token_of[N - 1])]), "the last row (past 2^31 elements)"

    # Every token's k rows summed back: k * x, exactly.
    expected = (x.float() * BIG_K).to(torch.bfloat16)
    y = ops.combine(x_sorted, torch.ones(BIG_TOKENS, BIG_K), plan)
    assert torch.equal(y, expected), "combine read a row past 2^31 elements wrongly"
    del y
    grad_x = torch.ops.moe_ext.dispatch_backward(x_sorted, plan.token_of, plan.row_of)
    assert torch.equal(grad_x, expected), "dispatch_backward read a row past 2^31 elements wrongly"


RSS_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import moe_ext

    def rss_kib():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    # One intra-op thread: a leak shows the same way, and the run does not depend on how busy
    # the (shared) cores are.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    layer = moe_ext.MoE(16, 32, 4, top_k=2, capacity_factor=1.25, z_loss_coef=1e-3)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    x = torch.randn(4, 16, 16)
    target = torch.randn(4, 16, 16)
    samples = {}
    for step in range(1, 1001):
        optimizer.zero_grad(set_to_none=True)
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        optimizer.step()
        if step in (100, 1000):
            samples[step] = rss_kib()
    assert torch.isfinite(loss)
    print(samples[100], samples[1000])
    """
)


def test_rss_is_flat_over_1000_training_steps():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT], capture_output=True, text=True, timeout=180, env=env, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    after_warmup, at_end = (int(v) for v in done.stdout.split()[-2:])
    growth = at_end - after_warmup
    print(f"VmRSS after 100 steps {after_warmup} KiB, after 1000 steps {at_end} KiB, growth {growth} KiB")
    # Leaking even one 4 KiB tensor (or a graph) per step would add > 3.5 MiB over the 900 steps.
    assert growth < 2048, f"RSS grew by {growth} KiB between step 100 and step 1000"
