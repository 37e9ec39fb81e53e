// The apsfast_cuda op library: schemas, argument checks and the CUDA implementations of the
// construction (paper eq. 2), its backward, the grouped construction and the batched
// transition (eq. 4, 5), plus the Python module apsfast._cuda whose import registers them.
//
// This is the only file of csrc/cuda that sees torch: it turns tensors into the plain
// parameter structs of aps_kernels.h and launches on torch's current stream. The argument
// checks and the order of the two mode products are the CPU library's (../common/).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "../op_schemas.h"
#include <torch/library.h>

#include <cstring>
#include <optional>
#include <vector>

#include "../common/checks.h"
#include "../common/layout.h"
#include "../common/order.h"
#include "aps_kernels.h"

namespace apsfast_cuda {
namespace {

using at::Tensor;

DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kDouble: return DType::kFloat64;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, " must have dtype float32, float64, float16 or bfloat16, got ",
                  t.scalar_type());
  }
  return DType::kFloat32;  // not reached
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "apsfast_cuda: ", what, " failed to launch: ",
              cudaGetErrorString(err));
}

// What the kernels serve, beyond the shared checks: a CUDA tensor of a supported dtype.
void check_cuda(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  dtype_of(t, name);
}

// [D0, D1, S] view of a [D0, D1, *kernel] tensor (a copy only when the kernel dims cannot be
// merged); S is computed, not inferred, so that empty tensors reshape too.
Tensor as_3d(const Tensor& w) {
  int64_t S = 1;
  for (int64_t d = 2; d < w.dim(); ++d) S *= w.size(d);
  return w.reshape({w.size(0), w.size(1), S});
}

// Fills a mode product of w3 [D0, D1, S] with M over `mode` into out (already allocated).
ModeProductParams mode_product_params(const Tensor& w3, const Tensor& M, int mode,
                                      const Tensor& out) {
  const int64_t W_size[3] = {w3.size(0), w3.size(1), w3.size(2)};
  const int64_t W_stride[3] = {w3.stride(0), w3.stride(1), w3.stride(2)};
  const int64_t M_stride[2] = {M.stride(0), M.stride(1)};
  const int64_t out_stride[3] = {out.stride(0), out.stride(1), out.stride(2)};
  return make_mode_product(mode, w3.data_ptr(), W_size, W_stride, M.data_ptr(), M.size(1),
                           M_stride, out.data_ptr(), out_stride);
}

std::vector<int64_t> mode_product_shape(const Tensor& w3, const Tensor& M, int mode) {
  std::vector<int64_t> shape = {w3.size(0), w3.size(1), w3.size(2)};
  shape[mode] = M.size(1);
  return shape;
}

// An uninitialised [D0, D1, S] result; with `channels_inner`, laid out as [D0, S, D1] (the 3-D
// view of a channels_last kernel). The mode-product kernels write through any strides.
Tensor empty_3d(const std::vector<int64_t>& shape, bool channels_inner, const at::TensorOptions& options) {
  if (!channels_inner) return at::empty(shape, options);
  return at::empty({shape[0], shape[2], shape[1]}, options).transpose(1, 2);
}

// out[o, b, s] = sum_a M[a, o] W[a, b, s] (mode 0) or out[a, i, s] = sum_b M[b, i] W[a, b, s]
// (mode 1), contiguous, or channels innermost (see empty_3d).
Tensor mode_product(const Tensor& w3, const Tensor& M, int mode, bool channels_inner = false) {
  Tensor out = empty_3d(mode_product_shape(w3, M, mode), channels_inner, w3.options());
  const ModeProductParams p = mode_product_params(w3, M, mode, out);
  check_launch(launch_mode_product(p, dtype_of(w3, "weight"), c10::cuda::getCurrentCUDAStream()),
               "mode product");
  return out;
}

// Copies `bytes` of host data to a fresh device buffer on `device`, asynchronously on the
// current stream (through pinned memory that the caching host allocator keeps alive until
// the copy is done).
Tensor upload(const std::vector<char>& bytes, const at::Device& device) {
  Tensor host = at::empty({static_cast<int64_t>(bytes.size())},
                          at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), bytes.data(), bytes.size());
  return host.to(device, /*non_blocking=*/true);
}

template <typename Item>
size_t append(std::vector<char>& bytes, const Item* items, size_t count) {
  static_assert(sizeof(Item) % alignof(int64_t) == 0, "records keep 8-byte alignment");
  const size_t offset = bytes.size();
  bytes.resize(offset + count * sizeof(Item));
  if (count) std::memcpy(bytes.data() + offset, items, count * sizeof(Item));
  return offset;
}

}  // namespace

