"""Bad and edge-case inputs of every moe_ext op: a clear error naming the argument, or a defined result.

Every case is one row of docs/bad-inputs.md. The cases of tests/test_ops.py's BAD_INPUTS table
(checked there through the wrapper and the raw op) are described here too, so the document lists
every case tried; test_doc_is_current fails when the document and the cases (or the messages the
ops give) drift apart. Regenerate the document with

    PYTHONPATH=. python tests/test_bad_inputs.py
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import assert_bitwise_equal
from test_ops import BAD_INPUTS, arg_pattern, call_op

import moe_ext
from moe_ext import ops

DOC = Path(__file__).resolve().parent.parent / "docs" / "bad-inputs.md"
INF, NAN = math.inf, math.nan


@dataclass(frozen=True)
class Case:
    """One bad or edge-case input.

    An error case sets `error` (the exact exception type) and `names` (the message must name one
    of them as a whole word: the argument at fault). A defined-behaviour case sets `expect`, which
    asserts on the result, and `behaviour`, the table's description of that result.
    """

    op: str
    name: str
    given: str
    run: Callable[[], object]
    error: type[Exception] | None = None
    names: tuple[str, ...] = ()
    expect: Callable[[object], None] | None = None
    behaviour: str = ""


# --- inputs ----------------------------------------------------------------------------------

INDICES = torch.tensor([[0, 1], [2, 3], [1, 0]])  # T = 3, k = 2, E = 4


def logits(T: int = 4, E: int = 8) -> torch.Tensor:
    return torch.linspace(-2, 2, T * E).reshape(T, E)


def plan(capacity: int | None = None) -> ops.RoutingPlan:
    """Dropless: row_of [[0, 2], [4, 5], [1, 3]], token_of [0, 2, 0, 2, 1, 1]. capacity=2: N = 8,
    rows 5 and 7 empty."""
    return ops.make_plan(INDICES, 4, capacity)


def edited(p: ops.RoutingPlan, field: str, position, value: int) -> ops.RoutingPlan:
    t = getattr(p, field).clone()
    t[position] = value
    return p._replace(**{field: t})


def on_meta(p: ops.RoutingPlan) -> ops.RoutingPlan:
    return ops.RoutingPlan(*[t.to("meta") for t in p])


def x3(H: int = 5) -> torch.Tensor:
    return torch.arange(3.0 * H).reshape(3, H)


def w4(n_in: int = 5, n_out: int = 3) -> torch.Tensor:
    return torch.ones(4, n_in, n_out)


def second_order(fn, *inputs) -> None:
    """Gradient with create_graph=True of a loss that is nonlinear in the op's outputs."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    torch.autograd.grad((out.double() ** 2).sum(), leaves, create_graph=True)


def layer() -> moe_ext.MoE:
    torch.manual_seed(0)
    return moe_ext.MoE(8, 16, 4, top_k=2)


# --- expectations of defined behaviour ---------------------------------------------------------


def same_as_contiguous(fn, *inputs):
    """The result with these (non-contiguous / expanded) inputs equals the result with copies."""

    def expect(result):
        want = fn(*[t.contiguous() for t in inputs])
        got, want = (list(r) if isinstance(r, tuple) else [r] for r in (result, want))
        for a, b in zip(got, want, strict=True):
            assert_bitwise_equal(a, b, "non-contiguous vs contiguous")

    return expect


def equals(*expected):
    def expect(result):
        got = list(result) if isinstance(result, tuple) else [result]
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            if b is None:
                continue
            b = torch.as_tensor(b, dtype=a.dtype)
            assert a.shape == b.shape and torch.equal(a, b), f"{a} != {b}"

    return expect


def all_nan(result):
    assert torch.isnan(result).all(), result


def shapes(*expected):
    def expect(result):
        got = list(result) if isinstance(result, tuple) else [result]
        assert [tuple(t.shape) for t in got] == [tuple(s) for s in expected], [t.shape for t in got]

    return expect


def gating_defined(indices, weights):
    def expect(result):
        w, i, _ = result
        assert i.tolist() == indices, i.tolist()
        torch.testing.assert_close(w, torch.tensor(weights, dtype=w.dtype), atol=1e-6, rtol=1e-6)

    return expect


# --- the cases -------------------------------------------------------------------------------

EXPANDED_LOGITS = torch.tensor([0.5, -1.0, 2.0, 0.0]).expand(6, 4)
TRANSPOSED_X = torch.arange(15.0).reshape(5, 3).t()
EXPANDED_X = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]).expand(3, 5)
SLICED_WEIGHTS = torch.rand(3, 4, generator=torch.Generator().manual_seed(0))[:, ::2]
EXPANDED_W = torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(1)).expand(4, 5, 3)
EXPANDED_SCORES = torch.tensor([0.1, 0.2, 0.3, 0.4]).expand(3, 4)
EXPANDED_INDICES = torch.tensor([0, 1]).expand(3, 2)

