"""Routing replay and exact activation-checkpoint recompute: moe_ext.replay_routing, moe_ext.checkpoint_context,
ops.forced_gating.

Replaying a trace of a run gives that run's outputs and gradients bitwise (every preset, every dtype, capacity
with random drops under another seed, expert choice, torch.compile, expert parallelism on 2 gloo ranks); experts
given as tensors route as given, against a float64 hand computation; a checkpoint recompute routes like its
first pass (own generator with jitter and noise, bias updates), and bad routings raise naming what is wrong."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from multiprocess import run_workers
from reference import ref_swiglu_expert
from torch.utils.checkpoint import checkpoint

import moe_ext
from moe_ext import ops
from moe_ext.presets import PRESETS

H, F, E = 16, 24, 16


class Stack(torch.nn.Module):
    """Two MoE layers with a dense map between them (so the second layer's input depends on the first)."""

    def __init__(self, make) -> None:
        super().__init__()
        self.first, self.second = make(), make()
        self.mix = torch.nn.Linear(H, H, dtype=self.first.w_in.dtype)

    def forward(self, x):
        return self.second(torch.tanh(self.mix(self.first(x))))


def preset_stack(preset: str, dtype: torch.dtype, **overrides) -> Stack:
    torch.manual_seed(0)
    return Stack(lambda: moe_ext.MoE.from_preset(preset, H, F, num_experts=E, dtype=dtype, **overrides))


def step(model: torch.nn.Module, x: torch.Tensor, seed: int):
    """One training forward and backward from a fixed RNG state: (output, {name: grad}, aux losses, x grad)."""
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    loss = (y.float() * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum() + moe_ext.aux_loss(model)
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    aux = [m.aux_loss.clone() for m in model.modules() if isinstance(m, moe_ext.MoE)]
    return y.detach(), grads, aux, x.grad


def assert_same_step(a, b) -> None:
    (ya, ga, aa, xa), (yb, gb, ab, xb) = a, b
    assert torch.equal(ya, yb)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        assert torch.equal(ga[name], gb[name]), name
    for u, v in zip(aa, ab, strict=True):
        assert torch.equal(u, v)
    assert torch.equal(xa, xb)


def traced_and_replayed(model, x, *, seed=1, replay_seed=None, **replay_kwargs):
    """(the traced run, the replayed run from the same initial model, the trace)."""
    initial = copy.deepcopy(model)
    with moe_ext.trace_routing(model) as trace:
        first = step(model, x, seed)
    again = copy.deepcopy(initial)
    with moe_ext.replay_routing(again, trace, **replay_kwargs) as replay:
        second = step(again, x, seed if replay_seed is None else replay_seed)
    assert replay.remaining() == {"first": 0, "second": 0} and replay.taken == {"first": 1, "second": 1}
    return first, second, trace


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_replay_of_a_trace_is_bitwise_for_every_preset(preset, dtype):
    model = preset_stack(preset, dtype).train()
    x = torch.randn(4, 9, H, dtype=dtype)
    first, second, _ = traced_and_replayed(model, x)
    assert_same_step(first, second)


def test_replay_forces_the_given_experts_on_another_model():
    """A trace of model A replayed on model B (other router weights): B routes as A did."""
    a = preset_stack("mixtral", torch.float32)
    torch.manual_seed(5)
    b = Stack(lambda: moe_ext.MoE.from_preset("mixtral", H, F, num_experts=E))
    x = torch.randn(37, H)
    with moe_ext.trace_routing(a) as trace_a:
        a(x)
    with moe_ext.trace_routing(b) as free_b:
        b(x)
    assert not torch.equal(free_b.experts("first"), trace_a.experts("first"))  # B alone routes otherwise
    with moe_ext.replay_routing(b, trace_a), moe_ext.trace_routing(b) as replayed:
        b(x)
    for layer in ("first", "second"):
        assert torch.equal(replayed.experts(layer), trace_a.experts(layer))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(preset="gshard"),  # random routing of the 2nd expert
        dict(preset="mixtral", capacity_factor=0.75, drop_policy="random", min_capacity=1),
        dict(preset="switch"),  # jitter, capacity by position
    ],
    ids=["gshard_random_routing", "random_drops", "switch_jitter"],
)
def test_replay_under_another_seed_keeps_the_drops(overrides):
    overrides = dict(overrides)
    preset = overrides.pop("preset")
    if preset == "switch":
        overrides["router_jitter"] = 0.0  # jitter changes the logits themselves: replay keeps the experts only
    model = preset_stack(preset, torch.float64, **overrides).train()
    x = torch.randn(6, 10, H, dtype=torch.float64)
    first, second, trace = traced_and_replayed(model, x, seed=1, replay_seed=2)
    assert trace.dropped("first").any()
    assert_same_step(first, second)
    if preset != "switch":  # the free run under the other seed drops otherwise: the replay is what kept them
        other = step(copy.deepcopy(model), x, 2)
        assert not torch.equal(other[0], first[0])


