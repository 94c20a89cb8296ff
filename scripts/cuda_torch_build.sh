#!/usr/bin/env bash
# The CUDA-torch stage of scripts/run_tests.sh: moe_ext built the way a GPU user builds it (MOE_EXT_CUDA=1,
# CUDAExtension linked against libtorch_cuda and cuBLAS) in a venv of its own with the CUDA build of torch,
# installed (non-editable) into that venv, loaded without a GPU, checked through the dispatcher
# (`python -m moe_ext --check`: every op has CPU, CUDA and Meta kernels, every forward op an Autograd one), and
# put through the CPU test suite. The clone's own CPU build (moe_ext/_C*.so) is never touched: the build runs
# in a copy of the tracked files, and the tests run from a copy of tests/ that holds no moe_ext package, so
# every process, subprocesses included, imports the venv's moe_ext (tests/test_packaging.py asserts it).
#
# Cached between runs on one machine (a fresh machine creates everything): the venv (keyed by the torch
# version) and the build folder of the copy, so ninja recompiles only the sources that changed.
#
# The build log (compiler warnings included) is $MOE_EXT_CACHE/cuda-build-torch-*/build.log.
# Environment: CUDA_TORCH_VERSION (default 2.14.1), MOE_EXT_CACHE (default ~/.cache/moe_ext),
# TORCH_CUDA_ARCH_LIST (default 9.0: one arch keeps the build to minutes), MAX_JOBS (default: nproc),
# BASE_PYTHON (the interpreter that creates the venv; default python3), CUDA_HOME (else setup.py finds it),
# MOE_EXT_CUDA_STAGE_PYTEST_ARGS (extra pytest arguments, e.g. "-x"), MOE_EXT_CUDA_STAGE_ALL_TESTS=1 (the whole suite).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CUDA_TORCH_VERSION="${CUDA_TORCH_VERSION:-2.14.1}"
CACHE="${MOE_EXT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moe_ext}"
VENV="$CACHE/venv-torch-$CUDA_TORCH_VERSION"
WORK="$CACHE/cuda-build-torch-$CUDA_TORCH_VERSION"
BASE_PYTHON="${BASE_PYTHON:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 2)}"
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1

log() { echo "[cuda-torch] $*"; }
elapsed() { echo "$((SECONDS - $1)) s"; }

# sync SRC DEST PATH...: makes DEST hold exactly the git-visible files of SRC under PATH (all when none is
# given), rewriting only files whose bytes differ, so unchanged files keep their time stamps for ninja.
sync_tree() {
  local src="$1" dest="$2"
  shift 2
  (cd "$src" && git ls-files -z --cached --others --exclude-standard -- "$@") | "$BASE_PYTHON" -c '
import os, shutil, sys
src, dest, prefixes = sys.argv[1], sys.argv[2], sys.argv[3:]
wanted = {p for p in sys.stdin.read().split("\0") if p and os.path.isfile(os.path.join(src, p))}
for path in wanted:
    a, b = os.path.join(src, path), os.path.join(dest, path)
    if os.path.isfile(b) and os.path.getsize(a) == os.path.getsize(b):
        with open(a, "rb") as fa, open(b, "rb") as fb:
            if fa.read() == fb.read():
                continue
    os.makedirs(os.path.dirname(b), exist_ok=True)
    shutil.copyfile(a, b)
    shutil.copymode(a, b)
dest = os.path.normpath(dest)
for top in prefixes or ["."]:
    for folder, dirs, files in os.walk(os.path.normpath(os.path.join(dest, top))):
        dirs[:] = [d for d in dirs if not (folder == dest and d == "build")]  # the objects of ninja stay
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), dest)
            if rel not in wanted and "__pycache__" not in rel:
                os.remove(os.path.join(dest, rel))
' "$src" "$dest" "$@"
}

# --- 1. the venv: CUDA torch, the pinned test tools -----------------------------------------------------
start=$SECONDS
venv_ok() {
  [[ -f "$VENV/.moe_ext-ready" ]] && "$VENV/bin/python" -c '
import sys, torch
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda else 1)' "$CUDA_TORCH_VERSION" 2>/dev/null
}
if venv_ok; then
  log "reusing the venv $VENV"
else
  log "creating the venv $VENV with torch==$CUDA_TORCH_VERSION (the CUDA build)"
  rm -rf "$VENV"
  mkdir -p "$CACHE"
  "$BASE_PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet "torch==$CUDA_TORCH_VERSION"
  touch "$VENV/.moe_ext-ready"