# fmt: off
CASES = [
    # --- topk_gating -------------------------------------------------------------------------
    Case("topk_gating", "E_zero", "logits [4, 0] (E = 0)", lambda: ops.topk_gating(torch.zeros(4, 0), 1),
         RuntimeError, ("logits",)),
    Case("topk_gating", "T0_E0", "logits [0, 0]", lambda: ops.topk_gating(torch.zeros(0, 0), 1),
         RuntimeError, ("logits",)),
    Case("topk_gating", "k_float", "k = 1.5", lambda: ops.topk_gating(logits(), 1.5), RuntimeError, ("k",)),
    Case("topk_gating", "logits_none", "logits = None", lambda: ops.topk_gating(None, 1), TypeError, ("logits",)),
    Case("topk_gating", "logits_numpy", "logits a numpy array", lambda: ops.topk_gating(logits().numpy(), 1),
         TypeError, ("logits",)),
    Case("topk_gating", "logits_complex", "logits complex64",
         lambda: ops.topk_gating(logits().to(torch.complex64), 1), RuntimeError, ("logits",)),
    Case("topk_gating", "bias_meta", "bias on meta, logits on cpu",
         lambda: ops.topk_gating(logits(), 2, bias=torch.zeros(8, device="meta")), RuntimeError, ("bias",)),
    Case("topk_gating", "logits_meta", "logits on meta, bias on cpu",
         lambda: ops.topk_gating(logits().to("meta"), 2, bias=torch.zeros(8)), RuntimeError, ("bias", "logits")),
    Case("topk_gating", "mask_meta", "expert_mask on meta, logits on cpu",
         lambda: ops.topk_gating(logits(), 2, expert_mask=torch.ones(8, dtype=torch.bool, device="meta")),
         RuntimeError, ("expert_mask",)),
    Case("topk_gating", "bias_int", "bias int64",
         lambda: ops.topk_gating(logits(), 2, bias=torch.zeros(8, dtype=torch.int64)), RuntimeError, ("bias",)),
    Case("topk_gating", "bias_nan", "bias holds NaN",
         lambda: ops.topk_gating(logits(), 2, bias=torch.full((8,), NAN)), RuntimeError, ("bias",)),
    Case("topk_gating", "bias_inf", "bias holds +inf",
         lambda: ops.topk_gating(logits(), 2, bias=torch.tensor([INF] + [0.0] * 7)), RuntimeError, ("bias",)),
    Case("topk_gating", "scale_nan", "scale = NaN", lambda: ops.topk_gating(logits(), 2, scale=NAN),
         RuntimeError, ("scale",)),
    Case("topk_gating", "scale_inf", "scale = inf", lambda: ops.topk_gating(logits(), 2, scale=INF),
         RuntimeError, ("scale",)),
    Case("topk_gating", "mask_int", "expert_mask int64",
         lambda: ops.topk_gating(logits(), 2, expert_mask=torch.ones(8, dtype=torch.int64)),
         RuntimeError, ("expert_mask",)),
    Case("topk_gating", "mask_rows", "expert_mask [2, 8] for logits [4, 8]",
         lambda: ops.topk_gating(logits(), 2, expert_mask=torch.ones(2, 8, dtype=torch.bool)),
         RuntimeError, ("expert_mask",)),
    Case("topk_gating", "token_mask_too_few", "per-token expert_mask [4, 8] enabling 1 expert for token 0, k = 2",
         lambda: ops.topk_gating(logits(), 2, expert_mask=torch.eye(4, 8, dtype=torch.bool)),
         RuntimeError, ("expert_mask",)),
    Case("topk_gating", "n_group_zero", "n_group = 0", lambda: ops.topk_gating(logits(), 2, n_group=0),
         RuntimeError, ("n_group",)),
    Case("topk_gating", "topk_group_zero", "n_group = 4, topk_group = 0",
         lambda: ops.topk_gating(logits(), 2, n_group=4, topk_group=0), RuntimeError, ("topk_group",)),
    Case("topk_gating", "softmax_pos_inf", "softmax, a +inf logit",
         lambda: ops.topk_gating(torch.tensor([[0.0, INF, 1.0]]), 1), RuntimeError, ("logits",)),
    Case("topk_gating", "softmax_all_neg_inf", "softmax, every logit of a token -inf",
         lambda: ops.topk_gating(torch.tensor([[0.0, 1.0, 2.0], [-INF, -INF, -INF]]), 1), RuntimeError, ("logits",)),
    Case("topk_gating", "sigmoid_nan", "sigmoid, a NaN logit",
         lambda: ops.topk_gating(torch.tensor([[0.0, NAN, 1.0]]), 1, "sigmoid"), RuntimeError, ("logits",)),
    Case("topk_gating", "bf16_nan", "bfloat16 logits, NaN in token 2",
         lambda: ops.topk_gating(logits().to(torch.bfloat16).index_put_((torch.tensor(2), torch.tensor(5)),
                                                                         torch.tensor(NAN, dtype=torch.bfloat16)), 2),
         RuntimeError, ("logits",)),
    Case("topk_gating", "softmax_neg_inf_some", "softmax, -inf logits beside finite ones (masking by -inf), k = 2",
         lambda: ops.topk_gating(torch.tensor([[-INF, 0.0, -INF]]), 2),
         expect=gating_defined([[1, 0]], [[1.0, 0.0]]),
         behaviour="defined: a -inf expert scores 0 and ranks after every finite one (ties to the lower index)"),
    Case("topk_gating", "sigmoid_pos_inf", "sigmoid, +inf logits",
         lambda: ops.topk_gating(torch.tensor([[INF, 0.0, INF]]), 2, "sigmoid"),
         expect=gating_defined([[0, 2]], [[0.5, 0.5]]),
         behaviour="defined: sigmoid(+inf) = 1, the token's top scores; weights renormalized"),
    Case("topk_gating", "sigmoid_all_neg_inf", "sigmoid, every logit -inf",
         lambda: ops.topk_gating(torch.tensor([[-INF, -INF]]), 1, "sigmoid"),
         expect=gating_defined([[0]], [[0.0]]),
         behaviour="defined: all scores 0, expert 0 (lowest index), weight 0 (no NaN: the renormalization has eps)"),
    Case("topk_gating", "T_zero", "logits [0, 8]", lambda: ops.topk_gating(torch.zeros(0, 8), 2),
         expect=shapes((0, 2), (0, 2), (0, 8)),
         behaviour="defined: empty weights [0, k], indices [0, k], scores [0, E]"),
    Case("topk_gating", "k_equals_E", "k = E = 8", lambda: ops.topk_gating(logits(), 8),
         expect=lambda r: [sorted(row) == list(range(8)) for row in r[1].tolist()] == [True] * 4,
         behaviour="defined: every expert, in descending score order"),
    Case("topk_gating", "logits_expanded", "logits [6, 4] expanded from one row (stride 0)",
         lambda: ops.topk_gating(EXPANDED_LOGITS, 2),
         expect=same_as_contiguous(lambda t: ops.topk_gating(t, 2), EXPANDED_LOGITS),
         behaviour="defined: the same bits as the contiguous copy"),
    # --- make_plan ---------------------------------------------------------------------------
    Case("make_plan", "indices_none", "indices = None", lambda: ops.make_plan(None, 4), TypeError, ("indices",)),
    Case("make_plan", "indices_int32", "indices int32", lambda: ops.make_plan(INDICES.int(), 4),
         RuntimeError, ("indices",)),
    Case("make_plan", "capacity_float", "capacity = 1.5", lambda: ops.make_plan(INDICES, 4, capacity=1.5),
         RuntimeError, ("capacity",)),
    Case("make_plan", "capacity_overflow", "capacity = 2**62 with E = 4 (E * capacity overflows int64)",
         lambda: ops.make_plan(INDICES, 4, capacity=2**62), RuntimeError, ("capacity",)),
    Case("make_plan", "priority_meta", "priority on meta, indices on cpu",
         lambda: ops.make_plan(INDICES, 4, 1, torch.zeros(3, 2, device="meta")), RuntimeError, ("priority",)),
    Case("make_plan", "priority_int", "priority int64",
         lambda: ops.make_plan(INDICES, 4, 1, torch.zeros(3, 2, dtype=torch.int64)), RuntimeError, ("priority",)),
    Case("make_plan", "priority_nan", "priority holds NaN",
         lambda: ops.make_plan(INDICES, 4, 1, torch.tensor([[NAN, 0.0], [0.0, 0.0], [0.0, 0.0]])),
         RuntimeError, ("priority",)),
    Case("make_plan", "priority_dropless", "priority without capacity",
         lambda: ops.make_plan(INDICES, 4, None, torch.zeros(3, 2)), RuntimeError, ("priority",)),
    Case("make_plan", "index_in_capacity_mode", "capacity = 2, an index = 4 = E",
         lambda: ops.make_plan(torch.tensor([[0, 1], [4, 3], [1, 0]]), 4, 2), RuntimeError, ("indices",)),
    Case("make_plan", "capacity_zero", "capacity = 0", lambda: ops.make_plan(INDICES, 4, 0),
         expect=equals(torch.full((3, 2), -1), torch.zeros(0), [2, 2, 1, 1], [0, 0, 0, 0, 0]),
         behaviour="defined: N = 0 rows, every assignment dropped (row_of = -1), counts still counted"),
    Case("make_plan", "k_zero", "indices [3, 0] (k = 0)", lambda: ops.make_plan(torch.zeros(3, 0, dtype=torch.long), 4),
         expect=equals(torch.zeros(3, 0), torch.zeros(0), [0, 0, 0, 0], [0, 0, 0, 0, 0]),
         behaviour="defined: an empty plan (N = 0)"),
    Case("make_plan", "T_zero", "indices [0, 2], capacity = 2",
         lambda: ops.make_plan(torch.zeros(0, 2, dtype=torch.long), 4, 2),
         expect=equals(torch.zeros(0, 2), torch.full((8,), -1), [0, 0, 0, 0], [0, 2, 4, 6, 8]),
         behaviour="defined: E * C empty rows (token_of = -1)"),
    Case("make_plan", "repeated_expert", "the same expert twice in a token",
         lambda: ops.make_plan(torch.tensor([[1, 1]]), 2),
         expect=equals([[0, 1]], [0, 0], [0, 2], [0, 0, 2]),
         behaviour="defined: two rows of expert 1 for the token (both choices kept)"),
    Case("make_plan", "priority_neg_inf", "capacity = 2, priority -inf for (0, 0)",
         lambda: ops.make_plan(INDICES, 4, 2, torch.tensor([[-INF, 0.0], [0.0, 0.0], [0.0, 0.0]])),
         expect=lambda p: p.row_of[0, 0].item() == -1 and (p.row_of[1:] >= 0).all().item(),
         behaviour="defined: an assignment of priority -inf is always dropped, even with room"),
    Case("make_plan", "indices_expanded", "indices [3, 2] expanded from one row (stride 0)",
         lambda: ops.make_plan(EXPANDED_INDICES, 4, 2),
         expect=same_as_contiguous(lambda t: ops.make_plan(t, 4, 2), EXPANDED_INDICES),
         behaviour="defined: the same plan as the contiguous copy"),
    # --- expert_choice_plan ------------------------------------------------------------------
    Case("expert_choice_plan", "scores_none", "scores = None", lambda: ops.expert_choice_plan(None, 1),
         TypeError, ("scores",)),
    Case("expert_choice_plan", "scores_1d", "scores [3]", lambda: ops.expert_choice_plan(torch.rand(3), 1),
         RuntimeError, ("scores",)),
    Case("expert_choice_plan", "scores_int", "scores int64",
         lambda: ops.expert_choice_plan(torch.ones(3, 4, dtype=torch.int64), 1), RuntimeError, ("scores",)),
    Case("expert_choice_plan", "E_zero", "scores [3, 0]", lambda: ops.expert_choice_plan(torch.rand(3, 0), 1),
         RuntimeError, ("scores",)),
    Case("expert_choice_plan", "capacity_negative", "capacity = -1",
         lambda: ops.expert_choice_plan(torch.rand(3, 4), -1), RuntimeError, ("capacity",)),
    Case("expert_choice_plan", "capacity_overflow", "capacity = 2**62 with E = 4",
         lambda: ops.expert_choice_plan(torch.rand(3, 4), 2**62), RuntimeError, ("capacity",)),
    Case("expert_choice_plan", "scores_nan", "scores holds NaN",
         lambda: ops.expert_choice_plan(torch.tensor([[NAN, 1.0]]), 1), RuntimeError, ("scores",)),
    Case("expert_choice_plan", "capacity_gt_T", "capacity = 5 > T = 3",
         lambda: ops.expert_choice_plan(torch.rand(3, 2, generator=torch.Generator().manual_seed(0)), 5),
         expect=lambda p: p.counts.tolist() == [3, 3] and p.token_of.tolist() == [0, 1, 2, -1, -1] * 2,
         behaviour="defined: every expert takes all T tokens; the other rows stay empty"),
    # --- dispatch ----------------------------------------------------------------------------
    Case("dispatch", "x_none", "x = None", lambda: ops.dispatch(None, plan()), TypeError, ("x",)),
    Case("dispatch", "plan_tuple", "plan a plain tuple (the raw op's output)",
         lambda: ops.dispatch(x3(), tuple(plan())), TypeError, ("plan",)),
    Case("dispatch", "x_complex", "x complex64", lambda: ops.dispatch(x3().to(torch.complex64), plan()),
         RuntimeError, ("x",)),
    Case("dispatch", "x_meta", "x on meta, plan on cpu", lambda: ops.dispatch(x3().to("meta"), plan()),
         RuntimeError, ("x",)),
    Case("dispatch", "plan_meta", "plan on meta, x on cpu", lambda: ops.dispatch(x3(), on_meta(plan())),
         RuntimeError, ("token_of", "row_of")),
    Case("dispatch", "token_of_int32", "plan.token_of int32",
         lambda: ops.dispatch(x3(), plan()._replace(token_of=plan().token_of.int())), RuntimeError, ("token_of",)),
    Case("dispatch", "token_of_2d", "plan.token_of [1, N]",
         lambda: ops.dispatch(x3(), plan()._replace(token_of=plan().token_of[None])), RuntimeError, ("token_of",)),
    Case("dispatch", "row_of_3d", "plan.row_of [3, 2, 1]",
         lambda: ops.dispatch(x3(), plan()._replace(row_of=plan().row_of[..., None])), RuntimeError, ("row_of",)),
    Case("dispatch", "row_of_below_minus_one", "plan.row_of[0, 0] = -2",
         lambda: ops.dispatch(x3(), edited(plan(), "row_of", (0, 0), -2)), RuntimeError, ("row_of",)),
    Case("dispatch", "row_of_eq_N", "plan.row_of[0, 0] = N = 6",
         lambda: ops.dispatch(x3(), edited(plan(), "row_of", (0, 0), 6)), RuntimeError, ("row_of",)),
    Case("dispatch", "row_of_other_token", "plan.row_of[0, 0] = 1, a row of token 2",
         lambda: ops.dispatch(x3(), edited(plan(), "row_of", (0, 0), 1)), RuntimeError, ("row_of", "token_of")),
    Case("dispatch", "row_of_duplicate", "plan.row_of[0] = [0, 0]",
         lambda: ops.dispatch(x3(), edited(plan(), "row_of", (0, 1), 0)), RuntimeError, ("row_of",)),
    Case("dispatch", "token_of_padded_out_of_range", "capacity plan, empty row 5 given token_of = 7 (T = 3)",
         lambda: ops.dispatch(x3(), edited(plan(2), "token_of", 5, 7)), RuntimeError, ("token_of",)),
    Case("dispatch", "token_of_padded_negative", "capacity plan, empty row 5 given token_of = -2",
         lambda: ops.dispatch(x3(), edited(plan(2), "token_of", 5, -2)), RuntimeError, ("token_of",)),
    Case("dispatch", "token_of_unlisted", "capacity plan, empty row 5 given token_of = 0 (row_of[0] lacks 5)",
         lambda: ops.dispatch(x3(), edited(plan(2), "token_of", 5, 0)), RuntimeError, ("token_of", "row_of")),
    Case("dispatch", "T_zero", "x [0, 5], empty plan", lambda: ops.dispatch(torch.zeros(0, 5), ops.make_plan(
         torch.zeros(0, 2, dtype=torch.long), 4)), expect=shapes((0, 5)), behaviour="defined: x_sorted [0, H]"),
    Case("dispatch", "H_zero", "x [3, 0]", lambda: ops.dispatch(torch.zeros(3, 0), plan()), expect=shapes((6, 0)),
         behaviour="defined: x_sorted [N, 0]"),
    Case("dispatch", "x_expanded", "x [3, 5] expanded from one row (stride 0)",
         lambda: ops.dispatch(EXPANDED_X, plan()),
         expect=same_as_contiguous(lambda t: ops.dispatch(t, plan()), EXPANDED_X),
         behaviour="defined: the same bits as the contiguous copy"),
    Case("dispatch", "x_transposed", "x [3, 5] a transposed view", lambda: ops.dispatch(TRANSPOSED_X, plan()),
         expect=same_as_contiguous(lambda t: ops.dispatch(t, plan()), TRANSPOSED_X),
         behaviour="defined: the same bits as the contiguous copy"),
    # --- grouped_mm --------------------------------------------------------------------------
    Case("grouped_mm", "w_none", "w = None", lambda: ops.grouped_mm(torch.ones(6, 5), None, plan().offsets),
         TypeError, ("w",)),
    Case("grouped_mm", "w_meta", "w on meta, x on cpu",
         lambda: ops.grouped_mm(torch.ones(6, 5), w4().to("meta"), plan().offsets), RuntimeError, ("w",)),
    Case("grouped_mm", "offsets_meta", "offsets on meta, x and w on cpu",
         lambda: ops.grouped_mm(torch.ones(6, 5), w4(), plan().offsets.to("meta")), RuntimeError, ("offsets",)),
    Case("grouped_mm", "offsets_int32", "offsets int32",
         lambda: ops.grouped_mm(torch.ones(6, 5), w4(), plan().offsets.int()), RuntimeError, ("offsets",)),
    Case("grouped_mm", "offsets_2d", "offsets [1, E + 1]",
         lambda: ops.grouped_mm(torch.ones(6, 5), w4(), plan().offsets[None]), RuntimeError, ("offsets",)),
    Case("grouped_mm", "offsets_first", "offsets[0] = 1",
         lambda: ops.grouped_mm(torch.ones(6, 5), w4(), torch.tensor([1, 2, 4, 5, 6])), RuntimeError, ("offsets",)),
    Case("grouped_mm", "offsets_negative", "offsets [0, -1, 2, 3, 6]",
         lambda: ops.grouped_mm(torch.ones(6, 5), w4(), torch.tensor([0, -1, 2, 3, 6])), RuntimeError, ("offsets",)),
    Case("grouped_mm", "offsets_short", "offsets [0, 6] for E = 4",
         lambda: ops.grouped_mm(torch.ones(6, 5), w4(), torch.tensor([0, 6])), RuntimeError, ("offsets",)),
    Case("grouped_mm", "w_4d", "w [4, 5, 3, 1]",
         lambda: ops.grouped_mm(torch.ones(6, 5), w4()[..., None], plan().offsets), RuntimeError, ("w",)),
    Case("grouped_mm", "E_zero_rows", "w [0, 5, 3] (E = 0), x [2, 5], offsets [0]",
         lambda: ops.grouped_mm(torch.ones(2, 5), torch.ones(0, 5, 3), torch.tensor([0])), RuntimeError, ("offsets",)),
    Case("grouped_mm", "E_zero_empty", "w [0, 5, 3], x [0, 5], offsets [0]",
         lambda: ops.grouped_mm(torch.ones(0, 5), torch.ones(0, 5, 3), torch.tensor([0])), expect=shapes((0, 3)),
         behaviour="defined: y [0, out]"),
    Case("grouped_mm", "other_grouping", "offsets [0, 1, 2, 3, 6], not the plan's [0, 2, 4, 5, 6]",
         lambda: ops.grouped_mm(torch.ones(6, 1), torch.arange(4.0).reshape(4, 1, 1), torch.tensor([0, 1, 2, 3, 6])),
         expect=equals([[0.0], [1.0], [2.0], [3.0], [3.0], [3.0]]),
         behaviour="defined: any non-decreasing offsets from 0 to N is a valid grouping; rows use the expert "
         "their offsets give (grouped_mm cannot know the plan)"),
    Case("grouped_mm", "w_expanded", "w [4, 5, 3] expanded from one expert (stride 0)",
         lambda: ops.grouped_mm(torch.ones(6, 5), EXPANDED_W, plan().offsets),
         expect=same_as_contiguous(lambda w: ops.grouped_mm(torch.ones(6, 5), w, plan().offsets), EXPANDED_W),
         behaviour="defined: the same bits as the contiguous copy"),
    Case("grouped_mm", "in_zero", "x [6, 0], w [4, 0, 3]",
         lambda: ops.grouped_mm(torch.ones(6, 0), torch.ones(4, 0, 3), plan().offsets),
         expect=equals(torch.zeros(6, 3)), behaviour="defined: zeros [N, out] (an empty sum)"),
    # --- combine -----------------------------------------------------------------------------
    Case("combine", "weights_none", "weights = None", lambda: ops.combine(torch.ones(6, 5), None, plan()),
         TypeError, ("weights",)),
    Case("combine", "plan_none", "plan = None", lambda: ops.combine(torch.ones(6, 5), torch.ones(3, 2), None),
         TypeError, ("plan",)),
    Case("combine", "weights_meta", "weights on meta, y_sorted on cpu",
         lambda: ops.combine(torch.ones(6, 5), torch.ones(3, 2, device="meta"), plan()), RuntimeError, ("weights",)),
    Case("combine", "plan_meta", "plan on meta, y_sorted on cpu",
         lambda: ops.combine(torch.ones(6, 5), torch.ones(3, 2), on_meta(plan())),
         RuntimeError, ("token_of", "row_of")),
    Case("combine", "y_sorted_int", "y_sorted int32",
         lambda: ops.combine(torch.ones(6, 5, dtype=torch.int32), torch.ones(3, 2), plan()),
         RuntimeError, ("y_sorted",)),
    Case("combine", "weights_int", "weights int64",
         lambda: ops.combine(torch.ones(6, 5), torch.ones(3, 2, dtype=torch.int64), plan()),
         RuntimeError, ("weights",)),
    Case("combine", "row_of_duplicate", "plan.row_of[2] = [3, 3]",
         lambda: ops.combine(torch.ones(6, 5), torch.ones(3, 2), edited(plan(), "row_of", (2, 1), 3)),
         RuntimeError, ("row_of",)),
    Case("combine", "token_of_unlisted", "capacity plan, empty row 7 given token_of = 1",
         lambda: ops.combine(torch.ones(8, 5), torch.ones(3, 2), edited(plan(2), "token_of", 7, 1)),
         RuntimeError, ("token_of", "row_of")),
    Case("combine", "mixed_dtypes", "y_sorted bfloat16, weights float64",
         lambda: ops.combine(torch.ones(6, 5, dtype=torch.bfloat16), torch.full((3, 2), 0.5, dtype=torch.float64),
                             plan()),
         expect=equals(torch.ones(3, 5)),
         behaviour="defined: output in y_sorted's dtype; the sum runs in float32 (bf16/f16) or float64"),
    Case("combine", "weights_nan", "weights hold NaN for token 0",
         lambda: ops.combine(torch.ones(6, 5), torch.tensor([[NAN, 0.0], [1.0, 1.0], [1.0, 1.0]]), plan()),
         expect=lambda y: torch.isnan(y[0]).all().item() and torch.equal(y[1:], torch.full((2, 5), 2.0)),
         behaviour="defined: NaN propagates to that token's row only"),
    Case("combine", "T_zero", "y_sorted [0, 5], weights [0, 2], empty plan",
         lambda: ops.combine(torch.zeros(0, 5), torch.zeros(0, 2), ops.make_plan(torch.zeros(0, 2, dtype=torch.long),
                                                                                  4)),
         expect=shapes((0, 5)), behaviour="defined: y [0, H]"),
    Case("combine", "all_dropped", "capacity-0 plan (every assignment dropped)",
         lambda: ops.combine(torch.zeros(0, 5), torch.ones(3, 2), plan(0)), expect=equals(torch.zeros(3, 5)),
         behaviour="defined: zeros [T, H]"),
    Case("combine", "weights_sliced", "weights [3, 2] a strided slice",
         lambda: ops.combine(x3(2).repeat(2, 1), SLICED_WEIGHTS, plan()),
         expect=same_as_contiguous(lambda w: ops.combine(x3(2).repeat(2, 1), w, plan()), SLICED_WEIGHTS),
         behaviour="defined: the same bits as the contiguous copy"),
    # --- load_balancing_loss -----------------------------------------------------------------
    Case("load_balancing_loss", "scores_none", "scores = None",
         lambda: ops.load_balancing_loss(None, INDICES, 4), TypeError, ("scores",)),
    Case("load_balancing_loss", "indices_meta", "indices on meta, scores on cpu",
         lambda: ops.load_balancing_loss(torch.rand(3, 4), INDICES.to("meta"), 4), RuntimeError, ("indices",)),
    Case("load_balancing_loss", "num_experts_zero", "scores [3, 0], num_experts = 0",
         lambda: ops.load_balancing_loss(torch.rand(3, 0), torch.zeros(3, 0, dtype=torch.long), 0),
         RuntimeError, ("num_experts",)),
    Case("load_balancing_loss", "num_experts_float", "num_experts = 4.0",
         lambda: ops.load_balancing_loss(torch.rand(3, 4), INDICES, 4.0), RuntimeError, ("num_experts",)),
    Case("load_balancing_loss", "scores_nan", "scores hold NaN",
         lambda: ops.load_balancing_loss(torch.tensor([[NAN, 0.5]]), torch.tensor([[0]]), 2), expect=all_nan,
         behaviour="defined: NaN (propagates, like any loss of NaN scores)"),
    Case("load_balancing_loss", "T_zero", "scores [0, 4], indices [0, 2]",
         lambda: ops.load_balancing_loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long), 4),
         expect=equals(0.0), behaviour="defined: 0"),
    Case("load_balancing_loss", "k_zero", "indices [3, 0] (k = 0)",
         lambda: ops.load_balancing_loss(torch.rand(3, 4), torch.zeros(3, 0, dtype=torch.long), 4),
         expect=equals(0.0), behaviour="defined: 0 (no assignment counted)"),
    Case("load_balancing_loss", "scores_expanded", "scores [3, 4] expanded from one row (stride 0)",
         lambda: ops.load_balancing_loss(EXPANDED_SCORES, INDICES, 4),
         expect=same_as_contiguous(lambda s: ops.load_balancing_loss(s, INDICES, 4), EXPANDED_SCORES),
         behaviour="defined: the same bits as the contiguous copy"),
    # --- router_z_loss -----------------------------------------------------------------------
    Case("router_z_loss", "logits_none", "logits = None", lambda: ops.router_z_loss(None), TypeError, ("logits",)),
    Case("router_z_loss", "E_zero", "logits [4, 0]", lambda: ops.router_z_loss(torch.zeros(4, 0)),
         RuntimeError, ("logits",)),
    Case("router_z_loss", "nan", "a NaN logit", lambda: ops.router_z_loss(torch.tensor([[NAN, 0.0], [1.0, 2.0]])),
         expect=all_nan, behaviour="defined: NaN (not checked, no host sync; topk_gating on the same logits raises)"),
    Case("router_z_loss", "pos_inf", "a +inf logit", lambda: ops.router_z_loss(torch.tensor([[INF, 0.0]])),
         expect=all_nan, behaviour="defined: NaN (inf - inf inside logsumexp)"),
    Case("router_z_loss", "all_neg_inf", "every logit of a token -inf",
         lambda: ops.router_z_loss(torch.tensor([[-INF, -INF], [0.0, 0.0]])), expect=all_nan,
         behaviour="defined: NaN (logsumexp over no finite logit)"),
    Case("router_z_loss", "some_neg_inf", "-inf logits beside a finite one",
         lambda: ops.router_z_loss(torch.tensor([[-INF, 0.0], [0.0, -INF]])), expect=equals(0.0),
         behaviour="defined: exp(-inf) = 0, the loss of the finite logits (here 0)"),
    Case("router_z_loss", "T_zero", "logits [0, 8]", lambda: ops.router_z_loss(torch.zeros(0, 8)),
         expect=equals(0.0), behaviour="defined: 0"),
    # --- double backward ---------------------------------------------------------------------
    Case("topk_gating", "double_backward", "autograd.grad(create_graph=True) through the weights",
         lambda: second_order(lambda t: ops.topk_gating(t, 2)[0], logits()), RuntimeError, ("create_graph",)),
    Case("dispatch", "double_backward", "autograd.grad(create_graph=True)",
         lambda: second_order(lambda t: ops.dispatch(t, plan()), x3()), RuntimeError, ("create_graph",)),
    Case("combine", "double_backward", "autograd.grad(create_graph=True)",
         lambda: second_order(lambda y, w: ops.combine(y, w, plan()), torch.ones(6, 5), torch.ones(3, 2)),
         RuntimeError, ("create_graph",)),
    Case("grouped_mm", "double_backward", "autograd.grad(create_graph=True)",
         lambda: second_order(lambda x, w: ops.grouped_mm(x, w, plan().offsets), torch.ones(6, 5), w4()),
         RuntimeError, ("create_graph",)),
    Case("load_balancing_loss", "double_backward", "autograd.grad(create_graph=True)",
         lambda: second_order(lambda s: ops.load_balancing_loss(s, INDICES, 4), torch.rand(3, 4)),
         RuntimeError, ("create_graph",)),
    Case("router_z_loss", "double_backward", "autograd.grad(create_graph=True)",
         lambda: second_order(ops.router_z_loss, logits()), RuntimeError, ("create_graph",)),
    # --- the layer ---------------------------------------------------------------------------
    Case("MoE", "double_backward", "autograd.grad(create_graph=True) through layer(x)",
         lambda: second_order(layer(), torch.randn(3, 8, generator=torch.Generator().manual_seed(0))),
         RuntimeError, ("create_graph",)),
    Case("MoE", "x_nan", "x holds NaN (router logits NaN)", lambda: layer()(torch.full((3, 8), NAN)),
         RuntimeError, ("logits",)),
    Case("MoE", "x_inf", "x holds +inf (router logits non-finite)", lambda: layer()(torch.full((3, 8), INF)),
         RuntimeError, ("logits",)),
    Case("MoE", "hidden_size", "x [3, 7] for hidden_size = 8", lambda: layer()(torch.ones(3, 7)), ValueError, ("x",)),
    Case("MoE", "top_k_gt_E", "MoE(8, 16, 4, top_k=5)", lambda: moe_ext.MoE(8, 16, 4, top_k=5), ValueError, ("top_k",)),
    Case("MoE", "E_zero", "MoE(8, 16, 0)", lambda: moe_ext.MoE(8, 16, 0), ValueError, ("num_experts",)),
    Case("MoE", "capacity_factor_zero", "MoE(8, 16, 4, capacity_factor=0.0)",
         lambda: moe_ext.MoE(8, 16, 4, capacity_factor=0.0), ValueError, ("capacity_factor",)),
    Case("MoE", "T_zero", "x [2, 0, 8]", lambda: layer()(torch.zeros(2, 0, 8)), expect=shapes((2, 0, 8)),
         behaviour="defined: y [2, 0, 8]"),
    Case("MoE", "x_expanded", "x [5, 8] expanded from one row (stride 0)",
         lambda: layer()(torch.ones(1, 8).expand(5, 8)),
         expect=same_as_contiguous(lambda t: layer()(t), torch.ones(1, 8).expand(5, 8)),
         behaviour="defined: the same bits as the contiguous copy"),
]
# fmt: on

