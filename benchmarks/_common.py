"""Shared benchmark plumbing: interleaved median timing, peak tensor memory, environment record, output files."""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# At its default level Kineto prints two "USDT ... profiler_start/stop" lines for every profiled call, and the
# peak-memory measurement profiles every implementation: dozens of lines between the tables. Level 6 keeps them
# out (read when a profile starts; an explicit KINETO_LOG_LEVEL wins).
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

RESULTS = Path(__file__).resolve().parent / "results"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    repeats: int = 10,
    warmup: int = 2,
    min_seconds: float = 0.25,
    max_repeats: int = 200,
    slow_seconds: float = 2.0,
    slow_repeats: int = 3,
    device: torch.device | str = "cpu",
) -> dict[str, dict]:
    """Times every function round-robin (a, b, c, a, b, c, ...) so machine noise hits all alike.

    After ``warmup`` untimed calls each, the number of rounds is at least ``repeats`` and
    large enough that one function gets ``min_seconds`` of timed calls (capped at
    ``max_repeats``). A function whose last warm-up call took over ``slow_seconds`` (a peer
    hundreds of times slower than the rest) runs in the first ``slow_repeats`` rounds only,
    so it cannot stretch a whole benchmark by minutes; its run count says so. Returns per
    name: median, p25, p75, min (seconds) and the run count. Python's garbage collector is
    off while timing.

    On a CUDA ``device`` each timed call is the time between two CUDA events recorded on the
    current stream just before and after it (the GPU's time for the work the call queued, plus
    any host wait inside it); the device is synchronized after every round, so no call's
    queued work spills into the next one's interval.
    """
    cuda = torch.device(device).type == "cuda"
    estimate = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            start = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            estimate[name] = time.perf_counter() - start
    slow = {name for name, seconds in estimate.items() if seconds > slow_seconds}
    slowest = max((v for n, v in estimate.items() if n not in slow), default=0.0)
    rounds = max(repeats, min(max_repeats, math.ceil(min_seconds / max(slowest, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    gc.collect()
    gc.disable()
    try:
        for round_ in range(rounds):
            events = []
            for name, fn in fns.items():
                if name in slow and round_ >= slow_repeats:
                    continue
                if cuda:
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                    fn()
                    end.record()
                    events.append((name, begin, end))
                    continue
                start = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - start)
            if cuda:
                torch.cuda.synchronize(device)
                for name, begin, end in events:
                    samples[name].append(begin.elapsed_time(end) / 1e3)
    finally:
        gc.enable()
    out = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        out[name] = {
            "median_s": statistics.median(values),
            "p25_s": q[0],
            "p75_s": q[2],
            "min_s": min(values),
            "runs": len(values),
        }
    return out


def peak_tensor_bytes(fn: Callable[[], object], setup: Callable[[], object] | None = None) -> int:
    """Peak bytes of live tensors allocated while ``fn`` runs, above what was live when it started.

    Read from torch.profiler's memory events (profile_memory=True): every allocation and free
    made through PyTorch's CPU allocator, summed in time order. It counts tensors (outputs,
    temporaries, saved activations, gradients), not the Python heap, not malloc made outside
    the allocator (std::vector scratch in C++ kernels) and not allocator/OS slack, so it is
    deterministic and comparable between implementations, unlike a process's RSS.

    ``setup`` runs first, outside the profile: it must drop what ``fn`` would otherwise free
    at its start (old .grad tensors), because the profiler records the free of a block it saw
    allocated in an earlier profile, and that free would hide part of the peak.
    """
    if setup is not None:
        setup()
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda item: item[0])
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_cuda_bytes(fn: Callable[[], object], setup: Callable[[], object] | None = None) -> int:
    """Peak bytes the CUDA caching allocator handed out while ``fn`` ran, above what was allocated at its start.

    torch.cuda.max_memory_allocated counts live tensor blocks (rounded to the allocator's 512-byte
    granularity), so like peak_tensor_bytes it leaves out allocator slack. ``setup`` as there.
    """
    if setup is not None:
        setup()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - start


def require_cuda(device: str, script: str) -> torch.device:
    """torch.device(device), or exit with a message saying why this machine cannot run CUDA timings."""
    if not device.startswith("cuda"):
        sys.exit(f"{script}: --device {device!r}: this script times CUDA kernels only (--device cuda)")
    if not torch.cuda.is_available():
        sys.exit(
            f"{script}: no CUDA device available (torch {torch.__version__}, built with CUDA "
            f"{torch.version.cuda or 'no'}): run it on a machine with an NVIDIA GPU and a CUDA build of torch"
        )
    return torch.device(device)


def environment(device: torch.device | str = "cpu") -> dict:
    """What the numbers depend on: versions, threads, CPU (and GPU), and the machine's load when measured."""
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cores": os.cpu_count(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # allocator settings change the cost of fresh large tensors (page faults): record them
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC_", "LD_PRELOAD", "OMP_", "KMP_"))},
    }
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
        info["cuda"] = torch.version.cuda
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(name: str, payload: dict) -> Path:
    path = RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
    return path


def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_mb(nbytes: int | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:.1f}"


def print_table(headers: list[str], rows: list[list[str]], title: str | None = None) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths, strict=True))))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    sys.stdout.flush()
