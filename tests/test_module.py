"""moe_ext.MoE against a loop-over-experts float64 reference: outputs, gradients, aux losses, compile, determinism."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

import moe_ext

ACTIVATIONS = ["swiglu", "geglu", "geglu_tanh", "gelu", "relu", "silu"]


def loop_reference(layer: moe_ext.MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer computed token by token and expert by expert with plain torch ops.

    Returns (output, load-balancing loss). Uses the layer's parameters, so
    gradients flow into them.
    """
    H, E, k = layer.hidden_size, layer.num_experts, layer.top_k
    tokens = x.reshape(-1, H)
    T = tokens.shape[0]
    logits = tokens @ layer.router.weight.T
    scores = torch.softmax(logits, -1) if layer.score_func == "softmax" else torch.sigmoid(logits)
    top_values, top_index = scores.topk(k, dim=-1)
    weights = top_values / top_values.sum(-1, keepdim=True) if layer.normalize_weights else top_values
    weights = weights * layer.routed_scaling_factor
    capacity = layer.capacity(T)
    kept = torch.ones(T, k, dtype=torch.bool)
    if capacity is not None:
        for e in range(E):
            # first choices before second choices, then token order
            assigned = sorted(((j, t) for t in range(T) for j in range(k) if top_index[t, j] == e), key=lambda jt: jt)
            for j, t in assigned[capacity:]:
                kept[t, j] = False
    rows = []
    for t in range(T):
        acc = torch.zeros(H, dtype=x.dtype)
        for j in range(k):
            if not kept[t, j]:
                continue
            e = int(top_index[t, j])
            h = tokens[t] @ layer.w_in[e]
            if layer.activation in ("swiglu", "geglu", "geglu_tanh"):
                gate, up = h.chunk(2)
                gelu_kind = "tanh" if layer.activation == "geglu_tanh" else "none"
                h = (F.silu(gate) if layer.activation == "swiglu" else F.gelu(gate, approximate=gelu_kind)) * up
            else:
                h = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu}[layer.activation](h)
            acc = acc + weights[t, j] * (h @ layer.w_out[e])
        rows.append(acc)
    out = torch.stack(rows) if rows else tokens.new_zeros(0, H)
    counts = torch.bincount(top_index.reshape(-1), minlength=E).to(x.dtype)
    lb = E * (counts / T * scores.mean(0)).sum() if T else x.new_zeros(())
    return out.reshape(x.shape), lb


def make_layer(**kwargs) -> moe_ext.MoE:
    torch.manual_seed(kwargs.pop("seed", 0))
    args = dict(hidden_size=8, ffn_hidden_size=12, num_experts=4, top_k=2, dtype=torch.float64, aux_loss_coef=0.0)
    args.update(kwargs)
    return moe_ext.MoE(**args)


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"score_func": "sigmoid", "normalize_weights": False},
        {"capacity_factor": 0.5},
        {"capacity_factor": 1.0, "top_k": 1},
        {"routed_scaling_factor": 2.5, "num_experts": 6, "top_k": 3},
    ],
    ids=["dropless", "sigmoid-raw", "capacity-drops", "capacity-top1", "scaled-k3"],
)
def test_module_matches_loop_reference(activation, options):
    layer = make_layer(activation=activation, **options)
    x = torch.randn(3, 7, layer.hidden_size, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(3, 7, layer.hidden_size, dtype=torch.float64)

    y = layer(x)
    (y * probe).sum().backward()
    got_grads, got_x_grad = grads(layer), x.grad.clone()

    reference_layer = copy.deepcopy(layer)
    reference_layer.zero_grad()
    x_ref = x.detach().clone().requires_grad_()
    y_ref, _ = loop_reference(reference_layer, x_ref)
    (y_ref * probe).sum().backward()

    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_x_grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for name, grad in grads(reference_layer).items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    if "capacity_factor" in options and options["capacity_factor"] < 1:
        assert int(layer.last_stats.dropped) > 0, "the capacity case must really drop assignments"


def test_drop_in_shape_and_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        layer = moe_ext.MoE(16, 24, 4, top_k=2, dtype=dtype)
        for shape in [(16,), (5, 16), (2, 3, 16), (2, 0, 16), (1, 2, 3, 16)]:
            x = torch.randn(shape, dtype=dtype)
            y = layer(x)
            assert y.shape == x.shape and y.dtype == dtype
            assert torch.isfinite(y.float()).all()


def test_non_contiguous_input_matches_contiguous():
    layer = make_layer()
    x = torch.randn(8, 6, layer.hidden_size, dtype=torch.float64).transpose(0, 1)
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), layer(x.contiguous()), rtol=0, atol=0)


