// CPU kernel of the batched transition (paper eq. 4 and 5) over every side of every layer.
//
// A side is one matrix M [C, n] holding its candidates' transforms side by side (block
// widths in `widths`, `counts[s]` blocks for side s); partner[s] is the other side of the
// same layer or -1. Per side
//   S = 1/2 |G|^2 + 1/2 sum_a |G_aa|^2,   G = M^T M,  G_aa = M_a^T M_a
//   dS/dM = 2 M (G + blockdiag G_aa) = 2 (M M^T) M + 2 [M_a G_aa]_a
// with the Gram formed once, on the smaller side (|M^T M| = |M M^T|), and reused by both.
// and every column steps  p <- normalize(p - tau * S_partner * dS/dp), or with S_partner = 1
// when `relative` (a rate independent of the widths: see apsfast.sharing.transition_step_all).
// Sides are independent given the partners' scores, so both passes spread sides over threads.
// Argument checks: ../common/checks.h (shared with the CUDA binding).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common/checks.h"

namespace apsfast_cpu {
namespace {

using at::Tensor;

// Small per-layer GEMMs: one thread each beats splitting one small GEMM over threads.
constexpr int64_t kGrain = 1;

at::ScalarType work_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

}  // namespace

Tensor transition_step_all(at::TensorList Ms, at::IntArrayRef widths, at::IntArrayRef counts,
                           at::IntArrayRef partner, double tau, bool relative) {
  const std::vector<int64_t> first = apsfast::check_transition_step_all(Ms, widths, counts, partner);
  const int64_t sides = static_cast<int64_t>(Ms.size());

  const auto dtype = work_type(Ms[0].scalar_type());
  std::vector<Tensor> work(sides), gram(sides);
  std::vector<double> score(sides);
  // Pass 1: every side's score S from its Gram on the smaller side, kept for pass 2.
  at::parallel_for(0, sides, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      Tensor M = Ms[s].to(dtype);
      work[s] = M;
      const bool tall = M.size(0) >= M.size(1);
      gram[s] = tall ? M.t().mm(M) : M.mm(M.t());
      double total = 0.5 * gram[s].square().sum().item<double>();
      int64_t col = 0;
      for (int64_t b = first[s]; b < first[s + 1]; ++b) {
        // A block's own Gram is a diagonal block of G = M^T M when that is what was formed.
        Tensor own = tall ? gram[s].narrow(0, col, widths[b]).narrow(1, col, widths[b])
                          : M.narrow(1, col, widths[b]).t().mm(M.narrow(1, col, widths[b]));
        total += 0.5 * own.square().sum().item<double>();
        col += widths[b];
      }
      score[s] = total;
    }
  });
  // Pass 2: gradients from the old values, then the projected step, side by side.
  //   tall (C >= n): dS/dM = 2 M (G + blockdiag G_aa)   -- C n^2, reusing G
  //   wide (C < n):  dS/dM_a = 2 (M M^T) M_a + 2 M_a G_aa   -- C^2 n, reusing M M^T
  at::parallel_for(0, sides, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const Tensor& M = work[s];
      const double rate = 2.0 * tau * (partner[s] >= 0 && !relative ? score[partner[s]] : 1.0);
      const bool tall = M.size(0) >= M.size(1);
      Tensor coupling = gram[s].clone();  // G (+ its diagonal blocks) or M M^T
      Tensor step = M.clone();
      int64_t col = 0;
      for (int64_t b = first[s]; b < first[s + 1]; ++b) {
        const int64_t w = widths[b];
        if (tall) {
          coupling.narrow(0, col, w).narrow(1, col, w).mul_(2.0);
        } else {
          Tensor block = M.narrow(1, col, w);
          step.narrow(1, col, w).sub_(block.mm(block.t().mm(block)), rate);
        }
        col += w;
      }
      step.sub_(tall ? M.mm(coupling) : coupling.mm(M), rate);
      step.div_(step.norm(2, {0}, true).clamp_min(1e-12));
      Ms[s].copy_(step);
    }
  });
  double phi = 0.0;
  for (int64_t s = 0; s < sides; ++s) {
    if (partner[s] < s) phi += score[s] * (partner[s] >= 0 ? score[partner[s]] : 1.0);
  }
  return at::scalar_tensor(phi, Ms[0].options().dtype(dtype));
}

TORCH_LIBRARY_IMPL(apsfast_cpu, CPU, m) {
  m.impl("transition_step_all", &transition_step_all);
}

}  // namespace apsfast_cpu
