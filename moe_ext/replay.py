"""Routing replay: every MoE layer uses a given routing instead of choosing its own.

Reinforcement learning generates with one engine and trains with another; where the two route a
token to different experts, the policy gradient belongs to a model that did not produce the
sample. ``replay_routing`` makes the training forward use the generation's experts::

    with moe_ext.trace_routing(model) as trace:     # or experts from another engine, per layer
        rollout = generate(model, prompts)
    with moe_ext.replay_routing(model, trace):
        loss = policy_loss(model(rollout.tokens))
    loss.backward()

Each layer takes the given experts per token; its weights are computed from its own logits at
those experts with the arithmetic of its own routing, so gradients reach the router through the
given choices as in the normal path and replaying a trace of a run gives that run's outputs and
gradients bitwise. ``weights=True`` uses the trace's recorded weights (float16) instead, as
constants. With a capacity, a trace's drops are reproduced exactly; experts given as plain tensors
leave the drops to the layer's drop policy. Works with expert parallelism (each rank replays its
own tokens), ``torch.compile`` (the replay is taken outside the graph) and activation
checkpointing (the recompute reuses the first pass's routing; see :mod:`moe_ext.recompute`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from . import ops
from .layer import MoE
from .monitor import RoutingTrace, _moe_layers
from .recompute import ForcedRouting
from .router import forced_expert_choice_problem, routing_mask

__all__ = ["RoutingReplay", "replay_routing"]


class _Forward:
    """One forward's routing of one layer."""

    def __init__(self, indices: Tensor, weights: Tensor | None, dropped: Tensor | None, shape: tuple | None):
        self.indices, self.weights, self.dropped, self.shape = indices, weights, dropped, shape


class RoutingReplay:
    """The routing ``replay_routing`` feeds the layers: per layer, a list of forwards taken in order.

    ``taken[name]`` counts the forwards a layer has replayed, ``remaining()`` those it has not.
    """

    def __init__(self, layers: list[tuple[str, MoE]], forwards: dict[str, list[_Forward]]) -> None:
        self.names = [name for name, _ in layers]
        self._forwards = forwards
        self._name_of = {id(layer): name for name, layer in layers}
        self.taken = dict.fromkeys(self.names, 0)

    def remaining(self) -> dict[str, int]:
        """Per layer, the forwards given but not replayed yet."""
        return {name: len(self._forwards[name]) - self.taken[name] for name in self.names}

    def take(self, layer: MoE, num_tokens: int, leading_shape: torch.Size) -> ForcedRouting:
        """The routing of ``layer``'s next forward, checked against it and moved to its device."""
        name = self._name_of[id(layer)]
        call = self.taken[name]
        where = f"replay_routing, layer {name}, forward {call}"
        if call >= len(self._forwards[name]):
            raise RuntimeError(
                f"{where}: the routing holds {len(self._forwards[name])} forward(s) of this layer and all "
                "have been replayed"
            )
        given = self._forwards[name][call]
        if given.indices.shape[0] != num_tokens:
            raise ValueError(f"{where}: the routing has {given.indices.shape[0]} tokens, this forward {num_tokens}")
        if given.shape is not None and given.shape != tuple(leading_shape):
            raise ValueError(
                f"{where}: the routing was recorded for input leading dims {given.shape}, this forward's are "
                f"{tuple(leading_shape)}"
            )
        device = layer.expert_mask.device
        indices = given.indices.to(device=device, dtype=torch.long)
        mask = routing_mask(layer.expert_mask, layer._restriction, leading_shape, num_tokens)
        rows = layer.capacity(num_tokens)
        if layer.router_type == "expert_choice":
            problem = forced_expert_choice_problem(indices, rows, mask)
        else:
            problem = ops.forced_indices_problem(indices, layer.num_experts, mask)
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        dropped = None
        if given.dropped is not None and layer.router_type != "expert_choice":
            if rows is None and bool(given.dropped.any()):
                raise ValueError(
                    f"{where}: the trace dropped assignments by capacity but the layer is dropless "
                    "(capacity_factor=None); replay it with the capacity it was recorded with"
                )
            dropped = given.dropped.to(device) if rows is not None else None
        weights = given.weights.to(device) if given.weights is not None else None
        self.taken[name] = call + 1
        return ForcedRouting(indices, weights, dropped)