def test_replay_of_jittered_routing_keeps_experts_and_drops():
    """Jitter under another seed: the logits differ, the experts and drops are the trace's."""
    model = preset_stack("switch", torch.float64).train()
    x = torch.randn(60, H, dtype=torch.float64)
    _, _, trace = traced_and_replayed(model, x, seed=1, replay_seed=1)
    again = copy.deepcopy(model)
    with moe_ext.replay_routing(again, trace), moe_ext.trace_routing(again) as replayed:
        step(again, x, 7)
    for layer in ("first", "second"):
        assert torch.equal(replayed.experts(layer), trace.experts(layer))
        assert torch.equal(replayed.dropped(layer), trace.dropped(layer))


def hand_moe(layer: moe_ext.MoE, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor | None = None):
    """float64 reference: sum_j w_j * FFN_{e_j}(x) with w = normalized softmax at the given experts."""
    logits = x @ layer.router.weight.T
    if weights is None:
        picked = logits.softmax(-1).gather(1, experts)
        weights = picked / picked.sum(-1, keepdim=True)
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(experts.shape[1]):
            y[t] += weights[t, j] * ref_swiglu_expert(x[t], layer, int(experts[t, j]))
    return y


def experts_layer(**kwargs) -> moe_ext.MoE:
    torch.manual_seed(0)
    return moe_ext.MoE(H, F, E, top_k=2, dtype=torch.float64, aux_loss_coef=0.0, **kwargs)


def test_replay_of_given_tensors_matches_a_hand_computation():
    layer = experts_layer()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(11, H, dtype=torch.float64, generator=g)
    experts = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(11)]).to(torch.int32)
    assert layer.w_in.shape[-1] == 2 * F  # the hand FFN is SwiGLU with gate | up concatenated
    with moe_ext.replay_routing(layer, [experts]):
        y = layer(x)
    (y * x).sum().backward()
    ref_layer = copy.deepcopy(layer)
    ref_layer.zero_grad()
    ref = hand_moe(ref_layer, x, experts.long())
    (ref * x).sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for name in ("router.weight", "w_in", "w_out"):
        a, b = layer.get_parameter(name).grad, ref_layer.get_parameter(name).grad
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert layer.router.weight.grad.abs().sum() > 0  # the router learns through the given choices


def test_replay_with_given_weights_uses_them_as_constants():
    layer = experts_layer()
    x = torch.randn(9, H, dtype=torch.float64)
    experts = torch.tensor([[t % E, (t + 3) % E] for t in range(9)])
    weights = torch.rand(9, 2, dtype=torch.float64)
    with moe_ext.replay_routing(layer, {"<root>": experts}, weights={"<root>": weights}):
        y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(y, hand_moe(layer, x, experts, weights), rtol=1e-12, atol=1e-12)
    assert layer.router.weight.grad is None or not layer.router.weight.grad.any()


