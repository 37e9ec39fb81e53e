"""The CUDA backend (csrc/cuda): compile-checked on every machine, run on a GPU.

* Every ``csrc/cuda/*.cu`` compiles with ``nvcc -c`` for sm_80 and sm_90. The CUDA files
  include no torch, ATen or c10 header (only ``binding.cpp`` does), which is what lets them
  compile on a machine whose torch has no CUDA.
* The host-side plans of ``aps_kernels.h`` (grids, tile offsets, workspace layout) are
  compiled and run on the CPU.
* ``gpu`` tests compare the ``apsfast_cuda`` ops with :mod:`apsfast.reference`, on odd shapes,
  strided inputs and float32 / float64 / bfloat16 (float16 for the construction).
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import pytest
import torch

import apsfast
from apsfast import _backends
from apsfast import reference as ref
from conftest import assert_close

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
ARCHS = ("80", "90")


def find_nvcc() -> Optional[str]:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(home, "bin", "nvcc") if home else None
    return str(candidate) if candidate is not None and candidate.is_file() else None


NVCC = find_nvcc()
# torch's CUDAExtension compiles with these: the kernels must convert 16-bit types explicitly.
TORCH_NVCC_DEFINES = ("-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found")

# ---------------------------------------------------------------------------------------------
# Compilation (no GPU needed)

HOST_CHECK = r"""
// Host-side plans of aps_kernels.h, checked on the CPU. The segment search and the
// upper-triangle walk below are the device code's, transcribed.
#include "aps_kernels.h"

#include <algorithm>
#include <cstdio>
#include <utility>
#include <vector>

using namespace apsfast_cuda;

#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "line %d: check failed: %s\n", __LINE__, #cond);     \
      return 1;                                                                  \
    }                                                                            \
  } while (0)

template <typename First>
int64_t last_le(int64_t count, First first, int64_t x) {
  int64_t lo = 0, hi = count - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (first(mid) <= x) lo = mid; else hi = mid - 1;
  }
  return lo;
}

