"""Routing schemes of moe_ext.MoE against independent float64 references written from the papers.

Every expected value comes from tests/scheme_reference.py (plain Python sorts and torch
arithmetic; nothing from moe_ext.routing). Randomness is reproduced by redrawing from a
generator seeded like the layer's: the layer draws, per forward and in this order, the
jitter U(1-eps, 1+eps) [T, H], the gating noise N(0, 1) [T, E], the "random" drop
priority U[0, 1) [T, k] and GShard's per-token U[0, 1) [T].
"""

from __future__ import annotations

import copy
import math
import os
from types import SimpleNamespace

import pytest
import scheme_reference as ref
import torch
import torch.nn.functional as F

import moe_ext
from moe_ext import MoE, trace_routing
from moe_ext.presets import PRESETS

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny problems: the ops' intra-op parallelism only costs time here (tests that compare
    thread counts set them explicitly)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ==================================================================================================
# helpers


def gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def randn(*shape, seed: int, dtype=F64, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen(seed), dtype=F64) * scale).to(dtype)


def randomize(layer: MoE, seed: int, router_scale: float = 1.0, other_scale: float = 0.5, skip=()) -> MoE:
    """Fills every parameter from a seeded generator (independent of the layer's init)."""
    g = gen(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name in skip:
                continue
            scale = router_scale if name == "router.weight" else other_scale
            p.copy_((torch.randn(p.shape, generator=g, dtype=F64) * scale).to(p.dtype))
    return layer


def params64(layer: MoE) -> dict:
    """float64 views of the parameters: the same tensors (so autograd reaches them) when already float64."""
    return {n: (p if p.dtype == F64 else p.detach().double()) for n, p in layer.named_parameters()}


def traced(layer: MoE, x: torch.Tensor):
    """(output, experts [T, k] int64, dropped [T, k] bool) of one forward."""
    with trace_routing(layer) as trace:
        y = layer(x)
    return y, trace.experts("<root>").long(), trace.dropped("<root>")


def ref_capacity(layer: MoE, T: int) -> int | None:
    cf = layer.capacity_factor if layer.training else layer.eval_capacity_factor
    if cf is None:
        return None
    per_token = 1 if layer.router_type == "expert_choice" else layer.top_k
    return ref.capacity(cf, T, per_token, layer.num_experts, layer.min_capacity)


def ref_token_choice(layer: MoE, x: torch.Tensor, *, logits=None, drop_key=None, excluded=None):
    """Reference forward of a token-choice layer from its configuration and parameters.

    logits: the routing logits (default: clean x W_r^T in float64). drop_key: factory
    weights -> key(t, j) for the capacity order (default: position). excluded: assignments
    dropped before capacity (GShard random routing).
    """
    P = params64(layer)
    H, E, k = layer.hidden_size, layer.num_experts, layer.top_k
    tokens = x.reshape(-1, H).double()
    T = tokens.shape[0]
    if logits is None:
        logits = tokens @ P["router.weight"].T
    scores = torch.softmax(logits, -1) if layer.score_func == "softmax" else torch.sigmoid(logits)
    indices, weights = ref.route_topk(
        scores,
        k,
        layer.normalize_weights,
        layer.routed_scaling_factor,
        layer.selection_bias,
        layer.n_group,
        layer.topk_group,
    )
    key = ref.position_key if drop_key is None else drop_key(weights)
    kept = ref.kept_under_capacity(indices, E, ref_capacity(layer, T), key, excluded)
    y = ref.combine_output(
        tokens, indices, weights, kept, P["w_in"], P["w_out"], layer.activation, P.get("b_in"), P.get("b_out")
    )
    if layer.shared_expert is not None:
        shared = ref.dense_ffn(
            tokens, P["shared_expert.w_in.weight"], P["shared_expert.w_out.weight"], layer.activation
        )
        if layer.shared_expert_gate is not None:
            shared = torch.sigmoid(tokens @ P["shared_expert_gate.weight"].T) * shared
        y = y + shared
    return SimpleNamespace(
        y=y.reshape(x.shape[:-1] + (H,)),
        indices=indices,
        weights=weights,
        kept=kept,
        scores=scores,
        logits=logits,
        tokens=tokens,
    )


def dropped_of(kept) -> torch.Tensor:
    return ~torch.tensor(kept, dtype=torch.bool)


def close(actual, expected, rtol=1e-9, atol=1e-10, msg=""):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=msg or None)


def skewed_tokens(T: int, H: int, seed: int, dtype=F64) -> torch.Tensor:
    """Tokens whose feature 0 is large and positive, so a router row with a big weight 0 attracts them."""
    x = randn(T, H, seed=seed)
    x[:, 0] = x[:, 0].abs() + 1.0
    return x.to(dtype)


# ==================================================================================================
# Switch Transformer: capacity, train/eval factor, jitter, fp32 router, losses


@pytest.mark.parametrize(
    "T,k,E,cf,ecf,min_cap",
    [
        (10, 1, 4, 1.25, 2.0, 1),
        (3, 1, 8, 1.0, 2.0, 4),
        (16, 2, 4, 0.5, None, 1),
        (12, 2, 6, 1.5, "same", 2),
        (7, 2, 4, 0.25, 1.0, 1),
    ],
)
def test_capacity_formula_train_and_eval(T, k, E, cf, ecf, min_cap):
    layer = MoE(8, 4, E, top_k=k, capacity_factor=cf, eval_capacity_factor=ecf, min_capacity=min_cap)
    assert layer.training
    assert layer.capacity(T) == max(min_cap, math.ceil(cf * T * k / E))
    layer.eval()
    eval_cf = cf if ecf == "same" else ecf
    expected = None if eval_cf is None else max(min_cap, math.ceil(eval_cf * T * k / E))
    assert layer.capacity(T) == expected


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_switch_top1_capacity_drops_use_train_or_eval_factor(mode):
    H, F_, E, T = 8, 6, 4, 24
    layer = MoE(
        H,
        F_,
        E,
        top_k=1,
        activation="relu",
        capacity_factor=1.0,
        eval_capacity_factor=2.0,
        min_capacity=1,
        normalize_weights=False,
        aux_loss_coef=0.0,
        dtype=F64,
    )
    randomize(layer, 1)
    with torch.no_grad():
        layer.router.weight[0, 0] = 2.5  # expert 0 attracts most tokens
    layer.train(mode == "train")
    x = skewed_tokens(T, H, seed=2)
    y, experts, dropped = traced(layer, x)
    r = ref_token_choice(layer, x)
    C = 6 if mode == "train" else 12  # ceil(cf * 24 * 1 / 4)
    counts = torch.bincount(torch.tensor([row[0] for row in r.indices]), minlength=E)
    assert int(counts.max()) > C, "test data must overflow an expert"
    assert experts.tolist() == r.indices
    assert torch.equal(dropped, dropped_of(r.kept))
    assert layer.last_stats.tokens_per_expert.tolist() == counts.tolist()
    assert layer.last_stats.tokens_per_expert_kept.tolist() == counts.clamp(max=C).tolist()
    close(y, r.y)