@contextlib.contextmanager
def replay_routing(
    model: nn.Module,
    routing: RoutingTrace | Mapping[str, Tensor | Sequence[Tensor]] | Sequence[Tensor | Sequence[Tensor]],
    *,
    weights: bool | Mapping[str, Tensor | Sequence[Tensor]] | Sequence[Tensor | Sequence[Tensor]] | None = None,
) -> Iterator[RoutingReplay]:
    """Inside the block, every ``moe_ext.MoE`` layer of ``model`` routes as ``routing`` says.

    routing: a :class:`RoutingTrace` of this model (each forward's experts, drops and input shape),
        or experts per layer: a mapping from layer name (as ``trace_routing`` names them) or a
        sequence in the order of ``model.named_modules()``, each a tensor [T, k] for one forward
        or a sequence of them for successive forwards. Token choice: integer experts [T, top_k];
        expert choice: [T, E], e where expert e takes token t and -1 elsewhere.
    weights: None/False computes the weights from the layer's logits at the given experts
        (differentiable, bitwise the layer's own); True uses a trace's recorded float16 weights;
        tensors in the shape of ``routing`` give them explicitly. Given weights are constants:
        the router then learns only through its auxiliary losses.

    Raises where the routing does not fit the model (other layers, expert counts or k) on entry,
    and where a forward does not fit it (token count, input shape, experts out of range, repeated
    or disabled, more forwards than given) in that forward.
    """
    layers = _moe_layers(model)
    names = [name for name, _ in layers]
    if isinstance(routing, RoutingTrace):
        forwards = _from_trace(routing, layers, weights)
    else:
        indices = _per_layer(routing, names, "routing")
        given = _per_layer(weights, names, "weights") if weights not in (None, False, True) else None
        if weights is True:
            raise ValueError("replay_routing: weights=True takes a trace's weights; routing is no RoutingTrace")
        forwards = {}
        for name in names:
            ws = given[name] if given is not None else [None] * len(indices[name])
            if len(ws) != len(indices[name]):
                raise ValueError(
                    f"replay_routing: layer {name} has {len(indices[name])} forward(s) of experts but "
                    f"{len(ws)} of weights"
                )
            forwards[name] = [_Forward(i, w, None, None) for i, w in zip(indices[name], ws, strict=True)]
    for name, layer in layers:
        for call, given in enumerate(forwards[name]):
            _check_shapes(name, call, layer, given)
    for name, layer in layers:
        if layer._replay is not None:
            raise RuntimeError(f"replay_routing: layer {name} replays a routing already")
    replay = RoutingReplay(layers, forwards)
    for name, layer in layers:
        layer._replay = replay
        layer._trace_name = name
    try:
        yield replay
    finally:
        for _, layer in layers:
            layer._replay = None


def _from_trace(trace: RoutingTrace, layers: list[tuple[str, MoE]], weights) -> dict[str, list[_Forward]]:
    names = [name for name, _ in layers]
    if trace.layers != names:
        raise ValueError(
            f"replay_routing: the trace is of another model: it has {len(trace.layers)} MoE layer(s) "
            f"{trace.layers[:4]}{'...' if len(trace.layers) > 4 else ''}, the model {len(names)} "
            f"{names[:4]}{'...' if len(names) > 4 else ''}"
        )
    if weights not in (None, False, True):
        raise ValueError("replay_routing: with a RoutingTrace, weights is None, False or True")
    forwards = {}
    for name, layer in layers:
        if trace.num_experts[name] != layer.num_experts:
            raise ValueError(
                f"replay_routing: the trace is of another model: layer {name} had "
                f"{trace.num_experts[name]} experts, the model's has {layer.num_experts}"
            )
        forwards[name] = [
            _Forward(experts, ws if weights is True else None, dropped, shape)
            for _, shape, experts, ws, dropped in trace.records[name]
        ]
    calls = {len(f) for f in forwards.values()}
    if len(calls) > 1:
        raise ValueError(f"replay_routing: the trace's layers hold different numbers of forwards: {sorted(calls)}")
    return forwards


def _per_layer(given, names: list[str], what: str) -> dict[str, list[Tensor]]:
    """{layer name: [tensor per forward]} from a mapping or a sequence over the layers."""
    if isinstance(given, Tensor):
        raise TypeError(f"replay_routing: {what} is one tensor; give one per MoE layer (mapping or sequence)")
    if isinstance(given, Mapping):
        if set(given) != set(names):
            missing, extra = sorted(set(names) - set(given)), sorted(set(given) - set(names))
            raise ValueError(
                f"replay_routing: {what} does not name this model's MoE layers: missing {missing}, unknown {extra}"
            )
        items = [given[name] for name in names]
    elif isinstance(given, Sequence):
        if len(given) != len(names):
            raise ValueError(
                f"replay_routing: {what} holds {len(given)} layer(s), the model has {len(names)} MoE layers"
            )
        items = list(given)
    else:
        raise TypeError(f"replay_routing: {what} must be a RoutingTrace, a mapping or a sequence, got {type(given)}")
    out = {}
    for name, item in zip(names, items, strict=True):
        calls = [item] if isinstance(item, Tensor) else list(item)
        for call, t in enumerate(calls):
            if not isinstance(t, Tensor):
                raise TypeError(f"replay_routing: {what} of layer {name}, forward {call} is {type(t)}, not a tensor")
        out[name] = calls
    return out


def _check_shapes(name: str, call: int, layer: MoE, given: _Forward) -> None:
    where = f"replay_routing: layer {name}, forward {call}"
    expert_choice = layer.router_type == "expert_choice"
    k = layer.num_experts if expert_choice else layer.top_k
    indices = given.indices
    if indices.dim() != 2 or indices.dtype.is_floating_point or indices.dtype == torch.bool or indices.dtype.is_complex:
        raise ValueError(
            f"{where}: experts must be an integer [T, k] tensor, got {indices.dtype} {tuple(indices.shape)}"
        )
    if indices.shape[1] != k:
        kind = f"expert choice over E = {k} experts" if expert_choice else f"top_k = {k}"
        raise ValueError(
            f"{where}: the routing names {indices.shape[1]} experts per token but the layer routes with {kind}"
        )
    if given.weights is not None and (not given.weights.is_floating_point() or given.weights.shape != indices.shape):
        raise ValueError(
            f"{where}: weights must be floating point in the experts' shape {tuple(indices.shape)}, got "
            f"{given.weights.dtype} {tuple(given.weights.shape)}"
        )
