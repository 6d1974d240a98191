#!/usr/bin/env bash
# HumanEval infilling with sandboxed execution and pass@k, paper settings (runs as a plain script or under sbatch).
#SBATCH --job-name=asarm-humaneval
#SBATCH --nodes=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --output=asarm-humaneval-%j.log
#
# Usage: ./_run_code_infill_eval.sh [extra `asarm eval humaneval` options, e.g. --num-samples 10 --pass-k 1,10]
#   defaults (spec section 6): therealgabeguo/ASARM revision code, all four benchmarks (single-line,
#   multi-line, random-span, random-span-light), every task, code whitespace mapping on, blank = the
#   canonical solution's token count, every sampler, ASSD k 10, one completion per task, pass@1.
# Environment overrides: MODEL, REVISION, K, BENCHMARKS, LIMIT (a number or all), NUM_SAMPLES, PASS_K,
#   BATCH_SIZE, WORKERS (programs run in parallel; default: the CPU count), OUT (output directory),
#   DATA_DIR (folder with the HumanEval-*Infilling.jsonl.gz files), ASARM_DATA_DIR.
# The programs are untrusted model output: run this inside a container or VM.
set -euo pipefail
# sbatch runs a spool copy of this script, so there the submission directory is the repository.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")}"
MODEL="${MODEL:-therealgabeguo/ASARM}"
REVISION="${REVISION-code}"  # REVISION= (empty) for a local model directory
EXTRA=()
if [ -n "$REVISION" ]; then EXTRA+=(--revision "$REVISION"); fi
if [ -n "${DATA_DIR:-}" ]; then EXTRA+=(--data-dir "$DATA_DIR"); fi
if [ -n "${WORKERS:-}" ]; then EXTRA+=(--workers "$WORKERS"); fi
exec python3 -m asarm.cli eval humaneval --model "$MODEL" "${EXTRA[@]}" --k "${K:-10}" \
    --benchmarks "${BENCHMARKS:-single-line,multi-line,random-span,random-span-light}" --limit "${LIMIT:-all}" \
    --num-samples "${NUM_SAMPLES:-1}" --pass-k "${PASS_K:-1}" --batch-size "${BATCH_SIZE:-32}" \
    --out "${OUT:-runs/eval/humaneval-paper}" "$@"
