"""The fused SwiGLU op (moe_ext.ops.swiglu): values against a float64 reference in every dtype, the
accuracy of its exp over the whole float range, gradcheck, opcheck (forward and backward op), bad
inputs, layouts, and the layer that uses it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_DTYPES, DTYPE_IDS, assert_bitwise_equal, tol

import moe_ext
from moe_ext import ops


def ref_swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.double().chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


def ref_swiglu_backward(grad: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    gate, up = h.double().chunk(2, dim=-1)
    s = torch.sigmoid(gate)
    g = grad.double()
    return torch.cat([g * up * s * (1 + gate * (1 - s)), g * gate * s], dim=-1)


def sample(rows: int, width: int, dtype: torch.dtype, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(rows, 2 * width, generator=g, dtype=torch.float64)).to(dtype)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("rows,width", [(0, 4), (1, 1), (7, 5), (33, 64), (300, 300)])
def test_values_and_backward_against_float64(dtype, rows, width):
    h = sample(rows, width, dtype)
    out = ops.swiglu(h)
    assert out.shape == (rows, width) and out.dtype == dtype
    torch.testing.assert_close(out.double(), ref_swiglu(h), **tol(dtype))
    grad = sample(rows, width, dtype, seed=1)[:, :width].contiguous()
    grad_h = torch.ops.moe_ext.swiglu_backward(grad, h)
    assert grad_h.shape == h.shape and grad_h.dtype == dtype
    torch.testing.assert_close(grad_h.double(), ref_swiglu_backward(grad, h), **tol(dtype))


def test_exp_is_accurate_over_the_whole_float_range():
    # silu(x) * 1 for x on a dense grid through every regime: underflow, the bulk, overflow of exp(-x).
    gate = torch.cat([torch.linspace(-120, 120, 200_001), torch.tensor([-87.5, -87.0, -1e-30, 0.0, 1e-30, 88.5])])
    h = torch.stack([gate, torch.ones_like(gate)], dim=1)
    out = ops.swiglu(h)[:, 0].double()
    exact = ref_swiglu(h)[:, 0]
    # Relative error where silu is a normal float; tiny absolute error where it underflows (x < -87).
    normal = exact.abs() > 1e-30
    rel = ((out - exact).abs() / exact.abs())[normal]
    assert rel.max() < 4 * 2**-24, f"max relative error {rel.max():.3g}"
    assert (out - exact).abs()[~normal].max() < 1e-30
    # the backward's sigmoid through the same exp: an O(1) derivative, so float32 rounding (6e-8) bounds
    # its absolute error near the zero of d silu / dx (x = -1.278), its relative error elsewhere
    grad_h = torch.ops.moe_ext.swiglu_backward(torch.ones(len(gate), 1), h).double()
    exact_grad = ref_swiglu_backward(torch.ones(len(gate), 1, dtype=torch.float64), h)
    torch.testing.assert_close(grad_h, exact_grad, rtol=1e-6, atol=1e-7)


def test_non_finite_inputs_propagate():
    h = torch.tensor([[float("nan"), 1.0], [1.0, float("nan")], [float("inf"), 2.0], [30.0, float("inf")]])
    out = ops.swiglu(h)[:, 0]
    assert out[0].isnan() and out[1].isnan()
    assert out[2] == float("inf") and out[3] == float("inf")


def test_gradcheck_and_gradgradcheck_refusal():
    h = sample(6, 5, torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(ops.swiglu, (h,), eps=1e-6, atol=1e-8, rtol=1e-6)
    y = ops.swiglu(h)
    (grad,) = torch.autograd.grad(y.sum(), h, create_graph=False)
    torch.testing.assert_close(grad, ref_swiglu_backward(torch.ones(6, 5, dtype=torch.float64), h.detach()))
    with pytest.raises(RuntimeError, match="double backward through swiglu is not supported"):
        torch.autograd.grad(ops.swiglu(h).sum(), h, create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=DTYPE_IDS.get)
def test_opcheck_forward_and_backward(dtype):
    h = sample(9, 6, dtype).requires_grad_(dtype.is_floating_point)
    torch.library.opcheck(torch.ops.moe_ext.swiglu.default, (h,))
    grad = sample(9, 3, dtype, seed=2)[:, :6].contiguous()
    torch.library.opcheck(torch.ops.moe_ext.swiglu_backward.default, (grad, h.detach()))


def test_non_contiguous_and_expanded_inputs():
    base = sample(10, 8, torch.float32)
    strided = base.t().contiguous().t()  # same values, column-major
    assert not strided.is_contiguous()
    torch.testing.assert_close(ops.swiglu(strided), ops.swiglu(base), rtol=0, atol=0)
    expanded = base[:1].expand(10, 16)  # zero row stride
    torch.testing.assert_close(ops.swiglu(expanded), ops.swiglu(base[:1]).expand(10, 8), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=DTYPE_IDS.get)
def test_deterministic_across_thread_counts(dtype, restore_num_threads):
    h = sample(4096, 96, dtype)
    grad = sample(4096, 96, dtype, seed=1)[:, :96].contiguous()
    results = {}
    for threads in (1, 2, 3, 4):
        torch.set_num_threads(threads)
        results[threads] = (ops.swiglu(h), torch.ops.moe_ext.swiglu_backward(grad, h))
    for threads in (2, 3, 4):
        for name, got, want in zip(("swiglu", "swiglu_backward"), results[threads], results[1], strict=True):
            assert_bitwise_equal(got, want, f"{name}: {threads} threads vs 1")


@pytest.mark.parametrize(
    "make,error,fragment",
    [
        (lambda: ops.swiglu(torch.randn(4, 5)), RuntimeError, "h must have an even number of columns"),
        (lambda: ops.swiglu(torch.randn(4, 2, 6)), RuntimeError, "h must be 2-D with shape [N, 2F]"),
        (lambda: ops.swiglu(torch.ones(4, 6, dtype=torch.int64)), RuntimeError, "h must be a floating-point tensor"),
        (lambda: ops.swiglu(None), TypeError, "h must be a torch.Tensor"),
        (
            lambda: torch.ops.moe_ext.swiglu_backward(torch.randn(4, 2), torch.randn(4, 6)),
            RuntimeError,
            "grad must have shape [N, F] = [4, 3]",
        ),
        (
            lambda: torch.ops.moe_ext.swiglu_backward(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 6)),
            RuntimeError,
            "grad must have h's dtype",
        ),
        (
            lambda: torch.ops.moe_ext.swiglu_backward(torch.randn(4, 3, device="meta"), torch.randn(4, 6)),
            RuntimeError,
            "grad is on meta but h is on cpu",
        ),
    ],
    ids=["odd-width", "3-D", "int64", "None", "grad-shape", "grad-dtype", "grad-device"],
)
def test_bad_inputs_name_the_argument(make, error, fragment):
    with pytest.raises(error) as info:
        make()
    assert fragment in str(info.value)


def test_layer_swiglu_matches_the_unfused_formula():
    torch.manual_seed(0)
    layer = moe_ext.MoE(16, 24, 4, top_k=2, shared_expert_size=12)
    x = torch.randn(3, 7, 16, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    fused = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]

    # The same layer with the activation written out as chunk + silu + mul.
    layer.zero_grad()
    x.grad = None
    original = ops.swiglu

    def unfused(h):
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    ops.swiglu = unfused
    try:
        y_ref = layer(x)
        y_ref.square().sum().backward()
    finally:
        ops.swiglu = original
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(fused, [x.grad] + [p.grad for p in layer.parameters()], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
