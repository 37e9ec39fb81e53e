// Parameters and launchers of apsfast's CUDA kernels: plain structs and host helpers, no torch.
//
// Everything is expressed in element strides (int64), so the kernels read transposed and
// otherwise strided views without a copy. The binding (binding.cpp) fills these structs from
// tensors; the kernels live in construct.cu and transition.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace apsfast_cuda {

// Element type of every tensor of one launch. Accumulation is in float for the 16-bit types
// and float32, in double for float64.
enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------
// Mode product (construct.cu)
//
// One GEMM  C[r, n1, n2] = sum_k A[k, r] * B[k, n1, n2],  k < K, r < rows, n1 < N1, n2 < N2,
// where the column index n = n1 * N2 + n2 runs over the flattened (n1, n2) pair.
//   mode 0: out[o, b, s] = sum_a M[a, o] W[a, b, s]   (A = M, B = W,            C = out)
//   mode 1: out[a, i, s] = sum_b M[b, i] W[a, b, s]   (A = M, B = W with its first two
//           modes swapped, C = out with its first two modes swapped)
// make_mode_product() fills the struct for either mode from the 3-D view W [D0, D1, S].
struct ModeProductParams {
  const void* A;  // transform M [K, rows]
  const void* B;  // weight, read as [K, N1, N2]
  void* C;        // output, written as [rows, N1, N2]
  int64_t K, rows, N1, N2;
  int64_t A_stride_k, A_stride_r;
  int64_t B_stride_k, B_stride_n1, B_stride_n2;
  int64_t C_stride_r, C_stride_n1, C_stride_n2;
};

// Output tile of one thread block (rows x columns) and depth of one shared-memory stage.
constexpr int kModeTileRows = 64;
constexpr int kModeTileCols = 64;
constexpr int kModeTileDepth = 16;
constexpr int kModeThreads = 256;

// W [D0, D1, S] with strides W_stride[3]; M [D_mode, N] with strides M_stride[2];
// out [N, D1, S] (mode 0) or [D0, N, S] (mode 1) with strides out_stride[3].
inline ModeProductParams make_mode_product(int mode, const void* W, const int64_t W_size[3],
                                           const int64_t W_stride[3], const void* M,
                                           int64_t M_cols, const int64_t M_stride[2], void* out,
                                           const int64_t out_stride[3]) {
  ModeProductParams p;
  p.A = M;
  p.B = W;
  p.C = out;
  p.rows = M_cols;
  p.N2 = W_size[2];
  p.A_stride_k = M_stride[0];
  p.A_stride_r = M_stride[1];
  p.B_stride_n2 = W_stride[2];
  p.C_stride_n2 = out_stride[2];
  const int contracted = mode == 0 ? 0 : 1, kept = 1 - contracted;
  p.K = W_size[contracted];
  p.N1 = W_size[kept];
  p.B_stride_k = W_stride[contracted];
  p.B_stride_n1 = W_stride[kept];
  p.C_stride_r = out_stride[contracted];
  p.C_stride_n1 = out_stride[kept];
  return p;
}

// Thread blocks of one mode product: row tiles x column tiles (0 for an empty output).
inline int64_t mode_product_tiles(const ModeProductParams& p) {
  if (p.rows <= 0 || p.N1 <= 0 || p.N2 <= 0) return 0;
  return ceil_div(p.rows, kModeTileRows) * ceil_div(p.N1 * p.N2, kModeTileCols);
}

// Exclusive prefix sum of the tiles of `count` mode products: tile_first[count + 1], the
// last entry being the grid size of the grouped launch.
inline std::vector<int64_t> mode_product_tile_offsets(const ModeProductParams* params,
                                                      int64_t count) {
  std::vector<int64_t> first(static_cast<size_t>(count) + 1, 0);
  for (int64_t l = 0; l < count; ++l) first[l + 1] = first[l] + mode_product_tiles(params[l]);
  return first;
}

