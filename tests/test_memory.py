"""The CPU output cache (moe_ext.memory): reuse, limits, dirty blocks, the profiler's view, threads.

Large CPU outputs (>= 1 MiB) of moe_ext's operators reuse blocks that earlier outputs freed. The
cache is process-wide, so every test reads deltas of its counters and restores the limit.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import assert_bitwise_equal
from reference import ref_combine, ref_dispatch, ref_grouped_mm

import moe_ext
from moe_ext import memory, ops

MiB = 2**20


@pytest.fixture(autouse=True)
def fresh_cache():
    limit = memory.cpu_cache_info()["limit_bytes"]
    memory.empty_cpu_cache()
    yield
    memory.set_cpu_cache_limit(limit)
    memory.empty_cpu_cache()


def delta(before: dict, after: dict, key: str) -> int:
    return after[key] - before[key]


def grouped_inputs(rows=(40, 0, 24, 64), hidden=512, out=1024, seed=0):
    """x [N, hidden], w [E, hidden, out], offsets: one expert with no rows (its weight grad must be 0)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(rows), hidden, generator=g)
    w = torch.randn(len(rows), hidden, out, generator=g)
    offsets = torch.tensor([0, *torch.tensor(rows).cumsum(0).tolist()])
    grad = torch.randn(sum(rows), out, generator=g)
    return x, w, offsets, grad


def test_a_freed_large_output_is_reused_and_values_stay_exact():
    x, w, offsets, grad = grouped_inputs()  # grad_w: 4 * 512 * 1024 * 4 B = 8 MiB
    before = memory.cpu_cache_info()
    _, grad_w = torch.ops.moe_ext.grouped_mm_backward(grad, x, w, offsets)
    first = grad_w.clone()
    mid = memory.cpu_cache_info()
    assert delta(before, mid, "misses") == 1 and delta(before, mid, "hits") == 0
    assert mid["in_use_bytes"] - before["in_use_bytes"] == 8 * MiB
    del grad_w
    freed = memory.cpu_cache_info()
    assert freed["cached_bytes"] - before["cached_bytes"] == 8 * MiB
    assert freed["in_use_bytes"] == before["in_use_bytes"]
    _, grad_w = torch.ops.moe_ext.grouped_mm_backward(grad, x, w, offsets)
    after = memory.cpu_cache_info()
    assert delta(mid, after, "hits") == 1 and delta(mid, after, "misses") == 0
    assert after["cached_bytes"] == before["cached_bytes"]
    assert_bitwise_equal(grad_w, first, "reused block")
    ref = torch.stack(
        [x[offsets[e] : offsets[e + 1]].double().T @ grad[offsets[e] : offsets[e + 1]].double() for e in range(4)]
    )
    torch.testing.assert_close(grad_w.double(), ref, rtol=1e-5, atol=1e-4)
    assert torch.count_nonzero(grad_w[1]) == 0  # the expert without rows


def test_dirty_blocks_never_leak_into_results():
    """Every op that takes large outputs from the cache writes all of them: a block full of NaN
    from the previous step changes no bit of the next result."""
    torch.manual_seed(0)
    T, H, E, k = 1024, 256, 8, 2
    x = torch.randn(T, H)
    _, indices, _ = ops.topk_gating(torch.randn(T, E), k)
    weights = torch.rand(T, k)
    plan = ops.make_plan(indices, E)
    x_sorted_ref = ref_dispatch(x, plan.token_of)
    w_in = torch.randn(E, H, 1024) * 0.05
    h = torch.randn(plan.token_of.shape[0], 1024)
    grad = torch.randn(plan.token_of.shape[0], 1024)
    calls = {
        "dispatch": lambda: ops.dispatch(x, plan),
        "combine": lambda: ops.combine(x_sorted_ref.float(), weights, plan),
        "grouped_mm": lambda: ops.grouped_mm(x_sorted_ref.float(), w_in, plan.offsets),
        "grouped_mm_backward": lambda: torch.ops.moe_ext.grouped_mm_backward(
            grad, x_sorted_ref.float(), w_in, plan.offsets
        ),
        "swiglu": lambda: ops.swiglu(h),
        "swiglu_backward": lambda: torch.ops.moe_ext.swiglu_backward(grad[:, :512], h),
    }
    for name, call in calls.items():
        memory.set_cpu_cache_limit(0)  # fresh memory: the clean result
        clean = call()
        clean = [t.clone() for t in clean] if isinstance(clean, tuple | list) else [clean.clone()]
        memory.set_cpu_cache_limit(1 << 30)
        dirty = call()
        for t in dirty if isinstance(dirty, tuple | list) else [dirty]:
            t.fill_(float("nan"))
        del dirty, t
        hits = memory.cpu_cache_info()["hits"]
        again = call()
        again = list(again) if isinstance(again, tuple | list) else [again]
        assert memory.cpu_cache_info()["hits"] > hits, f"{name}: no output was large enough to use the cache"
        for a, b in zip(again, clean, strict=True):
            assert_bitwise_equal(a, b, name)
    # and the values are right, not only repeatable
    torch.testing.assert_close(ops.dispatch(x, plan).double(), x_sorted_ref)
    torch.testing.assert_close(
        ops.combine(x_sorted_ref.float(), weights, plan).double(), ref_combine(x_sorted_ref, weights, plan.row_of)
    )
    torch.testing.assert_close(
        ops.grouped_mm(x_sorted_ref.float(), w_in, plan.offsets).double(),
        ref_grouped_mm(x_sorted_ref, w_in, plan.offsets),
        rtol=1e-4,
        atol=1e-4,
    )


