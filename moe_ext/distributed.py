"""Expert parallelism over torch.distributed, and the helpers that go with it.

A :class:`moe_ext.MoE` (or :class:`moe_ext.Experts`) built with ``expert_parallel_group=pg``
holds only its share of the experts: with W ranks in ``pg`` and E experts, rank r holds experts
``[r * E / W, (r + 1) * E / W)`` in ``w_in``/``w_out`` (and ``b_in``/``b_out``). The router,
the shared expert and every other parameter stay whole on every rank. Each forward:

1. every rank routes its own tokens (gating, plan, dispatch) exactly as the single-process
   layer does, so its rows come out grouped by global expert id, hence by owning rank;
2. the per-expert row counts go to the owners (one ``all_to_all_single`` of E integers), then
   the rows themselves (``all_to_all_single`` with the counts as split sizes);
3. the owner regroups what it received by local expert (moe_ext's own plan/dispatch), runs its
   experts with the grouped kernels and puts the results back in the order received;
4. a second ``all_to_all_single`` returns the rows to their tokens' ranks, where ``combine``
   weights and sums them.

Autograd runs both exchanges in reverse. Every rank must therefore run the forward *and* the
backward of every expert-parallel layer the same number of times, in the same order (as with
any collective); a rank with no tokens still takes part.

Gradients: the experts on rank r receive the gradient of the *sum* of all ranks' losses
(each rank's loss back-propagates into the experts its tokens used). DistributedDataParallel
*averages* the dense gradients over ranks; :func:`average_expert_gradients` divides the
expert gradients by the group size so that both are the gradient of the mean loss. DDP must
not all-reduce the expert shards (they differ by rank): :func:`exclude_experts_from_ddp`
before wrapping, or build the optimizer groups from :func:`expert_parameters` and
:func:`dense_parameters`.

Checkpoints: ``layer.state_dict()`` holds the local shard. :func:`full_state_dict` gathers
every layer's experts into the single-process layout (the same keys and shapes as a layer
with all E experts), and ``load_state_dict`` of such a full state dict into an
expert-parallel layer keeps only the local experts: a checkpoint written at one world size
loads at any other, and into a single-process model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import ops

__all__ = [
    "average_expert_gradients",
    "clip_grad_norm_",
    "dense_parameters",
    "exclude_experts_from_ddp",
    "expert_parameter_names",
    "expert_parameters",
    "full_state_dict",
]

# The per-expert tensors of an expert module ([E, ...], or [E / W, ...] when expert-parallel). This
# file finds expert-parallel modules by what they hold (an ``expert_parallel_group`` and these
# tensors), not by class: the modules import this file, never the reverse.
EXPERT_PARAMETERS = ("w_in", "w_out", "b_in", "b_out")


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 with given split sizes; the backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        return _all_to_all(x, out_splits, in_splits, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _all_to_all(grad, ctx.in_splits, ctx.out_splits, ctx.group), None, None, None


def _all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


def run_experts(
    expert_ffn: Callable[[Tensor, Tensor], Tensor], x_sorted: Tensor, offsets: Tensor, group, num_local_experts: int
) -> Tensor:
    """Expert outputs for rows grouped by global expert id (``offsets`` [E + 1]), computed by the
    ranks of ``group`` that own the experts: ``expert_ffn(rows, local_offsets)`` runs this rank's
    ``num_local_experts`` experts. The result has the rows of ``x_sorted``, in the same order."""
    world, local = dist.get_world_size(group), num_local_experts
    rows_per_expert = offsets.diff()
    # How many rows each rank sends this rank for each of its local experts: [W * E_local],
    # laid out (source rank, local expert).
    received_per_expert = torch.empty_like(rows_per_expert)
    dist.all_to_all_single(received_per_expert, rows_per_expert, group=group)
    # Split sizes must be Python ints: the one host read of the expert-parallel path.
    in_splits = rows_per_expert.view(world, local).sum(1).tolist()
    out_splits = received_per_expert.view(world, local).sum(1).tolist()
    received = _AllToAll.apply(x_sorted, out_splits, in_splits, group)

    # Regroup by local expert: a one-choice plan over the local experts (stable, so the rows of each
    # expert stay in (source rank, token) order), dispatched and later combined with unit weights.
    expert_of_row = torch.arange(local, device=offsets.device).repeat(world)
    expert_of_row = torch.repeat_interleave(expert_of_row, received_per_expert, output_size=received.shape[0])
    plan = ops.make_plan(expert_of_row.unsqueeze(1), local, None)
    y_local = expert_ffn(ops.dispatch(received, plan), plan.offsets)
    y_received = ops.combine(y_local, y_local.new_ones(received.shape[0], 1), plan)
    return _AllToAll.apply(y_received, in_splits, out_splits, group)


def check_same_config(group, config: dict) -> None:
    """Raises on every rank of ``group`` if the ranks were given different ``config`` values."""
    gathered: list[dict | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, config, group=group)
    differing = sorted({key for other in gathered for key in config if other.get(key) != config[key]})
    if differing:
        detail = "; ".join(
            f"{key}: " + ", ".join(f"rank {r}={c.get(key)!r}" for r, c in enumerate(gathered)) for key in differing
        )
        raise ValueError(f"MoE: the ranks of expert_parallel_group were given different settings ({detail})")


def _expert_parallel_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if getattr(module, "expert_parallel_group", None) is not None:
            yield name, module


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_parameters()``) of the expert weights sharded over an expert-parallel group."""
    names = []
    for prefix, layer in _expert_parallel_layers(model):
        for attr in EXPERT_PARAMETERS:
            if getattr(layer, attr) is not None:
                names.append(f"{prefix}.{attr}" if prefix else attr)
    return names


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The expert weights sharded over an expert-parallel group (each rank holds different ones)."""
    wanted = set(expert_parameter_names(model))
    return [p for name, p in model.named_parameters() if name in wanted]


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every other parameter: replicated on every rank, for data-parallel all-reduce."""
    wanted = set(expert_parameter_names(model))
    return [p for name, p in model.named_parameters() if name not in wanted]


