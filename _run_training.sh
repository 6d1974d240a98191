#!/usr/bin/env bash
# Train an AS-ARM with the masking-distribution objective (runs as a plain script or under sbatch).
#SBATCH --job-name=asarm-train
#SBATCH --nodes=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --output=asarm-train-%j.log
#
# Usage: ./_run_training.sh [CONFIG] [section.key=value ...]
#   no CONFIG          configs/tiny_cpu.yaml: a ~5M-parameter model on WikiText-2 valid, on the CPU
#                      (./_run_training.sh train.max_steps=20 overrides that default config)
#   paper settings     configs/paper_nlp.yaml (OpenWebText) or configs/paper_code.yaml (StarCoder python)
# Environment overrides: NPROC (processes on this node; default: the GPU count, or 1),
#   RUN_DIR (output directory), ASARM_DATA_DIR (where local data files are found).
# The run resumes from its latest checkpoint when restarted (train.resume=auto).
set -euo pipefail
# sbatch runs a spool copy of this script, so there the submission directory is the repository.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")}"
CONFIG=configs/tiny_cpu.yaml
# the first argument is the config unless it is already an override (section.key=value)
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then CONFIG="$1"; shift; fi
if [ ! -f "$CONFIG" ]; then
    echo "_run_training.sh: error: config file '$CONFIG' not found; usage: ./_run_training.sh [CONFIG.yaml] [section.key=value ...]" >&2
    exit 2
fi
NPROC="${NPROC:-$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))')}"
EXTRA=()
if [ -n "${RUN_DIR:-}" ]; then EXTRA+=("train.run_dir=$RUN_DIR"); fi
if [ "$NPROC" -gt 1 ]; then
    exec torchrun --nproc_per_node "$NPROC" -m asarm.training.trainer --config "$CONFIG" "${EXTRA[@]}" "$@"
fi
exec python3 -m asarm.training.trainer --config "$CONFIG" "${EXTRA[@]}" "$@"
