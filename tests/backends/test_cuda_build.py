"""The CUDA kernels build, on machines without a GPU (DESIGN §4: CUDA code compiles in CI).

* every ``csrc/cuda/*.cu`` compiles with nvcc, with torch's flags, for one architecture
  (sm_90), into a cubin that ``cuobjdump`` can list;
* the host side of the multi-tensor launcher (``multi_tensor_apply.cuh``) covers every
  chunk of every tensor exactly once, whatever the tensor count and sizes, for the SGD
  step's 4 and the AdamW step's 7 addresses per tensor (compiled with the host compiler
  and run here);
* when ``worm_fast._C`` was built with CUDA, it registered every op for the CUDA key.

The kernels themselves only run on a GPU: see the ``gpu`` tests of the optimizer.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from worm_fast._ops import OP_NAMES

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCH = "90"  # H100; one architecture keeps the test short


def _find_nvcc() -> str | None:
    for home in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME)")
CXX = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
needs_cxx = pytest.mark.skipif(CXX is None, reason="no host C++ compiler found")


def _include_flags() -> list[str]:
    dirs = [ROOT / "csrc" / "include", CUDA_DIR, *map(Path, cpp_extension.include_paths())]
    return [f"-I{d}" for d in dirs]


def _nvcc_command(source: Path, output: Path) -> list[str]:
    cuda_include = Path(NVCC).resolve().parent.parent / "include"
    return [
        NVCC,
        "-c",
        str(source),
        "-o",
        str(output),
        *_include_flags(),
        f"-I{cuda_include}",
        *cpp_extension.COMMON_NVCC_FLAGS,  # the __CUDA_NO_HALF_* macros torch builds with
        "--compiler-options",
        "-fPIC",
        "-O3",
        "-std=c++20",
        f"-gencode=arch=compute_{ARCH},code=sm_{ARCH}",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-DTORCH_EXTENSION_NAME=_C",
    ]


def test_there_are_cuda_sources():
    assert {p.name for p in CU_SOURCES} >= {"masked_sgd.cu", "masked_adamw.cu", "masks.cu"}


@needs_nvcc
@pytest.mark.parametrize("source", CU_SOURCES, ids=lambda p: p.name)
def test_cuda_source_compiles_with_nvcc(source, tmp_path):
    output = tmp_path / f"{source.stem}.o"
    result = subprocess.run(
        _nvcc_command(source, output), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr[-6000:]}"
    assert output.stat().st_size > 0
    cuobjdump = Path(NVCC).with_name("cuobjdump")
    if cuobjdump.is_file():
        listing = subprocess.run(
            [str(cuobjdump), "--list-elf", str(output)], capture_output=True, text=True
        )
        assert f"sm_{ARCH}" in listing.stdout, listing.stdout + listing.stderr


MULTI_TENSOR_APPLY_CHECK = r"""
#include "multi_tensor_apply.cuh"

#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <utility>

using namespace worm_fast::cuda;

#define EXPECT(cond)                                                          \
  do {                                                                        \
    if (!(cond)) {                                                            \
      std::fprintf(stderr, "depth %d case %d: failed %s (line %d)\n", kDepth, which, #cond, \
                   __LINE__);                                                 \
      std::exit(1);                                                           \
    }                                                                         \
  } while (0)

