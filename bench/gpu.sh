#!/usr/bin/env bash
# Everything a GPU machine is for, in one run that fits a few minutes: build the CUDA
# extension, run the GPU tests, then the kernel and search-step benchmarks (bf16 autocast,
# channels_last) with the CUDA and the Triton backends. Each stage has a time cap and writes
# its log and results under $OUT (default: bench/results/gpu), so a stage cut short still
# leaves the rows it measured.
#
#   OUT=/tmp/gpu bash bench/gpu.sh [seconds]     (default budget: 540)
set -u
OUT=${OUT:-bench/results/gpu}
BUDGET=${1:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} APSFAST_CUDA_ARCHS=${APSFAST_CUDA_ARCHS:-9.0}
PY=${PYTHON:-python3}

# stage NAME CAP COMMAND...: run COMMAND with at most CAP seconds (less if the budget is short).
stage() {
    local name=$1 cap=$2; shift 2
    local left=$((BUDGET - SECONDS))
    local limit=$((cap < left ? cap : left))
    if ((limit < 10)); then echo "== $name: skipped (budget spent)"; return; fi
    echo "== $name (at most ${limit} s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
stage build 240 $PY setup.py build_ext --inplace
tail -3 "$OUT/build.log"
$PY -m apsfast info | tee "$OUT/info.log"
stage tests 120 $PY -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda_sources.py
tail -15 "$OUT/tests.log"
for backend in cuda triton; do
    stage "search-$backend" 150 $PY -m apsfast bench search --device cuda --amp bf16 --channels-last \
        --backend "$backend" --out "$OUT/search-$backend"
done
stage kernels-cuda 120 $PY -m apsfast bench kernels --device cuda --backend cuda --out "$OUT/kernels-cuda"
for f in "$OUT"/search-*.md "$OUT"/kernels-*.md; do [ -f "$f" ] && { echo "---- $f"; grep -v '^- ' "$f" | head -40; }; done
