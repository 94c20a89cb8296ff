"""scripts/gpu_check.sh without a GPU: argument handling, the no-GPU stop, the report writer
(scripts/gpu_report.py) on real benchmark output, the sanitizers' op suite on CPU, and bench_moe's CUDA
flag. The GPU steps themselves run only on a machine with a GPU (the script's own job)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_ext.__main__ import registered_ops

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
REPORT = ROOT / "scripts" / "gpu_report.py"
HAS_GPU = torch.cuda.is_available()


def fake_bin(tmp_path: Path, tools: dict[str, str]) -> Path:
    """A PATH folder with only what the script needs before its GPU preflight, plus fake tools (name -> body)."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("bash", "dirname", "nproc", "realpath", "tail", "cat"):
        os.symlink(shutil.which(name), folder / name)
    tools = {"python3": f'exec "{sys.executable}" "$@"', **tools}  # a venv's python must keep its venv
    for name, body in tools.items():
        (folder / name).write_text(f"#!/bin/sh\n{body}\n")
        (folder / name).chmod(0o755)
    return folder


def gpu_check(*args: str, path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if path is not None:
        env["PATH"] = str(path)
    return subprocess.run(
        [shutil.which("bash"), str(SCRIPT), *args], capture_output=True, text=True, timeout=120, env=env
    )


def test_help_and_bad_arguments():
    done = gpu_check("--help")
    assert done.returncode == 0 and "usage: scripts/gpu_check.sh" in done.stdout and "--skip-build" in done.stdout
    for args, message in [
        (["--frobnicate"], "unknown argument: --frobnicate"),
        (["--arch", "9"], "--arch 9: expected a compute capability"),
        (["--jobs", "0"], "--jobs 0: expected a positive number"),
        (["--out"], "--out needs a folder"),
        (["--python", "/no/such/python"], "--python /no/such/python: no such interpreter"),
    ]:
        done = gpu_check(*args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert message in done.stderr and "usage:" in done.stderr, (args, done.stderr)
    assert gpu_check("--arch", "9.0", "--help").returncode == 0
    assert gpu_check("--arch", "12.0+PTX", "--help").returncode == 0


def test_stops_with_a_clear_message_without_a_driver(tmp_path):
    out = tmp_path / "out"
    done = gpu_check("--out", str(out), path=fake_bin(tmp_path, {}))
    assert done.returncode == 3, done.stdout + done.stderr
    assert "no GPU to check: nvidia-smi is not on PATH" in done.stderr
    assert "nothing was built or run" in done.stderr
    assert not out.exists()


def test_stops_when_nvidia_smi_fails(tmp_path):
    tools = {"nvidia-smi": 'echo "NVIDIA-SMI has failed because it could not communicate with the driver" >&2; exit 9'}
    done = gpu_check("--out", str(tmp_path / "out"), path=fake_bin(tmp_path, tools))
    assert done.returncode == 3
    assert "nvidia-smi failed: NVIDIA-SMI has failed because it could not communicate" in done.stderr


@pytest.mark.skipif(HAS_GPU, reason="the CPU-only-torch stop needs a torch that sees no GPU")
def test_stops_when_torch_sees_no_gpu(tmp_path):
    # A driver that lists a GPU, and the torch of this test run (no usable GPU here): stop, name the torch.
    tools = {"nvidia-smi": 'echo "NVIDIA H200, 9.0, 570.00, 143771 MiB"'}
    out = tmp_path / "out"
    done = gpu_check("--out", str(out), path=fake_bin(tmp_path, tools))
    assert done.returncode == 3, done.stdout + done.stderr
    assert f"torch {torch.__version__}" in done.stderr
    assert "CPU-only build" in done.stderr or "sees no usable GPU" in done.stderr
    assert not out.exists()


# ----- the report writer -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bench_moe_json(tmp_path_factory) -> Path:
    """A real bench_moe result (CPU, tiny): the report reads the format the benchmark writes today."""
    path = tmp_path_factory.mktemp("bench") / "bench_moe.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_moe.py"), "--quick", "--configs", "mixtral,decode-T1",
         "--dtypes", "float32", "--peers", "torch_sorted_gmm", "--repeats", "2", "--warmup", "1",
         "--output", str(path)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return path


BENCH_OPS = {
    "device": "NVIDIA H200",
    "args": {},
    "results": {
        "topk_gating": {"median_ms": 0.0412, "p25_ms": 0.04, "p75_ms": 0.05, "runs": 50},
        "dispatch": {"median_ms": 0.5, "p25_ms": 0.4, "p75_ms": 0.6, "runs": 50, "of_copy": 0.83},
    },
}
JUNIT = (
    '<testsuites><testsuite name="pytest" tests="{tests}" failures="{failures}" errors="0" skipped="{skipped}"/>'
    "</testsuites>"
)
STEP_NAMES = "build registrations test_cuda memcheck racecheck synccheck bench_ops_cuda bench_moe".split()


def write_out(out: Path, bench_moe_json: Path, statuses: dict | None = None, skipped: int = 0) -> Path:
    out.mkdir()
    rows = ["step\tstatus\tseconds\tlog\tnote"]
    for name in STEP_NAMES:
        status = (statuses or {}).get(name, "ok")
        rows.append(f"{name}\t{status}\t7\tlogs/{name}.log\t{'exit 1' if status == 'FAILED' else ''}")
    (out / "steps.tsv").write_text("\n".join(rows) + "\n")
    env = {"gpus": ["NVIDIA H200, 9.0, 570.00, 143771 MiB"], "torch": "2.14.1+cu130", "cuda": "13.0", "arch": "9.0"}
    (out / "environment.json").write_text(json.dumps(env))
    (out / "test_cuda.xml").write_text(JUNIT.format(tests=120, failures=0, skipped=skipped))
    (out / "bench_ops_cuda.json").write_text(json.dumps(BENCH_OPS))
    shutil.copy(bench_moe_json, out / "bench_moe.json")
    return out


def gpu_report(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPORT), str(out)], capture_output=True, text=True, timeout=60)


