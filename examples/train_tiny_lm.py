"""Trains a small byte-level MoE transformer on Python's own documentation text, then reports its routing.

The corpus is `pydoc_data.topics`, the help() text that ships with CPython
(~460 KB of English written by the Python documentation authors), so the
example runs offline on any machine. A dense model is built first; its
feed-forward blocks are then swapped for moe_ext.MoE layers, as a user would
do with an existing model. Before it, the same dense model with a SwiGLU FFN
as wide as the MoE's active experts together (the same active FLOPs per token)
trains on the same batches: the table and `dense_vs_moe.png` show validation
loss against step and wall time, parameters, active parameters and tokens/s.

    python examples/train_tiny_lm.py                 # defaults: < 3 minutes on 2 cores
    python examples/train_tiny_lm.py --steps 50      # quicker
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import moe_ext


def load_corpus() -> bytes:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics)).encode("utf-8")


class Block(nn.Module):
    def __init__(self, width: int, heads: int, ffn_width: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.ffn: nn.Module = nn.Sequential(nn.Linear(width, ffn_width), nn.GELU(), nn.Linear(ffn_width, width))

    def forward(self, x: torch.Tensor, causal_mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=causal_mask, need_weights=False)[0]
        return x + self.ffn(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(Block(width, heads, 4 * width) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256, bias=False)
        self.register_buffer("causal_mask", torch.triu(torch.full((context, context), float("-inf")), 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        T = tokens.shape[1]
        x = self.embed(tokens) + self.position[:T]
        for block in self.blocks:
            x = block(x, self.causal_mask[:T, :T])
        return self.head(self.norm(x))


def swap_in_moe(model: TinyLM, num_experts: int, top_k: int, ffn_width: int, aux_loss_coef: float) -> int:
    """Replaces every block's dense FFN by an MoE layer, as one would in an existing model."""
    return moe_ext.replace_modules(
        model,
        match=lambda name, module: name.endswith(".ffn"),
        build=lambda name, module: moe_ext.MoE(
            module[0].in_features,
            ffn_width,
            num_experts,
            top_k=top_k,
            activation="swiglu",
            aux_loss_coef=aux_loss_coef,
            z_loss_coef=1e-3,
        ),
    )


def progress(step: int, total: int, loss: float, started: float) -> None:
    done = int(30 * step / total)
    elapsed = time.time() - started
    eta = elapsed / max(step, 1) * (total - step)
    sys.stdout.write(
        f"\r[{'#' * done}{'.' * (30 - done)}] {step}/{total} loss {loss:.3f} elapsed {elapsed:5.1f}s eta {eta:5.1f}s"
    )
    sys.stdout.flush()


