"""Activation checkpointing of MoE layers: the recompute routes exactly like the first pass.

``torch.utils.checkpoint`` runs a checkpointed function twice: once in the forward (keeping no
activations) and again during backward to rebuild them. It restores the global RNG for the
second run, so a layer drawing from the global RNG routes alike both times. A layer with its
own ``generator`` (router jitter, noisy gating, random routing, random drops) would draw again
and route the recompute differently, and a layer with ``bias_update_rate`` would route the
recompute with the bias its own first pass just updated (and update it twice): gradients that
belong to another routing, with no error.

``checkpoint_context`` is the ``context_fn`` that prevents it: the first pass stores, per MoE
call, the routing it used and its generator's state; the recompute takes them back in the same
order and replays that routing (no bias update, no statistics or trace counted twice)::

    torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, context_fn=moe_ext.checkpoint_context)
    hf_model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": moe_ext.checkpoint_context})

Without it, a layer whose recompute would route differently raises inside backward naming the
fix; every other layer recomputes correctly under plain checkpointing.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["ForcedRouting", "checkpoint_context", "in_backward"]


class ForcedRouting(NamedTuple):
    """A routing a layer must use instead of choosing one (replay, and the recompute of a checkpoint).

    indices  [T, k] int64 experts per token (token choice), or [T, E] with the expert id where the
             expert took the token and -1 elsewhere (expert choice).
    weights  the routing weights to use as constants ([T, k] or [T, E]); None = computed from the
             router's logits at ``indices``, differentiable, bitwise as the layer's own routing.
    dropped  [T, k] bool: assignments capacity dropped (kept set reproduced exactly); None = the
             layer's drop policy decides.
    """

    indices: Tensor
    weights: Tensor | None = None
    dropped: Tensor | None = None


class _Stash(NamedTuple):
    routing: ForcedRouting
    generator_state: Tensor | None


class _Frame:
    """The MoE calls of one checkpointed function: stored in the first pass, taken back in order."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, _Stash]] = []
        self.cursor = 0


_local = threading.local()


def _stack() -> list[tuple[_Frame, bool]]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


class _Mode:
    def __init__(self, frame: _Frame, recomputing: bool) -> None:
        self.frame, self.recomputing = frame, recomputing

    def __enter__(self) -> None:
        if self.recomputing:
            self.frame.cursor = 0
        else:
            self.frame.entries.clear()
        _stack().append((self.frame, self.recomputing))

    def __exit__(self, *exc) -> None:
        _stack().pop()


def checkpoint_context() -> tuple[_Mode, _Mode]:
    """``context_fn`` for ``torch.utils.checkpoint(..., use_reentrant=False)``: (forward, recompute) contexts."""
    frame = _Frame()
    return _Mode(frame, False), _Mode(frame, True)


def in_backward() -> bool:
    """True while autograd's engine runs a backward on this thread (where a checkpoint recomputes)."""
    return torch._C._current_graph_task_id() != -1


def current() -> tuple[_Frame | None, bool]:
    """(the innermost checkpoint frame or None, whether it is recomputing)."""
    stack = _stack()
    return stack[-1] if stack else (None, False)


def store(frame: _Frame, layer: torch.nn.Module, routing: ForcedRouting, generator_state: Tensor | None) -> None:
    """First pass: ``layer`` routed with ``routing`` after its generator was in ``generator_state``."""
    frame.entries.append((id(layer), _Stash(routing, generator_state)))


def take(frame: _Frame, layer: torch.nn.Module, name: str) -> _Stash:
    """Recompute: the stash of ``layer``'s next call, checked to be this layer's."""
    if frame.cursor >= len(frame.entries):
        raise RuntimeError(
            f"MoE {name}: the checkpoint recompute calls this layer more often than the first pass did "
            f"({len(frame.entries)} MoE calls stored); the checkpointed function must run the same layers"
        )
    owner, stash = frame.entries[frame.cursor]
    if owner != id(layer):
        raise RuntimeError(
            f"MoE {name}: the checkpoint recompute calls the MoE layers in another order than the first "
            f"pass (call {frame.cursor})"
        )
    frame.cursor += 1
    return stash
