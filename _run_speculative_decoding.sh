#!/usr/bin/env bash
# The paper's speculative-decoding benchmark (spec section 6.1), as a plain script or under sbatch:
# WikiText-2 raw test packed into 512-token chunks, 26 random visible tokens, the rest decoded left to
# right by sequential, ASSD (self drafts) and ASSD (n-gram drafts) with k=5, T=1; NFE, wall-clock,
# GPT-2 large perplexity and unigram entropy, with paired tests.
#SBATCH --job-name=asarm-speculative
#SBATCH --nodes=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=asarm-speculative-%j.log
#
# Usage: ./_run_speculative_decoding.sh [more `asarm eval speculative` options, e.g. --engine full]
#   (under sbatch, submit from the repository root: sbatch _run_speculative_decoding.sh)
# Environment overrides (defaults: the paper's settings):
#   MODEL=therealgabeguo/ASARM  REVISION=nlp (REVISION= empty for a local model directory)
#   LENGTH=512  START_FRACTION=0.05  K=5  TEMPERATURE=1  TRIALS=1  NUM_SEQUENCES=all  BATCH_SIZE=1
#   SAMPLERS=sequential,assd-self,assd-ngram  SEED=0  DEVICE (default: cuda if available)
#   PPL_MODEL=gpt2-large (Hub name, local directory, or none)  TEXT_FILE (default: WikiText-2 raw test)
#   OUT=runs/eval/speculative_paper  DATA (sets ASARM_DATA_DIR, where local data files are found)
# Writes OUT/results.json, summary.md, samples.jsonl and plots.
set -euo pipefail
# sbatch runs a spool copy of this script, so there the submission directory is the repository.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")}"
if [ -n "${DATA:-}" ]; then export ASARM_DATA_DIR="$DATA"; fi
ARGS=(
    --model "${MODEL:-therealgabeguo/ASARM}"
    --length "${LENGTH:-512}"
    --start-fraction "${START_FRACTION:-0.05}"
    --k "${K:-5}"
    --temperature "${TEMPERATURE:-1}"
    --trials "${TRIALS:-1}"
    --num-sequences "${NUM_SEQUENCES:-all}"
    --batch-size "${BATCH_SIZE:-1}"
    --samplers "${SAMPLERS:-sequential,assd-self,assd-ngram}"
    --seed "${SEED:-0}"
    --ppl-model "${PPL_MODEL:-gpt2-large}"
    --out "${OUT:-runs/eval/speculative_paper}"
)
REVISION="${REVISION-nlp}"
if [ -n "$REVISION" ]; then ARGS+=(--revision "$REVISION"); fi
if [ -n "${DEVICE:-}" ]; then ARGS+=(--device "$DEVICE"); fi
if [ -n "${TEXT_FILE:-}" ]; then ARGS+=(--text-file "$TEXT_FILE"); fi
exec python3 -m asarm.cli eval speculative "${ARGS[@]}" "$@"
