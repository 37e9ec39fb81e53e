// CPU kernel of the batched transition (paper eq. 4 and 5) over every side of every layer.
//
// A side is one matrix M [C, n] holding its candidates' transforms side by side (block
// widths in `widths`, `counts[s]` blocks for side s); partner[s] is the other side of the
// same layer or -1. Per side
//   S = 1/2 |G|^2 + 1/2 sum_a |G_aa|^2,   G = M^T M,  G_aa = M_a^T M_a
//   dS/dM = 2 M (G + blockdiag G_aa) = 2 (M M^T) M + 2 [M_a G_aa]_a
// with the Gram formed once, on the side that costs fewer FLOPs (|M^T M| = |M M^T|), and
// reused by the gradient; every column then steps  p <- normalize(p - tau * S_partner * dS/dp),
// or with S_partner = 1 when `relative` (a rate independent of the widths: see
// apsfast.sharing.transition_step_all).
//
// Cost: a Gram is symmetric, so only the blocks on and above the diagonal of a recursive
// halving are multiplied (~C n^2 instead of 2 C n^2 FLOPs) and the rest is mirrored; with the
// gradient's GEMM a square side costs ~3 C n^2 instead of 4 C n^2. Sides joined by `partner`
// form a unit (a layer) that is scored and stepped in one go, so only one unit's Grams live at
// a time per thread. Large units run one after another with every GEMM on all threads; small
// ones are spread over threads (one thread each: small GEMMs split badly), balanced by cost.
// The GEMMs are at::mm: under torch.set_float32_matmul_precision("medium") the gradient GEMMs
// of large float32 units take bf16 products (oneDNN), the Grams stay float32 (see below).
// Argument checks: ../common/checks.h (shared with the CUDA binding).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <optional>
#include <vector>

#include "../common/checks.h"

namespace apsfast_cpu {
namespace {

using at::Tensor;

// Units of at least this many FLOPs (a 256-wide square side: 3 * 256^3) run alone with
// multi-threaded GEMMs; below it one thread per unit beats splitting one small GEMM.
constexpr double kLargeFlops = 3.0 * 256 * 256 * 256;
// A Gram is halved recursively down to blocks this wide (narrower ones are one GEMM).
constexpr int64_t kGramLeaf = 256;

at::ScalarType work_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

// The upper triangle of A^T A (A [rows, n]) into G. Of each halving only the block above the
// diagonal is multiplied, ~rows * n * (n + kGramLeaf) FLOPs instead of 2 rows n^2.
void gram_upper(const Tensor& A, Tensor G) {
  const int64_t n = A.size(1);
  if (n <= kGramLeaf) {
    at::mm_out(G, A.t(), A);
    return;
  }
  const int64_t h = std::min(n - 1, (n / 2 + 15) / 16 * 16);  // a SIMD-friendly split
  const Tensor left = A.narrow(1, 0, h), right = A.narrow(1, h, n - h);
  Tensor upper = G.narrow(0, 0, h).narrow(1, h, n - h);
  gram_upper(left, G.narrow(0, 0, h).narrow(1, 0, h));
  at::mm_out(upper, left.t(), right);
  gram_upper(right, G.narrow(0, h, n - h).narrow(1, h, n - h));
}

// g [n, n] (contiguous) <- its upper triangle mirrored below the diagonal, in 64 x 64 tiles
// (a strided copy_ of each transposed block is ~4x slower). Row tiles are taken from both ends
// in turn so that every thread's share of the triangle is about equal.
template <typename T>
void mirror_upper_(T* g, int64_t n) {
  constexpr int64_t kTile = 64;
  const int64_t tiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t i0 = (k % 2 == 0 ? k / 2 : tiles - 1 - k / 2) * kTile, i1 = std::min(n, i0 + kTile);
      for (int64_t j0 = i0; j0 < n; j0 += kTile) {
        const int64_t j1 = std::min(n, j0 + kTile);
        for (int64_t i = i0; i < i1; ++i) {
          for (int64_t j = std::max(j0, i + 1); j < j1; ++j) g[j * n + i] = g[i * n + j];
        }
      }
    }
  });
}

// G [n, n] = A^T A (exactly symmetric), A [rows, n] with any strides.
Tensor gram(const Tensor& A) {
  Tensor G = at::empty({A.size(1), A.size(1)}, A.options());
  gram_upper(A, G);
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "transition_mirror", [&] {
    mirror_upper_<scalar_t>(G.data_ptr<scalar_t>(), G.size(0));
  });
  return G;
}

