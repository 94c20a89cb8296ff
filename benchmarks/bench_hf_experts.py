"""transformers MoE blocks on each experts implementation, against moe_ext's backend and the full swap.

    PYTHONPATH=. python benchmarks/bench_hf_experts.py [--quick] [--families mixtral,gpt_oss]
                                                       [--dtypes float32] [--impls eager,moe_ext,swap]

For 4 families (Mixtral, Qwen3-MoE, DeepSeek-V3, GPT-OSS) at their real shapes scaled down (hidden
and FFN sizes / 8, fewer experts where the real count would make one run take minutes on two cores),
one transformers sparse MoE block (router, experts, shared expert) is built from a config with one
seed, and timed forward alone and forward+backward with every experts implementation:

    eager        transformers' loop over the experts that got tokens
    grouped_mm   transformers' torch._grouped_mm path (its default in from_pretrained)
    batched_mm   transformers' per-(token, expert) bmm: gathers a copy of the expert weights for every
                 assignment; skipped when that copy would exceed --batched-mm-limit GB
    moe_ext      experts_implementation="moe_ext": moe_ext's operators on transformers' routing and weights
    swap         moe_ext.integrations.transformers.swap_moe_layers: the whole block (router included) on
                 moe_ext.MoE, weights copied into moe_ext's layout

Each implementation's output (and input gradient) is compared with eager first; a float32 difference
over 1e-4 of the output's scale aborts the run (bfloat16 is reported, not checked: a near tie in the
router picks another expert). Timing is round-robin (_common.time_interleaved): the median of at
least --repeats runs on --threads threads (2). Writes benchmarks/results/bench_hf_experts.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclasses.dataclass(frozen=True)
class Family:
    experts: int
    top_k: int
    hidden: int
    ffn: int
    tokens: int
    about: str


FAMILIES = {
    "mixtral": Family(8, 2, 512, 1792, 256, "Mixtral-8x7B / 8: E=8, k=2, H=512, F=1792"),
    "qwen3_moe": Family(128, 8, 256, 96, 256, "Qwen3-30B-A3B / 8: E=128, k=8, H=256, F=96"),
    "deepseek_v3": Family(
        64, 8, 896, 256, 256, "DeepSeek-V3 / 8, 64 of 256 experts: k=8, 8 groups top-4, H=896, F=256, 1 shared expert"
    ),
    "gpt_oss": Family(32, 4, 360, 360, 256, "GPT-OSS-20B / 8: E=32, k=4, H=F=360, biases, clamped SwiGLU"),
}
IMPLS = ["eager", "grouped_mm", "batched_mm", "moe_ext", "swap"]
CHECK_TOLERANCE = 1e-4  # float32: max |impl - eager| / max |eager|


def quick(family: Family) -> Family:
    """Tiny sizes; feature sizes stay multiples of 8 (torch._grouped_mm wants 16-byte strides)."""
    return dataclasses.replace(
        family, experts=min(family.experts, 16), hidden=32, ffn=max(8, family.ffn // 256 * 8), tokens=16
    )


def build_block(name: str, f: Family, dtype: torch.dtype, seed: int) -> nn.Module:
    """transformers' sparse MoE block of ``name`` at the sizes of ``f``, initialised from ``seed``."""
    common = dict(
        hidden_size=f.hidden,
        num_experts_per_tok=f.top_k,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        vocab_size=16,
    )
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "mixtral":
            from transformers import MixtralConfig
            from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

            config = MixtralConfig(intermediate_size=f.ffn, num_local_experts=f.experts, **common)
            block = MixtralSparseMoeBlock(config)
        elif name == "qwen3_moe":
            from transformers import Qwen3MoeConfig
            from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

            config = Qwen3MoeConfig(
                moe_intermediate_size=f.ffn, intermediate_size=f.ffn, num_experts=f.experts, norm_topk_prob=True,
                **common,
            )  # fmt: skip
            block = Qwen3MoeSparseMoeBlock(config)
        elif name == "deepseek_v3":
            from transformers import DeepseekV3Config
            from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

            config = DeepseekV3Config(
                moe_intermediate_size=f.ffn, intermediate_size=f.ffn, n_routed_experts=f.experts, n_group=8,
                topk_group=4, n_shared_experts=1, **common,
            )  # fmt: skip
            block = DeepseekV3MoE(config)
        elif name == "gpt_oss":
            from transformers import GptOssConfig
            from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

            config = GptOssConfig(intermediate_size=f.ffn, num_local_experts=f.experts, **common)
            block = GptOssMLP(config)
        else:
            raise ValueError(f"unknown family {name!r}; choose from {list(FAMILIES)}")
    # transformers initialises these weights with torch.empty in a bare module: give every parameter values
    with torch.no_grad():
        for pname, p in block.named_parameters():
            if "bias" in pname:
                p.normal_(0.0, 0.02)
            else:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    return block.to(dtype)


