// CPU kernels of the candidate-kernel construction (paper eq. 2) and its backward.
//
// weight [C_out, C_in, *kernel] is viewed as W [C_out, C_in, S] (S = prod(kernel), 1 for a
// linear layer); P [C_out, c_o] and Q [C_in, c_i] are optional (absent = identity).
// Both mode products are single GEMMs on contiguous views, so the work goes to the BLAS that
// torch was built with; the order of the two products is chosen by cost (../common/order.h).
// Argument checks: ../common/checks.h (shared with the CUDA binding).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "../common/checks.h"
#include "../common/layout.h"
#include "../common/order.h"

namespace apsfast_cpu {
namespace {

using at::Tensor;

// Whether w3 [A, B, S] has its channels innermost (B with stride 1, S > 1): the 3-D view of a
// channels_last kernel, or a channel slice of one. Such a view is contracted in its memory
// order, [A, S, B], so neither mode product copies it, and the result keeps that order.
bool channels_innermost(const Tensor& w3) {
  return w3.size(1) > 1 && w3.size(2) > 1 && w3.stride(1) == 1;
}

// out[o, b, s] = sum_a M[a, o] W[a, b, s]: contract the output mode with the rows of M.
Tensor out_mode(const Tensor& w3, const Tensor& M) {
  const int64_t B = w3.size(1), S = w3.size(2);
  if (channels_innermost(w3)) {
    auto flat = w3.transpose(1, 2).reshape({w3.size(0), S * B});
    return at::matmul(M.t(), flat).view({M.size(1), S, B}).transpose(1, 2);
  }
  auto flat = w3.reshape({w3.size(0), -1});
  return at::matmul(M.t(), flat).reshape({M.size(1), B, S});
}

// Up to this many output channels, the input mode is contracted as a batch of A GEMMs
// M^T [c_i, B] x W[a] [B, S]: no layout copies, and with so few rows the batch is as fast as one
// GEMM. With more, each narrow product runs far below the GEMM rate and one GEMM between two
// copies wins (ResNet-20 x1 on a core, 16..96 of 208 channels: the build of a weight step and
// its backward 54 -> 30 ms at the minimum of 40 calls, 70-77 -> 52-56 ms at the median, where
// glibc returns the copy's meta-sized temporaries to the system and faults them in again; at
// x0.25, 4..24 of 52 channels, 2.4 -> 2.2 ms at the minimum of 300 calls).
constexpr int64_t kBatchedInModeWidth = 8;

// out[a, i, s] = sum_b M[b, i] W[a, b, s]: contract the input mode with the rows of M.
// * Channels innermost: W in its memory order, [A*S, B] x [B, c_i], with no copies.
// * Up to kBatchedInModeWidth columns of M: the batch above, a contiguous result.
// * Else W copied to [A, S, B] and one GEMM [A*S, B] x [B, c_i], whose result [A, c_i, S] keeps
//   its channels innermost: an output mode that follows contracts it in that order, and build
//   gives the kernel standard strides at the end.
Tensor in_mode(const Tensor& w3, const Tensor& M) {
  const int64_t A = w3.size(0), B = w3.size(1), S = w3.size(2), c_i = M.size(1);
  if (S == 1) return w3.reshape({A, B}).mm(M).reshape({A, c_i, 1});
  if (channels_innermost(w3)) {
    return w3.transpose(1, 2).reshape({A * S, B}).mm(M).reshape({A, S, c_i}).transpose(1, 2);
  }
  if (c_i <= kBatchedInModeWidth) return at::matmul(M.t(), w3);
  return w3.transpose(1, 2).contiguous().view({A * S, B}).mm(M).view({A, S, c_i}).transpose(1, 2);
}

// `t` contiguous with the strides of a fresh tensor, also on its unit dims (a view where it
// already is contiguous). conv2d infers a weight's memory format from its strides, and a
// [c_o, c_i, 1, 1] kernel whose unit dims carry the stride c_i reads as channels_last; the CPU
// conv backward of PyTorch 2.13 then writes past its buffers at stride 2 (heap corruption).
Tensor standard_strides(const Tensor& t) {
  const Tensor dense = t.contiguous();
  return dense.view({-1}).view(dense.sizes());
}

// The candidate kernel of checked arguments, channels_last where the weight has its channels
// innermost (apsfast::channels_last_kernel; a channels_last run's meta-weights), else with
// standard strides.
Tensor build(const Tensor& weight, const std::optional<Tensor>& P, const std::optional<Tensor>& Q) {
  const int64_t C_out = weight.size(0), C_in = weight.size(1);
  const int64_t c_o = P ? P->size(1) : C_out, c_i = Q ? Q->size(1) : C_in;
  auto w3 = weight.reshape({C_out, C_in, -1});
  Tensor out;
  if (!P && !Q) {
    out = w3.clone();
  } else if (!Q) {
    out = out_mode(w3, *P);
  } else if (!P) {
    out = in_mode(w3, *Q);
  } else if (apsfast::p_first(C_out, c_o, C_in, c_i)) {
    out = in_mode(out_mode(w3, *P), *Q);
  } else {
    out = out_mode(in_mode(w3, *Q), *P);
  }
  out = out.reshape(apsfast::candidate_shape(weight, c_o, c_i));
  return apsfast::channels_last_kernel(weight) ? out.contiguous(at::MemoryFormat::ChannelsLast)
                                               : standard_strides(out);
}

}  // namespace

Tensor construct(const Tensor& weight, const std::optional<Tensor>& P,
                 const std::optional<Tensor>& Q) {
  apsfast::check_construct(weight, P, Q);
  return build(weight, P, Q);
}

// Gradients for the inputs flagged need_*, in the order W, P, Q.
//   dW = P . g . Q^T over the channel modes  (a construction with the transposed transforms)
//   dP[a, o] = sum_{i,s} (W x2 Q^T)[a, i, s] g[o, i, s]
//   dQ[b, i] = sum_{o,s} (P^T x1 W)[o, b, s] g[o, i, s]
std::vector<Tensor> construct_backward(const Tensor& grad, const Tensor& weight,
                                       const std::optional<Tensor>& P,
                                       const std::optional<Tensor>& Q, bool need_weight,
                                       bool need_P, bool need_Q) {
  apsfast::check_construct_backward(grad, weight, P, Q, need_P, need_Q);
  const int64_t C_out = weight.size(0), C_in = weight.size(1);
  const int64_t c_o = P ? P->size(1) : C_out, c_i = Q ? Q->size(1) : C_in;
  auto g3 = grad.reshape({c_o, c_i, -1});
  auto w3 = weight.reshape({C_out, C_in, -1});
  std::vector<Tensor> grads;
  if (need_weight) {
    std::optional<Tensor> Pt, Qt;
    if (P) Pt = P->t();
    if (Q) Qt = Q->t();
    grads.push_back(build(grad, Pt, Qt).reshape(weight.sizes()));
  }
  if (need_P) {
    auto wq = Q ? in_mode(w3, *Q) : w3;
    grads.push_back(standard_strides(at::matmul(wq.reshape({C_out, -1}), g3.reshape({c_o, -1}).t())));
  }
  if (need_Q) {
    auto pw = P ? out_mode(w3, *P) : w3;
    grads.push_back(standard_strides(at::einsum("obs,ois->bi", {pw, g3})));
  }
  return grads;
}

namespace {

// Below this many multiply-adds in all, the layers are built on one thread: a fork-join
// over tiny layers costs more than it saves (about 30 us of ATen calls a layer), and far more
// when the cores are busy with other work (waiting threads spin).
constexpr int64_t kParallelMacs = 20'000'000;

// Multiply-adds of building one layer's kernel.
int64_t build_macs(const Tensor& weight, const std::optional<Tensor>& P, const std::optional<Tensor>& Q) {
  const int64_t C_out = weight.size(0), C_in = weight.size(1);
  int64_t S = 1;
  for (int64_t d = 2; d < weight.dim(); ++d) S *= weight.size(d);
  const int64_t c_o = P ? P->size(1) : C_out, c_i = Q ? Q->size(1) : C_in;
  return S * apsfast::construct_macs(C_out, c_o, C_in, c_i);
}

}  // namespace

// The kernels of many layers: layers are spread over threads (each GEMM then runs on one
// thread), which beats one multi-threaded GEMM after another for the small per-layer sizes
// of a search space, and costs one op call for the whole network.
std::vector<Tensor> construct_grouped(at::TensorList weights,
                                      const c10::List<std::optional<Tensor>>& Ps,
                                      const c10::List<std::optional<Tensor>>& Qs) {
  apsfast::check_construct_grouped(weights, Ps, Qs);
  const int64_t layers = static_cast<int64_t>(weights.size());
  int64_t macs = 0;
  for (int64_t l = 0; l < layers; ++l) macs += build_macs(weights[l], Ps.get(l), Qs.get(l));
  std::vector<Tensor> out(layers);
  at::parallel_for(0, layers, macs < kParallelMacs ? layers : 1, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      out[l] = build(weights[l], Ps.get(l), Qs.get(l));
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(apsfast_cpu, CPU, m) {
  m.impl("construct", &construct);
  m.impl("construct_backward", &construct_backward);
  m.impl("construct_grouped", &construct_grouped);
}

}  // namespace apsfast_cpu