# One line per case of tests/test_ops.py's BAD_INPUTS (checked there through the wrapper and the raw op).
TEST_OPS_GIVEN = {
    ("topk_gating", "logits_1d"): "logits [8]",
    ("topk_gating", "logits_int"): "logits int64",
    ("topk_gating", "k_zero"): "k = 0",
    ("topk_gating", "k_negative"): "k = -1",
    ("topk_gating", "k_gt_E"): "k = 9 > E = 8",
    ("topk_gating", "logits_nan"): "softmax, a NaN logit in token 2",
    ("topk_gating", "bias_shape"): "bias [9] for E = 8",
    ("topk_gating", "bias_2d"): "bias [1, 8]",
    ("topk_gating", "n_group_not_dividing"): "n_group = 3 for E = 8",
    ("topk_gating", "topk_group_gt_n_group"): "n_group = 4, topk_group = 5",
    ("topk_gating", "too_few_group_candidates"): "k = 3, n_group = 4, topk_group = 1 (2 candidates)",
    ("topk_gating", "expert_mask_shape"): "expert_mask [7] for E = 8",
    ("topk_gating", "too_few_enabled"): "expert_mask enabling 1 expert, k = 2",
    ("topk_gating", "score_func"): 'score_func = "relu"',
    ("make_plan", "indices_1d"): "indices [3]",
    ("make_plan", "indices_float"): "indices float32",
    ("make_plan", "index_negative"): "an index = -1",
    ("make_plan", "index_eq_E"): "an index = 4 = E",
    ("make_plan", "index_gt_E"): "an index = 1000",
    ("make_plan", "num_experts_zero"): "num_experts = 0",
    ("make_plan", "num_experts_negative"): "num_experts = -2",
    ("make_plan", "capacity_negative"): "capacity = -1",
    ("make_plan", "priority_shape"): "priority [3, 3] for indices [3, 2]",
    ("dispatch", "x_1d"): "x [3]",
    ("dispatch", "x_rows"): "x [5, 4] for a plan of T = 3",
    ("dispatch", "token_of_range"): "plan.token_of holds token 3 (T = 3)",
    ("dispatch", "token_of_float"): "plan.token_of float32",
    ("grouped_mm", "x_1d"): "x_sorted [6]",
    ("grouped_mm", "w_2d"): "w [3, 5]",
    ("grouped_mm", "mismatched_in"): "x_sorted [6, 3], w [4, 4, 5]",
    ("grouped_mm", "w_experts"): "w [5, 3, 5] for offsets of E = 4",
    ("grouped_mm", "offsets_end"): "offsets[E] = 7, N = 6",
    ("grouped_mm", "offsets_decreasing"): "offsets [0, 3, 2, 4, 6]",
    ("grouped_mm", "offsets_float"): "offsets float32",
    ("grouped_mm", "dtype_mismatch"): "x_sorted float32, w float64",
    ("combine", "y_sorted_1d"): "y_sorted [6]",
    ("combine", "weights_shape"): "weights [3, 3] for row_of [3, 2]",
    ("combine", "weights_tokens"): "weights [4, 2] for row_of [3, 2]",
    ("combine", "weights_1d"): "weights [6]",
    ("combine", "y_sorted_rows"): "y_sorted [5, 4] for N = 6",
    ("combine", "row_of_range"): "plan.row_of holds row 6 = N",
    ("load_balancing_loss", "scores_1d"): "scores [8]",
    ("load_balancing_loss", "scores_int"): "scores int64",
    ("load_balancing_loss", "index_negative"): "an index = -1",
    ("load_balancing_loss", "index_eq_E"): "an index = 4 = num_experts",
    ("load_balancing_loss", "scores_experts"): "scores [3, 5], num_experts = 4",
    ("load_balancing_loss", "indices_tokens"): "indices [2, 1], scores [3, 4]",
    ("load_balancing_loss", "indices_float"): "indices float32",
    ("router_z_loss", "logits_1d"): "logits [8]",
    ("router_z_loss", "logits_int"): "logits int64",
}


