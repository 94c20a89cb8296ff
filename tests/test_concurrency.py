"""Concurrent calls from several Python threads give the bits of serial calls.

Four threads share one moe_ext.MoE layer (and call the raw ops) on different inputs, many times,
in different orders; every result must equal, bitwise, the result of the same call made alone.
The C++ side's only mutable global state is the CPU output cache (csrc/cpu/output_cache.cpp,
behind one mutex; tests/test_memory.py hammers it from threads); everything else is
function-local `static const` operator handles, initialized once, thread-safely.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
from conftest import assert_bitwise_equal

import moe_ext
from moe_ext import ops

THREADS = 4
ROUNDS = 20
# Sizes on both sides of the kernels' single-thread thresholds (parallel regions only above them).
TOKEN_COUNTS = [1, 17, 256, 1000, 3000]
H, F, E, K = 32, 48, 8, 2


def run_threads(work, inputs) -> list[str]:
    """Runs work(i) for every input index in THREADS threads, each in its own rotated order, ROUNDS
    times; returns the failures (exceptions and mismatches), which work reports by raising."""
    failures: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def worker(thread: int) -> None:
        order = list(range(len(inputs)))
        order = order[thread % len(order) :] + order[: thread % len(order)]
        start.wait()
        for round_ in range(ROUNDS):
            for i in order if round_ % 2 == 0 else reversed(order):
                try:
                    work(i)
                except Exception as error:  # noqa: BLE001 - every failure is reported below
                    with lock:
                        failures.append(f"thread {thread}, round {round_}, input {i}: {type(error).__name__}: {error}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return failures


def inputs_of(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, H, generator=g) for T in TOKEN_COUNTS]


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"capacity_factor": 1.0, "drop_policy": "probs", "z_loss_coef": 1e-3},
        {"score_func": "sigmoid", "n_group": 4, "topk_group": 2, "activation": "gelu"},
    ],
    ids=["dropless", "capacity-probs", "sigmoid-grouped"],
)
def test_layer_forward_in_threads_matches_serial(config):
    torch.manual_seed(0)
    layer = moe_ext.MoE(H, F, E, top_k=K, **config).eval()
    xs = inputs_of(1)
    with torch.no_grad():
        serial = [layer(x) for x in xs]

    def work(i):
        with torch.no_grad():
            y = layer(xs[i])
        assert_bitwise_equal(y, serial[i], f"T = {xs[i].shape[0]}")

    assert run_threads(work, xs) == []


def test_layer_training_step_gradients_in_threads_match_serial():
    # Autograd from several threads at once: each thread's backward gives the serial gradients.
    torch.manual_seed(0)
    layer = moe_ext.MoE(H, F, E, top_k=K, capacity_factor=1.25, z_loss_coef=1e-3)
    xs = inputs_of(2)
    params = [p for p in layer.parameters() if p.requires_grad]

    def grads(x):
        x = x.clone().requires_grad_(True)
        loss = layer(x).pow(2).mean()
        return [loss.detach(), *torch.autograd.grad(loss, [x, *params])]

    serial = [grads(x) for x in xs]

    def work(i):
        for j, (a, b) in enumerate(zip(grads(xs[i]), serial[i], strict=True)):
            assert_bitwise_equal(a, b, f"T = {xs[i].shape[0]}, output {j}")

    assert run_threads(work, xs) == []


def pipeline(x: torch.Tensor, router: torch.Tensor, w: torch.Tensor, capacity_factor) -> list[torch.Tensor]:
    """Every op once: gating, plan (capacity with priority, or dropless), dispatch, grouped_mm, combine, losses."""
    logits = x @ router
    weights, indices, scores = ops.topk_gating(logits, K)
    capacity = None if capacity_factor is None else math.ceil(capacity_factor * x.shape[0] * K / E)
    plan = ops.make_plan(indices, E, capacity, None if capacity is None else weights)
    y = ops.combine(ops.grouped_mm(ops.dispatch(x, plan), w, plan.offsets), weights, plan)
    chosen = ops.expert_choice_plan(scores, max(1, x.shape[0] // E))
    return [
        weights,
        indices,
        scores,
        *plan,
        y,
        *chosen,
        ops.load_balancing_loss(scores, indices, E),
        ops.router_z_loss(logits),
    ]


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
def test_raw_ops_in_threads_match_serial(capacity_factor):
    g = torch.Generator().manual_seed(3)
    router = torch.randn(H, E, generator=g)
    w = torch.randn(E, H, H, generator=g) / math.sqrt(H)
    xs = inputs_of(4)
    with torch.no_grad():
        serial = [pipeline(x, router, w, capacity_factor) for x in xs]

    def work(i):
        with torch.no_grad():
            outputs = pipeline(xs[i], router, w, capacity_factor)
        for j, (a, b) in enumerate(zip(outputs, serial[i], strict=True)):
            assert_bitwise_equal(a, b, f"T = {xs[i].shape[0]}, output {j}")

    assert run_threads(work, xs) == []


def test_errors_in_one_thread_do_not_disturb_the_others():
    # A thread feeding bad inputs gets its error; the threads beside it still get exact results.
    torch.manual_seed(0)
    layer = moe_ext.MoE(H, F, E, top_k=K).eval()
    xs = inputs_of(5)
    bad = torch.full((64, H), math.nan)
    with torch.no_grad():
        serial = [layer(x) for x in xs]

    def work(i):
        with torch.no_grad():
            if i % 2:
                with pytest.raises(RuntimeError, match="logits of token 0 are non-finite"):
                    layer(bad)
            assert_bitwise_equal(layer(xs[i]), serial[i], f"T = {xs[i].shape[0]}")

    assert run_threads(work, xs) == []
