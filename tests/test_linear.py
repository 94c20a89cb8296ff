"""The linear op (moe_ext.ops.linear, what the layer's router, noise projection, shared expert and its gate
use): values and gradients against a float64 reference in every dtype, gradcheck, opcheck (forward and
backward op), bad inputs, layouts, autocast, torch.compile, and bitwise results at 1 to 4 threads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ALL_DTYPES, DTYPE_IDS, assert_bitwise_equal, tol

from moe_ext import ops

LIB = torch.ops.moe_ext


def sample(rows: int, in_cols: int, out_cols: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_cols, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(out_cols, in_cols, generator=g, dtype=torch.float64) / max(1, in_cols) ** 0.5).to(dtype)
    b = torch.randn(out_cols, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return x, w, b


SHAPES = [
    (0, 4, 3),
    (1, 1, 1),
    (7, 5, 3),
    (33, 64, 8),
    (300, 257, 131),
    (1500, 64, 1),
    (5, 0, 4),
    (6, 3, 0),
    (300, 2048, 64),
]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("rows,in_cols,out_cols", SHAPES)
def test_values_and_gradients_against_float64(rows, in_cols, out_cols, dtype, bias):
    x, w, b = sample(rows, in_cols, out_cols, dtype, bias)
    y = ops.linear(x, w, b)
    assert y.shape == (rows, out_cols) and y.dtype == dtype
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    rtol, atol = tol(dtype).values()
    torch.testing.assert_close(y.double(), want, rtol=rtol, atol=atol * max(1.0, in_cols**0.5))
    grad = torch.randn(rows, out_cols, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    grad_x, grad_w, grad_b = LIB.linear_backward(grad, x, w, bias)
    g64 = grad.double()
    # reductions over out (grad_x) and over all rows (grad_w, grad_b): tolerance grows with their length
    torch.testing.assert_close(grad_x.double(), g64 @ w.double(), rtol=rtol, atol=atol * max(1.0, out_cols**0.5))
    torch.testing.assert_close(grad_w.double(), g64.t() @ x.double(), rtol=rtol, atol=atol * max(1.0, rows**0.5))
    assert grad_x.dtype == grad_w.dtype == dtype
    if bias:
        torch.testing.assert_close(grad_b.double(), g64.sum(0), rtol=rtol, atol=atol * max(1.0, rows**0.5))
        assert grad_b.shape == (out_cols,) and grad_b.dtype == dtype
    else:
        assert grad_b.shape == (0,)


def test_leading_dims_and_autograd_match_f_linear():
    x, w, b = sample(24, 16, 5, torch.float64, True)
    x3 = x.reshape(2, 12, 16).requires_grad_()
    w.requires_grad_()
    b.requires_grad_()
    y = ops.linear(x3, w, b)
    assert y.shape == (2, 12, 5)
    probe = torch.randn_like(y)
    grads = torch.autograd.grad((y * probe).sum(), (x3, w, b))
    want_y = F.linear(x3, w, b)
    want = torch.autograd.grad((want_y * probe).sum(), (x3, w, b))
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    for got, exp, name in zip(grads, want, ("x", "weight", "bias"), strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_gradcheck_and_double_backward_refusal(bias):
    x, w, b = sample(9, 6, 4, torch.float64, bias)
    inputs = (x.requires_grad_(), w.requires_grad_()) + ((b.requires_grad_(),) if bias else ())
    assert torch.autograd.gradcheck(ops.linear, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)
    y = ops.linear(*inputs)
    (grad_x,) = torch.autograd.grad(y.sum(), inputs[0], create_graph=False)
    assert grad_x.shape == x.shape
    with pytest.raises(RuntimeError, match="double backward through linear"):
        torch.autograd.grad(ops.linear(*inputs).pow(2).sum(), inputs[0], create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_opcheck_forward_and_backward(dtype, bias):
    x, w, b = sample(7, 5, 3, dtype, bias)
    requires_grad = dtype != torch.bfloat16
    x.requires_grad_(requires_grad)
    w.requires_grad_(requires_grad)
    torch.library.opcheck(LIB.linear.default, (x, w, b))
    empty_x, _, _ = sample(0, 5, 3, dtype, bias)
    torch.library.opcheck(LIB.linear.default, (empty_x, w, b))
    grad = torch.randn(7, 3).to(dtype)
    torch.library.opcheck(LIB.linear_backward.default, (grad, x.detach(), w.detach(), bias))


def test_non_contiguous_and_expanded_inputs():
    x, w, b = sample(40, 24, 10, torch.float32, True)
    want = ops.linear(x, w, b)
    x_t = x.t().contiguous().t()  # column-major
    w_t = w.t().contiguous().t()
    b_strided = torch.stack([b, b], dim=1)[:, 0]
    assert not x_t.is_contiguous() and not b_strided.is_contiguous()
    assert_bitwise_equal(ops.linear(x_t, w_t, b_strided), want, "non-contiguous")
    row = x[:1].expand(40, 24)
    assert_bitwise_equal(ops.linear(row, w, b), ops.linear(row.contiguous(), w, b), "expanded x")


# (300, 2048, 64): grad_x reads the weight's rows 8 KiB apart in float32, the packed-copy path.
@pytest.mark.parametrize(
    "rows,in_cols,out_cols", [(1500, 64, 8), (4096, 8, 64), (3000, 512, 1), (16, 64, 8), (300, 2048, 64)]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=DTYPE_IDS.get)
def test_bitwise_same_for_1_to_4_threads(rows, in_cols, out_cols, dtype, restore_num_threads):
    x, w, b = sample(rows, in_cols, out_cols, dtype, True)
    grad = torch.randn(rows, out_cols, generator=torch.Generator().manual_seed(5)).to(dtype)
    results = {}
    for threads in (1, 2, 3, 4):
        torch.set_num_threads(threads)
        results[threads] = (ops.linear(x, w, b), *LIB.linear_backward(grad, x, w, True))
    for threads in (2, 3, 4):
        for name, got, want in zip(
            ("y", "grad x", "grad weight", "grad bias"), results[threads], results[1], strict=True
        ):
            assert_bitwise_equal(got, want, f"{name} [{rows}, {in_cols}] -> {out_cols}: {threads} threads vs 1")


def test_autocast_runs_in_the_autocast_dtype():
    x, w, b = sample(8, 16, 4, torch.float32, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.linear(x, w, b)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()), rtol=0, atol=0)


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    x, w, b = sample(12, 8, 3, torch.float32, True)
    w.requires_grad_()

    def f(x, w, b):
        return ops.linear(x, w, b).square().sum()

    eager = torch.autograd.grad(f(x, w, b), w)[0]
    compiled = torch.autograd.grad(torch.compile(f, fullgraph=True)(x, w, b), w)[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda: (torch.randn(3, 4), torch.randn(2, 5), None), "weight must have shape"),
        (lambda: (torch.randn(3, 4), torch.randn(2, 4), torch.randn(3)), "bias must have shape"),
        (lambda: (torch.randn(3, 4), torch.randn(2, 4).double(), None), "weight dtype"),
        (lambda: (torch.randn(3, 4), torch.randn(2, 4), torch.randn(2).double()), "bias dtype"),
        (lambda: (torch.randn(3, 4), torch.randn(4), None), "weight must be 2-D"),
        (lambda: (torch.arange(12).reshape(3, 4), torch.randn(2, 4), None), "x must be a floating-point"),
        (lambda: (torch.randn(()), torch.randn(2, 4), None), "x must have shape"),
        (lambda: (None, torch.randn(2, 4), None), "x must be a torch.Tensor"),
        (lambda: (torch.randn(3, 4), "w", None), "weight must be a torch.Tensor"),
    ],
)
def test_bad_inputs_name_the_argument(make, fragment):
    x, w, b = make()
    with pytest.raises((RuntimeError, ValueError, TypeError), match=fragment):
        ops.linear(x, w, b)


def test_backward_bad_grad_shape_names_grad_y():
    x, w, _ = sample(5, 4, 3, torch.float32, False)
    with pytest.raises(RuntimeError, match="grad_y must have shape"):
        LIB.linear_backward(torch.randn(5, 2), x, w, False)
