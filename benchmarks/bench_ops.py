"""Each moe_ext operator alone, forward and backward, next to plain-PyTorch equivalents and a memory copy.

    PYTHONPATH=. python benchmarks/bench_ops.py [--quick] [--dtypes float32,bfloat16] [--ops dispatch,combine]
                                                [--tokens 2048 --hidden 512 --ffn 256 --experts 64 --top-k 8]

Backward passes are timed as the registered backward ops called directly
(torch.ops.moe_ext.<op>_backward), so no autograd bookkeeping is included; the PyTorch
baselines' backward is torch.autograd.grad on a retained graph. dispatch and combine are
reported in GB/s (bytes of rows read + written, indices not counted) next to
torch.index_select / index_add_ / gather-sum, a plain ``out.copy_(src)`` moving the same
number of bytes into a preallocated output, and ``src.clone()`` doing it into a fresh one
(first-touch page faults included, as for any op returning a new tensor); grouped_mm in
GFLOP/s next to torch._grouped_mm and one torch.mm per expert. Writes benchmarks/results/bench_ops.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

import moe_ext  # noqa: E402
from moe_ext import ops  # noqa: E402

OPS = ["topk_gating", "make_plan", "dispatch", "grouped_mm", "combine", "load_balancing_loss", "router_z_loss"]


def copy_of(nbytes: int, dtype: torch.dtype) -> Callable[[], object]:
    """out.copy_(src) that reads nbytes/2 and writes nbytes/2: a plain copy moving nbytes in total."""
    elems = max(1, nbytes // (2 * torch.empty((), dtype=dtype).element_size()))
    src, out = torch.randn(elems).to(dtype), torch.empty(elems, dtype=dtype)
    return lambda: out.copy_(src)


def clone_of(nbytes: int, dtype: torch.dtype) -> Callable[[], object]:
    """src.clone(): the same copy into a freshly allocated output, as every op returning a new tensor
    pays (first-touch page faults when the allocator hands the block back to the OS on free)."""
    elems = max(1, nbytes // (2 * torch.empty((), dtype=dtype).element_size()))
    src = torch.randn(elems).to(dtype)
    return lambda: src.clone()


def grad_fn(outputs, inputs, grads) -> Callable[[], object]:
    """Backward alone: torch.autograd.grad over a graph kept alive between calls."""
    return lambda: torch.autograd.grad(outputs, inputs, grads, retain_graph=True)


def cases(args, dtype: torch.dtype) -> list[dict]:
    """Every (op, pass) with its implementations and the work it does (bytes or flops)."""
    T, H, Fh, E, k = args.tokens, args.hidden, args.ffn, args.experts, args.top_k
    g = torch.Generator().manual_seed(args.seed)
    es = torch.empty((), dtype=dtype).element_size()
    logits = torch.randn(T, E, generator=g).to(dtype)
    weights, indices, scores = ops.topk_gating(logits, k)
    plan = ops.make_plan(indices, E)
    N = plan.token_of.shape[0]
    x = torch.randn(T, H, generator=g).to(dtype)
    x_sorted = ops.dispatch(x, plan)
    w_in = (torch.randn(E, H, 2 * Fh, generator=g) / H**0.5).to(dtype)
    y_sorted = torch.randn(N, H, generator=g).to(dtype)
    offsets32 = plan.offsets[1:].to(torch.int32)
    sizes = plan.counts.tolist()
    out: list[dict] = []

    # ---- topk_gating
    gw, gs = torch.randn(T, k, generator=g), torch.randn(T, E, generator=g)

    def torch_gating(lg):
        probs = torch.softmax(lg.float(), dim=-1)
        top, idx = torch.topk(probs, k, dim=-1)
        return top / top.sum(-1, keepdim=True), idx, probs

    lg = logits.detach().clone().requires_grad_(True)
    tw, _, tp = torch_gating(lg)
    out.append(
        dict(
            op="topk_gating",
            pass_="forward",
            work=None,
            impls={"moe_ext": lambda: ops.topk_gating(logits, k), "torch softmax+topk": lambda: torch_gating(logits)},
        )
    )
    out.append(
        dict(
            op="topk_gating",
            pass_="backward",
            work=None,
            impls={
                "moe_ext": lambda: torch.ops.moe_ext.topk_gating_backward(
                    gw, gs, scores, indices, "softmax", True, 1.0, dtype
                ),
                "torch autograd": grad_fn([tw, tp], [lg], [gw, gs]),
            },
        )
    )

    # ---- make_plan
    def torch_plan(idx):
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E)
        offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        row_of = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
        return row_of.view(idx.shape), order // k, counts, offsets

    out.append(
        dict(
            op="make_plan",
            pass_="forward",
            work=None,
            impls={"moe_ext": lambda: ops.make_plan(indices, E), "torch argsort+bincount": lambda: torch_plan(indices)},
        )
    )

    # ---- dispatch: read N rows of x, write N rows
    gd = torch.randn(N, H, generator=g).to(dtype)
    nbytes = 2 * N * H * es
    out.append(
        dict(
            op="dispatch",
            pass_="forward",
            work=("bytes", nbytes),
            impls={
                "moe_ext": lambda: ops.dispatch(x, plan),
                "torch index_select": lambda: x.index_select(0, plan.token_of),
                "copy_ same bytes": copy_of(nbytes, dtype),
                "clone same bytes": clone_of(nbytes, dtype),
            },
        )
    )
    # backward: read N rows, write T rows (sum of each token's k rows)
    nbytes = (N + T) * H * es
    row_of = plan.row_of
    out.append(
        dict(
            op="dispatch",
            pass_="backward",
            work=("bytes", nbytes),
            impls={
                "moe_ext": lambda: torch.ops.moe_ext.dispatch_backward(gd, plan.token_of, row_of),
                "torch index_add_": lambda: torch.zeros(T, H, dtype=dtype).index_add_(0, plan.token_of, gd),
                "torch gather+sum": lambda: gd[row_of].sum(1),
                "copy_ same bytes": copy_of(nbytes, dtype),
                "clone same bytes": clone_of(nbytes, dtype),
            },
        )
    )

    # ---- grouped_mm: x_sorted [N, H] @ w_in [E, H, 2F]
    flops = 2 * N * H * 2 * Fh
    xs = x_sorted.detach().clone().requires_grad_(True)
    wi = w_in.detach().clone().requires_grad_(True)
    gy = torch.randn(N, 2 * Fh, generator=g).to(dtype)
    y_gmm = torch._grouped_mm(xs, wi, offs=offsets32)

    def mm_loop(a, w):
        return torch.cat([p @ w[e] for e, p in enumerate(a.split(sizes)) if sizes[e]])

    out.append(
        dict(
            op="grouped_mm",
            pass_="forward",
            work=("flops", flops),
            impls={
                "moe_ext": lambda: ops.grouped_mm(x_sorted, w_in, plan.offsets),
                "torch._grouped_mm": lambda: torch._grouped_mm(x_sorted, w_in, offs=offsets32),
                "torch.mm per expert": lambda: mm_loop(x_sorted, w_in),
            },
        )
    )
    out.append(
        dict(
            op="grouped_mm",
            pass_="backward",
            work=("flops", 2 * flops),
            impls={
                "moe_ext": lambda: torch.ops.moe_ext.grouped_mm_backward(gy, x_sorted, w_in, plan.offsets),
                "torch._grouped_mm autograd": grad_fn([y_gmm], [xs, wi], [gy]),
            },
        )
    )

    # ---- combine: read N rows, write T rows
    nbytes = (N + T) * H * es
    w_sorted = weights.reshape(-1)[plan.token_of * k + _slot_of_rows(plan, k)]
    out.append(
        dict(
            op="combine",
            pass_="forward",
            work=("bytes", nbytes),
            impls={
                "moe_ext": lambda: ops.combine(y_sorted, weights, plan),
                "torch gather+sum": lambda: (y_sorted[row_of] * weights.unsqueeze(-1).to(dtype)).sum(1),
                "torch index_add_": lambda: torch.zeros(T, H, dtype=dtype).index_add_(
                    0, plan.token_of, y_sorted * w_sorted.unsqueeze(-1).to(dtype)
                ),
                "copy_ same bytes": copy_of(nbytes, dtype),
                "clone same bytes": clone_of(nbytes, dtype),
            },
        )
    )
    # backward: read grad [T, H] and y_sorted [N, H], write grad_y_sorted [N, H]
    nbytes = (T + 2 * N) * H * es
    gc_ = torch.randn(T, H, generator=g).to(dtype)
    ys = y_sorted.detach().clone().requires_grad_(True)
    wt = weights.detach().clone().requires_grad_(True)
    yc = (ys[row_of] * wt.unsqueeze(-1).to(dtype)).sum(1)
    out.append(
        dict(
            op="combine",
            pass_="backward",
            work=("bytes", nbytes),
            impls={
                "moe_ext": lambda: torch.ops.moe_ext.combine_backward(gc_, y_sorted, weights, row_of, plan.token_of),
                "torch gather+sum autograd": grad_fn([yc], [ys, wt], [gc_]),
                "copy_ same bytes": copy_of(nbytes, dtype),
                "clone same bytes": clone_of(nbytes, dtype),
            },
        )
    )

    # ---- losses
    one = torch.ones(())

    def torch_lb(s, idx):
        counts = torch.zeros(s.shape[0], E, dtype=s.dtype).scatter_add_(1, idx, torch.ones_like(idx, dtype=s.dtype))
        return E * (counts.mean(0) * s.mean(0)).sum()

    sc = scores.detach().clone().requires_grad_(True)
    lb = torch_lb(sc, indices)
    out.append(
        dict(
            op="load_balancing_loss",
            pass_="forward",
            work=None,
            impls={
                "moe_ext": lambda: ops.load_balancing_loss(scores, indices, E),
                "torch scatter_add": lambda: torch_lb(scores, indices),
            },
        )
    )
    out.append(
        dict(
            op="load_balancing_loss",
            pass_="backward",
            work=None,
            impls={
                "moe_ext": lambda: torch.ops.moe_ext.load_balancing_loss_backward(one, scores, indices, E),
                "torch autograd": grad_fn([lb], [sc], [one]),
            },
        )
    )
    lz = logits.detach().clone().requires_grad_(True)
    z = torch.logsumexp(lz.float(), -1).pow(2).mean()
    out.append(
        dict(
            op="router_z_loss",
            pass_="forward",
            work=None,
            impls={
                "moe_ext": lambda: ops.router_z_loss(logits),
                "torch logsumexp": lambda: torch.logsumexp(logits.float(), -1).pow(2).mean(),
            },
        )
    )
    out.append(
        dict(
            op="router_z_loss",
            pass_="backward",
            work=None,
            impls={
                "moe_ext": lambda: torch.ops.moe_ext.router_z_loss_backward(one, logits),
                "torch autograd": grad_fn([z], [lz], [one]),
            },
        )
    )
    return [c for c in out if c["op"] in args.ops]


def _slot_of_rows(plan: moe_ext.RoutingPlan, k: int) -> torch.Tensor:
    """[N] choice j of each row (row r holds assignment (token_of[r], j))."""
    rows = torch.arange(plan.token_of.shape[0])
    return (plan.row_of[plan.token_of] == rows.unsqueeze(-1)).int().argmax(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only (CUDA timing is separate)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma list of {OPS}")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=256)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="bench_ops.json")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.hidden, args.ffn = 128, 64, 32
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    if any(o not in OPS for o in args.ops):
        parser.error(f"--ops must be among {OPS}")
    torch.set_num_threads(args.threads)
    env = _common.environment()
    print(f"torch {env['torch']}, {env['threads']} threads, {env['processor']}, load average {env['loadavg']}")
    shape = dict(tokens=args.tokens, hidden=args.hidden, ffn=args.ffn, experts=args.experts, top_k=args.top_k)
    print("sizes: " + ", ".join(f"{k}={v}" for k, v in shape.items()) + f"  (N = {args.tokens * args.top_k} rows)")
    start = time.perf_counter()
    results = []
    for dtype_name in args.dtypes.split(","):
        dtype = _common.DTYPES[dtype_name.strip()]
        rows = []
        for case in cases(args, dtype):
            times = _common.time_interleaved(case["impls"], repeats=args.repeats, warmup=args.warmup)
            base = times["moe_ext"]["median_s"]
            for impl, t in times.items():
                rate = None
                if case["work"] is not None:
                    kind, amount = case["work"]
                    rate = {"unit": "GB/s" if kind == "bytes" else "GFLOP/s", "value": amount / t["median_s"] / 1e9}
                results.append(
                    {
                        "op": case["op"],
                        "pass": case["pass_"],
                        "impl": impl,
                        "dtype": dtype_name,
                        **t,
                        "vs_moe_ext": t["median_s"] / base,
                        "rate": rate,
                    }
                )
                rows.append(
                    [
                        case["op"],
                        case["pass_"],
                        impl,
                        _common.fmt_ms(t["median_s"]),
                        "-" if rate is None else f"{rate['value']:.1f} {rate['unit']}",
                        _common.fmt_ratio(t["median_s"] / base),
                    ]
                )
        _common.print_table(["op", "pass", "impl", "ms", "rate", "/moe_ext"], rows, f"[{dtype_name}]")
    env["loadavg_end"] = list(__import__("os").getloadavg())
    env["wall_seconds"] = time.perf_counter() - start
    path = _common.write_json(
        args.output,
        {"benchmark": "bench_ops", "quick": args.quick, "shape": shape, "environment": env, "results": results},
    )
    print(f"\nwrote {path} ({env['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