// One mode product. A, B and C must not overlap.
cudaError_t launch_mode_product(const ModeProductParams& params, DType dtype,
                                cudaStream_t stream);

// Many mode products of one dtype in one launch. `params` [count] and `tile_first`
// [count + 1] (from mode_product_tile_offsets) are device arrays; `total_tiles` is
// tile_first[count] as known on the host.
cudaError_t launch_mode_product_grouped(const ModeProductParams* params,
                                        const int64_t* tile_first, int64_t count,
                                        int64_t total_tiles, DType dtype, cudaStream_t stream);

// ---------------------------------------------------------------------------------------
// Batched transition (transition.cu): paper eq. 4 and 5 on every side of every layer.
//
// A side is one matrix M [C, n] (C = rows, n = cols) holding its candidates' transforms side
// by side as column blocks. Per side, with G = M^T M and blocks M_a:
//   S = 1/2 |G|^2 + 1/2 sum_a |M_a^T M_a|^2
//   dS/dM_a = 2 (M M^T) M_a + 2 M_a (M_a^T M_a)
// and every column steps p <- normalize(p - tau * S_partner * dS/dp) (S_partner = 1 without
// a partner, or for every side when `relative`). Phi = sum over layers of S_P * S_Q (a
// one-sided layer counts its S once).
//
// The Gram is formed on the smaller side:
//   tall side (C >= n): H = G + blockdiag(G_aa) [n, n]; then U = M - 2 tau S_p M H.
//   wide side (C <  n): O = M M^T [C, C] and D_a = M_a^T M_a [c_a, c_a];
//                       then U_a = M_a - 2 tau S_p (O M_a + M_a D_a).
// Kernel order: Grams and partial scores -> scores and Phi -> U (workspace) -> normalised
// columns written back to M. M is only written by the last kernel, so every gradient is
// taken at the old point.

struct TransitionSide {
  void* M;  // [rows, cols], element strides below
  int64_t rows, cols, stride_row, stride_col;
  int64_t partner;                // side index or -1
  int64_t block_first, block_count;  // this side's entries of the block table
  int64_t wide;                   // 1 when rows < cols
  int64_t gram;                   // workspace offset of H [cols, cols] or O [rows, rows], row-major
  int64_t update;                 // workspace offset of U, column-major [cols][rows]
  int64_t partial_first, partial_count;  // score partials of this side (one per Gram tile)
  int64_t tile_first;             // first thread block of the update kernel
  int64_t column_first;           // first thread block of the normalisation kernel
};

struct TransitionBlock {
  int64_t col_begin, col_end;  // columns of this candidate within its side
  int64_t diag;                // workspace offset of D_a [c_a, c_a] (wide sides), else -1
};

// One symmetric product X = A^T A [size, size], A[k, i] = M[base + k*stride_k + i*stride_i],
// k < depth, computed on the upper triangle of tiles and mirrored.
struct GramTask {
  int64_t side;
  int64_t size, depth;
  int64_t base, stride_k, stride_i;
  int64_t out;         // workspace offset of X, row-major
  int64_t tall_gram;   // 1: the side Gram of a tall side (diagonal blocks doubled into H)
  int64_t tile_first;  // first thread block of the Gram kernel
  int64_t partial_first;
};

constexpr int kTransitionTile = 64;
constexpr int kTransitionDepth = 16;
constexpr int kTransitionThreads = 256;
constexpr int kNormalizeThreads = 128;

inline int64_t gram_task_tiles(int64_t size) {
  const int64_t t = ceil_div(size, kTransitionTile);
  return t * (t + 1) / 2;
}

// Everything the launcher needs: built on the host by plan_transition(), its three arrays
// copied to the device by the caller.
struct TransitionPlan {
  std::vector<TransitionSide> sides;
  std::vector<TransitionBlock> blocks;
  std::vector<GramTask> tasks;
  int64_t partial_offset = 0;   // workspace offset of the score partials
  int64_t score_offset = 0;     // workspace offset of the per-side scores
  int64_t workspace = 0;        // workspace size in accumulator elements
  int64_t gram_tiles = 0, update_tiles = 0, columns = 0;
};