// oneDNN's float32 matmul precision (torch.set_float32_matmul_precision("medium") is BF16).
at::Float32Precision matmul_precision() {
  return at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
}

void set_matmul_precision(at::Float32Precision p) {
  at::globalContext().setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL, p);
}

// Puts `found` back as the matmul precision at the end of its scope (also on an exception).
// The getter resolves an unset ("none") entry through the settings it inherits, so a bf16
// inherited that way comes back as an explicit one: the same precision.
struct RestoreMatmulPrecision {
  at::Float32Precision found;
  ~RestoreMatmulPrecision() { set_matmul_precision(found); }
};

// sum_j x_j^2 in double, in 16 independent lanes (a single running sum does not vectorise).
template <typename T>
double sum_squares(const T* x, int64_t count) {
  constexpr int64_t kLanes = 16;
  double lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= count; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] += static_cast<double>(x[j + k]) * static_cast<double>(x[j + k]);
  }
  double total = 0.0;
  for (; j < count; ++j) total += static_cast<double>(x[j]) * static_cast<double>(x[j]);
  for (int64_t k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

// |t|_F^2 of a matrix with unit column stride, summed in double without a temporary of t's
// size (at::linalg_vector_norm accumulates float32 in float32: 2e-3 off on a 3360-wide Gram).
double squared_norm(const Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == 2 && (t.stride(1) == 1 || t.size(1) <= 1));
  if (t.numel() == 0) return 0.0;
  const int64_t rows = t.size(0), cols = t.size(1), ld = t.stride(0);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(cols, 1));
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(t.scalar_type(), "transition_squared_norm", [&] {
    const scalar_t* x = t.const_data_ptr<scalar_t>();
    total = at::parallel_reduce(0, rows, grain, 0.0, [&](int64_t begin, int64_t end, double acc) {
      for (int64_t r = begin; r < end; ++r) acc += sum_squares(x + r * ld, cols);
      return acc;
    }, std::plus<double>());
  });
  return total;
}

// The projected step from d = dS/dM / 2 (D [rows, cols], contiguous, overwritten):
//   x = m - rate * d,   out = x / max(|x_:,j|, 1e-12)   column by column, norms in double.
// m is M's data when M is contiguous, else null and D already holds x. Column chunks in two
// row-wise passes: a reduction over dim 0 of a row-major matrix reads it column by column.
// out may be m itself (the side updated in place): a chunk's m is read before it is written,
// and every GEMM that reads M is done.
template <typename T>
void project_step(const T* m, T* d, T* out, int64_t rows, int64_t cols, double rate) {
  const T r = static_cast<T>(rate);
  const int64_t grain = std::max<int64_t>(16, (int64_t{1} << 15) / std::max<int64_t>(rows, 1));
  at::parallel_for(0, cols, grain, [&](int64_t begin, int64_t end) {
    const int64_t width = end - begin;
    std::vector<double> acc(width, 0.0);
    for (int64_t i = 0; i < rows; ++i) {
      T* x = d + i * cols + begin;
      if (m != nullptr) {
        const T* mi = m + i * cols + begin;
        for (int64_t j = 0; j < width; ++j) x[j] = mi[j] - r * x[j];
      }
      for (int64_t j = 0; j < width; ++j) acc[j] += static_cast<double>(x[j]) * static_cast<double>(x[j]);
    }
    std::vector<T> norm(width);
    for (int64_t j = 0; j < width; ++j) norm[j] = std::max(static_cast<T>(std::sqrt(acc[j])), static_cast<T>(1e-12));
    for (int64_t i = 0; i < rows; ++i) {
      const T* x = d + i * cols + begin;
      T* o = out + i * cols + begin;
      for (int64_t j = 0; j < width; ++j) o[j] = x[j] / norm[j];
    }
  });
}

