"""Loads the compiled operator library moe_ext._C, with a message that names the fix."""

from __future__ import annotations

import torch

_BUILD_HINT = (
    "rebuild it against the installed torch from the repository root with `pip install --no-build-isolation -e .`"
)


def load() -> None:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.moe_ext.*)
    except ImportError as error:
        message = str(error)
        if "undefined symbol" in message or "version" in message.lower():
            reason = f"moe_ext._C was built for another torch than the installed {torch.__version__}"
        else:
            reason = "moe_ext._C, the compiled operator library, is missing"
        raise ImportError(f"{reason}: {message}. Fix: {_BUILD_HINT}.") from error
    from . import _C as library

    built_with = getattr(library, "built_with_torch", None)
    running = torch.__version__.split("+")[0]
    if built_with is not None and built_with != running:
        raise ImportError(
            f"moe_ext._C was built against torch {built_with} but torch {running} is installed. Fix: {_BUILD_HINT}."
        )
    if not hasattr(torch.ops.moe_ext, "topk_gating"):
        raise ImportError(f"moe_ext._C loaded but registered no operators. Fix: {_BUILD_HINT}.")
