"""`python -m moe_ext`: version, the torch the operator library was built against, and each op's backends.

`python -m moe_ext --check` also exits with status 1 when an op lacks a kernel the build should have
registered (see `missing_kernels`).
"""

from __future__ import annotations

import argparse
import sys

import torch

NAMESPACE = "moe_ext"
BACKENDS = ("CPU", "CUDA", "Meta", "Autograd")


def registered_ops() -> list[str]:
    """Every op of the moe_ext namespace the dispatcher knows (names without the namespace), sorted."""
    prefix = f"{NAMESPACE}::"
    return sorted(name[len(prefix) :] for name in torch._C._dispatch_get_all_op_names() if name.startswith(prefix))


def backends(op: str) -> list[str]:
    """The keys of BACKENDS for which `op` has a kernel registered (a fallthrough counts)."""
    return [key for key in BACKENDS if torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key)]


def required_backends(op: str, ops: list[str], with_cuda: bool) -> list[str]:
    """What `op` must have: CPU and Meta always, CUDA in a CUDA build, Autograd unless it is a backward op.

    `<name>_backward` (with `<name>` registered) is the kernel an autograd Function of csrc/autograd calls
    from its backward; it is not itself differentiable (the Functions refuse double backward), so it has no
    Autograd kernel. Every other op has one: an autograd Function, or a fallthrough for the integer-only
    routing plans, so that no op reaches the dispatcher's autograd fallback by accident.
    """
    needed = ["CPU", "Meta"] + (["CUDA"] if with_cuda else [])
    is_backward = op.endswith("_backward") and op[: -len("_backward")] in ops
    return needed if is_backward else needed + ["Autograd"]


def missing_kernels(with_cuda: bool) -> dict[str, list[str]]:
    """op -> the required backends it has no kernel for (empty when the build is complete)."""
    ops = registered_ops()
    missing = {}
    for op in ops:
        have = backends(op)
        lacking = [key for key in required_backends(op, ops, with_cuda) if key not in have]
        if lacking:
            missing[op] = lacking
    return missing


def report(with_cuda: bool) -> list[str]:
    ops = registered_ops()
    width = max((len(op) for op in ops), default=0)
    lines = [f"operators ({len(ops)}; kernels per backend from the dispatcher):"]
    for op in ops:
        have = set(backends(op))
        cells = "  ".join(key if key in have else "-" * len(key) for key in BACKENDS)
        lines.append(f"  {op:<{width}}  {cells}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_ext", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if an op lacks a kernel this build should have")
    args = parser.parse_args(argv)

    import moe_ext
    from moe_ext import _C

    with_cuda = bool(_C.with_cuda)
    print(f"moe_ext {moe_ext.__version__} at {moe_ext.__path__[0]}")
    print(f"built against torch {_C.built_with_torch}; running torch {torch.__version__}")
    print(f"CUDA kernels compiled in: {'yes' if with_cuda else 'no'}; CUDA available: {torch.cuda.is_available()}")
    print("\n".join(report(with_cuda)))
    if not args.check:
        return 0
    missing = missing_kernels(with_cuda)
    if not registered_ops():
        print("check FAILED: no moe_ext op is registered", file=sys.stderr)
        return 1
    for op, keys in missing.items():
        print(f"check FAILED: moe_ext::{op} has no {', '.join(keys)} kernel", file=sys.stderr)
    if missing:
        return 1
    kinds = "CPU, CUDA, Meta" if with_cuda else "CPU, Meta"
    print(f"check ok: every op has {kinds} kernels, every op but the *_backward ones an Autograd kernel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