def test_replay_of_recorded_weights():
    model = preset_stack("qwen3_moe", torch.float32)
    x = torch.randn(20, H)
    with moe_ext.trace_routing(model) as trace:
        model(x)
    layer = model.first
    with moe_ext.replay_routing(model, trace, weights=True), torch.no_grad():
        mine = layer(x)
    experts, weights = trace.experts("first").long(), trace.weights("first").double()
    reference = hand_moe(copy.deepcopy(layer).double(), x.double(), experts, weights)
    torch.testing.assert_close(mine.double(), reference, rtol=1e-5, atol=1e-5)


def test_replay_of_several_forwards_in_order():
    model = preset_stack("olmoe", torch.float32)
    xs = [torch.randn(n, H) for n in (5, 12, 1)]
    with moe_ext.trace_routing(model) as trace, torch.no_grad():
        ys = [model(x) for x in xs]
    with moe_ext.replay_routing(model, trace) as replay, torch.no_grad():
        assert replay.remaining() == {"first": 3, "second": 3}
        again = [model(x) for x in xs]
        with pytest.raises(RuntimeError, match="forward 3: the routing holds 3 forward"):
            model(xs[0])
    for a, b in zip(ys, again, strict=True):
        assert torch.equal(a, b)


def test_replay_of_expert_choice():
    model = preset_stack("expert_choice", torch.float64).train()
    x = torch.randn(3, 7, H, dtype=torch.float64)
    first, second, trace = traced_and_replayed(model, x)
    assert_same_step(first, second)
    # Given tensors: expert e takes tokens (e, e + 1) mod T.
    layer = model.first
    T = 21
    taken = torch.full((T, E), -1)
    for e in range(E):
        taken[[e % T, (e + 1) % T], e] = e
    with moe_ext.replay_routing(layer, [taken]), moe_ext.trace_routing(layer) as replayed:
        layer(torch.randn(T, H, dtype=torch.float64))
    assert torch.equal(replayed.experts("<root>").long(), taken)
    over = taken.clone()
    over[:, 0] = 0  # expert 0 takes every token, more than its capacity
    with moe_ext.replay_routing(layer, [over]), pytest.raises(ValueError, match="expert 0 takes 21 tokens"):
        layer(torch.randn(T, H, dtype=torch.float64))


def test_replay_under_torch_compile():
    model = preset_stack("deepseek_v3", torch.float32)
    x = torch.randn(2, 13, H)
    with moe_ext.trace_routing(model) as trace:
        eager = step(model, x, 1)
    compiled_model = copy.deepcopy(model)
    compiled_model.zero_grad()
    compiled = torch.compile(compiled_model)
    with moe_ext.replay_routing(compiled_model, trace):
        replayed = step(compiled, x, 1)
    torch.testing.assert_close(replayed[0], eager[0], rtol=1e-6, atol=1e-6)
    for name in eager[1]:
        torch.testing.assert_close(replayed[1][name], eager[1][name], rtol=1e-5, atol=1e-6)
    # and the compiled graph really takes the replay: a trace of another model's routing is followed
    reversed_experts = {n: [(E - 1 - trace.experts(n).long())] for n in ("first", "second")}
    with moe_ext.replay_routing(compiled_model, reversed_experts), moe_ext.trace_routing(compiled_model) as seen:
        with torch.no_grad():
            compiled(x)
    assert torch.equal(seen.experts("first").long(), reversed_experts["first"][0])


EP_BODY = """
import moe_ext
H, F, E = 12, 20, 8
group = dist.new_group(list(range(world)))
def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(moe_ext.MoE(H, F, E, top_k=2, capacity_factor=1.0, random_routing=True,
                                           drop_policy="random",
                                           expert_parallel_group=group))
model = build()
x = torch.randn(40 + 3 * rank, H, generator=torch.Generator().manual_seed(rank))

def run(m, seed):
    torch.manual_seed(seed + rank)
    m.zero_grad()
    y = m(x)
    (y * x).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

with moe_ext.trace_routing(model) as trace:
    y1, g1 = run(model, 1)
again = build()
with moe_ext.replay_routing(again, trace):
    y2, g2 = run(again, 2)  # another seed: the random routing would drop otherwise
y3, _ = run(build(), 2)
result = dict(drops=int(trace.dropped("0").sum()), same_y=bool(torch.equal(y1, y2)),
              same_grads=all(torch.equal(g1[n], g2[n]) for n in g1), free_differs=not torch.equal(y1, y3))
(out / f"rank{rank}.json").write_text(json.dumps(result))
"""


