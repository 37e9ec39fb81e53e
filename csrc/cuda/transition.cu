// CUDA kernels of the batched transition (paper eq. 4 and 5) over every side of every layer.
// The maths and the workspace layout are described in aps_kernels.h (TransitionSide, ...).
//
// Four launches, in stream order:
//   1. _transition_gram_kernel: the symmetric products of every side (H on tall sides, O and
//      every D_a on wide ones), one 64 x 64 upper-triangle tile per block, mirrored, plus one
//      weighted sum of squares per tile (a score partial).
//   2. _transition_score_kernel: one block sums each side's partials in a fixed order (the
//      scores are deterministic) and forms Phi.
//   3. _transition_update_kernel: U = M - 2 tau S_partner (M H) or (O M + M blockdiag(D_a)),
//      one 64 x 64 tile per block, into the workspace (column-major).
//   4. _transition_normalize_kernel: one block per column: M[:, j] = U[:, j] / max(|U_j|, eps).
// Only the last launch writes M, so every block of 1 and 3 reads the old point.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "aps_kernels.h"
#include "elem.cuh"

namespace apsfast_cuda {
namespace {

constexpr int kTile = kTransitionTile;
constexpr int kDepth = kTransitionDepth;
constexpr int kThreads = kTransitionThreads;
constexpr int kLanes = 16;
constexpr int kPer = kTile / kLanes;                // outputs per thread along each side
constexpr int kLoads = kTile * kDepth / kThreads;   // stage elements per thread and operand
static_assert(kLanes * kLanes == kThreads, "the thread grid is 16 x 16");
static_assert(kPer * kLanes == kTile, "tiles split evenly");
static_assert(kLoads * kThreads == kTile * kDepth, "stages split evenly over the threads");
static_assert((kThreads & (kThreads - 1)) == 0 && (kNormalizeThreads & (kNormalizeThreads - 1)) == 0,
              "tree reductions need a power-of-two block");

// F.normalize's floor on the norm.
constexpr double kNormEps = 1e-12;

// The last i < count with items[i].*first <= x: the segment (side, task, block) holding x,
// for nondecreasing firsts whose first entry is <= x. Empty segments share their first with
// the next one and are never returned.
template <typename Item>
__device__ __forceinline__ int64_t find_segment(const Item* items, int64_t count,
                                                int64_t Item::*first, int64_t x) {
  int64_t lo = 0, hi = count - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (items[mid].*first <= x) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Operand element (k, x) of a strided [K, X] view, x counted from the tile origin x0; zero
// outside the view. V is the stored type (M's element type, or Acc for the workspace).
template <typename V, typename Acc>
struct Strided {
  const V* p;
  int64_t K, X, stride_k, stride_x, x0;
  __device__ __forceinline__ bool k_fast() const { return stride_k == 1 && stride_x != 1; }
  __device__ __forceinline__ Acc operator()(int64_t k, int x) const {
    const int64_t xx = x0 + x;
    return (k < K && xx < X) ? static_cast<Acc>(Elem<V>::load(p[k * stride_k + xx * stride_x]))
                             : Acc(0);
  }
};

// blockdiag(D_a)[k, j] for the columns j = x0 + x of one tile: the tile's per-column block
// bounds and D offsets are in shared memory (filled before use). Zero across blocks.
template <typename Acc>
struct BlockDiag {
  const Acc* ws;
  const int64_t* col_begin;  // [kTile], shared
  const int64_t* col_end;
  const int64_t* diag;
  int64_t X, x0;
  __device__ __forceinline__ bool k_fast() const { return false; }
  __device__ __forceinline__ Acc operator()(int64_t k, int x) const {
    const int64_t j = x0 + x;
    if (j >= X) return Acc(0);
    const int64_t b = col_begin[x], e = col_end[x];
    return (k >= b && k < e) ? ws[diag[x] + (k - b) * (e - b) + (j - b)] : Acc(0);
  }
};

// Slot q of a thread in a [kDepth, kTile] stage: neighbouring threads walk the tile (x) or
// the depth (k), whichever has stride 1. Both maps are bijections onto the stage.
__device__ __forceinline__ void stage_slot(int tid, int q, bool k_fast, int& kk, int& x) {
  const int e = tid + q * kThreads;
  if (k_fast) {
    kk = e % kDepth;
    x = e / kDepth;
  } else {
    kk = e / kTile;
    x = e % kTile;
  }
}

template <typename Acc>
struct Stage {
  Acc L[kDepth][kTile + 1];  // +1: k-fast staging writes would otherwise share a bank
  Acc R[kDepth][kTile + 1];
};

// acc[i][j] += sum_{k_begin <= k < k_end} L(k, tx + 16 i) * R(k, ty + 16 j), tx = tid % 16,
// ty = tid / 16 (rows are the thread-fast index). Every thread of the block must call it with
// the same arguments; it ends with a barrier, so calls may follow one another.
template <typename Acc, typename OpL, typename OpR>
__device__ __forceinline__ void accumulate(Acc (&acc)[kPer][kPer], Stage<Acc>& st, int64_t k_begin,
                                           int64_t k_end, const OpL& op_l, const OpR& op_r) {
  const int tid = threadIdx.x, tx = tid % kLanes, ty = tid / kLanes;
  int l_kk[kLoads], l_x[kLoads], r_kk[kLoads], r_x[kLoads];
  const bool l_k_fast = op_l.k_fast(), r_k_fast = op_r.k_fast();
#pragma unroll
  for (int q = 0; q < kLoads; ++q) {
    stage_slot(tid, q, l_k_fast, l_kk[q], l_x[q]);
    stage_slot(tid, q, r_k_fast, r_kk[q], r_x[q]);
  }
  Acc l_next[kLoads], r_next[kLoads];
  auto fetch = [&](int64_t k0) {
#pragma unroll
    for (int q = 0; q < kLoads; ++q) {
      const int64_t kl = k0 + l_kk[q], kr = k0 + r_kk[q];
      l_next[q] = kl < k_end ? op_l(kl, l_x[q]) : Acc(0);
      r_next[q] = kr < k_end ? op_r(kr, r_x[q]) : Acc(0);
    }
  };
  if (k_begin < k_end) fetch(k_begin);
  for (int64_t k0 = k_begin; k0 < k_end; k0 += kDepth) {
#pragma unroll
    for (int q = 0; q < kLoads; ++q) {
      st.L[l_kk[q]][l_x[q]] = l_next[q];
      st.R[r_kk[q]][r_x[q]] = r_next[q];
    }
    __syncthreads();  // the stage is complete
    if (k0 + kDepth < k_end) fetch(k0 + kDepth);
#pragma unroll
    for (int kk = 0; kk < kDepth; ++kk) {
      Acc a[kPer], b[kPer];
#pragma unroll
      for (int i = 0; i < kPer; ++i) a[i] = st.L[kk][tx + kLanes * i];
#pragma unroll
      for (int j = 0; j < kPer; ++j) b[j] = st.R[kk][ty + kLanes * j];
#pragma unroll
      for (int i = 0; i < kPer; ++i)
#pragma unroll
        for (int j = 0; j < kPer; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();  // every thread is done with the stage before it is overwritten
  }
}

// Sum of `value` over the block (kThreadsOfBlock threads), returned to every thread.
template <int kThreadsOfBlock, typename Acc>
__device__ __forceinline__ Acc block_sum(Acc value, Acc* scratch) {
  const int tid = threadIdx.x;
  scratch[tid] = value;
  __syncthreads();
#pragma unroll
  for (int s = kThreadsOfBlock / 2; s > 0; s >>= 1) {
    if (tid < s) scratch[tid] += scratch[tid + s];
    __syncthreads();
  }
  const Acc total = scratch[0];
  __syncthreads();  // scratch may be reused as soon as this returns
  return total;
}

// Global index of the block holding column j of side s (s has at least one column).
__device__ __forceinline__ int64_t block_of(const TransitionBlock* blocks, const TransitionSide& s,
                                            int64_t j) {
  return s.block_first + find_segment(blocks + s.block_first, s.block_count,
                                      &TransitionBlock::col_begin, j);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) _transition_gram_kernel(const TransitionArgs args) {
  using Acc = typename Elem<T>::Acc;
  __shared__ Stage<Acc> st;
  __shared__ Acc scratch[kThreads];
  const int64_t b = static_cast<int64_t>(blockIdx.x);
  const GramTask t = args.tasks[find_segment(args.tasks, args.num_tasks, &GramTask::tile_first, b)];
  const TransitionSide s = args.sides[t.side];
  const int64_t local = b - t.tile_first;
  // Tile (ti, tj), ti <= tj, of the upper triangle, numbered row by row.
  const int64_t nt = ceil_div(t.size, kTile);
  int64_t ti = 0, rem = local;
  while (rem >= nt - ti) {
    rem -= nt - ti;
    ++ti;
  }
  const int64_t tj = ti + rem;

  const T* A = static_cast<const T*>(s.M) + t.base;
  const Strided<T, Acc> rows{A, t.depth, t.size, t.stride_k, t.stride_i, ti * kTile};
  const Strided<T, Acc> cols{A, t.depth, t.size, t.stride_k, t.stride_i, tj * kTile};
  Acc acc[kPer][kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i)
#pragma unroll
    for (int j = 0; j < kPer; ++j) acc[i][j] = Acc(0);
  accumulate(acc, st, 0, t.depth, rows, cols);

  const int tid = threadIdx.x, tx = tid % kLanes, ty = tid / kLanes;
  // On a tall side's Gram, entries within one candidate's diagonal block count twice in S
  // (|G|^2 and |G_aa|^2) and are doubled in H = G + blockdiag(G_aa).
  int64_t row_block[kPer], col_block[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t r = ti * kTile + tx + kLanes * i, c = tj * kTile + ty + kLanes * i;
    row_block[i] = (t.tall_gram && r < t.size) ? block_of(args.blocks, s, r) : -1;
    col_block[i] = (t.tall_gram && c < t.size) ? block_of(args.blocks, s, c) : -2;
  }
  Acc* X = static_cast<Acc*>(args.workspace) + t.out;
  Acc sum = Acc(0);
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int64_t r = ti * kTile + tx + kLanes * i;
    if (r >= t.size) continue;
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int64_t c = tj * kTile + ty + kLanes * j;
      if (c >= t.size) continue;
      const Acc v = acc[i][j];
      const bool same = t.tall_gram && row_block[i] == col_block[j];
      sum += same ? v * v : Acc(0.5) * v * v;
      const Acc h = same ? Acc(2) * v : v;
      X[r * t.size + c] = h;
      if (ti != tj) X[c * t.size + r] = h;  // the mirrored tile is computed by no block
    }
  }
  if (ti != tj) sum *= Acc(2);
  const Acc total = block_sum<kThreads>(sum, scratch);
  if (tid == 0) static_cast<Acc*>(args.workspace)[args.partial_offset + t.partial_first + local] = total;
}

template <typename Acc>
__global__ void __launch_bounds__(kThreads) _transition_score_kernel(const TransitionArgs args) {
  __shared__ Acc scratch[kThreads];
  Acc* ws = static_cast<Acc*>(args.workspace);
  const Acc* partials = ws + args.partial_offset;
  Acc* scores = ws + args.score_offset;
  const int tid = threadIdx.x;
  for (int64_t s = 0; s < args.num_sides; ++s) {
    const int64_t first = args.sides[s].partial_first, count = args.sides[s].partial_count;
    Acc sum = Acc(0);
    for (int64_t i = tid; i < count; i += kThreads) sum += partials[first + i];
    const Acc total = block_sum<kThreads>(sum, scratch);
    if (tid == 0) scores[s] = total;
  }
  if (tid == 0) {  // thread 0 wrote every score itself: no barrier needed to read them
    Acc phi = Acc(0);
    for (int64_t s = 0; s < args.num_sides; ++s) {
      const int64_t p = args.sides[s].partner;
      if (p < s) phi += scores[s] * (p >= 0 ? scores[p] : Acc(1));
    }
    *static_cast<Acc*>(args.phi) = phi;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) _transition_update_kernel(const TransitionArgs args) {
  using Acc = typename Elem<T>::Acc;
  __shared__ Stage<Acc> st;
  __shared__ int64_t col_begin[kTile], col_end[kTile], diag[kTile];
  const int64_t b = static_cast<int64_t>(blockIdx.x);
  const TransitionSide s =
      args.sides[find_segment(args.sides, args.num_sides, &TransitionSide::tile_first, b)];
  const int64_t local = b - s.tile_first;
  const int64_t row_tiles = ceil_div(s.rows, kTile);
  const int64_t r0 = (local % row_tiles) * kTile, c0 = (local / row_tiles) * kTile;
  const Acc* ws = static_cast<const Acc*>(args.workspace);
  const Acc* gram = ws + s.gram;
  const T* M = static_cast<const T*>(s.M);
  const int tid = threadIdx.x, tx = tid % kLanes, ty = tid / kLanes;

  Acc acc[kPer][kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i)
#pragma unroll
    for (int j = 0; j < kPer; ++j) acc[i][j] = Acc(0);
  // L(k, r) = M[r, k] over the columns k of M.
  const Strided<T, Acc> m_rows{M, s.cols, s.rows, s.stride_col, s.stride_row, r0};
  if (!s.wide) {
    // (M H)[r, c]; H is symmetric, H(k, c) = H[k * cols + c].
    const Strided<Acc, Acc> h{gram, s.cols, s.cols, s.cols, 1, c0};
    accumulate(acc, st, 0, s.cols, m_rows, h);
  } else {
    // (O M)[r, c]: O is symmetric, O(k, r) = O[k * rows + r]; M(k, c) = M[k, c].
    const Strided<Acc, Acc> o{gram, s.rows, s.rows, s.rows, 1, r0};
    const Strided<T, Acc> m_cols{M, s.rows, s.cols, s.stride_row, s.stride_col, c0};
    accumulate(acc, st, 0, s.rows, o, m_cols);
    // (M blockdiag(D_a))[r, c] over k in the blocks spanned by this tile's columns.
    if (tid < kTile) {
      const int64_t j = c0 + tid;
      if (j < s.cols) {
        const TransitionBlock blk = args.blocks[block_of(args.blocks, s, j)];
        col_begin[tid] = blk.col_begin;
        col_end[tid] = blk.col_end;
        diag[tid] = blk.diag;
      } else {
        col_begin[tid] = col_end[tid] = diag[tid] = 0;
      }
    }
    __syncthreads();
    const int64_t last = (s.cols - c0 < kTile ? s.cols - c0 : kTile) - 1;
    const BlockDiag<Acc> d{ws, col_begin, col_end, diag, s.cols, c0};
    accumulate(acc, st, col_begin[0], col_end[last], m_rows, d);
  }

  const Acc* scores = ws + args.score_offset;
  const Acc partner = s.partner >= 0 && !args.relative ? scores[s.partner] : Acc(1);
  const Acc coef = static_cast<Acc>(2.0 * args.tau) * partner;
  Acc* U = static_cast<Acc*>(args.workspace) + s.update;
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int64_t c = c0 + ty + kLanes * j;
    if (c >= s.cols) continue;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int64_t r = r0 + tx + kLanes * i;
      if (r >= s.rows) continue;
      const Acc m = static_cast<Acc>(Elem<T>::load(M[r * s.stride_row + c * s.stride_col]));
      U[c * s.rows + r] = m - coef * acc[i][j];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kNormalizeThreads)
    _transition_normalize_kernel(const TransitionArgs args) {
  using Acc = typename Elem<T>::Acc;
  __shared__ Acc scratch[kNormalizeThreads];
  const int64_t b = static_cast<int64_t>(blockIdx.x);
  const TransitionSide s =
      args.sides[find_segment(args.sides, args.num_sides, &TransitionSide::column_first, b)];
  const int64_t j = b - s.column_first;
  const Acc* u = static_cast<const Acc*>(args.workspace) + s.update + j * s.rows;
  Acc sum = Acc(0);
  for (int64_t r = threadIdx.x; r < s.rows; r += kNormalizeThreads) sum += u[r] * u[r];
  const Acc norm = sqrt(block_sum<kNormalizeThreads>(sum, scratch));
  const Acc denom = norm > Acc(kNormEps) ? norm : Acc(kNormEps);
  T* M = static_cast<T*>(s.M);
  for (int64_t r = threadIdx.x; r < s.rows; r += kNormalizeThreads) {
    M[r * s.stride_row + j * s.stride_col] = Elem<T>::store(u[r] / denom);
  }
}

bool grid_ok(int64_t blocks) { return blocks <= INT_MAX; }

template <typename T>
cudaError_t transition_forward(const TransitionArgs& args, cudaStream_t stream) {
  using Acc = typename Elem<T>::Acc;
  if (args.num_sides <= 0) return cudaErrorInvalidValue;
  if (!grid_ok(args.gram_tiles) || !grid_ok(args.update_tiles) || !grid_ok(args.columns)) {
    return cudaErrorInvalidConfiguration;
  }
  cudaError_t err;
  if (args.gram_tiles > 0) {
    _transition_gram_kernel<T><<<static_cast<unsigned>(args.gram_tiles), kThreads, 0, stream>>>(args);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  _transition_score_kernel<Acc><<<1, kThreads, 0, stream>>>(args);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (args.update_tiles > 0) {
    _transition_update_kernel<T>
        <<<static_cast<unsigned>(args.update_tiles), kThreads, 0, stream>>>(args);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (args.columns > 0) {
    _transition_normalize_kernel<T>
        <<<static_cast<unsigned>(args.columns), kNormalizeThreads, 0, stream>>>(args);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_transition(const TransitionArgs& args, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return transition_forward<float>(args, stream);
    case DType::kFloat64: return transition_forward<double>(args, stream);
    case DType::kFloat16: return transition_forward<__half>(args, stream);
    case DType::kBFloat16: return transition_forward<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace apsfast_cuda
