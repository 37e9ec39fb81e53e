// Argument checks of the compiled ops, shared by the CPU library (csrc/cpu) and the CUDA
// binding (csrc/cuda/binding.cpp): one implementation, so both backends refuse the same
// inputs with the same messages. Each message names the argument, the value expected and the
// value got. Device-specific checks (a CUDA tensor, a dtype the kernels serve) stay with each
// backend. Needs ATen, so the pure-CUDA files never include it.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace apsfast {

// weight [C_out, C_in, *kernel].
inline void check_weight(const at::Tensor& weight, const std::string& name) {
  TORCH_CHECK(weight.dim() >= 2, name, " must have at least 2 dims (C_out, C_in, *kernel), got ",
              weight.dim());
}

// A transform of mode `dim` of `weight`: [weight.shape[dim], c], weight's dtype and device.
inline void check_transform(const at::Tensor& weight, const std::optional<at::Tensor>& M,
                            const std::string& name, int64_t dim) {
  if (!M.has_value()) return;
  TORCH_CHECK(M->dim() == 2, name, " must be 2-D, got ", M->dim(), " dims");
  TORCH_CHECK(M->size(0) == weight.size(dim), name, ".shape[0] must be weight.shape[", dim,
              "] = ", weight.size(dim), ", got ", M->size(0));
  TORCH_CHECK(M->scalar_type() == weight.scalar_type(), name, " has dtype ", M->scalar_type(),
              ", expected ", weight.scalar_type());
  TORCH_CHECK(M->device() == weight.device(), name, " must be on ", weight.device(), ", got ",
              M->device());
}

// construct(weight, P, Q).
inline void check_construct(const at::Tensor& weight, const std::optional<at::Tensor>& P,
                            const std::optional<at::Tensor>& Q) {
  check_weight(weight, "weight");
  check_transform(weight, P, "P", 0);
  check_transform(weight, Q, "Q", 1);
}

// The shape [c_o, c_i, *kernel] of the candidate kernel of weight [C_out, C_in, *kernel].
inline std::vector<int64_t> candidate_shape(const at::Tensor& weight, int64_t c_o, int64_t c_i) {
  std::vector<int64_t> shape(weight.sizes().begin(), weight.sizes().end());
  shape[0] = c_o;
  shape[1] = c_i;
  return shape;
}

// construct_backward(grad, weight, P, Q, need_weight, need_P, need_Q): construct's checks, a
// grad of the candidate kernel's shape, dtype and device, and a transform for each need_*.
inline void check_construct_backward(const at::Tensor& grad, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& P,
                                     const std::optional<at::Tensor>& Q, bool need_P,
                                     bool need_Q) {
  check_construct(weight, P, Q);
  const int64_t c_o = P ? P->size(1) : weight.size(0), c_i = Q ? Q->size(1) : weight.size(1);
  const auto expected = candidate_shape(weight, c_o, c_i);
  TORCH_CHECK(grad.sizes() == at::IntArrayRef(expected),
              "grad must have the candidate kernel's shape ", at::IntArrayRef(expected), ", got ",
              grad.sizes());
  TORCH_CHECK(grad.scalar_type() == weight.scalar_type(), "grad has dtype ", grad.scalar_type(),
              ", expected ", weight.scalar_type());
  TORCH_CHECK(grad.device() == weight.device(), "grad must be on ", weight.device(), ", got ",
              grad.device());
  TORCH_CHECK(!need_P || P, "need_P is set but P is None");
  TORCH_CHECK(!need_Q || Q, "need_Q is set but Q is None");
}

