"""moe_ext operators against the float64 reference (tests/reference.py): values, gradients, opcheck,
bad inputs, non-contiguous inputs and determinism.

Every op has one sample-input generator (`*_sample`), reused by the value test, gradcheck and
opcheck (pytorch/extension-cpp style). Samples are dicts of named arguments; `call_op` feeds them
to the `moe_ext.ops` wrapper and `raw_args` maps them onto the `torch.ops.moe_ext` schema.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import pytest
import reference as ref
import torch
from conftest import (
    ALL_DTYPES,
    DTYPE_IDS,
    assert_bitwise_equal,
    assert_close,
    assert_equal,
    make_generator,
    routing_dtype,
    tol,
)
from torch.utils._python_dispatch import TorchDispatchMode

import moe_ext  # noqa: F401  (loads the operator library)
from moe_ext import ops

LIB = torch.ops.moe_ext
OP_NAMES = [
    "topk_gating",
    "make_plan",
    "dispatch",
    "grouped_mm",
    "combine",
    "load_balancing_loss",
    "router_z_loss",
]
DIFFERENTIABLE_OPS = [name for name in OP_NAMES if name != "make_plan"]

# Positional arguments of the ops.<name> wrappers (DESIGN.md); everything else goes by keyword.
WRAPPER_POSITIONAL = {
    "topk_gating": ("logits", "k"),
    "make_plan": ("indices", "num_experts"),
    "dispatch": ("x", "plan"),
    "grouped_mm": ("x_sorted", "w", "offsets"),
    "combine": ("y_sorted", "weights", "plan"),
    "load_balancing_loss": ("scores", "indices", "num_experts"),
    "router_z_loss": ("logits",),
}

H = 16  # hidden size of dispatch/combine samples
IN, OUT = 16, 8  # grouped_mm feature sizes


def _shape_grid():
    for T in (0, 1, 7, 300):
        for E in (1, 2, 8, 64):
            for k in sorted({1, 2, E}):
                if k <= E:
                    yield T, E, k


SHAPES = list(_shape_grid())
SHAPE_IDS = [f"T{T}-E{E}-k{k}" for T, E, k in SHAPES]
DTYPE_PARAMS = [pytest.param(d, id=DTYPE_IDS[d]) for d in ALL_DTYPES]


def worst_dtype(*dtypes):
    """The dtype with the loosest tolerance among `dtypes`."""
    return max(dtypes, key=lambda d: tol(d)["rtol"])


def arg_pattern(*names: str) -> str:
    """Regex matching any of the argument names as a whole word, case-insensitively."""
    return r"(?i)(?<![A-Za-z0-9_])(" + "|".join(re.escape(n) for n in names) + r")(?![A-Za-z0-9_])"


# --------------------------------------------------------------------------------------------
# Samples and calling conventions
# --------------------------------------------------------------------------------------------


@dataclass
class Sample:
    op: str
    named: dict
    desc: str = ""
    extra: dict = field(default_factory=dict)  # test-only metadata (never passed to the op)

    def differentiable_inputs(self):
        return {n: v for n, v in self.named.items() if isinstance(v, torch.Tensor) and v.requires_grad}


def call_op(op_name: str, named: dict):
    pos = WRAPPER_POSITIONAL[op_name]
    args = [named[n] for n in pos]
    kwargs = {n: v for n, v in named.items() if n not in pos}
    return getattr(ops, op_name)(*args, **kwargs)


def raw_args(op_name: str, named: dict):
    """(args, kwargs) for torch.ops.moe_ext.<op_name>, filled from the schema's argument names."""
    named = dict(named)
    plan = named.pop("plan", None)
    if plan is not None:
        named.update(plan._asdict())
    if "x_sorted" in named:
        named.setdefault("x", named["x_sorted"])
    schema = getattr(LIB, op_name).default._schema
    args, kwargs, positional = [], {}, True
    for a in schema.arguments:
        if a.name in named:
            if positional and not a.kwarg_only:
                args.append(named[a.name])
            else:
                kwargs[a.name] = named[a.name]
        elif a.has_default_value():
            positional = False
        else:
            raise AssertionError(f"no sample value for argument {a.name!r} of {schema}")
    return tuple(args), kwargs


def call_raw(op_name: str, named: dict):
    args, kwargs = raw_args(op_name, named)
    return getattr(LIB, op_name).default(*args, **kwargs)


def plan_type():
    return ops.RoutingPlan


def _rand(shape, g, dtype, scale=1.0, requires_grad=False):
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return t.requires_grad_(requires_grad)


# --- topk_gating -----------------------------------------------------------------------------

GATING_VARIANTS = ["default", "no_normalize", "scale", "bias", "group", "mask", "mask_group", "deepseek"]
GROUP_CONFIG = {64: (8, 3), 8: (4, 2), 2: (2, 1)}  # E -> (n_group, topk_group)


def _mask(E: int, variant: str) -> torch.Tensor:
    mask = torch.ones(E, dtype=torch.bool)
    if variant == "mask":
        mask[1::3] = False
    elif variant == "mask_group":
        n_group, _ = GROUP_CONFIG[E]
        size = E // n_group
        mask[size : 2 * size] = False  # a whole group disabled
        if size >= 8:
            mask[0] = False  # and single experts in groups that keep >= 2 enabled
            mask[2 * size + 1] = False
    return mask


def gating_variant_applies(variant: str, E: int, k: int) -> bool:
    if variant in ("group", "deepseek", "mask_group"):
        if E not in GROUP_CONFIG:
            return False
        n_group, topk_group = GROUP_CONFIG[E]
        enabled = _mask(E, variant) if variant == "mask_group" else torch.ones(E, dtype=torch.bool)
        per_group = enabled.view(n_group, -1).sum(1).sort(descending=True).values
        return int(per_group[:topk_group].sum()) >= k
    if variant == "mask":
        return E >= 2 and int(_mask(E, variant).sum()) >= k
    return True


def gating_variant_kwargs(variant: str, E: int, dtype, g) -> dict:
    bias_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    if variant == "default":
        return {}
    if variant == "no_normalize":
        return {"normalize": False}
    if variant == "scale":
        return {"scale": 2.5}
    if variant == "bias":
        return {"bias": _rand(E, g, bias_dtype, 0.3)}
    if variant == "group":
        n_group, topk_group = GROUP_CONFIG[E]
        return {"n_group": n_group, "topk_group": topk_group}
    if variant == "mask":
        return {"expert_mask": _mask(E, variant)}
    if variant == "mask_group":
        n_group, topk_group = GROUP_CONFIG[E]
        return {"n_group": n_group, "topk_group": topk_group, "expert_mask": _mask(E, variant)}
    if variant == "deepseek":
        n_group, topk_group = GROUP_CONFIG[E]
        return {
            "bias": _rand(E, g, bias_dtype, 0.3),
            "scale": 2.5,
            "n_group": n_group,
            "topk_group": topk_group,
        }
    raise AssertionError(variant)


def _min_selection_gap(logits64: torch.Tensor, k: int, kw: dict) -> float:
    """Smallest gap between distinct candidates' selection values (and group scores) over tokens."""
    score_func = kw.get("score_func", "softmax")
    scores = ref.ref_scores(logits64, score_func, kw.get("expert_mask"))
    E = logits64.shape[1]
    mask = kw.get("expert_mask")
    enabled = [True] * E if mask is None else [bool(v) for v in mask.tolist()]
    n_group = kw.get("n_group", 1)
    gap = math.inf
    for t in range(logits64.shape[0]):
        sel = ref.ref_selection_values(scores[t], kw.get("bias"))
        vals = sorted(sel[e] for e in range(E) if enabled[e])
        gap = min([gap] + [b - a for a, b in zip(vals, vals[1:], strict=False)])
        if n_group > 1:
            size = E // n_group
            gs = []
            for gi in range(n_group):
                members = sorted((sel[e] for e in range(gi * size, (gi + 1) * size) if enabled[e]), reverse=True)
                if members:
                    gs.append(sum(members[:2]))
            gs.sort()
            gap = min([gap] + [b - a for a, b in zip(gs, gs[1:], strict=False)])
    return gap


def gating_sample(
    T, E, k, dtype, *, score_func="softmax", variant="default", requires_grad=False, tie_free=False
) -> Sample:
    g = make_generator("gating", T, E, k, dtype, score_func, variant, tie_free)
    kw = {"score_func": score_func, **gating_variant_kwargs(variant, E, dtype, g)}
    for _ in range(1000):
        logits64 = torch.randn((T, E), generator=g, dtype=torch.float64) * 2
        logits64 = logits64.to(dtype).to(torch.float64)
        if not tie_free or _min_selection_gap(logits64, k, kw) > 1e-3:
            break
    else:
        raise AssertionError("could not draw tie-free logits")
    logits = logits64.to(dtype).requires_grad_(requires_grad)
    desc = f"T={T} E={E} k={k} {dtype} {score_func} {variant}"
    return Sample("topk_gating", {"logits": logits, "k": k, **kw}, desc)


# --- make_plan -------------------------------------------------------------------------------

PLAN_MODES = ["dropless", "capacity", "capacity0", "capacity_nodrop", "priority"]


def make_indices(T, E, k, g) -> torch.Tensor:
    """Distinct experts per token, skewed toward low expert ids so capacity overflows."""
    skew = torch.linspace(1.5, 0.0, E, dtype=torch.float64)
    logits = torch.randn((T, E), generator=g, dtype=torch.float64) + skew
    return torch.topk(logits, k, dim=1).indices


def plan_kwargs(T, E, k, mode, g) -> dict:
    if mode == "dropless":
        return {}
    # At least 1 so T = 0 exercises padded empty rows; capacity 0 has its own mode.
    overflowing = max(1, math.ceil(0.5 * T * k / E))
    if mode == "capacity":
        return {"capacity": overflowing}
    if mode == "capacity0":
        return {"capacity": 0}
    if mode == "capacity_nodrop":
        return {"capacity": max(1, T * k)}
    if mode == "priority":
        # Few distinct levels, so ties in priority exercise the (j, t) tie-break.
        priority = torch.randint(0, 4, (T, k), generator=g).to(torch.float32) / 4
        return {"capacity": overflowing, "priority": priority}
    raise AssertionError(mode)