def test_aux_loss_auto_equals_manual_added_to_loss():
    auto = make_layer(aux_loss_coef=0.3, z_loss_coef=0.05, aux_loss_mode="auto")
    manual = copy.deepcopy(auto)
    manual.aux_loss_mode = "manual"
    x = torch.randn(4, 9, auto.hidden_size, dtype=torch.float64)
    probe = torch.randn_like(x)

    (auto(x) * probe).sum().backward()
    y = manual(x)
    ((y * probe).sum() + moe_ext.aux_loss(manual)).backward()

    assert not auto.aux_loss.requires_grad, "auto mode stores a detached value for logging"
    assert manual.aux_loss.requires_grad
    torch.testing.assert_close(auto.aux_loss, manual.aux_loss.detach(), rtol=0, atol=0)
    for name, grad in grads(manual).items():
        torch.testing.assert_close(grads(auto)[name], grad, rtol=1e-12, atol=1e-14)
    # the aux loss really changes the router gradient
    plain = copy.deepcopy(auto)
    plain.aux_loss_coef = plain.z_loss_coef = 0.0
    plain.zero_grad()
    (plain(x) * probe).sum().backward()
    assert not torch.allclose(plain.router.weight.grad, auto.router.weight.grad)


def test_aux_loss_value_matches_formula():
    layer = make_layer(aux_loss_coef=1.0, aux_loss_mode="manual", num_experts=6, top_k=2)
    x = torch.randn(40, layer.hidden_size, dtype=torch.float64)
    layer(x)
    _, lb = loop_reference(layer, x)
    torch.testing.assert_close(layer.aux_loss, lb, rtol=1e-12, atol=1e-14)
    z_layer = make_layer(aux_loss_coef=0.0, z_loss_coef=1.0, aux_loss_mode="manual")
    z_layer(x)
    logits = x @ z_layer.router.weight.T
    torch.testing.assert_close(z_layer.aux_loss, (torch.logsumexp(logits, -1) ** 2).mean(), rtol=1e-12, atol=0)


def test_aux_loss_scale_scales_injected_gradient():
    layer = make_layer(aux_loss_coef=1.0)
    x = torch.randn(30, layer.hidden_size, dtype=torch.float64)
    layer(x).sum().mul(0.0).backward()  # only the injected aux gradient remains
    base = layer.router.weight.grad.clone()
    assert base.abs().sum() > 0
    layer.zero_grad()
    moe_ext.set_aux_loss_scale(layer, 0.25)
    layer(x).sum().mul(0.0).backward()
    torch.testing.assert_close(layer.router.weight.grad, 0.25 * base, rtol=1e-12, atol=0)


def test_model_aux_loss_sums_layers():
    model = torch.nn.Sequential(
        make_layer(aux_loss_coef=1.0, aux_loss_mode="manual", seed=1),
        make_layer(aux_loss_coef=1.0, aux_loss_mode="manual", seed=2),
    )
    assert float(moe_ext.aux_loss(model)) == 0.0
    model(torch.randn(10, 8, dtype=torch.float64))
    total = model[0].aux_loss + model[1].aux_loss
    torch.testing.assert_close(moe_ext.aux_loss(model), total.float())


def test_routing_stats():
    layer = make_layer(capacity_factor=0.5, num_experts=4, top_k=2)
    x = torch.randn(32, layer.hidden_size, dtype=torch.float64)
    layer(x)
    stats = layer.last_stats
    counts = stats.tokens_per_expert
    assert int(counts.sum()) == 32 * 2
    capacity = layer.capacity(32)
    torch.testing.assert_close(stats.tokens_per_expert_kept, counts.clamp(max=capacity))
    assert int(stats.dropped) == int((counts - counts.clamp(max=capacity)).sum())
    load = counts.double()
    torch.testing.assert_close(stats.load_imbalance, load.max() / load.mean())
    torch.testing.assert_close(stats.load_cv, load.std(correction=0) / load.mean())
    probs = torch.softmax(x @ layer.router.weight.T, -1)
    torch.testing.assert_close(stats.router_entropy, -(probs * probs.log()).sum(-1).mean())
    as_dict = stats.as_dict()
    assert as_dict["tokens_per_expert"] == counts.tolist() and isinstance(as_dict["dropped"], int)


