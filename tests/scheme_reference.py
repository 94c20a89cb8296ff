"""Independent float64 references of the routing schemes, written from the papers' formulas.

Nothing here imports moe_ext: every selection is a Python sort over plain lists, every
loss is spelled out from its paper's equation. The differentiable pieces (scores,
weights, expert FFNs, losses) are built from plain torch ops on the tensors passed in,
so autograd through a reference gives reference gradients.

Sources:
  Switch Transformer   Fedus et al. 2021 (arXiv 2101.03961), eq. 4-6 and Sec. 2.2 (capacity, jitter).
  ST-MoE z-loss        Zoph et al. 2022 (arXiv 2202.08906), eq. 5.
  Noisy top-k          Shazeer et al. 2017 (arXiv 1701.06538), eq. 3-5, Sec. 4, Appendix A.
  GShard               Lepikhin et al. 2020 (arXiv 2006.16668), Algorithm 1.
  V-MoE BPR            Riquelme et al. 2021 (arXiv 2106.05974), Sec. 4.1.
  DeepSeek-V3          DeepSeek-AI 2024 (arXiv 2412.19437), eq. 12-20 and Sec. 2.1.2.
  Expert choice        Zhou et al. 2022 (arXiv 2202.09368), eq. 1-2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------
# Expert FFNs


def activate(name: str, h: torch.Tensor) -> torch.Tensor:
    """Gated activations take [gate | up] halves: act(gate) * up."""
    if name in ("swiglu", "geglu", "geglu_tanh"):
        half = h.shape[-1] // 2
        gate, up = h[..., :half], h[..., half:]
        if name == "swiglu":
            return F.silu(gate) * up
        return F.gelu(gate, approximate="tanh" if name == "geglu_tanh" else "none") * up
    if name == "gelu":
        return F.gelu(h)
    if name == "relu":
        return torch.relu(h)
    if name == "silu":
        return h * torch.sigmoid(h)
    raise ValueError(name)


def expert_ffn(x_t, w_in_e, w_out_e, activation, b_in_e=None, b_out_e=None):
    """One expert on one token: act(x W_in + b_in) W_out + b_out."""
    h = x_t @ w_in_e
    if b_in_e is not None:
        h = h + b_in_e
    h = activate(activation, h)
    y = h @ w_out_e
    if b_out_e is not None:
        y = y + b_out_e
    return y


# --------------------------------------------------------------------------------------------------
# Selection


def desc_order(values: list[float], candidates) -> list[int]:
    """Candidates by value, largest first, exact ties to the lower index."""
    return sorted(candidates, key=lambda e: (-values[e], e))


def select_experts(sel: list[float], k: int, n_group: int = 1, topk_group: int = 1) -> list[int]:
    """Top-k experts of one token by selection value, optionally group-limited (DeepSeek-V3:
    a group scores the sum of its two best selection values; only the topk_group best groups
    are eligible)."""
    E = len(sel)
    candidates = list(range(E))
    if n_group > 1:
        size = E // n_group
        group_score = []
        for g in range(n_group):
            members = sorted((sel[e] for e in range(g * size, (g + 1) * size)), reverse=True)
            group_score.append(sum(members[: min(2, size)]))
        keep = desc_order(group_score, range(n_group))[:topk_group]
        candidates = [e for e in range(E) if e // size in keep]
    return desc_order(sel, candidates)[:k]


def route_topk(
    scores: torch.Tensor, k: int, normalize: bool, scale: float = 1.0, bias=None, n_group: int = 1, topk_group: int = 1
):
    """Token-choice routing. Returns (indices: list[list[int]], weights [T, k] differentiable)."""
    T, E = scores.shape
    plain = scores.detach().double().tolist()
    b = [0.0] * E if bias is None else [float(v) for v in bias.double().tolist()]
    indices = [select_experts([s + bb for s, bb in zip(row, b, strict=False)], k, n_group, topk_group) for row in plain]
    rows = []
    for t in range(T):
        w = torch.stack([scores[t, e] for e in indices[t]]) if k else scores.new_zeros(0)
        if normalize:
            w = w / w.sum()
        rows.append(w * scale)
    weights = torch.stack(rows) if T else scores.new_zeros(0, k)
    return indices, weights


# --------------------------------------------------------------------------------------------------
# Capacity


def capacity(cf: float, T: int, per_token: int, E: int, min_capacity: int) -> int:
    return max(min_capacity, math.ceil(cf * T * per_token / E))


def kept_under_capacity(indices: list[list[int]], E: int, C: int | None, key, excluded=None) -> list[list[bool]]:
    """kept[t][j]: whether assignment (t, j) survives capacity C.

    Each expert keeps the C assignments with the smallest key(t, j); assignments in
    ``excluded`` (a set of (t, j)) are dropped up front and take no capacity.
    """
    T = len(indices)
    k = len(indices[0]) if T else 0
    excluded = excluded or set()
    kept = [[(t, j) not in excluded for j in range(k)] for t in range(T)]
    if C is None:
        return kept
    for e in range(E):
        mine = sorted(
            ((t, j) for t in range(T) for j in range(k) if indices[t][j] == e and kept[t][j]), key=lambda a: key(*a)
        )
        for t, j in mine[C:]:
            kept[t][j] = False
    return kept


def position_key(t, j):
    """Switch/GShard: every first choice before any second choice, then token order."""
    return (j, t)


def probs_key(weights: torch.Tensor):
    w = weights.detach().tolist()
    return lambda t, j: (-w[t][j], j, t)


def bpr_key(weights: torch.Tensor):
    """V-MoE batch-prioritized routing: choice rank first, then the token's top-1 weight (desc)."""
    top1 = [max(row) for row in weights.detach().tolist()]
    return lambda t, j: (j, -top1[t], t)


