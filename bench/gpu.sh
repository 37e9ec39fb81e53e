#!/usr/bin/env bash
# What a GPU machine is for, in one run of about ten minutes after the build: build the CUDA
# extension, run the GPU tests (and tests/test_sync*.py whole), the host-cost benchmark, then
# the search-step benchmark (bf16 autocast, channels_last) on ResNet-20 at batch 64, 256 and
# 1024 and on MobileNet-v2 at batch 256, then the transition under each float32 matmul
# precision on the CUDA and Triton kernels (TF32 / 3xTF32 tensor cores in Triton: cost, and
# Φ's drift over 1,000 steps). Each stage runs under `timeout` with a cap (less when
# the budget is nearly spent), so one slow stage cannot eat the rest; the benchmarks write their
# rows after every case, so a stage cut short keeps what it measured. Results and logs go to
# $OUT (default bench/results), every file named after the device and the stage: <gpu>-host.md,
# <gpu>-search-resnet20.jsonl, <gpu>-tests.log, ... (<gpu>: h100, h200, a100, ... from nvidia-smi;
# GPU_NAME overrides it).
#
#   bash bench/gpu.sh [--cpu] [BUDGET_SECONDS [STAGE ...]]
#   stages: tests sync host search-resnet20 search-mobilenetv2 precision (the default, in that order), and
#   errors profile search-dispatch search-cuda search-triton kernels-cuda kernels-triton.
#   BUDGET_SECONDS (default 600) counts from the end of the build. The build runs first unless
#   SKIP_BUILD=1; TESTS_K selects tests (pytest -k); SEARCH_MODELS limits search-dispatch/-cuda/-triton.
#   Where one command may run ten minutes at most, split it in two on the same machine:
#     bash bench/gpu.sh 300 tests sync host
#     SKIP_BUILD=1 bash bench/gpu.sh 560 search-resnet20 search-mobilenetv2 precision
#   If `errors` reports a crash, rebuild with CC/CXX naming the system compiler (see the README's
#   GPU build).
#
#   --cpu (or DRY_RUN=1): the same stages on this machine's CPU, to check the script: no build,
#   every benchmark with --device cpu --quick, the test stages only collected (pytest --co);
#   results in $OUT (default /tmp/apsfast-gpu-dryrun), named cpu-*.
set -u
CPU=${DRY_RUN:-}
if [ "${1:-}" = "--cpu" ]; then CPU=1; shift; fi
BUDGET=${1:-600}
shift || true
STAGES=${*:-"tests sync host search-resnet20 search-mobilenetv2 precision"}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} APSFAST_CUDA_ARCHS=${APSFAST_CUDA_ARCHS:-9.0}

if [ -n "$CPU" ]; then
    OUT=${OUT:-/tmp/apsfast-gpu-dryrun}
    GPU=${GPU_NAME:-cpu}
    DEVICE=(--device cpu)
    QUICK=(--quick)
    TEST_RUN=(--co -q)  # collect only: which tests a GPU run would run
    SKIP_BUILD=1
else
    OUT=${OUT:-bench/results}
    name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
    # "NVIDIA H100 80GB HBM3" -> h100; "NVIDIA GeForce RTX 4090" -> 4090
    slug=$(echo "$name" | sed -E 's/NVIDIA|GeForce|Tesla|RTX//g' | awk '{print tolower($1)}' | tr -cd 'a-z0-9')
    GPU=${GPU_NAME:-${slug:-gpu}}
    DEVICE=(--device cuda)
    QUICK=()
    TEST_RUN=(-n 8)  # xdist: a crashing test is reported by name and its worker replaced
fi
LOGS=${LOGS:-$OUT}
mkdir -p "$OUT" "$LOGS"
MARK=$(mktemp)  # the files written by this run are those newer than it
BENCH=("${DEVICE[@]}" --amp bf16 --channels-last)
START=$SECONDS  # the budget's start: reset after the build

# stage NAME CAP COMMAND...: run COMMAND with at most CAP seconds (less if the budget is short),
# its output in $LOGS/<gpu>-NAME.log; fails only when skipped (what follows shows the log).
stage() {
    local name=$1 cap=$2; shift 2
    local left=$((BUDGET - (SECONDS - START)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 10)); then echo "== $name: skipped (budget spent)"; return 1; fi
    echo "== $name (at most ${limit} s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$LOGS/$GPU-$name.log" 2>&1
    local rc=$?
    echo "   exit $rc$( ((rc == 124)) && echo ' (timed out)') after $((SECONDS - start)) s"
}

# show FILE PATTERN: FILE's lines matching PATTERN, if this run wrote FILE.
show() {
    if [ "$1" -nt "$MARK" ]; then grep -E "$2" "$1"; else echo "   (nothing written to $1)"; fi
}