def test_switch_preset_settings():
    layer = MoE.from_preset("switch", hidden_size=8, ffn_hidden_size=4)
    expected = dict(
        top_k=1,
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
        router_dtype=torch.float32,
        router_jitter=0.01,
        normalize_weights=False,
        score_func="softmax",
        aux_loss_coef=1e-2,
        z_loss_coef=1e-3,
        drop_policy="position",
    )
    for name, value in expected.items():
        assert getattr(layer, name) == value, name
    assert layer.num_experts == 8 and layer.router_type == "token_choice"
    assert layer.min_capacity == PRESETS["switch"].settings["min_capacity"]


def _jitter_layer(eps, generator=None, dtype=F64, **kw):
    layer = MoE(
        8,
        6,
        4,
        top_k=1,
        activation="relu",
        capacity_factor=2.0,
        normalize_weights=False,
        router_jitter=eps,
        generator=generator,
        aux_loss_coef=0.0,
        dtype=dtype,
        **kw,
    )
    return randomize(layer, 3, router_scale=2.0)


def test_switch_jitter_train_matches_reference_with_same_draw():
    eps, seed = 0.2, 11
    layer = _jitter_layer(eps, gen(seed))
    x = randn(3, 5, 8, seed=4)
    y = layer(x)
    tokens = x.reshape(-1, 8)
    U = torch.empty(tokens.shape, dtype=F64).uniform_(1 - eps, 1 + eps, generator=gen(seed))
    r = ref_token_choice(layer, x, logits=(tokens * U) @ layer.router.weight.T.double())
    close(y, r.y)  # jitter scales the router input only: the experts see the clean x
    plain = ref_token_choice(layer, x)
    assert not torch.allclose(y, plain.y), "jitter must change the training-mode routing weights"


def test_switch_jitter_is_off_in_eval_and_draws_nothing():
    g = gen(5)
    layer = _jitter_layer(0.3, g).eval()
    x = randn(12, 8, seed=6)
    state = g.get_state()
    y = layer(x)
    assert torch.equal(g.get_state(), state), "eval forward must not consume the generator"
    close(y, ref_token_choice(layer, x).y)


def test_switch_jitter_distribution_is_uniform_on_1_pm_eps():
    # H = 1, router [[1], [0]], x = 1: logits = [u, 0] with u the jitter, so the top-1
    # weight is sigmoid(u) and (relu expert with unit weights) y = sigmoid(u).
    eps, n = 0.25, 4000
    layer = MoE(
        1,
        1,
        2,
        top_k=1,
        activation="relu",
        normalize_weights=False,
        router_jitter=eps,
        generator=gen(7),
        aux_loss_coef=0.0,
        dtype=F64,
    )
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0], [0.0]]))
        layer.w_in.fill_(1.0)
        layer.w_out.fill_(1.0)
    y = layer(torch.ones(n, 1, dtype=F64)).detach().flatten()
    u = torch.logit(y)
    assert float(u.min()) >= 1 - eps - 1e-12 and float(u.max()) <= 1 + eps + 1e-12
    v = ((u - (1 - eps)) / (2 * eps)).sort().values  # should be U[0, 1)
    ks = float((v - (torch.arange(1, n + 1, dtype=F64) / n)).abs().max())
    assert ks < 1.63 / math.sqrt(n), f"Kolmogorov-Smirnov distance {ks} vs U(1-eps, 1+eps)"


def test_switch_jitter_reproducible_with_generator_and_global_seed():
    x = randn(20, 8, seed=8)
    a = _jitter_layer(0.2, gen(3))
    b = _jitter_layer(0.2, gen(3))
    ya1, ya2 = a(x), a(x)
    yb1 = b(x)
    assert torch.equal(ya1, yb1), "same generator seed must give the same bits"
    assert not torch.equal(ya1, ya2), "successive forwards draw fresh jitter"
    c = _jitter_layer(0.2, None)
    torch.manual_seed(123)
    y1 = c(x)
    torch.manual_seed(123)
    y2 = c(x)
    assert torch.equal(y1, y2)
    torch.manual_seed(123)
    U = torch.empty(20, 8, dtype=F64).uniform_(0.8, 1.2)
    close(y1, ref_token_choice(c, x, logits=(x * U) @ c.router.weight.T.double()).y)


def test_fp32_router_routes_on_float32_logits_under_bf16():
    # x = 1s, rows [64, 64, 64, 64] and [64, 64, 64, 65]: float32 logits 256 and 257 pick
    # expert 1; in bfloat16 257 rounds to 256 and the tie goes to expert 0.
    def build(router_dtype):
        layer = MoE(
            4,
            4,
            2,
            top_k=1,
            activation="relu",
            normalize_weights=False,
            router_dtype=router_dtype,
            aux_loss_coef=0.0,
            z_loss_coef=1.0,
            dtype=torch.bfloat16,
        )
        with torch.no_grad():
            layer.router.weight.copy_(torch.tensor([[64.0, 64, 64, 64], [64.0, 64, 64, 65]]))
        return layer

    x = torch.ones(3, 4, dtype=torch.bfloat16)
    _, experts32, _ = traced(build(torch.float32).eval(), x)
    assert experts32.flatten().tolist() == [1, 1, 1]
    _, experts16, _ = traced(build(None).eval(), x)
    assert experts16.flatten().tolist() == [0, 0, 0]  # control: bf16 logits really differ


def test_fp32_router_random_bf16_layer_matches_float32_reference():
    H, E = 16, 8
    layer = MoE(
        H,
        8,
        E,
        top_k=2,
        activation="swiglu",
        router_dtype=torch.float32,
        aux_loss_coef=1.0,
        z_loss_coef=1.0,
        aux_loss_mode="manual",
        dtype=torch.bfloat16,
    )
    randomize(layer, 9, router_scale=1.0)
    layer.eval()
    x = randn(32, H, seed=10, dtype=torch.bfloat16)
    y, experts, _ = traced(layer, x)
    r = ref_token_choice(layer, x)  # float64 logits of the bf16 values = float32 logits up to 1e-7
    assert experts.tolist() == r.indices
    assert layer.aux_loss.dtype == torch.float32
    expected = ref.load_balancing_loss(r.scores, r.indices, E) + ref.z_loss(r.logits)
    close(layer.aux_loss, expected, rtol=2e-6, atol=1e-6)
    # bf16 expert arithmetic: compare in norm
    assert float((y.detach().double() - r.y).norm() / r.y.norm()) < 2e-2