// Each diagonal block G_aa of g [n, n] (contiguous; block widths `widths`) doubled in place,
// which turns G into the coupling G + blockdiag(G_aa); returns sum_a |G_aa|^2 (before the
// doubling) in double. Plain loops: the blocks are small, and ATen views and scalar ops cost
// ~10 us a block (four calls each), more than the arithmetic of a whole small side.
template <typename T>
double double_diagonal_blocks_(T* g, int64_t n, at::IntArrayRef widths) {
  double total = 0.0;
  int64_t col = 0;
  for (const int64_t w : widths) {
    for (int64_t r = col; r < col + w; ++r) {
      T* row = g + r * n + col;
      total += sum_squares(row, w);
      for (int64_t j = 0; j < w; ++j) row[j] += row[j];
    }
    col += w;
  }
  return total;
}

// Whether the side is scored through G = M^T M ("tall") rather than M M^T, by FLOPs:
//   tall  C n^2 (half Gram) + 2 C n^2 (M K)
//   wide  n C^2 (half Gram) + 2 C^2 n (H M) + 3 C sum c_a^2 (each G_aa and M_a G_aa)
// so tall iff n (n - C) <= sum c_a^2; square sides (C = n) are tall.
struct Shape {
  int64_t rows, cols;
  double sum_sq;  // sum_a c_a^2
  bool tall() const { return static_cast<double>(cols) * static_cast<double>(cols - rows) <= sum_sq; }
  double flops() const {
    const double C = static_cast<double>(rows), n = static_cast<double>(cols);
    return tall() ? 3.0 * C * n * n : 3.0 * C * C * n + 3.0 * C * sum_sq;
  }
};

// One side between its score and its step.
struct Side {
  Tensor M;                 // the side in the working dtype (Ms[s] itself unless half precision)
  Tensor coupling;          // tall: G + blockdiag(G_aa); wide: M M^T
  std::vector<Tensor> own;  // wide: every block's G_aa
  bool tall = true;
};

// Score S of side M (working dtype) and what its gradient needs.
double score_side(Side& side, at::IntArrayRef widths, const Shape& shape) {
  const Tensor& M = side.M;
  side.tall = shape.tall();
  double total;
  if (side.tall) {
    Tensor G = gram(M);
    total = 0.5 * squared_norm(G);
    AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "transition_own_blocks", [&] {
      total += 0.5 * double_diagonal_blocks_(G.data_ptr<scalar_t>(), G.size(0), widths);
    });
    side.coupling = std::move(G);
  } else {
    side.coupling = gram(M.t());  // M M^T
    total = 0.5 * squared_norm(side.coupling);
    int64_t col = 0;
    for (const int64_t w : widths) {
      side.own.push_back(gram(M.narrow(1, col, w)));
      total += 0.5 * squared_norm(side.own.back());
      col += w;
    }
  }
  return total;
}

// The projected step from the old values, written into `out` (the caller's side).
//   tall: M - rate M (G + blockdiag G_aa);   wide: M - rate (M M^T M + [M_a G_aa]_a)
void step_side(const Side& side, at::IntArrayRef widths, double rate, const Tensor& out) {
  const Tensor& M = side.M;
  Tensor d = side.tall ? at::mm(M, side.coupling) : at::mm(side.coupling, M);
  if (!side.tall) {
    int64_t col = 0;
    for (size_t b = 0; b < widths.size(); ++b) {
      d.narrow(1, col, widths[b]).addmm_(M.narrow(1, col, widths[b]), side.own[b]);
      col += widths[b];
    }
  }
  const bool fused = M.is_contiguous();
  if (!fused) d.mul_(-rate).add_(M);  // strided sides (views, column-major): x = M - rate d here
  // Straight into the side where it is a contiguous tensor of the working dtype.
  const bool direct = out.is_contiguous() && out.scalar_type() == d.scalar_type();
  AT_DISPATCH_FLOATING_TYPES(d.scalar_type(), "transition_project_step", [&] {
    scalar_t* x = d.data_ptr<scalar_t>();
    project_step<scalar_t>(fused ? M.const_data_ptr<scalar_t>() : nullptr, x,
                           direct ? out.data_ptr<scalar_t>() : x, d.size(0), d.size(1), rate);
  });
  if (!direct) out.copy_(d);
}

int64_t find_root(std::vector<int64_t>& root, int64_t s) {
  while (root[s] != s) s = root[s] = root[root[s]];
  return s;
}

}  // namespace

