"""Per-expert health (ExpertUsage(health=True)): every figure against a float64 hand computation, the dead and
dominant flags and the on_flag callback, optimizer-step gradient norms and update ratios, capacity and expert
choice, checkpoint recomputes not counted, no host sync in the forward, and the errors."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from reference import ref_swiglu_expert
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

import moe_ext

H, FFN, E = 8, 6, 4


def make_layer(top_k: int = 2, **kwargs) -> moe_ext.MoE:
    torch.manual_seed(0)
    return moe_ext.MoE(H, FFN, E, top_k=top_k, dtype=torch.float64, aux_loss_coef=0.0, **kwargs)


def hand_routing(layer: moe_ext.MoE, x: torch.Tensor):
    """(experts [T, k], normalized softmax weights [T, k], expert outputs [T, k, H]) in float64."""
    probs = (x @ layer.router.weight.T).softmax(-1)
    top = probs.topk(layer.top_k, dim=-1)
    weights = top.values / top.values.sum(-1, keepdim=True)
    outputs = torch.zeros(*top.indices.shape, H, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j, e in enumerate(top.indices[t].tolist()):
            outputs[t, j] = ref_swiglu_expert(x[t], layer, e)
    return top.indices, weights, outputs


def test_every_forward_figure_matches_a_hand_computation():
    layer = make_layer()
    with torch.no_grad():
        layer.router.weight[3] = -50.0
    g = torch.Generator().manual_seed(1)
    xs = [torch.rand(n, H, dtype=torch.float64, generator=g) for n in (13, 7, 20)]  # x >= 0: expert 3 never wins
    decay = 0.8
    usage = moe_ext.ExpertUsage(layer, health=True, dead_after=3, share_decay=decay)
    tokens = torch.zeros(E, dtype=torch.int64)
    weight_sum, norm_sum = torch.zeros(E, dtype=torch.float64), torch.zeros(E, dtype=torch.float64)
    ema = torch.zeros(E, dtype=torch.float64)
    with torch.no_grad():
        for x in xs:
            layer(x)
            experts, weights, outputs = hand_routing(layer, x)
            counts = torch.bincount(experts.flatten(), minlength=E)
            tokens += counts
            weight_sum.index_add_(0, experts.flatten(), weights.flatten())
            norm_sum.index_add_(0, experts.flatten(), outputs.norm(dim=-1).flatten())
            ema = decay * ema + (1 - decay) * counts.double() / x.shape[0]
    health = usage.health()
    assert torch.equal(health.tokens[0], tokens) and tokens[3] == 0
    assert health.forwards == [3]
    torch.testing.assert_close(health.share[0], tokens.double() / 40, rtol=0, atol=0)
    mean_weight = weight_sum / tokens.clamp(min=1)
    torch.testing.assert_close(health.mean_weight[0, :3], mean_weight[:3], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(health.output_norm[0, :3], (norm_sum / tokens.clamp(min=1))[:3], rtol=1e-6, atol=0)
    assert health.mean_weight[0, 3].isnan() and health.output_norm[0, 3].isnan()
    torch.testing.assert_close(health.share_ema[0], ema / (1 - decay**3), rtol=1e-12, atol=1e-14)
    assert health.idle_forwards[0].tolist() == [0, 0, 0, 3]
    assert health.dead[0].tolist() == [False, False, False, True]
    assert health.grad_norm.isnan().all() and health.update_ratio.isnan().all()  # no optimizer watched
    threshold = min(3 * 2 / E, (1 + 2 / E) / 2)
    assert health.dominant[0].tolist() == (ema / (1 - decay**3) > threshold).tolist()
    assert ("<root>", 3, "dead") in health.flagged()
    report = health.report()
    assert len(report.splitlines()) == 1 + E and "dead" in report.splitlines()[-1]


def test_capacity_counts_kept_assignments_and_filled_rows_only():
    """Expert biases make an empty padded row's output non-zero: it must not count; dropped weights neither."""
    layer = make_layer(capacity_factor=0.5, min_capacity=1, expert_bias=True)
    with torch.no_grad():
        layer.b_out.normal_()
    x = torch.randn(16, H, dtype=torch.float64)
    with moe_ext.ExpertUsage(layer, health=True) as usage, moe_ext.trace_routing(layer) as trace, torch.no_grad():
        layer(x)
    experts, dropped = trace.experts("<root>").long(), trace.dropped("<root>")
    assert dropped.any()
    _, weights, _ = hand_routing(layer, x)
    kept_experts = experts[~dropped]
    outputs = torch.zeros(16, 2, H, dtype=torch.float64)
    for t in range(16):
        for j, e in enumerate(experts[t].tolist()):
            gate, up = (x[t] @ layer.w_in[e] + layer.b_in[e]).chunk(2)
            outputs[t, j] = (F.silu(gate) * up) @ layer.w_out[e] + layer.b_out[e]
    kept = torch.bincount(kept_experts, minlength=E)
    health = usage.health()
    assert torch.equal(health.tokens[0], torch.bincount(experts.flatten(), minlength=E))  # before capacity
    mean_weight = torch.zeros(E, dtype=torch.float64).index_add_(0, kept_experts, weights[~dropped]) / kept
    torch.testing.assert_close(health.mean_weight[0], mean_weight, rtol=1e-12, atol=1e-14)
    norms = torch.zeros(E, dtype=torch.float64).index_add_(0, kept_experts, outputs[~dropped].norm(dim=-1)) / kept
    torch.testing.assert_close(health.output_norm[0], norms, rtol=1e-6, atol=0)


