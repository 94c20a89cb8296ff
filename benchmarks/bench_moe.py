"""moe_ext.MoE against its peers and the GEMM floor: forward and forward+backward time and peak tensor memory.

    PYTHONPATH=. python benchmarks/bench_moe.py [--quick] [--configs mixtral,deepseek] [--dtypes float32]
                                                [--peers moe_ext,hf_mixtral[grouped_mm]] [--profile]
                                                [--device cuda]

For every config and dtype, every implementation (benchmarks/peers.py) gets the weights of one
moe_ext layer, its output and input gradient are checked against moe_ext's (the run aborts if
one disagrees), then all are timed round-robin: median of >= 10 timed runs after warm-up (3 for
a peer whose every call takes over 2 s, said under its table), on
--threads threads (2). Peak memory is the peak of live tensor bytes during one call (see
_common.peak_tensor_bytes). Writes benchmarks/results/bench_moe.json.

--device cuda runs the same configs, peers, checks and floor on a GPU: every call is timed with CUDA
events recorded around it on the current stream (_common.time_interleaved), peak memory is the peak of
torch.cuda.max_memory_allocated above the start of the call, and the floor is its per-expert GEMM loop
(the expert-parallel variant spreads GEMMs over CPU threads, which has no meaning there). The
transformers and torch._grouped_mm peers need bfloat16 on CUDA (--dtypes bfloat16). Writes
benchmarks/results/bench_moe_cuda.json unless --output says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import peers  # noqa: E402

import moe_ext  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    experts: int
    top_k: int
    hidden: int
    ffn: int
    tokens: int
    shared_ffn: int = 0  # F of a dense shared expert (0: none)
    decode: bool = False  # inference only: forward is timed, forward+backward is not
    about: str = ""

    def active_flops(self) -> int:
        """Forward FLOPs of the expert GEMMs (routed + shared): 2 * 3 * H * F per (token, expert)."""
        return 2 * 3 * self.hidden * (self.tokens * self.top_k * self.ffn + self.tokens * self.shared_ffn)


CONFIGS = {
    "mixtral": Config(8, 2, 512, 1024, 512, about="Mixtral-like: 8 experts, top-2, F = 2H"),
    "fine-grained": Config(64, 8, 512, 256, 512, about="OLMoE/Qwen3-MoE-like: 64 experts, top-8, F = H/2"),
    "deepseek": Config(
        256,
        8,
        512,
        128,
        512,
        shared_ffn=128,
        about="DeepSeek-V3-like: 256 experts, top-8, F = H/4, one shared expert of the same F",
    ),
    "decode-T1": Config(64, 8, 512, 256, 1, decode=True, about="decode step, fine-grained layer, 1 token"),
    "decode-T4": Config(64, 8, 512, 256, 4, decode=True, about="decode step, fine-grained layer, 4 tokens"),
    "decode-T16": Config(64, 8, 512, 256, 16, decode=True, about="decode step, fine-grained layer, 16 tokens"),
}


def quick(config: Config) -> Config:
    return dataclasses.replace(
        config,
        hidden=64,
        ffn=max(16, config.ffn // 8),
        shared_ffn=config.shared_ffn // 8,
        tokens=min(config.tokens, 64),
    )


# Implementations timed besides moe_ext and the floor. hf_*[batched_mm] materializes one
# [2F, H] weight copy per (token, expert) and is meant for decoding: only in decode configs.
# Not timed by default (--peers adds them): hf_qwen3[eager] runs the same experts loop as
# hf_mixtral[eager], and torch_sorted_loop is torch_sorted_gmm with a Python loop of torch.mm;
# with E >= 64 both take seconds per backward and would dominate the run time.
DEFAULT_PEERS = [
    "torch_sorted_gmm",
    "gshard_einsum",
    "hf_mixtral[eager]",
    "hf_mixtral[grouped_mm]",
    "hf_qwen3[grouped_mm]",
]
DECODE_PEERS = ["hf_mixtral[batched_mm]", "hf_qwen3[batched_mm]"]
ALL_PEERS = [*DEFAULT_PEERS, "torch_sorted_loop", "hf_qwen3[eager]", *DECODE_PEERS]
# A GShard run whose one-hot einsums alone would exceed this many FLOPs is skipped (and said so).
GSHARD_MAX_FLOPS = 40e9

# Allowed max |peer - moe_ext| relative to max |moe_ext|, per dtype (on tokens without routing ties).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def build_layers(config: Config, dtype: torch.dtype, seed: int) -> tuple[moe_ext.MoE, moe_ext.MoE]:
    """(moe_ext doing the peers' work: no aux loss, no stats; the same layer with its defaults)."""
    torch.manual_seed(seed)
    kwargs = dict(shared_expert_size=config.shared_ffn, dtype=dtype)
    lean = moe_ext.MoE(config.hidden, config.ffn, config.experts, config.top_k, aux_loss_coef=0.0, **kwargs)
    lean.track_stats = False
    full = moe_ext.MoE(config.hidden, config.ffn, config.experts, config.top_k, **kwargs)  # aux 0.01, stats on
    full.load_state_dict(lean.state_dict())
    return lean, full


def tied_tokens(layer: moe_ext.MoE, x: Tensor) -> Tensor:
    """[T] bool: tokens whose k-th and (k+1)-th router logits are equal (any top-k may legally differ)."""
    if layer.top_k >= layer.num_experts:
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    with torch.no_grad():
        logits = F.linear(x, layer.router.weight).float().sort(dim=-1, descending=True).values
    return logits[:, layer.top_k - 1] == logits[:, layer.top_k]


def run_module(module: nn.Module, x: Tensor, grad: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if grad is None:
        with torch.no_grad():
            return module(x), None
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(grad)
    module.zero_grad(set_to_none=True)
    return y.detach(), x.grad


def check(name: str, module: nn.Module, layer: moe_ext.MoE, x: Tensor, grad: Tensor, with_backward: bool) -> dict:
    """Compares a peer's output (and input gradient) with moe_ext's; raises SystemExit on disagreement."""
    ref_y, ref_gx = run_module(layer, x, grad if with_backward else None)
    y, gx = run_module(module, x, grad if with_backward else None)
    keep = ~tied_tokens(layer, x)
    tol = TOLERANCE[x.dtype]
    result = {"tied_tokens": int((~keep).sum())}
    pairs = [("output", y, ref_y)] + ([("grad_x", gx, ref_gx)] if with_backward else [])
    for what, got, want in pairs:
        got, want = got.float()[keep], want.float()[keep]
        scale = want.abs().max().clamp(min=1e-30)
        err = float((got - want).abs().max() / scale) if want.numel() else 0.0
        result[f"{what}_rel_err"] = err
        if not err <= tol:
            raise SystemExit(
                f"bench_moe: {name} disagrees with moe_ext: {what} max|diff|/max|ref| = {err:.3g} "
                f"> {tol} ({x.dtype}, {int(keep.sum())} untied tokens)"
            )
    return result


FLOORS = ("floor", "floor[expert-parallel]")


def floor_fns(floor: peers.GemmFloor, which: int, device: torch.device) -> dict:
    """The GEMM floor both ways on CPU: per-expert loop with threaded GEMMs, and experts spread over threads.

    On CUDA only the per-expert loop: the GEMMs queue on one stream, CPU threads have nothing to split."""
    if which == 0:
        fns = {"floor": floor.forward, "floor[expert-parallel]": floor.forward_expert_parallel}
    else:
        fns = {"floor": floor.forward_backward, "floor[expert-parallel]": floor.forward_backward_expert_parallel}
    return fns if device.type == "cpu" else {"floor": fns["floor"]}


def step_fns(module: nn.Module, x: Tensor, grad: Tensor) -> tuple:
    """(forward under no_grad, forward+backward with fresh .grad buffers) for one module."""
    xg = x.detach().clone().requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]

    def forward() -> None:
        with torch.no_grad():
            module(x)

    def reset_grads() -> None:
        for p in params:
            p.grad = None
        xg.grad = None

    def forward_backward() -> None:
        reset_grads()
        module(xg).backward(grad)

    forward_backward.reset_grads = reset_grads  # for peak_tensor_bytes' setup
    return forward, forward_backward


def profile_moe_ext(layer: moe_ext.MoE, x: Tensor, grad: Tensor, backward: bool, iters: int = 5) -> dict:
    """Self CPU time per op of moe_ext steps under torch.profiler: where its time goes."""
    forward, forward_backward = step_fns(layer, x, grad)
    fn = forward_backward if backward else forward
    for _ in range(2):
        fn()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
    averages = prof.key_averages()
    total = sum(a.self_cpu_time_total for a in averages)
    ops = sorted(averages, key=lambda a: a.self_cpu_time_total, reverse=True)
    return {
        "step_ms": total / iters / 1e3,
        "ops": [
            {
                "name": a.key,
                "calls_per_step": a.count / iters,
                "self_ms_per_step": a.self_cpu_time_total / iters / 1e3,
                "share": a.self_cpu_time_total / total if total else 0.0,
            }
            for a in ops[:20]
        ],
    }


def bench_one(name: str, config: Config, dtype: torch.dtype, args) -> dict:
    device = torch.device(args.device)
    lean, full = build_layers(config, dtype, args.seed)
    torch.manual_seed(args.seed + 1)
    x = torch.randn(config.tokens, config.hidden, dtype=dtype)
    grad = torch.randn(config.tokens, config.hidden, dtype=dtype)
    wanted = args.peers or (DEFAULT_PEERS + (DECODE_PEERS if config.decode else []))
    hf_impls: dict[str, list[str]] = {}
    for peer in wanted:
        if peer.startswith("hf_") and "[" in peer:
            kind, impl = peer[3:].rstrip("]").split("[")
            hf_impls.setdefault(kind, []).append(impl)
    notes = {}
    if peers.transformers_version() is None and hf_impls:
        notes["hf_*"] = "transformers is not installed: pip install -r requirements-bench.txt"
    skip_gshard = False
    if "gshard_einsum" in wanted:
        _, idx, _ = moe_ext.ops.topk_gating(F.linear(x, lean.router.weight), config.top_k)
        capacity = int(torch.bincount(idx.reshape(-1), minlength=config.experts).max())
        einsum_flops = 2 * 2 * config.tokens * config.experts * capacity * config.hidden
        if einsum_flops > GSHARD_MAX_FLOPS:
            skip_gshard = True
            notes["gshard_einsum"] = f"skipped: its one-hot einsums alone are {einsum_flops / 1e9:.0f} GFLOP"
    include = {p for p in wanted if not (p == "gshard_einsum" and skip_gshard)}
    modules = {"moe_ext": lean, "moe_ext+aux+stats": full}
    modules.update(peers.make_peers(lean, hf_impls=hf_impls or None, include=include))
    modules = {n: m for n, m in modules.items() if n in ("moe_ext", "moe_ext+aux+stats") or n in include}
    if device.type != "cpu":  # every module built from the CPU layer first, so all start from the same weights
        modules = {n: m.to(device) for n, m in modules.items()}
        x, grad = x.to(device), grad.to(device)
    with_backward = not config.decode

    checks = {}
    for peer_name, module in modules.items():
        if peer_name == "moe_ext":
            continue
        # moe_ext with its aux loss on has an extra router gradient: compare its output only.
        checks[peer_name] = check(peer_name, module, lean, x, grad, with_backward and peer_name != "moe_ext+aux+stats")

    floor = peers.GemmFloor(lean, x)
    fns = {n: step_fns(m, x, grad) for n, m in modules.items()}
    modes = {"forward": 0} | ({"forward+backward": 1} if with_backward else {})
    floors = list(floor_fns(floor, 0, device))
    peak_bytes = _common.peak_tensor_bytes if device.type == "cpu" else _common.peak_cuda_bytes
    results: dict[str, dict] = {n: {} for n in [*floors, *modules]}
    for mode, which in modes.items():
        timed = floor_fns(floor, which, device)
        timed.update({n: f[which] for n, f in fns.items()})
        times = _common.time_interleaved(timed, repeats=args.repeats, warmup=args.warmup, device=device)
        for n, t in times.items():
            if n in floors:
                peak = floor.working_set_bytes(backward=bool(which))
            else:
                peak = peak_bytes(timed[n], getattr(timed[n], "reset_grads", None))
            results[n][mode] = {**t, "peak_bytes": peak}
        # the floor is the faster of the two ways to run the same GEMMs
        floor_t = min(times[n]["median_s"] for n in floors)
        ext_t = times["moe_ext"]["median_s"]
        floor_peak = results["floor"][mode]["peak_bytes"]
        for n in times:
            results[n][mode]["vs_floor"] = times[n]["median_s"] / floor_t
            results[n][mode]["vs_moe_ext"] = times[n]["median_s"] / ext_t
            results[n][mode]["peak_vs_floor"] = results[n][mode]["peak_bytes"] / floor_peak if floor_peak else None
    out = {
        "config": dataclasses.asdict(config),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "active_gflop_forward": config.active_flops() / 1e9,
        "floor_gemm_calls_forward": 2 * (len(floor.groups) + (floor.shared is not None)),
        "rows_per_expert": floor.row_counts,
        "checks": checks,
        "notes": notes,
        "results": results,
    }
    if args.profile:
        out["profile"] = {mode: profile_moe_ext(lean, x, grad, backward=bool(which)) for mode, which in modes.items()}
    return out


def print_result(name: str, r: dict) -> None:
    c = r["config"]
    modes = list(next(iter(r["results"].values())).keys())
    headers = ["impl"]
    for mode in modes:
        short = "fwd" if mode == "forward" else "fwd+bwd"
        headers += [f"{short} ms", "/floor", "/moe_ext", "peak MB", "/floor"]
    headers.append("check")
    rows = []
    for impl, per_mode in r["results"].items():
        row = [impl]
        for mode in modes:
            m = per_mode[mode]
            row += [
                _common.fmt_ms(m["median_s"]),
                _common.fmt_ratio(m["vs_floor"]),
                _common.fmt_ratio(m["vs_moe_ext"]),
                _common.fmt_mb(m["peak_bytes"]),
                _common.fmt_ratio(m.get("peak_vs_floor")),
            ]
        chk = r["checks"].get(impl)
        row.append("-" if chk is None else f"{max(v for k, v in chk.items() if k.endswith('rel_err')):.1e}")
        rows.append(row)
    title = (
        f"{name} [{r['dtype']}]  E={c['experts']} k={c['top_k']} H={c['hidden']} F={c['ffn']} T={c['tokens']}"
        + (f" shared F={c['shared_ffn']}" if c["shared_ffn"] else "")
        + f"  ({r['active_gflop_forward']:.2f} GFLOP fwd)"
    )
    _common.print_table(headers, rows, title)
    for k, v in r["notes"].items():
        print(f"  note: {k}: {v}")
    for impl, per_mode in r["results"].items():
        few = {mode: m["runs"] for mode, m in per_mode.items() if m["runs"] < 10}
        if few:
            runs = ", ".join(f"{mode} {n}" for mode, n in few.items())
            print(f"  note: {impl} timed {runs} time(s) only: each call took over 2 s (see _common.time_interleaved)")
    ties = max((chk["tied_tokens"] for chk in r["checks"].values()), default=0)
    if ties:
        print(f"  note: {ties} token(s) have tied k-th/(k+1)-th router logits; excluded from the check")
    if "profile" in r:
        for mode, p in r["profile"].items():
            top = ", ".join(f"{o['name']} {100 * o['share']:.0f}%" for o in p["ops"][:8])
            print(f"  moe_ext {mode} profile ({p['step_ms']:.2f} ms/step self CPU): {top}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every code path")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16, float16")
    parser.add_argument(
        "--peers",
        default=None,
        help=f"comma list of peers among {ALL_PEERS} (default: {DEFAULT_PEERS}, plus {DECODE_PEERS} in decode configs)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per implementation (at least)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="also profile moe_ext with torch.profiler")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument(
        "--output",
        default=None,
        help="file name under benchmarks/results/ (bench_moe.json, on CUDA bench_moe_cuda.json)",
    )
    args = parser.parse_args()
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: cpu or cuda")
    if device.type == "cuda":
        _common.require_cuda(args.device, "bench_moe")
        if args.profile:
            parser.error("--profile records self CPU time per op: CPU only")
    args.output = args.output or ("bench_moe.json" if device.type == "cpu" else "bench_moe_cuda.json")
    args.peers = [p.strip() for p in args.peers.split(",")] if args.peers else None
    torch.set_num_threads(args.threads)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        parser.error(f"unknown configs {bad}; choose from {list(CONFIGS)}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if any(d not in _common.DTYPES for d in dtypes):
        parser.error(f"dtypes must be among {list(_common.DTYPES)}")

    env = _common.environment(device)
    print(
        f"torch {env['torch']}, transformers {env['transformers']}, {env['threads']} threads, "
        f"{env['processor']}, load average {env['loadavg']}" + (f", {env['gpu']}" if "gpu" in env else "")
    )
    start = time.perf_counter()
    runs = []
    for name in names:
        config = quick(CONFIGS[name]) if args.quick else CONFIGS[name]
        for dtype_name in dtypes:
            r = bench_one(name, config, _common.DTYPES[dtype_name], args)
            r["name"] = name
            print_result(name, r)
            runs.append(r)
    env["loadavg_end"] = list(__import__("os").getloadavg())
    env["wall_seconds"] = time.perf_counter() - start
    payload = {
        "benchmark": "bench_moe",
        "quick": args.quick,
        "device": str(device),
        "environment": env,
        "configs": {n: CONFIGS[n].about for n in names},
        "runs": runs,
    }
    path = _common.write_json(args.output, payload)
    print(f"\nwrote {path} ({env['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
