#!/usr/bin/env bash
# ROCStories infilling (Story Cloze 2016 val) with ROUGE, paper settings (runs as a plain script or under sbatch).
#SBATCH --job-name=asarm-rocstories
#SBATCH --nodes=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=asarm-rocstories-%j.log
#
# Usage: ./_run_nlp_infill_eval.sh [extra `asarm eval rocstories` options, e.g. --samplers assd-self]
#   defaults (spec section 6): therealgabeguo/ASARM revision nlp, all 1871 stories, settings 1/5 and 3/5,
#   blank = the reference's token count, every sampler, ASSD k 10, 5 trials pooled.
# Environment overrides: MODEL, REVISION, K, TRIALS, LIMIT (a number or all), SETTINGS, BATCH_SIZE,
#   OUT (output directory), DATA (Story Cloze CSV; default: the data directory's copy),
#   ASARM_DATA_DIR (where local data files are found).
# Quick CPU check on the embedded model: `asarm eval rocstories` with no arguments.
set -euo pipefail
# sbatch runs a spool copy of this script, so there the submission directory is the repository.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")}"
MODEL="${MODEL:-therealgabeguo/ASARM}"
REVISION="${REVISION-nlp}"  # REVISION= (empty) for a local model directory
EXTRA=()
if [ -n "$REVISION" ]; then EXTRA+=(--revision "$REVISION"); fi
if [ -n "${DATA:-}" ]; then EXTRA+=(--data "$DATA"); fi
exec python3 -m asarm.cli eval rocstories --model "$MODEL" "${EXTRA[@]}" --k "${K:-10}" --trials "${TRIALS:-5}" \
    --limit "${LIMIT:-all}" --settings "${SETTINGS:-1/5,3/5}" --batch-size "${BATCH_SIZE:-32}" \
    --out "${OUT:-runs/eval/rocstories-paper}" "$@"