def test_replay_with_expert_parallelism_on_2_ranks(tmp_path):
    run_workers("import json\n" + EP_BODY, 2, tmp_path)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == dict(drops=result["drops"], same_y=True, same_grads=True, free_differs=True), result
    assert sum(json.loads((tmp_path / f"rank{r}.json").read_text())["drops"] for r in range(2)) > 0


# ----- activation checkpointing --------------------------------------------------------------------------


def random_layer(generator: torch.Generator | None, **kwargs) -> moe_ext.MoE:
    torch.manual_seed(0)
    return moe_ext.MoE(
        H,
        F,
        E,
        top_k=2,
        dtype=torch.float64,
        router_jitter=0.2,
        noisy_gating=True,
        load_loss_coef=1e-2,
        capacity_factor=1.0,
        drop_policy="random",
        selection_bias=True,
        bias_update_rate=1e-2,
        generator=generator,
        **kwargs,
    ).train()


def checkpointed_step(layer: moe_ext.MoE, x: torch.Tensor, context_fn=None):
    x = x.detach().clone().requires_grad_(True)
    if context_fn is None:
        y = layer(x)
    else:
        y = checkpoint(layer, x, use_reentrant=False, context_fn=context_fn)
    (y * x).sum().add(layer.aux_loss).backward()
    return y.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}, x.grad


@pytest.mark.parametrize("own_generator", [True, False])
def test_checkpoint_context_recompute_routes_like_the_first_pass(own_generator):
    x = torch.randn(40, H, dtype=torch.float64)
    runs = []
    for context_fn in (None, moe_ext.checkpoint_context):
        generator = torch.Generator().manual_seed(11) if own_generator else None
        torch.manual_seed(11)
        layer = random_layer(generator)
        bias_before = layer.selection_bias.clone()
        runs.append((checkpointed_step(layer, x, context_fn), layer.selection_bias.clone(), generator))
        assert not torch.equal(layer.selection_bias, bias_before)
    (plain, bias_plain, gen_plain), (ckpt, bias_ckpt, gen_ckpt) = runs
    assert torch.equal(plain[0], ckpt[0]) and torch.equal(plain[2], ckpt[2])
    for name in plain[1]:
        assert torch.equal(plain[1][name], ckpt[1][name]), name
    assert torch.equal(bias_plain, bias_ckpt)  # updated once, not again by the recompute
    if own_generator:  # the generator ends where the first pass left it
        assert torch.equal(gen_plain.get_state(), gen_ckpt.get_state())


def test_plain_checkpoint_of_a_layer_that_would_reroute_raises_naming_the_fix():
    layer = random_layer(torch.Generator().manual_seed(1))
    with pytest.raises(RuntimeError, match=r"context_fn=moe_ext.checkpoint_context"):
        checkpointed_step(layer, torch.randn(12, H, dtype=torch.float64), torch.utils.checkpoint.noop_context_fn)


@pytest.mark.parametrize("early_stop", [True, False])
def test_plain_checkpoint_with_global_rng_is_exact_and_counted_once(early_stop):
    """No own generator, no bias update: plain checkpointing restores the RNG; usage and traces count once."""
    x = torch.randn(30, H, dtype=torch.float64)

    def make():
        torch.manual_seed(0)
        return moe_ext.MoE(
            H, F, E, top_k=2, dtype=torch.float64, router_jitter=0.1, capacity_factor=1.0, drop_policy="random"
        ).train()

    layer = make()
    torch.manual_seed(4)
    plain = checkpointed_step(layer, x)
    layer = make()
    stop = torch.utils.checkpoint.set_checkpoint_early_stop(early_stop)
    with stop, moe_ext.ExpertUsage(layer) as usage, moe_ext.trace_routing(layer) as trace:
        torch.manual_seed(4)
        ckpt = checkpointed_step(layer, x, torch.utils.checkpoint.noop_context_fn)
    assert torch.equal(plain[0], ckpt[0])
    for name in plain[1]:
        assert torch.equal(plain[1][name], ckpt[1][name]), name
    assert len(trace.records["<root>"]) == 1
    assert int(usage.forwards[0]) == 1 and int(usage.routed.sum()) == 30 * 2


