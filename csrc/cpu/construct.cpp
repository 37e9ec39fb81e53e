// CPU kernels of the candidate-kernel construction (paper eq. 2) and its backward.
//
// weight [C_out, C_in, *kernel] is viewed as W [C_out, C_in, S] (S = prod(kernel), 1 for a
// linear layer); P [C_out, c_o] and Q [C_in, c_i] are optional (absent = identity).
// Both mode products are single GEMMs on contiguous views, so the work goes to the BLAS that
// torch was built with; the order of the two products is chosen by cost.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <vector>

namespace apsfast_cpu {
namespace {

using at::Tensor;

// out[o, b, s] = sum_a M[a, o] W[a, b, s]: contract the output mode with the rows of M.
Tensor out_mode(const Tensor& w3, const Tensor& M) {
  auto flat = w3.reshape({w3.size(0), -1});
  return at::matmul(M.t(), flat).reshape({M.size(1), w3.size(1), w3.size(2)});
}

// out[a, i, s] = sum_b M[b, i] W[a, b, s]: contract the input mode with the rows of M as one
// GEMM [A*S, B] x [B, c_i] (a batch of A small GEMMs is several times slower on CPU).
Tensor in_mode(const Tensor& w3, const Tensor& M) {
  const int64_t A = w3.size(0), B = w3.size(1), S = w3.size(2);
  if (S == 1) return w3.reshape({A, B}).mm(M).reshape({A, M.size(1), 1});
  return w3.transpose(1, 2).reshape({A * S, B}).mm(M).reshape({A, S, M.size(1)}).transpose(1, 2);
}

void check_transform(const Tensor& weight, const std::optional<Tensor>& M, const char* name,
                     int64_t dim) {
  if (!M.has_value()) return;
  TORCH_CHECK(M->dim() == 2, name, " must be 2-D, got ", M->dim(), " dims");
  TORCH_CHECK(M->size(0) == weight.size(dim), name, ".shape[0] must be weight.shape[", dim,
              "] = ", weight.size(dim), ", got ", M->size(0));
  TORCH_CHECK(M->scalar_type() == weight.scalar_type(), name, " has dtype ", M->scalar_type(),
              ", expected ", weight.scalar_type());
  TORCH_CHECK(M->device() == weight.device(), name, " must be on ", weight.device());
}

// `t` contiguous with the strides of a fresh tensor, also on its unit dims (a view where it
// already is contiguous). conv2d infers a weight's memory format from its strides, and a
// [c_o, c_i, 1, 1] kernel whose unit dims carry the stride c_i reads as channels_last; the CPU
// conv backward of PyTorch 2.13 then writes past its buffers at stride 2 (heap corruption).
Tensor standard_strides(const Tensor& t) {
  const Tensor dense = t.contiguous();
  return dense.view({-1}).view(dense.sizes());
}

std::vector<int64_t> out_shape(const Tensor& weight, int64_t c_o, int64_t c_i) {
  std::vector<int64_t> shape(weight.sizes().begin(), weight.sizes().end());
  shape[0] = c_o;
  shape[1] = c_i;
  return shape;
}

}  // namespace

Tensor construct(const Tensor& weight, const std::optional<Tensor>& P,
                 const std::optional<Tensor>& Q) {
  TORCH_CHECK(weight.dim() >= 2, "weight must have at least 2 dims (C_out, C_in, *kernel), got ",
              weight.dim());
  check_transform(weight, P, "P", 0);
  check_transform(weight, Q, "Q", 1);
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
  } else if (c_o * C_out * C_in + c_o * C_in * c_i <= C_out * C_in * c_i + c_o * C_out * c_i) {
    // Cost per kernel element of P first vs Q first; take the cheaper order.
    out = in_mode(out_mode(w3, *P), *Q);
  } else {
    out = out_mode(in_mode(w3, *Q), *P);
  }
  return standard_strides(out.reshape(out_shape(weight, c_o, c_i)));
}

// Gradients for the inputs flagged need_*, in the order W, P, Q.
//   dW = P . g . Q^T over the channel modes  (a construction with the transposed transforms)
//   dP[a, o] = sum_{i,s} (W x2 Q^T)[a, i, s] g[o, i, s]
//   dQ[b, i] = sum_{o,s} (P^T x1 W)[o, b, s] g[o, i, s]
std::vector<Tensor> construct_backward(const Tensor& grad, const Tensor& weight,
                                       const std::optional<Tensor>& P,
                                       const std::optional<Tensor>& Q, bool need_weight,
                                       bool need_P, bool need_Q) {
  const int64_t C_out = weight.size(0), C_in = weight.size(1);
  const int64_t c_o = P ? P->size(1) : C_out, c_i = Q ? Q->size(1) : C_in;
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(out_shape(weight, c_o, c_i)),
              "grad must have the candidate kernel's shape ", at::IntArrayRef(out_shape(weight, c_o, c_i)),
              ", got ", grad.sizes());
  TORCH_CHECK(!need_P || P, "need_P is set but P is None");
  TORCH_CHECK(!need_Q || Q, "need_Q is set but Q is None");
  auto g3 = grad.reshape({c_o, c_i, -1});
  auto w3 = weight.reshape({C_out, C_in, -1});
  std::vector<Tensor> grads;
  if (need_weight) {
    std::optional<Tensor> Pt, Qt;
    if (P) Pt = P->t();
    if (Q) Qt = Q->t();
    grads.push_back(construct(grad, Pt, Qt).reshape(weight.sizes()));
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

// The kernels of many layers: layers are spread over threads (each GEMM then runs on one
// thread), which beats one multi-threaded GEMM after another for the small per-layer sizes
// of a search space, and costs one op call for the whole network.
std::vector<Tensor> construct_grouped(at::TensorList weights,
                                      const c10::List<std::optional<Tensor>>& Ps,
                                      const c10::List<std::optional<Tensor>>& Qs) {
  const int64_t layers = static_cast<int64_t>(weights.size());
  TORCH_CHECK(static_cast<int64_t>(Ps.size()) == layers && static_cast<int64_t>(Qs.size()) == layers,
              "Ps and Qs must have one entry per weight (", layers, "), got ", Ps.size(), " and ",
              Qs.size());
  std::vector<Tensor> out(layers);
  at::parallel_for(0, layers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l) {
      out[l] = construct(weights[l], Ps.get(l), Qs.get(l));
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
