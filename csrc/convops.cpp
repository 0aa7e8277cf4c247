// The convops operator library (schemas: schemas.h), and the Python module init for convops._C.
//
// Backward ops are operators of their own, taking an output mask so that gradients nobody
// asked for are not computed; the autograd kernels (autograd.cpp) call them, so that
// torch.compile and torch.export see these ops, never an opaque Python function.
#include <torch/library.h>

#include "schemas.h"

#include <string>

#ifdef CONVOPS_BUILD_PYTHON
#include <Python.h>

#include "cpu/path_counts.h"
#endif

#ifndef CONVOPS_TORCH_VERSION
#define CONVOPS_TORCH_VERSION "unknown"
#endif
#ifndef CONVOPS_VERSION
#define CONVOPS_VERSION "unknown"
#endif

TORCH_LIBRARY(convops, m) { convops::define_schemas(m); }

#ifdef CONVOPS_BUILD_PYTHON
namespace convops {
namespace cpu {
std::string dilated_cpu_kernels();  // cpu/dilated_conv2d.cpp
}  // namespace cpu
}  // namespace convops

namespace {

PyObject* dilated_cpu_kernels(PyObject*, PyObject*) {
  return PyUnicode_FromString(convops::cpu::dilated_cpu_kernels().c_str());
}

// {path: runs} of the CPU kernel paths so far in this process (cpu/path_counts.h).
PyObject* cpu_path_counts(PyObject*, PyObject*) {
  PyObject* out = PyDict_New();
  for (const auto& [name, count] : convops::cpu::path_counts_snapshot()) {
    PyObject* value = PyLong_FromLongLong(count);
    PyDict_SetItemString(out, name.c_str(), value);
    Py_DECREF(value);
  }
  return out;
}

PyMethodDef convops_methods[] = {
    {"cpu_path_counts", cpu_path_counts, METH_NOARGS,
     "Test hook: {CPU kernel path: number of runs} in this process."},
    {"dilated_cpu_kernels", dilated_cpu_kernels, METH_NOARGS,
     "Which CPU kernels dilated_conv2d runs on this machine with the current environment."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef convops_module = {PyModuleDef_HEAD_INIT, "_C",
                              "convops compiled kernels; ops live in torch.ops.convops", -1,
                              convops_methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&convops_module);
  if (module == nullptr) return nullptr;
#ifdef CONVOPS_WITH_CUDA
  PyModule_AddObject(module, "cuda_compiled", PyBool_FromLong(1));
  PyModule_AddStringConstant(module, "cuda_archs", CONVOPS_CUDA_ARCHS);
#else
  PyModule_AddObject(module, "cuda_compiled", PyBool_FromLong(0));
  PyModule_AddStringConstant(module, "cuda_archs", "");
#endif
  PyModule_AddStringConstant(module, "version", CONVOPS_VERSION);
  PyModule_AddStringConstant(module, "torch_built_against", CONVOPS_TORCH_VERSION);
  return module;
}
#endif