Tensor transition_step_all(at::TensorList Ms, at::IntArrayRef widths, at::IntArrayRef counts,
                           at::IntArrayRef partner, double tau, bool relative) {
  const std::vector<int64_t> first = apsfast::check_transition_step_all(Ms, widths, counts, partner);
  const int64_t sides = static_cast<int64_t>(Ms.size());
  const auto dtype = work_type(Ms[0].scalar_type());
  // Float32 products in bf16 ("medium"): only the gradient GEMMs of large units take them; every
  // Gram, and the small units whole, run in float32 (the precision is restored on return).
  // A Gram of bf16-rounded transforms is off by ~1e-3 near the ordinal start (columns ~e_i,
  // whose largest entry rounds to 1): it sets S and the coupling of every step, and delays
  // the transition's fall (Φ 7e-3 off the float32 path over 1000 steps on ResNet-20; 5e-4 with
  // float32 Grams). The gradient's GEMM tolerates bf16: its error is scaled by the rate. The
  // setting is process-wide, so float32 matmuls of other threads meanwhile run in float32.
  const bool bf16_steps = dtype == at::kFloat && matmul_precision() == at::Float32Precision::BF16;
  std::optional<RestoreMatmulPrecision> restore;
  if (bf16_steps) {
    restore.emplace(RestoreMatmulPrecision{at::Float32Precision::BF16});
    set_matmul_precision(at::Float32Precision::IEEE);
  }

  std::vector<Shape> shapes(sides);
  for (int64_t s = 0; s < sides; ++s) {
    double sum_sq = 0.0;
    for (int64_t b = first[s]; b < first[s + 1]; ++b) sum_sq += static_cast<double>(widths[b]) * widths[b];
    shapes[s] = {Ms[s].size(0), Ms[s].size(1), sum_sq};
  }
  // Units: sides joined by partner (a layer's P and Q), in order of their first side.
  std::vector<int64_t> root(sides);
  std::iota(root.begin(), root.end(), 0);
  for (int64_t s = 0; s < sides; ++s) {
    if (partner[s] >= 0) root[find_root(root, s)] = find_root(root, partner[s]);
  }
  std::vector<std::vector<int64_t>> units;
  std::vector<int64_t> unit_of(sides, -1);
  for (int64_t s = 0; s < sides; ++s) {
    const int64_t r = find_root(root, s);
    if (unit_of[r] < 0) {
      unit_of[r] = static_cast<int64_t>(units.size());
      units.emplace_back();
    }
    units[unit_of[r]].push_back(s);
  }

  std::vector<double> score(sides, 0.0);
  // Score every side of a unit, then step them (a side's rate needs its partner's score).
  // `bf16` (large units, on the calling thread only): the steps' GEMMs in bf16.
  auto run_unit = [&](const std::vector<int64_t>& unit, bool bf16) {
    std::vector<Side> work(unit.size());
    for (size_t i = 0; i < unit.size(); ++i) {
      const int64_t s = unit[i];
      work[i].M = Ms[s].to(dtype);
      score[s] = score_side(work[i], widths.slice(first[s], counts[s]), shapes[s]);
    }
    if (bf16) set_matmul_precision(at::Float32Precision::BF16);
    for (size_t i = 0; i < unit.size(); ++i) {
      const int64_t s = unit[i];
      const double rate = 2.0 * tau * (partner[s] >= 0 && !relative ? score[partner[s]] : 1.0);
      step_side(work[i], widths.slice(first[s], counts[s]), rate, Ms[s]);
      work[i] = Side();  // free this side's Grams before the next one's step
    }
    if (bf16) set_matmul_precision(at::Float32Precision::IEEE);
  };

  std::vector<double> cost(units.size(), 0.0);
  std::vector<int64_t> small;
  for (size_t u = 0; u < units.size(); ++u) {
    for (const int64_t s : units[u]) cost[u] += shapes[s].flops();
    if (cost[u] >= kLargeFlops) {
      run_unit(units[u], bf16_steps);  // every GEMM on all threads
    } else {
      small.push_back(static_cast<int64_t>(u));
    }
  }
  // Small units: longest first onto the least loaded of one bin per thread, one bin a thread.
  const int64_t bins = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), small.size()));
  std::stable_sort(small.begin(), small.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  std::vector<std::vector<int64_t>> bin(bins);
  std::vector<double> load(bins, 0.0);
  for (const int64_t u : small) {
    const auto b = std::min_element(load.begin(), load.end()) - load.begin();
    bin[b].push_back(u);
    load[b] += cost[u];
  }
  at::parallel_for(0, bins, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (const int64_t u : bin[b]) run_unit(units[u], false);
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