def make_plan_sample(T, E, k, mode="dropless") -> Sample:
    g = make_generator("plan", T, E, k, mode)
    indices = make_indices(T, E, k, g)
    return Sample(
        "make_plan",
        {"indices": indices, "num_experts": E, **plan_kwargs(T, E, k, mode, g)},
        f"T={T} E={E} k={k} {mode}",
    )


def reference_plan(T, E, k, mode, g):
    indices = make_indices(T, E, k, g)
    kw = plan_kwargs(T, E, k, mode, g)
    return plan_type()(*ref.ref_make_plan(indices, E, kw.get("capacity"), kw.get("priority"))), indices


# --- dispatch / grouped_mm / combine ---------------------------------------------------------


def dispatch_sample(T, E, k, dtype, mode="dropless", requires_grad=False, hidden=H) -> Sample:
    g = make_generator("dispatch", T, E, k, dtype, mode)
    plan, _ = reference_plan(T, E, k, mode, g)
    x = _rand((T, hidden), g, dtype, requires_grad=requires_grad)
    return Sample("dispatch", {"x": x, "plan": plan}, f"T={T} E={E} k={k} {dtype} {mode}")


def _weight(E, d_in, d_out, g, dtype, transposed, requires_grad):
    """w [E, in, out]: row-major, or (transposed) the transpose view of a row-major [E, out, in] tensor, as
    transformers' experts store it; a leaf either way."""
    scale = 1 / math.sqrt(d_in)
    if transposed:
        return _rand((E, d_out, d_in), g, dtype, scale).transpose(1, 2).requires_grad_(requires_grad)
    return _rand((E, d_in, d_out), g, dtype, scale, requires_grad=requires_grad)


def grouped_mm_sample(T, E, k, dtype, mode="dropless", requires_grad=False, dims=(IN, OUT), transposed=False) -> Sample:
    g = make_generator("grouped_mm", T, E, k, dtype, mode)
    plan, _ = reference_plan(T, E, k, mode, g)
    N = plan.token_of.shape[0]
    d_in, d_out = dims
    x = _rand((N, d_in), g, dtype, requires_grad=requires_grad)
    w = _weight(E, d_in, d_out, g, dtype, transposed, requires_grad)
    layout = " transposed-w" if transposed else ""
    return Sample(
        "grouped_mm", {"x_sorted": x, "w": w, "offsets": plan.offsets}, f"T={T} E={E} k={k} {dtype} {mode}{layout}"
    )


def combine_sample(T, E, k, dtype, mode="dropless", requires_grad=False, hidden=H) -> Sample:
    g = make_generator("combine", T, E, k, dtype, mode)
    plan, _ = reference_plan(T, E, k, mode, g)
    N = plan.token_of.shape[0]
    y_sorted = _rand((N, hidden), g, dtype, requires_grad=requires_grad)
    weights = torch.rand((T, k), generator=g, dtype=torch.float64).to(routing_dtype(dtype))
    weights.requires_grad_(requires_grad)
    return Sample(
        "combine",
        {"y_sorted": y_sorted, "weights": weights, "plan": plan},
        f"T={T} E={E} k={k} {dtype} {mode}",
    )


# --- losses ----------------------------------------------------------------------------------


def load_balancing_loss_sample(T, E, k, dtype, requires_grad=False) -> Sample:
    g = make_generator("lbl", T, E, k, dtype)
    scores64 = torch.softmax(torch.randn((T, E), generator=g, dtype=torch.float64), dim=1)
    indices = make_indices(T, E, k, g)
    scores = scores64.to(dtype).requires_grad_(requires_grad)
    return Sample(
        "load_balancing_loss",
        {"scores": scores, "indices": indices, "num_experts": E},
        f"T={T} E={E} k={k} {dtype}",
    )


def router_z_loss_sample(T, E, dtype, requires_grad=False) -> Sample:
    g = make_generator("zloss", T, E, dtype)
    logits = _rand((T, E), g, dtype, 3.0, requires_grad=requires_grad)
    return Sample("router_z_loss", {"logits": logits}, f"T={T} E={E} {dtype}")


def sample_for(op, T, E, k, dtype, requires_grad=False, mode="dropless", **kw) -> Sample:
    if op == "topk_gating":
        return gating_sample(T, E, k, dtype, requires_grad=requires_grad, **kw)
    if op == "make_plan":
        return make_plan_sample(T, E, k, mode)
    if op == "dispatch":
        return dispatch_sample(T, E, k, dtype, mode, requires_grad, **kw)
    if op == "grouped_mm":
        return grouped_mm_sample(T, E, k, dtype, mode, requires_grad, **kw)
    if op == "combine":
        return combine_sample(T, E, k, dtype, mode, requires_grad, **kw)
    if op == "load_balancing_loss":
        return load_balancing_loss_sample(T, E, k, dtype, requires_grad)
    if op == "router_z_loss":
        return router_z_loss_sample(T, E, dtype, requires_grad)
    raise AssertionError(op)


# --------------------------------------------------------------------------------------------
# Checkers: op vs reference (values, and gradients for inputs that require grad)
# --------------------------------------------------------------------------------------------


def _leaf64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64).requires_grad_(True)


def _grads(outputs, inputs, grad_outputs):
    """d(sum(out * gout))/d(inputs); zeros for inputs the outputs do not depend on."""
    pairs = [(o, go) for o, go in zip(outputs, grad_outputs, strict=True) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(i) for i in inputs]
    got = torch.autograd.grad([p[0] for p in pairs], inputs, [p[1] for p in pairs], allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, got, strict=True)]


def _grad_outputs(outputs, seed):
    g = make_generator("gout", seed)
    return [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outputs]


def _ref_weights_at(scores64: torch.Tensor, indices: torch.Tensor, normalize: bool, scale: float):
    w = scores64.gather(1, indices)
    if normalize:
        w = w / (w.sum(dim=1, keepdim=True) + ref.NORMALIZE_EPS)
    return w * scale


def _check_gating_indices(indices, ref_indices, ref_scores, named):
    """Indices must equal the reference's. Where they differ, the op's choice must still be a valid
    top-k of the float64 selection values up to the routing precision (float32 rounding can merge
    near-equal values into ties), and exact float64 ties must still go to the lower expert index."""
    logits = named["logits"]
    T, E = logits.shape
    k = named["k"]
    bias = named.get("bias")
    mask = named.get("expert_mask")
    enabled = [True] * E if mask is None else [bool(v) for v in mask.tolist()]
    near = 1e-12 if logits.dtype == torch.float64 else 2e-6
    if indices.numel():
        assert 0 <= indices.min().item() and indices.max().item() < E, f"index outside [0, {E}): {indices}"
    differing = (indices != ref_indices).any(dim=1).nonzero().flatten().tolist()
    for t in differing:
        sel = ref.ref_selection_values(ref_scores[t], bias)
        got, want = indices[t].tolist(), ref_indices[t].tolist()
        candidates = ref.ref_selection_candidates(sel, enabled, named.get("n_group", 1), named.get("topk_group", 1))
        slack = near * max(1.0, max(abs(v) for v in sel))
        problem = None
        if len(set(got)) != k:
            problem = "repeated expert"
        elif any(e not in candidates for e in got):
            problem = "non-candidate expert (disabled or outside the kept groups)"
        elif any(sel[got[j]] < sel[got[j + 1]] - slack for j in range(k - 1)):
            problem = "not in descending selection order"
        elif any(sel[e] > min(sel[p] for p in got) + slack for e in candidates if e not in got):
            problem = "an unselected candidate has a clearly larger selection value"
        elif bias is None:
            # Exact float64 ties (no bias) are exact ties in any precision: lower index first.
            for i in range(k):
                for j in range(i + 1, k):
                    if sel[got[i]] == sel[got[j]] and got[i] > got[j]:
                        problem = f"tie between experts {got[j]} and {got[i]} ordered higher index first"
                for e in candidates:
                    if e not in got and sel[e] == sel[got[i]] and e < got[i]:
                        problem = f"tie: expert {got[i]} selected over lower-index expert {e}"
        if problem:
            raise AssertionError(
                f"token {t}: indices {got}, reference {want}: {problem}\n"
                f"logits[{t}] = {logits[t].tolist()}\nselection = {sel}\nkwargs = "
                f"{ {n: v for n, v in named.items() if n != 'logits'} }"
            )


def check_topk_gating(sample: Sample):
    named = sample.named
    logits, k = named["logits"], named["k"]
    T, E = logits.shape
    opts = {n: v for n, v in named.items() if n not in ("logits", "k")}
    weights, indices, scores = call_op("topk_gating", named)
    rd = routing_dtype(logits.dtype)
    assert weights.dtype == rd and scores.dtype == rd, f"weights {weights.dtype}, scores {scores.dtype}, want {rd}"
    assert indices.dtype == torch.int64, indices.dtype
    assert weights.shape == (T, k) and indices.shape == (T, k) and scores.shape == (T, E), (
        weights.shape,
        indices.shape,
        scores.shape,
    )

    logits64 = _leaf64(logits)
    ref_w, ref_i, ref_s = ref.ref_topk_gating(logits64, k, **opts)
    assert_close(scores, ref_s.detach(), rd, f"scores ({sample.desc})")
    _check_gating_indices(indices, ref_i, ref_s.detach(), named)
    expected_w = _ref_weights_at(ref_s, indices, opts.get("normalize", True), opts.get("scale", 1.0))
    assert_close(weights, expected_w.detach(), rd, f"weights ({sample.desc})")

    if logits.requires_grad:
        gw, gs = _grad_outputs([weights, scores], sample.desc)
        (got,) = _grads([weights, scores], [logits], [gw.to(rd), gs.to(rd)])
        (want,) = _grads([expected_w, ref_s], [logits64], [gw, gs])
        assert got.dtype == logits.dtype
        assert_close(got, want, worst_dtype(logits.dtype, rd), f"d logits ({sample.desc})")
    return weights, indices, scores