// construct_grouped(weights, Ps, Qs): one P and one Q (or None) per weight; every layer as in
// construct, in the dtype and on the device of weights[0]; transforms named Ps[l] / Qs[l].
inline void check_construct_grouped(at::TensorList weights,
                                    const c10::List<std::optional<at::Tensor>>& Ps,
                                    const c10::List<std::optional<at::Tensor>>& Qs) {
  const int64_t layers = static_cast<int64_t>(weights.size());
  TORCH_CHECK(static_cast<int64_t>(Ps.size()) == layers && static_cast<int64_t>(Qs.size()) == layers,
              "Ps and Qs must have one entry per weight (", layers, "), got ", Ps.size(), " and ",
              Qs.size());
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor& w = weights[l];
    const std::string index = "[" + std::to_string(l) + "]";
    check_weight(w, "weights" + index);
    TORCH_CHECK(w.scalar_type() == weights[0].scalar_type(), "weights", index, " has dtype ",
                w.scalar_type(), ", expected ", weights[0].scalar_type(), " (that of weights[0])");
    TORCH_CHECK(w.device() == weights[0].device(), "weights", index, " must be on ",
                weights[0].device(), ", got ", w.device());
    check_transform(w, Ps.get(l), "Ps" + index, 0);
    check_transform(w, Qs.get(l), "Qs" + index, 1);
  }
}

// transition_step_all(Ms, widths, counts, partner, ...): per side a 2-D matrix (dtype and
// device of Ms[0], no overlapping elements since it is updated in place) whose counts[s] block
// widths sum to its columns, and a partner that is -1 or another side. Returns the index in
// `widths` of each side's first block, plus the total: block_first[sides + 1].
inline std::vector<int64_t> check_transition_step_all(at::TensorList Ms, at::IntArrayRef widths,
                                                      at::IntArrayRef counts,
                                                      at::IntArrayRef partner) {
  const int64_t sides = static_cast<int64_t>(Ms.size());
  TORCH_CHECK(sides > 0, "Ms must hold at least one side");
  TORCH_CHECK(static_cast<int64_t>(counts.size()) == sides && static_cast<int64_t>(partner.size()) == sides,
              "counts and partner must have one entry per side (", sides, "), got ", counts.size(),
              " and ", partner.size());
  std::vector<int64_t> block_first(sides + 1, 0);
  for (int64_t s = 0; s < sides; ++s) {
    const at::Tensor& M = Ms[s];
    TORCH_CHECK(M.dim() == 2, "Ms[", s, "] must be 2-D, got ", M.dim(), " dims");
    TORCH_CHECK(M.scalar_type() == Ms[0].scalar_type(), "Ms[", s, "] has dtype ", M.scalar_type(),
                ", expected ", Ms[0].scalar_type(), " (that of Ms[0])");
    TORCH_CHECK(M.device() == Ms[0].device(), "Ms[", s, "] must be on ", Ms[0].device(), ", got ",
                M.device());
    TORCH_CHECK(at::has_internal_overlap(M) != at::MemOverlap::Yes, "Ms[", s,
                "] is updated in place and must not have overlapping elements (e.g. an expand)");
    TORCH_CHECK(partner[s] >= -1 && partner[s] < sides && partner[s] != s,
                "partner[", s, "] must be -1 or another side's index in [0, ", sides, "), got ",
                partner[s]);
    TORCH_CHECK(counts[s] >= 0, "counts[", s, "] must be >= 0, got ", counts[s]);
    const int64_t first = block_first[s], end = first + counts[s];
    TORCH_CHECK(end <= static_cast<int64_t>(widths.size()), "widths must hold at least ", end,
                " block widths (the sum of counts), got ", widths.size());
    int64_t n = 0;
    for (int64_t b = first; b < end; ++b) {
      TORCH_CHECK(widths[b] >= 0, "widths[", b, "] must be >= 0, got ", widths[b]);
      n += widths[b];
    }
    TORCH_CHECK(n == M.size(1), "the widths of side ", s, " must sum to Ms[", s, "].shape[1] = ",
                M.size(1), ", got ", n);
    block_first[s + 1] = end;
  }
  TORCH_CHECK(block_first[sides] == static_cast<int64_t>(widths.size()), "widths must hold ",
              block_first[sides], " block widths (the sum of counts), got ", widths.size());
  return block_first;
}

}  // namespace apsfast
