"""The compiled sources, checked on every machine (their ops run in the per-op test files).

* Every ``csrc/cuda/*.cu`` compiles with ``nvcc -c`` for sm_80 and sm_90. The CUDA files
  include no torch, ATen or c10 header (only ``binding.cpp`` does), which is what lets them
  compile on a machine whose torch has no CUDA.
* ``binding.cpp`` compiles (syntax and types) against the installed torch's headers and the
  CUDA toolkit's, even where torch was built without CUDA.
* The host-side plans of ``aps_kernels.h`` (grids, tile offsets, workspace layout) are
  compiled and run on the CPU, and so is the C++ order rule of ``csrc/common/order.h``
  against its Python twin.
* Both libraries share one schema header, one argument-check header and one order rule.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import pytest
import torch

from apsfast import _order

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
COMMON_DIR = ROOT / "csrc" / "common"
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
CXX = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
needs_cxx = pytest.mark.skipif(CXX is None or NVCC is None, reason="a host C++ compiler and nvcc are needed")

# Shapes on both sides of the order rule's tie, and each order's cheaper side.
ORDER_CASES = [(8, 5, 6, 4), (16, 3, 4, 4), (72, 65, 130, 17), (16, 16, 16, 16), (1, 1, 1, 1), (4, 3, 16, 11),
               (208, 96, 208, 16), (3, 1, 40, 40), (208, 16, 208, 16), (16, 208, 16, 208)]
ORDER_CHECK = "#include <cstdio>\n#include \"order.h\"\nint main() {\n" + "".join(
    f'  std::printf("%d\\n", apsfast::p_first({a}, {b}, {c}, {d}) ? 1 : 0);\n' for a, b, c, d in ORDER_CASES) + "}\n"


def binding_command(out: Path) -> Optional[list[str]]:
    """A syntax-and-types compile of binding.cpp against torch's headers and the CUDA toolkit's
    (None without the toolkit's headers).

    A torch built without CUDA ships the c10/cuda headers but not the generated
    ``cuda_cmake_macros.h`` they include, so a stub of it goes first on the include path.
    """
    from torch.utils.cpp_extension import include_paths
    stub = out / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), Path(NVCC).resolve().parents[1],
             "/usr/local/cuda"]
    cuda_include = next((Path(h, "include") for h in homes if h and Path(h, "include", "cuda_runtime.h").is_file()),
                        None)
    if cuda_include is None:
        return None
    system = [out / "stub", *include_paths(), sysconfig.get_paths()["include"], cuda_include]
    return [CXX, "-fsyntax-only", "-std=c++17", "-Wall", *(f"-isystem{p}" for p in system),
            str(CUDA_DIR / "binding.cpp")]

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
    if CXX is not None:
        (out / "order_check.cpp").write_text(ORDER_CHECK)
        jobs[("order_check", "host")] = [CXX, "-std=c++17", "-I", str(COMMON_DIR), str(out / "order_check.cpp"),
                                         "-o", str(out / "order_check")]
        if binding_command(out) is not None:
            jobs[("binding", "host")] = binding_command(out)
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        futures = {key: pool.submit(subprocess.run, cmd, capture_output=True, text=True, timeout=900)
                   for key, cmd in jobs.items()}
        results = {key: future.result() for key, future in futures.items()}
    results["host_check_binary"] = out / "host_check"
    results["order_check_binary"] = out / "order_check"
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


@needs_cxx
def test_binding_compiles(nvcc_results):
    if ("binding", "host") not in nvcc_results:
        pytest.skip("the CUDA toolkit's headers were not found")
    result = nvcc_results[("binding", "host")]
    assert result.returncode == 0 and not result.stderr.strip(), f"binding.cpp:\n{result.stderr}"


@needs_cxx
def test_cpp_order_rule_matches_python(nvcc_results):
    build = nvcc_results[("order_check", "host")]
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(nvcc_results["order_check_binary"])], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    expected = [str(int(_order.p_first(*case))) for case in ORDER_CASES]
    assert run.stdout.split() == expected
    assert set(expected) == {"0", "1"}  # both orders occur


def test_both_libraries_share_checks_and_order_rule():
    # One implementation of the argument checks and of the order rule, included by the CPU
    # library and the CUDA binding; neither keeps a copy.
    for library in (ROOT / "csrc" / "cpu" / "construct.cpp", CUDA_DIR / "binding.cpp"):
        source = library.read_text()
        assert '#include "../common/checks.h"' in source and '#include "../common/order.h"' in source, library
        assert "apsfast::p_first(" in source and "apsfast::check_construct(" in source, library
    for library in (ROOT / "csrc" / "cpu" / "transition.cpp", CUDA_DIR / "binding.cpp"):
        assert "apsfast::check_transition_step_all(" in library.read_text(), library
    for library in sorted((ROOT / "csrc").glob("*/*.c*")):
        source = library.read_text()
        assert "c_o * C_in * c_i" not in source and "void check_transform(" not in source, library
    # The order rule's header is plain C++ (the .cu launchers may include it).
    assert all(inc.startswith("c") for inc in INCLUDE.findall((COMMON_DIR / "order.h").read_text()))
