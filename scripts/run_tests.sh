#!/usr/bin/env bash
# The whole test run (what CI runs): set-up, the pytest suite, then the LibTorch CMake build and its
# GoogleTest suite under ctest. Every test stage runs even if an earlier one failed; the exit code is
# non-zero if any stage failed.
#
# Environment: PYTHON (interpreter, as in install.sh), JOBS (parallel build jobs, default: nproc).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
if [[ -z "${PYTHON:-}" ]]; then
  if command -v python3 >/dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi
export PYTHON
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
BUILD_DIR="$REPO/build/cmake"

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

cmake_build() {
  # A build directory made by another generator cannot be reused with Ninja.
  local cache="$BUILD_DIR/CMakeCache.txt"
  if [[ -f "$cache" ]] && ! grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja$' "$cache"; then
    rm -rf "$BUILD_DIR"
  fi
  cmake -S "$REPO" -B "$BUILD_DIR" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DPython3_EXECUTABLE="$(command -v "$PYTHON")" -DMOE_EXT_BUILD_TESTS=ON &&
    cmake --build "$BUILD_DIR" -j "$JOBS"
}

stage "1/4 set-up: scripts/install.sh"
start=$SECONDS
bash scripts/install.sh
echo "---- set-up: ok in $((SECONDS - start)) s"

stage "2/4 pytest: python -m pytest tests -q"
run_stage pytest "$PYTHON" -m pytest tests -q

stage "3/4 CMake: configure and build $BUILD_DIR (LibTorch library + GoogleTest suite)"
run_stage cmake-build cmake_build

stage "4/4 ctest: GoogleTest suite"
if [[ " ${failed[*]} " == *" cmake-build "* ]]; then
  echo "---- ctest: skipped, the CMake build failed"
  failed+=(ctest)
else
  run_stage ctest ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$JOBS"
fi

echo
if ((${#failed[@]})); then
  echo "run_tests: FAILED stages: ${failed[*]}"
  exit 1
fi
echo "run_tests: all stages ok"
