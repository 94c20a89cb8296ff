"""`python -m moe_ext`: version, the torch the operator library was built against, and its backends."""

from __future__ import annotations

import torch


def main() -> None:
    import moe_ext
    from moe_ext import _C

    print(f"moe_ext {moe_ext.__version__}")
    print(f"built against torch {_C.built_with_torch}; running torch {torch.__version__}")
    print(f"CUDA kernels compiled in: {'yes' if _C.with_cuda else 'no'}; CUDA available: {torch.cuda.is_available()}")
    ops = sorted(name for name in dir(torch.ops.moe_ext) if not name.startswith("_") and name != "name")
    print(f"operators: {', '.join(ops)}")


if __name__ == "__main__":
    main()
