"""Multi-node training through ``_run_training.sh`` on one machine: the script runs as under ``sbatch --nodes 2``
(fake slurm variables, stub ``srun`` and ``scontrol`` on PATH), so two launchers (one ``torchrun`` a "node",
one CPU process each, gloo) meet at 127.0.0.1; the run trains, checkpoints and resumes exactly."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_trainer import REPO, _free_port, tiny_overrides, tokenizer_dir, train_losses  # noqa: F401

from asarm.model import ASARM
from asarm.training.trainer import latest_checkpoint

SRUN = """#!/usr/bin/env bash
# srun stand-in: runs the command once a "node", as srun --ntasks-per-node 1 does, with the node's slurm variables
echo "srun $*" >> "$SLURM_STUB_LOG"
nodes=1
while [[ "${1:-}" == -* ]]; do
    case "$1" in
        --nodes) nodes="$2"; shift 2 ;;
        *=*) shift ;;
        *) shift 2 ;;
    esac
done
pids=()
for ((node = 0; node < nodes; node++)); do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 SLURM_STEP_ID=0 "$@" &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
"""

SCONTROL = """#!/usr/bin/env bash
# scontrol stand-in: every node of the fake job is this machine
echo "scontrol $*" >> "$SLURM_STUB_LOG"
[ "$1 $2" = "show hostnames" ] || exit 1
echo 127.0.0.1
echo 127.0.0.1
"""


@pytest.fixture(scope="module")
def fake_slurm(tmp_path_factory) -> Path:
    """A bin directory with the stubs (and a torchrun of this interpreter)."""
    bin_dir = tmp_path_factory.mktemp("slurm") / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL),
                       ("torchrun", f'#!/bin/sh\nexec "{sys.executable}" -m torch.distributed.run "$@"\n')):
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return bin_dir


def run_script(fake_slurm, run_dir, small_text, tokenizer_dir, *, nodes: int | None, nproc: int,  # noqa: F811
               **extra) -> tuple[list[str], str]:
    """``_run_training.sh`` (default config plus the tiny overrides, 4 steps) as the batch step of a job of
    ``nodes`` nodes, or (None) as a plain command; returns the srun/scontrol calls made and stderr."""
    log = fake_slurm.parent / "slurm_calls.log"
    log.write_text("")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "PET_", "ASARM_NODE")) and k not in ("NPROC", "RUN_DIR")}
    env.update(PATH=f"{fake_slurm}{os.pathsep}{env['PATH']}", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               SLURM_STUB_LOG=str(log), NPROC=str(nproc))
    if nodes is not None:
        env.update(SLURM_NNODES=str(nodes), SLURM_JOB_NODELIST="node[01-02]", SLURM_JOB_ID="4242",
                   SLURM_SUBMIT_DIR=str(REPO), MASTER_PORT=str(_free_port()))
    else:  # the plain single-machine torchrun, told (through its PET_* variables) to use a free port
        env.update(PET_MASTER_ADDR="127.0.0.1", PET_MASTER_PORT=str(_free_port()))
    overrides = tiny_overrides(run_dir, small_text, tokenizer_dir,
                               **{"model.tokenizer_vocab_size": 0, "train.max_steps": 4, **extra})
    proc = subprocess.run(["bash", str(REPO / "_run_training.sh"), *overrides], cwd=fake_slurm.parent, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return log.read_text().splitlines(), proc.stderr


@pytest.fixture(scope="module")
def two_node_split_run(tmp_path_factory, fake_slurm, small_text, tokenizer_dir) -> Path:  # noqa: F811
    """A 2-node job stopped at step 2 (train.stop_at), then resumed by a second job to step 4."""
    run_dir = tmp_path_factory.mktemp("two_node") / "split"
    calls, err = run_script(fake_slurm, run_dir, small_text, tokenizer_dir, nodes=2, nproc=1,
                            **{"train.stop_at": 2})
    assert "2 nodes, rendezvous at 127.0.0.1:" in err
    assert calls[0].startswith("scontrol show hostnames node[01-02]")
    assert calls[1].startswith("srun --nodes 2 --ntasks 2 --ntasks-per-node 1") and len(calls) == 2
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.name == "step_2"
    # two nodes of one process each: a world of two, each rank with its own data shard and RNG state
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["resolved"]["world_size"] == 2 and saved["resolved"]["effective_batch"] == 8
    for rank in (0, 1):
        assert (ckpt / f"data_rank{rank}.pt").is_file() and (ckpt / f"rng_rank{rank}.pt").is_file()
    assert torch.load(ckpt / "data_rank0.pt", weights_only=False) != torch.load(ckpt / "data_rank1.pt",
                                                                                 weights_only=False)
    run_script(fake_slurm, run_dir, small_text, tokenizer_dir, nodes=2, nproc=1)  # the resumed job
    return run_dir


def test_two_node_run_trains_checkpoints_and_resumes(two_node_split_run):
    run_dir = two_node_split_run
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4]
    assert latest_checkpoint(run_dir).name == "step_4"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["resolved"]["resumed_from"].endswith("step_2") and saved["resolved"]["world_size"] == 2


def test_two_node_resume_matches_one_node_uninterrupted(tmp_path, two_node_split_run, fake_slurm,
                                                        small_text, tokenizer_dir):  # noqa: F811
    """2 nodes x 1 process, interrupted and resumed, equals a plain `NPROC=2 ./_run_training.sh` run
    (the same ranks in the same world) bit for bit."""
    full_dir = tmp_path / "full"
    calls, _ = run_script(fake_slurm, full_dir, small_text, tokenizer_dir, nodes=None, nproc=2)
    assert calls == []  # no slurm: the plain single-machine torchrun
    full, split = train_losses(full_dir), train_losses(two_node_split_run)
    assert sorted(full) == sorted(split) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert abs(full[step] - split[step]) <= 1e-6, step
    a = ASARM.from_pretrained(full_dir / "checkpoints" / "step_4" / "model", device="cpu")
    b = ASARM.from_pretrained(two_node_split_run / "checkpoints" / "step_4" / "model", device="cpu")
    for (name, pa), (_, pb) in zip(a.backbone.state_dict().items(), b.backbone.state_dict().items()):
        assert torch.equal(pa, pb), name