def test_expert_choice_load_and_weights():
    torch.manual_seed(0)
    layer = moe_ext.MoE(H, FFN, E, router="expert_choice", capacity_factor=1.0, dtype=torch.float64, aux_loss_coef=0)
    x = torch.randn(12, H, dtype=torch.float64)
    with moe_ext.ExpertUsage(layer, health=True) as usage, torch.no_grad():
        layer(x)
    probs = (x @ layer.router.weight.T).softmax(-1)
    taken = torch.zeros_like(probs, dtype=torch.bool)
    for e in range(E):
        taken[probs[:, e].topk(3).indices, e] = True  # capacity = 1.0 * 12 / 4
    health = usage.health()
    assert health.tokens[0].tolist() == [3] * E
    torch.testing.assert_close(health.mean_weight[0], (probs * taken).sum(0) / 3, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("every", [1, 2])
def test_gradient_norm_and_update_ratio_at_watched_steps(every):
    layer = make_layer(expert_bias=True)
    lr = 0.05
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr)
    usage = moe_ext.ExpertUsage(layer, health=True)
    usage.watch(optimizer, every=every)
    measured = []
    for step in range(3):
        optimizer.zero_grad()
        layer(torch.randn(30, H, dtype=torch.float64)).square().sum().backward()
        params = [layer.w_in, layer.w_out, layer.b_in, layer.b_out]
        grad_norm = torch.stack([p.grad.reshape(E, -1).square().sum(1) for p in params]).sum(0).sqrt()
        weight_norm = torch.stack([p.detach().reshape(E, -1).square().sum(1) for p in params]).sum(0).sqrt()
        optimizer.step()
        if step % every == 0:
            measured = (grad_norm, lr * grad_norm / weight_norm)  # SGD: theta_after - theta_before = -lr * grad
        health = usage.health()
        torch.testing.assert_close(health.grad_norm[0], measured[0], rtol=1e-5, atol=0)
        torch.testing.assert_close(health.update_ratio[0], measured[1], rtol=1e-4, atol=0)
    usage.close()
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_update_ratio_under_adam_is_the_real_change():
    layer = make_layer()
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    usage = moe_ext.ExpertUsage(layer, health=True)
    usage.watch(optimizer, every=1)
    layer(torch.randn(30, H, dtype=torch.float64)).sum().backward()
    before = [layer.w_in.detach().clone(), layer.w_out.detach().clone()]
    optimizer.step()
    after = [layer.w_in.detach(), layer.w_out.detach()]
    change = torch.stack([(a - b).reshape(E, -1).square().sum(1) for a, b in zip(after, before, strict=True)]).sum(0)
    size = torch.stack([b.reshape(E, -1).square().sum(1) for b in before]).sum(0)
    torch.testing.assert_close(usage.health().update_ratio[0], (change / size).sqrt(), rtol=1e-5, atol=0)


