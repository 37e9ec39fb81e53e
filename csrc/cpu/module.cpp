// The apsfast_cpu op library (schemas in ../op_schemas.h, kernels in the other files of this
// folder) and the Python module apsfast._C, whose import runs the registrations.
#include <Python.h>

#include "../op_schemas.h"
#include <torch/library.h>

TORCH_LIBRARY(apsfast_cpu, m) { apsfast::define_ops(m); }

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