if [ -z "$CPU" ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
fi
echo "device: $GPU; results and logs: $OUT/$GPU-*; budget ${BUDGET} s after the build; stages: $STAGES"
# Editable install: it maps apsfast.kernels (the Triton kernels) and builds both extensions.
if [ -z "${SKIP_BUILD:-}" ]; then  # SKIP_BUILD=1: use what an earlier run on this machine built
    stage build 240 $PY -m pip install --no-build-isolation --no-deps --no-index -e .
    tail -2 "$LOGS/$GPU-build.log"
    START=$SECONDS
fi
$PY -m apsfast info | tail -8
for name in $STAGES; do
    case $name in
        tests)
            stage tests 120 $PY -m pytest -m gpu -p no:cacheprovider "${TEST_RUN[@]}" tests ${TESTS_K:+-k "$TESTS_K"} \
                || continue
            grep -E "crashed|FAILED|ERROR|passed|failed|skipped|collected" "$LOGS/$GPU-tests.log" | tail -25 ;;
        sync)  # every test of these files, not only the GPU-marked ones
            files=(tests/test_sync*.py)
            if [ ! -e "${files[0]}" ]; then echo "== sync: no tests/test_sync*.py"; continue; fi
            stage sync 60 $PY -m pytest -p no:cacheprovider "${TEST_RUN[@]}" "${files[@]}" || continue
            grep -E "crashed|FAILED|ERROR|passed|failed|skipped|collected" "$LOGS/$GPU-sync.log" | tail -15 ;;
        host)
            stage host 100 $PY -m apsfast bench host "${DEVICE[@]}" ${QUICK[@]+"${QUICK[@]}"} --out "$OUT/$GPU-host" \
                || continue
            show "$OUT/$GPU-host.md" "^\| [0-9.]+ \||target:|GEMM rate|^static compiled" ;;
        search-resnet20)
            stage "$name" 200 $PY -m apsfast bench search "${BENCH[@]}" ${QUICK[@]+"${QUICK[@]}"} --models resnet20_cifar \
                --batches 64,256,1024 --out "$OUT/$GPU-$name" || continue
            show "$OUT/$GPU-$name.md" "^\| resnet20_cifar@|^weight/limit|^apsfast/limit|^limit compiled" ;;
        search-mobilenetv2)
            stage "$name" 120 $PY -m apsfast bench search "${BENCH[@]}" ${QUICK[@]+"${QUICK[@]}"} --models mobilenetv2_imagenet \
                --batches 256 --out "$OUT/$GPU-$name" || continue
            show "$OUT/$GPU-$name.md" "^\| mobilenetv2_imagenet@|^weight/limit|^apsfast/limit|^limit compiled" ;;
        precision)  # the transition's tensor-core question: CUDA FMA tiles against Triton's tl.dot
            if [ -n "$CPU" ]; then backends=default; else backends=cuda,triton; fi
            stage precision 120 $PY -m apsfast bench precision "${DEVICE[@]}" ${QUICK[@]+"${QUICK[@]}"} \
                --backends "$backends" --out "$OUT/$GPU-transition-precision" || continue
            show "$OUT/$GPU-transition-precision.md" "^\| (default|cuda|triton) \||Φ_ref" ;;
        errors)  # bad input to each compiled op, each call in its own process
            stage errors 60 $PY -m apsfast info --check || continue
            cat "$LOGS/$GPU-errors.log" ;;
        profile)
            stage profile 120 $PY -m apsfast bench profile "${BENCH[@]}" ${QUICK[@]+"${QUICK[@]}"} --backend cuda \
                --out "$OUT/$GPU-profile" ;;
        search-dispatch)
            stage "$name" 150 $PY -m apsfast bench search "${BENCH[@]}" ${QUICK[@]+"${QUICK[@]}"} \
                ${SEARCH_MODELS:+--models $SEARCH_MODELS} --out "$OUT/$GPU-$name" ;;
        search-*)
            stage "$name" 150 $PY -m apsfast bench search "${BENCH[@]}" ${QUICK[@]+"${QUICK[@]}"} \
                ${SEARCH_MODELS:+--models $SEARCH_MODELS} --backend "${name#search-}" --out "$OUT/$GPU-$name" ;;
        kernels-*)
            stage "$name" 120 $PY -m apsfast bench kernels "${DEVICE[@]}" ${QUICK[@]+"${QUICK[@]}"} --backend "${name#kernels-}" \
                --out "$OUT/$GPU-$name" ;;
        *) echo "unknown stage $name" ;;
    esac
done
echo "done in $((SECONDS - START)) s after the build; written:"
find "$OUT" "$LOGS" -maxdepth 1 -name "$GPU-*" -newer "$MARK" | sort -u | sed 's/^/  /'
rm -f "$MARK"
