#!/usr/bin/env bash
# The whole test run (what CI runs): set-up, the pytest suite, then the LibTorch CMake build and its
# GoogleTest suites under ctest, then the CUDA execution model's suite (tests/cuda_emulation: the shipped CUDA
# kernels run on the CPU, against the CPU kernels, under several seeds), then the CUDA compile check (every CUDA source through nvcc for sm_80 and
# sm_90, warnings as errors; compiled, never linked or run: CI has no GPU), then the CUDA-torch stage
# (scripts/cuda_torch_build.sh: a venv with the CUDA build of torch, moe_ext built with MOE_EXT_CUDA=1 and
# linked as a GPU user gets it, its CUDA kernel registrations checked through the dispatcher without a GPU,
# and the pytest suite, less its slowest orchestration files, run against that build), then the GoogleTest suites again
# in a build with AddressSanitizer + UndefinedBehaviorSanitizer, and a time-bounded libFuzzer run of
# tests/cpp/fuzz_plan.cpp (clang) from the seed corpus tests/cpp/fuzz_corpus. Every test stage runs even if
# an earlier one failed; the exit code is non-zero if any stage failed.
#
# Environment: PYTHON (interpreter, as in install.sh), JOBS (parallel build jobs, default: nproc),
# CUDACXX (nvcc to use; default: nvcc on PATH, else /usr/local/cuda/bin/nvcc). Without nvcc the CUDA stage
# is skipped on a developer machine and fails under CI=true. FUZZ_SECONDS (length of the fuzz run,
# default 60). EMULATION_SEEDS (the CUDA emulation stage's seeds, default "0 1 2"). The CUDA-torch stage
# reads its own settings (scripts/cuda_torch_build.sh); MOE_EXT_SKIP_CUDA_TORCH=1 skips it on a developer
# machine (CI=true fails instead).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [[ -z "${PYTHON:-}" ]]; then
  if command -v python3 >/dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi
export PYTHON
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
BUILD_DIR="$REPO/build/cmake"
CUDA_CHECK_DIR="$REPO/build/cuda-check"
SANITIZE_DIR="$REPO/build/cmake-sanitize"
FUZZ_DIR="$REPO/build/cmake-fuzz"
FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
EMULATION_SEEDS="${EMULATION_SEEDS:-0 1 2}"

failed=()
stage() {
  echo
  echo "==================== $* ===================="
}
run_stage() {  # run_stage NAME COMMAND...: runs the command, records a failure, never exits
  local name="$1" start=$SECONDS status=0
  shift
  "$@" || status=$?
  echo "---- $name: $([[ $status == 0 ]] && echo ok || echo "FAILED (exit $status)") in $((SECONDS - start)) s"
  if [[ $status != 0 ]]; then failed+=("$name"); fi
  return 0
}

reset_if_not_ninja() {  # a build directory made by another generator cannot be reused with Ninja
  local cache="$1/CMakeCache.txt"
  if [[ -f "$cache" ]] && ! grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja$' "$cache"; then
    rm -rf "$1"
  fi
}

cmake_build() {
  reset_if_not_ninja "$BUILD_DIR"
  cmake -S "$REPO" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DPython3_EXECUTABLE="$(command -v "$PYTHON")" -DMOE_EXT_BUILD_TESTS=ON &&
    cmake --build "$BUILD_DIR" -j "$JOBS"
}

# The CUDA execution model's suite (built by the CMake stage) once per seed: each seed draws another block
# order and thread interleaving, so a race between threads that the barriers do not order shows under one
# of them. The last run prints the kernels it launched (the coverage list). The sanitize stage runs it once
# more, under ASan + UBSan.
cuda_emulation() {
  local seed status=0 log
  for seed in $EMULATION_SEEDS; do
    log="$BUILD_DIR/cuda_emulation_seed_$seed.log"
    if MOE_EXT_EMULATION_SEED="$seed" "$BUILD_DIR/moe_ext_cuda_emulation_tests" >"$log" 2>&1; then
      echo "seed $seed: $(grep -E '^\[  PASSED  \]' "$log")"
    else
      status=1
      tail -n 80 "$log"
      echo "seed $seed: FAILED (log: $log)"
    fi
  done
  sed -n '/kernels launched through the emulation/,/^\[/p' "$log" | sed '$d'
  return "$status"
}

cuda_compile_check() {
  local nvcc="${CUDACXX:-$(command -v nvcc || true)}"
  if [[ -z "$nvcc" && -x /usr/local/cuda/bin/nvcc ]]; then nvcc=/usr/local/cuda/bin/nvcc; fi
  if [[ -z "$nvcc" ]]; then
    echo "no nvcc on PATH, in CUDACXX or at /usr/local/cuda/bin/nvcc"
    if [[ "${CI:-}" == true ]]; then return 1; fi
    echo "---- skipped on this machine (CI fails here)"
    return 0
  fi
  reset_if_not_ninja "$CUDA_CHECK_DIR"
  "$nvcc" --version | tail -2
  cmake -S "$REPO" -B "$CUDA_CHECK_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DPython3_EXECUTABLE="$(command -v "$PYTHON")" -DMOE_EXT_CUDA_COMPILE_CHECK=ON -DMOE_EXT_BUILD_TESTS=OFF \
    -DCMAKE_CUDA_COMPILER="$nvcc" -DCMAKE_CUDA_ARCHITECTURES="80;90" &&
    cmake --build "$CUDA_CHECK_DIR" -j "$JOBS"
}

