// Python entry point of moe_ext._C: importing it loads the library, whose static initializers register the ops.
#include <Python.h>
#include <torch/headeronly/version.h>

#ifndef MOE_EXT_WITH_CUDA
#define MOE_EXT_WITH_CUDA 0
#endif

#define MOE_EXT_STR2(x) #x
#define MOE_EXT_STR(x) MOE_EXT_STR2(x)

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "moe_ext operator library", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  // What this binary was built against, for `python -m moe_ext` and the stale-build check.
  const char* torch_version =
      MOE_EXT_STR(TORCH_VERSION_MAJOR) "." MOE_EXT_STR(TORCH_VERSION_MINOR) "." MOE_EXT_STR(TORCH_VERSION_PATCH);
  if (PyModule_AddStringConstant(module, "built_with_torch", torch_version) < 0 ||
      PyModule_AddIntConstant(module, "with_cuda", MOE_EXT_WITH_CUDA) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