struct TransitionArgs {
  const TransitionSide* sides;  // device arrays
  const TransitionBlock* blocks;
  const GramTask* tasks;
  int64_t num_sides, num_tasks;
  void* workspace;  // TransitionPlan::workspace accumulator elements (float, or double)
  void* phi;        // one accumulator element
  double tau;
  bool relative;  // step by tau * dS/dp: no partner factor
  int64_t partial_offset, score_offset;
  int64_t gram_tiles, update_tiles, columns;
};

// `sides` holds, per side, M, rows, cols, strides, partner and block_count; `widths` the
// block widths of all sides one after the other (sum of block_count entries). The caller
// has checked that each side's widths sum to its cols. Fills every other field.
inline TransitionPlan plan_transition(const TransitionSide* sides, int64_t num_sides,
                                      const int64_t* widths) {
  TransitionPlan plan;
  plan.sides.assign(sides, sides + num_sides);
  int64_t ws = 0, gram_tiles = 0, update_tiles = 0, columns = 0;
  // A side's Gram tasks are adjacent, so its score partials form one contiguous range.
  auto add_task = [&](GramTask t) {
    t.tile_first = gram_tiles;
    t.partial_first = gram_tiles;
    gram_tiles += gram_task_tiles(t.size);
    plan.tasks.push_back(t);
  };
  for (int64_t index = 0; index < num_sides; ++index) {
    TransitionSide& s = plan.sides[index];
    s.wide = s.rows < s.cols ? 1 : 0;
    s.block_first = static_cast<int64_t>(plan.blocks.size());
    s.partial_first = gram_tiles;
    int64_t col = 0;
    for (int64_t b = 0; b < s.block_count; ++b) {
      TransitionBlock blk{col, col + widths[s.block_first + b], -1};
      col = blk.col_end;
      if (s.wide) {  // D_a = M_a^T M_a: A[k, i] = M[k, col_begin + i]
        const int64_t c = blk.col_end - blk.col_begin;
        blk.diag = ws;
        ws += c * c;
        GramTask t{};
        t.side = index;
        t.size = c;
        t.depth = s.rows;
        t.base = blk.col_begin * s.stride_col;
        t.stride_k = s.stride_row;
        t.stride_i = s.stride_col;
        t.out = blk.diag;
        t.tall_gram = 0;
        add_task(t);
      }
      plan.blocks.push_back(blk);
    }
    GramTask g{};
    g.side = index;
    g.base = 0;
    if (s.wide) {  // O = M M^T: A[k, i] = M[i, k]
      g.size = s.rows;
      g.depth = s.cols;
      g.stride_k = s.stride_col;
      g.stride_i = s.stride_row;
    } else {  // G = M^T M: A[k, i] = M[k, i]
      g.size = s.cols;
      g.depth = s.rows;
      g.stride_k = s.stride_row;
      g.stride_i = s.stride_col;
    }
    g.tall_gram = s.wide ? 0 : 1;
    g.out = ws;
    s.gram = ws;
    ws += g.size * g.size;
    add_task(g);
    s.partial_count = gram_tiles - s.partial_first;
    s.tile_first = update_tiles;
    update_tiles += ceil_div(s.rows, kTransitionTile) * ceil_div(s.cols, kTransitionTile);
    s.column_first = columns;
    columns += s.cols;
  }
  for (auto& s : plan.sides) {
    s.update = ws;
    ws += s.rows * s.cols;
  }
  plan.partial_offset = ws;
  ws += gram_tiles;
  plan.score_offset = ws;
  ws += num_sides;
  plan.workspace = ws;
  plan.gram_tiles = gram_tiles;
  plan.update_tiles = update_tiles;
  plan.columns = columns;
  return plan;
}

// The four kernels of one transition step; all sides share `dtype`.
cudaError_t launch_transition(const TransitionArgs& args, DType dtype, cudaStream_t stream);

}  // namespace apsfast_cuda
