"""Every moe_ext op, forward and backward, at small sizes on one device, checked against the CPU kernels.

    python scripts/cuda_op_suite.py [--device cuda]

What scripts/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck, synccheck): a few MoE layers
(dropless, capacity, expert-choice routing, float32 and bfloat16) through forward and a backward that also
carries the aux losses, compared with the same layers on CPU. It fails (exit 1) on a wrong value and when
some op registered in the moe_ext namespace was never called, so a new op needs a case here before the
sanitizers can be said to cover it. `--device cpu` runs the same cases on CPU (the coverage check and the
plumbing, without a GPU).
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import moe_ext
from moe_ext.__main__ import registered_ops

# (name, MoE keyword arguments, dtype): together they reach every op of the namespace.
CASES = [
    ("dropless f32", dict(z_loss_coef=1e-3), torch.float32),
    ("capacity f32", dict(capacity_factor=1.0, z_loss_coef=1e-3), torch.float32),
    ("expert-choice f32", dict(router="expert_choice", capacity_factor=1.0), torch.float32),
    ("dropless bf16", dict(z_loss_coef=1e-3), torch.bfloat16),
]
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


class OpRecorder(TorchDispatchMode):
    """Records the name of every moe_ext op that reaches the dispatcher below autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name.startswith("moe_ext::"):
            self.seen.add(name[len("moe_ext::") :])
        return func(*args, **(kwargs or {}))


def run(layer: moe_ext.MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.float().square().mean().backward()  # aux_loss_mode="auto": the aux losses' gradients join here
    grads = {name: p.grad for name, p in layer.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def compare(case: str, got, want, dtype: torch.dtype) -> list[str]:
    (y, gx, gp), (y_ref, gx_ref, gp_ref) = got, want
    pairs = [("output", y, y_ref), ("grad x", gx, gx_ref)] + [(f"grad {n}", gp.get(n), g) for n, g in gp_ref.items()]
    errors = [] if gp.keys() == gp_ref.keys() else [f"{case}: gradients of {sorted(gp)} != {sorted(gp_ref)}"]
    for what, a, b in pairs:
        if a is None:
            continue
        try:
            torch.testing.assert_close(a.cpu().float(), b.float(), **TOLERANCE[dtype])
        except AssertionError as error:
            errors.append(f"{case}: {what}: {str(error).splitlines()[0]}")
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"cuda_op_suite: no CUDA device (torch {torch.__version__})", file=sys.stderr)
        return 2
    recorder = OpRecorder()
    errors = []
    for case, kwargs, dtype in CASES:
        torch.manual_seed(0)
        layer = moe_ext.MoE(32, 48, 8, top_k=2, **kwargs).to(dtype)
        x = torch.randn(2, 17, 32, dtype=dtype)
        want = run(layer, x)
        with recorder:
            got = run(copy.deepcopy(layer).to(device), x.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        found = compare(case, got, want, dtype)
        errors += found
        print(f"cuda_op_suite: {case} on {device}: {'FAILED' if found else 'ok'}")
    missing = sorted(set(registered_ops()) - recorder.seen)
    if missing:
        errors.append(f"ops never called on {device} (add a case): {', '.join(missing)}")
    for error in errors:
        print(f"cuda_op_suite: FAILED: {error}", file=sys.stderr)
    if errors:
        return 1
    print(f"cuda_op_suite: ok, {len(recorder.seen)} ops called on {device}: {', '.join(sorted(recorder.seen))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
