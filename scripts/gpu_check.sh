#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: builds moe_ext's CUDA extension against the torch it finds,
# then runs tests/test_cuda.py (ops and the MoE module on CUDA against the CPU kernels), compute-sanitizer
# (memcheck, racecheck, synccheck) over scripts/cuda_op_suite.py (every op, small sizes), and the CUDA
# benchmarks (benchmarks/bench_ops_cuda.py; benchmarks/bench_moe.py --device cuda: moe_ext against
# transformers' grouped_mm and torch_sorted_gmm and the GEMM floor, forward and forward+backward, bf16).
# Logs, JSON and SUMMARY.md go under benchmarks/results/gpu/ (--out); the summary is printed at the end.
# Every step runs even if an earlier one failed (those needing the build are marked skipped if it did not
# build); the exit status is 1 if any step failed, 2 for bad arguments, 3 when there is no GPU to check.
# Budget: under 8 minutes on one H100/H200 (one arch, every core for the build, small sanitizer sizes).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

usage() {
  cat <<'EOF'
usage: scripts/gpu_check.sh [--out DIR] [--arch X.Y] [--jobs N] [--python PY] [--skip-build] [--quick]

  --out DIR      where logs, JSON and SUMMARY.md go (default: benchmarks/results/gpu)
  --arch X.Y     TORCH_CUDA_ARCH_LIST for the build (default: the compute capability of GPU 0)
  --jobs N       MAX_JOBS for the build (default: every core)
  --python PY    interpreter whose torch is built against and tested (default: $PYTHON, else python3)
  --skip-build   use the moe_ext that PY already imports (it must have CUDA kernels)
  --quick        smaller benchmark sizes (a smoke run of the benchmark steps)
EOF
}
die_usage() {
  echo "gpu_check: $*" >&2
  usage >&2
  exit 2
}

