"""Router observability and control: stats, ExpertUsage, routing trace, group skew, expert control, reproducibility."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import moe_ext


def forced_layer(num_experts: int = 4, top_k: int = 1, **kwargs) -> moe_ext.MoE:
    """A layer whose router picks expert argmax(x[:E]) first: router.weight = 10 * [I | 0]."""
    torch.manual_seed(0)
    layer = moe_ext.MoE(8, 6, num_experts, top_k=top_k, dtype=torch.float64, aux_loss_coef=0.0, **kwargs)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :num_experts] = 10 * torch.eye(num_experts, dtype=torch.float64)
    return layer


def tokens_preferring(experts: list[int], num_experts: int = 4) -> torch.Tensor:
    """One token per entry whose preferred expert is that entry; the 2nd choice is (e + 1) % E."""
    x = torch.zeros(len(experts), 8, dtype=torch.float64)
    for t, e in enumerate(experts):
        x[t, e] = 1.0
        x[t, (e + 1) % num_experts] = 0.5
    return x


def test_stats_exact_on_forced_routing():
    layer = forced_layer(num_experts=4, top_k=1, capacity_factor=1.0)
    x = tokens_preferring([0, 0, 0, 1, 2, 2, 0, 1])  # T = 8, k = 1, E = 4 -> C = 2
    layer(x)
    stats = layer.last_stats
    assert stats.tokens_per_expert.tolist() == [4, 2, 2, 0]
    assert stats.tokens_per_expert_kept.tolist() == [2, 2, 2, 0]
    assert int(stats.dropped) == 2
    assert float(stats.load_imbalance) == pytest.approx(4 / 2)
    counts = torch.tensor([4.0, 2, 2, 0])
    assert float(stats.load_cv) == pytest.approx(float(counts.std(correction=0) / counts.mean()))


class Parallel(torch.nn.ModuleList):
    """Applies every layer to the same input (so each sees the hand-built tokens)."""

    def forward(self, x):
        return sum(layer(x) for layer in self)


def test_expert_usage_accumulates_reports_plots_and_logs(tmp_path):
    model = Parallel([forced_layer(), forced_layer()])
    with moe_ext.ExpertUsage(model) as usage:
        model(tokens_preferring([0, 1, 1, 3]))
        model(tokens_preferring([3, 3, 3, 3]))
        assert usage.routed.tolist() == [[1, 2, 0, 5], [1, 2, 0, 5]]
        assert usage.forwards.tolist() == [2, 2]
        table = usage.report()
        assert "max/mean" in table and "62.5" in table  # 5 of 8 assignments on expert 3
        usage.plot(str(tmp_path / "load.png"))
        assert (tmp_path / "load.png").stat().st_size > 1000

        class Writer:
            def __init__(self):
                self.calls = []

            def add_scalar(self, tag, value, step):
                self.calls.append(("scalar", tag, value, step))

            def add_histogram(self, tag, values, step):
                self.calls.append(("histogram", tag, values.tolist(), step))

        writer = Writer()
        usage.log_to(writer, step=7)
        scalars = {c[1]: c[2] for c in writer.calls if c[0] == "scalar"}
        assert scalars["moe/0/max_over_mean"] == pytest.approx(5 / 2)
        histogram = [c for c in writer.calls if c[0] == "histogram" and c[1] == "moe/1/expert_load"][0]
        assert histogram[2] == pytest.approx([1 / 8, 2 / 8, 0, 5 / 8]) and histogram[3] == 7
        usage.reset()
        assert usage.routed.sum() == 0
    model(tokens_preferring([0]))
    assert usage.routed.sum() == 0, "closing removes the hooks"


def test_expert_usage_merge_over_gloo():
    import torch.distributed as dist

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        layer = forced_layer()
        usage = moe_ext.ExpertUsage(layer)
        layer(tokens_preferring([2, 2, 1]))
        usage.merge()
        assert usage.routed.tolist() == [[0, 1, 2, 0]]
    finally:
        dist.destroy_process_group()


def test_trace_records_queries_and_round_trips(tmp_path):
    model = torch.nn.Sequential(forced_layer(top_k=2), forced_layer(top_k=2, capacity_factor=0.5))
    first = tokens_preferring([0, 1, 2, 3]).reshape(2, 2, 8)
    second = tokens_preferring([3, 3])
    with moe_ext.trace_routing(model) as trace:
        model(first)
        model(second)
    assert trace.layers == ["0", "1"] and trace.num_tokens == 6
    # layer 0 sees the raw tokens: choices are (e, e + 1)
    assert trace.experts("0").tolist() == [[0, 1], [1, 2], [2, 3], [3, 0], [3, 0], [3, 0]]
    assert trace.experts_for(2)["0"][0][0] == 2
    assert trace.tokens_for("0", 3).tolist() == [2, 3, 4, 5]
    assert trace.position_of(3) == (0, (1, 1)) and trace.position_of(5) == (1, (1,))
    w = trace.weights("0").float()
    torch.testing.assert_close(w.sum(-1), torch.ones(6), atol=2e-3, rtol=0)
    assert trace.dropped("1").any(), "capacity 0.5 must drop in layer 1"
    dropped_tokens = set(trace.tokens_for("1", 0, include_dropped=True).tolist()) - set(
        trace.tokens_for("1", 0).tolist()
    )
    assert all(trace.dropped("1")[t].any() for t in dropped_tokens)

    path = tmp_path / "trace.pt"
    trace.save(str(path))
    loaded = moe_ext.RoutingTrace.load(str(path))
    assert loaded.layers == trace.layers and loaded.num_tokens == 6
    for layer in trace.layers:
        assert torch.equal(loaded.experts(layer), trace.experts(layer))
        assert torch.equal(loaded.weights(layer), trace.weights(layer))
        assert torch.equal(loaded.dropped(layer), trace.dropped(layer))
    assert loaded.experts_for(4) == trace.experts_for(4)
    for layer in model:
        assert layer._trace_sink is None, "leaving the block turns tracing off"


def test_by_group_disjoint_and_identical_groups():
    layer = forced_layer(top_k=1)
    # group "a" always goes to experts 0/1, group "b" to 2/3: disjoint supports
    experts = [0, 1, 2, 3, 0, 2, 1, 3]
    labels = ["a" if e < 2 else "b" for e in experts]
    with moe_ext.trace_routing(layer) as trace:
        layer(tokens_preferring(experts))
    skew = {s.group: s for s in trace.by_group(labels)}
    assert skew["a"].js_vs_rest == pytest.approx(1.0) and skew["b"].js_vs_rest == pytest.approx(1.0)
    assert skew["a"].distribution.tolist() == [0.5, 0.5, 0.0, 0.0]
    # js(P, (P+Q)/2) for disjoint equal halves = 3/4 * log2(4/3)
    assert skew["a"].js_vs_all == pytest.approx(0.75 * torch.log2(torch.tensor(4 / 3)).item())

    with moe_ext.trace_routing(layer) as same:
        layer(tokens_preferring([0, 1, 2, 3, 0, 1, 2, 3]))
    identical = same.by_group(["x"] * 4 + ["y"] * 4)
    assert all(s.js_vs_rest == pytest.approx(0.0, abs=1e-12) for s in identical)
    with pytest.raises(ValueError, match="labels"):
        same.by_group(["x"])


def test_disabled_expert_gets_no_tokens_and_equals_removed_expert_reference():
    torch.manual_seed(3)
    layer = moe_ext.MoE(8, 12, 5, top_k=2, dtype=torch.float64, aux_loss_coef=0.0)
    x = torch.randn(40, 8, dtype=torch.float64)
    layer.disable_experts([2])
    y = layer(x)
    assert int(layer.last_stats.tokens_per_expert[2]) == 0
    assert layer.disabled_experts == [2]

    keep = [0, 1, 3, 4]
    reference = moe_ext.MoE(8, 12, 4, top_k=2, dtype=torch.float64, aux_loss_coef=0.0)
    with torch.no_grad():
        reference.router.weight.copy_(layer.router.weight[keep])
        reference.w_in.copy_(layer.w_in[keep])
        reference.w_out.copy_(layer.w_out[keep])
    torch.testing.assert_close(y, reference(x), rtol=1e-12, atol=1e-12)

    # gradients flow in training with the expert off; the disabled expert gets none
    y.sum().backward()
    assert layer.w_in.grad[2].abs().sum() == 0 and layer.w_in.grad[keep].abs().sum() > 0
    layer.enable_experts()
    assert layer.disabled_experts == []
    layer(x)
    assert int(layer.last_stats.tokens_per_expert[2]) > 0
    with pytest.raises(ValueError, match="top_k"):
        layer.disable_experts([0, 1, 2, 3])
    with pytest.raises(ValueError, match="num_experts"):
        layer.disable_experts([7])


def test_disable_experts_in_compiled_model_without_recompiling():
    torch._dynamo.reset()
    compiles = []

    def counting_backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    layer = moe_ext.MoE(16, 24, 6, top_k=2)
    compiled = torch.compile(layer, backend=counting_backend, fullgraph=True)
    x = torch.randn(30, 16)
    compiled(x)
    layer.disable_experts([0, 4])
    y = compiled(x)
    assert len(compiles) == 1, "toggling experts must not recompile"
    assert layer.last_stats.tokens_per_expert[[0, 4]].tolist() == [0, 0]
    torch.testing.assert_close(y, layer(x))


def test_restrict_experts_routes_flagged_tokens_only_to_allowed():
    torch.manual_seed(1)
    layer = moe_ext.MoE(8, 12, 6, top_k=2, dtype=torch.float64, aux_loss_coef=0.0)
    x = torch.randn(4, 10, 8, dtype=torch.float64)
    flagged = torch.zeros(4, 10, dtype=torch.bool)
    flagged[1] = True
    flagged[3, :5] = True
    free = layer(x)
    with layer.restrict_experts(flagged, allowed=[1, 4]), moe_ext.trace_routing(layer) as trace:
        restricted = layer(x)
    chosen = trace.experts("<root>").long().reshape(4, 10, 2)
    assert set(chosen[flagged].flatten().tolist()) <= {1, 4}
    torch.testing.assert_close(restricted[~flagged], free[~flagged], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(restricted[flagged], free[flagged])
    assert layer._restriction is None, "leaving the block clears the restriction"
    layer.restrict_experts(flagged, allowed=[1, 4])
    with pytest.raises(ValueError, match="token_mask"):
        layer(x[:2])
    layer.clear_restriction()
    with pytest.raises(ValueError, match="top_k"):
        layer.restrict_experts(flagged, allowed=[1])


def test_clone_expert_replica_takes_over():
    layer = forced_layer(num_experts=4, top_k=1)
    x = tokens_preferring([0, 1, 2, 3, 1])
    before = layer(x)
    layer.clone_expert(1, 3, copy_router=True)
    assert torch.equal(layer.w_in[3], layer.w_in[1]) and torch.equal(layer.router.weight[3], layer.router.weight[1])
    layer.disable_experts([1])
    after = layer(x)
    # tokens that preferred expert 1 now go to its replica 3 and get the same output
    for t in (1, 4):
        torch.testing.assert_close(after[t], before[t], rtol=1e-12, atol=1e-12)
    assert layer.last_stats.tokens_per_expert.tolist()[1] == 0


REPRO_SCRIPT = textwrap.dedent(
    """
    import hashlib, sys, torch, moe_ext
    torch.set_num_threads(int(sys.argv[1]))
    torch.manual_seed(1234)
    layer = moe_ext.MoE(32, 48, 8, top_k=2, capacity_factor=1.25, z_loss_coef=1e-3)
    x = torch.randn(700, 32, generator=torch.Generator().manual_seed(5))
    y = layer(x)
    (y * y).sum().backward()
    digest = hashlib.sha256()
    for tensor in [y.detach()] + [p.grad for p in layer.parameters()]:
        digest.update(tensor.contiguous().numpy().tobytes())
    print(digest.hexdigest())
    """
)


def test_bitwise_reproducible_across_processes_and_thread_counts():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    digests = [
        subprocess.run(
            [sys.executable, "-c", REPRO_SCRIPT, threads],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            check=True,
        ).stdout.strip()
        for threads in ("2", "2", "1")
    ]
    assert len(digests[0]) == 64 and len(set(digests)) == 1, digests
    assert hashlib.sha256(b"").hexdigest() not in digests
