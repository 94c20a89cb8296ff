"""Builds moe_ext._C, the operator library, with torch.utils.cpp_extension.

MOE_EXT_CUDA=1 forces the CUDA extension, MOE_EXT_CUDA=0 forces the CPU-only
one; unset, CUDA is built when the installed torch has CUDA. A CUDA build
first locates the CUDA toolkit (CUDA_HOME, else the toolkit behind nvcc, else
/usr/local/cuda) and stops at once, naming CUDA_HOME, when none has both nvcc
and libcudart: a link error after minutes of compiling helps nobody.
TORCH_CUDA_ARCH_LIST picks the GPU architectures; unset, the visible GPUs'
(torch's default) or, with no GPU visible, DEFAULT_CUDA_ARCH_LIST.
"""

import glob
import os
import shutil
import sys

import torch
import torch.utils.cpp_extension as cpp_extension
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# Ampere (sm_80 code also runs on sm_86/sm_89), Hopper, Blackwell data-center and consumer parts, plus PTX
# that the driver compiles for anything newer. csrc/cuda needs sm_80 at least (bf16 arithmetic).
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0;10.0;12.0+PTX"


def want_cuda() -> bool:
    forced = os.environ.get("MOE_EXT_CUDA", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        if torch.version.cuda is None:
            sys.exit(
                f"moe_ext: MOE_EXT_CUDA=1 but the installed torch {torch.__version__} has no CUDA; install a CUDA "
                "build of torch, or build the CPU extension with MOE_EXT_CUDA=0"
            )
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    if forced:
        sys.exit(f"moe_ext: MOE_EXT_CUDA={forced!r}: expected 1 (build the CUDA kernels) or 0 (CPU only)")
    return torch.version.cuda is not None


def cuda_runtime_library(root: str) -> str | None:
    """libcudart in the folder torch.utils.cpp_extension links against (root/lib64, else root/lib), or None."""
    lib = os.path.join(root, "lib64")
    if not os.path.exists(lib) and os.path.exists(os.path.join(root, "lib")):
        lib = os.path.join(root, "lib")
    matches = sorted(glob.glob(os.path.join(lib, "libcudart.so*")))
    return matches[0] if matches else None


def is_toolkit(root: str | None) -> bool:
    return bool(root) and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK) and bool(cuda_runtime_library(root))


def find_cuda_home() -> str:
    """The CUDA toolkit to compile and link against; exits with a message naming CUDA_HOME if there is none.

    torch guesses CUDA_HOME as the folder above the first nvcc on PATH, which is wrong when that nvcc is a
    wrapper script or a symlink outside the toolkit (its lib64 holds no libcudart, and the link fails).
    """
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:
        if not is_toolkit(explicit):
            sys.exit(
                f"moe_ext: CUDA_HOME={explicit} is not a CUDA toolkit: it needs bin/nvcc and lib64/libcudart.so. "
                "Set CUDA_HOME to the toolkit root (the folder holding bin/nvcc and lib64/), e.g. /usr/local/cuda"
            )
        return explicit
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [os.path.dirname(os.path.dirname(nvcc)), os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    candidates += ["/usr/local/cuda", f"/usr/local/cuda-{torch.version.cuda}"]
    for root in candidates:
        if is_toolkit(root):
            return root
    sys.exit(
        f"moe_ext: building the CUDA kernels for torch {torch.__version__} (CUDA {torch.version.cuda}) needs the "
        f"CUDA toolkit, and none of {', '.join(dict.fromkeys(candidates))} has bin/nvcc and libcudart. "
        "Set CUDA_HOME to the toolkit root (the folder holding bin/nvcc and lib64/libcudart.so), "
        "or build without CUDA kernels with MOE_EXT_CUDA=0"
    )


def use_cuda_home(root: str) -> None:
    # torch.utils.cpp_extension reads its module-level CUDA_HOME when it adds include/library paths and
    # when it runs nvcc; point it, and child processes, at the toolkit found above.
    os.environ["CUDA_HOME"] = root
    cpp_extension.CUDA_HOME = root
    print(f"moe_ext: CUDA toolkit {root} (libcudart: {cuda_runtime_library(root)})")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and torch.cuda.device_count() == 0:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    print(f"moe_ext: TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST') or '(the visible GPUs)'}")


def sources(cuda: bool) -> list[str]:
    files = glob.glob("csrc/*.cpp")
    for folder in ("cpu", "autograd", "meta"):
        files += glob.glob(f"csrc/{folder}/*.cpp")
    if cuda:
        files += glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")
    return sorted(files)


def extension():
    cuda = want_cuda()
    if cuda:
        use_cuda_home(find_cuda_home())
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