# The sanitized executables carry their ASan/UBSan run-time options (tests/cpp/sanitizer_options.cpp: extra
# ASan checks, leak detection on, UBSan stack traces; UBSan aborts on its first finding, as ASan does), so
# plain ctest needs no environment; ASAN_OPTIONS and UBSAN_OPTIONS from the environment apply on top.
sanitize_build_and_test() {
  reset_if_not_ninja "$SANITIZE_DIR"
  cmake -S "$REPO" -B "$SANITIZE_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DPython3_EXECUTABLE="$(command -v "$PYTHON")" -DMOE_EXT_SANITIZE=ON -DMOE_EXT_BUILD_TESTS=ON &&
    cmake --build "$SANITIZE_DIR" -j "$JOBS" &&
    ctest --test-dir "$SANITIZE_DIR" --output-on-failure -j "$JOBS"
}

cuda_torch_stage() {
  if [[ "${MOE_EXT_SKIP_CUDA_TORCH:-0}" == 1 ]]; then
    echo "MOE_EXT_SKIP_CUDA_TORCH=1"
    if [[ "${CI:-}" == true ]]; then return 1; fi
    echo "---- skipped on this machine (CI fails here)"
    return 0
  fi
  MAX_JOBS="$JOBS" BASE_PYTHON="$PYTHON" bash "$REPO/scripts/cuda_torch_build.sh"
}

# libFuzzer writes the inputs it finds to a scratch corpus (the committed seeds are only read) and a crashing
# input to $FUZZ_DIR/crash-*; its log is $FUZZ_DIR/fuzz.log.
fuzz_build_and_run() {
  local clangxx
  clangxx="$(command -v clang++ || true)"
  if [[ -z "$clangxx" ]]; then
    echo "no clang++ on PATH (scripts/install.sh installs clang and libclang-rt-14-dev)"
    return 1
  fi
  reset_if_not_ninja "$FUZZ_DIR"
  cmake -S "$REPO" -B "$FUZZ_DIR" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_COMPILER="$clangxx" \
    -DPython3_EXECUTABLE="$(command -v "$PYTHON")" -DMOE_EXT_FUZZ=ON -DMOE_EXT_BUILD_TESTS=OFF &&
    cmake --build "$FUZZ_DIR" -j "$JOBS" || return 1
  local scratch status=0
  scratch="$(mktemp -d)"
  "$FUZZ_DIR/moe_ext_fuzz_plan" -max_total_time="$FUZZ_SECONDS" -timeout=10 -print_final_stats=1 \
    -artifact_prefix="$FUZZ_DIR/" "$scratch" "$REPO/tests/cpp/fuzz_corpus" >"$FUZZ_DIR/fuzz.log" 2>&1 || status=$?
  rm -rf "$scratch"
  if [[ $status != 0 ]]; then
    tail -n 60 "$FUZZ_DIR/fuzz.log"
    echo "fuzz run failed (exit $status): the input is $FUZZ_DIR/crash-* (or oom-*/timeout-*); replay it with"
    echo "  $FUZZ_DIR/moe_ext_fuzz_plan <that file>"
    return "$status"
  fi
  grep -E '^(INFO: seed corpus|#[0-9]+\s+INITED|stat::|Done [0-9]+ runs)' "$FUZZ_DIR/fuzz.log"
}

stage "1/9 set-up: scripts/install.sh"
start=$SECONDS
bash scripts/install.sh
echo "---- set-up: ok in $((SECONDS - start)) s"

stage "2/9 pytest: python -m pytest tests -q"
run_stage pytest "$PYTHON" -m pytest tests -q

stage "3/9 CMake: configure and build $BUILD_DIR (LibTorch library + GoogleTest suite)"
run_stage cmake-build cmake_build

stage "4/9 ctest: GoogleTest suite"
if [[ " ${failed[*]} " == *" cmake-build "* ]]; then
  echo "---- ctest: skipped, the CMake build failed"
  failed+=(ctest)
else
  run_stage ctest ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$JOBS" -LE cuda_emulation
fi

stage "5/9 CUDA emulation: the CUDA kernels executed on the CPU (tests/cuda_emulation), seeds $EMULATION_SEEDS"
if [[ " ${failed[*]} " == *" cmake-build "* ]]; then
  echo "---- cuda-emulation: skipped, the CMake build failed"
  failed+=(cuda-emulation)
else
  run_stage cuda-emulation cuda_emulation
fi

stage "6/9 CUDA compile check: nvcc for sm_80 and sm_90, warnings as errors, in $CUDA_CHECK_DIR"
run_stage cuda-compile-check cuda_compile_check

stage "7/9 CUDA torch: torch==${CUDA_TORCH_VERSION:-2.14.1} (CUDA) venv, MOE_EXT_CUDA=1 build, dispatcher check, pytest"
run_stage cuda-torch cuda_torch_stage

stage "8/9 sanitizers: GoogleTest suites with ASan + UBSan in $SANITIZE_DIR"
run_stage sanitize sanitize_build_and_test

stage "9/9 fuzz: libFuzzer on make_plan/dispatch/combine for $FUZZ_SECONDS s in $FUZZ_DIR (clang)"
run_stage fuzz fuzz_build_and_run

echo
if ((${#failed[@]})); then
  echo "run_tests: FAILED stages: ${failed[*]}"
  exit 1
fi
echo "run_tests: all stages ok"
