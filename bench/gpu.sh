#!/usr/bin/env bash
# What a GPU machine is for, in one run that fits a few minutes: build the CUDA extension, run
# the GPU tests, profile a search step, then the search-step and kernel benchmarks (bf16
# autocast, channels_last) with the CUDA and the Triton backends. Each stage has a time cap;
# results go to $OUT (default: bench/results/gpu), logs to $LOGS (default: $OUT), so a stage
# cut short still leaves the rows it measured.
#
#   OUT=/tmp/gpu bash bench/gpu.sh [BUDGET_SECONDS [STAGE ...]]
#   stages: errors tests profile search-dispatch search-cuda search-triton kernels-cuda
#   kernels-triton (default: all but search-cuda, which the default dispatch already is, in that
#   order). The build runs first unless SKIP_BUILD=1; TESTS_K selects tests (pytest -k);
#   SEARCH_MODELS limits the search benchmark. If `errors` reports a crash, rebuild with CC/CXX
#   naming the system compiler (see the README's GPU build).
set -u
OUT=${OUT:-bench/results/gpu}
LOGS=${LOGS:-$OUT}
BUDGET=${1:-540}
shift || true
STAGES=${*:-"errors tests profile search-dispatch search-triton kernels-cuda kernels-triton"}
mkdir -p "$OUT" "$LOGS"
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
    timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start)) s"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
# Editable install: it maps apsfast.kernels (the Triton kernels) and builds both extensions.
if [ -z "${SKIP_BUILD:-}" ]; then  # SKIP_BUILD=1: use what an earlier run on this machine built
    stage build 240 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
    tail -2 "$LOGS/build.log"
fi
$PY -m apsfast info | tail -8
BENCH=(--device cuda --amp bf16 --channels-last)
for name in $STAGES; do
    case $name in
        errors)  # bad input to each compiled op, each call in its own process
            stage errors 60 $PY -m apsfast info --check
            cat "$LOGS/errors.log" ;;
        tests)  # xdist: a crashing test is reported by name and its worker replaced
            stage tests 120 $PY -m pytest -q -m gpu -p no:cacheprovider -n 8 tests \
                ${TESTS_K:+-k "$TESTS_K"}
            grep -E "crashed|FAILED|ERROR|passed|failed" "$LOGS/tests.log" | tail -25 ;;
        profile)
            stage profile 120 $PY -m apsfast bench profile "${BENCH[@]}" --backend cuda --out "$OUT" ;;
        search-dispatch)
            stage "$name" 150 $PY -m apsfast bench search "${BENCH[@]}" ${SEARCH_MODELS:+--models $SEARCH_MODELS} \
                --out "$OUT/$name" ;;
        search-*)
            stage "$name" 150 $PY -m apsfast bench search "${BENCH[@]}" ${SEARCH_MODELS:+--models $SEARCH_MODELS} \
                --backend "${name#search-}" --out "$OUT/$name" ;;
        kernels-*)
            stage "$name" 120 $PY -m apsfast bench kernels --device cuda --backend "${name#kernels-}" --out "$OUT/$name" ;;
        *) echo "unknown stage $name" ;;
    esac
done
