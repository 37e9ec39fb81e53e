// CUDA kernels of the candidate-kernel construction (paper eq. 2): the two mode products
//   out[o, b, s] = sum_a M[a, o] W[a, b, s]    and    out[a, i, s] = sum_b M[b, i] W[a, b, s]
// as one tiled GEMM  C[r, n] = sum_k A[k, r] B[k, n]  over strided operands (see
// ModeProductParams), so transposed transforms (dW = construct(g, P^T, Q^T)) need no copy.
//
// A thread block computes a 64 x 64 output tile in 16-deep stages staged through shared
// memory; each of its 256 threads owns a 4 x 4 sub-tile strided by 16 so that both the
// shared-memory reads and the global stores of neighbouring threads are adjacent. Elements
// are converted to the accumulator type on load (float, or double for float64) and rounded
// once on store. The grouped kernel runs one such GEMM per layer in a single launch: block b
// belongs to the layer whose range [tile_first[l], tile_first[l + 1]) holds b.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "aps_kernels.h"
#include "elem.cuh"

namespace apsfast_cuda {
namespace {

constexpr int kRows = kModeTileRows;
constexpr int kCols = kModeTileCols;
constexpr int kDepth = kModeTileDepth;
constexpr int kThreads = kModeThreads;
constexpr int kLanes = 16;                 // threads along each side of the 16 x 16 thread grid
constexpr int kPerRow = kRows / kLanes;    // outputs per thread along the rows
constexpr int kPerCol = kCols / kLanes;    // ... and along the columns
constexpr int kLoadsA = kRows * kDepth / kThreads;  // tile elements each thread stages per stage
constexpr int kLoadsB = kCols * kDepth / kThreads;
static_assert(kLanes * kLanes == kThreads, "the thread grid is 16 x 16");
static_assert(kPerRow * kLanes == kRows && kPerCol * kLanes == kCols, "tiles split evenly");
static_assert(kLoadsA * kThreads == kRows * kDepth, "A stages split evenly over the threads");
static_assert(kLoadsB * kThreads == kCols * kDepth, "B stages split evenly over the threads");

// Slot q of a thread in a [kDepth, width] stage. Either neighbouring threads walk the width
// (coalesced when that mode has stride 1) or the depth (when k has stride 1 instead). Both
// maps are bijections of {tid + q * kThreads} onto the stage, so every slot is written once.
__device__ __forceinline__ void stage_slot(int tid, int q, int width, bool k_fast, int& kk,
                                           int& x) {
  const int e = tid + q * kThreads;
  if (k_fast) {
    kk = e % kDepth;
    x = e / kDepth;
  } else {
    kk = e / width;
    x = e % width;
  }
}

// One 64 x 64 output tile of the GEMM described by p. Every thread of the block must call
// it with the same arguments (it synchronises the block).
template <typename T>
__device__ __forceinline__ void mode_product_tile(const ModeProductParams& p, int64_t tile) {
  using Acc = typename Elem<T>::Acc;
  // +1 column of padding: the k-fast staging writes columns 16 apart, which would otherwise
  // fall into the same shared-memory bank.
  __shared__ Acc As[kDepth][kRows + 1];
  __shared__ Acc Bs[kDepth][kCols + 1];

  const T* __restrict__ A = static_cast<const T*>(p.A);
  const T* __restrict__ B = static_cast<const T*>(p.B);
  T* __restrict__ C = static_cast<T*>(p.C);
  const int tid = threadIdx.x;
  const int tx = tid % kLanes, ty = tid / kLanes;
  const int64_t cols = p.N1 * p.N2;
  const int64_t row_tiles = ceil_div(p.rows, kRows);
  // Neighbouring blocks share a column tile of B (the large operand) and walk the rows.
  const int64_t r0 = (tile % row_tiles) * kRows;
  const int64_t c0 = (tile / row_tiles) * kCols;

  // Staging slots of this thread and their offsets along the non-contracted mode; they do
  // not change from one stage to the next, so the index arithmetic is done once.
  const bool a_k_fast = p.A_stride_k == 1 && p.A_stride_r != 1;
  const int64_t b_col_stride = p.N2 > 1 ? p.B_stride_n2 : p.B_stride_n1;
  const bool b_k_fast = p.B_stride_k == 1 && b_col_stride != 1;
  int a_kk[kLoadsA], a_x[kLoadsA], b_kk[kLoadsB], b_x[kLoadsB];
  int64_t a_off[kLoadsA], b_off[kLoadsB];
  bool a_ok[kLoadsA], b_ok[kLoadsB];
#pragma unroll
  for (int q = 0; q < kLoadsA; ++q) {
    stage_slot(tid, q, kRows, a_k_fast, a_kk[q], a_x[q]);
    const int64_t r = r0 + a_x[q];
    a_ok[q] = r < p.rows;
    a_off[q] = a_ok[q] ? r * p.A_stride_r : 0;
  }
#pragma unroll
  for (int q = 0; q < kLoadsB; ++q) {
    stage_slot(tid, q, kCols, b_k_fast, b_kk[q], b_x[q]);
    const int64_t n = c0 + b_x[q];
    b_ok[q] = n < cols;
    const int64_t n1 = b_ok[q] ? n / p.N2 : 0;
    const int64_t n2 = b_ok[q] ? n - n1 * p.N2 : 0;
    b_off[q] = n1 * p.B_stride_n1 + n2 * p.B_stride_n2;
  }

  // Registers holding the next stage while the current one is multiplied.
  Acc a_next[kLoadsA], b_next[kLoadsB];
  auto fetch = [&](int64_t k0) {
#pragma unroll
    for (int q = 0; q < kLoadsA; ++q) {
      const int64_t k = k0 + a_kk[q];
      a_next[q] = (a_ok[q] && k < p.K) ? Elem<T>::load(A[k * p.A_stride_k + a_off[q]]) : Acc(0);
    }
#pragma unroll
    for (int q = 0; q < kLoadsB; ++q) {
      const int64_t k = k0 + b_kk[q];
      b_next[q] = (b_ok[q] && k < p.K) ? Elem<T>::load(B[k * p.B_stride_k + b_off[q]]) : Acc(0);
    }
  };

  Acc acc[kPerRow][kPerCol];
#pragma unroll
  for (int i = 0; i < kPerRow; ++i)
#pragma unroll
    for (int j = 0; j < kPerCol; ++j) acc[i][j] = Acc(0);

  fetch(0);
  for (int64_t k0 = 0; k0 < p.K; k0 += kDepth) {
#pragma unroll
    for (int q = 0; q < kLoadsA; ++q) As[a_kk[q]][a_x[q]] = a_next[q];
#pragma unroll
    for (int q = 0; q < kLoadsB; ++q) Bs[b_kk[q]][b_x[q]] = b_next[q];
    __syncthreads();  // the stage is complete
    if (k0 + kDepth < p.K) fetch(k0 + kDepth);
#pragma unroll
    for (int kk = 0; kk < kDepth; ++kk) {
      Acc a[kPerRow], b[kPerCol];
#pragma unroll
      for (int i = 0; i < kPerRow; ++i) a[i] = As[kk][ty + kLanes * i];
#pragma unroll
      for (int j = 0; j < kPerCol; ++j) b[j] = Bs[kk][tx + kLanes * j];
#pragma unroll
      for (int i = 0; i < kPerRow; ++i)
#pragma unroll
        for (int j = 0; j < kPerCol; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();  // every thread is done with the stage before it is overwritten
  }

  int64_t c_off[kPerCol];
  bool c_ok[kPerCol];
#pragma unroll
  for (int j = 0; j < kPerCol; ++j) {
    const int64_t n = c0 + tx + kLanes * j;
    c_ok[j] = n < cols;
    const int64_t n1 = c_ok[j] ? n / p.N2 : 0;
    const int64_t n2 = c_ok[j] ? n - n1 * p.N2 : 0;
    c_off[j] = n1 * p.C_stride_n1 + n2 * p.C_stride_n2;
  }
#pragma unroll
  for (int i = 0; i < kPerRow; ++i) {
    const int64_t r = r0 + ty + kLanes * i;
    if (r >= p.rows) continue;
#pragma unroll
    for (int j = 0; j < kPerCol; ++j) {
      if (c_ok[j]) C[r * p.C_stride_r + c_off[j]] = Elem<T>::store(acc[i][j]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) _mode_product_fwd_kernel(const ModeProductParams p) {
  mode_product_tile<T>(p, static_cast<int64_t>(blockIdx.x));
}

// Block b runs tile b - tile_first[l] of layer l, the last l with tile_first[l] <= b (layers
// without tiles share their tile_first with the next layer and are skipped by "last").
template <typename T>
__global__ void __launch_bounds__(kThreads)
    _mode_product_grouped_fwd_kernel(const ModeProductParams* __restrict__ params,
                                     const int64_t* __restrict__ tile_first, int64_t count) {
  const int64_t b = static_cast<int64_t>(blockIdx.x);
  int64_t lo = 0, hi = count - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (tile_first[mid] <= b) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  const ModeProductParams p = params[lo];
  mode_product_tile<T>(p, b - tile_first[lo]);
}

template <typename T>
cudaError_t mode_product_forward(const ModeProductParams& params, cudaStream_t stream) {
  const int64_t tiles = mode_product_tiles(params);
  if (tiles == 0) return cudaSuccess;
  if (tiles > INT_MAX) return cudaErrorInvalidConfiguration;
  _mode_product_fwd_kernel<T><<<static_cast<unsigned>(tiles), kThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

template <typename T>
cudaError_t mode_product_grouped_forward(const ModeProductParams* params, const int64_t* tile_first,
                                         int64_t count, int64_t total_tiles, cudaStream_t stream) {
  if (count <= 0 || total_tiles <= 0) return cudaSuccess;
  if (total_tiles > INT_MAX) return cudaErrorInvalidConfiguration;
  _mode_product_grouped_fwd_kernel<T>
      <<<static_cast<unsigned>(total_tiles), kThreads, 0, stream>>>(params, tile_first, count);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_mode_product(const ModeProductParams& params, DType dtype,
                                cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return mode_product_forward<float>(params, stream);
    case DType::kFloat64: return mode_product_forward<double>(params, stream);
    case DType::kFloat16: return mode_product_forward<__half>(params, stream);
    case DType::kBFloat16: return mode_product_forward<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_mode_product_grouped(const ModeProductParams* params,
                                        const int64_t* tile_first, int64_t count,
                                        int64_t total_tiles, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return mode_product_grouped_forward<float>(params, tile_first, count, total_tiles, stream);
    case DType::kFloat64:
      return mode_product_grouped_forward<double>(params, tile_first, count, total_tiles, stream);
    case DType::kFloat16:
      return mode_product_grouped_forward<__half>(params, tile_first, count, total_tiles, stream);
    case DType::kBFloat16:
      return mode_product_grouped_forward<__nv_bfloat16>(params, tile_first, count, total_tiles,
                                                         stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace apsfast_cuda
