"""The operator's controls of a layer's experts: switch experts off, restrict tokens to some, replicate one."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ExpertControl"]


class ExpertControl:
    """Expert control for :class:`moe_ext.MoE` (a mixin): works on the layer's ``expert_mask`` buffer
    [E] bool, its ``_restriction`` (read by the routing), its router rows and its expert weights."""

    def _expert_ids(self, experts, what: str) -> list[int]:
        ids = [int(e) for e in (experts.tolist() if isinstance(experts, Tensor) else experts)]
        bad = [e for e in ids if not 0 <= e < self.num_experts]
        if bad:
            raise ValueError(f"MoE.{what}: experts must be in [0, num_experts = {self.num_experts}), got {bad}")
        return ids

    def disable_experts(self, experts) -> None:
        """Switches experts off: they are never selected and their tokens go to the next-best experts.

        With ``normalize_weights=True`` the weights renormalize over the experts
        that remain; with softmax scores the softmax runs over enabled experts
        only. Works in training and inference, and in a compiled model without
        recompiling (the mask is a buffer). At least ``top_k`` experts must stay on.
        """
        ids = self._expert_ids(experts, "disable_experts")
        mask = self.expert_mask.clone()
        mask[ids] = False
        if int(mask.sum()) < self.top_k:
            raise ValueError(
                f"MoE.disable_experts: disabling {sorted(set(ids))} leaves {int(mask.sum())} enabled experts, "
                f"fewer than top_k = {self.top_k}"
            )
        self.expert_mask.copy_(mask)

    def enable_experts(self, experts=None) -> None:
        """Switches experts back on (all of them when ``experts`` is None)."""
        if experts is None:
            self.expert_mask.fill_(True)
        else:
            self.expert_mask[self._expert_ids(experts, "enable_experts")] = True

    @property
    def disabled_experts(self) -> list[int]:
        return [e for e, on in enumerate(self.expert_mask.tolist()) if not on]

    def restrict_experts(self, token_mask: Tensor, allowed) -> _Restriction:
        """Routes the flagged tokens of the following forwards only to ``allowed`` experts.

        ``token_mask`` is a bool tensor over the input's leading dims (``x.shape[:-1]``);
        ``allowed`` lists expert ids (or is an [E] bool mask). Unflagged tokens
        route as usual. The restriction stays until :meth:`clear_restriction`;
        the returned handle is also a context manager that clears it on exit::

            with layer.restrict_experts(is_medical, allowed=[0, 3]):
                y = layer(x)
        """
        if not isinstance(token_mask, Tensor) or token_mask.dtype != torch.bool:
            raise ValueError("MoE.restrict_experts: token_mask must be a bool tensor over x.shape[:-1]")
        if isinstance(allowed, Tensor) and allowed.dtype == torch.bool:
            if allowed.shape != (self.num_experts,):
                raise ValueError(f"MoE.restrict_experts: allowed as a mask must have shape [{self.num_experts}]")
            allowed_mask = allowed.to(self.expert_mask.device).clone()
        else:
            allowed_mask = torch.zeros_like(self.expert_mask)
            allowed_mask[self._expert_ids(allowed, "restrict_experts")] = True
        if int((allowed_mask & self.expert_mask).sum()) < self.top_k:
            raise ValueError(f"MoE.restrict_experts: fewer than top_k = {self.top_k} allowed experts are enabled")
        self._restriction = (token_mask.to(self.expert_mask.device), allowed_mask)
        return _Restriction(self)

    def clear_restriction(self) -> None:
        self._restriction = None

    @torch.no_grad()
    def clone_expert(self, src: int, dst: int, copy_router: bool = False) -> None:
        """Copies expert ``src``'s weights into slot ``dst`` (a redundant replica).

        With ``copy_router=True`` the router row is copied too, so ``dst`` scores
        exactly like ``src``: disable ``src`` and its tokens move to the replica.
        Expert-parallel layers: a collective (every rank of the group calls it);
        the rank holding ``src`` sends its weights to the one holding ``dst``.
        """
        src, dst = self._expert_ids([src, dst], "clone_expert")
        self.copy_expert(src, dst)
        if copy_router:
            self.router.weight[dst].copy_(self.router.weight[src])
            if self.router.bias is not None:
                self.router.bias[dst].copy_(self.router.bias[src])


class _Restriction:
    """Handle returned by restrict_experts; leaving its `with` block clears the restriction."""

    def __init__(self, layer: ExpertControl) -> None:
        self.layer = layer

    def __enter__(self) -> _Restriction:
        return self

    def __exit__(self, *exc) -> None:
        self.layer.clear_restriction()
