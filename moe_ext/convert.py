"""Putting moe_ext layers into existing models: a generic module swapper and sparse upcycling of dense FFNs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .layer import MoE

__all__ = ["replace_modules", "upcycle"]

_ACTIVATIONS = {nn.GELU: "gelu", nn.ReLU: "relu", nn.SiLU: "silu"}


def replace_modules(
    model: nn.Module,
    match: type | tuple[type, ...] | Callable[[str, nn.Module], bool],
    build: Callable[[str, nn.Module], nn.Module],
) -> int:
    """Replaces every submodule that ``match``es by ``build(name, module)``; returns how many.

    ``match`` is a module class (or tuple of classes) or a predicate
    ``(qualified_name, module) -> bool``. A replaced module's children are not
    visited, so a built module may wrap the one it replaces. The root itself is
    never replaced.
    """
    predicate = match if not isinstance(match, (type, tuple)) else (lambda _name, m: isinstance(m, match))
    replaced = 0

    def visit(parent: nn.Module, prefix: str) -> None:
        nonlocal replaced
        for child_name, child in list(parent.named_children()):
            name = f"{prefix}.{child_name}" if prefix else child_name
            if predicate(name, child):
                setattr(parent, child_name, build(name, child))
                replaced += 1
            else:
                visit(child, name)

    visit(model, "")
    return replaced


def _dense_layout(mlp: nn.Module) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(activation, w_in [H, F or 2F], w_out [F, H], b_in, b_out) of a dense FFN."""
    if isinstance(mlp, nn.Sequential):
        layers = [m for m in mlp if not isinstance(m, nn.Dropout)]
        if len(layers) == 3 and isinstance(layers[0], nn.Linear) and isinstance(layers[2], nn.Linear):
            kind = _ACTIVATIONS.get(type(layers[1]))
            if kind is None:
                raise ValueError(f"upcycle: unsupported activation {type(layers[1]).__name__}")
            first, second = layers[0], layers[2]
            return (
                kind,
                first.weight.T,
                second.weight.T,
                None if first.bias is None else first.bias,
                None if second.bias is None else second.bias,
            )
    gate, up, down = (getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    if all(isinstance(m, nn.Linear) for m in (gate, up, down)):
        act = getattr(mlp, "act_fn", None)
        if isinstance(act, nn.SiLU):
            kind = "swiglu"
        elif (isinstance(act, nn.GELU) and act.approximate == "none") or type(act).__name__ == "GELUActivation":
            kind = "geglu"
        else:
            raise ValueError(f"upcycle: unsupported gated activation {type(act).__name__}")
        if any(m.bias is not None for m in (gate, up, down)):
            raise ValueError("upcycle: gated FFNs with biases are not supported")
        return kind, torch.cat([gate.weight.T, up.weight.T], dim=1), down.weight.T, None, None
    raise ValueError(
        "upcycle: expected nn.Sequential(Linear, activation, Linear) or a gated MLP with "
        f"gate_proj/up_proj/down_proj and act_fn, got {type(mlp).__name__}"
    )


def upcycle(mlp: nn.Module, num_experts: int, top_k: int = 2, **moe_kwargs) -> MoE:
    """Sparse upcycling (Komatsuzaki et al. 2022): an MoE whose every expert is a copy of a dense FFN.

    Reads ``nn.Sequential(Linear, GELU|ReLU|SiLU, Linear)`` (biases become expert
    biases) or a gated MLP with ``gate_proj``/``up_proj``/``down_proj`` and
    ``act_fn`` (SiLU -> SwiGLU, GELU -> GeGLU; Llama/Mistral/Qwen style). The
    router is freshly initialized; with the default renormalized weights and no
    capacity the MoE reproduces the dense output exactly at step 0 (the k
    identical experts' weights sum to 1).
    """
    activation, w_in, w_out, b_in, b_out = _dense_layout(mlp)
    hidden, ffn = w_out.shape[1], w_out.shape[0]
    kwargs = dict(top_k=top_k, activation=activation, normalize_weights=True)
    kwargs.update(moe_kwargs)
    kwargs.setdefault("expert_bias", b_in is not None or b_out is not None)
    layer = MoE(hidden, ffn, num_experts, device=w_in.device, dtype=w_in.dtype, **kwargs)
    with torch.no_grad():
        layer.w_in.copy_(w_in.unsqueeze(0).expand_as(layer.w_in))
        layer.w_out.copy_(w_out.unsqueeze(0).expand_as(layer.w_out))
        if layer.b_in is not None:
            layer.b_in.copy_((b_in if b_in is not None else torch.zeros_like(layer.b_in[0])).expand_as(layer.b_in))
            layer.b_out.copy_((b_out if b_out is not None else torch.zeros_like(layer.b_out[0])).expand_as(layer.b_out))
    return layer
