"""The CPU output cache: large outputs of moe_ext's CPU operators reuse memory their predecessors freed.

Every CPU output of at least 1 MiB (grouped_mm's weight gradients and activations, dispatch and
combine rows, swiglu) is carved from a block that an earlier moe_ext output released, or from
fresh memory advised for transparent huge pages. glibc hands blocks over 32 MB back to the
kernel on free, so without the cache each training step's ``[E, H, 2F]`` weight gradient
page-faults 4 KB at a time on first touch, which costs more than the GEMM that fills it when
experts are small (see benchmarks/RESULTS.md, "Memory that is already mapped").

The cache keeps at most ``limit_bytes`` in free blocks (default 1 GiB, or the environment
variable ``MOE_EXT_CPU_CACHE_MB`` read at the first large allocation); the oldest free blocks go
first when it is full. Blocks in use are ordinary tensor storage: the profiler and
``torch.profiler``'s memory view see them like any CPU tensor. CUDA tensors are not affected.
"""

from __future__ import annotations

from . import _library

_library.load()

from . import _C  # noqa: E402


def cpu_cache_info() -> dict[str, int]:
    """The cache's state: ``limit_bytes``, ``cached_bytes`` / ``cached_blocks`` (free blocks kept),
    ``in_use_bytes`` (live tensors carved from it), ``hits`` and ``misses`` (allocations that
    reused a block / took fresh memory) since the process started."""
    return _C.cpu_cache_info()


def empty_cpu_cache() -> None:
    """Frees every block the cache keeps; tensors in use are untouched."""
    _C.empty_cpu_cache()


def set_cpu_cache_limit(limit_bytes: int) -> None:
    """Keeps at most ``limit_bytes`` in free blocks (oldest dropped first); 0 keeps none, so every
    large output takes fresh memory and gives it back when freed."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int):
        raise TypeError(f"limit_bytes must be an int, got {type(limit_bytes).__name__}")
    if limit_bytes < 0:
        raise ValueError(f"limit_bytes must be >= 0, got {limit_bytes}")
    _C.set_cpu_cache_limit(limit_bytes)


__all__ = ["cpu_cache_info", "empty_cpu_cache", "set_cpu_cache_limit"]
