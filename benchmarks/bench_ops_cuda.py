"""CUDA timing of every moe_ext operator (forward and backward), with the effective memory bandwidth of
dispatch and combine against a device-to-device copy of the same number of bytes.

    python benchmarks/bench_ops_cuda.py --device cuda [--tokens 16384 --hidden 4096 --experts 64 --top-k 2]

Times are CUDA-event times (start/end events around each call, on the current stream), the median of
--repeats runs after --warmup untimed ones. By default the ops run with MOE_EXT_CUDA_CHECKS=sync, where an
op that validates data (a plan, indices, logits) ends with one small device-to-host copy: that wait is
inside the measured interval, as it is in a real step. --checks device measures the same kernels with
device-side asserts instead (no host reads). Prints a table; writes nothing unless --json is given.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="must be a CUDA device (cuda, cuda:1, ...)")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--ffn", type=int, default=1408, help="expert FFN width of the grouped_mm case")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--capacity-factor", type=float, default=1.25)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--checks", choices=["sync", "device"], default="sync", help="MOE_EXT_CUDA_CHECKS mode")
    p.add_argument("--json", help="also write the results to this file")
    return p.parse_args()


def cuda_time(fn, repeats: int, warmup: int) -> dict:
    """Median / quartiles of CUDA-event time (ms) of fn() over `repeats` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "p25_ms": q[0], "p75_ms": q[2], "runs": len(times)}


def main() -> None:
    args = parse_args()
    device = _common.require_cuda(args.device, "bench_ops_cuda")
    # Read by the extension at its first CUDA op: set before any op runs.
    os.environ["MOE_EXT_CUDA_CHECKS"] = args.checks
    import moe_ext  # noqa: F401  (loads the operator library)
    from moe_ext import ops

    torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype]
    T, H, F, E, k = args.tokens, args.hidden, args.ffn, args.experts, args.top_k
    elem = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator(device=device).manual_seed(0)

    logits = torch.randn(T, E, device=device, generator=g, dtype=torch.float32)
    x = torch.randn(T, H, device=device, generator=g, dtype=dtype)
    weights, indices, scores = ops.topk_gating(logits, k)
    capacity = max(1, int(args.capacity_factor * T * k / E + 0.999999))
    plan = ops.make_plan(indices, E)
    plan_cap = ops.make_plan(indices, E, capacity=capacity)
    N = plan.token_of.shape[0]
    x_sorted = ops.dispatch(x, plan)
    w_in = torch.randn(E, H, F, device=device, generator=g, dtype=dtype) / H**0.5
    y_sorted = torch.randn(N, H, device=device, generator=g, dtype=dtype)
    grad_y = torch.randn(T, H, device=device, generator=g, dtype=dtype)
    grad_sorted = torch.randn(N, H, device=device, generator=g, dtype=dtype)
    grad_gmm = torch.randn(N, F, device=device, generator=g, dtype=dtype)
    lib = torch.ops.moe_ext

    # Bytes each op must move at least (rows read + rows written; index tensors are small and left out).
    row = H * elem
    cases = {
        "topk_gating": (lambda: ops.topk_gating(logits, k), None),
        "make_plan dropless": (lambda: ops.make_plan(indices, E), None),
        f"make_plan capacity={capacity}": (lambda: ops.make_plan(indices, E, capacity=capacity), None),
        "dispatch": (lambda: ops.dispatch(x, plan), 2 * N * row),
        "dispatch backward": (lambda: lib.dispatch_backward(grad_sorted, plan.token_of, plan.row_of), (N + T) * row),
        "combine": (lambda: ops.combine(y_sorted, weights, plan), (N + T) * row),
        "combine backward": (
            lambda: lib.combine_backward(grad_y, y_sorted, weights, plan.row_of, plan.token_of),
            # the scaled copy (T rows read, N written) + the dot products (T + N rows read)
            2 * (N + T) * row,
        ),
        "grouped_mm": (lambda: ops.grouped_mm(x_sorted, w_in, plan.offsets), None),
        "grouped_mm backward": (lambda: lib.grouped_mm_backward(grad_gmm, x_sorted, w_in, plan.offsets), None),
        "load_balancing_loss": (lambda: ops.load_balancing_loss(scores, indices, E), None),
        "router_z_loss": (lambda: ops.router_z_loss(logits), None),
        "dispatch (capacity plan)": (lambda: ops.dispatch(x, plan_cap), 2 * plan_cap.token_of.shape[0] * row),
    }

    results = {}
    for name, (fn, nbytes) in cases.items():
        timing = cuda_time(fn, args.repeats, args.warmup)
        entry = {**timing}
        if nbytes:
            # The same bytes through a device-to-device copy (reads and writes nbytes / 2 each).
            src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
            dst = torch.empty_like(src)
            copy = cuda_time(lambda s=src, d=dst: d.copy_(s), args.repeats, args.warmup)
            entry["bytes"] = nbytes
            entry["GBps"] = nbytes / (timing["median_ms"] * 1e6)
            entry["copy_GBps"] = nbytes / (copy["median_ms"] * 1e6)
            entry["of_copy"] = entry["GBps"] / entry["copy_GBps"]
            del src, dst
        results[name] = entry

    props = torch.cuda.get_device_properties(device)
    print(
        f"moe_ext CUDA ops on {props.name} (sm_{props.major}{props.minor}), torch {torch.__version__}, "
        f"T={T} H={H} F={F} E={E} k={k} {args.dtype}, checks={args.checks}, median of {args.repeats}"
    )
    header = f"{'op':<34}{'median ms':>11}{'p25':>9}{'p75':>9}{'GB/s':>9}{'copy GB/s':>11}{'of copy':>9}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        bw = (
            f"{r['GBps']:>9.0f}{r['copy_GBps']:>11.0f}{100 * r['of_copy']:>8.0f}%"
            if "GBps" in r
            else f"{'':>9}{'':>11}{'':>9}"
        )
        print(f"{name:<34}{r['median_ms']:>11.3f}{r['p25_ms']:>9.3f}{r['p75_ms']:>9.3f}{bw}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