def test_checkpoint_of_a_replayed_model():
    model = preset_stack("gshard", torch.float64).train()
    x = torch.randn(24, H, dtype=torch.float64)
    with moe_ext.trace_routing(model) as trace:
        first = step(model, x, 1)
    initial = preset_stack("gshard", torch.float64).train()

    class Checkpointed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False, context_fn=moe_ext.checkpoint_context)

    wrapped = Checkpointed(initial)
    with moe_ext.replay_routing(initial, trace):
        second = step(wrapped, x, 2)
    assert torch.equal(first[0], second[0])
    for name, grad in first[1].items():
        assert torch.equal(grad, second[1]["inner." + name]), name


def test_checkpoint_context_recompute_must_call_the_same_layers():
    a, b = random_layer(torch.Generator().manual_seed(1)), random_layer(torch.Generator().manual_seed(2))
    calls = iter([a, b])

    def body(x):  # the recompute calls another layer than the first pass
        return next(calls)(x)

    x = torch.randn(8, H, dtype=torch.float64, requires_grad=True)
    y = checkpoint(body, x, use_reentrant=False, context_fn=moe_ext.checkpoint_context)
    with pytest.raises(RuntimeError, match="in another order than the first pass"):
        y.sum().backward()


# ----- errors ----------------------------------------------------------------------------------------------


def test_replay_errors_name_what_does_not_fit():
    model = preset_stack("mixtral", torch.float32)
    x = torch.randn(10, H)
    with moe_ext.trace_routing(model) as trace:
        model(x)
    with pytest.raises(ValueError, match="another model: it has 2 MoE layer"):
        with moe_ext.replay_routing(model.first, trace):
            pass
    with moe_ext.trace_routing(model.first) as single:
        model.first(x)
    with pytest.raises(ValueError, match="another model: it has 1 MoE layer"):
        with moe_ext.replay_routing(model, single):
            pass
    bigger = Stack(lambda: moe_ext.MoE.from_preset("mixtral", H, F, num_experts=2 * E))
    with pytest.raises(ValueError, match="layer first had 16 experts, the model's has 32"):
        with moe_ext.replay_routing(bigger, trace):
            pass
    with moe_ext.replay_routing(model, trace), pytest.raises(ValueError, match="has 10 tokens, this forward 11"):
        model(torch.randn(11, H))
    with pytest.raises(ValueError, match="recorded for input leading dims"):
        with moe_ext.replay_routing(model, trace):
            model(x.reshape(2, 5, H))
    with pytest.raises(ValueError, match="holds 1 layer"):
        with moe_ext.replay_routing(model, [torch.zeros(10, 2, dtype=torch.long)]):
            pass
    with pytest.raises(ValueError, match=r"missing \['second'\]"):
        with moe_ext.replay_routing(model, {"first": torch.zeros(10, 2, dtype=torch.long)}):
            pass
    ok = torch.tensor([[0, 1]] * 10)
    with pytest.raises(ValueError, match="names 3 experts per token but the layer routes with top_k = 2"):
        with moe_ext.replay_routing(model, [torch.zeros(10, 3, dtype=torch.long), ok]):
            pass
    with pytest.raises(ValueError, match="integer"):
        with moe_ext.replay_routing(model, [ok.float(), ok]):
            pass
    with pytest.raises(ValueError, match="weights=True takes a trace"):
        with moe_ext.replay_routing(model, [ok, ok], weights=True):
            pass
    for bad, what in [(E, "outside"), (1, "twice")]:
        given = ok.clone()
        given[4, 0] = bad
        with (
            moe_ext.replay_routing(model, [given, ok]),
            pytest.raises(ValueError, match=f"layer first, forward 0: token 4's experts .* name .*{what}"),
        ):
            model(x)
    model.first.disable_experts([1])
    with moe_ext.replay_routing(model, [ok, ok]), pytest.raises(ValueError, match="a disabled expert"):
        model(x)
    model.first.enable_experts([1])
    with moe_ext.replay_routing(model, [ok, ok]), pytest.raises(RuntimeError, match="replays a routing already"):
        with moe_ext.replay_routing(model, [ok, ok]):
            pass
    capped = preset_stack("mixtral", torch.float32, capacity_factor=0.5, min_capacity=1)
    with moe_ext.trace_routing(capped) as dropping:
        capped(x)
    assert dropping.dropped("first").any()
    with moe_ext.replay_routing(model, dropping), pytest.raises(ValueError, match="the layer is dropless"):
        model(x)


