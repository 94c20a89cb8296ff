"""No moe_ext module returns a view, and FSDP2's fully_shard on a bare moe_ext.MoE gives no "returned a view
tensor" warning and the single-process gradients when the caller adds the output in place (h += layer(x))."""

from __future__ import annotations

import json

import pytest
import torch
from multiprocess import run_workers

import moe_ext
from moe_ext import ops
from moe_ext.linear import Linear
from moe_ext.shared_expert import SharedExpert

H, F, E = 12, 20, 8


def _layers():
    torch.manual_seed(0)
    return {
        "moe": moe_ext.MoE(H, F, E, top_k=2),
        "moe_shared_bias": moe_ext.MoE(H, F, E, top_k=2, shared_expert_size=8, expert_bias=True),
        "moe_capacity": moe_ext.MoE(H, F, E, top_k=2, capacity_factor=1.0),
        "moe_expert_choice": moe_ext.MoE(H, F, E, router="expert_choice", capacity_factor=1.0, aux_loss_coef=0.0),
        "linear": Linear(H, H, bias=True),
        "shared_expert": SharedExpert(H, F, "swiglu"),
    }


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(10, H), (2, 5, H), (1, 2, 5, H)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("name", list(_layers()))
def test_module_outputs_are_not_views(name, shape, training):
    layer = _layers()[name].train(training)
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y._base is None, f"{name} returned a view of a tensor of shape {tuple(y._base.shape)}"
    assert y.shape[:-1] == x.shape[:-1]
    # an in-place add on the output keeps every gradient: the same as the out-of-place add
    h = x.detach().clone().requires_grad_()
    h2 = h.clone()
    h2 += layer(h)
    h2.square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    g = x.detach().clone().requires_grad_()
    (g + layer(g)).square().sum().backward()
    for a, (pname, p) in zip(grads, layer.named_parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=0, atol=0, msg=f"{name}: grad {pname}")
    torch.testing.assert_close(h.grad, g.grad, rtol=0, atol=0)


def test_moe_with_routing_returns_no_view():
    layer = moe_ext.MoE(H, F, E, top_k=2)
    y, routing = layer(torch.randn(2, 3, H), return_routing=True)
    assert y._base is None and y.shape == (2, 3, H)
    assert routing.indices.shape == (6, 2)


def test_as_output_shares_storage_and_differentiates_like_reshape():
    y = torch.randn(6, 4, requires_grad=True)
    z = y * 2  # a fresh result
    out = ops.as_output(z, (2, 3, 4))
    assert out._base is None and out.data_ptr() == z.data_ptr()
    out.sum().backward()
    torch.testing.assert_close(y.grad, torch.full_like(y, 2.0))
    assert ops.as_output(z, z.shape) is z  # already a tensor of its own with that shape


def test_as_output_under_compile():
    def f(a):
        return ops.as_output(a * 3, (2, 3, 4))

    a = torch.randn(6, 4)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(a), f(a))


FSDP_BODY = """
import warnings
import moe_ext
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

H, F, E = 12, 20, 8
torch.manual_seed(0)
reference = moe_ext.MoE(H, F, E, top_k=2, shared_expert_size=8)
layer = moe_ext.MoE(H, F, E, top_k=2, shared_expert_size=8)
layer.load_state_dict(reference.state_dict())
mesh = init_device_mesh("cpu", (world,))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    fully_shard(layer, mesh=mesh)
    # every rank sees the whole batch: the sharded layer's gradients are averaged over ranks
    x = torch.randn(4, 6, H, generator=torch.Generator().manual_seed(7))
    h = x.clone().requires_grad_()
    h2 = h * 1.0
    h2 += layer(h)
    (h2.square().mean() + moe_ext.aux_loss(layer)).backward()
views = [str(w.message) for w in caught if "view tensor" in str(w.message)]

g = x.clone().requires_grad_()
g2 = g * 1.0 + reference(g)
(g2.square().mean() + moe_ext.aux_loss(reference)).backward()
diffs = {}
for (name, p), (_, q) in zip(layer.named_parameters(), reference.named_parameters(), strict=True):
    full = p.grad.full_tensor()
    diffs[name] = float((full - q.grad).abs().max())
diffs["input"] = float((h.grad - g.grad).abs().max())
(out / f"rank{rank}.json").write_text(json.dumps({"views": views, "diffs": diffs}))
"""


@pytest.mark.parametrize("world", [2])
def test_fully_shard_on_a_bare_moe_no_view_warning_and_exact_gradients(world, tmp_path):
    run_workers("import json\n" + FSDP_BODY, world, tmp_path)
    for rank in range(world):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["views"] == [], report["views"]
        assert set(report["diffs"]) >= {"w_in", "w_out", "router.weight", "input"}
        for name, diff in report["diffs"].items():
            assert diff <= 1e-6, (rank, name, diff)
