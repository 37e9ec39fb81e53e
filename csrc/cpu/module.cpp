// The apsfast_cpu op library: schemas of every CPU op (implemented in the other files of
// this folder) and the Python module apsfast._C, whose import runs the registrations.
#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(apsfast_cpu, m) {
  m.def("construct(Tensor weight, Tensor? P, Tensor? Q) -> Tensor");
  m.def(
      "construct_backward(Tensor grad, Tensor weight, Tensor? P, Tensor? Q, bool need_weight, "
      "bool need_P, bool need_Q) -> Tensor[]");
  m.def("construct_grouped(Tensor[] weights, Tensor?[] Ps, Tensor?[] Qs) -> Tensor[]");
  m.def(
      "transition_step_all(Tensor(a!)[] Ms, int[] widths, int[] counts, int[] partner, "
      "float tau) -> Tensor");
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
