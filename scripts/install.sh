#!/usr/bin/env bash
# Sets up a fresh machine for moe_ext: pinned torch and dev tools, GoogleTest, clang with libFuzzer, and the
# compiled extension.
# Idempotent: every step checks first and skips what is already in place.
#
# Environment:
#   PYTHON              interpreter to install into (default: python3, else python)
#   TORCH_INDEX_URL     optional pip index for torch (e.g. a CPU-only wheel index)
#   MOE_EXT_FORCE_BUILD=1  rebuild the extension even when it looks up to date
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

TORCH_VERSION="2.13.0"
if [[ -z "${PYTHON:-}" ]]; then
  if command -v python3 >/dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi

log() { echo "[install] $*"; }
export PIP_ROOT_USER_ACTION=ignore

# --- System packages: GoogleTest headers, the build tools for CMake, clang + libFuzzer -------
apt_packages=()
[[ -d /usr/include/gtest ]] || apt_packages+=(libgtest-dev)
command -v cmake >/dev/null 2>&1 || apt_packages+=(cmake)
command -v ninja >/dev/null 2>&1 || apt_packages+=(ninja-build)
command -v g++ >/dev/null 2>&1 || apt_packages+=(g++)
# The fuzz stage of run_tests.sh: clang and its libFuzzer runtime (libclang_rt.fuzzer, in Debian's
# libclang-rt-<major>-dev; clang itself only pulls in the sanitizer runtimes).
if ! command -v clang++ >/dev/null 2>&1; then
  apt_packages+=(clang libclang-rt-14-dev)
elif [[ ! -f "$(clang++ -print-resource-dir)/lib/linux/libclang_rt.fuzzer-$(uname -m).a" ]]; then
  apt_packages+=("libclang-rt-$(clang++ -dumpversion | cut -d. -f1)-dev")
fi
if ((${#apt_packages[@]} == 0)); then
  log "GoogleTest headers, cmake, ninja, g++, clang and libFuzzer present; skipping apt"
else
  if [[ "$(id -u)" != 0 ]]; then
    echo "[install] error: missing system packages: ${apt_packages[*]}; installing them needs root." >&2
    echo "[install] Run as root, or: sudo apt-get update && sudo apt-get install -y ${apt_packages[*]}" >&2
    echo "[install] then rerun this script." >&2
    exit 1
  fi
  log "apt-get install ${apt_packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends "${apt_packages[@]}"
fi

# --- Python packages -------------------------------------------------------
# An exact pin: a range would let pip pull the newest CUDA build (several GB).
installed_torch="$("$PYTHON" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [[ "$installed_torch" == "$TORCH_VERSION" ]]; then
  log "torch $TORCH_VERSION already installed"
else
  log "installing torch==$TORCH_VERSION (found: ${installed_torch:-none})"
  "$PYTHON" -m pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$TORCH_VERSION"
fi

# pip skips requirements that are already satisfied, without network access.
log "installing pinned dev requirements (requirements-dev.txt)"
"$PYTHON" -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt

# --- The extension -------------------------------------------------------------
# Up to date when: `import moe_ext` (from outside the repo, so the installed
# package is what resolves) finds THIS checkout, its _C library exists, is
# newer than every build input, and loads into the installed torch and
# registers the operators. Anything else rebuilds.
extension_is_current() {
  (cd / && "$PYTHON" - "$REPO" <<'EOF'
import importlib.util
import os
import sys
import sysconfig

repo = os.path.realpath(sys.argv[1])


def stale(reason):
    print(f"[install] extension needs a build: {reason}")
    sys.exit(1)


spec = importlib.util.find_spec("moe_ext")
if spec is None or spec.origin is None:
    stale("moe_ext is not installed")
package = os.path.dirname(os.path.realpath(spec.origin))
if package != os.path.join(repo, "moe_ext"):
    stale(f"moe_ext resolves to {package}, not this checkout")
library = os.path.join(package, "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
if not os.path.isfile(library):
    stale(f"{library} is missing")
built = os.stat(library).st_mtime_ns
inputs = [os.path.join(repo, name) for name in ("setup.py", "pyproject.toml")]
for folder, _, files in os.walk(os.path.join(repo, "csrc")):
    inputs += [os.path.join(folder, name) for name in files]
newest = max(inputs, key=lambda path: os.stat(path).st_mtime_ns)
if os.stat(newest).st_mtime_ns >= built:
    stale(f"{os.path.relpath(newest, repo)} is newer than {os.path.basename(library)}")
try:
    import torch

    torch.ops.load_library(library)
except Exception as error:  # wrong torch ABI, missing symbol, ...
    stale(f"{os.path.basename(library)} does not load: {error}")
if not hasattr(torch.ops.moe_ext, "topk_gating"):
    stale(f"{os.path.basename(library)} registers no operators")
EOF
  )
}

if [[ "${MOE_EXT_FORCE_BUILD:-0}" != 1 ]] && extension_is_current; then
  log "moe_ext._C is up to date; skipping the build"
else
  # setuptools skips build_ext when the library is newer than the .cpp files,
  # even if a header changed: remove the stale library so it is always rebuilt
  # (ninja still recompiles only the objects whose sources or headers changed).
  rm -f moe_ext/_C.*.so build/lib.*/moe_ext/_C.*.so
  log "building the extension: pip install --no-build-isolation -e ."
  "$PYTHON" -m pip install --disable-pip-version-check --no-build-isolation -e .
  extension_is_current || { echo "[install] error: the build finished but moe_ext._C is still not usable" >&2; exit 1; }
fi
log "done"