fi
# The exact torch pin as a constraint: nothing installed here may replace the venv's torch.
constraint="$VENV/.torch-constraint.txt"
echo "torch==$CUDA_TORCH_VERSION" >"$constraint"
"$VENV/bin/python" -m pip install --quiet -c "$constraint" -r "$REPO/requirements-dev.txt"
"$VENV/bin/python" -c 'import torch; assert torch.version.cuda, torch.__version__
print(f"[cuda-torch] torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible: {torch.cuda.is_available()}")'
log "venv ready in $(elapsed "$start")"

# --- 2. the build: a wheel, from a copy of the tracked files ------------------------------------------------
start=$SECONDS
mkdir -p "$WORK/src" "$WORK/dist"
sync_tree "$REPO" "$WORK/src"
# setuptools skips build_ext when the library is newer than the .cpp files even if a header changed; ninja
# (build/temp.*) decides what to recompile.
rm -rf "$WORK/src/build/lib."* "$WORK/src/build/bdist."* "$WORK/src/"*.egg-info "$WORK/dist/"*.whl
log "MOE_EXT_CUDA=1 pip wheel --no-build-isolation --no-deps (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
(cd "$WORK/src" && MOE_EXT_CUDA=1 "$VENV/bin/python" -m pip wheel -v --no-build-isolation --no-deps -w "$WORK/dist" .) \
  >"$WORK/build.log" 2>&1 || { tail -n 80 "$WORK/build.log"; log "build FAILED (log: $WORK/build.log)"; exit 1; }
grep -E '^moe_ext: ' "$WORK/build.log" || true
wheel="$(ls "$WORK/dist/"moe_ext-*.whl)"
"$VENV/bin/python" -m pip install --quiet --no-deps --force-reinstall "$wheel"
log "built and installed $(basename "$wheel") in $(elapsed "$start")"

# --- 3. the installed build, without a GPU ------------------------------------------------------------------
suite="$WORK/suite"
mkdir -p "$suite"
cd "$suite"  # no moe_ext/ here: `import moe_ext` must find the venv's
package="$("$VENV/bin/python" -c 'import os, moe_ext; print(os.path.dirname(os.path.realpath(moe_ext.__file__)))')"
site="$("$VENV/bin/python" -c 'import os, sysconfig; print(os.path.realpath(sysconfig.get_paths()["platlib"]))')"
[[ "$package" == "$site/moe_ext" ]] || { log "moe_ext resolves to $package, not the venv's $site/moe_ext"; exit 1; }
ldd "$package"/_C*.so | grep -E 'libtorch_cuda|libcudart|libcublas' | sed 's/^/[cuda-torch]   /' || true
report="$("$VENV/bin/python" -m moe_ext --check)" || { echo "$report"; log "python -m moe_ext --check FAILED"; exit 1; }
echo "$report"
grep -q '^CUDA kernels compiled in: yes' <<<"$report" || { log "python -m moe_ext reports no CUDA kernels"; exit 1; }

# --- 4. the CPU test suite against that build -------------------------------------------------------------------
# Every test file that calls the operators directly or through the layer, on this build and this torch. Left
# out (stage 2 runs them on the CPU build of the same sources): the files that only drive those same calls
# from more processes, at larger sizes or through transformers, which cost this stage the most time, since
# every process imports the CUDA build of torch. MOE_EXT_CUDA_STAGE_ALL_TESTS=1 runs the whole suite.
SLOW_ORCHESTRATION=(test_expert_parallel.py test_scale.py test_toolbox.py test_transformers_backend.py
  test_transformers_swap.py)
start=$SECONDS
sync_tree "$REPO" "$suite" tests examples docs benchmarks scripts pyproject.toml
ignore=()
if [[ "${MOE_EXT_CUDA_STAGE_ALL_TESTS:-0}" != 1 ]]; then
  for name in "${SLOW_ORCHESTRATION[@]}"; do ignore+=("--ignore=tests/$name"); done
fi
log "pytest (CPU suite${ignore:+, without ${SLOW_ORCHESTRATION[*]}}) from $suite against $package"
# shellcheck disable=SC2086
MOE_EXT_EXPECT_PACKAGE="$package" MOE_EXT_EXPECT_CUDA_BUILD=1 MOE_EXT_SOURCE_DIR="$WORK/src" \
  "$VENV/bin/python" -m pytest tests -q -p no:cacheprovider "${ignore[@]}" ${MOE_EXT_CUDA_STAGE_PYTEST_ARGS:-}
log "pytest ok in $(elapsed "$start")"
