"""Routing-scheme math of the MoE literature that sits around the gating op: noise, drop priorities, extra losses.

Each function cites the paper whose formula it implements. The per-token
selection itself always runs in the C++ ``topk_gating`` / ``expert_choice_plan``
operators; what lives here are the pieces expressed over whole batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "cv_squared",
    "noisy_topk_load",
    "shazeer_losses",
    "sequence_aux_loss",
    "drop_priority",
    "balance_bias_update",
]

_CV_EPS = 1e-10


def cv_squared(values: Tensor) -> Tensor:
    """Squared coefficient of variation, population variance / (mean^2 + 1e-10) (Shazeer et al. 2017)."""
    values = values.float() if values.dtype != torch.float64 else values
    if values.numel() <= 1:
        return values.new_zeros(())
    return values.var(correction=0) / (values.mean() ** 2 + _CV_EPS)


def noisy_topk_load(clean_logits: Tensor, noisy_logits: Tensor, noise_std: Tensor, k: int) -> Tensor:
    """Smooth load estimator of noisy top-k gating (Shazeer et al. 2017, Appendix A).

    P(x, i) = Phi((clean_i - kth_excluding(noisy, k, i)) / noise_std_i): the
    probability that expert i stays in the top k if only its own noise is
    redrawn. kth_excluding is the k-th largest noisy logit among the other
    experts: the (k+1)-th overall when i is in the top k, else the k-th.
    Returns Load = sum over tokens of P, shape [E]; differentiable.
    """
    E = noisy_logits.shape[-1]
    if k >= E:  # every expert is always selected: load is the token count
        return clean_logits.new_ones(E) * clean_logits.shape[0]
    top = noisy_logits.topk(k + 1, dim=-1).values
    threshold_if_in = top[:, k : k + 1]  # (k+1)-th largest
    threshold_if_out = top[:, k - 1 : k]  # k-th largest
    is_in = noisy_logits > threshold_if_in
    threshold = torch.where(is_in, threshold_if_in, threshold_if_out)
    normal = torch.distributions.Normal(clean_logits.new_zeros(()), clean_logits.new_ones(()))
    prob = normal.cdf((clean_logits - threshold) / noise_std)
    return prob.sum(0)


def shazeer_losses(gates: Tensor, load: Tensor) -> tuple[Tensor, Tensor]:
    """(importance loss, load loss) = (CV(sum_t gates)^2, CV(load)^2) (Shazeer et al. 2017, Sec. 4, App. A).

    ``gates`` [T, E] holds each token's gate values (zero outside its top k).
    """
    return cv_squared(gates.sum(0)), cv_squared(load)


def sequence_aux_loss(scores: Tensor, indices: Tensor, num_experts: int, leading_shape: torch.Size) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss (arXiv 2412.19437, eq. 17-20), before its alpha.

    Per sequence of S tokens: f_e = E / (k S) * #{t : e in topk(t)},
    P_e = 1/S sum_t s'_{t,e} with s' the scores normalized over all experts;
    loss = sum_e f_e P_e, averaged over sequences. Sequences are the last
    leading dim of the input ([B, S, H] -> B sequences; [T, H] -> one).
    """
    T, k = indices.shape
    if T == 0:
        return scores.new_zeros(())
    seq_len = leading_shape[-1] if len(leading_shape) >= 1 else 1
    seqs = T // max(seq_len, 1)
    normalized = scores / scores.sum(-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)
    p = normalized.reshape(seqs, seq_len, num_experts).mean(1)
    hits = torch.zeros(seqs, num_experts, dtype=scores.dtype, device=scores.device)
    hits.scatter_add_(
        1, indices.reshape(seqs, seq_len * k), torch.ones_like(indices.reshape(seqs, -1), dtype=scores.dtype)
    )
    f = hits * (num_experts / (k * seq_len))
    return (f * p).sum(-1).mean()


def drop_priority(policy: str, weights: Tensor, generator: torch.Generator | None = None) -> Tensor | None:
    """Priority [T, k] for ``make_plan`` under a capacity drop policy (higher kept first; -inf never kept).

    position: None (first choices before second choices, then token order; Switch, GShard).
    probs:    the routing weights (keep the most confident assignments).
    bpr:      batch-prioritized routing (Riquelme et al. 2021, V-MoE): all first
              choices before all second choices, each ordered by the token's top-1 weight.
    random:   random token selection (DeepSpeed ``use_rts``): a uniform random priority.
    """
    w = weights.detach()
    if policy == "position":
        return None
    if policy == "probs":
        return w
    if policy == "bpr":
        # float64 so that choice * span never swallows a one-ulp difference of float32 weights.
        w = w.double()
        top1 = w.max(dim=-1, keepdim=True).values
        span = top1.abs().max() + 1 if w.numel() else 1
        choice = torch.arange(w.shape[1], device=w.device, dtype=w.dtype)
        return top1 - choice * span
    if policy == "random":
        return torch.rand(w.shape, generator=generator, device=w.device, dtype=w.dtype)
    raise ValueError(f"unknown drop policy {policy!r}")


def gshard_second_expert_drop(weights: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """GShard random routing (Lepikhin et al. 2020, Alg. 1): the 2nd expert is kept only if
    2 * g2 / (g1 + g2) > u, u ~ U[0, 1). Returns a [T, k] bool mask of assignments to drop."""
    g = weights.detach()
    share = g[:, 1] / (g[:, 0] + g[:, 1]).clamp(min=torch.finfo(g.dtype).tiny)
    u = torch.rand(share.shape, generator=generator, device=g.device, dtype=g.dtype)
    drop = torch.zeros_like(g, dtype=torch.bool)
    drop[:, 1] = 2 * share <= u
    return drop


@torch.no_grad()
def balance_bias_update(bias: Tensor, counts: Tensor, rate: float) -> None:
    """Aux-loss-free balancing (Wang et al. 2024; DeepSeek-V3): b_e += rate * sign(mean load - load_e)."""
    load = counts.to(bias.dtype)
    bias.add_(rate * torch.sign(load.mean() - load))