@pytest.mark.parametrize("preset", ["switch", "grok1"])
def test_fp32_router_does_not_downcast_a_float64_layer(preset):
    # DESIGN.md: float64 is what gradcheck uses and "routing math runs in float32 at least";
    # the fp32 router of Switch / Grok-1 is an upcast for bf16 training, not a downcast.
    layer = MoE.from_preset(
        preset, hidden_size=4, ffn_hidden_size=3, num_experts=4, router_jitter=0.0, aux_loss_mode="manual", dtype=F64
    ).eval()
    randomize(layer, 14)
    x = randn(6, 4, seed=15)
    y = layer(x)
    close(y, ref_token_choice(layer, x).y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_switch_load_balancing_and_z_loss_values_and_gradients(mode):
    H, E, T = 8, 4, 20
    layer = MoE.from_preset(
        "switch",
        hidden_size=H,
        ffn_hidden_size=6,
        num_experts=E,
        router_dtype=None,
        router_jitter=0.0,
        aux_loss_coef=0.3,
        z_loss_coef=0.7,
        aux_loss_mode="manual",
        dtype=F64,
    )
    randomize(layer, 12, router_scale=1.5)
    layer.train(mode == "train")
    x = randn(T, H, seed=13)
    layer(x)
    r = ref_token_choice(layer, x)
    expected = 0.3 * ref.load_balancing_loss(r.scores, r.indices, E) + 0.7 * ref.z_loss(r.logits)
    close(layer.aux_loss, expected)
    (g,) = torch.autograd.grad(layer.aux_loss, layer.router.weight)
    (g_ref,) = torch.autograd.grad(expected, layer.router.weight)
    close(g, g_ref)


# ==================================================================================================
# Noisy top-k gating (Shazeer et al. 2017)


def _noisy_layer(seed=21, k=2, E=5, generator_seed=31, jitter=0.0, ic=0.7, lc=1.3, **kw):
    layer = MoE(
        6,
        5,
        E,
        top_k=k,
        activation="relu",
        noisy_gating=True,
        importance_loss_coef=ic,
        load_loss_coef=lc,
        aux_loss_coef=0.0,
        aux_loss_mode="manual",
        router_jitter=jitter,
        generator=gen(generator_seed),
        dtype=F64,
        **kw,
    )
    return layer


def _noisy_reference(layer, x, Wr, Wn, seed, training, jitter=0.0):
    """Shazeer eq. 3-5: H = x W_g + N(0,1) softplus(x W_noise); G = softmax(KeepTopK(H, k)).

    Losses of Sec. 4 / App. A."""
    tokens = x.reshape(-1, layer.hidden_size).double()
    T, E, k = tokens.shape[0], layer.num_experts, layer.top_k
    g = gen(seed)
    router_in = tokens
    if training and jitter:
        router_in = tokens * torch.empty(tokens.shape, dtype=F64).uniform_(1 - jitter, 1 + jitter, generator=g)
    clean = router_in @ Wr.T
    std = F.softplus(router_in @ Wn.T)
    noisy = clean + torch.randn((T, E), generator=g, dtype=F64) * std if training else clean
    keep = torch.zeros(T, E, dtype=torch.bool)
    for t in range(T):
        keep[t, ref.desc_order(noisy[t].tolist(), range(E))[:k]] = True
    gates = torch.softmax(noisy.masked_fill(~keep, -math.inf), dim=-1)
    aux = layer.importance_loss_coef * ref.cv_squared(gates.sum(0))
    if training:
        aux = aux + layer.load_loss_coef * ref.cv_squared(ref.smooth_load(clean, noisy, std, k))
    return SimpleNamespace(noisy=noisy, gates=gates, aux=aux, tokens=tokens)


def test_noisy_gating_noise_linear_is_zero_initialized():
    layer = MoE(6, 5, 4, noisy_gating=True)
    assert isinstance(layer.noise, torch.nn.Linear)
    assert layer.noise.weight.shape == (4, 6) and layer.noise.bias is None
    assert torch.count_nonzero(layer.noise.weight) == 0
    assert MoE(6, 5, 4).noise is None


@pytest.mark.parametrize("k,jitter", [(1, 0.0), (2, 0.0), (2, 0.1)])
def test_noisy_gating_train_output_and_aux_loss_match_reference(k, jitter):
    seed = 41
    layer = randomize(_noisy_layer(k=k, generator_seed=seed, jitter=jitter), 22, router_scale=1.0)
    x = randn(4, 6, 6, seed=23)
    y = layer(x)
    r = _noisy_reference(layer, x, layer.router.weight, layer.noise.weight, seed, True, jitter)
    P = params64(layer)
    expected_y = torch.stack(
        [
            sum(
                r.gates[t, e] * ref.expert_ffn(r.tokens[t], P["w_in"][e], P["w_out"][e], "relu")
                for e in range(layer.num_experts)
                if r.gates[t, e] > 0
            )
            for t in range(r.tokens.shape[0])
        ]
    ).reshape(x.shape)
    close(y, expected_y)
    close(layer.aux_loss, r.aux, rtol=1e-6, atol=1e-9)  # the formula (float64 precision: next test)
    clean = _noisy_reference(layer, x, layer.router.weight, layer.noise.weight, seed, False)
    assert not torch.allclose(r.gates, clean.gates), "training noise must change the gates"


def test_noisy_gating_eval_is_clean_and_draws_nothing():
    g_seed = 43
    layer = randomize(_noisy_layer(generator_seed=g_seed), 24).eval()
    x = randn(10, 6, seed=25)
    state = layer.generator.get_state()
    y = layer(x)
    assert torch.equal(layer.generator.get_state(), state)
    r = _noisy_reference(layer, x, layer.router.weight, layer.noise.weight, g_seed, False)
    close(layer.aux_loss, r.aux)  # importance loss only (the load loss needs the noise)
    close(y, ref_token_choice(layer, x).y)


def test_noisy_gating_load_loss_gradient_reaches_noise_weights():
    seed = 45
    layer = randomize(_noisy_layer(generator_seed=seed, ic=0.0, lc=1.0), 26)
    x = randn(16, 6, seed=27)
    layer(x)
    gr, gn = torch.autograd.grad(layer.aux_loss, [layer.router.weight, layer.noise.weight])
    r = _noisy_reference(layer, x, layer.router.weight, layer.noise.weight, seed, True)
    gr_ref, gn_ref = torch.autograd.grad(r.aux, [layer.router.weight, layer.noise.weight])
    assert float(gn_ref.abs().max()) > 1e-3
    close(gr, gr_ref, rtol=1e-4, atol=1e-8)
    close(gn, gn_ref, rtol=1e-4, atol=1e-8)


def test_noisy_gating_aux_loss_keeps_float64_precision():
    # DESIGN.md: ops accept float64 ("what gradcheck uses"); routing math runs in float32 *at least*.
    seed = 41
    layer = randomize(_noisy_layer(k=2, generator_seed=seed), 22)
    x = randn(24, 6, seed=23)
    layer(x)
    r = _noisy_reference(layer, x, layer.router.weight, layer.noise.weight, seed, True)
    assert layer.aux_loss.dtype == F64
    close(layer.aux_loss, r.aux, rtol=1e-10, atol=1e-12)


def test_noisy_gating_aux_loss_gradcheck():
    seed = 47
    layer = randomize(_noisy_layer(generator_seed=seed, k=2, E=4), 28)
    x = randn(10, 6, seed=29)

    def aux(wr, wn):
        layer.generator.manual_seed(seed)
        torch.func.functional_call(layer, {"router.weight": wr, "noise.weight": wn}, (x,))
        return layer.aux_loss

    wr = layer.router.weight.detach().clone().requires_grad_()
    wn = layer.noise.weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(aux, (wr, wn), eps=1e-6, atol=1e-6, rtol=1e-5)


# ==================================================================================================
# GShard: random routing of the second expert, first-choice aux loss


def _gshard_layer(seed, cf=0.75, E=4, **kw):
    layer = MoE(
        8,
        6,
        E,
        top_k=2,
        activation="relu",
        capacity_factor=cf,
        normalize_weights=True,
        random_routing=True,
        aux_loss_type="gshard",
        aux_loss_coef=1.0,
        aux_loss_mode="manual",
        generator=gen(seed),
        dtype=F64,
        **kw,
    )
    return layer


def _gshard_excluded(weights, u):
    w = weights.detach()
    return {(t, 1) for t in range(w.shape[0]) if not 2 * float(w[t, 1]) / float(w[t, 0] + w[t, 1]) > float(u[t])}


def test_gshard_preset_settings():
    layer = MoE.from_preset("gshard", hidden_size=8, ffn_hidden_size=4)
    assert layer.top_k == 2 and layer.random_routing and layer.aux_loss_type == "gshard"
    assert layer.capacity_factor is not None and layer.drop_policy == "position"


def test_gshard_random_routing_kept_set_and_output():
    seed, T = 51, 24
    layer = randomize(_gshard_layer(seed), 52)
    with torch.no_grad():
        layer.router.weight[0, 0] = 1.5
    x = skewed_tokens(T, 8, seed=53)
    y, experts, dropped = traced(layer, x)
    r0 = ref_token_choice(layer, x)
    u = torch.rand(T, generator=gen(seed), dtype=F64)
    excluded = _gshard_excluded(r0.weights, u)
    r = ref_token_choice(layer, x, excluded=excluded)
    # data sanity: some second choices are dropped at random, and a dropped second choice
    # holding capacity would have displaced a later assignment
    assert 0 < len(excluded) < T
    C = ref_capacity(layer, T)
    naive = ref.kept_under_capacity(r.indices, 4, C, ref.position_key)
    naive = [[kk and (t, j) not in excluded for j, kk in enumerate(row)] for t, row in enumerate(naive)]
    assert naive != r.kept, "test data must distinguish 'dropped second choices take no capacity'"
    assert experts.tolist() == r.indices
    assert torch.equal(dropped, dropped_of(r.kept))
    close(y, r.y)


def test_gshard_random_routing_stats_count_only_processed_assignments():
    # RoutingStats.tokens_per_expert_kept = "assignments each expert processed, after capacity";
    # dropped = "assignments dropped by capacity" (here: capacity or random routing).
    seed, T = 51, 24
    layer = randomize(_gshard_layer(seed), 52)
    with torch.no_grad():
        layer.router.weight[0, 0] = 1.5
    x = skewed_tokens(T, 8, seed=53)
    layer(x)
    r0 = ref_token_choice(layer, x)
    r = ref_token_choice(layer, x, excluded=_gshard_excluded(r0.weights, torch.rand(T, generator=gen(seed), dtype=F64)))
    kept_counts = [0] * 4
    for t, row in enumerate(r.indices):
        for j, e in enumerate(row):
            kept_counts[e] += int(r.kept[t][j])
    assert layer.last_stats.tokens_per_expert_kept.tolist() == kept_counts
    assert int(layer.last_stats.dropped) == 2 * T - sum(kept_counts)


def test_gshard_random_routing_is_off_in_eval():
    seed, T = 55, 16
    layer = randomize(_gshard_layer(seed, cf=2.0), 56).eval()
    x = randn(T, 8, seed=57)
    state = layer.generator.get_state()
    y, _, dropped = traced(layer, x)
    assert torch.equal(layer.generator.get_state(), state)
    r = ref_token_choice(layer, x)
    assert torch.equal(dropped, dropped_of(r.kept))
    close(y, r.y)


def test_gshard_aux_loss_counts_first_choices_only():
    seed, T, E = 59, 20, 4
    layer = randomize(_gshard_layer(seed, E=E), 60)
    x = randn(T, 8, seed=61)
    layer(x)
    r = ref_token_choice(layer, x)
    first = [[row[0]] for row in r.indices]
    expected = ref.load_balancing_loss(r.scores, first, E)
    close(layer.aux_loss, expected)
    both = ref.load_balancing_loss(r.scores, r.indices, E)
    assert not torch.allclose(expected, both)
    (g,) = torch.autograd.grad(layer.aux_loss, layer.router.weight)
    (g_ref,) = torch.autograd.grad(expected, layer.router.weight)
    close(g, g_ref)


# ==================================================================================================
# Presets: Mixtral, Grok-1, Qwen3-MoE, OLMoE (and the rest of the table)

# Written from the papers / released configs, not copied from moe_ext.presets.
PAPER_SETTINGS = {
    "mixtral": dict(
        num_experts=8,
        top_k=2,
        activation="swiglu",
        score_func="softmax",
        normalize_weights=True,
        capacity_factor=None,
        router_type="token_choice",
    ),
    "grok1": dict(
        num_experts=8,
        top_k=2,
        activation="geglu_tanh",
        score_func="softmax",
        normalize_weights=False,
        router_dtype=torch.float32,
        capacity_factor=None,
    ),
    "qwen3_moe": dict(
        num_experts=128,
        top_k=8,
        activation="swiglu",
        score_func="softmax",
        normalize_weights=False,
        capacity_factor=None,
    ),
    "olmoe": dict(
        num_experts=64,
        top_k=8,
        activation="swiglu",
        score_func="softmax",
        normalize_weights=False,
        aux_loss_coef=1e-2,
        z_loss_coef=1e-3,
        capacity_factor=None,
    ),
}

_ATTR = {"router": "router_type"}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_from_preset_sets_what_the_table_says(name):
    layer = MoE.from_preset(name, hidden_size=8, ffn_hidden_size=4)
    preset = PRESETS[name]
    for key, value in preset.settings.items():
        if key == "selection_bias":
            assert (layer.selection_bias is not None) == value
            continue
        assert getattr(layer, _ATTR.get(key, key)) == value, key
    if "num_experts" not in preset.settings:
        assert layer.num_experts == 8
    shared = preset.shared_expert_multiple * 4
    assert (layer.shared_expert is not None) == bool(shared)
    if shared:
        assert layer.shared_expert.w_out.weight.shape == (8, shared)
    for key, value in PAPER_SETTINGS.get(name, {}).items():
        assert getattr(layer, key) == value, key
    override = MoE.from_preset(name, hidden_size=8, ffn_hidden_size=4, aux_loss_coef=0.125, min_capacity=3)
    assert override.aux_loss_coef == 0.125 and override.min_capacity == 3


@pytest.mark.parametrize("name", ["mixtral", "grok1", "qwen3_moe", "olmoe"])
def test_preset_output_matches_loop_reference(name):
    H = 8
    layer = MoE.from_preset(name, hidden_size=H, ffn_hidden_size=4)
    randomize(layer, 70, router_scale=1.0)
    x = randn(2, 6, H, seed=71, dtype=torch.float32)
    layer.eval()
    y, experts, dropped = traced(layer, x)
    r = ref_token_choice(layer, x)
    assert experts.tolist() == r.indices and not bool(dropped.any())
    close(y, r.y, rtol=1e-4, atol=2e-5)
    expected_aux = layer.aux_loss_coef * ref.load_balancing_loss(r.scores, r.indices, layer.num_experts)
    expected_aux = expected_aux + layer.z_loss_coef * ref.z_loss(r.logits)
    close(layer.aux_loss, expected_aux, rtol=1e-5, atol=1e-7)
    # control: the other normalization choice gives a different output
    flipped = copy.deepcopy(layer)
    flipped.normalize_weights = not layer.normalize_weights
    assert not torch.allclose(flipped(x), y, rtol=1e-3, atol=1e-4)


# ==================================================================================================
# DeepSeek-V3: sigmoid, selection bias, group limit, scaling, shared expert, balancing


def _deepseek_layer(seed=80, dtype=F64, **overrides):
    kw = dict(
        num_experts=16,
        top_k=4,
        n_group=4,
        topk_group=2,
        seq_aux_loss_coef=0.0,
        bias_update_rate=0.0,
        aux_loss_mode="manual",
        dtype=dtype,
    )
    kw.update(overrides)
    layer = MoE.from_preset("deepseek_v3", hidden_size=8, ffn_hidden_size=6, **kw)
    return randomize(layer, seed)


def test_deepseek_v3_preset_settings():
    layer = MoE.from_preset("deepseek_v3", hidden_size=8, ffn_hidden_size=4)
    assert layer.num_experts == 256 and layer.top_k == 8 and layer.score_func == "sigmoid"
    assert layer.normalize_weights and layer.routed_scaling_factor == 2.5
    assert (layer.n_group, layer.topk_group) == (8, 4)
    assert layer.selection_bias.shape == (256,) and layer.selection_bias.dtype == torch.float32
    assert torch.count_nonzero(layer.selection_bias) == 0
    assert "selection_bias" in dict(layer.named_buffers()) and "selection_bias" not in dict(layer.named_parameters())
    assert layer.bias_update_rate == 1e-3 and layer.seq_aux_loss_coef == 1e-4 and layer.aux_loss_coef == 0.0
    assert layer.shared_expert is not None and layer.shared_expert.w_in.weight.shape == (8, 8)


@pytest.mark.parametrize("gate", [False, True])
def test_deepseek_v3_forward_matches_reference(gate):
    layer = _deepseek_layer(shared_expert_gate=gate)
    with torch.no_grad():
        layer.selection_bias.copy_(randn(16, seed=81, scale=0.3).float())
    layer.eval()
    x = randn(3, 5, 8, seed=82)
    y, experts, _ = traced(layer, x)
    r = ref_token_choice(layer, x)
    assert experts.tolist() == r.indices
    close(y, r.y)
    # controls: the bias and the group limit both change the selection on this data
    plain = [ref.select_experts(row, 4) for row in r.scores.tolist()]
    biased = [
        ref.select_experts([s + b for s, b in zip(row, layer.selection_bias.tolist(), strict=False)], 4)
        for row in r.scores.tolist()
    ]
    assert plain != biased and biased != r.indices
    # control: weights taken from the biased scores (selection values) would give another output
    bias = layer.selection_bias.double()
    _, w_biased = ref.route_topk(r.scores + bias, 4, True, 2.5, None, 4, 2)
    P = params64(layer)
    routed = ref.combine_output(r.tokens, r.indices, w_biased, r.kept, P["w_in"], P["w_out"], "swiglu")
    routed_ok = ref.combine_output(r.tokens, r.indices, r.weights, r.kept, P["w_in"], P["w_out"], "swiglu")
    assert not torch.allclose(routed, routed_ok)


def test_deepseek_group_score_is_sum_of_best_two():
    # 12 experts in 3 groups of 4, keep 1 group, top-2. Logits (router = identity):
    #   group 0: [3, -3, -3, -3]   max 0.95, best-two 1.00, sum-all 1.09
    #   group 1: [1.5, 1.5, -3, -3] max 0.82, best-two 1.64, sum-all 1.73
    #   group 2: [0.5] * 4          max 0.62, best-two 1.25, sum-all 2.49
    # best-two picks group 1 (experts 4, 5); max would pick 0, sum-all would pick 2.
    layer = MoE(12, 4, 12, top_k=2, score_func="sigmoid", n_group=3, topk_group=1, aux_loss_coef=0.0, dtype=F64)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(12, dtype=F64))
    x = torch.tensor([[3.0, -3, -3, -3, 1.5, 1.5, -3, -3, 0.5, 0.5, 0.5, 0.5]], dtype=F64)
    _, experts, _ = traced(layer.eval(), x)
    assert experts.tolist() == [[4, 5]]


