"""Cost of router observability: layer forward with routing stats on/off and with the routing trace on/off.

    python benchmarks/bench_observability.py [--tokens 4096 --hidden 512 --ffn 1024 --experts 8 --top-k 2]

Runs the variants interleaved (A, B, A, B, ...) so machine noise hits both
alike, reports medians, and writes benchmarks/results/observability.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import moe_ext


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "observability.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    layer = moe_ext.MoE(args.hidden, args.ffn, args.experts, top_k=args.top_k)
    x = torch.randn(args.tokens, args.hidden)

    def forward_plain():
        layer.track_stats = False
        layer(x)

    def forward_stats():
        layer.track_stats = True
        layer(x)
        layer.last_stats.tokens_per_expert  # noqa: B018  (built, not read: no sync, as in training)

    def forward_traced():
        layer.track_stats = True
        with moe_ext.trace_routing(layer):
            layer(x)

    variants = {"no stats": forward_plain, "stats (default)": forward_stats, "stats + trace": forward_traced}
    times = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():
            for _ in range(3):
                fn()
        for _ in range(args.repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["no stats"])
    rows = []
    print(
        f"MoE forward, T={args.tokens} H={args.hidden} F={args.ffn} E={args.experts} k={args.top_k}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}"
    )
    print(f"{'variant':<18} {'ms':>9} {'overhead':>9}")
    for name, samples in times.items():
        median = statistics.median(samples)
        overhead = 100 * (median - base) / base
        rows.append({"variant": name, "median_ms": 1e3 * median, "overhead_pct": overhead})
        print(f"{name:<18} {1e3 * median:>9.2f} {overhead:>8.2f}%")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "config": vars(args),
                "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "results": rows,
            },
            f,
            indent=2,
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
