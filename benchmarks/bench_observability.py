"""Cost of router observability: routing stats, the routing trace, ExpertUsage and per-expert health.

    python benchmarks/bench_observability.py [--tokens 4096 --hidden 512 --repeats 20]

Two configs (mixtral-like E=8 k=2 F=1024, fine-grained E=64 k=8 F=256). Forward only: stats off /
on (the default) / on with a trace. Training step (forward, backward, Adam step): nothing watching /
ExpertUsage / ExpertUsage(health=True) / that with watch(optimizer) measuring gradient norms and
update ratios every 50 steps (the default) or every step. Variants run interleaved so machine noise
hits all alike; medians and overheads are printed and written to benchmarks/results/observability.json.
"""

from __future__ import annotations

import argparse

import torch
from _common import environment, fmt_ms, print_table, time_interleaved, write_json

import moe_ext

CONFIGS = {"mixtral-like": dict(ffn=1024, experts=8, top_k=2), "fine-grained": dict(ffn=256, experts=64, top_k=8)}


def forward_variants(layer: moe_ext.MoE, x: torch.Tensor) -> dict:
    def plain():
        layer.track_stats = False
        with torch.no_grad():
            layer(x)

    def stats():
        layer.track_stats = True
        with torch.no_grad():
            layer(x)
        layer.last_stats.tokens_per_expert  # noqa: B018  (built, not read: no sync, as in training)

    def traced():
        layer.track_stats = True
        with torch.no_grad(), moe_ext.trace_routing(layer):
            layer(x)

    return {"no stats": plain, "stats (default)": stats, "stats + trace": traced}


def training_variants(layer: moe_ext.MoE, x: torch.Tensor) -> dict:
    """One model per variant (same init), so the watchers stay attached and the optimizers apart."""
    variants = {}
    for name in ("no watcher", "ExpertUsage", "ExpertUsage(health)", "+ watch(every=50)", "+ watch(every=1)"):
        model = moe_ext.MoE(layer.hidden_size, layer.ffn_hidden_size, layer.num_experts, top_k=layer.top_k)
        model.load_state_dict(layer.state_dict())
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        if name == "ExpertUsage":
            moe_ext.ExpertUsage(model)
        elif name != "no watcher":
            usage = moe_ext.ExpertUsage(model, health=True)
            if name.startswith("+ watch"):
                usage.watch(optimizer, every=int(name.split("=")[1].rstrip(")")))

        def step(model=model, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            optimizer.step()

        variants[name] = step
    return variants


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    env = environment()
    print(f"torch {env['torch']}, {env['threads']} threads, {env['processor']}, load average {env['loadavg']}")
    results = []
    for config in args.configs.split(","):
        c = CONFIGS[config]
        torch.manual_seed(0)
        layer = moe_ext.MoE(args.hidden, c["ffn"], c["experts"], top_k=c["top_k"])
        x = torch.randn(args.tokens, args.hidden)
        for kind, variants in (("forward", forward_variants(layer, x)), ("train step", training_variants(layer, x))):
            times = time_interleaved(variants, repeats=args.repeats, warmup=3)
            base = times[next(iter(variants))]["median_s"]
            rows = []
            for name, t in times.items():
                overhead = 100 * (t["median_s"] - base) / base
                rows.append([name, fmt_ms(t["median_s"]), f"{overhead:+.2f}%", str(t["runs"])])
                results.append(
                    dict(config=config, kind=kind, variant=name, median_ms=1e3 * t["median_s"], overhead_pct=overhead)
                )
            title = (
                f"{config} {kind}: T={args.tokens} H={args.hidden} F={c['ffn']} E={c['experts']} k={c['top_k']}, "
                "median ms"
            )
            print_table(["variant", "ms", "overhead", "runs"], rows, title)
    path = write_json("observability.json", {"environment": env, "config": vars(args), "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