OUT="$REPO/benchmarks/results/gpu"
ARCH=""
JOBS="$(nproc 2>/dev/null || echo 4)"
PY="${PYTHON:-python3}"
BUILD=1
QUICK=0
while (($#)); do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --out) (($# >= 2)) || die_usage "--out needs a folder"; OUT="$2"; shift 2 ;;
    --arch) (($# >= 2)) || die_usage "--arch needs a value"; ARCH="$2"; shift 2 ;;
    --jobs) (($# >= 2)) || die_usage "--jobs needs a number"; JOBS="$2"; shift 2 ;;
    --python) (($# >= 2)) || die_usage "--python needs an interpreter"; PY="$2"; shift 2 ;;
    --skip-build) BUILD=0; shift ;;
    --quick) QUICK=1; shift ;;
    *) die_usage "unknown argument: $1" ;;
  esac
done
[[ -z "$ARCH" || "$ARCH" =~ ^[0-9]+\.[0-9]+a?(\+PTX)?$ ]] || die_usage "--arch $ARCH: expected a compute capability such as 9.0"
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || die_usage "--jobs $JOBS: expected a positive number"
command -v "$PY" >/dev/null 2>&1 || die_usage "--python $PY: no such interpreter"
OUT="$(realpath -m "$OUT")"

# --- Preflight: an NVIDIA GPU that this torch can use, before anything is built ---------------------------
no_gpu() {
  echo "gpu_check: no GPU to check: $*" >&2
  echo "gpu_check: this script needs an NVIDIA GPU, its driver and a CUDA build of torch; nothing was built or run." >&2
  echo "gpu_check: without a GPU, CI covers the CUDA build (scripts/cuda_torch_build.sh, stage 6 of run_tests.sh)." >&2
  exit 3
}
command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi is not on PATH (no NVIDIA driver)"
gpus="$(nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>&1)" ||
  no_gpu "nvidia-smi failed: $gpus"
[[ -n "$gpus" ]] || no_gpu "nvidia-smi lists no GPU"
torch_gpu="$("$PY" -c 'import torch
cuda = torch.version.cuda
if cuda is None:
    raise SystemExit(f"torch {torch.__version__} is a CPU-only build: install a CUDA build of torch")
if not torch.cuda.is_available():
    raise SystemExit(f"torch {torch.__version__} (CUDA {cuda}) sees no usable GPU")
major, minor = torch.cuda.get_device_capability(0)
print(f"{major}.{minor}")' 2>&1)" || no_gpu "$(tail -n 1 <<<"$torch_gpu")"
ARCH="${ARCH:-$torch_gpu}"

mkdir -p "$OUT/logs"
STEPS="$OUT/steps.tsv"
printf 'step\tstatus\tseconds\tlog\tnote\n' >"$STEPS"
"$PY" - "$OUT/environment.json" "$gpus" "$ARCH" <<'EOF'
import json, platform, sys, time
import torch
path, gpus, arch = sys.argv[1:4]
json.dump({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), "gpus": gpus.splitlines(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "arch": arch}, open(path, "w"), indent=1)
EOF
echo "gpu_check: $(head -n 1 <<<"$gpus"); torch $("$PY" -c 'import torch; print(torch.__version__)'); arch $ARCH; output in $OUT"

# step NAME TIMEOUT_S COMMAND...: runs it with its output in logs/NAME.log, records status and time, never exits.
step() {
  local name="$1" limit="$2" start=$SECONDS status=0 note=""
  shift 2
  echo "gpu_check: [$name] $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1 || status=$?
  if [[ $status == 0 ]]; then
    result=ok
  else
    result=FAILED
    note="exit $status"
    [[ $status == 124 || $status == 137 ]] && note="timed out after $limit s"
    tail -n 15 "$OUT/logs/$name.log" | sed "s/^/gpu_check: [$name] | /"
  fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$result" "$((SECONDS - start))" "logs/$name.log" "$note" >>"$STEPS"
}
skip() { printf '%s\tskipped\t0\t-\t%s\n' "$1" "$2" >>"$STEPS"; }

# --- 1. build ---------------------------------------------------------------------------------------------------
if ((BUILD)); then
  rm -f moe_ext/_C.*.so build/lib.*/moe_ext/_C.*.so  # setuptools would skip a build that looks newer
  step build 420 env MOE_EXT_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$JOBS" \
    "$PY" -m pip install --no-build-isolation --no-deps -e .
else
  skip build "--skip-build: using the installed moe_ext"
fi
step registrations 60 "$PY" -m moe_ext --check
if ! grep -q '^CUDA kernels compiled in: yes; CUDA available: True' "$OUT/logs/registrations.log"; then
  # a CPU-only build (or a GPU torch cannot use) would let every CUDA test skip: nothing after this would count
  printf 'cuda_kernels\tFAILED\t0\tlogs/registrations.log\tmoe_ext has no CUDA kernels or sees no GPU\n' >>"$STEPS"
  for name in test_cuda memcheck racecheck synccheck bench_ops_cuda bench_moe; do
    skip "$name" "moe_ext has no CUDA kernels (see logs/registrations.log)"
  done
  "$PY" scripts/gpu_report.py "$OUT" || true
  exit 1
fi

# --- 2. tests on CUDA -----------------------------------------------------------------------------------------
step test_cuda 300 "$PY" -m pytest tests/test_cuda.py -q -rs -p no:cacheprovider --junitxml="$OUT/test_cuda.xml"

# --- 3. compute-sanitizer over every op at small sizes ------------------------------------------------------
sanitizer="$(command -v compute-sanitizer || true)"
cuda_home="$("$PY" -c 'import torch.utils.cpp_extension as c; print(c.CUDA_HOME or "")' 2>/dev/null || true)"
for candidate in "${CUDA_HOME:-}" "$cuda_home" /usr/local/cuda; do
  if [[ -z "$sanitizer" && -n "$candidate" && -x "$candidate/bin/compute-sanitizer" ]]; then
    sanitizer="$candidate/bin/compute-sanitizer"
  fi
done
for tool in memcheck racecheck synccheck; do
  if [[ -z "$sanitizer" ]]; then
    step "$tool" 10 sh -c 'echo "compute-sanitizer not found on PATH, in CUDA_HOME/bin or /usr/local/cuda/bin" >&2; exit 1'
    continue
  fi
  # memcheck: no caching allocator, so an access past a tensor's end is past its allocation (torch reads
  # the variable's presence, not its value: set it for memcheck only).
  tool_env=()
  [[ $tool == memcheck ]] && tool_env=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
  step "$tool" 240 env "${tool_env[@]}" \
    "$sanitizer" --tool "$tool" --error-exitcode 1 --print-limit 20 "$PY" scripts/cuda_op_suite.py --device cuda
done

# --- 4. benchmarks --------------------------------------------------------------------------------------------------
sizes=()
moe_sizes=()
if ((QUICK)); then
  sizes=(--tokens 2048 --hidden 1024 --experts 16 --repeats 10)
  moe_sizes=(--quick)
fi
step bench_ops_cuda 180 "$PY" benchmarks/bench_ops_cuda.py --device cuda "${sizes[@]}" --json "$OUT/bench_ops_cuda.json"
step bench_moe 300 "$PY" benchmarks/bench_moe.py --device cuda --dtypes bfloat16 \
  --peers "hf_mixtral[grouped_mm],torch_sorted_gmm" "${moe_sizes[@]}" --output "$OUT/bench_moe.json"

# --- 5. the report ----------------------------------------------------------------------------------------------------
"$PY" scripts/gpu_report.py "$OUT"