def cases_of_test_ops() -> list[Case]:
    """tests/test_ops.py's bad inputs as table rows (error type from running them: RuntimeError)."""
    return [
        Case(
            op,
            name,
            TEST_OPS_GIVEN.get((op, name), "?"),
            lambda build=build, op=op: call_op(op, build()),
            RuntimeError,
            names,
        )
        for op, name, build, names in BAD_INPUTS
    ]


def case_id(case: Case) -> str:
    return f"{case.op}-{case.name}"


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def run_case(case: Case):
    """Runs the case and checks it; returns the table's outcome text."""
    if case.error is not None:
        with pytest.raises(Exception) as info:
            case.run()
        assert type(info.value) is case.error, f"{case_id(case)}: {type(info.value).__name__}: {info.value}"
        message = str(info.value).splitlines()[0]
        assert re.search(arg_pattern(*case.names), message), f"{case_id(case)}: message names none of {case.names}"
        return f"`{type(info.value).__name__}`: {message}"
    result = case.run()
    outcome = case.expect(result)
    assert outcome is None or outcome is True, f"{case_id(case)}: unexpected result {result}"
    return case.behaviour


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_bad_input(case):
    run_case(case)


def test_cases_are_distinct_and_described():
    every = CASES + cases_of_test_ops()
    ids = [case_id(c) for c in every]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    described = {(op, name) for op, name, _, _ in BAD_INPUTS}
    assert described == set(TEST_OPS_GIVEN), (
        f"describe tests/test_ops.py's new cases in TEST_OPS_GIVEN: {described ^ set(TEST_OPS_GIVEN)}"
    )
    for c in CASES:
        assert (c.error is None) != (c.expect is None), f"{case_id(c)}: an error or an expectation, not both"
        assert c.error is None or c.names, f"{case_id(c)}: name the argument the message must mention"
        assert c.expect is None or c.behaviour, f"{case_id(c)}: describe the defined behaviour"
    errors = sum(c.error is not None for c in every)
    assert errors >= 30, errors


