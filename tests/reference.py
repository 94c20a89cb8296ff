"""Slow float64 reference of the moe_ext operators, written from the formulas in DESIGN.md.

Clarity over speed: loops over tokens and experts, Python sorting for every selection.
Every function takes tensors of any floating dtype, computes in float64 and returns
float64 (or int64) tensors. Where an output is differentiable in the real op, the
reference is built from differentiable torch ops, so autograd through it gives
reference gradients with respect to the original (possibly low-precision) inputs.
"""

from __future__ import annotations

import math

import torch

# Added to the denominator when renormalizing the top-k weights (as in DeepSeek-V3).
NORMALIZE_EPS = 1e-20


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float64)


def _descending_order(values: list[float], candidates: list[int]) -> list[int]:
    """Candidates sorted by value, largest first; exact ties go to the lower index."""
    return sorted(candidates, key=lambda e: (-values[e], e))


def ref_scores(logits: torch.Tensor, score_func: str = "softmax", expert_mask=None) -> torch.Tensor:
    """softmax over the enabled experts (disabled: 0) or sigmoid (disabled: 0), float64."""
    logits = _f64(logits)
    T, E = logits.shape
    enabled = torch.ones(E, dtype=torch.bool) if expert_mask is None else expert_mask.to(torch.bool)
    if score_func == "softmax":
        masked = logits.masked_fill(~enabled, -math.inf)
        rows = []
        for t in range(T):
            if bool(enabled.any()):
                rows.append(torch.softmax(masked[t], dim=0))
            else:
                rows.append(torch.zeros(E, dtype=torch.float64))
        scores = torch.stack(rows) if T > 0 else logits.new_zeros((0, E))
    elif score_func == "sigmoid":
        scores = torch.sigmoid(logits) * enabled.to(torch.float64)
    else:
        raise ValueError(f"unknown score_func {score_func!r}")
    return scores


