// The extension module worm_fast._C. Importing it runs the static TORCH_LIBRARY_IMPL
// blocks of csrc/cpu (and csrc/cuda when built with a CUDA toolkit), which register the
// kernels of the ops declared in worm_fast/_ops.py; the module itself only carries
// facts about the build, for diagnostics and tests:
//   CPU_ISA        the instruction set of the CPU loops in use ("avx512", "avx2", "default")
//   WITH_CUDA      1 when the CUDA kernels were compiled in
//   TORCH_VERSION  torch.__version__ of the torch it was compiled against
#include <Python.h>

#include "worm_fast/cpu_kernels.h"

#ifndef WORM_FAST_WITH_CUDA
#define WORM_FAST_WITH_CUDA 0
#endif

#ifndef WORM_FAST_TORCH_VERSION
#error "setup.py defines WORM_FAST_TORCH_VERSION as the quoted torch.__version__"
#endif

// The same version as one string in the file, which worm_fast/backends/cpp.py reads
// *before* loading the module: under another torch the module may fail to load with an
// undefined symbol or, worse, load and misbehave. The prefix must match BUILD_RECORD there.
__attribute__((used)) static const char kBuildRecord[] =
    "worm_fast._C built against torch " WORM_FAST_TORCH_VERSION;

extern "C" {

PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C", /* name */
      "Kernels of the worm_fast ops (registered with the dispatcher on import).",
      -1,     /* size */
      nullptr /* methods */
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) {
    return nullptr;
  }
  if (PyModule_AddStringConstant(module, "CPU_ISA", worm_fast::cpu::selected_kernels().isa) <
          0 ||
      PyModule_AddIntConstant(module, "WITH_CUDA", WORM_FAST_WITH_CUDA) < 0 ||
      PyModule_AddStringConstant(module, "TORCH_VERSION", WORM_FAST_TORCH_VERSION) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
