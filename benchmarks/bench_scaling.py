"""How moe_ext.MoE scales with the token count T and, at fixed active FLOPs, with the expert count E.

    PYTHONPATH=. python benchmarks/bench_scaling.py [--quick] [--dtype float32] [--modes forward,forward+backward]

T sweep: E=8, k=2, H=256, F=256, T = 256 .. 32768 (x2 steps).
E sweep: T=4096, k=2, H=256, F=256, E = 8 .. 256 (x2 steps): every token still runs k experts of
the same size, so the active FLOPs stay fixed while the rows per expert (T*k/E) shrink.
Each point times moe_ext, the GEMM floor and the best plain-PyTorch and transformers peers
(round-robin, median of --repeats runs), checks the peers' outputs first, and writes
benchmarks/results/bench_scaling.json and bench_scaling.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import bench_moe  # noqa: E402
import peers  # noqa: E402

SWEEP_PEERS = ["torch_sorted_gmm", "hf_qwen3[grouped_mm]"]


def sweep_points(args) -> list[tuple[str, bench_moe.Config]]:
    H, Fh, k = args.hidden, args.ffn, args.top_k
    t_values = [2**i for i in range(8, 16)]  # 256 .. 32768
    e_values = [2**i for i in range(3, 9)]  # 8 .. 256
    if args.quick:
        H, Fh, t_values, e_values = 64, 64, [64, 256, 1024], [8, 32, 128]
    points = [("T", bench_moe.Config(8, k, H, Fh, t)) for t in t_values if t <= args.max_tokens]
    points += [("E", bench_moe.Config(e, k, H, Fh, args.sweep_tokens if not args.quick else 512)) for e in e_values]
    return points


def measure(config: bench_moe.Config, dtype: torch.dtype, modes: list[str], args) -> dict:
    lean, _ = bench_moe.build_layers(config, dtype, args.seed)
    torch.manual_seed(args.seed + 1)
    x = torch.randn(config.tokens, config.hidden, dtype=dtype)
    grad = torch.randn(config.tokens, config.hidden, dtype=dtype)
    hf_impls: dict[str, list[str]] = {}
    for name in SWEEP_PEERS:
        if name.startswith("hf_"):
            kind, impl = name[3:].rstrip("]").split("[")
            hf_impls.setdefault(kind, []).append(impl)
    modules = {"moe_ext": lean, **peers.make_peers(lean, hf_impls=hf_impls, include=set(SWEEP_PEERS))}
    for name, module in modules.items():
        if name != "moe_ext":
            bench_moe.check(name, module, lean, x, grad, with_backward="forward+backward" in modes)
    floor = peers.GemmFloor(lean, x)
    fns = {n: bench_moe.step_fns(m, x, grad) for n, m in modules.items()}
    out = {}
    for mode in modes:
        which = 0 if mode == "forward" else 1
        timed = bench_moe.floor_fns(floor, which)
        timed.update({n: f[which] for n, f in fns.items()})
        times = _common.time_interleaved(timed, repeats=args.repeats, warmup=args.warmup)
        best = min(bench_moe.FLOORS, key=lambda n: times[n]["median_s"])
        times["floor"] = {**times[best], "which": best}  # the faster way to run the same GEMMs
        del times["floor[expert-parallel]"]
        out[mode] = times
    return out


def plot(points: list[dict], modes: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2 * len(modes), figsize=(6 * len(modes) * 2, 8), squeeze=False)
    for col, (axis_name, xlabel) in enumerate((("T", "tokens T"), ("E", "experts E (fixed active FLOPs)"))):
        sweep = [p for p in points if p["sweep"] == axis_name]
        if not sweep:
            continue
        xs = [p["config"]["tokens"] if axis_name == "T" else p["config"]["experts"] for p in sweep]
        for m, mode in enumerate(modes):
            ax_time, ax_ratio = axes[0][col * len(modes) + m], axes[1][col * len(modes) + m]
            for impl in sweep[0]["times"][mode]:
                ms = [p["times"][mode][impl]["median_s"] * 1e3 for p in sweep]
                ratio = [p["times"][mode][impl]["median_s"] / p["times"][mode]["floor"]["median_s"] for p in sweep]
                style = dict(
                    marker="o", linewidth=2.5 if impl == "moe_ext" else 1.2, linestyle="--" if impl == "floor" else "-"
                )
                ax_time.plot(xs, ms, label=impl, **style)
                ax_ratio.plot(xs, ratio, label=impl, **style)
            for ax in (ax_time, ax_ratio):
                ax.set_xscale("log", base=2)
                ax.set_xlabel(xlabel)
                ax.grid(True, which="both", alpha=0.3)
            ax_time.set_yscale("log")
            ax_time.set_ylabel(f"{mode} time (ms)")
            ax_time.set_title(f"{axis_name} sweep, {mode}")
            ax_ratio.set_ylabel("time / GEMM floor")
            ax_time.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=list(_common.DTYPES))
    parser.add_argument("--modes", default="forward,forward+backward")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--sweep-tokens", type=int, default=4096, help="T of the E sweep")
    parser.add_argument("--max-tokens", type=int, default=32768, help="largest T of the T sweep")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="bench_scaling")
    args = parser.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in ("forward", "forward+backward") for m in modes):
        parser.error("--modes: forward and/or forward+backward")
    torch.set_num_threads(args.threads)
    dtype = _common.DTYPES[args.dtype]
    env = _common.environment()
    print(
        f"torch {env['torch']}, transformers {env['transformers']}, {env['threads']} threads, {args.dtype}, "
        f"load average {env['loadavg']}"
    )
    start = time.perf_counter()
    points = []
    rows = []
    for sweep, config in sweep_points(args):
        times = measure(config, dtype, modes, args)
        points.append({"sweep": sweep, "config": bench_moe.dataclasses.asdict(config), "times": times})
        row = [f"{sweep}: E={config.experts} T={config.tokens}"]
        for mode in modes:
            floor = times[mode]["floor"]["median_s"]
            row += [
                _common.fmt_ms(times[mode]["moe_ext"]["median_s"]),
                _common.fmt_ratio(times[mode]["moe_ext"]["median_s"] / floor),
            ]
            best = min(
                (n for n in times[mode] if n not in ("floor", "moe_ext")),
                key=lambda n: times[mode][n]["median_s"],
                default=None,
            )
            row += [
                f"{best} {_common.fmt_ratio(times[mode][best]['median_s'] / times[mode]['moe_ext']['median_s'])}"
                if best
                else "-"
            ]
        rows.append(row)
        print(f"  {row[0]}: " + "  ".join(row[1:]), flush=True)
    headers = ["point"]
    for mode in modes:
        headers += [f"moe_ext {mode} ms", "/floor", "best peer /moe_ext"]
    _common.print_table(headers, rows, f"scaling [{args.dtype}] H={args.hidden} F={args.ffn} k={args.top_k}")
    env["loadavg_end"] = list(__import__("os").getloadavg())
    env["wall_seconds"] = time.perf_counter() - start
    payload = {
        "benchmark": "bench_scaling",
        "quick": args.quick,
        "dtype": args.dtype,
        "environment": env,
        "points": points,
    }
    path = _common.write_json(f"{args.output}.json", payload)
    png = _common.RESULTS / f"{args.output}.png"
    plot(
        points,
        modes,
        png,
        f"moe_ext scaling, {args.dtype}, H={args.hidden} F={args.ffn} k={args.top_k}, "
        f"{env['threads']} threads (median of {args.repeats})",
    )
    print(f"\nwrote {path} and {png} ({env['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