def test_report_of_a_passing_run(tmp_path, bench_moe_json):
    out = write_out(tmp_path / "out", bench_moe_json)
    done = gpu_report(out)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (out / "SUMMARY.md").read_text()
    assert summary == done.stdout
    assert "GPU: NVIDIA H200, 9.0" in summary and "torch 2.14.1+cu130 (CUDA 13.0), arch 9.0" in summary
    assert "tests/test_cuda.py: 120 passed, 0 failed, 0 errors, 0 skipped of 120" in summary
    assert "| dispatch " in summary and "83%" in summary
    bench = json.loads(bench_moe_json.read_text())
    run = bench["runs"][0]
    ext = run["results"]["moe_ext"]["forward+backward"]["median_s"]
    peer = run["results"]["torch_sorted_gmm"]["forward+backward"]["median_s"]
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in summary.splitlines()}
    row = rows[("mixtral [float32]", "forward+backward")]
    assert f"{ext * 1e3:.3f}" in row and f"torch_sorted_gmm {peer * 1e3:.3f}" in row and f"{peer / ext:.2f}x" in row
    # decode configs time the forward only
    assert ("decode-T1 [float32]", "forward") in rows and ("decode-T1 [float32]", "forward+backward") not in rows
    assert summary.rstrip().endswith("result: PASS")
    assert len(summary.splitlines()) <= 50  # one screen


@pytest.mark.parametrize(
    "statuses, skipped, why",
    [
        ({"racecheck": "FAILED"}, 0, "| racecheck      | FAILED"),
        ({}, 3, "3 skipped of 120"),  # a CUDA test that skipped on a GPU machine did not check anything
        ({"build": "FAILED", "test_cuda": "skipped"}, 0, "| build          | FAILED"),
    ],
)
def test_report_fails_loudly(tmp_path, bench_moe_json, statuses, skipped, why):
    out = write_out(tmp_path / "out", bench_moe_json, statuses, skipped)
    done = gpu_report(out)
    assert done.returncode == 1, done.stdout
    assert why in done.stdout and done.stdout.rstrip().endswith("result: FAIL")


def test_report_fails_when_a_passing_step_left_no_result(tmp_path, bench_moe_json):
    out = write_out(tmp_path / "out", bench_moe_json)
    (out / "bench_moe.json").unlink()
    done = gpu_report(out)
    assert done.returncode == 1 and "bench_moe.json: missing although the step passed" in done.stdout


def test_report_without_steps_is_a_usage_error(tmp_path):
    done = gpu_report(tmp_path)
    assert done.returncode == 2 and "run scripts/gpu_check.sh first" in done.stderr


# ----- the pieces the GPU steps run ----------------------------------------------------------------------------


def test_sanitizer_op_suite_reaches_every_op_on_cpu():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "cuda_op_suite.py"), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    called = done.stdout.strip().splitlines()[-1].split(": ", 2)[-1].split(", ")
    assert sorted(called) == registered_ops()


def test_bench_moe_cuda_flag():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, str(ROOT / "benchmarks" / "bench_moe.py"), "--device", "cuda", "--quick"]
    args += ["--configs", "mixtral", "--dtypes", "bfloat16", "--peers", "torch_sorted_gmm", "--output", os.devnull]
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    if HAS_GPU:
        assert done.returncode == 0, done.stderr[-3000:]
        assert "floor[expert-parallel]" not in done.stdout and "moe_ext" in done.stdout
    else:
        assert done.returncode == 1 and "bench_moe: no CUDA device available" in done.stderr
    bad = subprocess.run([*args[:2], "--device", "tpu"], capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 2 and "--device 'tpu': cpu or cuda" in bad.stderr