def test_deepseek_bias_update_after_training_forward():
    rate = 0.01
    layer = _deepseek_layer(
        num_experts=8, top_k=2, n_group=1, topk_group=1, bias_update_rate=rate, shared_expert_size=0
    )
    with torch.no_grad():
        layer.selection_bias.copy_(randn(8, seed=83, scale=0.05).float())
    x = randn(40, 8, seed=84)
    before = layer.selection_bias.clone()
    r = ref_token_choice(layer, x)  # routing with the bias as it was before the forward
    y = layer(x)
    close(y, r.y)
    load = torch.zeros(8, dtype=F64)
    for row in r.indices:
        for e in row:
            load[e] += 1
    expected = before.double() + rate * torch.sign(load.mean() - load)
    assert int((load == load.mean()).sum()) < 8
    close(layer.selection_bias, expected, rtol=0, atol=1e-7)
    layer.eval()
    after_train = layer.selection_bias.clone()
    layer(x)
    assert torch.equal(layer.selection_bias, after_train), "no bias update in eval mode"


def test_aux_loss_free_balancing_reaches_balance_without_aux_loss():
    """REQUIRED: a badly skewed router balances by the selection-bias update alone."""
    H, E, k, T, rate, bound = 16, 8, 2, 512, 0.005, 80
    layer = MoE(
        H,
        8,
        E,
        top_k=k,
        score_func="sigmoid",
        normalize_weights=True,
        aux_loss_coef=0.0,
        selection_bias=True,
        bias_update_rate=rate,
    )
    assert layer.training
    with torch.no_grad():
        layer.router.weight.copy_(randn(E, H, seed=90, scale=0.3, dtype=torch.float32))
        layer.router.weight[:2, 0] += 1.5  # tokens with a positive feature 0 prefer experts 0 and 1
    router_before = layer.router.weight.detach().clone()
    x = randn(T, H, seed=91, dtype=torch.float32)
    x[:, 0] = x[:, 0].abs() + 0.5
    history = []
    for step in range(bound):
        layer(x)
        history.append(float(layer.last_stats.load_imbalance))
        if step == 0:
            first_load = layer.last_stats.tokens_per_expert
            assert sorted(first_load.topk(2).indices.tolist()) == [0, 1], first_load
        assert float(layer.aux_loss) == 0.0 and not layer.aux_loss.requires_grad
    assert history[0] > 2.5, f"the router must start badly skewed, got {history[0]}"
    reached = [i for i, h in enumerate(history) if h < 1.2]
    assert reached, f"load imbalance never went below 1.2 in {bound} forwards: {history}"
    assert max(history[reached[0] :]) < 1.3, history  # and it stays balanced (sign updates oscillate a little)
    assert torch.equal(layer.router.weight, router_before)
    assert layer.router.weight.grad is None


