"""Property-based tests (hypothesis) of the moe_ext operators against the float64 reference.

Hypothesis draws the problem: T (0 and 1 included), H, E, k in 1..E, capacity (dropless, capacity 0,
overflowing, no overflow), priorities (ties, -inf), score function, renormalization, dtype, value
regime (normal, exact ties, large) and memory layout (contiguous, transposed, sliced, expanded with
stride 0). Tensor values come from a drawn seed, so a failure shrinks to a small problem and a
seed that reproduces it. Values and gradients are compared by the checkers of tests/test_ops.py
(one reference comparison for the whole suite); the plan invariants and the combine/dispatch
identity hold without any reference.

Budget: every test has a fixed number of examples and derandomize=True (the same examples on
every run, no example database), so the file runs in bounded time. Set MOE_EXT_HYPOTHESIS_SCALE
(e.g. 10) to run proportionally more examples locally. Statistics per test:
``pytest tests/test_properties.py --hypothesis-show-statistics``.
"""

from __future__ import annotations

import math
import os

import reference as ref
import torch
from conftest import ALL_DTYPES, assert_bitwise_equal, assert_close
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from test_ops import CHECKERS, Sample

from moe_ext import ops

SCALE = float(os.environ.get("MOE_EXT_HYPOTHESIS_SCALE", "1"))


def budget(examples: int) -> settings:
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]
dtypes = st.sampled_from(ALL_DTYPES)
layouts = st.sampled_from(LAYOUTS)
seeds = st.integers(0, 2**32 - 1)


@st.composite
def problem_sizes(draw, max_tokens: int = 40, max_experts: int = 9):
    """(T, E, k): T often 0 or 1, E >= 1, 1 <= k <= E."""
    T = draw(st.one_of(st.sampled_from([0, 1]), st.integers(0, max_tokens)))
    E = draw(st.integers(1, max_experts))
    k = draw(st.integers(1, E))
    return T, E, k


def capacities(T: int, E: int, k: int):
    """None (dropless), 0, an overflowing capacity, or one that never overflows."""
    return st.one_of(
        st.none(),
        st.just(0),
        st.integers(1, max(1, math.ceil(T * k / E))),
        st.just(max(1, T * k)),
    )


def generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def values(shape, g, regime: str = "normal") -> torch.Tensor:
    """float64 values: 'normal' N(0, 4), 'ties' small integers (exact ties), 'large' N(0, 50^2)."""
    if regime == "ties":
        return torch.randint(-2, 3, shape, generator=g).to(torch.float64)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    return t * (50.0 if regime == "large" else 2.0)


def laid_out(make, shape, layout: str) -> torch.Tensor:
    """A tensor of `shape` in the given memory layout. `make(shape)` draws contiguous values;
    'expanded' repeats one drawn row along dim 0 (stride 0), the other layouts keep the values
    of a fresh draw but store them non-contiguously."""
    if layout == "expanded" and len(shape) >= 2:
        return make((1, *shape[1:])).expand(shape)
    t = make(shape)
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
    return t


def float_tensor(shape, dtype, g, layout="contiguous", regime="normal", scale=1.0) -> torch.Tensor:
    return laid_out(lambda s: (values(s, g, regime) * scale).to(dtype), shape, layout)


def expert_indices(T: int, E: int, k: int, g, distinct: bool, layout: str) -> torch.Tensor:
    """[T, k] expert ids: distinct per token (what top-k gives) or with repeats (any user input)."""

    def make(shape):
        rows, cols = shape
        if distinct:
            skew = torch.linspace(1.5, 0.0, E, dtype=torch.float64)  # low ids overflow their capacity
            logits = torch.randn((rows, E), generator=g, dtype=torch.float64) + skew
            return torch.topk(logits, cols, dim=1).indices
        return torch.randint(0, E, (rows, cols), generator=g)

    return laid_out(make, (T, k), layout)


def priorities(T: int, k: int, g, kind: str | None, dtype) -> torch.Tensor | None:
    if kind is None:
        return None
    prio = torch.randint(0, 4, (T, k), generator=g).to(torch.float64) / 4  # few levels: ties
    if kind == "with_neg_inf":
        prio = prio.masked_fill(torch.rand((T, k), generator=g) < 0.3, -math.inf)
    return prio.to(dtype)


def reference_plan(indices, E, capacity, priority) -> ops.RoutingPlan:
    return ops.RoutingPlan(*ref.ref_make_plan(indices, E, capacity, priority))


# --------------------------------------------------------------------------------------------
# Gating
# --------------------------------------------------------------------------------------------