def exclude_experts_from_ddp(model: nn.Module) -> list[str]:
    """Tells DistributedDataParallel not to all-reduce (nor broadcast) the expert shards of ``model``.

    Call it on the unwrapped model, before ``DistributedDataParallel(model)``. Returns the names excluded.
    """
    names = expert_parameter_names(model)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


@torch.no_grad()
def average_expert_gradients(model: nn.Module, replica_group=None) -> None:
    """Makes the expert gradients the gradient of the mean loss over all data-parallel ranks, as DDP's are.

    After a backward, an expert's gradient is the sum over its expert-parallel group of the ranks'
    losses' gradients; this divides it by the group size. With ``replica_group`` (the ranks holding
    the same experts when the world is larger than one expert-parallel group: for example expert
    parallelism within a node, data parallelism across nodes) the gradients are first summed over
    it, then divided by both sizes. Call between ``backward()`` and ``optimizer.step()``.
    """
    replicas = 1 if replica_group is None else dist.get_world_size(replica_group)
    for _, layer in _expert_parallel_layers(model):
        for attr in EXPERT_PARAMETERS:
            param = getattr(layer, attr)
            if param is None or param.grad is None:
                continue
            if replica_group is not None:
                dist.all_reduce(param.grad, group=replica_group)
            param.grad.div_(layer.expert_parallel_size * replicas)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole expert-parallel model: the total 2-norm counts the
    dense gradients once (they are the same on every rank after DDP) and every rank's expert shards.

    A collective over the expert-parallel group (all layers must share one). Returns the total norm, the
    same on every rank, and scales every gradient by the same factor on every rank.
    """
    layers = [layer for _, layer in _expert_parallel_layers(model)]
    dense = [p.grad for p in dense_parameters(model) if p.grad is not None]
    experts = [p.grad for p in expert_parameters(model) if p.grad is not None]
    device = (dense + experts)[0].device if dense + experts else torch.device("cpu")

    def sum_of_squares(grads: list[Tensor]) -> Tensor:
        return sum((g.detach().float().square().sum() for g in grads), torch.zeros((), device=device))

    dense_sq, expert_sq = sum_of_squares(dense), sum_of_squares(experts)
    if layers:
        if len({id(layer.expert_parallel_group) for layer in layers}) > 1:
            raise ValueError("moe_ext.distributed.clip_grad_norm_: the expert-parallel layers use different groups")
        dist.all_reduce(expert_sq, group=layers[0].expert_parallel_group)
    total = (dense_sq + expert_sq).sqrt()
    factor = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in dense + experts:
        grad.mul_(factor.to(grad.dtype))
    return total


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with every expert-parallel layer's experts gathered from its group.

    The result has the keys and shapes of the same model built without expert parallelism, so it
    loads into that model and, through ``load_state_dict``, into the model at any world size that
    divides E. A collective: every rank of every expert-parallel group must call it; each gets
    the full state dict (save it from one rank).
    """
    state = model.state_dict()
    for prefix, layer in _expert_parallel_layers(model):
        for attr in EXPERT_PARAMETERS:
            param = getattr(layer, attr)
            if param is None:
                continue
            shards = [torch.empty_like(param) for _ in range(layer.expert_parallel_size)]
            dist.all_gather(shards, param.detach().contiguous(), group=layer.expert_parallel_group)
            state[f"{prefix}.{attr}" if prefix else attr] = torch.cat(shards)
    return state