def test_limit_zero_keeps_nothing_and_the_limit_evicts_oldest_first():
    x, w, offsets, grad = grouped_inputs()
    memory.set_cpu_cache_limit(0)
    before = memory.cpu_cache_info()
    for _ in range(3):
        torch.ops.moe_ext.grouped_mm_backward(grad, x, w, offsets)
    after = memory.cpu_cache_info()
    assert after["cached_bytes"] == 0 and after["cached_blocks"] == 0
    assert delta(before, after, "misses") == 3 and delta(before, after, "hits") == 0

    # three different sizes (12, 16, 20 MiB: none fits another within a quarter) under a 40 MiB limit
    memory.set_cpu_cache_limit(40 * MiB)
    blocks = [torch.ops.moe_ext.swiglu(torch.randn(1024, 2 * n * 256)) for n in (12, 16, 20)]
    assert [b.nbytes for b in blocks] == [12 * MiB, 16 * MiB, 20 * MiB]
    del blocks[0]  # oldest free
    del blocks[0]
    assert memory.cpu_cache_info()["cached_bytes"] == 28 * MiB
    del blocks[0]  # 20 MiB more: the 12 MiB block (used longest ago) goes, the 16 stays
    info = memory.cpu_cache_info()
    assert info["cached_bytes"] == 36 * MiB and info["cached_blocks"] == 2
    hits = info["hits"]
    torch.ops.moe_ext.swiglu(torch.randn(1024, 2 * 16 * 256))
    assert memory.cpu_cache_info()["hits"] == hits + 1
    memory.set_cpu_cache_limit(20 * MiB)  # lowering the limit evicts at once
    assert memory.cpu_cache_info()["cached_bytes"] <= 20 * MiB
    memory.empty_cpu_cache()
    assert memory.cpu_cache_info()["cached_bytes"] == 0


def test_outputs_outlive_empty_cache_and_can_be_resized():
    h = torch.randn(2048, 1024)
    out = ops.swiglu(h)  # 4 MiB
    want = torch.nn.functional.silu(h[:, :512]) * h[:, 512:]
    memory.empty_cpu_cache()
    torch.testing.assert_close(out, want)
    out.resize_(4096, 512)  # storage from the cache's allocator grows like any other
    torch.testing.assert_close(out[:2048], want)
    out.resize_(16, 512)
    torch.testing.assert_close(out, want[:16])
    del out
    assert memory.cpu_cache_info()["in_use_bytes"] == 0


def test_the_profiler_sees_cached_outputs():
    """torch.profiler's memory view (what benchmarks/_common.peak_tensor_bytes reads) counts
    blocks from the cache like any CPU tensor, fresh or reused."""
    from torch.profiler import ProfilerActivity, profile

    x, w, offsets, grad = grouped_inputs()
    for _ in range(2):  # the second call reuses the first call's block
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _, grad_w = torch.ops.moe_ext.grouped_mm_backward(grad, x, w, offsets)
            del grad_w
        sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        assert 8 * MiB in sizes and -8 * MiB in sizes


def test_a_training_step_reuses_last_steps_gradients_bitwise():
    torch.manual_seed(0)
    layer = moe_ext.MoE(256, 512, 16, 2)  # w_in grad: 16 * 256 * 1024 * 4 B = 16 MiB
    x = torch.randn(512, 256)
    grads = []
    for step in range(3):
        layer.zero_grad(set_to_none=True)
        before = memory.cpu_cache_info()
        layer(x).square().mean().backward()
        after = memory.cpu_cache_info()
        if step > 0:
            assert delta(before, after, "misses") == 0, "a steady-state step took fresh memory"
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(grads[0], grads[2], strict=True):
        assert_bitwise_equal(a, b, "step 1 vs step 3")
    layer.zero_grad(set_to_none=True)
    assert memory.cpu_cache_info()["in_use_bytes"] == 0


def test_threads_share_the_cache_safely():
    x, w, offsets, grad = grouped_inputs()
    want = torch.ops.moe_ext.grouped_mm_backward(grad, x, w, offsets)[1].clone()
    failures = []

    def work() -> None:
        try:
            for _ in range(15):
                got = torch.ops.moe_ext.grouped_mm_backward(grad, x, w, offsets)[1]
                if not torch.equal(got, want):
                    failures.append("mismatch")
        except Exception as error:  # noqa: BLE001 - reported below
            failures.append(repr(error))

    memory.set_cpu_cache_limit(16 * MiB)  # room for two of the four threads' blocks: evictions race reuse
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    info = memory.cpu_cache_info()
    assert info["in_use_bytes"] == 0 and info["cached_bytes"] <= 16 * MiB


def test_bad_limits_name_the_argument():
    with pytest.raises(ValueError, match="limit_bytes must be >= 0"):
        memory.set_cpu_cache_limit(-1)
    with pytest.raises(TypeError, match="limit_bytes must be an int"):
        memory.set_cpu_cache_limit(1.5)
    with pytest.raises(TypeError, match="limit_bytes must be an int"):
        memory.set_cpu_cache_limit(True)


@pytest.mark.parametrize(
    ("value", "expect"),
    [
        ("0", "limit 0"),
        ("64", f"limit {64 * MiB}"),
        ("abc", "MOE_EXT_CPU_CACHE_MB must be"),
        ("-3", "MOE_EXT_CPU_CACHE_MB must be"),
    ],
)
def test_environment_sets_the_limit(value, expect):
    code = (
        "import moe_ext\n"
        "try:\n"
        "    print('limit', moe_ext.memory.cpu_cache_info()['limit_bytes'])\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    env = {**os.environ, "MOE_EXT_CPU_CACHE_MB": value}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert expect in result.stdout
