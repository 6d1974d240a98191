#!/usr/bin/env bash
# One-command GPU check, about 6 minutes on one GPU:
#   1. tests/gpu: cached vs full engine logits on CUDA in float32 and bfloat16, and the brute-force
#      exactness mini-suite on CUDA (both engines);
#   2. the sampling benchmark's GPU rows (benchmarks/bench_sampling.py --device cuda, RESULTS.md untouched);
#   3. 50 bf16 training steps of configs/tiny_cpu.yaml on the GPU, without and with torch.compile, and of
#      configs/tiny_cpu_rope.yaml (the rotary backbone);
#   4. the backbone benchmark's speed and memory rows (benchmarks/bench_backbones.py --skip-quality).
# Every step runs even if an earlier one fails; the exit status is non-zero if any failed.
#
# Usage: scripts/gpu_check.sh [OUT]   (default OUT=runs/gpu_check; PYTHON=python3, DEVICE=cuda)
# Writes OUT/report.md (the one report: each step's status, time and output tail) and OUT/<step>.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu_check}"
PYTHON="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
STEPS=50

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check: no CUDA device (torch.cuda.is_available() is False); run it on a machine with a GPU" >&2
    exit 2
fi
mkdir -p "$OUT"
REPORT="$OUT/report.md"
FAILED=0
{
    echo "# asarm GPU check"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)," \
         "$("$PYTHON" -c 'import torch; print(torch.__version__, "on", torch.cuda.get_device_name())')"
} > "$REPORT"

# step NAME COMMAND...: run it, log to OUT/NAME.log, append its status, time and output tail to the report.
step() {
    local name="$1"
    shift
    local log="$OUT/$name.log" started status
    started=$(date +%s)
    echo "gpu_check: $name ..." >&2
    "$@" > "$log" 2>&1
    status=$?
    local verdict="passed"
    if [ "$status" -ne 0 ]; then verdict="FAILED (exit $status)"; FAILED=1; fi
    {
        echo
        echo "## $name: $verdict in $(( $(date +%s) - started )) s"
        echo
        echo '`'"$*"'`'
        echo
        echo '```'
        tail -n 40 "$log"
        echo '```'
    } >> "$REPORT"
}

train() {  # train NAME COMPILE [CONFIG]: 50 bf16 steps of a tiny config in a fresh run directory
    rm -rf "$OUT/$1"
    "$PYTHON" -m asarm.cli train --config "${3:-configs/tiny_cpu.yaml}" "train.run_dir=$OUT/$1" "train.max_steps=$STEPS" \
        train.mixed_precision=bf16 train.cpu=false "train.compile=$2" train.save_every=100000 train.resume=none \
        log.tensorboard=false
}

step gpu_tests "$PYTHON" -m pytest -q -p no:cacheprovider tests/gpu
step bench_sampling "$PYTHON" benchmarks/bench_sampling.py --device "$DEVICE" --lengths 128 512 --repeats 1 --no-write
step train_bf16_eager train train_bf16_eager false
step train_bf16_compiled train train_bf16_compiled true
step train_rope_bf16 train train_rope_bf16 false configs/tiny_cpu_rope.yaml
step bench_backbones "$PYTHON" benchmarks/bench_backbones.py --device "$DEVICE" --skip-quality --steps 3 --no-write

echo "gpu_check: report in $REPORT" >&2
exit "$FAILED"