@budget(400)
@given(
    sizes=problem_sizes(),
    dtype=dtypes,
    score_func=st.sampled_from(["softmax", "sigmoid"]),
    normalize=st.booleans(),
    scale=st.sampled_from([1.0, 2.5]),
    with_bias=st.booleans(),
    restriction=st.sampled_from([None, "expert_mask", "groups"]),
    regime=st.sampled_from(["normal", "ties", "large"]),
    layout=layouts,
    data=st.data(),
    seed=seeds,
)
def test_topk_gating_matches_reference(
    sizes, dtype, score_func, normalize, scale, with_bias, restriction, regime, layout, data, seed
):
    T, E, k = sizes
    g = generator(seed)
    logits = float_tensor((T, E), dtype, g, layout, regime).requires_grad_(True)
    named = {"logits": logits, "k": k, "score_func": score_func, "normalize": normalize, "scale": scale}
    if with_bias:
        named["bias"] = (torch.randn(E, generator=g, dtype=torch.float64) * 0.3).to(
            torch.float64 if dtype == torch.float64 else torch.float32
        )
    if restriction == "expert_mask":
        # At least k experts stay enabled.
        enabled = data.draw(st.sets(st.integers(0, E - 1), min_size=k, max_size=E), label="enabled experts")
        named["expert_mask"] = torch.tensor([e in enabled for e in range(E)])
    elif restriction == "groups":
        # n_group divides E; the kept groups hold at least k experts.
        n_group = data.draw(st.sampled_from([n for n in range(1, E + 1) if E % n == 0]), label="n_group")
        min_kept = math.ceil(k / (E // n_group))
        named["n_group"] = n_group
        named["topk_group"] = data.draw(st.integers(min_kept, n_group), label="topk_group")
        # Routing runs in float32: group scores closer than its resolution may rank either way,
        # which the reference (float64) cannot tell from a wrong group. Exact ties stay.
        assume(dtype == torch.float64 or not near_tied_groups(logits.detach(), named))
    weights, indices, scores = CHECKERS["topk_gating"](Sample("topk_gating", named, f"seed={seed} {layout}"))
    # Without a reference: k distinct experts per token; a normalized token's weights sum to
    # scale * s / (s + eps), s the sum of its selected scores (eps keeps underflowed scores finite).
    if T:
        assert (indices.sort(dim=1).values.diff(dim=1) != 0).all(), "an expert was chosen twice for a token"
        if normalize:
            selected = scores.detach().gather(1, indices).double().sum(1)
            expected = scale * selected / (selected + ref.NORMALIZE_EPS)
            assert_close(weights.detach().sum(1), expected, weights.dtype)


def near_tied_groups(logits: torch.Tensor, named: dict, resolution: float = 1e-5) -> bool:
    """Whether two group scores of a token differ, but by less than `resolution` (relative)."""
    scores = ref.ref_scores(logits, named["score_func"])
    size = logits.shape[1] // named["n_group"]
    for t in range(logits.shape[0]):
        sel = ref.ref_selection_values(scores[t], named.get("bias"))
        groups = sorted(sum(sorted(sel[g * size : (g + 1) * size])[-2:]) for g in range(named["n_group"]))
        if any(0 < b - a < resolution * max(1.0, abs(b)) for a, b in zip(groups, groups[1:], strict=False)):
            return True
    return False


# --------------------------------------------------------------------------------------------
# Routing plans
# --------------------------------------------------------------------------------------------


def check_plan_invariants(plan: ops.RoutingPlan, indices: torch.Tensor, E: int, capacity, priority) -> None:
    """Properties every plan has, whatever the reference says."""
    T, k = indices.shape
    row_of, token_of, counts, offsets = plan
    N = token_of.shape[0]
    kept = row_of >= 0
    n_kept = int(kept.sum())
    # Nothing lost: every assignment is either kept in exactly one row or dropped.
    assert n_kept + int((row_of == -1).sum()) == T * k, "row_of holds values other than -1 and rows"
    rows = row_of[kept]
    assert rows.unique().numel() == n_kept, "two assignments share a row"
    assert ((rows >= 0) & (rows < N)).all()
    tokens = torch.arange(T).unsqueeze(1).expand(T, k)[kept]
    assert torch.equal(token_of[rows], tokens), "token_of does not name the token of its row"
    assert int((token_of >= 0).sum()) == n_kept, "a row is filled that no assignment points to"
    assert ((token_of >= -1) & (token_of < max(T, 1))).all()
    # Counts before capacity, rows grouped by expert.
    assert torch.equal(counts, torch.bincount(indices.reshape(-1), minlength=E)), "counts != histogram of indices"
    expert_of_row = torch.repeat_interleave(torch.arange(E), offsets.diff())
    assert offsets[0] == 0 and offsets[-1] == N and (offsets.diff() >= 0).all()
    assert torch.equal(expert_of_row[rows], indices[kept]), "an assignment sits in another expert's rows"
    if capacity is None:
        assert n_kept == T * k and N == T * k, "dropless plan dropped an assignment"
        assert torch.equal(offsets, torch.cat([counts.new_zeros(1), counts.cumsum(0)]))
    else:
        assert N == E * capacity and torch.equal(offsets, torch.arange(E + 1) * capacity)
        never = torch.zeros_like(kept) if priority is None else priority.double() == -math.inf
        assert not (kept & never).any(), "an assignment with priority -inf was kept"
        eligible = torch.bincount(indices[~never], minlength=E)
        kept_per_expert = torch.bincount(indices[kept], minlength=E)
        assert torch.equal(kept_per_expert, eligible.clamp(max=capacity)), "kept != min(eligible, capacity)"
    # Within an expert, rows are in token order (stable).
    for e in range(E):
        mine = token_of[offsets[e] : offsets[e + 1]]
        mine = mine[mine >= 0]
        assert (mine.diff() >= 0).all(), f"expert {e}'s rows are not in token order"


@budget(400)
@given(
    sizes=problem_sizes(max_tokens=60),
    distinct=st.booleans(),
    data=st.data(),
    prio_kind=st.sampled_from([None, "ties", "with_neg_inf"]),
    prio_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
    layout=layouts,
    seed=seeds,
)
def test_make_plan_matches_reference_and_invariants(sizes, distinct, data, prio_kind, prio_dtype, layout, seed):
    T, E, k = sizes
    capacity = data.draw(capacities(T, E, k), label="capacity")
    g = generator(seed)
    indices = expert_indices(T, E, k, g, distinct, layout)
    priority = None if capacity is None else priorities(T, k, g, prio_kind, prio_dtype)
    named = {"indices": indices, "num_experts": E, "capacity": capacity, "priority": priority}
    if priority is not None and bool((priority == -math.inf).any()):
        plan = ops.make_plan(**named)
        want = plan_never_keeping_neg_inf(indices, E, capacity, priority)
        for name, got, exp in zip(plan._fields, plan, want, strict=True):
            assert torch.equal(got, exp), f"{name}: {got} != {exp}"
    else:
        plan = CHECKERS["make_plan"](Sample("make_plan", named, f"seed={seed} {layout}"))
    check_plan_invariants(plan, indices, E, capacity, priority)


def plan_never_keeping_neg_inf(indices, E: int, capacity: int, priority) -> tuple:
    """tests/reference.py's capacity plan, where an assignment of priority -inf is never kept
    (make_plan's documented rule for random routing) instead of ranking last."""
    T, k = indices.shape
    idx, prio = indices.tolist(), priority.double().tolist()
    row_of, token_of = [[-1] * k for _ in range(T)], [-1] * (E * capacity)
    for e in range(E):
        eligible = [(t, j) for t in range(T) for j in range(k) if idx[t][j] == e and prio[t][j] != -math.inf]
        ranked = sorted(eligible, key=lambda tj: (-prio[tj[0]][tj[1]], tj[1], tj[0]))
        for r, (t, j) in enumerate(sorted(ranked[:capacity])):
            row_of[t][j] = e * capacity + r
            token_of[e * capacity + r] = t
    _, _, counts, offsets = ref.ref_make_plan(indices, E, capacity)
    return (
        torch.tensor(row_of, dtype=torch.int64).reshape(T, k),
        torch.tensor(token_of, dtype=torch.int64),
        counts,
        offsets,
    )


@budget(200)
@given(sizes=problem_sizes(), dtype=dtypes, data=st.data(), layout=layouts, seed=seeds)
def test_expert_choice_plan_invariants(sizes, dtype, data, layout, seed):
    T, E, _ = sizes
    capacity = data.draw(st.integers(0, T + 2), label="capacity")
    g = generator(seed)
    scores = float_tensor((T, E), dtype, g, layout, "ties" if seed % 2 else "normal")
    row_of, token_of, counts, offsets = ops.expert_choice_plan(scores, capacity)
    take = min(T, capacity)
    assert row_of.shape == (T, E) and token_of.shape == (E * capacity,)
    assert torch.equal(counts, torch.full((E,), take)) and torch.equal(offsets, torch.arange(E + 1) * capacity)
    s64 = scores.double()
    for e in range(E):
        # Expert e takes its `take` best tokens, ties to the lower token, placed in token order.
        want = sorted(sorted(range(T), key=lambda t, e=e: (-float(s64[t, e]), t))[:take])
        got = token_of[e * capacity : e * capacity + take].tolist()
        assert got == want, f"expert {e}: tokens {got}, want {want}"
        assert (token_of[e * capacity + take : (e + 1) * capacity] == -1).all()
        for i, t in enumerate(want):
            assert row_of[t, e] == e * capacity + i
    assert int((row_of >= 0).sum()) == E * take


# --------------------------------------------------------------------------------------------
# dispatch / grouped_mm / combine
# --------------------------------------------------------------------------------------------


@st.composite
def plans(draw, max_tokens: int = 40):
    """(T, E, k, plan, indices, capacity) from the reference plan of random indices."""
    T, E, k = draw(problem_sizes(max_tokens))
    capacity = draw(capacities(T, E, k), label="capacity")
    seed = draw(seeds, label="plan_seed")
    g = generator(seed)
    indices = expert_indices(T, E, k, g, draw(st.booleans(), label="distinct"), "contiguous")
    return T, E, k, reference_plan(indices, E, capacity, None), indices, capacity


def relayout_plan(plan: ops.RoutingPlan, layout: str) -> ops.RoutingPlan:
    """Same plan values, non-contiguous storage (expanded would change values: sliced instead)."""
    how = "sliced" if layout == "expanded" else layout

    def move(t):
        if how == "transposed" and t.dim() == 2:
            return t.transpose(0, 1).contiguous().transpose(0, 1)
        if how == "sliced":
            return torch.stack([t, torch.zeros_like(t)], dim=-1)[..., 0]
        return t

    return ops.RoutingPlan(*[move(t) for t in plan])


@budget(300)
@given(
    planned=plans(),
    H=st.integers(1, 12),
    dtype=dtypes,
    layout=layouts,
    plan_layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    seed=seeds,
)
def test_dispatch_matches_reference(planned, H, dtype, layout, plan_layout, seed):
    T, E, k, plan, _, capacity = planned
    x = float_tensor((T, H), dtype, generator(seed), layout).requires_grad_(True)
    named = {"x": x, "plan": relayout_plan(plan, plan_layout)}
    CHECKERS["dispatch"](Sample("dispatch", named, f"seed={seed} capacity={capacity} {layout}"))


@budget(300)
@given(
    planned=plans(),
    H=st.integers(1, 12),
    dtype=dtypes,
    weight_dtype=st.sampled_from([None, torch.float32, torch.float64]),
    layout=layouts,
    plan_layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
    seed=seeds,
)
def test_combine_matches_reference(planned, H, dtype, weight_dtype, layout, plan_layout, seed):
    T, E, k, plan, _, capacity = planned
    g = generator(seed)
    N = plan.token_of.shape[0]
    y_sorted = float_tensor((N, H), dtype, g, layout).requires_grad_(True)
    weights = laid_out(
        lambda s: torch.rand(s, generator=g, dtype=torch.float64).to(weight_dtype or dtype), (T, k), layout
    ).requires_grad_(True)
    named = {"y_sorted": y_sorted, "weights": weights, "plan": relayout_plan(plan, plan_layout)}
    CHECKERS["combine"](Sample("combine", named, f"seed={seed} capacity={capacity} {layout}"))


@budget(250)
@given(
    planned=plans(max_tokens=30),
    dims=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    dtype=dtypes,
    layout=layouts,
    seed=seeds,
)
def test_grouped_mm_matches_reference(planned, dims, dtype, layout, seed):
    T, E, k, plan, _, capacity = planned
    n_in, n_out = dims
    g = generator(seed)
    N = plan.token_of.shape[0]
    x_sorted = float_tensor((N, n_in), dtype, g, layout).requires_grad_(True)
    w = laid_out(
        lambda s: (torch.randn(s, generator=g, dtype=torch.float64) / math.sqrt(n_in)).to(dtype),
        (E, n_in, n_out),
        layout,
    ).requires_grad_(True)
    named = {"x_sorted": x_sorted, "w": w, "offsets": plan.offsets}
    CHECKERS["grouped_mm"](Sample("grouped_mm", named, f"seed={seed} capacity={capacity} {layout}"))


@budget(300)
@given(planned=plans(), H=st.integers(0, 12), dtype=dtypes, layout=layouts, seed=seeds)
def test_combine_of_dispatch_with_identity_experts_is_the_input(planned, H, dtype, layout, seed):
    # y_sorted = identity experts applied to dispatch(x); weight 1 on the first kept choice of
    # each token, 0 elsewhere: combine gives back x exactly for every token that kept a choice.
    T, E, k, plan, _, capacity = planned
    x = float_tensor((T, H), dtype, generator(seed), layout)
    eye = torch.eye(H, dtype=dtype).expand(E, H, H)
    y_sorted = ops.grouped_mm(ops.dispatch(x, plan), eye, plan.offsets)
    kept = plan.row_of >= 0
    first_kept = kept & (kept.cumsum(dim=1) == 1)
    y = ops.combine(y_sorted, first_kept.to(dtype), plan)
    has_any = kept.any(dim=1, keepdim=True)
    assert_bitwise_equal(y, torch.where(has_any, x, torch.zeros_like(x)), f"capacity={capacity}")
    if capacity is None:
        assert bool(has_any.all()), "dropless plan left a token without an expert"
        # Unit weights on every choice: each token comes back k times.
        y_all = ops.combine(y_sorted, torch.ones((T, k), dtype=dtype), plan)
        assert_close(y_all, x.double() * k, dtype, "unit weights")


@budget(250)
@given(
    sizes=problem_sizes(max_tokens=30, max_experts=8),
    H=st.integers(1, 10),
    dtype=dtypes,
    score_func=st.sampled_from(["softmax", "sigmoid"]),
    normalize=st.booleans(),
    capacity_kind=st.sampled_from(["dropless", "zero", "tight", "ample"]),
    layout=layouts,
    seed=seeds,
)
def test_pipeline_matches_dense_reference(sizes, H, dtype, score_func, normalize, capacity_kind, layout, seed):
    # gating -> plan -> dispatch -> grouped_mm -> combine against a per-token float64 loop.
    T, E, k = sizes
    g = generator(seed)
    capacity = {"dropless": None, "zero": 0, "tight": max(1, T * k // (2 * E)), "ample": max(1, T * k)}[capacity_kind]
    logits = float_tensor((T, E), dtype, g, layout)
    x = float_tensor((T, H), dtype, g, layout)
    w = float_tensor((E, H, H), dtype, g, "contiguous", scale=1 / math.sqrt(H))
    weights, indices, _ = ops.topk_gating(logits, k, score_func, normalize)
    plan = ops.make_plan(indices, E, capacity)
    y = ops.combine(ops.grouped_mm(ops.dispatch(x, plan), w, plan.offsets), weights, plan)
    assert y.shape == (T, H) and y.dtype == dtype
    row_of = ref.ref_make_plan(indices, E, capacity)[0]
    expected = torch.zeros((T, H), dtype=torch.float64)
    for t in range(T):
        for j in range(k):
            if row_of[t, j] >= 0:
                expert_out = (x[t].double() @ w[indices[t, j]].double()).to(dtype).double()
                expected[t] += weights[t, j].double() * expert_out
    note(f"T={T} E={E} k={k} H={H} capacity={capacity}")
    assert_close(y, expected, dtype, f"pipeline capacity={capacity}")


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


@budget(250)
@given(sizes=problem_sizes(), dtype=dtypes, layout=layouts, seed=seeds)
def test_load_balancing_loss_matches_reference(sizes, dtype, layout, seed):
    T, E, k = sizes
    g = generator(seed)
    scores = laid_out(lambda s: torch.rand(s, generator=g, dtype=torch.float64).to(dtype), (T, E), layout)
    indices = expert_indices(T, E, k, g, seed % 2 == 0, layout)
    named = {"scores": scores.requires_grad_(True), "indices": indices, "num_experts": E}
    loss = CHECKERS["load_balancing_loss"](Sample("load_balancing_loss", named, f"seed={seed} {layout}"))
    if T:
        # Uniform scores give exactly k: sum_e count_e = T*k, mean score 1/E.
        uniform = ops.load_balancing_loss(torch.full((T, E), 1.0 / E, dtype=torch.float64), indices, E)
        torch.testing.assert_close(uniform, torch.tensor(float(k), dtype=torch.float64))
    else:
        assert loss.item() == 0.0


@budget(250)
@given(
    sizes=problem_sizes(),
    dtype=dtypes,
    regime=st.sampled_from(["normal", "ties", "large"]),
    layout=layouts,
    seed=seeds,
)
def test_router_z_loss_matches_reference(sizes, dtype, regime, layout, seed):
    T, E, _ = sizes
    logits = float_tensor((T, E), dtype, generator(seed), layout, regime).requires_grad_(True)
    CHECKERS["router_z_loss"](Sample("router_z_loss", {"logits": logits}, f"seed={seed} {layout} {regime}"))
