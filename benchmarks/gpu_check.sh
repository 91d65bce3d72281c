#!/usr/bin/env bash
# One GPU check for a machine with an NVIDIA GPU and this project already installed; nothing is installed here.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Runs, each under `timeout`, within 8 minutes in all, writing a log per step under OUTDIR:
#   1. pytest -m requires_cuda                        -> OUTDIR/pytest_requires_cuda.log
#   2. python benchmarks/kernel_speed.py --out OUTDIR       -> OUTDIR/kernels.log, kernels_benchmark.{json,md}
#   3. python benchmarks/tensorrt_check.py --out OUTDIR (only if the file exists) -> OUTDIR/tensorrt_check.log
# Exit status: 0 if every step that ran passed, 1 if one failed or timed out, 2 if there is no usable GPU.
set -u

OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" || exit 2
export PIP_NO_INDEX=1            # belt and braces: nothing here may reach a package index
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET           # compile the kernels for the GPU, not the CPU interpreter

TOTAL_S=470                      # 8 minutes, less a margin for this script itself
START=$SECONDS
failed=0

remaining() { echo $((TOTAL_S - (SECONDS - START))); }

# step NAME CAP_SECONDS LOG CMD...: run CMD with a timeout of min(CAP, time left), log to OUTDIR/LOG.
step() {
    local name=$1 cap=$2 log=$3; shift 3
    local left; left=$(remaining)
    local limit=$((cap < left ? cap : left))
    if [ "$limit" -le 5 ]; then
        echo "SKIP  $name: the 8-minute budget is spent" | tee -a "$OUT/summary.txt"
        failed=1
        return
    fi
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$log" 2>&1
    local rc=$?
    local took=$((SECONDS - t0))
    if [ $rc -eq 0 ]; then
        echo "PASS  $name (${took}s) -> $OUT/$log" | tee -a "$OUT/summary.txt"
    elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "TIME  $name: stopped after ${limit}s -> $OUT/$log" | tee -a "$OUT/summary.txt"
        failed=1
    else
        echo "FAIL  $name (rc=$rc, ${took}s) -> $OUT/$log" | tee -a "$OUT/summary.txt"
        failed=1
    fi
}

: >"$OUT/summary.txt"
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1; then
    echo "no NVIDIA GPU here (nvidia-smi missing or failing); run this on a GPU machine" | tee -a "$OUT/summary.txt"
    exit 2
fi
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>"$OUT/torch_cuda.log"; then
    echo "torch sees no CUDA device (CPU build of torch?); see $OUT/torch_cuda.log" | tee -a "$OUT/summary.txt"
    exit 2
fi
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())" \
    >"$OUT/versions.txt" 2>&1

step "pytest -m requires_cuda" 240 pytest_requires_cuda.log python -m pytest -m requires_cuda -q -ra tests
step "benchmarks/kernel_speed.py" 180 kernels.log python benchmarks/kernel_speed.py --out "$OUT"
if [ -f benchmarks/tensorrt_check.py ]; then
    step "benchmarks/tensorrt_check.py" 240 tensorrt_check.log python benchmarks/tensorrt_check.py --out "$OUT"
else
    echo "SKIP  benchmarks/tensorrt_check.py: not present yet" | tee -a "$OUT/summary.txt"
fi

echo "total $((SECONDS - START))s; summary in $OUT/summary.txt"
exit $failed