Tensor construct(const Tensor& weight, const std::optional<Tensor>& P,
                 const std::optional<Tensor>& Q) {
  apsfast::check_construct(weight, P, Q);
  check_cuda(weight, "weight");
  const c10::cuda::CUDAGuard guard(weight.device());
  const int64_t C_out = weight.size(0), C_in = weight.size(1);
  const int64_t c_o = P ? P->size(1) : C_out, c_i = Q ? Q->size(1) : C_in;
  const Tensor w3 = as_3d(weight);
  const bool channels_last = apsfast::channels_last_kernel(weight);
  Tensor out;
  if (!P && !Q) {
    out = empty_3d({C_out, C_in, w3.size(2)}, channels_last, w3.options()).copy_(w3);
  } else if (!Q) {
    out = mode_product(w3, *P, 0, channels_last);
  } else if (!P) {
    out = mode_product(w3, *Q, 1, channels_last);
  } else if (apsfast::p_first(C_out, c_o, C_in, c_i)) {
    out = mode_product(mode_product(w3, *P, 0), *Q, 1, channels_last);
  } else {
    out = mode_product(mode_product(w3, *Q, 1), *P, 0, channels_last);
  }
  return out.view(apsfast::candidate_shape(weight, c_o, c_i));
}

// Gradients for the inputs flagged need_*, in the order W, P, Q (contiguous; dW channels_last
// where grad is, as a construction of it).
//   dW = P . g . Q^T over the channel modes: a construction with the transposed transforms,
//        read through strides (no transposed copy);
//   dP[a, o] = sum_{i,s} (W x2 Q^T)[a, i, s] g[o, i, s],
//   dQ[b, i] = sum_{o,s} (P^T x1 W)[o, b, s] g[o, i, s]  (ATen GEMMs, over our mode products).
std::vector<Tensor> construct_backward(const Tensor& grad, const Tensor& weight,
                                       const std::optional<Tensor>& P,
                                       const std::optional<Tensor>& Q, bool need_weight,
                                       bool need_P, bool need_Q) {
  apsfast::check_construct_backward(grad, weight, P, Q, need_P, need_Q);
  check_cuda(weight, "weight");
  const int64_t C_out = weight.size(0), C_in = weight.size(1);
  const int64_t c_o = P ? P->size(1) : C_out, c_i = Q ? Q->size(1) : C_in;
  const c10::cuda::CUDAGuard guard(weight.device());
  const Tensor g3 = as_3d(grad);
  const Tensor w3 = as_3d(weight);
  const int64_t S = w3.size(2);
  std::vector<Tensor> grads;
  if (need_weight) {
    std::optional<Tensor> Pt, Qt;
    if (P) Pt = P->t();
    if (Q) Qt = Q->t();
    grads.push_back(construct(grad, Pt, Qt).view(weight.sizes()));
  }
  if (need_P) {
    const Tensor wq = Q ? mode_product(w3, *Q, 1) : w3;  // [C_out, c_i, S]
    grads.push_back(at::matmul(wq.reshape({C_out, c_i * S}), g3.reshape({c_o, c_i * S}).t())
                        .contiguous());
  }
  if (need_Q) {
    const Tensor pw = P ? mode_product(w3, *P, 0) : w3;  // [c_o, C_in, S]
    grads.push_back(at::einsum("obs,ois->bi", {pw, g3}).contiguous());
  }
  return grads;
}

// The kernels of many layers: every first mode product in one launch, then every second one
// in another. A layer with one transform has only a first product; one with none is a copy.
std::vector<Tensor> construct_grouped(at::TensorList weights,
                                      const c10::List<std::optional<Tensor>>& Ps,
                                      const c10::List<std::optional<Tensor>>& Qs) {
  apsfast::check_construct_grouped(weights, Ps, Qs);
  const int64_t layers = static_cast<int64_t>(weights.size());
  if (layers == 0) return {};
  check_cuda(weights[0], "weights[0]");
  const DType dtype = dtype_of(weights[0], "weights[0]");
  const c10::cuda::CUDAGuard guard(weights[0].device());

  std::vector<Tensor> out(layers), keep;  // keep: intermediates, alive until launched
  std::vector<ModeProductParams> first, second;
  for (int64_t l = 0; l < layers; ++l) {
    const Tensor& w = weights[l];
    const std::optional<Tensor> P = Ps.get(l), Q = Qs.get(l);
    const int64_t C_out = w.size(0), C_in = w.size(1);
    const int64_t c_o = P ? P->size(1) : C_out, c_i = Q ? Q->size(1) : C_in;
    const Tensor w3 = as_3d(w);
    keep.push_back(w3);
    Tensor result = empty_3d({c_o, c_i, w3.size(2)}, apsfast::channels_last_kernel(w), w3.options());
    if (!P && !Q) {
      result.copy_(w3);
    } else if (!P || !Q) {
      first.push_back(mode_product_params(w3, P ? *P : *Q, P ? 0 : 1, result));
    } else {
      const bool p_then_q = apsfast::p_first(C_out, c_o, C_in, c_i);
      const Tensor& A = p_then_q ? *P : *Q;
      const Tensor& B = p_then_q ? *Q : *P;
      const int mode = p_then_q ? 0 : 1;
      Tensor mid = at::empty(mode_product_shape(w3, A, mode), w3.options());
      keep.push_back(mid);
      first.push_back(mode_product_params(w3, A, mode, mid));
      second.push_back(mode_product_params(mid, B, 1 - mode, result));
    }
    out[l] = result.view(apsfast::candidate_shape(w, c_o, c_i));
  }

  if (first.empty()) return out;  // only copies
  // One upload: both launches' params and tile offsets.
  const auto first_tiles = mode_product_tile_offsets(first.data(), static_cast<int64_t>(first.size()));
  const auto second_tiles =
      mode_product_tile_offsets(second.data(), static_cast<int64_t>(second.size()));
  std::vector<char> bytes;
  const size_t first_params = append(bytes, first.data(), first.size());
  const size_t second_params = append(bytes, second.data(), second.size());
  const size_t first_offsets = append(bytes, first_tiles.data(), first_tiles.size());
  const size_t second_offsets = append(bytes, second_tiles.data(), second_tiles.size());
  const Tensor meta = upload(bytes, weights[0].device());
  const char* base = static_cast<const char*>(meta.data_ptr());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  check_launch(launch_mode_product_grouped(
                   reinterpret_cast<const ModeProductParams*>(base + first_params),
                   reinterpret_cast<const int64_t*>(base + first_offsets),
                   static_cast<int64_t>(first.size()), first_tiles.back(), dtype, stream),
               "grouped mode product (first)");
  if (!second.empty()) {
    check_launch(launch_mode_product_grouped(
                     reinterpret_cast<const ModeProductParams*>(base + second_params),
                     reinterpret_cast<const int64_t*>(base + second_offsets),
                     static_cast<int64_t>(second.size()), second_tiles.back(), dtype, stream),
                 "grouped mode product (second)");
  }
  return out;
}

