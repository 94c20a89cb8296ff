#!/usr/bin/env python3
"""Shows that the CUDA emulation suite catches real kernel defects: applies, one at a time, a defect to the
shipped CUDA code (csrc/cuda), rebuilds moe_ext_cuda_emulation_tests, runs it, and restores the file.

Every mutation must make the suite fail; the script prints a table (mutation, outcome, the failing tests
or the stop reason, seconds) and exits non-zero if the unmutated suite fails or any mutation survives.
Not part of the default test run (about a minute per mutation: a rebuild of the suite and a run).

    python3 tests/cuda_emulation/mutations.py [--build-dir build/cmake] [--only NAME ...] [--json FILE]

The build directory must be configured with -DMOE_EXT_BUILD_TESTS=ON (scripts/run_tests.sh's build/cmake).
The source files are restored after each mutation, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutation:
    name: str
    defect: str
    path: str  # relative to the repository
    old: str  # must occur exactly once
    new: str


MUTATIONS = [
    Mutation(
        "missing-barrier",
        "topk_gating's shared-memory path reads the staged logits without the __syncthreads after staging",
        "csrc/cuda/gating_kernels.cuh",
        "      select_rows[(i / E) * stride + i % E] = static_cast<acc>(logits[first * E + i]);\n"
        "    }\n"
        "    __syncthreads();\n",
        "      select_rows[(i / E) * stride + i % E] = static_cast<acc>(logits[first * E + i]);\n    }\n",
    ),
    Mutation(
        "block-stride-off-by-one",
        "load_balancing_loss's block-stride loop zeroing the shared histogram stops one expert early",
        "csrc/cuda/losses_kernels.cuh",
        "for (int64_t e = threadIdx.x; e < num_experts; e += blockDim.x) histogram[e] = 0;",
        "for (int64_t e = threadIdx.x; e < num_experts - 1; e += blockDim.x) histogram[e] = 0;",
    ),
    Mutation(
        "shuffle-width",
        "combine_backward's row_dot butterfly shuffles with width 16 instead of the whole warp",
        "csrc/cuda/permute_kernels.cuh",
        "partial += __shfl_xor_sync(0xffffffffu, partial, offset);",
        "partial += __shfl_xor_sync(0xffffffffu, partial, offset, 16);",
    ),
    Mutation(
        "misaligned-vector",
        "vector_elems checks row starts against the element size, not the vector's: 16-byte loads from misaligned rows",
        "csrc/cuda/device.cuh",
        "ok = ok && (base == nullptr || aligned_to(base, bytes));",
        "ok = ok && (base == nullptr || aligned_to(base, elem_size));",
    ),
    Mutation(
        "cub-temp-too-small",
        "make_plan's radix sort sizes its CUB temporary storage for half the items",
        "csrc/cuda/plan_launches.cuh",
        "SortPairs(nullptr, bytes, keys_in, keys_out, values_in, values_out, items,",
        "SortPairs(nullptr, bytes, keys_in, keys_out, values_in, values_out, items / 2,",
    ),
    Mutation(
        "gemm-leading-dimension",
        "grouped_mm_backward reads w[e]^T with leading dimension in instead of out (the transposed "
        "operand's row stride)",
        "csrc/cuda/grouped_mm_launches.cuh",
        "mm_out(grad_x_e, grad_e, w[e].t());",
        "mm_out(grad_x_e, grad_e, w[e].t().as_strided({out_cols, in_cols}, {in_cols, 1}));",
    ),
    Mutation(
        "capacity-rank-off-by-one",
        "make_plan's capacity kernel ranks an expert's assignments from -1: one assignment too many kept",
        "csrc/cuda/plan_kernels.cuh",
        "steps::capacity_keeps(p - offsets[e], capacity, priority, a)",
        "steps::capacity_keeps(p - offsets[e] - 1, capacity, priority, a)",
    ),
]


def build(build_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["cmake", "--build", str(build_dir), "--target", "moe_ext_cuda_emulation_tests"],
        capture_output=True,
        text=True,
    )


def run_suite(build_dir: Path, timeout: float) -> tuple[int, str]:
    try:
        done = subprocess.run(
            [str(build_dir / "moe_ext_cuda_emulation_tests")],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=build_dir,
        )
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    return done.returncode, done.stdout + done.stderr


def summarize(code: int, output: str) -> str:
    failed = sorted(set(re.findall(r"^\[  FAILED  \] (\w+\.\w+)", output, re.M)))
    if failed:
        return "failed: " + ", ".join(failed)
    for pattern in (r"runtime error: [^\n]*", r"ERROR: AddressSanitizer: [^\n]*", r"what\(\):\s+[^\n]*"):
        found = re.search(pattern, output)
        if found:
            return f"stopped (exit {code}): {found.group(0)[:160]}"
    if code < -1:  # killed by a signal: an out-of-bounds access on the host (a memory fault on the device)
        return f"crashed (signal {-code})"
    return "timed out" if code == -1 else f"exit {code}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build-dir", type=Path, default=REPO / "build" / "cmake")
    parser.add_argument("--only", nargs="*", default=None, help="mutation names (default: all)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per suite run")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args()
    build_dir = args.build_dir.resolve()
    if not (build_dir / "CMakeCache.txt").exists():
        parser.error(f"{build_dir} is not a configured CMake build (scripts/run_tests.sh creates build/cmake)")
    chosen = [m for m in MUTATIONS if args.only is None or m.name in args.only]
    if args.only is not None and len(chosen) != len(args.only):
        parser.error(f"unknown mutation among {args.only}; known: {[m.name for m in MUTATIONS]}")

    for m in chosen:  # every defect must still apply to today's sources
        count = (REPO / m.path).read_text().count(m.old)
        if count != 1:
            print(f"mutation {m.name}: its text occurs {count} times in {m.path} (must be once)")
            return 2

    built = build(build_dir)
    if built.returncode != 0:
        print(built.stdout[-4000:] + built.stderr[-4000:])
        print("the unmutated suite does not build")
        return 2
    code, output = run_suite(build_dir, args.timeout)
    if code != 0:
        print(output[-4000:])
        print("the unmutated suite fails: fix that first")
        return 2
    print("unmutated suite: passes")

    results = []
    for m in chosen:
        path = REPO / m.path
        original = path.read_text()
        start = time.monotonic()
        try:
            path.write_text(original.replace(m.old, m.new))
            built = build(build_dir)
            if built.returncode != 0:
                outcome, caught = "does not compile: " + (built.stdout + built.stderr).strip().splitlines()[-1], False
            else:
                code, output = run_suite(build_dir, args.timeout)
                caught = code != 0
                outcome = summarize(code, output) if caught else "SURVIVED: the suite passes"
        finally:
            path.write_text(original)
        results.append(
            {
                "mutation": m.name,
                "defect": m.defect,
                "file": m.path,
                "caught": caught,
                "outcome": outcome,
                "seconds": round(time.monotonic() - start, 1),
            }
        )
        print(f"{m.name:26} {'caught' if caught else 'MISSED':7} {results[-1]['seconds']:6.1f} s  {outcome}")
        sys.stdout.flush()
    build(build_dir)  # leave the unmutated suite built

    print()
    print("| mutation | defect | outcome |")
    print("|---|---|---|")
    for r in results:
        print(f"| {r['mutation']} | {r['defect']} | {r['outcome']} |")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    missed = [r["mutation"] for r in results if not r["caught"]]
    print(
        f"\n{len(results) - len(missed)} of {len(results)} mutations caught" + (f"; missed: {missed}" if missed else "")
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
