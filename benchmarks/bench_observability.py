"""Cost of router observability: routing stats, the routing trace, ExpertUsage and per-expert health.

    python benchmarks/bench_observability.py [--tokens 4096 --hidden 512 --repeats 20]

Two configs (mixtral-like E=8 k=2 F=1024, fine-grained E=64 k=8 F=256). Forward only: stats off /
on (the default) / on with a trace. Training step (forward, backward, Adam step): nothing watching /
ExpertUsage / ExpertUsage(health=True) / that with watch(optimizer) measuring gradient norms and
update ratios every step; the default (every 50th step) is derived from those two rows. Variants run
interleaved so machine noise hits all alike; medians and overheads are printed and written to
benchmarks/results/observability.json.
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
    """One model and optimizer for all variants (no memory-layout difference between them); each variant
    attaches its watcher for its call and removes it after (a few small allocations)."""
    model = moe_ext.MoE(layer.hidden_size, layer.ffn_hidden_size, layer.num_experts, top_k=layer.top_k)
    model.load_state_dict(layer.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    def watched(health: bool, watch: bool):
        with moe_ext.ExpertUsage(model, health=health) as usage:
            if watch:
                usage.watch(optimizer, every=1)
            step()

    return {
        "no watcher": step,
        "ExpertUsage": lambda: watched(False, False),
        "ExpertUsage(health)": lambda: watched(True, False),
        "+ watch(every=1)": lambda: watched(True, True),
    }


def isolated_health_costs(layer: moe_ext.MoE, x: torch.Tensor) -> dict:
    """The work health adds, timed alone on one forward's real routing: per forward (routing figures,
    output norms) and per measured optimizer step (gradient norms, weight copy, update ratios)."""
    captured = {}
    with moe_ext.ExpertUsage(layer, health=True) as usage:
        tracker = usage._tracker
        layer(x).square().mean().backward()  # gives the experts gradients
        route, outputs = tracker.routing, tracker.outputs
        with torch.no_grad():
            tokens = x.reshape(-1, layer.hidden_size)
            logits = layer.router(tokens)
            weights, indices, _, plan = layer.route(logits, x.shape[:-1])
            captured["y_sorted"] = torch.randn(plan.token_of.shape[0], layer.hidden_size)

        def per_forward():
            route(0, indices, weights, plan)
            outputs(0, captured["y_sorted"], plan)

        def per_measured_step():
            tracker._before_step()
            tracker._after_step()

        return time_interleaved(
            {"health, per forward": per_forward, "watch, per measured step": per_measured_step}, repeats=20
        )


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
            medians = {name: t["median_s"] for name, t in times.items()}
            if kind == "train step":  # the default watch measures one step in 50: its cost spread over them
                extra = medians["+ watch(every=1)"] - medians["ExpertUsage(health)"]
                medians["+ watch(every=50), derived"] = medians["ExpertUsage(health)"] + extra / 50
            for name, median in medians.items():
                overhead = 100 * (median - base) / base
                runs = str(times[name]["runs"]) if name in times else "-"
                rows.append([name, fmt_ms(median), f"{overhead:+.2f}%", runs])
                results.append(
                    dict(config=config, kind=kind, variant=name, median_ms=1e3 * median, overhead_pct=overhead)
                )
            title = (
                f"{config} {kind}: T={args.tokens} H={args.hidden} F={c['ffn']} E={c['experts']} k={c['top_k']}, "
                "median ms"
            )
            print_table(["variant", "ms", "overhead", "runs"], rows, title)
            if kind == "train step":
                step_s = times["no watcher"]["median_s"]
                rows = []
                for name, t in isolated_health_costs(layer, x).items():
                    share = 100 * t["median_s"] / step_s
                    rows.append([name, fmt_ms(t["median_s"]), f"{share:.2f}%"])
                    results.append(
                        dict(
                            config=config,
                            kind="isolated",
                            variant=name,
                            median_ms=1e3 * t["median_s"],
                            share_of_step_pct=share,
                        )
                    )
                per_forward = results[-2]["share_of_step_pct"]
                default = per_forward + results[-1]["share_of_step_pct"] / 50
                rows.append(["health + watch(every=50), per step", "-", f"{default:.2f}%"])
                results.append(
                    dict(config=config, kind="isolated", variant="health + watch(every=50)", share_of_step_pct=default)
                )
                print_table(["work health adds, timed alone", "ms", "of a step"], rows, f"{config}: isolated")
    path = write_json("observability.json", {"environment": env, "config": vars(args), "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