def with_experts_implementation(block: nn.Module, impl: str) -> nn.Module:
    """A copy of ``block`` whose experts module runs ``impl`` (its own copy of the config)."""
    out = copy.deepcopy(block)
    for module in out.modules():
        if hasattr(module, "is_transposed") and hasattr(module, "config"):
            module.config = copy.copy(module.config)
            module.config._experts_implementation = impl
    return out


class Swapped(nn.Module):
    """The block after swap_moe_layers: moe_ext.MoE doing the routing and the experts."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        from moe_ext.integrations.transformers import swap_moe_layers

        self.holder = nn.ModuleDict({"block": with_experts_implementation(block, "eager")})
        if swap_moe_layers(self.holder) != 1:
            raise SystemExit(f"bench_hf_experts: swap_moe_layers did not swap {type(block).__name__}")

    def forward(self, x: Tensor):
        return self.holder["block"](x)


def first(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def batched_mm_gather_bytes(f: Family, dtype: torch.dtype) -> int:
    """Bytes of the expert weights batched_mm gathers: both matrices for each of the T * k assignments."""
    return f.tokens * f.top_k * 3 * f.hidden * f.ffn * torch.empty((), dtype=dtype).element_size()


def step_fns(module: nn.Module, x: Tensor, grad: Tensor):
    """(forward under no_grad, forward+backward with fresh .grad buffers)."""
    params = [p for p in module.parameters() if p.requires_grad]
    xg = x.detach().clone().requires_grad_(True)

    def forward() -> None:
        with torch.no_grad():
            module(x)

    def forward_backward() -> None:
        for p in params:
            p.grad = None
        xg.grad = None
        first(module(xg)).backward(grad)

    return forward, forward_backward


def check(module: nn.Module, reference: nn.Module, x: Tensor, grad: Tensor) -> float:
    """max relative difference to ``reference`` of the output and the input gradient."""
    errs = []
    results = []
    for m in (module, reference):
        xg = x.detach().clone().requires_grad_(True)
        y = first(m(xg))
        y.backward(grad)
        m.zero_grad(set_to_none=True)
        results.append((y.detach().float(), xg.grad.float()))
    for got, want in zip(*results, strict=True):
        errs.append(float((got - want).abs().max() / want.abs().max().clamp(min=1e-30)))
    return max(errs)


def bench_one(name: str, f: Family, dtype: torch.dtype, args) -> dict:
    import moe_ext.integrations.transformers  # noqa: F401  (registers "moe_ext")

    block = build_block(name, f, dtype, args.seed)
    torch.manual_seed(args.seed + 1)
    x = torch.randn(1, f.tokens, f.hidden, dtype=dtype)
    grad = torch.randn(1, f.tokens, f.hidden, dtype=dtype)
    notes = {}
    modules = {}
    for impl in args.impls:
        if impl == "batched_mm" and batched_mm_gather_bytes(f, dtype) > args.batched_mm_limit * 2**30:
            notes[impl] = f"skipped: gathers {batched_mm_gather_bytes(f, dtype) / 2**30:.1f} GB of expert weights"
            continue
        modules[impl] = Swapped(block) if impl == "swap" else with_experts_implementation(block, impl)
    reference = modules.get("eager") or with_experts_implementation(block, "eager")
    checks = {}
    for impl, module in modules.items():
        if impl == "eager":
            continue
        checks[impl] = check(module, reference, x, grad)
        if dtype == torch.float32 and not checks[impl] <= CHECK_TOLERANCE:
            raise SystemExit(
                f"bench_hf_experts: {name} {impl} disagrees with eager: max|diff|/max|ref| = {checks[impl]:.3g}"
            )
    fns = {impl: step_fns(m, x, grad) for impl, m in modules.items()}
    results: dict[str, dict] = {impl: {} for impl in modules}
    for mode, which in (("forward", 0), ("forward+backward", 1)):
        times = _common.time_interleaved(
            {impl: fn[which] for impl, fn in fns.items()},
            repeats=args.repeats,
            warmup=args.warmup,
            min_seconds=args.min_seconds,
        )
        base = times.get("grouped_mm", {}).get("median_s")
        for impl, t in times.items():
            results[impl][mode] = {**t, "vs_grouped_mm": t["median_s"] / base if base else None}
    return {
        "family": name,
        "config": dataclasses.asdict(f),
        "dtype": str(dtype).replace("torch.", ""),
        "checks": checks,
        "notes": notes,
        "results": results,
    }


def print_result(r: dict) -> None:
    c = r["config"]
    headers = ["impl", "fwd ms", "/grouped_mm", "fwd+bwd ms", "/grouped_mm", "check"]
    rows = []
    for impl, per_mode in r["results"].items():
        fwd, fb = per_mode["forward"], per_mode["forward+backward"]
        chk = r["checks"].get(impl)
        rows.append(
            [
                impl,
                _common.fmt_ms(fwd["median_s"]),
                _common.fmt_ratio(fwd["vs_grouped_mm"]),
                _common.fmt_ms(fb["median_s"]),
                _common.fmt_ratio(fb["vs_grouped_mm"]),
                "-" if chk is None else f"{chk:.1e}",
            ]
        )
    title = (
        f"{r['family']} [{r['dtype']}]  E={c['experts']} k={c['top_k']} H={c['hidden']} F={c['ffn']} T={c['tokens']}"
    )
    _common.print_table(headers, rows, title)
    for k, v in r["notes"].items():
        print(f"  note: {k}: {v}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every code path")
    parser.add_argument("--families", default=",".join(FAMILIES), help=f"comma list of {list(FAMILIES)}")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma list of float32, bfloat16, float16")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {IMPLS}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per implementation (at least)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--min-seconds", type=float, default=0.25, help="timed seconds per implementation (at least)")
    parser.add_argument("--batched-mm-limit", type=float, default=2.0, help="GB of weights batched_mm may gather")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="bench_hf_experts.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    names = [n.strip() for n in args.families.split(",") if n.strip()]
    if bad := [n for n in names if n not in FAMILIES]:
        parser.error(f"unknown families {bad}; choose from {list(FAMILIES)}")
    args.impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if bad := [i for i in args.impls if i not in IMPLS]:
        parser.error(f"unknown impls {bad}; choose from {IMPLS}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if any(d not in _common.DTYPES for d in dtypes):
        parser.error(f"dtypes must be among {list(_common.DTYPES)}")
    torch.set_num_threads(args.threads)

    env = _common.environment()
    print(
        f"torch {env['torch']}, transformers {env['transformers']}, {env['threads']} threads, "
        f"{env['processor']}, load average {env['loadavg']}"
    )
    start = time.perf_counter()
    runs = []
    for name in names:
        family = quick(FAMILIES[name]) if args.quick else FAMILIES[name]
        for dtype_name in dtypes:
            r = bench_one(name, family, _common.DTYPES[dtype_name], args)
            print_result(r)
            runs.append(r)
    env["loadavg_end"] = list(os.getloadavg())
    env["wall_seconds"] = time.perf_counter() - start
    payload = {
        "benchmark": "bench_hf_experts",
        "quick": args.quick,
        "environment": env,
        "families": {n: FAMILIES[n].about for n in names},
        "runs": runs,
    }
    path = _common.write_json(args.output, payload)
    print(f"\nwrote {path} ({env['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