def priority_key(priority: torch.Tensor):
    p = priority.tolist()
    return lambda t, j: (-p[t][j], j, t)


# --------------------------------------------------------------------------------------------------
# Layer output


def combine_output(tokens, indices, weights, kept, w_in, w_out, activation, b_in=None, b_out=None):
    """y[t] = sum over kept (t, j) of weights[t, j] * FFN_{indices[t][j]}(x_t), loop over tokens and choices."""
    T, H = tokens.shape
    rows = []
    for t in range(T):
        acc = tokens.new_zeros(H)
        for j, e in enumerate(indices[t]):
            if not kept[t][j]:
                continue
            acc = acc + weights[t, j] * expert_ffn(
                tokens[t],
                w_in[e],
                w_out[e],
                activation,
                None if b_in is None else b_in[e],
                None if b_out is None else b_out[e],
            )
        rows.append(acc)
    return torch.stack(rows) if T else tokens.new_zeros(0, H)


def dense_ffn(tokens, w_in_weight, w_out_weight, activation):
    """A shared expert made of two bias-free nn.Linear layers (weights [out, in])."""
    return activate(activation, tokens @ w_in_weight.T) @ w_out_weight.T


# --------------------------------------------------------------------------------------------------
# Losses


def load_balancing_loss(scores: torch.Tensor, counted: list[list[int]], E: int) -> torch.Tensor:
    """E * sum_e (count_e / T) * mean_t scores[t, e]."""
    T = scores.shape[0]
    counts = [0] * E
    for row in counted:
        for e in row:
            counts[e] += 1
    total = scores.new_zeros(())
    for e in range(E):
        total = total + (counts[e] / T) * scores[:, e].mean()
    return E * total


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean_t (log sum_e exp logits[t, e])^2."""
    m = logits.max(dim=-1, keepdim=True).values.detach()
    lse = (logits - m).exp().sum(-1).log() + m.squeeze(-1)
    return (lse**2).mean()


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    """Population variance / (mean^2 + 1e-10)."""
    mean = v.sum() / v.numel()
    var = ((v - mean) ** 2).sum() / v.numel()
    return var / (mean**2 + 1e-10)


def std_normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def smooth_load(clean: torch.Tensor, noisy: torch.Tensor, std: torch.Tensor, k: int) -> torch.Tensor:
    """Shazeer et al. 2017, Appendix A: Load_i = sum_t Phi((clean_ti - kth_excluding(noisy_t, k, i)) / std_ti).

    kth_excluding(v, k, i) is the k-th largest component of v once component i is removed.
    """
    T, E = noisy.shape
    loads = []
    for i in range(E):
        others = torch.cat([noisy[:, :i], noisy[:, i + 1 :]], dim=1)
        kth = others.sort(dim=1, descending=True).values[:, k - 1]
        loads.append(std_normal_cdf((clean[:, i] - kth) / std[:, i]).sum())
    return torch.stack(loads)


def sequence_aux_loss(scores: torch.Tensor, indices: list[list[int]], E: int, k: int, seq_len: int) -> torch.Tensor:
    """DeepSeek-V3 eq. 17-20 (before alpha), averaged over the sequences (consecutive runs of seq_len tokens)."""
    T = scores.shape[0]
    num_seqs = T // seq_len
    total = scores.new_zeros(())
    for s in range(num_seqs):
        lo, hi = s * seq_len, (s + 1) * seq_len
        block = scores[lo:hi]
        normalized = block / block.sum(-1, keepdim=True)
        hits = [0] * E
        for t in range(lo, hi):
            for e in indices[t]:
                hits[e] += 1
        loss = scores.new_zeros(())
        for e in range(E):
            f_e = E / (k * seq_len) * hits[e]
            loss = loss + f_e * normalized[:, e].mean()
        total = total + loss
    return total / num_seqs


# --------------------------------------------------------------------------------------------------
# Expert choice


def expert_choice_selection(scores: torch.Tensor, C: int) -> list[list[int]]:
    """chosen[e]: the min(C, T) tokens with the highest scores[:, e] (ties to the lower token), in token order."""
    T, E = scores.shape
    s = scores.detach().double().tolist()
    chosen = []
    for e in range(E):
        col = [s[t][e] for t in range(T)]
        chosen.append(sorted(desc_order(col, range(T))[: min(C, T)]))
    return chosen


def expert_choice_output(tokens, scores, chosen, w_in, w_out, activation):
    T, H = tokens.shape
    rows = []
    for t in range(T):
        acc = tokens.new_zeros(H)
        for e, toks in enumerate(chosen):
            if t in toks:
                acc = acc + scores[t, e] * expert_ffn(tokens[t], w_in[e], w_out[e], activation)
        rows.append(acc)
    return torch.stack(rows)