# ----- ops.forced_gating --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
def test_forced_gating_at_the_chosen_experts_is_topk_gating_bitwise(dtype, score_func, normalize):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(37, 12, generator=g).to(dtype).requires_grad_(True)
    mask = torch.ones(12, dtype=torch.bool)
    mask[5] = False
    weights, indices, scores = ops.topk_gating(logits, 3, score_func, normalize, None, 2.5, 1, 1, mask)
    gw, gs = torch.randn(weights.shape, generator=g).to(dtype), torch.randn(scores.shape, generator=g).to(dtype)
    (expected,) = torch.autograd.grad((weights * gw).sum() + (scores * gs).sum(), logits)
    fw, fi, fs = ops.forced_gating(logits, indices, score_func, normalize, 2.5, mask)
    (got,) = torch.autograd.grad((fw * gw).sum() + (fs * gs).sum(), logits)
    assert torch.equal(fw, weights) and torch.equal(fi, indices) and torch.equal(fs, scores)
    assert torch.equal(got, expected)


def test_forced_gating_gradcheck_and_errors():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([[0, 3], [1, 2], [4, 0], [2, 3], [3, 1], [0, 4]])
    for score_func in ("softmax", "sigmoid"):
        assert torch.autograd.gradcheck(lambda z, s=score_func: ops.forced_gating(z, indices, s)[0], (logits,))
    with pytest.raises(ValueError, match="token 1's experts \\[1, 1\\] name the same expert twice"):
        ops.forced_gating(logits, torch.tensor([[0, 3], [1, 1]] + [[0, 1]] * 4))
    with pytest.raises(ValueError, match="outside"):
        ops.forced_gating(logits, torch.full((6, 1), -1))
    with pytest.raises(ValueError, match="integer \\[T = 6, k\\]"):
        ops.forced_gating(logits, torch.zeros(5, 2, dtype=torch.long))


# ----- Hugging Face models with swapped layers ------------------------------------------------------------


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_replay_and_checkpoint_of_a_swapped_transformers_model(family):
    pytest.importorskip("transformers")
    from test_transformers_swap import build, token_ids

    from moe_ext.integrations.transformers import swap_moe_layers

    model = build(family).train()
    swap_moe_layers(model)
    initial = copy.deepcopy(model)
    ids = token_ids(batch=2, length=10, seed=3)

    def train_step(m):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    with moe_ext.trace_routing(model) as trace:
        loss, grads = train_step(model)
    replayed = copy.deepcopy(initial)
    with moe_ext.replay_routing(replayed, trace) as replay:
        loss_replayed, grads_replayed = train_step(replayed)
    assert set(replay.remaining().values()) == {0} and replay.names == trace.layers
    checkpointed = copy.deepcopy(initial)
    checkpointed.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": moe_ext.checkpoint_context}
    )
    loss_checkpointed, grads_checkpointed = train_step(checkpointed)
    for other_loss, other_grads in [(loss_replayed, grads_replayed), (loss_checkpointed, grads_checkpointed)]:
        assert torch.equal(other_loss, loss)
        assert other_grads.keys() == grads.keys()
        for name, grad in grads.items():
            assert torch.equal(other_grads[name], grad), name