def check_make_plan(sample: Sample):
    named = sample.named
    plan = call_op("make_plan", named)
    assert isinstance(plan, tuple) and type(plan).__name__ == "RoutingPlan", type(plan)
    want = ref.ref_make_plan(named["indices"], named["num_experts"], named.get("capacity"), named.get("priority"))
    for name, got, exp in zip(("row_of", "token_of", "counts", "offsets"), plan, want, strict=True):
        assert_equal(got, exp, f"{name} ({sample.desc})")
    assert plan._fields == ("row_of", "token_of", "counts", "offsets")
    return plan


def check_dispatch(sample: Sample):
    x, plan = sample.named["x"], sample.named["plan"]
    out = call_op("dispatch", sample.named)
    x64 = _leaf64(x)
    want = ref.ref_dispatch(x64, plan.token_of)
    # A pure copy: exact in every dtype.
    assert_equal(out, want.detach().to(x.dtype), f"x_sorted ({sample.desc})")
    if x.requires_grad:
        (gout,) = _grad_outputs([out], sample.desc)
        (got,) = _grads([out], [x], [gout.to(x.dtype)])
        (exp,) = _grads([want], [x64], [gout.to(x.dtype).to(torch.float64)])
        assert got.dtype == x.dtype
        assert_close(got, exp, x.dtype, f"d x ({sample.desc})")
    return out


def check_grouped_mm(sample: Sample):
    x, w, offsets = sample.named["x_sorted"], sample.named["w"], sample.named["offsets"]
    out = call_op("grouped_mm", sample.named)
    assert out.dtype == x.dtype and out.shape == (x.shape[0], w.shape[2]), (out.dtype, out.shape)
    x64, w64 = _leaf64(x), _leaf64(w)
    want = ref.ref_grouped_mm(x64, w64, offsets)
    assert_close(out, want.detach(), x.dtype, f"y_sorted ({sample.desc})")
    if x.requires_grad and w.requires_grad:
        (gout,) = _grad_outputs([out], sample.desc)
        gout = gout.to(x.dtype)
        got = _grads([out], [x, w], [gout])
        exp = _grads([want], [x64, w64], [gout.to(torch.float64)])
        # grad_w sums over the rows of an expert: scale the tolerance by that magnitude.
        assert_close(got[0], exp[0], x.dtype, f"d x_sorted ({sample.desc})")
        rows = int((offsets[1:] - offsets[:-1]).max()) if offsets.numel() > 1 else 0
        rtol, atol = tol(x.dtype).values()
        torch.testing.assert_close(
            got[1].double(),
            exp[1],
            rtol=rtol,
            atol=atol * max(1.0, math.sqrt(rows)),
            msg=lambda m: f"d w ({sample.desc})\n{m}",
        )
    return out


def check_combine(sample: Sample):
    y_sorted, weights, plan = sample.named["y_sorted"], sample.named["weights"], sample.named["plan"]
    out = call_op("combine", sample.named)
    T = weights.shape[0]
    assert out.shape == (T, y_sorted.shape[1]), out.shape
    assert out.dtype == y_sorted.dtype, f"combine output {out.dtype}, y_sorted {y_sorted.dtype}"
    y64, w64 = _leaf64(y_sorted), _leaf64(weights)
    want = ref.ref_combine(y64, w64, plan.row_of)
    mixed = worst_dtype(y_sorted.dtype, weights.dtype)
    assert_close(out, want.detach(), mixed, f"y ({sample.desc})")
    if y_sorted.requires_grad and weights.requires_grad:
        (gout,) = _grad_outputs([out], sample.desc)
        gout = gout.to(out.dtype)
        got = _grads([out], [y_sorted, weights], [gout])
        exp = _grads([want], [y64, w64], [gout.to(torch.float64)])
        assert got[0].dtype == y_sorted.dtype and got[1].dtype == weights.dtype
        assert_close(got[0], exp[0], mixed, f"d y_sorted ({sample.desc})")
        assert_close(got[1], exp[1], mixed, f"d weights ({sample.desc})")
    return out


def check_load_balancing_loss(sample: Sample):
    scores, indices, E = sample.named["scores"], sample.named["indices"], sample.named["num_experts"]
    out = call_op("load_balancing_loss", sample.named)
    assert out.shape == (), out.shape
    assert out.dtype in (scores.dtype, torch.float32) and (
        scores.dtype != torch.float64 or out.dtype == torch.float64
    ), f"loss dtype {out.dtype} for scores {scores.dtype}"
    s64 = _leaf64(scores)
    want = ref.ref_load_balancing_loss(s64, indices, E)
    assert_close(out, want.detach(), scores.dtype, f"loss ({sample.desc})")
    if scores.requires_grad:
        (got,) = _grads([out], [scores], [torch.tensor(1.5, dtype=out.dtype)])
        (exp,) = _grads([want], [s64], [torch.tensor(1.5, dtype=torch.float64)])
        assert got.dtype == scores.dtype
        assert_close(got, exp, scores.dtype, f"d scores ({sample.desc})")
    return out


def check_router_z_loss(sample: Sample):
    logits = sample.named["logits"]
    out = call_op("router_z_loss", sample.named)
    assert out.shape == (), out.shape
    assert out.dtype in (logits.dtype, torch.float32) and (
        logits.dtype != torch.float64 or out.dtype == torch.float64
    ), f"loss dtype {out.dtype} for logits {logits.dtype}"
    l64 = _leaf64(logits)
    want = ref.ref_router_z_loss(l64)
    # The loss is a square of values ~log(E) + max logit: compare relative to its size.
    assert_close(out, want.detach(), logits.dtype, f"z loss ({sample.desc})")
    if logits.requires_grad:
        (got,) = _grads([out], [logits], [torch.tensor(0.7, dtype=out.dtype)])
        (exp,) = _grads([want], [l64], [torch.tensor(0.7, dtype=torch.float64)])
        assert got.dtype == logits.dtype
        assert_close(got, exp, logits.dtype, f"d logits ({sample.desc})")
    return out


CHECKERS = {
    "topk_gating": check_topk_gating,
    "make_plan": check_make_plan,
    "dispatch": check_dispatch,
    "grouped_mm": check_grouped_mm,
    "combine": check_combine,
    "load_balancing_loss": check_load_balancing_loss,
    "router_z_loss": check_router_z_loss,
}


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OP_NAMES)
def test_op_is_registered(name):
    assert hasattr(LIB, name), f"torch.ops.moe_ext.{name} is not registered"
    assert callable(getattr(ops, name)), f"moe_ext.ops.{name} is missing"


def test_routing_plan_is_a_named_tuple():
    plan = ops.make_plan(torch.tensor([[1, 0], [0, 2]]), 3)
    assert isinstance(plan, ops.RoutingPlan)
    assert plan._fields == ("row_of", "token_of", "counts", "offsets")
    row_of, token_of, counts, offsets = plan  # unpacks like a tuple
    assert row_of is plan.row_of and offsets is plan.offsets
    assert all(t.dtype == torch.int64 for t in plan)


# --------------------------------------------------------------------------------------------
# Values against the reference
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("T,E,k", SHAPES, ids=SHAPE_IDS)
def test_topk_gating_values(T, E, k, dtype, score_func):
    check_topk_gating(gating_sample(T, E, k, dtype, score_func=score_func, requires_grad=True))


GATING_OPTION_SHAPES = [
    (7, 8, 2),
    (300, 64, 2),
    (300, 8, 1),
    (300, 64, 1),
    (1, 64, 2),
    (0, 8, 2),
    (300, 2, 1),
]
GATING_OPTION_CASES = [
    pytest.param(T, E, k, v, id=f"T{T}-E{E}-k{k}-{v}")
    for v in GATING_VARIANTS[1:]
    for T, E, k in GATING_OPTION_SHAPES
    if gating_variant_applies(v, E, k)
]


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("T,E,k,variant", GATING_OPTION_CASES)
def test_topk_gating_options(T, E, k, variant, dtype, score_func):
    sample = gating_sample(T, E, k, dtype, score_func=score_func, variant=variant, requires_grad=True)
    weights, indices, scores = check_topk_gating(sample)
    named = sample.named
    if "expert_mask" in named and T > 0:
        disabled = ~named["expert_mask"]
        assert (scores[:, disabled] == 0).all(), "disabled experts must score 0"
        assert not disabled[indices].any(), "a disabled expert was selected"
    if named.get("normalize", True) and T > 0:
        torch.testing.assert_close(
            weights.sum(1).double(),
            torch.full((T,), float(named.get("scale", 1.0)), dtype=torch.float64),
            **tol(torch.float32),
        )


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_topk_gating_bias_only_affects_selection(dtype, score_func):
    # A large bias on expert E-1 forces its selection, yet its weight stays its plain score.
    T, E, k = 7, 8, 2
    sample = gating_sample(T, E, k, dtype, score_func=score_func)
    logits = sample.named["logits"]
    bias = torch.zeros(E, dtype=routing_dtype(dtype))
    bias[E - 1] = 100.0
    weights, indices, scores = ops.topk_gating(logits, k, score_func=score_func, normalize=False, bias=bias)
    assert (indices[:, 0] == E - 1).all(), indices
    torch.testing.assert_close(weights[:, 0], scores[:, E - 1], rtol=0, atol=0)
    assert (weights[:, 0] < 1.0).all(), "bias leaked into the weights"
    check_topk_gating(
        Sample(
            "topk_gating",
            {"logits": logits, "k": k, "score_func": score_func, "normalize": False, "bias": bias},
            "bias",
        )
    )


