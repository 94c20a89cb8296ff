// Python entry point of moe_ext._C: importing it loads the library, whose static initializers register the ops.
#include <Python.h>
#include <c10/util/Exception.h>
#include <torch/headeronly/version.h>

#include <exception>

#include "cpu/output_cache.h"

#ifndef MOE_EXT_WITH_CUDA
#define MOE_EXT_WITH_CUDA 0
#endif

#define MOE_EXT_STR2(x) #x
#define MOE_EXT_STR(x) MOE_EXT_STR2(x)

namespace {

// C++ errors (a bad MOE_EXT_CPU_CACHE_MB, say) become Python exceptions instead of terminating.
template <typename Body>
PyObject* guarded(Body body) {
  try {
    return body();
  } catch (const c10::Error& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what_without_backtrace());
    return nullptr;
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_RuntimeError, error.what());
    return nullptr;
  }
}

// The CPU output cache (csrc/cpu/output_cache.h), wrapped by moe_ext.memory.
PyObject* cpu_cache_info(PyObject*, PyObject*) {
  return guarded([] {
    const moe_ext::cpu::OutputCacheInfo info = moe_ext::cpu::output_cache_info();
    return Py_BuildValue("{s:L,s:L,s:L,s:L,s:L,s:L}", "limit_bytes", static_cast<long long>(info.limit_bytes),
                         "cached_bytes", static_cast<long long>(info.cached_bytes), "cached_blocks",
                         static_cast<long long>(info.cached_blocks), "in_use_bytes",
                         static_cast<long long>(info.in_use_bytes), "hits", static_cast<long long>(info.hits), "misses",
                         static_cast<long long>(info.misses));
  });
}

PyObject* empty_cpu_cache(PyObject*, PyObject*) {
  return guarded([] {
    moe_ext::cpu::empty_output_cache();
    Py_RETURN_NONE;
  });
}

PyObject* set_cpu_cache_limit(PyObject*, PyObject* arg) {
  const long long bytes = PyLong_AsLongLong(arg);
  if (bytes == -1 && PyErr_Occurred()) return nullptr;
  if (bytes < 0) {
    PyErr_Format(PyExc_ValueError, "limit_bytes must be >= 0, got %lld", bytes);
    return nullptr;
  }
  return guarded([bytes] {
    moe_ext::cpu::set_output_cache_limit(bytes);
    Py_RETURN_NONE;
  });
}

PyMethodDef methods[] = {
    {"cpu_cache_info", cpu_cache_info, METH_NOARGS, "State of the CPU output cache."},
    {"empty_cpu_cache", empty_cpu_cache, METH_NOARGS, "Frees the CPU output cache's free blocks."},
    {"set_cpu_cache_limit", set_cpu_cache_limit, METH_O, "Most bytes the CPU output cache keeps in free blocks."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "moe_ext operator library", -1, methods, nullptr, nullptr, nullptr, nullptr};
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