def preferring_layer() -> moe_ext.MoE:
    """Top-1; a token x = e_p (one-hot over the first E dims) goes to expert p: router.weight = 10 * [I | 0]."""
    layer = make_layer(top_k=1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :E] = 10 * torch.eye(E, dtype=torch.float64)
    return layer


def tokens_preferring(experts: list[int]) -> torch.Tensor:
    return F.one_hot(torch.tensor(experts), H).double()


SKEWED = [0] * 7 + [1, 1, 2]  # expert 0: 70% of the tokens (threshold min(3/4, 5/8)); expert 3: none


def test_flags_raise_the_callback_once_each():
    layer = preferring_layer()
    calls = []
    usage = moe_ext.ExpertUsage(
        layer, health=True, dead_after=4, check_every=2, on_flag=lambda flags, health: calls.append(flags)
    )
    with torch.no_grad():
        for _ in range(8):
            layer(tokens_preferring(SKEWED))
    # checks after forwards 2, 4, 6, 8: dominant at the first, dead (4 idle forwards) at the second; each once
    assert [[(f.layer_name, f.expert, f.kind) for f in flags] for flags in calls] == [
        [("<root>", 0, "dominant")],
        [("<root>", 3, "dead")],
    ]
    assert calls[0][0].value == pytest.approx(0.7) and calls[1][0].value == 4
    assert calls[0][0].layer is layer
    assert usage.check() == []  # still raised, not new
    with torch.no_grad():
        layer(tokens_preferring([3, 3, 1, 2]))  # expert 3 gets tokens: its dead flag falls
    assert not usage.health().dead[0, 3]
    with torch.no_grad():
        for _ in range(4):
            layer(tokens_preferring(SKEWED))
    # Forward 9 gave expert 0 no token: its moving share fell under the threshold at check 10 and rose at 12.
    assert [[(f.expert, f.kind) for f in flags] for flags in calls[2:]] == [[(0, "dominant")]]
    # forward 13 makes 4 idle forwards again; no automatic check since forward 12: this one sees it rise again
    assert [(f.expert, f.kind) for f in usage.check()] == [(3, "dead")] and len(calls) == 4


def test_callback_clones_the_dominant_expert_into_the_dead_one():
    layer = preferring_layer()

    def on_flag(flags, health):
        dead = next(f for f in flags if f.kind == "dead")
        dominant = next(f for f in flags if f.kind == "dominant")
        dead.layer.clone_expert(src=dominant.expert, dst=dead.expert)

    with moe_ext.ExpertUsage(layer, health=True, dead_after=2, check_every=2, on_flag=on_flag), torch.no_grad():
        assert not torch.equal(layer.w_in[3], layer.w_in[0])
        for _ in range(2):
            layer(tokens_preferring(SKEWED))
    assert torch.equal(layer.w_in[3], layer.w_in[0]) and torch.equal(layer.w_out[3], layer.w_out[0])


def test_disabled_experts_are_not_dead():
    layer = make_layer()
    layer.disable_experts([2])
    with moe_ext.ExpertUsage(layer, health=True, dead_after=1) as usage, torch.no_grad():
        layer(torch.randn(20, H, dtype=torch.float64))
    health = usage.health()
    assert health.idle_forwards[0, 2] == 1 and not health.dead[0, 2]


def test_checkpoint_recompute_is_not_counted():
    x = torch.randn(24, H, dtype=torch.float64, requires_grad=True)
    results = []
    for checkpointed in (False, True):
        layer = make_layer()
        with moe_ext.ExpertUsage(layer, health=True) as usage, set_checkpoint_early_stop(False):
            y = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
            y.sum().backward()
        results.append(usage.health())
    plain, ckpt = results
    assert plain.forwards == ckpt.forwards == [1]
    for name in ("tokens", "mean_weight", "output_norm", "idle_forwards"):
        assert torch.equal(getattr(plain, name), getattr(ckpt, name)), name