def test_default_init_matches_linear_scale():
    layer = moe_ext.MoE(256, 512, 4, top_k=1)
    for tensor, fan_in in ((layer.w_in, 256), (layer.w_out, 512), (layer.router.weight, 256)):
        bound = 1 / math.sqrt(fan_in)
        assert tensor.abs().max() <= bound
        assert tensor.abs().max() > 0.9 * bound
        torch.testing.assert_close(tensor.std().item(), bound / math.sqrt(3), rtol=0.05, atol=0)


def test_state_dict_round_trip():
    layer = make_layer()
    names = set(layer.state_dict())
    assert names == {"router.weight", "w_in", "w_out"}
    assert layer.state_dict()["w_in"].shape == (4, 8, 24)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    other = make_layer(seed=123)
    other.load_state_dict(torch.load(buffer))
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_compile_fullgraph_equals_eager(capacity_factor):
    torch._dynamo.reset()
    layer = moe_ext.MoE(16, 32, 8, top_k=2, capacity_factor=capacity_factor, aux_loss_coef=0.01, z_loss_coef=1e-3)
    compiled_layer = copy.deepcopy(layer)
    compiled = torch.compile(compiled_layer, fullgraph=True)
    x = torch.randn(4, 6, 16)
    probe = torch.randn_like(x)
    eager_out = layer(x)
    compiled_out = compiled(x)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-6, atol=1e-6)
    (eager_out * probe).sum().backward()
    (compiled_out * probe).sum().backward()
    for name, grad in grads(layer).items():
        torch.testing.assert_close(grads(compiled_layer)[name], grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_layer.aux_loss, layer.aux_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(compiled_layer.last_stats.tokens_per_expert, layer.last_stats.tokens_per_expert)


def _train_step(layer: moe_ext.MoE, x: torch.Tensor, probe: torch.Tensor):
    layer.zero_grad()
    y = layer(x)
    (y * probe).sum().backward()
    return y.detach().clone(), grads(layer)


@pytest.mark.parametrize("capacity_factor", [None, 1.25])
def test_bitwise_deterministic_across_runs_and_threads(capacity_factor):
    torch.manual_seed(0)
    layer = moe_ext.MoE(64, 160, 8, top_k=2, capacity_factor=capacity_factor, z_loss_coef=1e-3)
    x = torch.randn(1500, 64)
    probe = torch.randn_like(x)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = _train_step(layer, x, probe)
        second = _train_step(layer, x, probe)
        torch.set_num_threads(1)
        single = _train_step(layer, x, probe)
    finally:
        torch.set_num_threads(threads)
    for other in (second, single):
        assert torch.equal(first[0], other[0])
        for name in first[1]:
            assert torch.equal(first[1][name], other[1][name]), name


def test_training_loss_falls():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(10, 32), moe_ext.MoE(32, 64, 4, top_k=2, aux_loss_coef=0.01), torch.nn.Linear(32, 1)
    )
    x = torch.randn(256, 10)
    target = (x[:, :1] * x[:, 1:2]).tanh() + 0.5 * x[:, 2:3].sin()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        optimizer.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k": 5}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"activation": "tanh"}, "activation"),
        ({"capacity_factor": -1.0}, "capacity_factor"),
        ({"score_func": "relu"}, "score_func"),
        ({"aux_loss_mode": "sometimes"}, "aux_loss_mode"),
        ({"drop_policy": "lottery"}, "drop_policy"),
        ({"num_experts": 0}, "num_experts"),
        ({"n_group": 3}, "n_group"),
    ],
)
def test_bad_module_configuration(kwargs, match):
    args = dict(hidden_size=8, ffn_hidden_size=8, num_experts=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        moe_ext.MoE(**args)


def test_bad_module_input():
    layer = moe_ext.MoE(8, 8, 4)
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(3, 7))
    with pytest.raises(ValueError, match="float64"):
        layer(torch.randn(3, 8, dtype=torch.float64))


@pytest.mark.parametrize(
    "make,error,fragment",
    [
        (lambda: torch.tensor(1.0), ValueError, "x must have shape [..., hidden_size = 8], got ()"),
        (lambda: torch.ones(3, 8, dtype=torch.int64), ValueError, "x must be a floating-point tensor, got torch.int64"),
        (lambda: torch.ones(3, 8, device="meta"), ValueError, "x is on meta but the layer's parameters are on cpu"),
        (lambda: [[0.0] * 8], TypeError, "x must be a torch.Tensor, got list"),
    ],
    ids=["0-dim", "int64", "other-device", "list"],
)
def test_layer_bad_inputs_name_x(make, error, fragment):
    layer = moe_ext.MoE(8, 16, 4, top_k=2)
    with pytest.raises(error) as info:
        layer(make())
    assert fragment in str(info.value)
