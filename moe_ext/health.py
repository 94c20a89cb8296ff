"""Per-expert health: what each expert receives, returns and learns, and flags for dead and dominant experts.

``ExpertUsage(model, health=True)`` keeps, per layer and expert, on the layers' device and with no
host sync until read:

- load: tokens routed to the expert (before capacity), and its share of the layer's tokens;
- mean routing weight of the assignments it kept;
- mean L2 norm of its output rows (before weighting), over the rows it computed for this process's tokens;
- with ``usage.watch(optimizer)``: the L2 norm of its parameters' gradient at the last optimizer step,
  and its update ratio ||theta_after - theta_before|| / ||theta_before|| over that step;
- ``dead``: no token for ``dead_after`` consecutive forwards (experts disabled on purpose excluded);
- ``dominant``: its share of the layer's tokens, an exponential moving average over forwards
  (``share_decay``, bias-corrected), above ``dominant_share`` (default per layer:
  min(3 k / E, (1 + k / E) / 2), k / E being the uniform share).

``usage.health()`` reads everything into an :class:`ExpertHealth` (report, plot). ``usage.check()``
(or every ``check_every`` forwards, automatically) compares the flags with the last check and passes
the newly raised ones to ``on_flag(flags, health)``, e.g. to clone a dominant expert into a dead one
with ``layer.clone_expert``. Forwards recomputed by activation checkpointing are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .distributed import EXPERT_PARAMETERS
from .layer import MoE
from .ops import RoutingPlan

__all__ = ["ExpertFlag", "ExpertHealth"]


@dataclass
class ExpertFlag:
    """A flag that rose at a check: ``kind`` is "dead" or "dominant"; ``value`` the idle forwards or the share."""

    layer_name: str
    layer: MoE
    expert: int
    kind: str
    value: float


@dataclass
class ExpertHealth:
    """Per layer (rows) and expert (columns), as read at one moment; NaN where a figure has no data yet
    (no kept token, no output row, no watched optimizer step) and for columns past a layer's expert count."""

    layers: list[str]
    forwards: list[int]
    tokens: Tensor  # [L, E] int64 tokens routed (before capacity)
    share: Tensor  # [L, E] float64 share of the layer's tokens since the last reset
    share_ema: Tensor  # [L, E] float64 moving average of the per-forward share (what `dominant` tests)
    mean_weight: Tensor  # [L, E] float64
    output_norm: Tensor  # [L, E] float64
    grad_norm: Tensor  # [L, E] float64, at the last watched optimizer step
    update_ratio: Tensor  # [L, E] float64, at the last watched optimizer step
    idle_forwards: Tensor  # [L, E] int64 consecutive forwards without a token
    dead: Tensor  # [L, E] bool
    dominant: Tensor  # [L, E] bool

    def flagged(self) -> list[tuple[str, int, str]]:
        """(layer, expert, "dead" or "dominant") for every raised flag."""
        out = []
        for kind, flags in (("dead", self.dead), ("dominant", self.dominant)):
            for i, e in flags.nonzero().tolist():
                out.append((self.layers[i], e, kind))
        return sorted(out)

    def report(self) -> str:
        """A text table: one line per layer and expert."""
        lines = [
            f"{'layer':<28} {'expert':>6} {'tokens':>8} {'share':>6} {'weight':>7} {'out norm':>9} "
            f"{'grad norm':>10} {'update':>9} {'idle':>5}  flags"
        ]
        for i, name in enumerate(self.layers):
            for e in range(self.tokens.shape[1]):
                if math.isnan(float(self.share[i, e])):
                    continue
                flags = ",".join(k for k, f in (("dead", self.dead), ("dominant", self.dominant)) if f[i, e])
                lines.append(
                    f"{name:<28} {e:>6} {int(self.tokens[i, e]):>8} {float(self.share[i, e]):>6.3f} "
                    f"{float(self.mean_weight[i, e]):>7.4f} {float(self.output_norm[i, e]):>9.4g} "
                    f"{float(self.grad_norm[i, e]):>10.4g} {float(self.update_ratio[i, e]):>9.3g} "
                    f"{int(self.idle_forwards[i, e]):>5}  {flags}"
                )
        return "\n".join(lines)

    def plot(self, path: str) -> None:
        """Writes a PNG: one heatmap per figure (layer x expert), dead experts marked x, dominant ones o."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [
            ("share of tokens", self.share),
            ("mean routing weight", self.mean_weight),
            ("output norm", self.output_norm),
            ("gradient norm", self.grad_norm),
            ("update ratio", self.update_ratio),
        ]
        L, E = self.tokens.shape
        fig, axes = plt.subplots(len(panels), 1, figsize=(max(5.0, 0.3 * E + 2.5), len(panels) * (0.35 * L + 1.2)))
        dead_y, dead_x = self.dead.nonzero(as_tuple=True)
        dom_y, dom_x = self.dominant.nonzero(as_tuple=True)
        for ax, (title, values) in zip(axes, panels, strict=True):
            image = ax.imshow(values.numpy(), aspect="auto", cmap="viridis")
            ax.scatter(dead_x.numpy(), dead_y.numpy(), marker="x", color="red", s=18)
            ax.scatter(dom_x.numpy(), dom_y.numpy(), marker="o", facecolors="none", edgecolors="white", s=22)
            ax.set_title(title, fontsize=9)
            ax.set_yticks(range(L), self.layers, fontsize=6)
            fig.colorbar(image, ax=ax)
        axes[-1].set_xlabel("expert (x: dead, o: dominant)")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


class HealthTracker:
    """The accumulators behind ``ExpertUsage(health=True)``; the layers call it from their forward."""

    def __init__(
        self,
        layers: list[tuple[str, MoE]],
        num_experts: int,
        *,
        dead_after: int,
        dominant_share: float | None,
        share_decay: float,
        on_flag: Callable[[list[ExpertFlag], ExpertHealth], None] | None,
        check_every: int | None,
    ) -> None:
        if not isinstance(dead_after, int) or dead_after < 1:
            raise ValueError(f"ExpertUsage: dead_after must be an int >= 1 (forwards), got {dead_after!r}")
        if dominant_share is not None and not 0.0 < dominant_share <= 1.0:
            raise ValueError(f"ExpertUsage: dominant_share must be in (0, 1] or None, got {dominant_share!r}")
        if not 0.0 <= share_decay < 1.0:
            raise ValueError(f"ExpertUsage: share_decay must be in [0, 1), got {share_decay!r}")
        if check_every is not None and (not isinstance(check_every, int) or check_every < 1):
            raise ValueError(f"ExpertUsage: check_every must be an int >= 1 or None, got {check_every!r}")
        if on_flag is not None and not callable(on_flag):
            raise TypeError(f"ExpertUsage: on_flag must be callable, got {type(on_flag).__name__}")
        self.layers, self.num_experts = layers, num_experts
        self.dead_after, self.share_decay = dead_after, share_decay
        self.on_flag, self.check_every = on_flag, check_every
        self.thresholds = [
            dominant_share
            if dominant_share is not None
            else min(3 * _per_token(layer) / layer.num_experts, (1 + _per_token(layer) / layer.num_experts) / 2)
            for _, layer in layers
        ]
        self._snapshots: dict[int, list[Tensor]] = {}
        self._optimizer_hooks: list = []
        self.reset()

    def reset(self) -> None:
        device = self.layers[0][1].expert_mask.device
        shape = (len(self.layers), self.num_experts)
        self.tokens = torch.zeros(shape, dtype=torch.int64, device=device)
        self.total_tokens = torch.zeros(len(self.layers), dtype=torch.int64, device=device)
        self.weight_sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.kept = torch.zeros(shape, dtype=torch.int64, device=device)
        self.norm_sum = torch.zeros(shape, dtype=torch.float64, device=device)
        self.norm_rows = torch.zeros(shape, dtype=torch.int64, device=device)
        self.idle = torch.zeros(shape, dtype=torch.int64, device=device)
        self.share_ema = torch.zeros(shape, dtype=torch.float64, device=device)
        self.grad_norm = torch.zeros(shape, dtype=torch.float64, device=device)
        self.update_ratio = torch.zeros(shape, dtype=torch.float64, device=device)
        self.forwards = [0] * len(self.layers)  # Python counts: no sync, and they drive the checks
        self.steps = 0
        self._raised = torch.zeros(2, *shape, dtype=torch.bool)

    # ----- called from the layer's forward (no host sync) ----------------------------------------------

    @torch.compiler.disable
    @torch.no_grad()
    def routing(self, index: int, indices: Tensor | None, weights: Tensor, plan: RoutingPlan) -> None:
        num_tokens = plan.row_of.shape[0]
        E = plan.counts.shape[0]
        kept = plan.row_of >= 0
        weights = weights.detach().double() * kept
        if indices is None:  # expert choice: [T, E]
            weight_sum, kept_count = weights.sum(0), kept.sum(0)
        else:
            flat, device = indices.reshape(-1), indices.device
            weight_sum = torch.zeros(E, dtype=torch.float64, device=device).index_add_(0, flat, weights.flatten())
            kept_count = torch.zeros(E, dtype=torch.int64, device=device).index_add_(0, flat, kept.flatten().long())
        counts = plan.counts
        self.tokens[index, :E] += counts
        self.total_tokens[index] += num_tokens
        self.weight_sum[index, :E] += weight_sum
        self.kept[index, :E] += kept_count
        if num_tokens:  # an empty forward (an expert-parallel rank without tokens) says nothing of usage
            self.idle[index, :E] = torch.where(counts > 0, 0, self.idle[index, :E] + 1)
            share = counts.double() / num_tokens
            self.share_ema[index, :E] = self.share_decay * self.share_ema[index, :E] + (1 - self.share_decay) * share
            self.forwards[index] += 1
        if self.check_every and index == len(self.layers) - 1 and self.forwards[index] % self.check_every == 0:
            self.check()

    @torch.compiler.disable
    @torch.no_grad()
    def outputs(self, index: int, y_sorted: Tensor, plan: RoutingPlan) -> None:
        """The expert output rows of this process's tokens, in the plan's layout (empty rows: token_of < 0)."""
        rows = y_sorted.shape[0]
        E = plan.offsets.shape[0] - 1
        expert_of_row = torch.repeat_interleave(
            torch.arange(E, device=y_sorted.device), plan.offsets.diff(), output_size=rows
        )
        valid = plan.token_of >= 0
        norms = torch.linalg.vector_norm(y_sorted.detach().float(), dim=1).double().masked_fill(~valid, 0.0)
        self.norm_sum[index, :E] += torch.zeros(E, dtype=torch.float64, device=norms.device).index_add_(
            0, expert_of_row, norms
        )
        self.norm_rows[index, :E] += torch.zeros(E, dtype=torch.int64, device=norms.device).index_add_(
            0, expert_of_row, valid.long()
        )

    # ----- optimizer steps ------------------------------------------------------------------------------

    def watch(self, optimizer: torch.optim.Optimizer, every: int = 50) -> None:
        """Measures gradient norms and update ratios at every ``every``-th ``optimizer.step()`` (the first
        included). A measured step reads the expert gradients once and the expert weights three times,
        and keeps one copy of the expert weights between its two halves, about an optimizer step's cost:
        ``every=1`` doubles the optimizer's time, the default spreads it over 50 steps."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"ExpertUsage.watch: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"ExpertUsage.watch: every must be an int >= 1 (optimizer steps), got {every!r}")
        state = {"step": 0, "measuring": False}

        def before(*_):
            state["measuring"] = state["step"] % every == 0
            state["step"] += 1
            if state["measuring"]:
                self._before_step()

        def after(*_):
            if state["measuring"]:
                self._after_step()

        self._optimizer_hooks.append(optimizer.register_step_pre_hook(before))
        self._optimizer_hooks.append(optimizer.register_step_post_hook(after))

    def close(self) -> None:
        for handle in self._optimizer_hooks:
            handle.remove()
        self._optimizer_hooks = []

    @staticmethod
    def _expert_params(layer: MoE) -> list[Tensor]:
        return [p for name in EXPERT_PARAMETERS if (p := getattr(layer, name)) is not None and p.requires_grad]

    @torch.no_grad()
    def _before_step(self) -> None:
        for index, (_, layer) in enumerate(self.layers):
            params = self._expert_params(layer)
            grads = [p.grad for p in params if p.grad is not None]
            lo, hi = layer.expert_offset, layer.expert_offset + layer.num_local_experts
            if grads:
                self.grad_norm[index, lo:hi] = _per_expert_norm(grads).double()
            snapshot = self._snapshots.get(index)
            if snapshot is None or [s.shape for s in snapshot] != [p.shape for p in params]:
                self._snapshots[index] = [p.detach().clone() for p in params]
            else:
                torch._foreach_copy_(snapshot, [p.detach() for p in params])

    @torch.no_grad()
    def _after_step(self) -> None:
        for index, (_, layer) in enumerate(self.layers):
            params, snapshot = self._expert_params(layer), self._snapshots[index]
            lo, hi = layer.expert_offset, layer.expert_offset + layer.num_local_experts
            size = _per_expert_norm(snapshot)
            torch._foreach_sub_(snapshot, [p.detach() for p in params])  # before - after, in the copy
            self.update_ratio[index, lo:hi] = (_per_expert_norm(snapshot) / size).double()
        self.steps += 1

    # ----- reading -------------------------------------------------------------------------------------

    def health(self) -> ExpertHealth:
        L, E = self.tokens.shape
        nan = float("nan")
        sizes = torch.tensor([layer.num_experts for _, layer in self.layers])
        columns = torch.arange(E).unsqueeze(0) < sizes.unsqueeze(1)
        enabled = torch.zeros(L, E, dtype=torch.bool)
        for i, (_, layer) in enumerate(self.layers):
            enabled[i, : layer.num_experts] = layer.expert_mask.cpu()
        tokens, total, kept = self.tokens.cpu(), self.total_tokens.cpu(), self.kept.cpu()
        norm_rows, idle = self.norm_rows.cpu(), self.idle.cpu()
        forwards = torch.tensor(self.forwards, dtype=torch.float64).unsqueeze(1)
        correction = 1 - self.share_decay**forwards
        share_ema = torch.where(forwards > 0, self.share_ema.cpu() / correction, nan)

        def per(values: Tensor, count: Tensor) -> Tensor:
            return torch.where(count > 0, values / count.clamp(min=1), nan)

        watched = self.steps > 0
        threshold = torch.tensor(self.thresholds, dtype=torch.float64).unsqueeze(1)
        return ExpertHealth(
            layers=[name for name, _ in self.layers],
            forwards=list(self.forwards),
            tokens=tokens,
            share=per(tokens.double(), total.unsqueeze(1).expand(L, E)).where(columns, nan),
            share_ema=share_ema.where(columns, nan),
            mean_weight=per(self.weight_sum.cpu(), kept).where(columns, nan),
            output_norm=per(self.norm_sum.cpu(), norm_rows).where(columns, nan),
            grad_norm=(self.grad_norm.cpu() if watched else torch.full((L, E), nan)).where(columns, nan),
            update_ratio=(self.update_ratio.cpu() if watched else torch.full((L, E), nan)).where(columns, nan),
            idle_forwards=idle,
            dead=(idle >= self.dead_after) & enabled & columns,
            dominant=(share_ema > threshold) & columns,
        )

    def check(self) -> list[ExpertFlag]:
        """Reads the flags (one host sync) and passes those raised since the last check to ``on_flag``."""
        health = self.health()
        now = torch.stack([health.dead, health.dominant])
        new = now & ~self._raised
        self._raised = now
        flags = []
        for kind, values, k in (("dead", health.idle_forwards, 0), ("dominant", health.share_ema, 1)):
            for i, e in new[k].nonzero().tolist():
                name, layer = self.layers[i]
                flags.append(ExpertFlag(name, layer, e, kind, float(values[i, e])))
        if flags and self.on_flag is not None:
            self.on_flag(flags, health)
        return flags


def _per_token(layer: MoE) -> float:
    """Experts per token: k (token choice) or the capacity factor (expert choice's mean)."""
    return layer.top_k if layer.router_type != "expert_choice" else float(layer.capacity_factor)


def _per_expert_norm(tensors: list[Tensor]) -> Tensor:
    """[E_local] L2 norm of each expert's slices of ``tensors`` together (float32, float64 for float64)."""
    squares = [
        torch.linalg.vector_norm(
            t.detach().reshape(t.shape[0], -1), dim=1, dtype=torch.promote_types(t.dtype, torch.float32)
        ).square()
        for t in tensors
    ]
    return torch.stack(squares).sum(0).sqrt()