// Eq. 5 on every side at once, in place (see TransitionSide in aps_kernels.h); returns Phi
// before the step, in float32 (16-bit and float32 sides) or float64.
Tensor transition_step_all(at::TensorList Ms, at::IntArrayRef widths, at::IntArrayRef counts,
                           at::IntArrayRef partner, double tau, bool relative) {
  apsfast::check_transition_step_all(Ms, widths, counts, partner);
  const int64_t sides = static_cast<int64_t>(Ms.size());
  check_cuda(Ms[0], "Ms[0]");
  const DType dtype = dtype_of(Ms[0], "Ms[0]");
  std::vector<TransitionSide> inputs(sides);
  for (int64_t s = 0; s < sides; ++s) {
    const Tensor& M = Ms[s];
    TransitionSide& side = inputs[s];
    side = TransitionSide{};
    side.M = M.data_ptr();
    side.rows = M.size(0);
    side.cols = M.size(1);
    side.stride_row = M.stride(0);
    side.stride_col = M.stride(1);
    side.partner = partner[s];
    side.block_count = counts[s];
  }

  const c10::cuda::CUDAGuard guard(Ms[0].device());
  const TransitionPlan plan = plan_transition(inputs.data(), sides, widths.data());
  const auto acc_type = dtype == DType::kFloat64 ? at::kDouble : at::kFloat;
  const auto options = Ms[0].options().dtype(acc_type);
  Tensor workspace = at::empty({plan.workspace > 0 ? plan.workspace : 1}, options);
  Tensor phi = at::empty({}, options);

  std::vector<char> bytes;
  const size_t sides_at = append(bytes, plan.sides.data(), plan.sides.size());
  const size_t blocks_at = append(bytes, plan.blocks.data(), plan.blocks.size());
  const size_t tasks_at = append(bytes, plan.tasks.data(), plan.tasks.size());
  const Tensor meta = upload(bytes, Ms[0].device());
  const char* base = static_cast<const char*>(meta.data_ptr());

  TransitionArgs args{};
  args.sides = reinterpret_cast<const TransitionSide*>(base + sides_at);
  args.blocks = reinterpret_cast<const TransitionBlock*>(base + blocks_at);
  args.tasks = reinterpret_cast<const GramTask*>(base + tasks_at);
  args.num_sides = sides;
  args.num_tasks = static_cast<int64_t>(plan.tasks.size());
  args.workspace = workspace.data_ptr();
  args.phi = phi.data_ptr();
  args.tau = tau;
  args.relative = relative;
  args.partial_offset = plan.partial_offset;
  args.score_offset = plan.score_offset;
  args.gram_tiles = plan.gram_tiles;
  args.update_tiles = plan.update_tiles;
  args.columns = plan.columns;
  check_launch(launch_transition(args, dtype, c10::cuda::getCurrentCUDAStream()), "transition");
  return phi;
}

TORCH_LIBRARY(apsfast_cuda, m) { apsfast::define_ops(m); }

TORCH_LIBRARY_IMPL(apsfast_cuda, CUDA, m) {
  m.impl("construct", &construct);
  m.impl("construct_backward", &construct_backward);
  m.impl("construct_grouped", &construct_grouped);
  m.impl("transition_step_all", &transition_step_all);
}

}  // namespace apsfast_cuda

extern "C" PyObject* PyInit__cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