@pytest.mark.parametrize("shape", [(2, 5), (2, 3, 4), (7,)])
def test_deepseek_sequence_wise_aux_loss(shape):
    E, k = 6, 2
    layer = MoE(
        8,
        5,
        E,
        top_k=k,
        score_func="sigmoid",
        normalize_weights=True,
        aux_loss_coef=0.0,
        seq_aux_loss_coef=1.0,
        selection_bias=True,
        aux_loss_mode="manual",
        dtype=F64,
    )
    randomize(layer, 92, router_scale=1.0)
    x = randn(*shape, 8, seed=93)
    layer.eval()
    layer(x)
    r = ref_token_choice(layer, x)
    seq_len = shape[-1]
    expected = ref.sequence_aux_loss(r.scores, r.indices, E, k, seq_len)
    close(layer.aux_loss, expected)
    (g,) = torch.autograd.grad(layer.aux_loss, layer.router.weight)
    (g_ref,) = torch.autograd.grad(expected, layer.router.weight)
    close(g, g_ref)
    if len(shape) > 1:  # control: the per-sequence split matters
        whole = ref.sequence_aux_loss(r.scores, r.indices, E, k, r.scores.shape[0])
        assert not torch.allclose(whole, expected)


# ==================================================================================================
# Expert-choice routing (Zhou et al. 2022)