int main() {
  // Mode products of W [5, 7, 3] (contiguous).
  const int64_t size[3] = {5, 7, 3}, stride[3] = {21, 3, 1}, m_stride[2] = {4, 1};
  const int64_t out0[3] = {21, 3, 1}, out1[3] = {12, 3, 1};
  const ModeProductParams p0 =
      make_mode_product(0, nullptr, size, stride, nullptr, 4, m_stride, nullptr, out0);
  CHECK(p0.K == 5 && p0.rows == 4 && p0.N1 == 7 && p0.N2 == 3);
  CHECK(p0.A_stride_k == 4 && p0.A_stride_r == 1);
  CHECK(p0.B_stride_k == 21 && p0.B_stride_n1 == 3 && p0.B_stride_n2 == 1);
  CHECK(p0.C_stride_r == 21 && p0.C_stride_n1 == 3 && p0.C_stride_n2 == 1);
  const ModeProductParams p1 =
      make_mode_product(1, nullptr, size, stride, nullptr, 4, m_stride, nullptr, out1);
  CHECK(p1.K == 7 && p1.rows == 4 && p1.N1 == 5 && p1.N2 == 3);
  CHECK(p1.B_stride_k == 3 && p1.B_stride_n1 == 21 && p1.B_stride_n2 == 1);
  CHECK(p1.C_stride_r == 3 && p1.C_stride_n1 == 12 && p1.C_stride_n2 == 1);
  CHECK(mode_product_tiles(p0) == 1);

  // Grouped grid: an empty layer in the middle is skipped by the block -> layer search.
  ModeProductParams layers[3] = {p0, p0, p0};
  layers[1].rows = 0;
  layers[2].rows = 130;  // 3 row tiles
  layers[2].N1 = 40;
  layers[2].N2 = 5;      // 200 columns: 4 column tiles
  const std::vector<int64_t> first = mode_product_tile_offsets(layers, 3);
  CHECK(first.size() == 4 && first[0] == 0 && first[1] == 1 && first[2] == 1 && first[3] == 13);
  for (int64_t b = 0; b < first[3]; ++b) {
    const int64_t l = last_le(3, [&](int64_t i) { return first[i]; }, b);
    CHECK(first[l] <= b && b < first[l + 1]);
  }

  // Transition plan: tall, wide (with an empty block), row-less, one-column and square sides.
  const int64_t rows[] = {130, 20, 0, 9, 66, 64};
  const int64_t counts[] = {2, 4, 1, 1, 1, 2};
  const int64_t widths[] = {30, 50, 10, 0, 40, 50, 3, 1, 66, 60, 4};
  const int64_t partner[] = {1, 0, -1, 4, 3, -1};
  const int64_t num_sides = 6;
  std::vector<TransitionSide> in(num_sides);
  int64_t w = 0;
  for (int64_t s = 0; s < num_sides; ++s) {
    int64_t cols = 0;
    for (int64_t b = 0; b < counts[s]; ++b) cols += widths[w + b];
    w += counts[s];
    in[s] = TransitionSide{};
    in[s].rows = rows[s];
    in[s].cols = cols;
    in[s].stride_row = cols;
    in[s].stride_col = 1;
    in[s].partner = partner[s];
    in[s].block_count = counts[s];
  }
  const TransitionPlan plan = plan_transition(in.data(), num_sides, widths);
  CHECK(plan.sides.size() == 6 && plan.blocks.size() == 11);
  CHECK(plan.sides[0].wide == 0 && plan.sides[1].wide == 1 && plan.sides[2].wide == 1);
  CHECK(plan.sides[4].wide == 0 && plan.sides[5].wide == 0);

  // Workspace regions: inside [0, partial_offset), pairwise disjoint.
  std::vector<std::pair<int64_t, int64_t>> regions;
  for (const auto& s : plan.sides) {
    const int64_t g = s.wide ? s.rows : s.cols;
    regions.push_back({s.gram, s.gram + g * g});
    regions.push_back({s.update, s.update + s.rows * s.cols});
    for (int64_t b = 0; b < s.block_count; ++b) {
      const TransitionBlock& blk = plan.blocks[s.block_first + b];
      const int64_t c = blk.col_end - blk.col_begin;
      if (s.wide) {
        CHECK(blk.diag >= 0);
        regions.push_back({blk.diag, blk.diag + c * c});
      } else {
        CHECK(blk.diag == -1);
      }
    }
  }
  std::sort(regions.begin(), regions.end());
  for (size_t i = 0; i < regions.size(); ++i) {
    CHECK(regions[i].first >= 0 && regions[i].second <= plan.partial_offset);
    if (i > 0) CHECK(regions[i - 1].second <= regions[i].first);
  }
  CHECK(plan.score_offset == plan.partial_offset + plan.gram_tiles);
  CHECK(plan.workspace == plan.score_offset + num_sides);

  // Blocks tile each side's columns in order.
  for (const auto& s : plan.sides) {
    int64_t col = 0;
    for (int64_t b = 0; b < s.block_count; ++b) {
      CHECK(plan.blocks[s.block_first + b].col_begin == col);
      col = plan.blocks[s.block_first + b].col_end;
    }
    CHECK(col == s.cols);
    // The device's column -> block search lands in the block holding the column.
    for (int64_t j = 0; j < s.cols; ++j) {
      const int64_t b = s.block_first + last_le(s.block_count, [&](int64_t i) {
        return plan.blocks[s.block_first + i].col_begin; }, j);
      CHECK(plan.blocks[b].col_begin <= j && j < plan.blocks[b].col_end);
    }
  }

  // Gram tasks: tiles and partials are prefix sums in task order; a side's tasks are adjacent
  // and its partial range is exactly theirs.
  int64_t tiles = 0;
  std::vector<int64_t> side_partials(num_sides, 0);
  for (size_t t = 0; t < plan.tasks.size(); ++t) {
    const GramTask& task = plan.tasks[t];
    CHECK(task.tile_first == tiles && task.partial_first == tiles);
    const TransitionSide& s = plan.sides[task.side];
    CHECK(s.partial_first <= task.partial_first);
    CHECK(task.partial_first + gram_task_tiles(task.size) <= s.partial_first + s.partial_count);
    side_partials[task.side] += gram_task_tiles(task.size);
    tiles += gram_task_tiles(task.size);
    if (t > 0) CHECK(plan.tasks[t - 1].side <= task.side);
    // The upper-triangle walk visits each (ti <= tj) tile once.
    const int64_t nt = ceil_div(task.size, kTransitionTile);
    std::vector<int> seen(static_cast<size_t>(nt * nt), 0);
    for (int64_t local = 0; local < gram_task_tiles(task.size); ++local) {
      int64_t ti = 0, rem = local;
      while (rem >= nt - ti) { rem -= nt - ti; ++ti; }
      const int64_t tj = ti + rem;
      CHECK(ti <= tj && tj < nt);
      CHECK(seen[ti * nt + tj]++ == 0);
    }
  }
  CHECK(tiles == plan.gram_tiles);
  for (int64_t s = 0; s < num_sides; ++s) CHECK(side_partials[s] == plan.sides[s].partial_count);
  for (int64_t b = 0; b < plan.gram_tiles; ++b) {
    const int64_t t = last_le(static_cast<int64_t>(plan.tasks.size()),
                              [&](int64_t i) { return plan.tasks[i].tile_first; }, b);
    const GramTask& task = plan.tasks[t];
    CHECK(task.tile_first <= b && b < task.tile_first + gram_task_tiles(task.size));
  }
  // Update tiles and normalisation columns: every block finds the side that owns it.
  for (int64_t b = 0; b < plan.update_tiles; ++b) {
    const int64_t s = last_le(num_sides, [&](int64_t i) { return plan.sides[i].tile_first; }, b);
    const TransitionSide& side = plan.sides[s];
    CHECK(b - side.tile_first < ceil_div(side.rows, kTransitionTile) * ceil_div(side.cols, kTransitionTile));
  }
  for (int64_t b = 0; b < plan.columns; ++b) {
    const int64_t s = last_le(num_sides, [&](int64_t i) { return plan.sides[i].column_first; }, b);
    CHECK(b - plan.sides[s].column_first < plan.sides[s].cols);
  }
  CHECK(plan.columns == 80 + 100 + 3 + 1 + 66 + 64);
  std::printf("ok\n");
  return 0;
}
"""


@pytest.fixture(scope="module")
def nvcc_results(tmp_path_factory):
    """Every compile of this module, run in parallel once: (name, arch) -> CompletedProcess."""
    out = tmp_path_factory.mktemp("nvcc")
    (out / "host_check.cpp").write_text(HOST_CHECK)
    jobs = {}
    for name in CU_FILES:
        for arch in ARCHS:
            jobs[(name, arch)] = [NVCC, "-c", "-std=c++17", "-O2", "-gencode",
                                  f"arch=compute_{arch},code=sm_{arch}", *TORCH_NVCC_DEFINES,
                                  "-Xcompiler", "-Wall", str(CUDA_DIR / name),
                                  "-o", str(out / f"{Path(name).stem}_sm{arch}.o")]
    jobs[("host_check", "host")] = [NVCC, "-std=c++17", "-O1", "-I", str(CUDA_DIR),
                                    str(out / "host_check.cpp"), "-o", str(out / "host_check")]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        futures = {key: pool.submit(subprocess.run, cmd, capture_output=True, text=True, timeout=900)
                   for key, cmd in jobs.items()}
        results = {key: future.result() for key, future in futures.items()}
    results["host_check_binary"] = out / "host_check"
    return results


def test_cuda_sources_exist():
    assert {"construct.cu", "transition.cu"} <= set(CU_FILES)
    assert (CUDA_DIR / "aps_kernels.h").is_file() and (CUDA_DIR / "binding.cpp").is_file()


@needs_nvcc
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("source", CU_FILES)
def test_cu_compiles(nvcc_results, source, arch):
    result = nvcc_results[(source, arch)]
    assert result.returncode == 0, f"nvcc failed on {source} for sm_{arch}:\n{result.stderr}"
    # Warnings in our sources (not the toolchain's own notices) count as failures too.
    ours = [line for line in result.stderr.splitlines()
            if "warning" in line.lower() and ("csrc/cuda" in line or "aps_kernels.h" in line)]
    assert not ours, f"nvcc warns on {source} for sm_{arch}:\n{result.stderr}"


@needs_nvcc
def test_host_plans_run_on_cpu(nvcc_results):
    build = nvcc_results[("host_check", "host")]
    assert build.returncode == 0, f"the host check did not compile:\n{build.stderr}"
    run = subprocess.run([str(nvcc_results["host_check_binary"])], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr


INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.M)
FORBIDDEN = ("torch/", "ATen/", "c10/", "caffe2/")


@pytest.mark.parametrize("source", sorted(p.name for p in CUDA_DIR.iterdir()
                                          if p.suffix in (".cu", ".cuh", ".h")))
def test_cuda_sources_include_no_torch(source):
    includes = INCLUDE.findall((CUDA_DIR / source).read_text())
    bad = [inc for inc in includes if inc.startswith(FORBIDDEN) or inc in ("torch.h", "Python.h")]
    assert not bad, f"{source} includes {bad}; CUDA files must compile without torch's headers"


def test_every_backend_library_declares_the_shared_schemas():
    # One op surface: each compiled library defines its ops from csrc/op_schemas.h, whose ops
    # are exactly the public torch ops that dispatch to them.
    import apsfast.ops  # noqa: F401  (registers torch.ops.apsfast.*)
    for library in (ROOT / "csrc" / "cpu" / "module.cpp", CUDA_DIR / "binding.cpp"):
        assert "apsfast::define_ops(m)" in library.read_text(), library
    names = re.findall(r'm\.def\(\s*"(\w+)\(', (ROOT / "csrc" / "op_schemas.h").read_text())
    assert sorted(names) == ["construct", "construct_backward", "construct_grouped", "transition_step_all"]
    for name in names:
        assert hasattr(torch.ops.apsfast, name)
    assert "PyInit__cuda" in (CUDA_DIR / "binding.cpp").read_text()


# ---------------------------------------------------------------------------------------------
# GPU: the apsfast_cuda ops against the reference


@pytest.fixture
def cuda():
    """The CUDA adapter and the device its tensors live on."""
    from apsfast._backends import cuda as module
    return module, torch.device("cuda")


def randn(*shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# Realistic magnitudes keep float32 within its tolerance as long reductions grow: transforms
# have unit columns (as the transition keeps them), weights a 1/sqrt(fan_in) scale.
def transform(rows: int, cols: int, seed: int, dtype) -> torch.Tensor:
    M = randn(rows, cols, seed=seed)
    return (M / M.norm(dim=0, keepdim=True).clamp_min(1e-12)).to(dtype)


def meta_weight(C_out: int, C_in: int, kernel: tuple, seed: int, dtype) -> torch.Tensor:
    fan_in = C_in * math.prod(kernel)
    return (randn(C_out, C_in, *kernel, seed=seed) / math.sqrt(fan_in)).to(dtype)


def exact(*tensors):
    """float64 CPU copies (of already-rounded inputs, so input rounding is not counted as error)."""
    return [None if t is None else t.detach().cpu().double() for t in tensors]


def assert_matches(actual: torch.Tensor, expected64: torch.Tensor,
                   same_precision: Optional[torch.Tensor] = None):
    """``actual`` against the float64 reference: per-dtype tolerance, or for 16-bit types at
    most twice the error of the same computation done by PyTorch in that precision."""
    actual = actual.detach().cpu()
    assert actual.shape == expected64.shape
    if actual.dtype in (torch.float16, torch.bfloat16):
        err_torch = (same_precision.double() - expected64).abs().max().item() if expected64.numel() else 0.0
        err = (actual.double() - expected64).abs().max().item() if expected64.numel() else 0.0
        assert err <= 2 * err_torch + 1e-6, f"error {err} vs PyTorch's own {err_torch}"
    else:
        assert_close(actual, expected64, actual.dtype)


# (C_out, C_in, kernel, c_o, c_i): odd sizes, sizes over one 64-wide tile, a linear layer, a
# depthwise conv (no Q).
SHAPES = {
    "3x3": (8, 6, (3, 3), 5, 4),
    "odd": (7, 5, (3, 1), 3, 5),
    "1x1_multi_tile": (72, 130, (1, 1), 65, 17),
    "5x5_multi_tile": (33, 70, (5, 5), 31, 66),
    "linear": (6, 10, (), 4, 7),
    "depthwise": (9, 1, (3, 3), 5, None),
}
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def make(shape_id: str, dtype, layout: str = "contiguous", seed: int = 0):
    """weight, P, Q on the CPU in ``dtype``, laid out as ``layout``:

    * ``contiguous``;
    * ``transposed``: P and Q stored transposed (column-major), read through strides;
    * ``strided``: weight every other input channel of a wider tensor; ``channels_last``.
    """
    C_out, C_in, kernel, c_o, c_i = SHAPES[shape_id]
    if layout == "strided":
        weight = meta_weight(C_out, 2 * C_in, kernel, seed, dtype)[:, ::2]
    else:
        weight = meta_weight(C_out, C_in, kernel, seed, dtype)
    if layout == "channels_last" and weight.dim() == 4:
        weight = weight.contiguous(memory_format=torch.channels_last)
    P = transform(C_out, c_o, seed + 1, dtype)
    Q = transform(C_in, c_i, seed + 2, dtype) if c_i else None
    if layout == "transposed":
        P = P.t().contiguous().t()
        Q = None if Q is None else Q.t().contiguous().t()
    return weight, P, Q


def to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def test_cuda_adapter_imports_no_reference():
    # Backends never import the reference (checked without loading the extension).
    source = (ROOT / "apsfast" / "_backends" / "cuda.py").read_text()
    assert "apsfast.reference" not in source and "load_extension(\"_cuda\")" in source


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided", "channels_last"])
@pytest.mark.parametrize("sides", ["PQ", "P", "Q", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape_id", SHAPES)
def test_gpu_construct(cuda, shape_id, dtype, sides, layout):
    ops, device = cuda
    weight, P, Q = make(shape_id, dtype, layout)
    P = P if "P" in sides else None
    Q = Q if "Q" in sides else None
    out = ops.construct(*to(device, weight, P, Q))
    assert out.device.type == device.type and out.dtype == dtype and out.is_contiguous()
    assert_matches(out, ref.construct(*exact(weight, P, Q)), ref.construct(weight, P, Q))


@pytest.mark.gpu
@pytest.mark.parametrize("need", ["W", "P", "Q", "WPQ"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape_id", ["3x3", "odd", "1x1_multi_tile", "5x5_multi_tile", "linear"])
def test_gpu_construct_backward(cuda, monkeypatch, shape_id, dtype, layout, need):
    ops, device = cuda
    # dP and dQ are cuBLAS GEMMs: compare them at full-precision reductions.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    weight, P, Q = make(shape_id, dtype, layout)
    grad = randn(*ref.construct(weight, P, Q).shape, seed=7, dtype=dtype)
    flags = ("W" in need, "P" in need, "Q" in need)
    ours = ops.construct_backward(*to(device, grad, weight, P, Q), *flags)
    expected = ref.construct_backward(*exact(grad, weight, P, Q), *flags)
    same_precision = ref.construct_backward(grad, weight, P, Q, *flags)
    assert len(ours) == len(expected) == sum(flags)
    for a, e, s in zip(ours, expected, same_precision):
        assert a.is_contiguous() and a.dtype == dtype
        assert_matches(a, e, s)


@pytest.mark.gpu
def test_gpu_construct_backward_without_transforms(cuda):
    ops, device = cuda
    weight, _, _ = make("odd", torch.float64)
    grad = randn(*weight.shape, seed=3)
    (dW,) = ops.construct_backward(*to(device, grad, weight), None, None, True, False, False)
    assert_close(dW.cpu(), grad)


def grouped_layers(dtype, seed=0):
    """Heterogeneous layers: both transforms, P only, Q only, none, a transposed transform and
    a layer over several tiles."""
    specs = [(8, 6, (3, 3), 5, 4), (7, 1, (3, 3), 3, None), (12, 9, (1, 1), None, 2),
             (5, 5, (), 2, 3), (9, 4, (1, 3), 9, 4), (11, 3, (3, 3), None, None),
             (70, 130, (1, 1), 66, 17)]
    weights, Ps, Qs = [], [], []
    for l, (C_out, C_in, kernel, c_o, c_i) in enumerate(specs):
        weights.append(meta_weight(C_out, C_in, kernel, seed + 3 * l, dtype))
        Ps.append(None if c_o is None else transform(C_out, c_o, seed + 3 * l + 1, dtype))
        Qs.append(None if c_i is None else transform(C_in, c_i, seed + 3 * l + 2, dtype))
    Ps[4] = Ps[4].t().contiguous().t()
    return weights, Ps, Qs


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_gpu_construct_grouped(cuda, dtype):
    ops, device = cuda
    weights, Ps, Qs = grouped_layers(dtype)
    outs = ops.construct_grouped(to(device, *weights), to(device, *Ps), to(device, *Qs))
    assert len(outs) == len(weights)
    for out, w, P, Q in zip(outs, weights, Ps, Qs):
        assert out.dtype == dtype and out.is_contiguous()
        assert_matches(out, ref.construct(*exact(w, P, Q)), ref.construct(w, P, Q))


@pytest.mark.gpu
def test_gpu_construct_grouped_edge_cases(cuda):
    ops, device = cuda
    # Only copies: no launch at all.
    weights, _, _ = grouped_layers(torch.float32)
    inputs = to(device, *weights[:2])
    outs = ops.construct_grouped(inputs, [None, None], [None, None])
    for out, w, x in zip(outs, weights[:2], inputs):
        assert out.data_ptr() != x.data_ptr()
        assert_close(out.cpu(), w)
    # An empty candidate (c_o = 0) beside a real layer: an empty kernel, the other one intact.
    w, P, Q = make("3x3", torch.float64)
    outs = ops.construct_grouped(to(device, w, w), to(device, P[:, :0], P), to(device, Q, Q))
    assert outs[0].shape == (0, Q.shape[1], 3, 3)
    assert_close(outs[1].cpu(), ref.construct(w, P, Q))


# Sides of the transition: (rows, block widths, partner). Tall sides (rows >= cols) use the
# [cols, cols] Gram, wide ones M M^T and the per-block D_a; several span more than one tile.
SIDES = [
    (130, (30, 50), 1),        # tall, 2 x 2 Gram tiles
    (100, (20, 45, 70), 0),    # wide: O over 2 x 2 tiles, D blocks across tile borders
    (9, (2, 3, 4), -1),        # a one-sided layer, wide
    (12, (3, 5), 4),           # tall
    (7, (1, 4, 6), 3),         # wide
    (66, (66,), -1),           # square: tall by the rows >= cols rule, one block
]


def transition_inputs(dtype, layout: str, seed: int = 0):
    """Unit-column sides in ``dtype`` on the CPU, and the flat widths / counts / partner.

    ``layout``: ``contiguous``, ``column_major`` or ``view`` (each side a column slice of a
    larger NaN-filled tensor, so a stray read shows up as NaN and a stray write in the rest).
    """
    Ms, widths, counts, partner, bases = [], [], [], [], []
    for s, (rows, ws, p) in enumerate(SIDES):
        M = transform(rows, sum(ws), seed + s, dtype)
        if layout == "column_major":
            M = M.t().contiguous().t()
        elif layout == "view":
            base = torch.full((rows + 3, sum(ws) + 5), float("nan"), dtype=dtype)
            base[1:rows + 1, 2:sum(ws) + 2] = M
            M = base[1:rows + 1, 2:sum(ws) + 2]
            bases.append(base)
        Ms.append(M)
        widths.extend(ws)
        counts.append(len(ws))
        partner.append(p)
    return Ms, widths, counts, partner, bases


@pytest.mark.gpu
@pytest.mark.parametrize("tau, relative", [(1e-5, False), (1e-2, False), (1e-2, True)],
                         ids=["small", "large", "relative"])
@pytest.mark.parametrize("layout", ["contiguous", "column_major", "view"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_gpu_transition_step_all(cuda, dtype, layout, tau, relative):
    ops, device = cuda
    Ms, widths, counts, partner, bases = transition_inputs(dtype, layout)
    # Copies (M.double() of a float64 tensor would be M itself, stepped by the reference).
    expected = [M.clone() if dtype == torch.bfloat16 else M.double().clone() for M in Ms]
    phi_expected = ref.transition_step_all(expected, widths, counts, partner, tau, relative)
    if bases:
        device_bases = [b.clone().to(device) for b in bases]
        mine = [db[1:M.shape[0] + 1, 2:M.shape[1] + 2] for db, M in zip(device_bases, Ms)]
    else:
        mine = [M.clone().to(device) for M in Ms]
    phi = ops.transition_step_all(mine, widths, counts, partner, tau, relative)
    assert phi.dim() == 0 and phi.device.type == device.type
    assert phi.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(phi.cpu(), phi_expected.to(phi.dtype), phi.dtype)
    for M, E in zip(mine, expected):
        assert M.dtype == dtype
        assert_close(M.cpu(), E, dtype)
        assert_close(M.cpu().double().norm(dim=0), torch.ones(M.shape[1], dtype=torch.float64), dtype)
    for db in (device_bases if bases else ()):
        # Untouched outside the views: still NaN around every side.
        outside = torch.ones(db.shape, dtype=torch.bool)
        outside[1:-2, 2:-3] = False
        assert db.cpu()[outside].isnan().all()


@pytest.mark.gpu
def test_gpu_transition_step_all_is_repeatable(cuda):
    # Scores are summed in a fixed order, so two runs from one point agree bit for bit.
    ops, device = cuda
    Ms, widths, counts, partner, _ = transition_inputs(torch.float32, "contiguous")
    first = [M.clone().to(device) for M in Ms]
    second = [M.clone().to(device) for M in Ms]
    phi1 = ops.transition_step_all(first, widths, counts, partner, 1e-3)
    phi2 = ops.transition_step_all(second, widths, counts, partner, 1e-3)
    assert torch.equal(phi1, phi2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_errors_name_the_argument(cuda):
    ops, device = cuda
    weight, P, Q = to(device, *make("3x3", torch.float32))
    with pytest.raises(RuntimeError, match=r"P\.shape\[0\] must be weight\.shape\[0\] = 8, got 6"):
        ops.construct(weight, Q, None)
    with pytest.raises(RuntimeError, match=r"Q has dtype Double, expected Float"):
        ops.construct(weight, P, Q.double())
    with pytest.raises(RuntimeError, match=r"Qs\[1\]\.shape\[0\] must be weight\.shape\[1\]"):
        ops.construct_grouped([weight, weight], [P, P], [Q, P])
    with pytest.raises(RuntimeError, match=r"grad must have the candidate kernel's shape"):
        ops.construct_backward(weight, weight, P, Q, True, False, False)
    Ms = [torch.ones(4, 5, device=device)]
    with pytest.raises(RuntimeError,
                       match=r"the widths of side 0 must sum to Ms\[0\]\.shape\[1\] = 5, got 4"):
        ops.transition_step_all(Ms, [1, 3], [2], [-1], 1e-3)
    with pytest.raises(RuntimeError, match=r"partner\[0\] must be -1 or another side's index"):
        ops.transition_step_all(Ms, [5], [1], [0], 1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gpu_public_api_forced_cuda(cuda, monkeypatch, dtype):
    # The public functions, autograd included, through APSFAST_BACKEND=cuda.
    monkeypatch.setenv(_backends.ENV_VAR, "cuda")
    _, device = cuda
    weight, P, Q = make("5x5_multi_tile", dtype)
    leaf = weight.to(device).requires_grad_()
    Pc = P.to(device).requires_grad_()
    out = apsfast.construct(leaf, Pc, Q.to(device))
    grad = randn(*out.shape, seed=5, dtype=dtype)
    out.backward(grad.to(device))
    w64, P64, Q64 = (t.clone().requires_grad_() for t in exact(weight, P, Q))
    ref.construct(w64, P64, Q64).backward(grad.double())
    assert_close(out.detach().cpu(), ref.construct(*exact(weight, P, Q)), dtype)
    assert_close(leaf.grad.cpu(), w64.grad, dtype)
    assert_close(Pc.grad.cpu(), P64.grad, dtype)

    # The public API refuses the empty candidate of the last layer.
    weights, Ps, Qs = (layers[:-1] for layers in grouped_layers(dtype))
    kernels = apsfast.construct_grouped(to(device, *weights), to(device, *Ps), to(device, *Qs))
    for k, w, P_, Q_ in zip(kernels, weights, Ps, Qs):
        assert_close(k.cpu(), ref.construct(*exact(w, P_, Q_)), dtype)

    Ms, _, _, _, _ = transition_inputs(dtype, "contiguous")
    split = [list(M.split(list(SIDES[s][1]), dim=1)) for s, M in enumerate(Ms)]
    layers = [(split[0], split[1]), (split[2], None), (None, split[5])]
    def copy(side, make):
        return None if side is None else [make(M) for M in side]
    expected = [tuple(copy(side, lambda M: M.double().clone()) for side in pair) for pair in layers]
    mine = [tuple(copy(side, lambda M: M.clone().to(device)) for side in pair) for pair in layers]
    phi = apsfast.transition_step_all(mine, 1e-3)
    phi_expected = sum(ref.transition_step(Ps_, Qs_, 1e-3) for Ps_, Qs_ in expected)
    assert_close(phi.cpu(), phi_expected.to(phi.dtype), dtype)
    for pair, pair_expected in zip(mine, expected):
        for side, side_expected in zip(pair, pair_expected):
            for M, E in zip(side or (), side_expected or ()):
                assert_close(M.cpu(), E, dtype)


# ---------------------------------------------------------------------------------------------
# GPU: whole supernets through each GPU backend against the reference on the same device

def supernet_grads(name: str, backend: str, dtype, amp: bool, monkeypatch, device: str = "cuda"):
    """Loss and gradients of one forward/backward of a small supernet, transforms dense (a
    transition step off the ordinal start), on ``device`` with ``backend`` forced."""
    from apsfast import models
    from apsfast.nn.network import network_transition_step

    monkeypatch.setenv(_backends.ENV_VAR, "reference")
    torch.manual_seed(0)
    options = {"resnet20_cifar": dict(widths=[5, 8, 12], input_size=16),
               "mobilenetv2_imagenet": dict(widths=[4, 6, 8], input_size=32)}[name]
    net = models.build(name, num_classes=7, **options).to(device=device, dtype=dtype)
    network_transition_step(net, 1e-2, relative=True)
    net.set_arch(net.sample_uniform(torch.Generator().manual_seed(3)))
    x = randn(6, 3, options["input_size"], options["input_size"], seed=11, dtype=dtype).to(device)
    y = torch.arange(6, device=device) % 7
    monkeypatch.setenv(_backends.ENV_VAR, backend)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
        loss = torch.nn.functional.cross_entropy(net(x).float(), y)
    loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in net.named_parameters() if p.grad is not None}
    return loss.detach().cpu(), grads


def assert_net_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """float64 through a whole network: rounding of sums taken in another order, at the
    scale of the tensor (a gradient element can be a near-cancelling sum)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10 * max(scale, 1.0))


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", ["resnet20_cifar", "mobilenetv2_imagenet"])
def test_gpu_supernet_matches_reference(backend, name, monkeypatch):
    # float64: the backends' kernels against the reference's einsums, through the layers'
    # autograd, on every layer kind of both search spaces.
    loss, grads = supernet_grads(name, backend, torch.float64, False, monkeypatch)
    loss_ref, grads_ref = supernet_grads(name, "reference", torch.float64, False, monkeypatch)
    assert_net_close(loss, loss_ref)
    assert grads.keys() == grads_ref.keys() and grads
    for key in grads:
        assert_net_close(grads[key], grads_ref[key])