def ref_selection_candidates(
    sel: list[float], enabled: list[bool], n_group: int, topk_group: int
) -> list[int]:
    """Experts that may be selected for one token (group-limited routing when n_group > 1)."""
    E = len(sel)
    all_enabled = [e for e in range(E) if enabled[e]]
    if n_group <= 1:
        return all_enabled
    group_size = E // n_group
    group_score = []
    for g in range(n_group):
        members = [e for e in range(g * group_size, (g + 1) * group_size) if enabled[e]]
        if not members:
            group_score.append(-math.inf)
            continue
        best = sorted((sel[e] for e in members), reverse=True)[: min(2, group_size)]
        group_score.append(sum(best))
    kept_groups = sorted(range(n_group), key=lambda g: (-group_score[g], g))[:topk_group]
    return [e for e in all_enabled if e // group_size in kept_groups]


def ref_selection_values(scores_row: torch.Tensor, bias=None) -> list[float]:
    sel = scores_row.detach().tolist()
    if bias is not None:
        b = _f64(bias).tolist()
        sel = [s + bb for s, bb in zip(sel, b, strict=True)]
    return sel


def ref_topk_gating(
    logits: torch.Tensor,
    k: int,
    score_func: str = "softmax",
    normalize: bool = True,
    bias=None,
    scale: float = 1.0,
    n_group: int = 1,
    topk_group: int = 1,
    expert_mask=None,
):
    """Returns (weights [T, k] float64, indices [T, k] int64, scores [T, E] float64)."""
    T, E = logits.shape
    scores = ref_scores(logits, score_func, expert_mask)
    enabled = [True] * E if expert_mask is None else [bool(v) for v in expert_mask.tolist()]
    all_weights, all_indices = [], []
    for t in range(T):
        sel = ref_selection_values(scores[t], bias)
        candidates = ref_selection_candidates(sel, enabled, n_group, topk_group)
        if len(candidates) < k:
            raise ValueError(f"token {t}: only {len(candidates)} candidate experts for k={k}")
        chosen = _descending_order(sel, candidates)[:k]
        w = scores[t, chosen]
        if normalize:
            w = w / (w.sum() + NORMALIZE_EPS)
        all_weights.append(w * scale)
        all_indices.append(torch.tensor(chosen, dtype=torch.int64))
    if T == 0:
        weights = scores.new_zeros((0, k))
        indices = torch.zeros((0, k), dtype=torch.int64)
    else:
        weights = torch.stack(all_weights)
        indices = torch.stack(all_indices)
    return weights, indices, scores


def ref_make_plan(indices: torch.Tensor, num_experts: int, capacity=None, priority=None):
    """Returns (row_of [T, k], token_of [N], counts [E], offsets [E+1]), all int64."""
    T, k = indices.shape
    E = num_experts
    idx = indices.tolist()
    # Assignments of each expert in token order: (t, j) ascending.
    by_expert: list[list[tuple[int, int]]] = [[] for _ in range(E)]
    for t in range(T):
        for j in range(k):
            by_expert[idx[t][j]].append((t, j))
    counts = [len(a) for a in by_expert]
    row_of = [[-1] * k for _ in range(T)]

    if capacity is None:
        offsets = [0]
        for e in range(E):
            offsets.append(offsets[-1] + counts[e])
        token_of = [-1] * (T * k)
        for e in range(E):
            for r, (t, j) in enumerate(by_expert[e]):
                row_of[t][j] = offsets[e] + r
                token_of[offsets[e] + r] = t
    else:
        C = capacity
        offsets = [e * C for e in range(E + 1)]
        token_of = [-1] * (E * C)
        prio = None if priority is None else _f64(priority).tolist()
        for e in range(E):
            assignments = by_expert[e]
            if prio is None:
                # Switch/GShard: all first choices before second choices, then token order.
                order = sorted(assignments, key=lambda tj: (tj[1], tj[0]))
            else:
                order = sorted(assignments, key=lambda tj: (-prio[tj[0]][tj[1]], tj[1], tj[0]))
            kept = sorted(order[:C])  # placed in token order (t, then j)
            for r, (t, j) in enumerate(kept):
                row_of[t][j] = e * C + r
                token_of[e * C + r] = t

    def as_tensor(v, shape):
        return torch.tensor(v, dtype=torch.int64).reshape(shape)

    return (
        as_tensor(row_of, (T, k)),
        as_tensor(token_of, (len(token_of),)),
        as_tensor(counts, (E,)),
        as_tensor(offsets, (E + 1,)),
    )


def ref_dispatch(x: torch.Tensor, token_of: torch.Tensor) -> torch.Tensor:
    """x_sorted[r] = x[token_of[r]], zeros where token_of[r] == -1."""
    x = _f64(x)
    H = x.shape[1]
    filled = token_of >= 0
    x_sorted = x.new_zeros((token_of.shape[0], H))
    # Built with one gather (not a Python loop over rows) so autograd through it stays cheap.
    return x_sorted.index_put((filled.nonzero().flatten(),), x[token_of[filled]])


def ref_combine(y_sorted: torch.Tensor, weights: torch.Tensor, row_of: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_j weights[t, j] * y_sorted[row_of[t, j]]; dropped (-1) assignments add nothing."""
    y_sorted, weights = _f64(y_sorted), _f64(weights)
    T, k = row_of.shape
    y = y_sorted.new_zeros((T, y_sorted.shape[1]))
    tokens = torch.arange(T)
    for j in range(k):  # choice j of every token at once
        kept = row_of[:, j] >= 0
        contribution = weights[kept, j, None] * y_sorted[row_of[kept, j]]
        y = y.index_add(0, tokens[kept], contribution)
    return y


def ref_grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows offsets[e]:offsets[e+1] of x are multiplied by w[e] ([E, in, out])."""
    x, w = _f64(x), _f64(w)
    E, _, out = w.shape
    off = offsets.tolist()
    pieces = [x[off[e] : off[e + 1]] @ w[e] for e in range(E)]
    y = torch.cat(pieces) if pieces else x.new_zeros((0, out))
    # Rows past offsets[E] (none in a valid plan) would belong to no expert.
    assert y.shape[0] == x.shape[0], "offsets must cover every row of x"
    return y


def ref_swiglu_expert(x_row: torch.Tensor, layer, expert: int) -> torch.Tensor:
    """One token's output of one SwiGLU expert of a moe_ext layer: (silu(gate) * up) @ w_out[e], with
    [gate | up] = x @ w_in[e], in float64."""
    gate, up = (_f64(x_row) @ _f64(layer.w_in[expert])).chunk(2)
    return (torch.nn.functional.silu(gate) * up) @ _f64(layer.w_out[expert])


def ref_load_balancing_loss(scores: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """E * sum_e (count_e / T) * mean_t scores[t, e]; 0 for T == 0."""
    scores = _f64(scores)
    T = scores.shape[0]
    if T == 0:
        return scores.sum() * 0.0
    counts = [0] * num_experts
    for e in indices.flatten().tolist():
        counts[e] += 1
    total = scores.new_zeros(())
    for e in range(num_experts):
        total = total + (counts[e] / T) * scores[:, e].mean()
    return num_experts * total


def ref_router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean_t logsumexp(logits[t]) ** 2; 0 for T == 0."""
    logits = _f64(logits)
    T = logits.shape[0]
    if T == 0:
        return logits.sum() * 0.0
    total = logits.new_zeros(())
    for t in range(T):
        total = total + torch.logsumexp(logits[t], dim=0) ** 2
    return total / T