def plot_utilization(history: list[torch.Tensor], steps: list[int], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipped {path}")
        return False
    loads = torch.stack(history)  # [snapshots, layers, experts], fraction of assignments
    layers = loads.shape[1]
    fig, axes = plt.subplots(1, layers, figsize=(4 * layers, 3.2), sharey=True, squeeze=False)
    for layer in range(layers):
        ax = axes[0, layer]
        for expert in range(loads.shape[2]):
            ax.plot(steps, loads[:, layer, expert].numpy(), label=f"expert {expert}")
        ax.axhline(1.0 / loads.shape[2], color="black", linestyle="--", linewidth=0.8)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("step")
    axes[0, 0].set_ylabel("share of assignments")
    axes[0, -1].legend(fontsize=6, loc="upper right")
    fig.suptitle("Expert utilization during training (dashed: perfectly balanced)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


class DenseSwiGLU(nn.Module):
    """The dense baseline's FFN: one SwiGLU MLP as wide as the MoE's active experts together (top_k x F),
    so both models spend the same feed-forward FLOPs per token."""

    def __init__(self, width: int, ffn_width: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(width, 2 * ffn_width, bias=False)
        self.w_out = nn.Linear(ffn_width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


def swap_in_dense(model: TinyLM, ffn_width: int) -> int:
    return moe_ext.replace_modules(
        model,
        match=lambda name, module: name.endswith(".ffn"),
        build=lambda name, module: DenseSwiGLU(module[0].in_features, ffn_width),
    )


def active_parameters(model: nn.Module) -> int:
    """Parameters a token uses: all of them, but only top_k of every MoE layer's E experts."""
    total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, moe_ext.MoE) and name in ("w_in", "w_out", "b_in", "b_out"):
                total += p.numel() * module.top_k // module.num_experts
            else:
                total += p.numel()
    return total


def validation_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        losses = [F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).item() for x, y in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def plot_comparison(runs: list[dict], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: skipped {path}")
        return False
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for run in runs:
        label = f"{run['name']} ({run['parameters'] / 1e6:.2f}M params, {run['active_parameters'] / 1e6:.2f}M active)"
        by_step.plot(run["eval_steps"][1:], run["eval_losses"][1:], marker="o", markersize=3, label=label)
        by_time.plot(run["eval_seconds"][1:], run["eval_losses"][1:], marker="o", markersize=3, label=label)
    by_step.set_xlabel("step")
    by_time.set_xlabel("training wall time (s)")
    by_step.set_ylabel("validation loss (nats/byte)")
    by_step.legend(fontsize=7)
    fig.suptitle("Dense baseline vs moe_ext MoE at the same active FLOPs per token (from the first log step)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def train(name: str, model: TinyLM, args, train_data, valid_batches) -> dict:
    """Trains one model on the same batches as the others; returns its record."""
    torch.manual_seed(args.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)  # the same training batches for every model
    moe_layers = [m for m in model.modules() if isinstance(m, moe_ext.MoE)]
    record = dict(
        name=name,
        parameters=sum(p.numel() for p in model.parameters()),
        active_parameters=active_parameters(model),
        eval_steps=[0],
        eval_seconds=[0.0],
        eval_losses=[validation_loss(model, valid_batches)],
        usage_history=[],
        usage_steps=[],
        moe_layers=moe_layers,
    )
    window_counts = torch.zeros(len(moe_layers), args.experts)
    losses, train_seconds, run_started = [], 0.0, time.time()
    print(f"\n{name}: {record['parameters']:,} parameters, {record['active_parameters']:,} active per token")
    for step in range(1, args.steps + 1):
        inputs, targets = sample(train_data, args, generator)
        started = time.perf_counter()
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # the MoE aux losses add their gradient here (aux_loss_mode="auto")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        train_seconds += time.perf_counter() - started
        losses.append(loss.item())
        if moe_layers:
            window_counts += torch.stack([layer.last_stats.tokens_per_expert.float() for layer in moe_layers])
        if step % args.log_every == 0 or step == args.steps:
            if moe_layers:
                record["usage_history"].append(window_counts / window_counts.sum(-1, keepdim=True))
                record["usage_steps"].append(step)
                window_counts.zero_()
            record["eval_steps"].append(step)
            record["eval_seconds"].append(train_seconds)
            record["eval_losses"].append(validation_loss(model, valid_batches))
            mean_loss = sum(losses[-args.log_every :]) / len(losses[-args.log_every :])
            sys.stdout.write("\r" + " " * 100 + "\r")
            aux = f"  aux {float(moe_ext.aux_loss(model)):.4f}" if moe_layers else ""
            print(
                f"step {step:4d}  loss {mean_loss:.3f} (bits/byte {mean_loss / 0.6931:.2f})  "
                f"validation {record['eval_losses'][-1]:.3f}{aux}"
            )
        progress(step, args.steps, losses[-1], run_started)
    print()
    record["train_seconds"] = train_seconds
    record["tokens_per_second"] = args.steps * args.batch * args.context / train_seconds
    record["first_losses"] = sum(losses[:10]) / min(10, len(losses))
    return record


def sample(source: torch.Tensor, args, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(source) - args.context - 1, (args.batch,), generator=generator)
    window = torch.stack([source[s : s + args.context + 1] for s in starts.tolist()])
    return window[:, :-1], window[:, 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--aux-loss-coef", type=float, default=0.01)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-dense", action="store_true", help="train the MoE model only (no dense baseline)")
    parser.add_argument("--out", default="results", help="folder for the plots")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    data = torch.frombuffer(bytearray(load_corpus()), dtype=torch.uint8).long()
    split = int(0.95 * len(data))
    train_data, valid_data = data[:split], data[split:]
    print(
        f"corpus: pydoc_data.topics, {len(data):,} bytes ({len(train_data):,} train / {len(valid_data):,} validation)"
    )
    valid_generator = torch.Generator().manual_seed(args.seed + 7)
    valid_batches = [sample(valid_data, args, valid_generator) for _ in range(8)]
    expert_width = 2 * args.width
    started = time.time()

    # Both models start from the same dense model (same seed: same attention, embeddings, head); the MoE
    # one gets E experts of width F, the dense one a SwiGLU FFN of width top_k * F: the same active FLOPs.
    runs = []
    if not args.no_dense:
        torch.manual_seed(args.seed)
        dense = TinyLM(args.width, args.layers, heads=4, context=args.context)
        swap_in_dense(dense, args.top_k * expert_width)
        runs.append(train(f"dense SwiGLU F={args.top_k * expert_width}", dense, args, train_data, valid_batches))
    torch.manual_seed(args.seed)
    model = TinyLM(args.width, args.layers, heads=4, context=args.context)
    swapped = swap_in_moe(model, args.experts, args.top_k, ffn_width=expert_width, aux_loss_coef=args.aux_loss_coef)
    print(
        f"\nmodel: {args.layers} blocks, width {args.width}, {swapped} FFNs swapped for moe_ext.MoE "
        f"({args.experts} experts, top-{args.top_k}), {torch.get_num_threads()} threads"
    )
    moe_name = f"moe_ext MoE {args.experts}x F={expert_width} top-{args.top_k}"
    moe = train(moe_name, model, args, train_data, valid_batches)
    runs.append(moe)

    print(f"\n{'model':<34} {'params':>9} {'active':>9} {'tokens/s':>9} {'train s':>8} {'validation loss':>16}")
    for run in runs:
        print(
            f"{run['name']:<34} {run['parameters']:>9,} {run['active_parameters']:>9,} "
            f"{run['tokens_per_second']:>9,.0f} {run['train_seconds']:>8.1f} {run['eval_losses'][-1]:>16.3f}"
        )
    print(
        f"validation loss {moe['eval_losses'][-1]:.3f} "
        f"(first training steps: {moe['first_losses']:.3f}); {time.time() - started:.1f}s total"
    )

    os.makedirs(args.out, exist_ok=True)
    plot_path = os.path.join(args.out, "expert_utilization.png")
    if plot_utilization(moe["usage_history"], moe["usage_steps"], plot_path):
        print(f"expert utilization plot: {plot_path}")
    comparison_path = os.path.join(args.out, "dense_vs_moe.png")
    if len(runs) > 1 and plot_comparison(runs, comparison_path):
        print(f"validation loss against step and wall time: {comparison_path}")

    print("\nrouting report (last validation batch)")
    print(f"{'layer':>5} {'max/mean':>9} {'CV':>6} {'entropy':>8} {'dropped':>8}  tokens per expert")
    for index, layer in enumerate(moe["moe_layers"]):
        stats = layer.last_stats.as_dict()
        print(
            f"{index:>5} {stats['load_imbalance']:>9.2f} {stats['load_cv']:>6.2f} "
            f"{stats['router_entropy']:>8.3f} {stats['dropped']:>8d}  {stats['tokens_per_expert']}"
        )
    print(f"(a uniform router has entropy ln({args.experts}) = {torch.tensor(float(args.experts)).log():.3f})")


if __name__ == "__main__":
    main()
