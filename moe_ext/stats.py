"""Routing statistics of one forward (tokens per expert, drops, balance, entropy), built without a host sync."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RoutingStats", "routing_stats"]


class RoutingStats(NamedTuple):
    """Routing statistics of one forward, as tensors (reading a value syncs, building them does not).

    tokens_per_expert       [E] int64: assignments routed to each expert, before capacity.
    tokens_per_expert_kept  [E] int64: assignments each expert processed, after capacity.
    dropped                 []  int64: assignments dropped by capacity.
    load_imbalance          []  float: max / mean of tokens_per_expert (1.0 = perfectly balanced).
    load_cv                 []  float: coefficient of variation (std / mean) of tokens_per_expert.
    router_entropy          []  float: mean over tokens of the entropy (nats) of the router's
                                score distribution (scores renormalized to sum to 1).
    """

    tokens_per_expert: Tensor
    tokens_per_expert_kept: Tensor
    dropped: Tensor
    load_imbalance: Tensor
    load_cv: Tensor
    router_entropy: Tensor

    def as_dict(self) -> dict:
        """Python numbers and lists (this reads the tensors: one host sync)."""
        return {name: (value.tolist() if value.dim() else value.item()) for name, value in self._asdict().items()}


def _fixed_order_mean(values: Tensor, block: int = 4096) -> Tensor:
    """Mean of a 1-D tensor, summed in an order no thread count changes: ATen's reduction of a whole
    tensor of 32768 elements or more splits it between threads (one partial sum per thread); the sum of
    each fixed block of rows and then of the block sums does not."""
    n = values.shape[0]
    blocks = F.pad(values, (0, (-n) % block)).reshape(-1, block)
    return blocks.sum(1).sum() / n


@torch.no_grad()
def routing_stats(counts: Tensor, kept: Tensor | None, scores: Tensor) -> RoutingStats:
    """Statistics from the plan's ``counts`` [E], the rows each expert filled (``kept`` [E]; None when
    nothing can be dropped) and the router scores [T, E]."""
    kept = counts if kept is None else kept
    load = counts.to(scores.dtype)
    mean = load.mean()
    safe_mean = mean.clamp(min=torch.finfo(load.dtype).tiny)
    imbalance = torch.where(mean > 0, load.max() / safe_mean, torch.ones_like(mean))
    cv = torch.where(mean > 0, load.std(correction=0) / safe_mean, torch.zeros_like(mean))
    if scores.shape[0] > 0:
        p = scores / scores.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)
        entropy = _fixed_order_mean(torch.special.entr(p).sum(dim=-1))
    else:
        entropy = scores.new_zeros(())
    return RoutingStats(counts, kept, counts.sum() - kept.sum(), imbalance, cv, entropy)