template <int kDepth>
void check_depth() {
  constexpr int kTensors = TensorListMeta<kDepth>::kTensors;
  static_assert(kTensors >= 1 && kTensors <= kMaxTensors);
  const int64_t chunk = 64;
  std::vector<std::vector<int64_t>> cases = {
      {}, {0}, {1}, {0, 5, 0}, {chunk}, {chunk + 1},
      {chunk * kMaxBlocks}, {chunk * kMaxBlocks + 1}, {chunk * kMaxBlocks * 3 + 7},
      std::vector<int64_t>(kTensors, 1), std::vector<int64_t>(kTensors + 1, 1),
      std::vector<int64_t>(5 * kTensors + 3, chunk * 9 + 1),
  };
  std::mt19937_64 rng(kDepth);
  for (int c = 0; c < 20; ++c) {
    std::vector<int64_t> sizes(rng() % 200);
    for (auto& s : sizes) {
      const int kind = rng() % 4;
      s = kind == 0 ? 0 : kind == 1 ? rng() % 100 : kind == 2 ? rng() % 5000 : rng() % 50000;
    }
    cases.push_back(sizes);
  }
  for (int which = 0; which < static_cast<int>(cases.size()); ++which) {
    const auto& numels = cases[which];
    std::vector<std::array<void*, kDepth>> addresses;
    for (size_t t = 0; t < numels.size(); ++t) {
      std::array<void*, kDepth> a;
      for (int d = 0; d < kDepth; ++d) {
        a[d] = reinterpret_cast<void*>(((t + 1) << 8) | d);
      }
      addresses.push_back(a);
    }
    std::map<std::pair<size_t, int64_t>, int> seen;
    multi_tensor_apply<kDepth>(
        chunk, addresses, numels, [&](const TensorListMeta<kDepth>& m, int blocks) {
          EXPECT(blocks >= 1 && blocks <= kMaxBlocks);
          for (int b = 0; b < blocks; ++b) {
            const int slot = m.block_to_tensor[b];
            EXPECT(slot < kTensors);
            const auto tag = reinterpret_cast<uintptr_t>(m.ptr[0][slot]);
            const size_t t = (tag >> 8) - 1;
            EXPECT(t < numels.size());
            for (int d = 0; d < kDepth; ++d) {
              EXPECT(reinterpret_cast<uintptr_t>(m.ptr[d][slot]) == (((t + 1) << 8) | d));
            }
            EXPECT(m.numel[slot] == numels[t]);
            const int64_t ch = m.block_to_chunk[b];
            EXPECT(ch >= 0 && ch * chunk < numels[t]);
            ++seen[std::make_pair(t, ch)];
          }
        });
    size_t expected = 0;
    for (size_t t = 0; t < numels.size(); ++t) {
      const int64_t chunks = (numels[t] + chunk - 1) / chunk;
      for (int64_t ch = 0; ch < chunks; ++ch) {
        const auto key = std::make_pair(t, ch);
        EXPECT(seen.count(key) == 1 && seen[key] == 1);
      }
      expected += chunks;
    }
    EXPECT(seen.size() == expected);
  }
  std::printf("ok depth %d: %zu cases, %d tensors per launch\n", kDepth, cases.size(), kTensors);
}

int main() {
  check_depth<4>();  // masked_sgd.cu
  check_depth<7>();  // masked_adamw.cu
  return 0;
}
"""


@needs_cxx
def test_multi_tensor_apply_covers_every_chunk_once(tmp_path):
    source = tmp_path / "check_multi_tensor_apply.cpp"
    source.write_text(MULTI_TENSOR_APPLY_CHECK)
    binary = tmp_path / "check_multi_tensor_apply"
    torch_lib = Path(torch.__file__).parent / "lib"
    compile_cmd = [
        CXX,
        "-std=c++20",
        "-O1",
        *_include_flags(),
        str(source),
        "-o",
        str(binary),
        f"-L{torch_lib}",
        "-lc10",
        f"-Wl,-rpath,{torch_lib}",
    ]
    built = subprocess.run(compile_cmd, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-6000:]
    ran = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.startswith("ok depth 4") and "ok depth 7" in ran.stdout, ran.stdout


def test_cuda_build_registers_every_op_for_cuda():
    from worm_fast import _C

    if not _C.WITH_CUDA:
        pytest.skip("worm_fast._C was built without CUDA (no toolkit, or WORM_FAST_NO_CUDA)")
    for op in OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"worm_fast::{op}", "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"worm_fast::{op}", "CPU"), op


def test_setup_builds_cuda_sources_only_with_a_toolkit():
    # setup.py picks CUDAExtension only when a toolkit is found and WORM_FAST_NO_CUDA is
    # unset; this checks the decision without building anything.
    script = (
        "import runpy, setuptools\n"
        "captured = {}\n"
        "setuptools.setup = lambda **kw: captured.update(kw)\n"
        "runpy.run_path('setup.py')\n"
        "ext = captured['ext_modules'][0]\n"
        "print(ext.name, any(s.endswith('.cu') for s in ext.sources))\n"
    )
    env = {**os.environ, "WORM_FAST_NO_CUDA": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["worm_fast._C", "False"]
    if NVCC is not None:
        env = {k: v for k, v in os.environ.items() if k != "WORM_FAST_NO_CUDA"}
        env["CUDA_HOME"] = str(Path(NVCC).resolve().parent.parent)
        result = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[-2:] == ["worm_fast._C", "True"]
