// convops._emu: the CUDA emulator as a Python extension. Registers every convops schema a
// second time as torch.ops.convops_emu (implemented on CPU tensors by the kernels of csrc/cuda,
// run by emu/runtime.cpp), plus convops_emu::selftest (emu/selftest.cpp).
#include <Python.h>
#include <torch/library.h>

#include "emu/runtime.h"
#include "schemas.h"

TORCH_LIBRARY(convops_emu, m) {
  convops::define_schemas(m);
  // Runs one of the emulator's own test kernels (emu/selftest.cpp) on `input`.
  m.def("selftest(str kernel, Tensor input) -> Tensor");
}

namespace {

PyObject* launch_counts(PyObject*, PyObject*) {
  PyObject* counts = PyDict_New();
  if (counts == nullptr) return nullptr;
  for (const auto& [name, count] : convops::emu::launch_counts()) {
    PyObject* value = PyLong_FromLongLong(count);
    if (value == nullptr || PyDict_SetItemString(counts, name.c_str(), value) != 0) {
      Py_XDECREF(value);
      Py_DECREF(counts);
      return nullptr;
    }
    Py_DECREF(value);
  }
  return counts;
}

PyMethodDef emu_methods[] = {
    {"launch_counts", launch_counts, METH_NOARGS,
     "{kernel name: launches} of the emulated kernels run in this process."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef emu_module = {PyModuleDef_HEAD_INIT, "_emu",
                          "convops CUDA kernels run on the CPU by the emulator; ops live in "
                          "torch.ops.convops_emu",
                          -1, emu_methods};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__emu(void) {
  PyObject* module = PyModule_Create(&emu_module);
  if (module == nullptr) return nullptr;
#ifdef CONVOPS_EMU_SANITIZED
  PyModule_AddObject(module, "sanitized", PyBool_FromLong(1));
#else
  PyModule_AddObject(module, "sanitized", PyBool_FromLong(0));
#endif
  return module;
}