@contextlib.contextmanager
def no_host_sync():
    """Every way a CPU tensor's value reaches Python raises inside the block."""

    def refuse(*args, **kwargs):
        raise AssertionError("host sync in the forward")

    names = ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, refuse)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def test_health_adds_no_host_sync_to_the_forward():
    layer = make_layer(capacity_factor=1.0).train()
    x = torch.randn(3, 5, H, dtype=torch.float64)
    with moe_ext.ExpertUsage(layer, health=True) as usage:
        with no_host_sync():
            layer(x).sum().backward()
        assert usage.health().forwards == [1]
    with no_host_sync(), pytest.raises(AssertionError, match="host sync"):  # the guard itself works
        bool(torch.ones(1))


def test_close_detaches_and_plot_writes_a_png(tmp_path):
    layer = make_layer()
    usage = moe_ext.ExpertUsage(layer, health=True)
    layer(torch.randn(5, H, dtype=torch.float64))
    usage.health().plot(str(tmp_path / "health.png"))
    assert (tmp_path / "health.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    usage.close()
    assert layer._health is None
    layer(torch.randn(5, H, dtype=torch.float64))
    assert usage.health().forwards == [1]
    moe_ext.ExpertUsage(layer, health=True).close()  # the layer is free again


def test_health_errors():
    layer = make_layer()
    plain = moe_ext.ExpertUsage(layer)
    with pytest.raises(RuntimeError, match=r"health\(\) needs ExpertUsage\(model, health=True\)"):
        plain.health()
    with pytest.raises(ValueError, match="on_flag and check_every need health=True"):
        moe_ext.ExpertUsage(layer, on_flag=print)
    with pytest.raises(ValueError, match="dead_after must be an int >= 1"):
        moe_ext.ExpertUsage(layer, health=True, dead_after=0)
    with pytest.raises(ValueError, match="dominant_share must be in"):
        moe_ext.ExpertUsage(layer, health=True, dominant_share=1.5)
    with pytest.raises(TypeError, match="on_flag must be callable"):
        moe_ext.ExpertUsage(layer, health=True, on_flag=3)
    usage = moe_ext.ExpertUsage(layer, health=True)
    with pytest.raises(RuntimeError, match="watched by another ExpertUsage"):
        moe_ext.ExpertUsage(layer, health=True)
    with pytest.raises(TypeError, match="expected a torch.optim.Optimizer"):
        usage.watch(layer)
    with pytest.raises(ValueError, match="every must be an int >= 1"):
        usage.watch(torch.optim.SGD(layer.parameters(), lr=0.1), every=0)


HEALTH_EP_BODY = """
import json
import moe_ext
H, F, E = 12, 20, 8
group = dist.new_group(list(range(world)))

def build(group=None):
    torch.manual_seed(0)
    return moe_ext.MoE(H, F, E, top_k=2, dtype=torch.float64, expert_parallel_group=group)

def inputs(r):
    return torch.randn(9 + 4 * r, H, dtype=torch.float64, generator=torch.Generator().manual_seed(r))

layer = build(group)
optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
usage = moe_ext.ExpertUsage(layer, health=True)
usage.watch(optimizer, every=1)
(layer(inputs(rank)) ** 2).sum().backward()
optimizer.step()
usage.merge(group)
mine = usage.health()

full = build()  # every expert in one process; both ranks' tokens, one optimizer step
optimizer = torch.optim.SGD(full.parameters(), lr=0.1)
reference = moe_ext.ExpertUsage(full, health=True)
reference.watch(optimizer, every=1)
for r in range(world):
    (full(inputs(r)) ** 2).sum().backward()
optimizer.step()
ref = reference.health()

def close(a, b):
    return bool(torch.allclose(a, b, rtol=1e-9, atol=1e-12, equal_nan=True))

result = {name: close(getattr(mine, name).double(), getattr(ref, name).double())
          for name in ("tokens", "share", "mean_weight", "output_norm", "grad_norm", "update_ratio")}
# one forward per rank: idle (the minimum over ranks) is 0 where any rank routed a token to the expert
result["idle"] = bool(torch.equal(mine.idle_forwards, (mine.tokens == 0).long()))
(out / f"rank{rank}.json").write_text(json.dumps(result))
"""


def test_merge_over_expert_parallel_ranks_equals_one_process(tmp_path):
    from multiprocess import run_workers

    run_workers(HEALTH_EP_BODY, 2, tmp_path)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == dict.fromkeys(result, True) and len(result) == 7, (rank, result)