# --------------------------------------------------------------------------------------------
# docs/bad-inputs.md
# --------------------------------------------------------------------------------------------

# Sections in the order of moe_ext.ops, then the layer; an op without cases gets no section.
OP_ORDER = [*(name for name in ops.__all__ if name != "RoutingPlan"), "MoE"]


def render_doc() -> str:
    every = CASES + cases_of_test_ops()
    rows = {op: [] for op in OP_ORDER}
    for i, case in enumerate(every):
        source = "test_bad_inputs" if i < len(CASES) else "test_ops"
        rows[case.op].append((case.name, case.given, run_case(case), source))
    n_errors = sum(c.error is not None for c in every)
    lines = [
        "# Bad and edge-case inputs",
        "",
        "<!-- Generated by tests/test_bad_inputs.py (PYTHONPATH=. python tests/test_bad_inputs.py);",
        "     test_doc_is_current fails when this file and the tests disagree. Do not edit by hand. -->",
        "",
        f"Every input below is a test case: {len(every)} cases, {n_errors} of them errors and "
        f"{len(every) - n_errors} with a defined result.",
        "An error is the exact exception type and the first line of its message, which names the argument",
        "at fault; a defined result is what the op returns.",
        "Cases marked `test_ops` are checked in tests/test_ops.py through both `moe_ext.ops` and",
        "`torch.ops.moe_ext`; the others in tests/test_bad_inputs.py.",
        "",
        "Policy: shapes, dtypes, devices, ranges and plan consistency are checked before any memory is",
        "touched, with a `RuntimeError` (from C++) or `TypeError` (a non-tensor where a tensor belongs).",
        "Router logits that give no meaningful routing (NaN; +inf or no finite logit under softmax) raise in",
        "`topk_gating`, and so in the layer; the losses and `combine` propagate NaN like any PyTorch op,",
        "without a host sync. Non-contiguous and zero-stride (expanded) inputs give the bits of their",
        "contiguous copies. Second derivatives are not implemented: `create_graph=True` through any op raises",
        "instead of returning a silently wrong (zero) second derivative.",
        "",
        "Limits: indices and row offsets are int64 everywhere on the CPU (tests/test_scale.py crosses",
        "2^31 elements); `E * capacity` must fit in int64; make_plan on CUDA takes fewer than 2^31 - 1",
        "assignments.",
    ]
    for op in (op for op in OP_ORDER if rows[op]):
        lines += ["", f"## {op}", "", "| case | input | outcome | tested in |", "| --- | --- | --- | --- |"]
        for name, given, outcome, source in rows[op]:
            cells = [name, given, outcome, source]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def test_doc_is_current():
    assert DOC.exists(), f"{DOC} is missing: run PYTHONPATH=. python tests/test_bad_inputs.py"
    assert DOC.read_text() == render_doc(), (
        f"{DOC} is out of date with the cases or the ops' messages: run PYTHONPATH=. python tests/test_bad_inputs.py"
    )


if __name__ == "__main__":
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(render_doc())
    print(f"wrote {DOC}", file=sys.stderr)


def test_bias_update_group_is_checked():
    with pytest.raises(TypeError, match="bias_update_group must be a torch.distributed ProcessGroup, got str"):
        moe_ext.MoE(8, 16, 4, selection_bias=True, bias_update_rate=0.01, bias_update_group="world")
    with pytest.raises(ValueError, match="bias_update_group needs bias_update_rate"):
        moe_ext.MoE(
            8,
            16,
            4,
            selection_bias=True,
            bias_update_group=torch.distributed.ProcessGroup.__new__(torch.distributed.ProcessGroup),
        )