# Hand-written tie cases: (logits rows, k, kwargs, expected indices). Exact ties in every dtype.
TIE_CASES = {
    "all_equal": ([[0.0] * 8, [1.0] * 8], 3, {}, [[0, 1, 2], [0, 1, 2]]),
    "partial": ([[1.0, 3.0, 3.0, 2.0, 3.0]], 3, {}, [[1, 2, 4]]),
    "partial_k2": ([[3.0, 1.0, 3.0, 2.0, 3.0]], 2, {}, [[0, 2]]),
    "bias_ties": ([[0.0, 0.0, 0.0, 0.0]], 2, {"bias": [0.0, 0.5, 0.0, 0.5]}, [[1, 3]]),
    "bias_breaks": ([[2.0, 0.0, 0.0, 0.0]], 2, {"bias": [0.0, 0.0, 0.0, 4.0]}, [[3, 0]]),
    "mask_ties": ([[0.0, 0.0, 0.0, 0.0]], 1, {"expert_mask": [False, True, False, True]}, [[1]]),
    "mask_ties_k2": ([[5.0, 0.0, 5.0, 0.0]], 2, {"expert_mask": [False, True, True, True]}, [[2, 1]]),
    # A disabled expert stays out however large its bias.
    "mask_beats_bias": (
        [[0.0, 0.0, 0.0, 0.0]],
        2,
        {"bias": [9.0, 0.0, 0.0, 0.0], "expert_mask": [False, True, True, True]},
        [[1, 2]],
    ),
    # Groups {0,1} {2,3} {4,5} {6,7}: groups 1 and 2 tie (3 + 2 = 2 + 3) and beat the others;
    # topk_group=1 keeps group 1 (lower index), so expert 4 (logit 3, group 2) is not a candidate.
    "group_ties": ([[0.0, 0.0, 2.0, 3.0, 3.0, 2.0, 0.0, 0.0]], 2, {"n_group": 4, "topk_group": 1}, [[3, 2]]),
    "group_ties_k1": ([[0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]], 1, {"n_group": 4, "topk_group": 2}, [[2]]),
}


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("case", list(TIE_CASES))
def test_topk_gating_ties_pick_lower_index(case, dtype, score_func):
    rows, k, kw, expected = TIE_CASES[case]
    logits = torch.tensor(rows, dtype=dtype)
    kw = dict(kw)
    if "bias" in kw:
        kw["bias"] = torch.tensor(kw["bias"], dtype=routing_dtype(dtype))
    if "expert_mask" in kw:
        kw["expert_mask"] = torch.tensor(kw["expert_mask"])
    weights, indices, scores = ops.topk_gating(logits, k, score_func=score_func, **kw)
    assert indices.tolist() == expected, f"{case}: got {indices.tolist()}, want {expected}"
    check_topk_gating(Sample("topk_gating", {"logits": logits, "k": k, "score_func": score_func, **kw}, case))


def test_topk_gating_ties_across_many_tokens():
    # Every token ties everywhere; large T so any parallel/vectorized path is used.
    for E, k in [(64, 8), (8, 2), (33, 5)]:
        logits = torch.zeros((4096, E))
        for score_func in ("softmax", "sigmoid"):
            _, indices, _ = ops.topk_gating(logits, k, score_func=score_func)
            assert (indices == torch.arange(k)).all(), f"E={E} k={k} {score_func}: {indices.unique(dim=0)}"