def _expert_choice_layer(seed=100, cf=1.0, min_capacity=1, E=4, dtype=F64, **kw):
    layer = MoE(
        8,
        6,
        E,
        router="expert_choice",
        capacity_factor=cf,
        min_capacity=min_capacity,
        activation="swiglu",
        aux_loss_coef=0.0,
        aux_loss_mode="manual",
        dtype=dtype,
        **kw,
    )
    return randomize(layer, seed, router_scale=1.5)


@pytest.mark.parametrize("T,cf,min_cap,E", [(12, 1.0, 1, 4), (10, 2.0, 1, 4), (5, 0.5, 3, 4), (3, 2.0, 1, 4)])
def test_expert_choice_capacity_and_every_expert_full(T, cf, min_cap, E):
    layer = _expert_choice_layer(cf=cf, min_capacity=min_cap, E=E)
    C = max(min_cap, math.ceil(cf * T / E))
    assert layer.capacity(T) == C
    x = randn(T, 8, seed=101)
    y = layer(x)
    take = min(C, T)
    assert layer.last_stats.tokens_per_expert_kept.tolist() == [take] * E
    scores = torch.softmax(x @ layer.router.weight.T, -1)
    plan = moe_ext.ops.expert_choice_plan(scores.detach(), C)
    assert (plan.row_of >= 0).sum(0).tolist() == [take] * E
    chosen = ref.expert_choice_selection(scores, C)
    close(y, ref.expert_choice_output(x, scores, chosen, layer.w_in, layer.w_out, "swiglu"))


def test_expert_choice_output_and_gradients_match_reference():
    T = 16
    layer = _expert_choice_layer(cf=1.0)
    x = randn(T, 8, seed=102).requires_grad_()
    probe = randn(T, 8, seed=103)
    y = layer(x)
    scores = torch.softmax(x @ layer.router.weight.T, -1)
    chosen = ref.expert_choice_selection(scores, 4)
    y_ref = ref.expert_choice_output(x, scores, chosen, layer.w_in, layer.w_out, "swiglu")
    close(y, y_ref)
    per_token = [sum(t in c for c in chosen) for t in range(T)]
    assert 0 in per_token and max(per_token) >= 2, "data should show tokens with 0 and with several experts"
    inputs = [x, layer.router.weight, layer.w_in, layer.w_out]
    grads = torch.autograd.grad((y * probe).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), inputs)
    for name, g, g_ref in zip(["x", "router", "w_in", "w_out"], grads, grads_ref, strict=False):
        assert float(g_ref.abs().max()) > 0, name
        close(g, g_ref, msg=name)


def _expected_ec_plan(scores, C):
    T, E = scores.shape
    chosen = ref.expert_choice_selection(scores, C)
    row_of = torch.full((T, E), -1, dtype=torch.int64)
    token_of = torch.full((E * C,), -1, dtype=torch.int64)
    for e, toks in enumerate(chosen):
        for i, t in enumerate(toks):
            row_of[t, e] = e * C + i
            token_of[e * C + i] = t
    offsets = torch.arange(E + 1, dtype=torch.int64) * C
    return row_of, token_of, offsets, [len(c) for c in chosen]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("T,E,C", [(9, 3, 4), (6, 4, 6), (4, 2, 7), (1, 3, 1)])
def test_expert_choice_plan_op_matches_reference_with_ties(T, E, C, dtype):
    # scores from {0, 0.25, 0.5, 0.75}: plenty of exact ties, which go to the lower token index
    scores = (torch.randint(0, 4, (T, E), generator=gen(T * 100 + E)).to(F64) / 4).to(dtype)
    plan = moe_ext.ops.expert_choice_plan(scores, C)
    row_of, token_of, offsets, takes = _expected_ec_plan(scores.double(), C)
    assert torch.equal(plan.row_of, row_of)
    assert torch.equal(plan.token_of, token_of)
    assert torch.equal(plan.offsets, offsets)
    assert plan.counts.tolist() == takes


def test_expert_choice_plan_opcheck():
    scores = torch.softmax(randn(10, 4, seed=104, dtype=torch.float32), -1)
    torch.library.opcheck(torch.ops.moe_ext.expert_choice_plan.default, (scores, 3))
    torch.library.opcheck(torch.ops.moe_ext.expert_choice_plan.default, (scores.double(), 12))


# ==================================================================================================
# Drop policies under capacity


POLICY_KEYS = {
    "position": None,
    "probs": ref.probs_key,
    "bpr": ref.bpr_key,
}


@pytest.mark.parametrize("policy", ["position", "probs", "bpr", "random"])
@pytest.mark.parametrize("normalize", [True, False])
def test_drop_policy_kept_sets(policy, normalize):
    T, E, seed = 24, 4, 110
    layer = MoE(
        8,
        6,
        E,
        top_k=2,
        activation="relu",
        capacity_factor=0.75,
        drop_policy=policy,
        normalize_weights=normalize,
        aux_loss_coef=0.0,
        generator=gen(seed),
        dtype=F64,
    )
    randomize(layer, 111, router_scale=1.5)
    with torch.no_grad():
        layer.router.weight[1, 0] = 2.0
    x = skewed_tokens(T, 8, seed=112)
    y, experts, dropped = traced(layer, x)
    if policy == "random":
        prio = torch.rand((T, 2), generator=gen(seed), dtype=F64)
        key = lambda w: ref.priority_key(prio)  # noqa: E731
    else:
        key = POLICY_KEYS[policy]
    r = ref_token_choice(layer, x, drop_key=key)
    assert experts.tolist() == r.indices
    assert torch.equal(dropped, dropped_of(r.kept))
    close(y, r.y)
    if policy != "position":  # control: this policy keeps a different set than "position"
        assert r.kept != ref_token_choice(layer, x).kept


def test_bpr_orders_second_choices_by_top1_weight_at_float32_resolution():
    # Two tokens whose top-1 weights differ by one float32 ulp; both second choices go to
    # expert 2, which has room for one (C = ceil(0.75 * 2 * 2 / 3) = 1). BPR keeps the
    # second choice of the token with the larger top-1 weight: token 1.
    layer = MoE(
        3,
        2,
        3,
        top_k=2,
        activation="relu",
        capacity_factor=0.75,
        drop_policy="bpr",
        normalize_weights=False,
        aux_loss_coef=0.0,
    )
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(3))
    a = 1.0442386865615845
    b = float(torch.nextafter(torch.tensor(a, dtype=torch.float32), torch.tensor(2.0)))
    x = torch.tensor([[a, -10.0, 0.0], [-10.0, b, 0.0]], dtype=torch.float32)
    w = torch.softmax(x.double(), -1).max(-1).values
    # the layer's own float32 routing weights (the gating op it calls) differ as well
    w32, _, _ = moe_ext.ops.topk_gating(x, 2, "softmax", False)
    assert w32[1, 0] > w32[0, 0]
    _, experts, dropped = traced(layer, x)
    assert experts.tolist() == [[0, 2], [1, 2]]
    assert w[1] > w[0]
    assert dropped.tolist() == [[False, True], [False, False]]


