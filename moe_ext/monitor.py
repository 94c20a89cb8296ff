"""Router observability: expert usage over steps, the per-token routing audit trace, and skew by token group."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .health import ExpertFlag, ExpertHealth, HealthTracker
from .layer import MoE

__all__ = ["ExpertFlag", "ExpertHealth", "ExpertUsage", "RoutingTrace", "GroupSkew", "trace_routing"]


def _moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    layers = [(name or "<root>", m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not layers:
        raise ValueError("no moe_ext.MoE layer found in the model")
    return layers


class ExpertUsage:
    """Accumulates every MoE layer's routing statistics over forwards, with no host sync until read.

    ``usage = ExpertUsage(model)`` hooks every ``moe_ext.MoE`` layer; each forward
    adds its tokens per expert (before and after capacity) to running totals.
    ``report()`` prints a table, ``plot(path)`` writes a layer x expert heatmap,
    ``log_to(writer, step)`` sends scalars and histograms to a TensorBoard
    ``SummaryWriter``, ``merge()`` sums the totals over a torch.distributed group,
    ``reset()`` starts over, ``close()`` (or leaving a ``with`` block) removes the hooks.

    ``health=True`` also keeps per-expert health (mean routing weight, output norm, and with
    ``watch(optimizer)`` gradient norm and update ratio; ``dead`` and ``dominant`` flags, an
    ``on_flag(flags, health)`` callback checked every ``check_every`` forwards or on ``check()``):
    read with ``health()``; see :mod:`moe_ext.health` for the definitions and keywords.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        health: bool = False,
        dead_after: int = 100,
        dominant_share: float | None = None,
        share_decay: float = 0.9,
        on_flag: Callable[[list[ExpertFlag], ExpertHealth], None] | None = None,
        check_every: int | None = None,
    ) -> None:
        self.layers = _moe_layers(model)
        self.names = [name for name, _ in self.layers]
        num_experts = {layer.num_experts for _, layer in self.layers}
        self.num_experts = max(num_experts)
        self._tracker = None
        if health:
            for name, layer in self.layers:
                if layer._health is not None:
                    raise RuntimeError(f"ExpertUsage: layer {name} is watched by another ExpertUsage(health=True)")
            self._tracker = HealthTracker(
                self.layers,
                self.num_experts,
                dead_after=dead_after,
                dominant_share=dominant_share,
                share_decay=share_decay,
                on_flag=on_flag,
                check_every=check_every,
            )
            for index, (_, layer) in enumerate(self.layers):
                layer._health = (self._tracker, index)
        elif on_flag is not None or check_every is not None:
            raise ValueError("ExpertUsage: on_flag and check_every need health=True")
        self._handles = [layer.register_forward_hook(self._hook(i)) for i, (_, layer) in enumerate(self.layers)]
        self.reset()

    def _hook(self, index: int):
        def hook(layer: MoE, inputs, output) -> None:
            stats = layer.last_stats
            if stats is None or not layer.track_stats or layer._recomputed:
                return
            with torch.no_grad():
                device = stats.tokens_per_expert.device
                if self.routed.device != device:
                    self.routed = self.routed.to(device)
                    self.kept = self.kept.to(device)
                    self.forwards = self.forwards.to(device)
                E = stats.tokens_per_expert.shape[0]
                self.routed[index, :E] += stats.tokens_per_expert
                self.kept[index, :E] += stats.tokens_per_expert_kept
                self.forwards[index] += 1

        return hook

    def reset(self) -> None:
        device = self.layers[0][1].expert_mask.device
        self.routed = torch.zeros(len(self.layers), self.num_experts, dtype=torch.int64, device=device)
        self.kept = torch.zeros_like(self.routed)
        self.forwards = torch.zeros(len(self.layers), dtype=torch.int64, device=device)
        if self._tracker is not None:
            self._tracker.reset()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._tracker is not None:
            self._tracker.close()
            for _, layer in self.layers:
                if layer._health is not None and layer._health[0] is self._tracker:
                    layer._health = None

    # ----- per-expert health (health=True) --------------------------------------------------------------

    def _health_tracker(self, what: str) -> HealthTracker:
        if self._tracker is None:
            raise RuntimeError(f"ExpertUsage.{what} needs ExpertUsage(model, health=True)")
        return self._tracker

    def health(self) -> ExpertHealth:
        """Every expert's health figures and flags, read now (host syncs here, not during training)."""
        return self._health_tracker("health()").health()

    def check(self) -> list[ExpertFlag]:
        """The flags raised since the last check (passed to ``on_flag`` too)."""
        return self._health_tracker("check()").check()

    def watch(self, optimizer: torch.optim.Optimizer, every: int = 50) -> None:
        """Gradient norms and update ratios per expert at every ``every``-th ``optimizer.step()``."""
        self._health_tracker("watch()").watch(optimizer, every)

    def __enter__(self) -> ExpertUsage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def merge(self, group=None) -> None:
        """Sums the totals over the processes of a torch.distributed group (collective: call on every rank)."""
        import torch.distributed as dist

        for tensor in (self.routed, self.kept, self.forwards):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        if (tracker := self._tracker) is not None:
            # Counters add up; an expert is idle as long as it is idle on every rank; gradient norms and
            # update ratios are the owner's (zero elsewhere) or the same on every replica: the maximum.
            for tensor in (tracker.tokens, tracker.total_tokens, tracker.weight_sum, tracker.kept):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
            for tensor in (tracker.norm_sum, tracker.norm_rows):
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
            dist.all_reduce(tracker.idle, op=dist.ReduceOp.MIN, group=group)
            dist.all_reduce(tracker.grad_norm, op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(tracker.update_ratio, op=dist.ReduceOp.MAX, group=group)
            dist.all_reduce(tracker.share_ema, op=dist.ReduceOp.SUM, group=group)
            tracker.share_ema /= dist.get_world_size(group)

    def load(self) -> Tensor:
        """[layers, E] share of each layer's assignments that went to each expert (before capacity)."""
        totals = self.routed.sum(-1, keepdim=True).clamp(min=1)
        return self.routed.double() / totals

    def summary(self) -> list[dict]:
        """Per layer: name, forwards, assignments, dropped, load max/mean, CV, and the load per expert."""
        rows = []
        routed, kept = self.routed.cpu(), self.kept.cpu()
        for i, (name, layer) in enumerate(self.layers):
            counts = routed[i, : layer.num_experts].double()
            mean = counts.mean().item()
            rows.append(
                {
                    "layer": name,
                    "forwards": int(self.forwards[i]),
                    "assignments": int(counts.sum()),
                    "dropped": int((routed[i] - kept[i]).sum()),
                    "max_over_mean": counts.max().item() / mean if mean > 0 else float("nan"),
                    "cv": counts.std(correction=0).item() / mean if mean > 0 else float("nan"),
                    "tokens_per_expert": routed[i, : layer.num_experts].tolist(),
                }
            )
        return rows

    def report(self) -> str:
        """A text table of the accumulated usage, one line per layer."""
        lines = [
            f"{'layer':<28} {'fwd':>5} {'assign':>9} {'dropped':>8} {'max/mean':>9} {'CV':>6}  share per expert (%)"
        ]
        for row in self.summary():
            total = max(row["assignments"], 1)
            shares = " ".join(f"{100 * c / total:4.1f}" for c in row["tokens_per_expert"])
            lines.append(
                f"{row['layer']:<28} {row['forwards']:>5} {row['assignments']:>9} {row['dropped']:>8} "
                f"{row['max_over_mean']:>9.2f} {row['cv']:>6.2f}  {shares}"
            )
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        """Writes a PNG heatmap: one row per layer, one column per expert, colour = share of assignments."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        load = self.load().cpu().numpy()
        fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * load.shape[1] + 2), max(2.0, 0.4 * load.shape[0] + 1.2)))
        image = ax.imshow(load, aspect="auto", cmap="viridis")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(self.names)), self.names, fontsize=7)
        ax.set_title("share of assignments per expert (uniform = 1/E)")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def log_to(self, writer, step: int, prefix: str = "moe") -> None:
        """Logs per-layer max/mean, CV, dropped and the expert-load histogram to a SummaryWriter."""
        for row, load in zip(self.summary(), self.load().cpu(), strict=True):
            tag = f"{prefix}/{row['layer']}"
            writer.add_scalar(f"{tag}/max_over_mean", row["max_over_mean"], step)
            writer.add_scalar(f"{tag}/cv", row["cv"], step)
            writer.add_scalar(f"{tag}/dropped", row["dropped"], step)
            writer.add_histogram(f"{tag}/expert_load", load, step)


@dataclass
class GroupSkew:
    """Routing of one token group in one layer, against the other tokens (see RoutingTrace.by_group)."""

    layer: str
    group: object
    tokens: int
    distribution: Tensor  # [E] share of this group's assignments per expert
    js_vs_rest: float  # Jensen-Shannon divergence (bits, 0..1) against all other tokens
    js_vs_all: float  # against all tokens, this group included


def _js_divergence(p: Tensor, q: Tensor) -> float:
    """Jensen-Shannon divergence in bits between two distributions (0 = same, 1 = disjoint supports)."""
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        mask = a > 0
        return (a[mask] * (a[mask] / b[mask]).log2()).sum()

    return float(0.5 * kl(p, m) + 0.5 * kl(q, m))


@dataclass
class RoutingTrace:
    """What every MoE layer did with every token while a trace recorded.

    Tokens are numbered globally in the order the model saw them: the first
    forward's tokens (its input's leading dims, flattened row-major) come
    first, then the next forward's, and so on. Per layer and forward the trace
    keeps the chosen experts (int16), their weights (float16), whether each
    assignment was dropped by capacity, and the input's leading shape, so a
    token's position (batch, sequence index) is recoverable with
    :meth:`position_of`.
    """

    layers: list[str] = field(default_factory=list)
    num_experts: dict[str, int] = field(default_factory=dict)
    # per layer: list over forwards of (first_token, leading_shape, experts, weights, dropped)
    records: dict[str, list[tuple[int, tuple, Tensor, Tensor, Tensor]]] = field(default_factory=dict)
    _next_token: dict[str, int] = field(default_factory=dict)

    def record(self, layer: MoE, indices: Tensor, weights: Tensor, row_of: Tensor, leading_shape) -> None:
        name = layer._trace_name
        first = self._next_token.get(name, 0)
        self._next_token[name] = first + indices.shape[0]
        self.records[name].append(
            (
                first,
                tuple(leading_shape),
                indices.to(torch.int16).cpu(),
                weights.to(torch.float16).cpu(),
                (row_of < 0).cpu(),
            )
        )

    # ----- queries ------------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return max(self._next_token.values(), default=0)

    def _cat(self, layer: str) -> tuple[Tensor, Tensor, Tensor]:
        if layer not in self.records:
            raise KeyError(f"layer {layer!r} is not in the trace; layers: {self.layers}")
        rows = self.records[layer]
        if not rows:
            return (
                torch.zeros(0, 0, dtype=torch.int16),
                torch.zeros(0, 0, dtype=torch.float16),
                torch.zeros(0, 0, dtype=torch.bool),
            )
        return (
            torch.cat([r[2] for r in rows]),
            torch.cat([r[3] for r in rows]),
            torch.cat([r[4] for r in rows]),
        )

    def experts(self, layer: str) -> Tensor:
        """[tokens, k] int16 chosen experts of every traced token in ``layer``."""
        return self._cat(layer)[0]

    def weights(self, layer: str) -> Tensor:
        """[tokens, k] float16 routing weights of every traced token in ``layer``."""
        return self._cat(layer)[1]

    def dropped(self, layer: str) -> Tensor:
        """[tokens, k] bool: True where capacity dropped the assignment."""
        return self._cat(layer)[2]

    def experts_for(self, token: int) -> dict[str, list[tuple[int, float, bool]]]:
        """For one global token id: per layer, the (expert, weight, dropped) of each of its k choices."""
        if not 0 <= token < self.num_tokens:
            raise IndexError(f"token {token} is outside the {self.num_tokens} traced tokens")
        out = {}
        for layer in self.layers:
            for first, _, experts, weights, dropped in self.records[layer]:
                if first <= token < first + experts.shape[0]:
                    i = token - first
                    out[layer] = [
                        (int(e), float(w), bool(d)) for e, w, d in zip(experts[i], weights[i], dropped[i], strict=True)
                    ]
        return out

    def tokens_for(self, layer: str, expert: int, include_dropped: bool = False) -> Tensor:
        """Global ids (int64, ascending) of the tokens that ``layer`` routed to ``expert``."""
        experts, _, dropped = self._cat(layer)
        hit = experts == expert
        if not include_dropped:
            hit &= ~dropped
        return hit.any(dim=-1).nonzero().flatten()

    def position_of(self, token: int) -> tuple[int, tuple[int, ...]]:
        """(forward number, index into that forward's leading dims) of a global token id."""
        rows = self.records[self.layers[0]]
        for call, (first, shape, experts, _, _) in enumerate(rows):
            if first <= token < first + experts.shape[0]:
                flat = token - first
                index = []
                for size in reversed(shape):
                    index.append(flat % size)
                    flat //= size
                return call, tuple(reversed(index))
        raise IndexError(f"token {token} is outside the {self.num_tokens} traced tokens")

    def by_group(self, labels: Sequence | Tensor) -> list[GroupSkew]:
        """Per layer and token group, the expert distribution and its Jensen-Shannon divergence.

        ``labels`` gives one label per traced token (any hashables, or an int
        tensor). ``js_vs_rest`` compares a group with all other tokens: 0 when
        they are routed alike, 1 bit when they never share an expert.
        ``js_vs_all`` compares it with all tokens including itself.
        """
        labels = labels.tolist() if isinstance(labels, Tensor) else list(labels)
        if len(labels) != self.num_tokens:
            raise ValueError(f"labels has {len(labels)} entries but the trace holds {self.num_tokens} tokens")
        groups = sorted(set(labels), key=repr)
        index_of = {g: i for i, g in enumerate(groups)}
        group_ids = torch.tensor([index_of[g] for g in labels], dtype=torch.int64)
        out = []
        for layer in self.layers:
            experts, _, dropped = self._cat(layer)
            E = self.num_experts[layer]
            k = experts.shape[1] if experts.dim() == 2 else 0
            keep = ~dropped
            flat_group = group_ids.repeat_interleave(k)[keep.flatten()]
            flat_expert = experts.flatten().long()[keep.flatten()]
            counts = torch.zeros(len(groups), E, dtype=torch.float64)
            counts.index_put_(
                (flat_group, flat_expert), torch.ones_like(flat_expert, dtype=torch.float64), accumulate=True
            )
            total = counts.sum(0)
            for g, name in enumerate(groups):
                mine, rest = counts[g], total - counts[g]
                p = mine / mine.sum().clamp(min=1)
                q = rest / rest.sum().clamp(min=1)
                everything = total / total.sum().clamp(min=1)
                out.append(
                    GroupSkew(
                        layer=layer,
                        group=name,
                        tokens=int((group_ids == g).sum()),
                        distribution=p,
                        js_vs_rest=_js_divergence(p, q) if rest.sum() > 0 else 0.0,
                        js_vs_all=_js_divergence(p, everything),
                    )
                )
        return out

    # ----- persistence --------------------------------------------------------------------------------

    def save(self, path: str) -> None:
        torch.save(
            {
                "format": "moe_ext.RoutingTrace/1",
                "layers": self.layers,
                "num_experts": self.num_experts,
                "records": self.records,
                "next_token": self._next_token,
            },
            path,
        )

    @classmethod
    def load(cls, path: str) -> RoutingTrace:
        data = torch.load(path, weights_only=True)
        if data.get("format") != "moe_ext.RoutingTrace/1":
            raise ValueError(f"{path} is not a moe_ext routing trace")
        return cls(
            layers=list(data["layers"]),
            num_experts=dict(data["num_experts"]),
            records={k: [tuple(r) for r in v] for k, v in data["records"].items()},
            _next_token=dict(data["next_token"]),
        )


@contextlib.contextmanager
def trace_routing(model: nn.Module) -> Iterator[RoutingTrace]:
    """Records the routing of every token in every MoE layer of ``model`` inside the block.

    Off by default; when off the layers pay one ``is None`` check per forward.
    """
    layers = _moe_layers(model)
    trace = RoutingTrace(
        layers=[name for name, _ in layers],
        num_experts={name: layer.num_experts for name, layer in layers},
        records={name: [] for name, _ in layers},
    )
    for name, layer in layers:
        if layer._trace_sink is not None:
            raise RuntimeError(f"layer {name} is already being traced")
        layer._trace_sink = trace
        layer._trace_name = name
    try:
        yield trace
    finally:
        for _, layer in layers:
            layer._trace_sink = None