def test_topk_gating_known_values():
    # Mixtral-style: softmax over all experts, top-2, renormalized.
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]], dtype=torch.float64)
    weights, indices, scores = ops.topk_gating(logits, 2)
    p = torch.softmax(logits, dim=1)
    assert indices.tolist() == [[2, 1]]
    torch.testing.assert_close(scores, p)
    torch.testing.assert_close(weights, p[:, [2, 1]] / p[:, [2, 1]].sum())
    # Qwen3/Switch-style: no renormalization.
    weights, _, _ = ops.topk_gating(logits, 2, normalize=False)
    torch.testing.assert_close(weights, p[:, [2, 1]])
    # DeepSeek-V3-style: sigmoid, bias for selection, normalized, scaled.
    bias = torch.tensor([5.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    weights, indices, _ = ops.topk_gating(logits, 2, score_func="sigmoid", bias=bias, scale=2.5)
    s = torch.sigmoid(logits)
    assert indices.tolist() == [[0, 2]]
    torch.testing.assert_close(weights, 2.5 * s[:, [0, 2]] / s[:, [0, 2]].sum())


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_topk_gating_large_logits_are_stable(dtype, score_func):
    # |logits| up to ~1000 (~60000 in float16 range is avoided): a naive exp overflows.
    g = make_generator("large", dtype, score_func)
    big = 100.0 if dtype != torch.float16 else 20.0
    logits = _rand((64, 16), g, dtype, big)
    weights, indices, scores = check_topk_gating(
        Sample("topk_gating", {"logits": logits, "k": 4, "score_func": score_func}, "large logits")
    )
    assert torch.isfinite(weights).all() and torch.isfinite(scores).all()


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_make_plan_priority_dtypes(dtype):
    # Priority values are exact in every dtype (multiples of 1/4), with many ties.
    sample = make_plan_sample(300, 8, 2, "priority")
    sample.named["priority"] = sample.named["priority"].to(dtype)
    check_make_plan(sample)


@pytest.mark.parametrize("mode", PLAN_MODES)
@pytest.mark.parametrize("T,E,k", SHAPES, ids=SHAPE_IDS)
def test_make_plan_values(T, E, k, mode):
    sample = make_plan_sample(T, E, k, mode)
    plan = check_make_plan(sample)
    if mode in ("capacity", "priority") and T == 300:
        assert (plan.row_of == -1).any(), "sample meant to overflow capacity drops nothing"


def test_make_plan_known_values():
    indices = torch.tensor([[1, 0], [1, 2], [0, 1], [1, 0]])
    plan = ops.make_plan(indices, 3)
    assert plan.counts.tolist() == [3, 4, 1]
    assert plan.offsets.tolist() == [0, 3, 7, 8]
    assert plan.token_of.tolist() == [0, 2, 3, 0, 1, 2, 3, 1]
    assert plan.row_of.tolist() == [[3, 0], [4, 7], [1, 5], [6, 2]]
    # capacity 2: expert 1 has first choices from tokens 0, 1, 3 and a second choice from token 2;
    # tokens 0 and 1 are kept (first choices, token order). Expert 0: second choices of 0, 3 and
    # the first choice of 2 -> keep token 2 (first choice) and token 0.
    plan = ops.make_plan(indices, 3, capacity=2)
    assert plan.counts.tolist() == [3, 4, 1]
    assert plan.offsets.tolist() == [0, 2, 4, 6]
    assert plan.token_of.tolist() == [0, 2, 0, 1, 1, -1]
    assert plan.row_of.tolist() == [[2, 0], [3, 4], [1, -1], [-1, -1]]
    # with priority: higher kept first.
    priority = torch.tensor([[0.1, 0.9], [0.2, 0.5], [0.8, 0.7], [0.3, 0.4]])
    plan = ops.make_plan(indices, 3, capacity=2, priority=priority)
    # expert 0: (0,1) .9, (2,0) .8, (3,1) .4 -> tokens 0, 2; expert 1: (0,0) .1, (1,0) .2, (2,1) .7, (3,0) .3
    # -> tokens 2, 3; expert 2: (1,1) -> token 1.
    assert plan.token_of.tolist() == [0, 2, 2, 3, 1, -1]
    assert plan.row_of.tolist() == [[-1, 0], [-1, 4], [1, 2], [3, -1]]


def test_make_plan_capacity_zero_drops_everything():
    plan = ops.make_plan(torch.tensor([[0, 1], [1, 0]]), 2, capacity=0)
    assert plan.token_of.shape == (0,)
    assert (plan.row_of == -1).all()
    assert plan.offsets.tolist() == [0, 0, 0]
    assert plan.counts.tolist() == [2, 2]


def test_make_plan_repeated_expert_in_a_token():
    # Not produced by topk_gating, but must not be silently wrong: either the reference plan
    # or a clear error naming `indices`.
    indices = torch.tensor([[1, 1], [0, 1], [2, 2]])
    for capacity in (None, 1, 2):
        try:
            plan = ops.make_plan(indices, 3, capacity=capacity)
        except (RuntimeError, ValueError) as error:
            assert re.search(arg_pattern("indices"), str(error)), str(error)
            continue
        for name, got, exp in zip(plan._fields, plan, ref.ref_make_plan(indices, 3, capacity), strict=True):
            assert_equal(got, exp, f"{name} capacity={capacity}")


PERMUTE_MODES = ["dropless", "capacity"]


@pytest.mark.parametrize("mode", PERMUTE_MODES)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("T,E,k", SHAPES, ids=SHAPE_IDS)
def test_dispatch_values(T, E, k, dtype, mode):
    check_dispatch(dispatch_sample(T, E, k, dtype, mode, requires_grad=True))


@pytest.mark.parametrize("mode", PERMUTE_MODES)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("T,E,k", SHAPES, ids=SHAPE_IDS)
def test_grouped_mm_values(T, E, k, dtype, mode):
    check_grouped_mm(grouped_mm_sample(T, E, k, dtype, mode, requires_grad=True))


@pytest.mark.parametrize("mode", PERMUTE_MODES)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("T,E,k", SHAPES, ids=SHAPE_IDS)
def test_grouped_mm_transposed_weight_values(T, E, k, dtype, mode):
    """w as the transpose view of [E, out, in] (transformers' layout): same values, and grad_w in w's layout."""
    sample = grouped_mm_sample(T, E, k, dtype, mode, requires_grad=True, transposed=True)
    check_grouped_mm(sample)
    w = sample.named["w"]
    out = call_op("grouped_mm", sample.named)
    (grad_w,) = torch.autograd.grad(out, [w], torch.ones_like(out))
    assert grad_w.stride() == w.stride(), (grad_w.stride(), w.stride())


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_grouped_mm_experts_without_rows(dtype):
    g = make_generator("gmm-empty", dtype)
    offsets = torch.tensor([0, 0, 5, 5, 5, 9, 9])  # experts 0, 2, 3, 5 get no rows
    x = _rand((9, IN), g, dtype, requires_grad=True)
    w = _rand((6, IN, OUT), g, dtype, requires_grad=True)
    check_grouped_mm(Sample("grouped_mm", {"x_sorted": x, "w": w, "offsets": offsets}, "empty experts"))
    out = ops.grouped_mm(x, w, offsets)
    out.sum().backward()
    for e in (0, 2, 3, 5):
        assert (w.grad[e] == 0).all(), f"expert {e} has no rows but got a gradient"


def _assert_grouped_mm_same_for_1_to_4_threads(x, w, offsets):
    """grouped_mm's output and both gradients have the same bits at 1, 2, 3 and 4 threads."""
    results = {}
    for threads in (1, 2, 3, 4):
        torch.set_num_threads(threads)
        out = ops.grouped_mm(x, w, offsets)
        results[threads] = [out.detach(), *torch.autograd.grad(out, [x, w], torch.ones_like(out))]
    for threads in (2, 3, 4):
        for i, (a, b) in enumerate(zip(results[1], results[threads], strict=True)):
            assert_bitwise_equal(b, a, f"output {i}: {threads} vs 1 threads")


@pytest.mark.parametrize("transposed", [False, True], ids=["w-row-major", "w-transposed"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_grouped_mm_small_and_large_expert_blocks(dtype, transposed, restore_num_threads):
    """CPU grouped_mm computes experts of <= 16 rows with its own streaming kernel (one for each
    weight layout) and larger ones with BLAS: row counts on both sides of that line (0, 1, 15, 16,
    17, 40), more output columns than one pass of the small kernel (600 = 2 x 256 + 88) and more
    than one tile (1100), an input width (52) that is no multiple of the transposed kernel's lanes."""
    g = make_generator("gmm-small-rows", dtype, transposed)
    counts = [1, 0, 15, 16, 17, 40, 3]
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    for width in (600, 1100):
        x = _rand((sum(counts), 52), g, dtype, requires_grad=True)
        w = _weight(len(counts), 52, width, g, dtype, transposed, requires_grad=True)
        named = {"x_sorted": x, "w": w, "offsets": offsets}
        check_grouped_mm(Sample("grouped_mm", named, f"rows {counts} out {width} transposed={transposed}"))
        _assert_grouped_mm_same_for_1_to_4_threads(x, w, offsets)  # on either path


@pytest.mark.parametrize(
    "dtype,transposed,d_in,d_out",
    [
        (torch.float32, False, 96, 2048),  # forward: w's rows 8 KiB apart
        (torch.float64, False, 96, 1024),
        (torch.float32, False, 2112, 2048),  # a depth whose packed tile takes fewer than 1024 columns
        (torch.float32, True, 2048, 96),  # backward grad_x: w[e]^T's rows 8 KiB apart
        (torch.float32, False, 96, 2064),  # not aliased: read in place
    ],
    ids=["f32-out2048", "f64-out1024", "f32-deep", "f32-transposed-in2048", "f32-out2064"],
)
def test_grouped_mm_weights_whose_rows_alias_in_cache(dtype, transposed, d_in, d_out, restore_num_threads):
    """MKL's float GEMM runs 2-3x slower on a right-hand operand whose rows are a multiple of 8 KiB apart,
    so grouped_mm copies such a weight tile into a buffer with another row stride first (gemm_tiles.h). The
    copy must change neither the values (against float64) nor their independence of the thread count, and
    it runs exactly where the stride aliases."""
    g = make_generator("gmm-aliased", dtype, transposed, d_in, d_out)
    counts = [40, 0, 70, 17]
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    x = _rand((sum(counts), d_in), g, dtype, requires_grad=True)
    w = _weight(len(counts), d_in, d_out, g, dtype, transposed, requires_grad=True)
    check_grouped_mm(Sample("grouped_mm", {"x_sorted": x, "w": w, "offsets": offsets}, f"{d_in} -> {d_out}"))
    _assert_grouped_mm_same_for_1_to_4_threads(x, w, offsets)
    with torch.no_grad():
        forward_copies = _aten_copies(lambda: ops.grouped_mm(x, w, offsets), also=["moe_ext::unaliased_rhs"])
        grad_x_copies = _aten_copies(
            lambda: LIB.grouped_mm_backward(torch.ones(sum(counts), d_out, dtype=dtype), x, w, offsets),
            also=["moe_ext::unaliased_rhs"],
        )
    aliased_forward = not transposed and (d_out * x.element_size()) % 8192 == 0
    aliased_grad_x = transposed and (d_in * x.element_size()) % 8192 == 0
    assert bool(forward_copies) == aliased_forward, forward_copies
    assert bool(grad_x_copies) == aliased_grad_x, grad_x_copies


def _aten_copies(fn, also=()) -> list[str]:
    """Names of the ATen copy ops (clone, copy_, contiguous) and of the events named in `also` that `fn()`
    runs, at one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        torch.set_num_threads(threads)
    return [e.name for e in prof.events() if e.name in ("aten::clone", "aten::copy_", "aten::contiguous", *also)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_grouped_mm_transposed_weight_is_not_copied(dtype):
    """The forward and the backward read a transposed w as it is, and its gradient accumulates into
    w.grad without a copy: no ATen copy runs, grad_w has w's strides. A w of another layout is
    copied (what shows the check can fail)."""
    g = make_generator("gmm-no-copy", dtype)
    counts = [3, 40, 0, 20]  # the small-rows kernel and BLAS
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    x = _rand((sum(counts), 32), g, dtype, requires_grad=True)
    w = _weight(len(counts), 32, 24, g, dtype, True, requires_grad=True)
    gout = _rand((sum(counts), 24), g, dtype)
    holder = {}
    assert _aten_copies(lambda: holder.update(out=ops.grouped_mm(x, w, offsets))) == []
    assert _aten_copies(lambda: holder["out"].backward(gout)) == []
    assert w.grad.stride() == w.stride(), (w.grad.stride(), w.stride())
    assert x.grad.is_contiguous()
    # the values: check_grouped_mm's float64 reference on the same sample
    check_grouped_mm(Sample("grouped_mm", {"x_sorted": x, "w": w, "offsets": offsets}, "no-copy sample"))
    # every other element of a wider tensor: no layout the kernels read as it is
    strided = _rand((len(counts), 32, 48), g, dtype)[:, :, ::2]
    assert _aten_copies(lambda: ops.grouped_mm(x.detach(), strided, offsets)) != []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_grouped_mm_transposed_weight_compiles(dtype):
    """torch.compile(fullgraph=True) with a transposed w: the eager values and gradients, grad_w in
    w's layout (the Meta kernel promises the strides the CPU kernel returns)."""
    sample = grouped_mm_sample(300, 8, 2, dtype, requires_grad=True, transposed=True)
    x, w, offsets = (sample.named[n] for n in ("x_sorted", "w", "offsets"))

    def f(x, w_stored):
        return ops.grouped_mm(x, w_stored.transpose(1, 2), offsets)

    w_stored = w.detach().transpose(1, 2).requires_grad_(True)
    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        out = fn(x, w_stored)
        grads = torch.autograd.grad(out, [x, w_stored], torch.ones_like(out))
        assert grads[1].is_contiguous()
        results.append([out.detach(), *grads])
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert_bitwise_equal(b, a, f"compiled vs eager, result {i}")


@pytest.mark.parametrize("mode", PERMUTE_MODES)
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("T,E,k", SHAPES, ids=SHAPE_IDS)
def test_combine_values(T, E, k, dtype, mode):
    check_combine(combine_sample(T, E, k, dtype, mode, requires_grad=True))


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("T,E,k", SHAPES, ids=SHAPE_IDS)
def test_load_balancing_loss_values(T, E, k, dtype):
    check_load_balancing_loss(load_balancing_loss_sample(T, E, k, dtype, requires_grad=True))


def test_load_balancing_loss_known_values():
    # Perfectly balanced router: uniform scores, every expert chosen equally often -> k.
    T, E = 8, 4
    scores = torch.full((T, E), 1.0 / E, dtype=torch.float64)
    indices = torch.tensor([[0, 1], [2, 3]] * 4)
    torch.testing.assert_close(ops.load_balancing_loss(scores, indices, E), torch.tensor(2.0, dtype=torch.float64))
    # All tokens to expert 0 with score 1 -> E.
    scores = torch.zeros((T, E), dtype=torch.float64)
    scores[:, 0] = 1
    indices = torch.zeros((T, 1), dtype=torch.int64)
    torch.testing.assert_close(ops.load_balancing_loss(scores, indices, E), torch.tensor(4.0, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("T,E", [(0, 8), (1, 1), (1, 8), (7, 2), (7, 64), (300, 8), (300, 64)])
def test_router_z_loss_values(T, E, dtype):
    check_router_z_loss(router_z_loss_sample(T, E, dtype, requires_grad=True))


def test_router_z_loss_large_logits_are_stable():
    logits = torch.tensor([[1000.0, 999.0, -1000.0], [-500.0, -501.0, -502.0]])
    expected = ref.ref_router_z_loss(logits)
    assert_close(ops.router_z_loss(logits), expected, torch.float32)


def test_empty_pipeline_runs_end_to_end():
    # T = 0 through every op, forward and backward.
    E, k = 4, 2
    logits = torch.zeros((0, E), requires_grad=True)
    weights, indices, scores = ops.topk_gating(logits, k)
    plan = ops.make_plan(indices, E)
    x = torch.zeros((0, H), requires_grad=True)
    w = torch.randn((E, H, H), requires_grad=True)
    y = ops.combine(ops.grouped_mm(ops.dispatch(x, plan), w, plan.offsets), weights, plan)
    loss = y.sum() + ops.load_balancing_loss(scores, indices, E) + ops.router_z_loss(logits)
    assert y.shape == (0, H)
    assert loss.item() == 0.0
    loss.backward()
    assert logits.grad.shape == (0, E) and x.grad.shape == (0, H)
    assert (w.grad == 0).all()


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("capacity", [None, 3])
def test_pipeline_matches_dense_reference(dtype, capacity):
    # gating -> plan -> dispatch -> grouped_mm -> combine equals the per-token dense computation.
    T, E, k = 37, 8, 2
    g = make_generator("pipeline", dtype, capacity)
    logits = _rand((T, E), g, dtype)
    x = _rand((T, IN), g, dtype)
    w = _rand((E, IN, IN), g, dtype, 1 / math.sqrt(IN))
    weights, indices, _ = ops.topk_gating(logits, k)
    plan = ops.make_plan(indices, E, capacity=capacity)
    y = ops.combine(ops.grouped_mm(ops.dispatch(x, plan), w, plan.offsets), weights, plan)
    row_of, *_ = ref.ref_make_plan(indices, E, capacity)
    expected = torch.zeros((T, IN), dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            if row_of[t, j] >= 0:
                expected[t] += weights[t, j].double() * (x[t].double() @ w[indices[t, j]].double())
    assert_close(y, expected, dtype, "pipeline")


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
def test_topk_gating_minus_inf_logits(dtype, score_func):
    # -inf logits (a common way to mask experts) have a meaningful answer: score 0, last choice.
    logits = torch.tensor([[0.0, -math.inf, 1.0, -math.inf], [-math.inf, 2.0, -math.inf, -math.inf]], dtype=dtype)
    logits.requires_grad_(True)
    weights, indices, scores = check_topk_gating(
        Sample("topk_gating", {"logits": logits, "k": 3, "score_func": score_func}, "-inf logits")
    )
    assert indices.tolist() == [[2, 0, 1], [1, 0, 2]]
    assert torch.isfinite(weights).all()


LARGE_CASES = [
    pytest.param("topk_gating", {"score_func": "sigmoid", "variant": "deepseek"}, id="topk_gating-deepseek"),
    pytest.param("topk_gating", {"variant": "mask"}, id="topk_gating-mask"),
    pytest.param("make_plan", {"mode": "dropless"}, id="make_plan-dropless"),
    pytest.param("make_plan", {"mode": "capacity"}, id="make_plan-capacity"),
    pytest.param("make_plan", {"mode": "priority"}, id="make_plan-priority"),
    pytest.param("dispatch", {"mode": "capacity"}, id="dispatch"),
    pytest.param("combine", {"mode": "capacity"}, id="combine"),
    pytest.param("grouped_mm", {"mode": "dropless"}, id="grouped_mm"),
    pytest.param("load_balancing_loss", {}, id="load_balancing_loss"),
    pytest.param("router_z_loss", {}, id="router_z_loss"),
]


@pytest.mark.parametrize("op,kw", LARGE_CASES)
def test_large_inputs_values(op, kw):
    # Enough tokens for every parallel / chunked code path; values still match the reference.
    dtype = torch.float32
    T, E, k = (2048, 64, 8) if op != "grouped_mm" else (1024, 16, 4)
    check = CHECKERS[op]
    check(sample_for(op, T, E, k, dtype, requires_grad=op != "topk_gating", **kw))


@pytest.mark.parametrize("dtype", DTYPE_PARAMS)
@pytest.mark.parametrize("op", ["dispatch", "combine", "grouped_mm"])
def test_wide_feature_dims(op, dtype):
    # Feature sizes that are not a multiple of any vector width.
    if op == "grouped_mm":
        sample = grouped_mm_sample(37, 8, 2, dtype, "capacity", requires_grad=True, dims=(257, 131))
    else:
        sample = sample_for(op, 37, 8, 2, dtype, requires_grad=True, mode="capacity", hidden=1001)
    CHECKERS[op](sample)


# --------------------------------------------------------------------------------------------
# Raw ops (torch.ops.moe_ext.*) agree with the wrappers
# --------------------------------------------------------------------------------------------

RAW_SAMPLES = [
    ("topk_gating", dict(T=7, E=8, k=2, dtype=torch.float32, score_func="sigmoid", variant="deepseek")),
    ("topk_gating", dict(T=7, E=8, k=2, dtype=torch.bfloat16, variant="mask")),
    ("make_plan", dict(T=7, E=8, k=2, dtype=None, mode="dropless")),
    ("make_plan", dict(T=300, E=8, k=2, dtype=None, mode="priority")),
    ("dispatch", dict(T=7, E=8, k=2, dtype=torch.float16, mode="capacity")),
    ("grouped_mm", dict(T=7, E=8, k=2, dtype=torch.float32)),
    ("combine", dict(T=7, E=8, k=2, dtype=torch.bfloat16, mode="capacity")),
    ("load_balancing_loss", dict(T=7, E=8, k=2, dtype=torch.float32)),
    ("router_z_loss", dict(T=7, E=8, k=2, dtype=torch.float64)),
]


@pytest.mark.parametrize("op,spec", RAW_SAMPLES, ids=[f"{op}-{i}" for i, (op, _) in enumerate(RAW_SAMPLES)])
def test_raw_op_matches_wrapper(op, spec):
    sample = sample_for(op, **spec)
    wrapped = call_op(op, sample.named)
    raw = call_raw(op, sample.named)
    wrapped = list(wrapped) if isinstance(wrapped, tuple) else [wrapped]
    raw = list(raw) if isinstance(raw, (tuple, list)) else [raw]
    assert len(raw) == len(wrapped)
    for a, b in zip(raw, wrapped, strict=True):
        assert_bitwise_equal(a, b, op)
    CHECKERS[op](sample)


# --------------------------------------------------------------------------------------------
# gradcheck (float64)
# --------------------------------------------------------------------------------------------

GRADCHECK_GATING = [
    pytest.param(sf, norm, v, id=f"{sf}-{'norm' if norm else 'raw'}-{v}")
    for sf in ("softmax", "sigmoid")
    for norm in (True, False)
    for v in ("default", "scale", "bias", "mask", "group", "mask_group", "deepseek")
]


@pytest.mark.parametrize("score_func,normalize,variant", GRADCHECK_GATING)
def test_topk_gating_gradcheck(score_func, normalize, variant):
    for T, E, k in [(5, 8, 2), (3, 8, 8)] if variant in ("default", "scale") else [(5, 8, 2)]:
        sample = gating_sample(
            T, E, k, torch.float64, score_func=score_func, variant=variant, requires_grad=True, tie_free=True
        )
        named = {**sample.named, "normalize": normalize}
        logits = named.pop("logits")

        def fn(lg, named=named):
            weights, _, scores = call_op("topk_gating", {"logits": lg, **named})
            return weights, scores

        assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-8, rtol=1e-6)


def _gradcheck_plan(kind):
    """Small reference plans; 'capacity' has dropped assignments and empty padded rows."""
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [0, 3], [2, 0], [1, 2]])
    if kind == "dropless":
        plan = plan_type()(*ref.ref_make_plan(indices, 5))
    else:
        plan = plan_type()(*ref.ref_make_plan(indices, 5, capacity=2))
        assert (plan.row_of == -1).any() and (plan.token_of == -1).any()
    return plan


@pytest.mark.parametrize("kind", ["dropless", "capacity"])
def test_dispatch_gradcheck(kind):
    plan = _gradcheck_plan(kind)
    x = _rand((7, 3), make_generator("gc-dispatch"), torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x_: ops.dispatch(x_, plan), (x,))


@pytest.mark.parametrize("kind", ["dropless", "capacity"])
def test_combine_gradcheck(kind):
    plan = _gradcheck_plan(kind)
    g = make_generator("gc-combine")
    y_sorted = _rand((plan.token_of.shape[0], 3), g, torch.float64, requires_grad=True)
    weights = _rand((7, 2), g, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, w: ops.combine(y, w, plan), (y_sorted, weights))


def test_grouped_mm_gradcheck():
    g = make_generator("gc-gmm")
    offsets = torch.tensor([0, 3, 3, 7, 8])  # expert 1 has zero rows
    x = _rand((8, 3), g, torch.float64, requires_grad=True)
    w = _rand((4, 3, 5), g, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.grouped_mm(a, b, offsets), (x, w))
    # w as the transpose view of [E, out, in]
    w_stored = _rand((4, 5, 3), g, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ops.grouped_mm(a, b.transpose(1, 2), offsets), (x, w_stored))


def test_load_balancing_loss_gradcheck():
    sample = load_balancing_loss_sample(7, 8, 2, torch.float64, requires_grad=True)
    named = sample.named
    assert torch.autograd.gradcheck(
        lambda s: ops.load_balancing_loss(s, named["indices"], named["num_experts"]), (named["scores"],)
    )


def test_router_z_loss_gradcheck():
    sample = router_z_loss_sample(7, 8, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(ops.router_z_loss, (sample.named["logits"],))


# --------------------------------------------------------------------------------------------
# opcheck (schema, autograd registration, fake tensor, AOT dispatch) on every op
# --------------------------------------------------------------------------------------------


def opcheck_samples(op: str) -> list[Sample]:
    if op == "topk_gating":
        return [
            gating_sample(7, 8, 2, torch.float32, requires_grad=True),
            gating_sample(7, 8, 2, torch.float64, score_func="sigmoid", variant="deepseek", requires_grad=True),
            gating_sample(7, 8, 2, torch.bfloat16, variant="mask_group"),
            gating_sample(0, 8, 2, torch.float32, requires_grad=True),
        ]
    if op == "make_plan":
        return [make_plan_sample(7, 8, 2, m) for m in ("dropless", "capacity", "priority")] + [
            make_plan_sample(0, 8, 2, "capacity")
        ]
    if op in ("dispatch", "combine", "grouped_mm"):
        samples = [
            sample_for(op, 7, 8, 2, torch.float32, requires_grad=True),
            sample_for(op, 7, 8, 2, torch.float64, requires_grad=True, mode="capacity"),
            sample_for(op, 7, 8, 2, torch.bfloat16, mode="capacity"),
            sample_for(op, 0, 8, 2, torch.float32, requires_grad=True),
        ]
        if op == "grouped_mm":
            samples += [
                sample_for(op, 7, 8, 2, torch.float32, requires_grad=True, transposed=True),
                sample_for(op, 40, 4, 2, torch.float64, requires_grad=True, mode="capacity", transposed=True),
                sample_for(op, 7, 8, 2, torch.bfloat16, transposed=True),
            ]
        return samples
    if op == "load_balancing_loss":
        return [
            sample_for(op, 7, 8, 2, d, requires_grad=rg)
            for d, rg in ((torch.float32, True), (torch.float64, True), (torch.bfloat16, False))
        ]
    if op == "router_z_loss":
        return [
            sample_for(op, 7, 8, 2, d, requires_grad=rg)
            for d, rg in ((torch.float32, True), (torch.float64, True), (torch.bfloat16, False))
        ]
    raise AssertionError(op)


OPCHECK_CASES = [
    pytest.param(op, i, id=f"{op}-{sample.desc.replace(' ', '-').replace('torch.', '')}")
    for op in OP_NAMES
    for i, sample in enumerate(opcheck_samples(op))
]


@pytest.mark.parametrize("op,index", OPCHECK_CASES)
def test_opcheck(op, index):
    sample = opcheck_samples(op)[index]
    args, kwargs = raw_args(op, sample.named)
    torch.library.opcheck(getattr(LIB, op).default, args, kwargs)


class _RecordMoeCalls(TorchDispatchMode):
    """Records every torch.ops.moe_ext call that reaches the dispatcher below autograd."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "moe_ext":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _detach_tree(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, (list, tuple)):
        return type(v)(_detach_tree(i) for i in v)
    return v


def backward_op_calls(op: str) -> list:
    """Runs forward + backward of each differentiable opcheck sample; returns the recorded
    (overload, args, kwargs) of torch.ops.moe_ext.<op>_backward."""
    recorded = []
    for sample in opcheck_samples(op):
        diff = sample.differentiable_inputs()
        if not diff or any(v.shape[0] == 0 for v in diff.values()):
            continue
        outs = call_op(op, sample.named)
        outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o.requires_grad]
        gouts = [torch.randn_like(o) for o in outs]
        with _RecordMoeCalls() as rec:
            torch.autograd.grad(outs, list(diff.values()), gouts, allow_unused=True)
        for func, args, kwargs in rec.calls:
            if func._schema.name == f"moe_ext::{op}_backward":
                recorded.append((func, _detach_tree(args), _detach_tree(kwargs)))
    return recorded


@pytest.mark.parametrize("op", DIFFERENTIABLE_OPS)
def test_opcheck_backward_op(op):
    if not hasattr(LIB, f"{op}_backward"):
        pytest.skip(f"torch.ops.moe_ext.{op}_backward is not registered")
    calls = backward_op_calls(op)
    assert calls, f"autograd of {op} never called torch.ops.moe_ext.{op}_backward"
    for func, args, kwargs in calls:
        torch.library.opcheck(func, args, kwargs)


# --------------------------------------------------------------------------------------------
# Bad inputs: RuntimeError/ValueError naming the argument
# --------------------------------------------------------------------------------------------


def _gating(**over):
    named = {"logits": torch.randn(4, 8), "k": 2}
    named.update(over)
    return named


def _plan_named(**over):
    named = {"indices": torch.tensor([[0, 1], [2, 3], [1, 0]]), "num_experts": 4}
    named.update(over)
    return named


def _ref_plan(T=3, E=4, k=2, capacity=None):
    indices = torch.stack([torch.arange(k) + t for t in range(T)]) % E if T else torch.zeros((0, k), dtype=torch.int64)
    return plan_type()(*ref.ref_make_plan(indices, E, capacity))


def _bad_plan(**fields):
    return _ref_plan()._replace(**fields)


BAD_INPUTS = [
    # topk_gating
    ("topk_gating", "logits_1d", lambda: _gating(logits=torch.randn(8)), ("logits",)),
    ("topk_gating", "logits_int", lambda: _gating(logits=torch.randint(0, 5, (4, 8))), ("logits",)),
    ("topk_gating", "k_zero", lambda: _gating(k=0), ("k",)),
    ("topk_gating", "k_negative", lambda: _gating(k=-1), ("k",)),
    ("topk_gating", "k_gt_E", lambda: _gating(k=9), ("k",)),
    (
        "topk_gating",
        "logits_nan",
        lambda: _gating(
            logits=torch.randn(4, 8).index_put_((torch.tensor(2), torch.tensor(3)), torch.tensor(float("nan")))
        ),
        ("logits",),
    ),
    ("topk_gating", "bias_shape", lambda: _gating(bias=torch.zeros(9)), ("bias",)),
    ("topk_gating", "bias_2d", lambda: _gating(bias=torch.zeros(1, 8)), ("bias",)),
    ("topk_gating", "n_group_not_dividing", lambda: _gating(n_group=3, topk_group=1), ("n_group",)),
    ("topk_gating", "topk_group_gt_n_group", lambda: _gating(n_group=4, topk_group=5), ("topk_group",)),
    (
        "topk_gating",
        "too_few_group_candidates",
        lambda: _gating(k=3, n_group=4, topk_group=1),
        ("k", "topk_group", "n_group"),
    ),
    (
        "topk_gating",
        "expert_mask_shape",
        lambda: _gating(expert_mask=torch.ones(7, dtype=torch.bool)),
        ("expert_mask",),
    ),
    (
        "topk_gating",
        "too_few_enabled",
        lambda: _gating(k=2, expert_mask=torch.tensor([True] + [False] * 7)),
        ("k", "expert_mask"),
    ),
    ("topk_gating", "score_func", lambda: _gating(score_func="relu"), ("score_func",)),
    # make_plan
    ("make_plan", "indices_1d", lambda: _plan_named(indices=torch.tensor([0, 1, 2])), ("indices",)),
    ("make_plan", "indices_float", lambda: _plan_named(indices=torch.zeros(3, 2)), ("indices",)),
    (
        "make_plan",
        "index_negative",
        lambda: _plan_named(indices=torch.tensor([[0, 1], [-1, 3], [1, 0]])),
        ("indices",),
    ),
    (
        "make_plan",
        "index_eq_E",
        lambda: _plan_named(indices=torch.tensor([[0, 1], [4, 3], [1, 0]])),
        ("indices",),
    ),
    (
        "make_plan",
        "index_gt_E",
        lambda: _plan_named(indices=torch.tensor([[0, 1], [2, 3], [1, 1000]])),
        ("indices",),
    ),
    ("make_plan", "num_experts_zero", lambda: _plan_named(num_experts=0), ("num_experts",)),
    ("make_plan", "num_experts_negative", lambda: _plan_named(num_experts=-2), ("num_experts",)),
    ("make_plan", "capacity_negative", lambda: _plan_named(capacity=-1), ("capacity",)),
    (
        "make_plan",
        "priority_shape",
        lambda: _plan_named(capacity=1, priority=torch.zeros(3, 3)),
        ("priority",),
    ),
    # dispatch
    ("dispatch", "x_1d", lambda: {"x": torch.randn(3), "plan": _ref_plan()}, ("x",)),
    (
        "dispatch",
        "x_rows",
        lambda: {"x": torch.randn(5, 4), "plan": _ref_plan()},
        ("x", "plan", "token_of", "row_of"),
    ),
    (
        "dispatch",
        "token_of_range",
        lambda: {"x": torch.randn(3, 4), "plan": _bad_plan(token_of=torch.tensor([0, 1, 2, 3, 0, 1]))},
        ("token_of", "plan", "x"),
    ),
    (
        "dispatch",
        "token_of_float",
        lambda: {"x": torch.randn(3, 4), "plan": _bad_plan(token_of=_ref_plan().token_of.float())},
        ("token_of", "plan"),
    ),
    # grouped_mm
    (
        "grouped_mm",
        "x_1d",
        lambda: {
            "x_sorted": torch.randn(6),
            "w": torch.randn(4, 6, 5),
            "offsets": torch.tensor([0, 1, 2, 3, 6]),
        },
        ("x", "x_sorted"),
    ),
    (
        "grouped_mm",
        "w_2d",
        lambda: {
            "x_sorted": torch.randn(6, 3),
            "w": torch.randn(3, 5),
            "offsets": torch.tensor([0, 1, 2, 3, 6]),
        },
        ("w",),
    ),
    (
        "grouped_mm",
        "mismatched_in",
        lambda: {
            "x_sorted": torch.randn(6, 3),
            "w": torch.randn(4, 4, 5),
            "offsets": torch.tensor([0, 1, 2, 3, 6]),
        },
        ("x", "x_sorted", "w"),
    ),
    (
        "grouped_mm",
        "w_experts",
        lambda: {
            "x_sorted": torch.randn(6, 3),
            "w": torch.randn(5, 3, 5),
            "offsets": torch.tensor([0, 1, 2, 3, 6]),
        },
        ("w", "offsets"),
    ),
    (
        "grouped_mm",
        "offsets_end",
        lambda: {
            "x_sorted": torch.randn(6, 3),
            "w": torch.randn(4, 3, 5),
            "offsets": torch.tensor([0, 1, 2, 3, 7]),
        },
        ("offsets",),
    ),
    (
        "grouped_mm",
        "offsets_decreasing",
        lambda: {
            "x_sorted": torch.randn(6, 3),
            "w": torch.randn(4, 3, 5),
            "offsets": torch.tensor([0, 3, 2, 4, 6]),
        },
        ("offsets",),
    ),
    (
        "grouped_mm",
        "offsets_float",
        lambda: {
            "x_sorted": torch.randn(6, 3),
            "w": torch.randn(4, 3, 5),
            "offsets": torch.tensor([0.0, 1, 2, 3, 6]),
        },
        ("offsets",),
    ),
    (
        "grouped_mm",
        "dtype_mismatch",
        lambda: {
            "x_sorted": torch.randn(6, 3),
            "w": torch.randn(4, 3, 5, dtype=torch.float64),
            "offsets": torch.tensor([0, 1, 2, 3, 6]),
        },
        ("x", "x_sorted", "w"),
    ),
    # combine
    (
        "combine",
        "y_sorted_1d",
        lambda: {"y_sorted": torch.randn(6), "weights": torch.rand(3, 2), "plan": _ref_plan()},
        ("y_sorted",),
    ),
    (
        "combine",
        "weights_shape",
        lambda: {"y_sorted": torch.randn(6, 4), "weights": torch.rand(3, 3), "plan": _ref_plan()},
        ("weights", "plan", "row_of"),
    ),
    (
        "combine",
        "weights_tokens",
        lambda: {"y_sorted": torch.randn(6, 4), "weights": torch.rand(4, 2), "plan": _ref_plan()},
        ("weights", "plan", "row_of"),
    ),
    (
        "combine",
        "weights_1d",
        lambda: {"y_sorted": torch.randn(6, 4), "weights": torch.rand(6), "plan": _ref_plan()},
        ("weights",),
    ),
    (
        "combine",
        "y_sorted_rows",
        lambda: {"y_sorted": torch.randn(5, 4), "weights": torch.rand(3, 2), "plan": _ref_plan()},
        ("y_sorted", "plan", "token_of"),
    ),
    (
        "combine",
        "row_of_range",
        lambda: {
            "y_sorted": torch.randn(6, 4),
            "weights": torch.rand(3, 2),
            "plan": _bad_plan(row_of=torch.tensor([[0, 1], [2, 6], [4, 5]])),
        },
        ("row_of", "plan"),
    ),
    # load_balancing_loss
    (
        "load_balancing_loss",
        "scores_1d",
        lambda: {"scores": torch.rand(8), "indices": torch.zeros(8, 1, dtype=torch.int64), "num_experts": 8},
        ("scores",),
    ),
    (
        "load_balancing_loss",
        "scores_int",
        lambda: {
            "scores": torch.ones(3, 4, dtype=torch.int64),
            "indices": torch.zeros(3, 1, dtype=torch.int64),
            "num_experts": 4,
        },
        ("scores",),
    ),
    (
        "load_balancing_loss",
        "index_negative",
        lambda: {"scores": torch.rand(3, 4), "indices": torch.tensor([[0], [-1], [2]]), "num_experts": 4},
        ("indices",),
    ),
    (
        "load_balancing_loss",
        "index_eq_E",
        lambda: {"scores": torch.rand(3, 4), "indices": torch.tensor([[0], [4], [2]]), "num_experts": 4},
        ("indices",),
    ),
    (
        "load_balancing_loss",
        "scores_experts",
        lambda: {"scores": torch.rand(3, 5), "indices": torch.tensor([[0], [1], [2]]), "num_experts": 4},
        ("scores", "num_experts"),
    ),
    (
        "load_balancing_loss",
        "indices_tokens",
        lambda: {"scores": torch.rand(3, 4), "indices": torch.tensor([[0], [1]]), "num_experts": 4},
        ("indices", "scores"),
    ),
    (
        "load_balancing_loss",
        "indices_float",
        lambda: {"scores": torch.rand(3, 4), "indices": torch.zeros(3, 1), "num_experts": 4},
        ("indices",),
    ),
    # router_z_loss
    ("router_z_loss", "logits_1d", lambda: {"logits": torch.randn(8)}, ("logits",)),
    ("router_z_loss", "logits_int", lambda: {"logits": torch.ones(3, 4, dtype=torch.int64)}, ("logits",)),
]


@pytest.mark.parametrize("via", ["wrapper", "raw"])
@pytest.mark.parametrize("op,case,build,names", BAD_INPUTS, ids=[f"{c[0]}-{c[1]}" for c in BAD_INPUTS])
def test_bad_input_raises_naming_argument(op, case, build, names, via):
    named = build()
    call = call_op if via == "wrapper" else call_raw
    with pytest.raises((RuntimeError, ValueError), match=arg_pattern(*names)):
        call(op, named)


# --------------------------------------------------------------------------------------------
# Non-contiguous inputs
# --------------------------------------------------------------------------------------------


def _noncontig(t: torch.Tensor, how: str) -> torch.Tensor:
    """Same values as `t`, non-contiguous layout. 'expanded' repeats row 0 (stride 0)."""
    if how == "transposed":
        if t.dim() < 2:
            return torch.stack([t, t], dim=-1)[..., 0]
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "sliced":
        return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    if how == "expanded":
        return t[:1].expand(t.shape) if t.dim() >= 1 and t.shape[0] > 0 else t
    raise AssertionError(how)


NONCONTIG_SAMPLES = {
    "topk_gating": lambda: gating_sample(37, 8, 2, torch.float32, score_func="sigmoid", variant="deepseek"),
    "topk_gating_mask": lambda: gating_sample(37, 8, 2, torch.bfloat16, variant="mask"),
    "make_plan": lambda: make_plan_sample(37, 8, 2, "priority"),
    "make_plan_dropless": lambda: make_plan_sample(37, 8, 2, "dropless"),
    "dispatch": lambda: dispatch_sample(37, 8, 2, torch.float32, "capacity"),
    "grouped_mm": lambda: grouped_mm_sample(37, 8, 2, torch.float32),
    "combine": lambda: combine_sample(37, 8, 2, torch.bfloat16, "capacity"),
    "load_balancing_loss": lambda: load_balancing_loss_sample(37, 8, 2, torch.float32),
    "router_z_loss": lambda: router_z_loss_sample(37, 8, torch.float32),
}


def _noncontig_named(named: dict, how: str) -> dict:
    out = {}
    for n, v in named.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1:
            # expanded 1-D tensors (bias, mask, offsets) would change values: slice them instead.
            out[n] = _noncontig(v, how if (how != "expanded" or (v.dim() >= 2 and n != "offsets")) else "sliced")
        elif isinstance(v, tuple) and hasattr(v, "_fields"):
            out[n] = type(v)(*[_noncontig(f, "sliced" if how == "expanded" else how) for f in v])
        else:
            out[n] = v
    return out


@pytest.mark.parametrize("how", ["transposed", "sliced", "expanded"])
@pytest.mark.parametrize("name", list(NONCONTIG_SAMPLES))
def test_noncontiguous_inputs(name, how):
    sample = NONCONTIG_SAMPLES[name]()
    op = sample.op
    named = _noncontig_named(sample.named, how)
    tensors = [v for v in named.values() if isinstance(v, torch.Tensor) and v.dim() >= 1]
    assert any(not t.is_contiguous() for t in tensors), "sample is not non-contiguous"
    contiguous = {
        n: (
            v.contiguous()
            if isinstance(v, torch.Tensor)
            else type(v)(*[f.contiguous() for f in v])
            if isinstance(v, tuple) and hasattr(v, "_fields")
            else v
        )
        for n, v in named.items()
    }
    got = call_op(op, named)
    want = call_op(op, contiguous)
    got = list(got) if isinstance(got, tuple) else [got]
    want = list(want) if isinstance(want, tuple) else [want]
    for a, b in zip(got, want, strict=True):
        if a.is_floating_point():
            assert_close(a, b.double(), a.dtype if a.dtype != torch.float64 else torch.float32, f"{name} {how}")
        else:
            assert_equal(a, b, f"{name} {how}")
    # ... and both agree with the reference.
    CHECKERS[op](Sample(op, named, f"{name} {how}"))


# --------------------------------------------------------------------------------------------
# Determinism: same bits on repeated runs and across thread counts
# --------------------------------------------------------------------------------------------


def _run_with_grads(sample: Sample):
    """Forward outputs and gradients of all differentiable inputs, detached."""
    named = {
        n: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v)
        for n, v in sample.named.items()
    }
    outs = call_op(sample.op, named)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    diff = [v for v in named.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    results = [o.detach() for o in outs]
    if diff:
        float_outs = [o for o in outs if o.requires_grad]
        gouts = [
            torch.randn(o.shape, generator=make_generator("det", i), dtype=torch.float64).to(o.dtype)
            for i, o in enumerate(float_outs)
        ]
        results += list(torch.autograd.grad(float_outs, diff, gouts, allow_unused=True))
    return [r for r in results if r is not None]


DETERMINISM_SAMPLES = {
    "topk_gating": lambda d: gating_sample(4096, 64, 8, d, requires_grad=True),
    "topk_gating_deepseek": lambda d: gating_sample(
        4096, 64, 8, d, score_func="sigmoid", variant="deepseek", requires_grad=True
    ),
    "make_plan": lambda d: make_plan_sample(4096, 64, 8, "dropless"),
    "make_plan_priority": lambda d: make_plan_sample(4096, 64, 8, "priority"),
    "make_plan_capacity": lambda d: make_plan_sample(4096, 64, 8, "capacity"),
    "dispatch": lambda d: dispatch_sample(4096, 64, 8, d, "dropless", requires_grad=True),
    "grouped_mm": lambda d: grouped_mm_sample(2048, 16, 4, d, "dropless", requires_grad=True),
    "grouped_mm_transposed_w": lambda d: grouped_mm_sample(
        2048, 16, 4, d, "dropless", requires_grad=True, dims=(96, 80), transposed=True
    ),
    # about 4 rows an expert: the small-rows kernel for the transposed layout
    "grouped_mm_transposed_w_decode": lambda d: grouped_mm_sample(
        32, 16, 2, d, "dropless", requires_grad=True, dims=(200, 300), transposed=True
    ),
    # one expert, 4096 rows, 8 x 4 weights: below the parallel-region threshold, a long reduction in grad_w
    "grouped_mm_long_reduction": lambda d: grouped_mm_sample(
        4096, 1, 1, d, "dropless", requires_grad=True, dims=(8, 4)
    ),
    "combine": lambda d: combine_sample(4096, 64, 8, d, "capacity", requires_grad=True),
    "load_balancing_loss": lambda d: load_balancing_loss_sample(4096, 64, 8, d, requires_grad=True),
    "router_z_loss": lambda d: router_z_loss_sample(4096, 64, d, requires_grad=True),
}


DETERMINISM_CASES = [
    pytest.param(name, dtype, id=f"{name}-{DTYPE_IDS[dtype]}")
    for name in DETERMINISM_SAMPLES
    for dtype in ((torch.float32,) if name.startswith("make_plan") else (torch.float32, torch.bfloat16))
]


@pytest.mark.parametrize("name,dtype", DETERMINISM_CASES)
def test_deterministic_across_runs_and_threads(name, dtype, restore_num_threads):
    sample = DETERMINISM_SAMPLES[name](dtype)
    torch.set_num_threads(1)
    single = _run_with_grads(sample)

    def assert_same(other, how):
        assert len(other) == len(single)
        for i, (a, b) in enumerate(zip(single, other, strict=True)):
            assert_bitwise_equal(b, a, f"{name} output {i}: {how}")

    assert_same(_run_with_grads(sample), "two runs at 1 thread")
    # 3 and 4 threads oversubscribe a 2-core machine: still thread counts a user may set
    for threads in (2, 3, 4):
        torch.set_num_threads(threads)
        assert_same(_run_with_grads(sample), f"{threads} threads vs 1 thread")
