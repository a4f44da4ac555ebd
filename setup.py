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

Install (the extension lands in ``worm_fast/`` beside the sources)::

    pip install --no-build-isolation -e .
"""

import os
from pathlib import Path

import torch
from setuptools import setup
from torch.utils import cpp_extension

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
    if not with_cuda:
        return cpp_extension.CppExtension(
            sources=sources,
            extra_compile_args={"cxx": cxx_flags},
            define_macros=[("WORM_FAST_WITH_CUDA", "0")],
            **kwargs,
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        sources=sources + _sources("cuda/*.cpp") + _sources("cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        define_macros=[("WORM_FAST_WITH_CUDA", "1")],
        **kwargs,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
