"""Builds the compiled extension ``worm_fast._C`` from ``csrc/``.

Everything else (metadata, dependencies, entry points) is in ``pyproject.toml``.

* With a CUDA toolkit (``CUDA_HOME``, or ``nvcc`` found by torch) and a CUDA build of
  torch, the extension is a ``CUDAExtension`` holding the CPU and the CUDA kernels;
  otherwise, or with ``WORM_FAST_NO_CUDA=1``, a ``CppExtension`` with the CPU kernels.
  No GPU is needed to build.
* The CPU loops are compiled for AVX-512, AVX2 and the baseline ISA and chosen at run
  time (``csrc/include/worm_fast/cpu_kernels.h``), so the build is portable.
* CUDA architectures: ``TORCH_CUDA_ARCH_LIST`` when set, else ``8.0;9.0+PTX`` (A100,
  H100, and PTX that newer GPUs compile at load time), to keep the build short.
* Built with ninja; ``MAX_JOBS`` limits the parallel compile jobs as usual.
* The extension is compiled against the torch installed in the building environment,
  and only runs under that same torch release; it records the version
  (``worm_fast._C.TORCH_VERSION``), and worm_fast refuses to load it under another.
  So build *without* build isolation, in the environment that will run it: an isolated
  build (plain ``pip install .``) sees no torch and stops here with that instruction.

Install into the current environment, against its torch (``MIN_TORCH`` or newer)::

    pip install --no-build-isolation .       # or -e . (the extension lands in worm_fast/)
"""

import os
import sys
from pathlib import Path

from setuptools import setup

# The oldest torch whose APIs worm_fast uses; the same floor as pyproject.toml's
# `torch>=` (tests/test_packaging.py checks that they agree; docs/install.md says why).
MIN_TORCH = "2.6"
NO_ISOLATION = "pip install --no-build-isolation ."

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:
    sys.exit(
        "worm_fast compiles its kernels against the torch they will run with, and this "
        "build environment has none: a build-isolated `pip install .` cannot see the "
        f"environment's torch. Install torch>={MIN_TORCH} first, then build in that "
        f"environment with: {NO_ISOLATION}  (with uv: uv pip install --no-build-isolation .)"
    )
if torch.__version__ < MIN_TORCH:
    sys.exit(f"worm_fast needs torch>={MIN_TORCH}; this environment has torch {torch.__version__}")

ROOT = Path(__file__).resolve().parent
CSRC = Path("csrc")
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _sources(pattern: str) -> list[str]:
    # Relative paths, sorted so that builds are reproducible.
    return sorted(str(p) for p in CSRC.glob(pattern))


def _extension():
    with_cuda = (
        cpp_extension.CUDA_HOME is not None
        and torch.version.cuda is not None  # a CPU-only torch has no CUDA libraries to link
        and not _env_flag("WORM_FAST_NO_CUDA")
    )
    sources = ["csrc/worm_fast.cpp", "csrc/common.cpp", *_sources("cpu/*.cpp")]
    cxx_flags = ["-O3", "-g0", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    kwargs = dict(
        name="worm_fast._C",
        include_dirs=[str(ROOT / CSRC / "include")],
        extra_link_args=["-fopenmp"],
    )
    # Quoted: a C string literal (torch passes each flag to the compiler unsplit).
    torch_version = ("WORM_FAST_TORCH_VERSION", f'"{torch.__version__}"')
    if not with_cuda:
        return cpp_extension.CppExtension(
            sources=sources,
            extra_compile_args={"cxx": cxx_flags},
            define_macros=[("WORM_FAST_WITH_CUDA", "0"), torch_version],
            **kwargs,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        sources=sources + _sources("cuda/*.cpp") + _sources("cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        define_macros=[("WORM_FAST_WITH_CUDA", "1"), torch_version],
        **kwargs,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
