#!/usr/bin/env bash
# Train an AS-ARM with the masking-distribution objective (runs as a plain script or under sbatch).
#SBATCH --job-name=asarm-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --output=asarm-train-%j.log
#
# Usage: ./_run_training.sh [CONFIG] [section.key=value ...]
#   no CONFIG          configs/tiny_cpu.yaml: a ~5M-parameter model on WikiText-2 valid, on the CPU
#                      (./_run_training.sh train.max_steps=20 overrides that default config)
#   paper settings     configs/paper_nlp.yaml (OpenWebText) or configs/paper_code.yaml (StarCoder python)
#   several nodes      sbatch --nodes 4 _run_training.sh configs/paper_nlp.yaml   (4 nodes x 4 GPUs = 16)
# Environment overrides: NPROC (processes per node; default: the node's GPU count, or 1),
#   RUN_DIR (output directory), ASARM_DATA_DIR (where local data files are found),
#   MASTER_ADDR / MASTER_PORT (multi-node rendezvous; default: the job's first node, a port from the job id).
# The run resumes from its latest checkpoint when restarted (train.resume=auto). Across nodes, the run
# directory and the data must be on a shared file system: every rank writes its part of each checkpoint.
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
NNODES="${SLURM_NNODES:-1}"

# Several nodes: this script (on the job's first node) starts one copy of itself per node with srun; each
# copy (ASARM_NODE_LAUNCH=1) runs a torchrun for its node's GPUs. The copies are started from the repository
# (the spool copy "$0" exists on the first node only) and inherit the environment, rendezvous included.
if [ "$NNODES" -gt 1 ] && [ -z "${ASARM_NODE_LAUNCH:-}" ]; then
    if [ -z "${MASTER_ADDR:-}" ]; then
        # the job's first node hosts the rendezvous (the whole list is read: with pipefail, `| head -n 1`
        # can fail the script when scontrol gets SIGPIPE)
        HOSTS="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
        MASTER_ADDR="${HOSTS%%$'\n'*}"
    fi
    # a port derived from the job id, so that two jobs sharing a node do not collide (below the ephemeral range)
    MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 10000))}"
    export MASTER_ADDR MASTER_PORT ASARM_NODE_LAUNCH=1
    echo "_run_training.sh: $NNODES nodes, rendezvous at $MASTER_ADDR:$MASTER_PORT" >&2
    # --kill-on-bad-exit: a node that fails stops the others instead of leaving them waiting in a collective
    SRUN_ARGS=(--nodes "$NNODES" --ntasks "$NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1)
    # some Slurm versions (22.05) do not pass the job's --cpus-per-task on to srun steps
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then SRUN_ARGS+=(--cpus-per-task "$SLURM_CPUS_PER_TASK"); fi
    exec srun "${SRUN_ARGS[@]}" "$PWD/_run_training.sh" "$CONFIG" "$@"
fi

# processes on this node: NPROC, else the GPUs slurm gave this node, else the GPUs torch sees, else 1
NPROC="${NPROC:-${SLURM_GPUS_ON_NODE:-$(python3 -c 'import torch; print(max(1, torch.cuda.device_count()))')}}"
EXTRA=()
if [ -n "${RUN_DIR:-}" ]; then EXTRA+=("train.run_dir=$RUN_DIR"); fi
if [ "$NNODES" -gt 1 ]; then
    # one torchrun per node, its node rank from slurm: rank = node rank x NPROC + local rank. A resume needs
    # the same number of nodes and NPROC, as each rank reloads its own data stream and RNG state.
    exec torchrun --nnodes "$NNODES" --node_rank "${SLURM_NODEID:-$SLURM_PROCID}" --nproc_per_node "$NPROC" \
        --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
        -m asarm.training.trainer --config "$CONFIG" "${EXTRA[@]}" "$@"
fi
if [ "$NPROC" -gt 1 ]; then
    exec torchrun --nproc_per_node "$NPROC" -m asarm.training.trainer --config "$CONFIG" "${EXTRA[@]}" "$@"
fi
exec python3 -m asarm.training.trainer --config "$CONFIG" "${EXTRA[@]}" "$@"
