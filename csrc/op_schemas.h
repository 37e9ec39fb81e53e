// The schemas of apsfast's compiled ops, shared by every backend's library (apsfast_cpu,
// apsfast_cuda) so that all backends expose one op surface.
#pragma once

#include <torch/library.h>

namespace apsfast {

inline void define_ops(torch::Library& m) {
  m.def("construct(Tensor weight, Tensor? P, Tensor? Q) -> Tensor");
  m.def(
      "construct_backward(Tensor grad, Tensor weight, Tensor? P, Tensor? Q, bool need_weight, "
      "bool need_P, bool need_Q) -> Tensor[]");
  m.def("construct_grouped(Tensor[] weights, Tensor?[] Ps, Tensor?[] Qs) -> Tensor[]");
  m.def(
      "transition_step_all(Tensor(a!)[] Ms, int[] widths, int[] counts, int[] partner, "
      "float tau, bool relative=False) -> Tensor");
}

}  // namespace apsfast
