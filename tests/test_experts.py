"""moe_ext.Experts and moe_ext.experts.grouped_experts with a hand-made routing: against the float64 loop
reference, against what moe_ext.MoE computes, on 2 expert-parallel ranks; the router called as a module."""

from __future__ import annotations

import copy
import json

import pytest
import scheme_reference as ref
import torch
from multiprocess import run_workers

import moe_ext
from moe_ext.experts import grouped_experts

F64 = torch.float64
ACTIVATIONS = ["swiglu", "geglu", "geglu_tanh", "gelu", "relu", "silu"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hand_made_routing(T: int, E: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [T, k] distinct experts per token, weights [T, k]) drawn from a seeded generator."""
    g = gen(seed)
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g, dtype=F64) + 0.1
    return indices, weights


def randomized(experts: moe_ext.Experts, seed: int) -> moe_ext.Experts:
    g = gen(seed)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * 0.5)
    return experts


def reference(experts, x, indices, weights, capacity=None):
    kept = ref.kept_under_capacity(indices.tolist(), experts.num_experts, capacity, ref.position_key)
    return ref.combine_output(
        x, indices.tolist(), weights, kept, experts.w_in, experts.w_out, experts.activation, experts.b_in, experts.b_out
    )


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("capacity", [None, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_experts_with_a_hand_made_routing_equal_the_loop_reference(activation, capacity, bias):
    T, H, F, E, k = 13, 6, 5, 4, 2
    experts = randomized(moe_ext.Experts(H, F, E, activation, expert_bias=bias, dtype=F64), seed=1)
    x = torch.randn(T, H, generator=gen(2), dtype=F64, requires_grad=True)
    indices, weights = hand_made_routing(T, E, k, seed=3)
    weights.requires_grad_(True)
    y = experts(x, indices, weights, capacity=capacity)
    y_ref = reference(experts, x, indices, weights, capacity)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    if capacity is not None:
        kept = ref.kept_under_capacity(indices.tolist(), E, capacity, ref.position_key)
        assert not all(all(row) for row in kept), "the capacity must drop something for this test to mean anything"
    probe = torch.randn(T, H, generator=gen(4), dtype=F64)
    inputs = [x, weights, *experts.parameters()]
    grads = torch.autograd.grad((y * probe).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), inputs)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_grouped_experts_function_equals_the_module_bitwise():
    experts = randomized(moe_ext.Experts(8, 6, 5, "geglu", expert_bias=True, dtype=torch.float32), seed=5)
    x = torch.randn(11, 8, generator=gen(6))
    indices, weights = hand_made_routing(11, 5, 3, seed=7)
    weights = weights.float()
    y = experts(x, indices, weights, capacity=4)
    y_fn = grouped_experts(
        x, indices, weights, experts.w_in, experts.w_out, experts.b_in, experts.b_out, activation="geglu", capacity=4
    )
    assert torch.equal(y, y_fn)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(top_k=2),
        dict(top_k=2, capacity_factor=1.0, expert_bias=True, activation="gelu"),
        dict(top_k=3, capacity_factor=0.75, drop_policy="probs", activation="clamped_swiglu"),
    ],
)
def test_experts_with_the_layers_routing_equal_the_layer_bitwise(kwargs):
    torch.manual_seed(0)
    layer = moe_ext.MoE(8, 6, 6, aux_loss_coef=0.0, **kwargs)
    experts = moe_ext.Experts(
        8,
        6,
        6,
        layer.activation,
        expert_bias=layer.b_in is not None,
        swiglu_alpha=layer.swiglu_alpha,
        swiglu_limit=layer.swiglu_limit,
    )
    # The expert keys of a layer's state dict are an Experts' whole state dict.
    missing, unexpected = experts.load_state_dict(layer.state_dict(), strict=False)
    assert not missing and set(unexpected) == {k for k in layer.state_dict() if "." in k}
    x = torch.randn(2, 7, 8, generator=gen(8), requires_grad=True)
    y, routing = layer(x, return_routing=True)
    tokens = x.reshape(-1, 8)
    priority = routing.weights if layer.drop_policy == "probs" else None
    y_experts = experts(tokens, routing.indices, routing.weights, layer.capacity(tokens.shape[0]), priority)
    assert torch.equal(y.reshape(-1, 8), y_experts)
    probe = torch.randn(y.shape, generator=gen(9))
    (g_layer,) = torch.autograd.grad((y * probe).sum(), layer.w_in)
    (g_experts,) = torch.autograd.grad((y_experts * probe.reshape(-1, 8)).sum(), experts.w_in)
    assert torch.equal(g_layer, g_experts)


def test_experts_state_dict_deepcopy_and_bad_input():
    experts = moe_ext.Experts(4, 3, 2, expert_bias=True)
    assert list(experts.state_dict()) == ["w_in", "w_out", "b_in", "b_out"]
    assert experts.w_in.shape == (2, 4, 6) and experts.w_out.shape == (2, 3, 4)
    twin = copy.deepcopy(experts)
    x = torch.randn(5, 4)
    indices, weights = hand_made_routing(5, 2, 1, seed=10)
    assert torch.equal(twin(x, indices, weights.float()), experts(x, indices, weights.float()))
    with pytest.raises(ValueError, match="hidden_states must have shape"):
        experts(torch.randn(5, 3), indices, weights.float())
    with pytest.raises(ValueError, match="Experts: activation must be one of"):
        moe_ext.Experts(4, 3, 2, "tanh")


def test_the_router_is_called_as_a_module():
    torch.manual_seed(0)
    layer = moe_ext.MoE(8, 4, 4, top_k=1, router_bias=True)
    seen = []

    def to_expert_3(module, inputs, logits):
        seen.append(inputs[0].shape)
        forced = torch.full_like(logits, -10.0)
        forced[:, 3] = 10.0
        return forced

    handle = layer.router.register_forward_hook(to_expert_3)
    x = torch.randn(2, 5, 8, generator=gen(11))
    _, routing = layer(x, return_routing=True)
    handle.remove()
    assert seen == [torch.Size([10, 8])]
    assert routing.indices.flatten().tolist() == [3] * 10, "the hook's logits decide the routing"
    assert isinstance(layer.router, torch.nn.Linear) and layer.router.weight.shape == (4, 8)
    _, routing = layer(x, return_routing=True)
    assert routing.indices.flatten().tolist() != [3] * 10


EP_BODY = """
import moe_ext
from moe_ext.experts import grouped_experts

H, F, E, k = 6, 5, 4, 2
group = dist.new_group(list(range(world)))
torch.manual_seed(0)
sharded = moe_ext.Experts(H, F, E, expert_bias=True, expert_parallel_group=group)
torch.manual_seed(0)
full = moe_ext.Experts(H, F, E, expert_bias=True)
lo, hi = sharded.expert_offset, sharded.expert_offset + sharded.num_local_experts
g = torch.Generator().manual_seed(rank)
x = torch.randn(7 + 3 * rank, H, generator=g)
indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(x.shape[0])])
weights = torch.rand(x.shape[0], k, generator=g)
errors = {}
for capacity in (None, 2):
    y = sharded(x, indices, weights, capacity)
    y_fn = grouped_experts(x, indices, weights, sharded.w_in, sharded.w_out, sharded.b_in, sharded.b_out,
                           capacity=capacity, expert_parallel_group=group)
    errors[str(capacity)] = [float((y - full(x, indices, weights, capacity)).abs().max()), bool(torch.equal(y, y_fn))]
same_init = torch.equal(sharded.w_in, full.w_in[lo:hi])
(out / f"report{rank}.json").write_text(json.dumps({"errors": errors, "same_init": same_init}))
"""


def test_expert_parallel_experts_equal_the_single_process_module(tmp_path):
    run_workers("import json\n" + EP_BODY, 2, tmp_path)
    for rank in range(2):
        report = json.loads((tmp_path / f"report{rank}.json").read_text())
        assert report["same_init"], rank
        for capacity, (error, function_equal) in report["errors"].items():
            assert error < 1e-6, (rank, capacity, error)
            assert function_equal, (rank, capacity)
