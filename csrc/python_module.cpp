// Python entry point of moe_ext._C: importing it loads the library, whose static initializers register the ops.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "moe_ext operator library", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
