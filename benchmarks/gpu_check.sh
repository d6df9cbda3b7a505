#!/usr/bin/env bash
# The GPU check of PACE's CUDA step, one command on an H100/H200 with torch, Triton and transformers and no
# network (about 6 minutes): the CUDA tests, what the machine's Triton compiles the kernel to, and the step
# benchmark in float32 and bfloat16. Every result lands in $OUT (default benchmarks/results/gpu/), to be
# committed under benchmarks/results/.
#
#   here:   bash benchmarks/gpu_wheels.sh            # the pipeline's packages as wheels, into .whl/
#   there:  bash benchmarks/gpu_check.sh             # the device tool: run(command=..., carry=[".whl"])
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PACE_CACHE_DIR=/tmp/pace-cache TRITON_CACHE_DIR=/tmp/triton-cache
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git rev-parse HEAD 2>/dev/null || true; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
step() {  # step NAME SECONDS COMMAND...: run, keep its output in $OUT/NAME.txt, go on if it fails
    local name=$1 limit=$2; shift 2
    echo "== $name"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "exit $?" >> "$OUT/$name.txt"
    tail -n 25 "$OUT/$name.txt"
}
step triton_ptx 120 python3 benchmarks/triton_ptx.py --json "$OUT/triton_ptx.json"
step cuda_tests 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py tests/test_train_cuda.py
step optimizer_step_cuda_fp32 120 python3 benchmarks/optimizer_step.py --device cuda --dtype float32 \
    --json "$OUT/optimizer_step_cuda_fp32.json"
step optimizer_step_cuda_bf16 120 python3 benchmarks/optimizer_step.py --device cuda --dtype bfloat16 \
    --json "$OUT/optimizer_step_cuda_bf16.json"
ls -la "$OUT"