def test_make_plan_minus_inf_priority_is_always_dropped():
    indices = torch.tensor([[0, 1], [0, 1], [1, 0], [0, 1]])
    prio = torch.tensor([[1.0, -math.inf], [-math.inf, 0.5], [2.0, 0.1], [0.3, 0.2]])
    plan = moe_ext.ops.make_plan(indices, 2, 10, prio)  # ample capacity
    assert (plan.row_of < 0).tolist() == [[False, True], [True, False], [False, False], [False, False]]
    plan = moe_ext.ops.make_plan(indices, 2, 2, prio)
    # expert 0: (2,1) p=0.1, (0,0) 1.0, (3,0) 0.3 [-inf (1,0) excluded] -> keeps (0,0), (3,0)
    # expert 1: (1,1) 0.5, (2,0) 2.0, (3,1) 0.2 [-inf (0,1) excluded]   -> keeps (2,0), (1,1)
    assert (plan.row_of >= 0).tolist() == [[True, False], [False, True], [True, False], [True, False]]
    assert plan.counts.tolist() == [4, 4]


# ==================================================================================================
# Shared experts and expert biases


@pytest.mark.parametrize("activation", ["swiglu", "relu"])
@pytest.mark.parametrize("shared,gate,bias", [(5, False, True), (5, True, False), (0, False, True), (4, True, True)])
def test_shared_expert_and_expert_bias(activation, shared, gate, bias):
    H, F_, E = 8, 6, 4
    layer = MoE(
        H,
        F_,
        E,
        top_k=2,
        activation=activation,
        shared_expert_size=shared,
        shared_expert_gate=gate,
        expert_bias=bias,
        capacity_factor=1.0,
        aux_loss_coef=0.0,
        dtype=F64,
    )
    width = 2 * F_ if activation == "swiglu" else F_
    if bias:
        assert layer.b_in.shape == (E, width) and layer.b_out.shape == (E, H)
    else:
        assert layer.b_in is None and layer.b_out is None
    if shared:
        assert layer.shared_expert.w_in.weight.shape == ((2 * shared if activation == "swiglu" else shared), H)
    randomize(layer, 120)
    x = randn(2, 7, H, seed=121).requires_grad_()
    probe = randn(2, 7, H, seed=122)
    y = layer(x)
    r = ref_token_choice(layer, x)
    close(y, r.y)
    params = [p for _, p in layer.named_parameters()]
    grads = torch.autograd.grad((y * probe).sum(), [x, *params])
    grads_ref = torch.autograd.grad((r.y * probe).sum(), [x, *params], allow_unused=True)
    for name, g, g_ref in zip(["x", *dict(layer.named_parameters())], grads, grads_ref, strict=False):
        if name == "router.weight":
            g_ref = torch.zeros_like(g) if g_ref is None else g_ref
        close(g, g_ref, msg=name)


# ==================================================================================================
# torch.compile(fullgraph=True) of every scheme (global RNG: generator=None)


def _scheme_layer(name: str, dtype=torch.float32) -> MoE:
    H, F_ = 8, 6
    small = dict(hidden_size=H, ffn_hidden_size=F_, dtype=dtype)
    common = dict(aux_loss_coef=0.01, dtype=dtype)
    if name == "switch":
        layer = MoE.from_preset("switch", num_experts=4, min_capacity=1, **small)
    elif name == "noisy_topk":
        layer = MoE.from_preset("shazeer", num_experts=6, top_k=2, **small)
    elif name == "gshard":
        layer = MoE.from_preset("gshard", num_experts=4, **small)
    elif name in ("mixtral", "grok1"):
        layer = MoE.from_preset(name, num_experts=4, **small)
    elif name == "deepseek_v3":
        layer = MoE.from_preset(
            "deepseek_v3",
            num_experts=16,
            top_k=4,
            n_group=4,
            topk_group=2,
            bias_update_rate=0.01,
            shared_expert_gate=True,
            seq_aux_loss_coef=0.1,
            **small,
        )
    elif name == "expert_choice":
        layer = MoE.from_preset("expert_choice", num_experts=4, z_loss_coef=0.01, **small)
    elif name in ("probs", "bpr", "random"):
        layer = MoE(H, F_, 4, top_k=2, capacity_factor=0.75, drop_policy=name, **common)
    elif name == "gshard_bpr":
        layer = MoE(
            H,
            F_,
            4,
            top_k=2,
            capacity_factor=0.75,
            drop_policy="bpr",
            random_routing=True,
            aux_loss_type="gshard",
            **common,
        )
    elif name == "expert_bias":
        layer = MoE(
            H,
            F_,
            4,
            top_k=2,
            expert_bias=True,
            shared_expert_size=5,
            shared_expert_gate=True,
            capacity_factor=1.0,
            **common,
        )
    elif name == "kitchen_sink":  # jitter + noise + random drops + capacity + biases + gated shared expert
        layer = MoE(
            H,
            F_,
            6,
            top_k=2,
            capacity_factor=0.75,
            drop_policy="random",
            router_jitter=0.05,
            noisy_gating=True,
            importance_loss_coef=0.1,
            load_loss_coef=0.1,
            z_loss_coef=1e-3,
            expert_bias=True,
            shared_expert_size=4,
            shared_expert_gate=True,
            **common,
        )
    else:
        raise KeyError(name)
    assert layer.generator is None
    return randomize(layer, 130, router_scale=1.0)


COMPILE_SCHEMES = [
    "switch",
    "noisy_topk",
    "gshard",
    "mixtral",
    "grok1",
    "deepseek_v3",
    "expert_choice",
    "probs",
    "bpr",
    "random",
    "gshard_bpr",
    "expert_bias",
]


def _compare_compiled(name: str, backend: str):
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    eager = _scheme_layer(name)
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, fullgraph=True, backend=backend)
    x = randn(2, 8, 8, seed=131, dtype=torch.float32)
    probe = randn(2, 8, 8, seed=132, dtype=torch.float32)
    tol = dict(rtol=1e-5, atol=1e-6)
    for step in range(2):  # train mode, twice (stateful schemes: bias update), then eval
        # fallback_random: inductor draws with the eager RNG ops, so the same seed gives the same draws
        with inductor_config.patch(fallback_random=True):
            torch.manual_seed(133 + step)
            y_c = compiled(x)
        torch.manual_seed(133 + step)
        y_e = eager(x)
        torch.testing.assert_close(y_c, y_e, **tol)
        torch.testing.assert_close(compiled_layer.aux_loss, eager.aux_loss, **tol)
        assert torch.equal(compiled_layer.last_stats.tokens_per_expert_kept, eager.last_stats.tokens_per_expert_kept)
        g_c = torch.autograd.grad((y_c * probe).sum(), list(compiled_layer.parameters()))
        g_e = torch.autograd.grad((y_e * probe).sum(), list(eager.parameters()))
        for a, b in zip(g_c, g_e, strict=False):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        if eager.selection_bias is not None:
            torch.testing.assert_close(compiled_layer.selection_bias, eager.selection_bias)
    eager.eval()
    compiled_layer.eval()
    with inductor_config.patch(fallback_random=True):
        torch.manual_seed(140)  # the "random" drop policy also draws in eval mode
        y_c = compiled(x)
    torch.manual_seed(140)
    torch.testing.assert_close(y_c, eager(x), **tol)
    torch.testing.assert_close(compiled_layer.aux_loss, eager.aux_loss, **tol)


