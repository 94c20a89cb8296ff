"""moe_ext's CUDA kernels against its CPU kernels (which tests/test_ops.py checks against the float64
reference): values, integer plans exactly, gradients, gradcheck and opcheck on CUDA, errors, determinism,
the MoE module, CUDA graph capture, and the device-assert check mode.

Every case runs the op on CPU and on CUDA with the same inputs (the samples of test_ops.py) and compares.
Skipped as a whole, with the reason, where no CUDA device is present (CI has none).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import test_ops as base
import torch
from conftest import DTYPE_IDS, assert_bitwise_equal, assert_equal, make_generator, tol

import moe_ext
from moe_ext import ops

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: the CUDA kernels are only compiled here (scripts/run_tests.sh stage 6), and executed on the CPU by the CUDA execution model (stage 5)",
)

DEV = "cuda"
DTYPES = [pytest.param(d, id=DTYPE_IDS[d]) for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)]
# CUDA and CPU round differently (FMA contraction, exp/log implementations, reduction order): compare at
# a few units in the last place of the output dtype, not bitwise, except where the op is pure integer
# bookkeeping or a copy.
CLOSE = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    torch.float32: {"rtol": 2e-6, "atol": 2e-6},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-2},
    torch.float16: {"rtol": 2e-3, "atol": 2e-3},
}


# Outputs that are long float sums (dot products, GEMMs, losses), added in another order on CUDA.
SUMS = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 2e-5, "atol": 2e-5},
}


def close(got: torch.Tensor, want: torch.Tensor, msg: str, dtype=None):
    assert got.device.type == DEV, f"{msg}: result on {got.device}"
    assert got.dtype == want.dtype and got.shape == want.shape, (
        f"{msg}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}"
    )
    torch.testing.assert_close(
        got.cpu().double(), want.double(), **CLOSE[dtype or got.dtype], msg=lambda m: f"{msg}\n{m}"
    )


def to_device(value, device=DEV):
    """Tensors (leaves keep requires_grad) and RoutingPlans moved to `device`; other values as they are."""
    if isinstance(value, torch.Tensor):
        moved = value.detach().to(device)
        return moved.requires_grad_(value.requires_grad)
    if isinstance(value, ops.RoutingPlan):
        return ops.RoutingPlan(*(t.to(device) for t in value))
    if isinstance(value, dict):
        return {n: to_device(v, device) for n, v in value.items()}
    return value


def outputs_of(result):
    if isinstance(result, ops.RoutingPlan):
        return list(result)
    return list(result) if isinstance(result, tuple) else [result]


def run_both(op: str, named: dict, backward: bool = True):
    """(cpu_outputs, cuda_outputs, cpu_grads, cuda_grads) of one sample; the gradients w.r.t. every input
    that requires grad, from the same random output gradients on both devices."""
    results = []
    for device in ("cpu", DEV):
        inputs = to_device(named, device)
        outs = outputs_of(base.call_op(op, inputs))
        diff = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.requires_grad]
        grads = []
        differentiable = [o for o in outs if o.requires_grad]
        if backward and diff and differentiable:
            gouts = base._grad_outputs(differentiable, f"{op}-cuda")
            got = torch.autograd.grad(
                differentiable,
                diff,
                [g.to(o.dtype).to(device) for g, o in zip(gouts, differentiable, strict=True)],
                allow_unused=True,
            )
            grads = [torch.zeros_like(d) if g is None else g for g, d in zip(got, diff, strict=True)]
        results.append(([o.detach() for o in outs], [g.detach() for g in grads]))
    (cpu_out, cpu_grads), (cuda_out, cuda_grads) = results
    return cpu_out, cuda_out, cpu_grads, cuda_grads


# --------------------------------------------------------------------------------------------
# Values and gradients, CUDA vs CPU
# --------------------------------------------------------------------------------------------

SHAPES = [(0, 8, 2), (1, 1, 1), (7, 2, 2), (7, 8, 8), (300, 8, 2), (300, 64, 2), (300, 64, 8), (97, 256, 8)]
SHAPE_IDS = [f"T{T}-E{E}-k{k}" for T, E, k in SHAPES]


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k", SHAPES, ids=SHAPE_IDS)
def test_topk_gating_matches_cpu(T, E, k, dtype, score_func):
    # E = 256 takes the global-memory scratch path, the others the shared-memory one.
    for variant in base.GATING_VARIANTS:
        if E not in base.GROUP_CONFIG and variant in ("group", "mask_group", "deepseek"):
            continue
        if not base.gating_variant_applies(variant, E, k):
            continue
        sample = base.gating_sample(T, E, k, dtype, score_func=score_func, variant=variant, requires_grad=True)
        cpu, gpu, cpu_grads, gpu_grads = run_both("topk_gating", sample.named)
        rd = base.routing_dtype(dtype)
        close(gpu[2], cpu[2], f"scores ({sample.desc})")
        # The same choice as CPU; where float rounding differs right at a near-tie, the CUDA choice must
        # still be a valid top-k of the float64 reference (test_ops' own criterion).
        same = (gpu[1].cpu() == cpu[1]).all(dim=1)
        if not bool(same.all()):
            named = sample.named
            opts = {n: v for n, v in named.items() if n not in ("logits", "k")}
            ref_scores = base.ref.ref_topk_gating(named["logits"].detach().double(), k, **opts)[2]
            base._check_gating_indices(gpu[1].cpu(), cpu[1], ref_scores.detach(), named)
        assert int(same.sum()) >= 0.99 * T, f"{int((~same).sum())} of {T} tokens routed differently"
        close(gpu[0][same.to(DEV)], cpu[0][same], f"weights ({sample.desc})")
        close(
            gpu_grads[0][same.to(DEV)],
            cpu_grads[0][same],
            f"d logits ({sample.desc})",
            dtype=base.worst_dtype(dtype, rd),
        )


def test_topk_gating_ties_match_cpu():
    # Exact ties must go to the lower expert index on both devices.
    logits = torch.zeros(33, 16)
    logits[:, 5] = 1.0
    logits[1::2, 9] = 1.0
    for score_func in ("softmax", "sigmoid"):
        cpu = ops.topk_gating(logits, 4, score_func=score_func)
        gpu = ops.topk_gating(logits.to(DEV), 4, score_func=score_func)
        assert_equal(gpu[1].cpu(), cpu[1], f"tied indices ({score_func})")


PLAN_SHAPES = [(0, 8, 2), (1, 1, 1), (7, 8, 2), (300, 8, 2), (300, 64, 8), (4096, 64, 2), (777, 3, 3)]


@pytest.mark.parametrize("mode", base.PLAN_MODES)
@pytest.mark.parametrize("T,E,k", PLAN_SHAPES, ids=[f"T{T}-E{E}-k{k}" for T, E, k in PLAN_SHAPES])
def test_make_plan_matches_cpu_exactly(T, E, k, mode):
    sample = base.make_plan_sample(T, E, k, mode)
    cpu, gpu, _, _ = run_both("make_plan", sample.named, backward=False)
    for name, a, b in zip(ops.RoutingPlan._fields, gpu, cpu, strict=True):
        assert a.device.type == DEV, name
        assert_equal(a.cpu(), b, f"{name} ({sample.desc})")


def test_make_plan_priority_ties_minus_inf_and_signed_zero():
    g = make_generator("cuda-prio")
    indices = torch.randint(0, 4, (500, 2), generator=g)
    levels = torch.tensor([float("-inf"), -0.0, 0.0, 0.5, float("inf")])
    priority = levels[torch.randint(0, 5, (500, 2), generator=g)]
    for capacity in (0, 1, 60, 200, 1000):
        want = ops.make_plan(indices, 4, capacity=capacity, priority=priority)
        got = ops.make_plan(indices.to(DEV), 4, capacity=capacity, priority=priority.to(DEV))
        for name, a, b in zip(ops.RoutingPlan._fields, got, want, strict=True):
            assert_equal(a.cpu(), b, f"{name} (capacity {capacity})")


def test_expert_choice_plan_matches_cpu_exactly():
    g = make_generator("cuda-ec")
    for T, E, C in [(0, 4, 3), (9, 4, 0), (9, 4, 3), (300, 8, 80), (300, 8, 400), (1000, 64, 40)]:
        scores = torch.softmax(torch.randn(T, E, generator=g), dim=1)
        scores[::7] = 0.0  # ties, and -0.0 vs +0.0 below
        scores[1::11] = -0.0
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            want = torch.ops.moe_ext.expert_choice_plan(scores.to(dtype), C)
            got = torch.ops.moe_ext.expert_choice_plan(scores.to(dtype).to(DEV), C)
            for name, a, b in zip(ops.RoutingPlan._fields, got, want, strict=True):
                assert_equal(a.cpu(), b, f"{name} (T={T} E={E} C={C} {dtype})")


PERMUTE_SHAPES = [(0, 8, 2), (1, 1, 1), (7, 8, 2), (300, 8, 2), (300, 64, 8)]


@pytest.mark.parametrize("hidden", [16, 15, 1024])
@pytest.mark.parametrize("mode", ["dropless", "capacity", "capacity0"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k", PERMUTE_SHAPES, ids=[f"T{T}-E{E}-k{k}" for T, E, k in PERMUTE_SHAPES])
def test_dispatch_and_combine_match_cpu(T, E, k, dtype, mode, hidden):
    # hidden 16 / 1024: 128-bit vectors; 15: scalar fallback.
    sample = base.dispatch_sample(T, E, k, dtype, mode, requires_grad=True, hidden=hidden)
    cpu, gpu, cpu_grads, gpu_grads = run_both("dispatch", sample.named)
    assert_equal(gpu[0].cpu(), cpu[0], f"x_sorted is a copy ({sample.desc})")
    close(gpu_grads[0], cpu_grads[0], f"d x ({sample.desc})")

    sample = base.combine_sample(T, E, k, dtype, mode, requires_grad=True, hidden=hidden)
    cpu, gpu, cpu_grads, gpu_grads = run_both("combine", sample.named)
    close(gpu[0], cpu[0], f"y ({sample.desc})")
    close(gpu_grads[0], cpu_grads[0], f"d y_sorted ({sample.desc})")
    # d weights: dot products over H, summed in another order on CUDA (a warp tree).
    torch.testing.assert_close(gpu_grads[1].cpu(), cpu_grads[1], **SUMS[cpu_grads[1].dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dispatch_and_combine_unaligned_rows(dtype):
    # A storage offset of one element breaks 16-byte alignment: the kernels must fall back to narrower
    # vectors, not misread.
    T, E, k, H = 50, 8, 2, 64
    plan = base.reference_plan(T, E, k, "capacity", make_generator("unaligned"))[0]
    x = torch.randn(T * H + 1, dtype=torch.float64).to(dtype)[1:].view(T, H)
    weights = torch.rand(T, k, dtype=base.routing_dtype(dtype))
    for device in ("cpu", DEV):
        xs = x.to(device) if device == "cpu" else torch.empty(T * H + 1, dtype=dtype, device=DEV)[1:].view(T, H)
        if device == DEV:
            xs.copy_(x)
        out = ops.dispatch(xs, to_device(plan, device))
        y = ops.combine(out, weights.to(device), to_device(plan, device))
        if device == "cpu":
            want_out, want_y = out, y
    assert_equal(out.cpu(), want_out, "dispatch (unaligned)")
    close(y, want_y, "combine (unaligned)")


GMM_SHAPES = [(0, 8, 2), (7, 8, 2), (300, 8, 2), (300, 64, 8)]


@pytest.mark.parametrize("path", ["auto", "loop"])
@pytest.mark.parametrize("dims", [(16, 8), (64, 128), (12, 20)], ids=lambda d: f"{d[0]}x{d[1]}")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k", GMM_SHAPES, ids=[f"T{T}-E{E}-k{k}" for T, E, k in GMM_SHAPES])
def test_grouped_mm_matches_cpu(T, E, k, dtype, dims, path, monkeypatch):
    # "auto" takes at::_grouped_mm for bf16 on sm_90+ with dims divisible by 8, "loop" never.
    if path == "loop":
        monkeypatch.setenv("MOE_EXT_CUDA_GROUPED_MM", "loop")
    for mode in ("dropless", "capacity"):
        sample = base.grouped_mm_sample(T, E, k, dtype, mode, requires_grad=True, dims=dims)
        cpu, gpu, cpu_grads, gpu_grads = run_both("grouped_mm", sample.named)
        # cuBLAS / CUTLASS and CPU BLAS sum in different orders: the dtype's own tolerance.
        pairs = {"y": (gpu[0], cpu[0]), "d x": (gpu_grads[0], cpu_grads[0]), "d w": (gpu_grads[1], cpu_grads[1])}
        for name, (a, b) in pairs.items():
            where = f"{name} ({sample.desc})"
            torch.testing.assert_close(a.cpu().double(), b.double(), **tol(dtype), msg=lambda m, w=where: f"{w}\n{m}")


@pytest.mark.parametrize("path", ["auto", "loop"])
def test_grouped_mm_experts_without_rows(path, monkeypatch):
    if path == "loop":
        monkeypatch.setenv("MOE_EXT_CUDA_GROUPED_MM", "loop")
    offsets = torch.tensor([0, 0, 16, 16, 40, 40])
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(40, 32).to(dtype).to(DEV).requires_grad_()
        w = torch.randn(5, 32, 16).to(dtype).to(DEV).requires_grad_()
        y = ops.grouped_mm(x, w, offsets.to(DEV))
        y.backward(torch.ones_like(y))
        for e in (0, 2, 4):
            assert torch.equal(w.grad[e], torch.zeros_like(w.grad[e])), f"grad_w of empty expert {e} ({dtype})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,E,k", [(0, 8, 2), (1, 1, 1), (7, 8, 2), (300, 64, 8), (5000, 8, 2)])
def test_losses_match_cpu(T, E, k, dtype):
    sample = base.load_balancing_loss_sample(T, E, k, dtype, requires_grad=True)
    cpu, gpu, cpu_grads, gpu_grads = run_both("load_balancing_loss", sample.named)
    close(gpu[0], cpu[0], f"load balancing loss ({sample.desc})")
    close(gpu_grads[0], cpu_grads[0], f"d scores ({sample.desc})")
    sample = base.router_z_loss_sample(T, E, dtype, requires_grad=True)
    cpu, gpu, cpu_grads, gpu_grads = run_both("router_z_loss", sample.named)
    close(gpu[0], cpu[0], f"z-loss ({sample.desc})", dtype=base.worst_dtype(dtype, torch.float32))
    close(gpu_grads[0], cpu_grads[0], f"d logits ({sample.desc})")


# --------------------------------------------------------------------------------------------
# gradcheck and opcheck on CUDA
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,width", [(0, 4), (1, 1), (33, 64), (3000, 257)])
def test_swiglu_matches_cpu(rows, width, dtype):
    g = make_generator(7)
    h = (3 * torch.randn(rows, 2 * width, generator=g, dtype=torch.float64)).to(dtype)
    grad = torch.randn(rows, width, generator=g, dtype=torch.float64).to(dtype)
    # the same fast_exp on both sides: CUDA and CPU differ only by FMA contraction
    torch.testing.assert_close(ops.swiglu(h.to(DEV)).cpu(), ops.swiglu(h), **CLOSE[dtype])
    torch.testing.assert_close(
        torch.ops.moe_ext.swiglu_backward(grad.to(DEV), h.to(DEV)).cpu(),
        torch.ops.moe_ext.swiglu_backward(grad, h),
        **CLOSE[dtype],
    )


def test_swiglu_gradcheck_and_opcheck_cuda():
    h = torch.randn(6, 10, dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(ops.swiglu, (h,), eps=1e-6, atol=1e-8, rtol=1e-6)
    torch.library.opcheck(torch.ops.moe_ext.swiglu.default, (h,))
    grad = torch.randn(6, 5, dtype=torch.float64, device=DEV)
    torch.library.opcheck(torch.ops.moe_ext.swiglu_backward.default, (grad, h.detach()))


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,in_cols,out_cols", [(0, 4, 3), (1, 1, 1), (33, 64, 8), (300, 257, 131)])
def test_linear_matches_cpu(rows, in_cols, out_cols, dtype, bias):
    g = make_generator(11)
    x = torch.randn(rows, in_cols, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(out_cols, in_cols, generator=g, dtype=torch.float64) / max(1, in_cols) ** 0.5).to(dtype)
    b = torch.randn(out_cols, generator=g, dtype=torch.float64).to(dtype) if bias else None
    grad = torch.randn(rows, out_cols, generator=g, dtype=torch.float64).to(dtype)
    on_gpu = [None if t is None else t.to(DEV) for t in (x, w, b, grad)]
    # sums over in (y), out (d x) and all rows (d weight, d bias) in another order: tolerance grows with length
    rtol, atol = CLOSE[dtype]["rtol"], CLOSE[dtype]["atol"] * max(rows, in_cols, out_cols, 1) ** 0.5
    names = ("y", "d x", "d weight", "d bias")
    want = (ops.linear(x, w, b), *torch.ops.moe_ext.linear_backward(grad, x, w, bias))
    got = (ops.linear(*on_gpu[:3]), *torch.ops.moe_ext.linear_backward(on_gpu[3], on_gpu[0], on_gpu[1], bias))
    for name, gpu_value, cpu_value in zip(names, got, want, strict=True):
        assert gpu_value.device.type == DEV and gpu_value.dtype == cpu_value.dtype, name
        torch.testing.assert_close(gpu_value.cpu().double(), cpu_value.double(), rtol=rtol, atol=atol, msg=name)


def test_linear_gradcheck_and_opcheck_cuda():
    x = torch.randn(6, 5, dtype=torch.float64, device=DEV, requires_grad=True)
    w = torch.randn(3, 5, dtype=torch.float64, device=DEV, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, device=DEV, requires_grad=True)
    assert torch.autograd.gradcheck(ops.linear, (x, w, b), eps=1e-6, atol=1e-8, rtol=1e-6)
    torch.library.opcheck(torch.ops.moe_ext.linear.default, (x, w, b))
    grad = torch.randn(6, 3, dtype=torch.float64, device=DEV)
    torch.library.opcheck(torch.ops.moe_ext.linear_backward.default, (grad, x.detach(), w.detach(), True))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("variant", ["default", "bias", "mask", "deepseek"])
def test_topk_gating_gradcheck_cuda(score_func, variant):
    sample = base.gating_sample(5, 8, 2, torch.float64, score_func=score_func, variant=variant, tie_free=True)
    named = to_device(sample.named)
    logits = named.pop("logits").requires_grad_()

    def fn(lg):
        weights, _, scores = ops.topk_gating(lg, **{n: v for n, v in named.items()})
        return weights, scores

    assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("kind", ["dropless", "capacity"])
def test_permute_gradcheck_cuda(kind):
    plan = to_device(base._gradcheck_plan(kind))
    g = make_generator("gc-cuda", kind)
    x = torch.randn(7, 3, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    assert torch.autograd.gradcheck(lambda x_: ops.dispatch(x_, plan), (x,))
    y_sorted = torch.randn(plan.token_of.shape[0], 3, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    weights = torch.randn(7, 2, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    assert torch.autograd.gradcheck(lambda y, w: ops.combine(y, w, plan), (y_sorted, weights))


def test_grouped_mm_and_losses_gradcheck_cuda():
    g = make_generator("gc-cuda-gmm")
    offsets = torch.tensor([0, 3, 3, 7, 8], device=DEV)
    x = torch.randn(8, 3, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    w = torch.randn(4, 3, 5, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ops.grouped_mm(a, b, offsets), (x, w))
    named = to_device(base.load_balancing_loss_sample(7, 8, 2, torch.float64).named)
    scores = named["scores"].requires_grad_()
    assert torch.autograd.gradcheck(lambda s: ops.load_balancing_loss(s, named["indices"], 8), (scores,))
    logits = torch.randn(7, 8, generator=g, dtype=torch.float64).to(DEV).requires_grad_()
    assert torch.autograd.gradcheck(ops.router_z_loss, (logits,))


@pytest.mark.parametrize("op,index", base.OPCHECK_CASES)
def test_opcheck_cuda(op, index):
    sample = base.opcheck_samples(op)[index]
    args, kwargs = base.raw_args(op, to_device(sample.named))
    torch.library.opcheck(getattr(base.LIB, op).default, args, kwargs)


@pytest.mark.parametrize("op", base.DIFFERENTIABLE_OPS)
def test_opcheck_backward_op_cuda(op):
    for sample in base.opcheck_samples(op):
        named = to_device(sample.named)
        diff = [v for v in named.values() if isinstance(v, torch.Tensor) and v.requires_grad]
        if not diff or any(v.shape[0] == 0 for v in diff):
            continue
        outs = [o for o in outputs_of(base.call_op(op, named)) if o.requires_grad]
        with base._RecordMoeCalls() as rec:
            torch.autograd.grad(outs, diff, [torch.randn_like(o) for o in outs], allow_unused=True)
        calls = [c for c in rec.calls if c[0]._schema.name == f"moe_ext::{op}_backward"]
        assert calls, f"{op}: no {op}_backward call on CUDA"
        for func, args, kwargs in calls:
            torch.library.opcheck(func, base._detach_tree(args), base._detach_tree(kwargs))


# --------------------------------------------------------------------------------------------
# Bad inputs: the CPU kernel's message, raised by the CUDA kernel too (one synchronizing check)
# --------------------------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0]


BAD_CASES = {
    "nan logits": lambda: ("topk_gating", {"logits": torch.tensor([[0.0, float("nan"), 1.0]] * 3), "k": 1}),
    "inf bias": lambda: (
        "topk_gating",
        {"logits": torch.randn(3, 4), "k": 1, "bias": torch.tensor([0.0, float("inf"), 0.0, 0.0])},
    ),
    "mask too small": lambda: (
        "topk_gating",
        {"logits": torch.randn(3, 4), "k": 2, "expert_mask": torch.tensor([True, False, False, False])},
    ),
    "per-token mask too small": lambda: (
        "topk_gating",
        {
            "logits": torch.randn(3, 4),
            "k": 2,
            "expert_mask": torch.tensor([[True] * 4, [True, False, False, False], [True] * 4]),
        },
    ),
    "index out of range": lambda: ("make_plan", {"indices": torch.tensor([[0, 1], [2, 9], [7, 1]]), "num_experts": 4}),
    "negative index": lambda: ("make_plan", {"indices": torch.tensor([[0, -1]]), "num_experts": 4, "capacity": 2}),
    "nan priority": lambda: (
        "make_plan",
        {
            "indices": torch.tensor([[0, 1]]),
            "num_experts": 4,
            "capacity": 1,
            "priority": torch.tensor([[0.0, float("nan")]]),
        },
    ),
    "loss index": lambda: (
        "load_balancing_loss",
        {"scores": torch.rand(2, 4), "indices": torch.tensor([[0, 1], [4, 0]]), "num_experts": 4},
    ),
}


def _bad_plans():
    plan = ops.make_plan(torch.tensor([[0, 1], [1, 2], [2, 0]]), 3)
    row_of, token_of = plan.row_of.clone(), plan.token_of.clone()
    yield "row out of range", plan._replace(row_of=row_of.index_fill(0, torch.tensor([1]), 99))
    yield "row not owned", plan._replace(token_of=token_of.roll(1))
    dup = row_of.clone()
    dup[2, 1] = dup[2, 0]
    yield "duplicate row", plan._replace(row_of=dup)
    bad_token = token_of.clone()
    bad_token[0] = 17
    yield "token out of range", plan._replace(token_of=bad_token)


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_inputs_raise_the_cpu_message(case):
    op, named = BAD_CASES[case]()
    with pytest.raises(RuntimeError) as cpu_error:
        base.call_op(op, named)
    with pytest.raises(RuntimeError) as cuda_error:
        base.call_op(op, to_device(named))
    assert _first_line(cuda_error.value) == _first_line(cpu_error.value)
    torch.cuda.synchronize()  # the context survived: a clean error, not a device-side assert


def test_bad_plans_raise_the_cpu_message():
    x, weights = torch.randn(3, 4), torch.rand(3, 2)
    for name, plan in _bad_plans():
        y_sorted = torch.randn(plan.token_of.shape[0], 4)
        calls = {
            "dispatch": lambda p, d: ops.dispatch(x.to(d), p),
            "combine": lambda p, d, y=y_sorted: ops.combine(y.to(d), weights.to(d), p),
        }
        for op, call in calls.items():
            with pytest.raises(RuntimeError) as cpu_error:
                call(plan, "cpu")
            with pytest.raises(RuntimeError) as cuda_error:
                call(to_device(plan), DEV)
            assert _first_line(cuda_error.value) == _first_line(cpu_error.value), f"{op}: {name}"


@pytest.mark.parametrize("path", ["auto", "loop"])
def test_bad_offsets_raise_the_cpu_message(path, monkeypatch):
    if path == "loop":
        monkeypatch.setenv("MOE_EXT_CUDA_GROUPED_MM", "loop")
    x, w = torch.randn(8, 16).bfloat16(), torch.randn(3, 16, 8).bfloat16()
    for offsets in ([1, 2, 5, 8], [0, 5, 2, 8], [0, 2, 5, 7]):
        offsets = torch.tensor(offsets)
        with pytest.raises(RuntimeError) as cpu_error:
            ops.grouped_mm(x, w, offsets)
        with pytest.raises(RuntimeError) as cuda_error:
            ops.grouped_mm(x.to(DEV), w.to(DEV), offsets.to(DEV))
        assert _first_line(cuda_error.value) == _first_line(cpu_error.value)


def test_mixed_devices_are_rejected():
    with pytest.raises(RuntimeError, match="device"):
        ops.combine(torch.randn(4, 3, device=DEV), torch.rand(2, 2), ops.make_plan(torch.tensor([[0, 1], [1, 0]]), 2))


# --------------------------------------------------------------------------------------------
# Determinism, graphs, check modes, the module
# --------------------------------------------------------------------------------------------


def test_deterministic_across_runs():
    g = make_generator("cuda-det")
    logits = torch.randn(4096, 64, generator=g).to(DEV).requires_grad_()
    x = torch.randn(4096, 256, generator=g).to(DEV).requires_grad_()
    w = torch.randn(64, 256, 128, generator=g).div(16).to(DEV).requires_grad_()

    def run():
        weights, indices, scores = ops.topk_gating(logits, 8)
        plan = ops.make_plan(indices, 64, capacity=700)
        y = ops.combine(ops.grouped_mm(ops.dispatch(x, plan), w, plan.offsets), weights, plan)
        loss = ops.load_balancing_loss(scores, indices, 64) + ops.router_z_loss(logits) + y.square().mean()
        grads = torch.autograd.grad(loss, (logits, x, w))
        return [weights, indices, scores, *plan, y, loss, *grads]

    first = run()
    for _ in range(3):
        for i, (a, b) in enumerate(zip(run(), first, strict=True)):
            assert_bitwise_equal(a, b, f"output {i}")


def test_routing_captured_in_a_cuda_graph():
    # Under capture the checks switch to device-side asserts (no host read), so the routing ops capture.
    logits = torch.randn(512, 16, device=DEV)
    x = torch.randn(512, 64, device=DEV)

    def route():
        weights, indices, _ = ops.topk_gating(logits, 2)
        plan = ops.make_plan(indices, 16, capacity=80)
        return ops.combine(ops.dispatch(x, plan), weights, plan)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        route()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = route()
    logits.copy_(torch.randn_like(logits))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert_bitwise_equal(captured, route(), "graph replay vs eager")


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_device_check_mode_runs_without_host_reads_and_asserts_on_bad_input():
    good = _run_python(
        """
        import torch, moe_ext
        from moe_ext import ops
        logits = torch.randn(300, 8)
        x = torch.randn(300, 32)
        def pipeline(d):
            w, i, s = ops.topk_gating(logits.to(d), 2)
            plan = ops.make_plan(i, 8, capacity=100)
            return ops.combine(ops.dispatch(x.to(d), plan), w, plan).cpu(), ops.load_balancing_loss(s, i, 8).cpu()
        (y0, l0), (y1, l1) = pipeline("cpu"), pipeline("cuda")
        torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
        print("ok")
        """,
        MOE_EXT_CUDA_CHECKS="device",
    )
    assert good.returncode == 0 and "ok" in good.stdout, good.stderr
    bad = _run_python(
        """
        import torch, moe_ext
        from moe_ext import ops
        ops.make_plan(torch.tensor([[0, 9]], device="cuda"), 4)
        torch.cuda.synchronize()
        """,
        MOE_EXT_CUDA_CHECKS="device",
    )
    assert bad.returncode != 0
    assert "moe_ext: invalid input" in bad.stdout + bad.stderr or "device-side assert" in bad.stderr, bad.stderr


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_module_on_cuda_matches_cpu(capacity_factor, dtype):
    torch.manual_seed(0)
    layer = moe_ext.MoE(64, 96, 8, top_k=2, capacity_factor=capacity_factor, z_loss_coef=1e-3)
    layer_cuda = copy.deepcopy(layer).to(DEV)
    x = torch.randn(4, 33, 64)
    outs = []
    for module, device in ((layer, "cpu"), (layer_cuda, DEV)):
        module.to(dtype)
        xi = x.to(dtype).to(device).requires_grad_()
        y = module(xi)
        y.float().square().mean().backward()  # aux_loss_mode="auto" adds the aux losses' gradients
        outs.append((y.detach(), xi.grad, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}))
    (y0, gx0, gp0), (y1, gx1, gp1) = outs
    loose = {"rtol": 5e-2, "atol": 5e-2} if dtype == torch.bfloat16 else {"rtol": 1e-4, "atol": 1e-5}
    torch.testing.assert_close(y1.cpu().float(), y0.float(), **loose)
    torch.testing.assert_close(gx1.cpu().float(), gx0.float(), **loose)
    assert gp1.keys() == gp0.keys()
    for name in gp0:
        torch.testing.assert_close(
            gp1[name].cpu().float(), gp0[name].float(), **loose, msg=lambda m, n=name: f"{n}\n{m}"
        )