def test_supernet_helper_on_cpu(monkeypatch):
    # The helper the GPU comparisons rest on, run here with the C++ backend: what it compares
    # is non-trivial (every layer's parameters get a gradient) and equal across backends.
    if "cpu" not in apsfast.backends():
        pytest.skip("the C++ backend is not built")
    loss, grads = supernet_grads("mobilenetv2_imagenet", "cpu", torch.float64, False, monkeypatch, "cpu")
    loss_ref, grads_ref = supernet_grads("mobilenetv2_imagenet", "reference", torch.float64, False, monkeypatch, "cpu")
    assert_net_close(loss, loss_ref)
    assert grads.keys() == grads_ref.keys() and len(grads) > 20
    for key in grads:
        assert_net_close(grads[key], grads_ref[key])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_supernet_under_bf16_autocast(backend, monkeypatch):
    # fp32 master weights, bf16 compute: close to the reference under the same autocast.
    loss, grads = supernet_grads("resnet20_cifar", backend, torch.float32, True, monkeypatch)
    loss_ref, grads_ref = supernet_grads("resnet20_cifar", "reference", torch.float32, True, monkeypatch)
    torch.testing.assert_close(loss, loss_ref, rtol=3e-2, atol=3e-2)
    for key in grads:
        assert grads[key].dtype == torch.float32 and grads[key].isfinite().all()
        scale = grads_ref[key].abs().max().clamp_min(1e-3)
        assert (grads[key] - grads_ref[key]).abs().max() <= 0.1 * scale, key
