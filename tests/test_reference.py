"""Checks of the float64 reference itself against independent vectorized formulas (no moe_ext needed)."""

from __future__ import annotations

import math

import pytest
import reference as ref
import torch


def _logits(T, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((T, E), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("normalize", [True, False])
def test_gating_matches_torch_topk(score_func, normalize):
    logits = _logits(50, 16)
    w, i, s = ref.ref_topk_gating(logits, 3, score_func=score_func, normalize=normalize, scale=1.5)
    p = torch.softmax(logits, 1) if score_func == "softmax" else torch.sigmoid(logits)
    top = torch.topk(p, 3, dim=1)
    assert torch.equal(i, top.indices)
    expected = top.values / top.values.sum(1, keepdim=True) if normalize else top.values
    torch.testing.assert_close(w, 1.5 * expected)
    torch.testing.assert_close(s, p)


def test_gating_mask_renormalizes_softmax_over_enabled():
    logits = _logits(20, 6)
    mask = torch.tensor([True, False, True, True, False, True])
    w, i, s = ref.ref_topk_gating(logits, 2, expert_mask=mask)
    expected = torch.zeros_like(s)
    expected[:, mask] = torch.softmax(logits[:, mask], 1)
    torch.testing.assert_close(s, expected)
    assert not (~mask)[i].any()


def test_gating_deepseek_v3_formula():
    # transformers' DeepseekV3TopkRouter.get_topk_indices, vectorized.
    T, E, n_group, topk_group, k = 40, 16, 4, 2, 4
    logits = _logits(T, E, 1)
    bias = torch.randn(E, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.2
    s = torch.sigmoid(logits)
    sel = s + bias
    group_scores = sel.view(T, n_group, -1).topk(2, dim=-1)[0].sum(-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
    masked = sel.masked_fill(~score_mask.bool(), 0.0)
    idx = torch.topk(masked, k=k, dim=-1, sorted=True)[1]
    weights = s.gather(1, idx)
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-20) * 2.5
    w, i, _ = ref.ref_topk_gating(logits, k, "sigmoid", True, bias, 2.5, n_group, topk_group)
    assert torch.equal(i, idx)
    torch.testing.assert_close(w, weights)


def test_gating_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    _, i, _ = ref.ref_topk_gating(logits, 3)
    assert i.tolist() == [[1, 2, 4]]


def test_plan_dropless_is_stable_sort():
    g = torch.Generator().manual_seed(3)
    T, E, k = 30, 5, 2
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    row_of, token_of, counts, offsets = ref.ref_make_plan(indices, E)
    flat = indices.flatten()
    order = torch.sort(flat, stable=True).indices  # (t, j) flattened in token order per expert
    assert torch.equal(token_of, order // k)
    assert torch.equal(counts, torch.bincount(flat, minlength=E))
    assert torch.equal(offsets, torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(T * k)
    assert torch.equal(row_of.flatten(), inverse)


def test_plan_capacity_switch_priority():
    # Switch/GShard: position in expert = cumsum over (choice-major, token) order; keep if < C.
    g = torch.Generator().manual_seed(4)
    T, E, k, C = 40, 4, 2, 7
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    row_of, token_of, counts, offsets = ref.ref_make_plan(indices, E, capacity=C)
    one_hot = torch.nn.functional.one_hot(indices.t().reshape(-1), E)  # [k*T, E], choice-major
    position = (one_hot.cumsum(0) - 1) * one_hot
    kept = ((position < C) & one_hot.bool()).any(1).view(k, T).t()
    assert torch.equal(row_of >= 0, kept)
    assert offsets.tolist() == [e * C for e in range(E + 1)]
    for e in range(E):
        rows = token_of[e * C : (e + 1) * C]
        kept_tokens = sorted(t for t in range(T) for j in range(k) if kept[t, j] and indices[t, j] == e)
        assert rows[rows >= 0].tolist() == kept_tokens
        assert (rows[len(kept_tokens) :] == -1).all()
    for t in range(T):
        for j in range(k):
            if row_of[t, j] >= 0:
                assert token_of[row_of[t, j]] == t and row_of[t, j] // C == indices[t, j]


def test_combine_dispatch_roundtrip_and_grouped_mm():
    g = torch.Generator().manual_seed(5)
    T, E, k, Hd = 9, 3, 2, 4
    indices = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    row_of, token_of, _, offsets = ref.ref_make_plan(indices, E)
    x = torch.randn(T, Hd, generator=g, dtype=torch.float64)
    w = torch.randn(E, Hd, 5, generator=g, dtype=torch.float64)
    weights = torch.rand(T, k, generator=g, dtype=torch.float64)
    y = ref.ref_combine(ref.ref_grouped_mm(ref.ref_dispatch(x, token_of), w, offsets), weights, row_of)
    dense = torch.stack([sum(weights[t, j] * (x[t] @ w[indices[t, j]]) for j in range(k)) for t in range(T)])
    torch.testing.assert_close(y, dense)


def test_losses_match_transformers_formulas():
    T, E, k = 25, 6, 2
    logits = _logits(T, E, 6)
    scores = torch.softmax(logits, 1)
    indices = torch.topk(scores, k).indices
    # transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func, one layer, no mask.
    expert_mask = torch.nn.functional.one_hot(indices, E)
    tokens_per_expert = expert_mask.double().mean(0)  # [k, E]
    router_prob_per_expert = scores.mean(0)
    hf = (tokens_per_expert * router_prob_per_expert.unsqueeze(0)).sum() * E
    torch.testing.assert_close(ref.ref_load_balancing_loss(scores, indices, E), hf)
    z = torch.logsumexp(logits, 1).pow(2).mean()
    torch.testing.assert_close(ref.ref_router_z_loss(logits), z)
    assert float(ref.ref_router_z_loss(logits[:0])) == 0.0
    assert float(ref.ref_load_balancing_loss(scores[:0], indices[:0], E)) == 0.0
    assert not math.isnan(float(ref.ref_router_z_loss(torch.tensor([[1000.0, 999.0]]))))


def test_dispatch_combine_with_drops_match_loops():
    g = torch.Generator().manual_seed(7)
    T, E, k, C = 12, 3, 2, 3
    indices = torch.tensor([[0, 1]] * T)
    indices[3] = torch.tensor([2, 0])  # expert 2 gets one assignment: two empty padded rows
    row_of, token_of, _, _ = ref.ref_make_plan(indices, E, capacity=C)
    assert (row_of == -1).any() and (token_of == -1).any()
    x = torch.randn(T, 4, generator=g, dtype=torch.float64)
    x_sorted = ref.ref_dispatch(x, token_of)
    for r, t in enumerate(token_of.tolist()):
        assert torch.equal(x_sorted[r], x[t] if t >= 0 else torch.zeros(4, dtype=torch.float64))
    weights = torch.rand(T, k, generator=g, dtype=torch.float64)
    y = ref.ref_combine(x_sorted, weights, row_of)
    for t in range(T):
        expected = sum(
            (weights[t, j] * x_sorted[row_of[t, j]] for j in range(k) if row_of[t, j] >= 0),
            torch.zeros(4, dtype=torch.float64),
        )
        torch.testing.assert_close(y[t], expected)
    assert ref.ref_combine(x_sorted[:0], weights, torch.full((T, k), -1)).abs().sum() == 0