@pytest.mark.parametrize("name", COMPILE_SCHEMES)
def test_compile_fullgraph_aot_eager_matches_eager(name):
    _compare_compiled(name, "aot_eager")


# Inductor compiles take ~10 s each on 2 cores: a combined token-choice layer (jitter, noise,
# random drops, capacity, biases, shared expert), DeepSeek-V3 and expert choice by default;
# more with MOE_EXT_SLOW_TESTS=1. aot_eager above covers every scheme.
INDUCTOR_SCHEMES = ["kitchen_sink", "deepseek_v3", "expert_choice"] + (
    ["gshard_bpr", "switch", "noisy_topk"] if os.environ.get("MOE_EXT_SLOW_TESTS") else []
)


@pytest.mark.parametrize("name", INDUCTOR_SCHEMES)
def test_compile_fullgraph_inductor_matches_eager(name):
    _compare_compiled(name, "inductor")


@pytest.mark.xfail(
    strict=True,
    reason="dynamo cannot trace a torch.Generator argument (graph break: "
    "'Failed to convert args/kwargs to proxy ... UserDefinedObjectVariable(Generator)'); "
    "compile with generator=None and seed the global RNG instead",
)
def test_compile_fullgraph_with_explicit_generator():
    torch._dynamo.reset()
    layer = MoE(8, 6, 4, top_k=2, capacity_factor=1.0, router_jitter=0.1, generator=gen(0))
    torch.compile(layer, fullgraph=True, backend="aot_eager")(randn(16, 8, seed=134, dtype=torch.float32))


# ==================================================================================================
# Reproducibility of every random scheme


RANDOM_SCHEMES = {
    "jitter": dict(top_k=1, capacity_factor=1.0, router_jitter=0.2, normalize_weights=False),
    "noisy": dict(top_k=2, noisy_gating=True, importance_loss_coef=0.1, load_loss_coef=0.1),
    "gshard": dict(top_k=2, capacity_factor=0.75, random_routing=True, aux_loss_type="gshard"),
    "random_drop": dict(top_k=2, capacity_factor=0.75, drop_policy="random"),
    "all": dict(
        top_k=2,
        capacity_factor=0.75,
        drop_policy="random",
        random_routing=True,
        router_jitter=0.1,
        noisy_gating=True,
        importance_loss_coef=0.1,
        load_loss_coef=0.1,
    ),
}


def _random_layer(kw, generator):
    layer = MoE(8, 6, 6, activation="swiglu", aux_loss_coef=0.01, generator=generator, dtype=torch.float32, **kw)
    layer = randomize(layer, 140, router_scale=1.0)
    if layer.noise is not None:
        with torch.no_grad():
            layer.noise.weight.mul_(0.2)
    return layer


def _run(layer, x, probe):
    y = layer(x)
    grads = torch.autograd.grad((y * probe).sum(), list(layer.parameters()))
    return [y.detach(), layer.aux_loss.detach(), layer.last_stats.tokens_per_expert_kept, *grads]


def _bitwise(a, b):
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=False))


@pytest.mark.parametrize("scheme", sorted(RANDOM_SCHEMES))
def test_random_schemes_reproducible(scheme, restore_num_threads):
    kw = RANDOM_SCHEMES[scheme]
    x = randn(4, 10, 8, seed=141, dtype=torch.float32)
    probe = randn(4, 10, 8, seed=142, dtype=torch.float32)
    # same generator seed -> same bits (also with a different thread count)
    torch.set_num_threads(2)
    first = _run(_random_layer(kw, gen(7)), x, probe)
    torch.set_num_threads(1)
    again = _run(_random_layer(kw, gen(7)), x, probe)
    assert _bitwise(first, again), "same generator seed must give bitwise identical outputs, losses and grads"
    other = _run(_random_layer(kw, gen(8)), x, probe)
    assert not torch.equal(first[0], other[0]), "a different seed must give different draws"
    # global RNG
    layer = _random_layer(kw, None)
    torch.manual_seed(99)
    g1 = _run(layer, x, probe)
    torch.manual_seed(99)
    g2 = _run(layer, x, probe)
    assert _bitwise(g1, g2)
    # a generator is a stream: the next forward draws fresh numbers
    layer = _random_layer(kw, gen(7))
    _run(layer, x, probe)
    assert not torch.equal(_run(layer, x, probe)[0], first[0])


# ==================================================================================================
# gradcheck (float64) of the differentiable parts of each scheme


GRAD_SCHEMES = {
    "switch": dict(
        top_k=1,
        activation="relu",
        capacity_factor=1.0,
        normalize_weights=False,
        router_jitter=0.1,
        aux_loss_coef=0.5,
        z_loss_coef=0.5,
    ),
    # the load loss is gradchecked in test_noisy_gating_aux_loss_gradcheck
    "noisy": dict(top_k=2, noisy_gating=True, importance_loss_coef=0.5, aux_loss_coef=0.0),
    "gshard": dict(top_k=2, capacity_factor=0.75, random_routing=True, aux_loss_type="gshard", aux_loss_coef=0.5),
    "deepseek": dict(
        top_k=2,
        score_func="sigmoid",
        n_group=2,
        topk_group=1,
        selection_bias=True,
        routed_scaling_factor=2.5,
        shared_expert_size=3,
        shared_expert_gate=True,
        seq_aux_loss_coef=0.5,
        aux_loss_coef=0.0,
    ),
    "expert_choice": dict(router="expert_choice", capacity_factor=1.0, z_loss_coef=0.5, aux_loss_coef=0.0),
    "probs": dict(top_k=2, capacity_factor=0.75, drop_policy="probs", aux_loss_coef=0.5),
    "bpr": dict(top_k=2, capacity_factor=0.75, drop_policy="bpr", normalize_weights=False),
    "random": dict(top_k=2, capacity_factor=0.75, drop_policy="random"),
    "grok_geglu": dict(top_k=2, activation="geglu", normalize_weights=False),
    "expert_bias": dict(top_k=2, activation="gelu", expert_bias=True, shared_expert_size=3),
}


@pytest.mark.parametrize("scheme", sorted(GRAD_SCHEMES))
def test_gradcheck_float64(scheme):
    seed = 150
    kw = dict(GRAD_SCHEMES[scheme])
    layer = MoE(4, 3, 4, aux_loss_mode="manual", generator=gen(seed), dtype=F64, **kw)
    randomize(layer, 151, router_scale=1.5)
    if layer.selection_bias is not None:
        with torch.no_grad():
            layer.selection_bias.copy_(randn(4, seed=152, scale=0.2).float())
    x = randn(2, 4, 4, seed=153).requires_grad_()
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]

    def f(x, *ps):
        layer.generator.manual_seed(seed)
        y = torch.func.functional_call(layer, dict(zip(names, ps, strict=False)), (x,))
        return y, layer.aux_loss

    y, aux = f(x, *params)
    assert aux.requires_grad or float(aux) == 0.0
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)
