"""Packaging: the metadata keeps the user's torch, the sdist carries every build input, pip would replace
nothing, and `python -m moe_ext` lists every op of the dispatcher with its backends (and `--check` fails
when one lacks a kernel).

MOE_EXT_EXPECT_PACKAGE (set by scripts/cuda_torch_build.sh, which runs this suite against a build installed
into a venv) names the folder `import moe_ext` must resolve to; MOE_EXT_EXPECT_CUDA_BUILD=1 says that build
has CUDA kernels; MOE_EXT_SOURCE_DIR is the source tree to package (default: this checkout).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

import moe_ext
from moe_ext import _C
from moe_ext.__main__ import BACKENDS, backends, missing_kernels, registered_ops, required_backends

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

SOURCE = Path(os.environ.get("MOE_EXT_SOURCE_DIR") or Path(__file__).resolve().parent.parent)
BUILD_INPUT_SUFFIXES = (".cpp", ".cu", ".h", ".cuh")


def pyproject() -> dict:
    return tomllib.loads((SOURCE / "pyproject.toml").read_text())


def torch_requirements() -> list[str]:
    meta = pyproject()
    reqs = meta["project"]["dependencies"] + meta["build-system"]["requires"]
    return [r for r in reqs if re.match(r"torch\b", r)]


def test_imported_moe_ext_is_the_build_under_test():
    package = Path(moe_ext.__file__).resolve().parent
    assert Path(_C.__file__).resolve().parent == package, f"_C from {_C.__file__}, moe_ext from {package}"
    expected = os.environ.get("MOE_EXT_EXPECT_PACKAGE")
    if expected:
        assert package == Path(expected).resolve(), f"imported {package}, expected {expected}"
    if os.environ.get("MOE_EXT_EXPECT_CUDA_BUILD") == "1":
        assert _C.with_cuda, "expected the CUDA build of moe_ext._C"
        assert "CUDA" in backends("topk_gating")


def test_metadata_has_a_tested_lower_bound_on_torch_not_a_pin():
    reqs = torch_requirements()
    assert len(reqs) == 2, reqs  # one in the dependencies, one in the build requirements
    pin = re.search(r'^TORCH_VERSION="([0-9.]+)"', (SOURCE / "scripts" / "install.sh").read_text(), re.M).group(1)
    for req in reqs:
        assert "==" not in req and "<" not in req and "~=" not in req, f"{req}: would replace the user's torch"
        bound = re.fullmatch(r"torch\s*>=\s*([0-9.]+)", req)
        assert bound, f"{req}: expected torch>=X.Y"
        # the bound is the release CI installs (scripts/install.sh), so the oldest torch allowed is tested
        assert pin.split(".")[:2] == bound.group(1).split(".")[:2], f"{req} vs the tested torch {pin}"
    installed = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    assert installed >= tuple(int(p) for p in bound.group(1).split(".")[:2])


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    """The source tree without build products, in a scratch folder (packaging writes egg-info next to setup.py)."""
    dest = tmp_path_factory.mktemp("src") / "moe_ext-src"
    shutil.copytree(
        SOURCE,
        dest,
        ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "*.so", ".git", "results"),
    )
    return dest


def test_sdist_carries_every_build_input(source_copy, tmp_path):
    env = dict(os.environ, MOE_EXT_CUDA="0")  # the file list must not depend on a toolkit being present
    done = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)],
        cwd=source_copy,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (sdist,) = tmp_path.glob("moe_ext-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    needed = {"setup.py", "pyproject.toml", "README.md", "moe_ext/py.typed"}
    needed |= {str(p.relative_to(source_copy)) for p in (source_copy / "moe_ext").rglob("*.py")}
    needed |= {
        str(p.relative_to(source_copy)) for p in (source_copy / "csrc").rglob("*") if p.suffix in BUILD_INPUT_SUFFIXES
    }
    missing = sorted(needed - names)
    assert not missing, f"the sdist lacks {missing}"


def test_pip_install_would_keep_the_installed_torch(source_copy, tmp_path):
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-build-isolation", "--report", str(report),
         "--quiet", "--disable-pip-version-check", str(source_copy)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    install = json.loads(report.read_text())["install"]
    names = {item["metadata"]["name"].lower() for item in install}
    assert names == {"moe_ext"} or names == {"moe-ext"}, f"pip would also install {sorted(names)}"
    (item,) = install
    torch_reqs = [r for r in item["metadata"]["requires_dist"] if re.match(r"torch\b", r)]
    assert torch_reqs == [r for r in pyproject()["project"]["dependencies"] if r.startswith("torch")], torch_reqs


def test_required_backends_rule():
    ops = ["make_plan", "grouped_mm", "grouped_mm_backward", "orphan_backward"]
    assert required_backends("grouped_mm", ops, with_cuda=True) == ["CPU", "Meta", "CUDA", "Autograd"]
    assert required_backends("grouped_mm_backward", ops, with_cuda=True) == ["CPU", "Meta", "CUDA"]
    assert required_backends("grouped_mm_backward", ops, with_cuda=False) == ["CPU", "Meta"]
    # a *_backward name without its forward op is an ordinary op and needs autograd like any other
    assert required_backends("orphan_backward", ops, with_cuda=False) == ["CPU", "Meta", "Autograd"]


def test_every_op_has_the_kernels_of_this_build():
    ops = registered_ops()
    assert {"topk_gating", "make_plan", "grouped_mm", "grouped_mm_backward", "combine"} <= set(ops), ops
    assert missing_kernels(bool(_C.with_cuda)) == {}
    # the forward/backward split is real: backward ops have no Autograd kernel in this build
    assert "Autograd" not in backends("grouped_mm_backward") and "Autograd" in backends("grouped_mm")


def test_python_m_moe_ext_lists_every_op_and_its_backends():
    done = subprocess.run([sys.executable, "-m", "moe_ext", "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {}
    for line in done.stdout.splitlines():
        cells = line.split()
        if len(cells) == 1 + len(BACKENDS) and line.startswith("  "):
            rows[cells[0]] = [c for c in cells[1:] if not set(c) <= {"-"}]
    assert sorted(rows) == registered_ops()
    for op, listed in rows.items():
        assert listed == backends(op), op
    assert f"CUDA kernels compiled in: {'yes' if _C.with_cuda else 'no'}" in done.stdout
    assert "check ok" in done.stdout


def test_check_fails_when_an_op_lacks_a_kernel():
    # A new op of the namespace is picked up from the dispatcher, with no list to update; this one has
    # only a CPU kernel, so the check must name what it lacks.
    code = textwrap.dedent(
        """
        import sys, torch, moe_ext
        from moe_ext.__main__ import main
        lib = torch.library.Library("moe_ext", "FRAGMENT")
        lib.define("probe_only_cpu(Tensor x) -> Tensor")
        lib.impl("probe_only_cpu", lambda x: x.clone(), "CPU")
        sys.exit(main(["--check"]))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    want = "Meta, CUDA, Autograd" if _C.with_cuda else "Meta, Autograd"
    assert f"check FAILED: moe_ext::probe_only_cpu has no {want} kernel" in done.stderr
    assert "probe_only_cpu" in done.stdout and "check ok" not in done.stdout


def test_setup_stops_before_compiling_without_a_cuda_toolkit(source_copy, tmp_path):
    env = dict(os.environ, MOE_EXT_CUDA="1", CUDA_HOME=str(tmp_path / "no-toolkit"))
    done = subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=source_copy, capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode != 0, done.stdout
    if torch.version.cuda is None:
        assert f"the installed torch {torch.__version__} has no CUDA" in done.stderr, done.stderr
    else:
        assert f"CUDA_HOME={tmp_path / 'no-toolkit'} is not a CUDA toolkit" in done.stderr, done.stderr
        assert "Set CUDA_HOME to the toolkit root" in done.stderr
    assert not (source_copy / "build").exists(), "nothing may be compiled before the check"
