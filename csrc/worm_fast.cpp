// The extension module worm_fast._C. Importing it runs the static TORCH_LIBRARY_IMPL
// blocks of csrc/cpu (and csrc/cuda when built with a CUDA toolkit), which register the
// kernels of the ops declared in worm_fast/_ops.py; the module itself only carries two
// facts about the build, for diagnostics and tests:
//   CPU_ISA    the instruction set of the CPU loops in use ("avx512", "avx2", "default")
//   WITH_CUDA  1 when the CUDA kernels were compiled in
#include <Python.h>

#include "worm_fast/cpu_kernels.h"

#ifndef WORM_FAST_WITH_CUDA
#define WORM_FAST_WITH_CUDA 0
#endif

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
      PyModule_AddIntConstant(module, "WITH_CUDA", WORM_FAST_WITH_CUDA) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
