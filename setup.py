"""Builds moe_ext._C, the operator library, with torch.utils.cpp_extension.

MOE_EXT_CUDA=1 forces the CUDA extension, MOE_EXT_CUDA=0 forces the CPU-only
one; unset, CUDA is built when the installed torch has CUDA and nvcc is found.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    forced = os.environ.get("MOE_EXT_CUDA", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return torch.version.cuda is not None and CUDA_HOME is not None


def sources(cuda: bool) -> list[str]:
    files = glob.glob("csrc/*.cpp")
    for folder in ("cpu", "autograd", "meta"):
        files += glob.glob(f"csrc/{folder}/*.cpp")
    if cuda:
        files += glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")
    return sorted(files)


def extension():
    cuda = want_cuda()
    # -fno-trapping-math (clang's default): no code here enables floating-point traps, and it lets GCC
    # vectorize loops with float selects (the fused activation's clamped exp).
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    define_macros = [("MOE_EXT_WITH_CUDA", "1" if cuda else "0")]
    kwargs = dict(
        name="moe_ext._C",
        sources=sources(cuda),
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if cuda:
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    return CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
