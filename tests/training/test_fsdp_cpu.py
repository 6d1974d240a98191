"""FSDP on two CPU processes: the shipped configs/accelerate_fsdp.yaml launched with accelerate on the CPU (gloo),
where the trainer shards the rotary backbone with torch's fully_shard (FSDP2), one unit per RopeLayer. The run
trains, evaluates on rank 0, checkpoints, exports and resumes exactly; and the line every training run ends with."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
import torch
from test_export import export_model
from test_rope_training import ROPE
from test_trainer import REPO, _free_port, tiny_overrides, tokenizer_dir, train_losses  # noqa: F401

from asarm import cli
from asarm.backbones import XLNetBackbone
from asarm.model import ASARM
from asarm.training.config import load_config
from asarm.training.trainer import Trainer, _fully_shard, latest_checkpoint, run_training

# on a machine without a GPU accelerate refuses the config's fsdp_sync_module_states (every rank builds the same
# seeded model anyway); the config's mixed_precision gives way to train.mixed_precision
LAUNCH = ["--config_file", str(REPO / "configs" / "accelerate_fsdp.yaml"), "--num_processes", "2",
          "--fsdp_sync_module_states", "false"]
STEPS = {**ROPE, "model.tokenizer_vocab_size": 0, "train.max_steps": 4, "train.save_every": 2, "eval.at_end": True,
         "eval.batches": 1, "eval.samples": 1, "eval.sample_k": 3}


def _launch(launcher: str, args: list[str]) -> str:
    """``accelerate launch ARGS`` or ``torchrun ARGS`` (2 processes) on a free port; returns the output (both
    processes')."""
    port = str(_free_port())
    cmd = {"accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", port],
           "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                        "127.0.0.1", "--master_port", port]}[launcher]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def _train(run_dir, small_text, tokenizer_dir, *, fsdp: bool = True, **extra) -> str:  # noqa: F811
    """configs/tiny_cpu_rope.yaml at test size on 2 CPU processes: FSDP (the shipped config), else DDP."""
    overrides = tiny_overrides(run_dir, small_text, tokenizer_dir, **{**STEPS, **extra})
    trainer = ["-m", "asarm.training.trainer", "--config", str(REPO / "configs" / "tiny_cpu_rope.yaml"), *overrides]
    return _launch("accelerate", [*LAUNCH, *trainer]) if fsdp else _launch("torchrun", trainer)


def _closing_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(("asarm train: finished", "asarm train: stopped"))]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, small_text, tokenizer_dir):  # noqa: F811
    """An uninterrupted 4-step FSDP run (checkpoints at steps 2 and 4, evaluation at the end) and its output."""
    run_dir = tmp_path_factory.mktemp("fsdp") / "full"
    return run_dir, _train(run_dir, small_text, tokenizer_dir)


def test_fsdp_run_shards_evaluates_on_rank_0_and_exports(fsdp_run, tmp_path, monkeypatch):
    run_dir, output = fsdp_run
    ckpt = latest_checkpoint(run_dir)
    assert ckpt.name == "step_4" and sorted(train_losses(run_dir)) == [1, 2, 3, 4]
    # sharded: each process saved its own half of every AdamW moment (of the embedding's 300 rows: 150 each)
    assert not (ckpt / "optimizer.pt").exists()
    shards = [torch.load(ckpt / f"optimizer_rank{r}.pt", weights_only=False)["state"] for r in (0, 1)]
    moments = [moment for state in shards for entry in state.values() for moment in (entry["exp_avg"],
                                                                                      entry["exp_avg_sq"])]
    assert len(moments) == 4 * len(shards[0]) and all(2 * m.to_local().shape[0] == m.shape[0] for m in moments)
    halves = [next(iter(state.values()))["exp_avg"].to_local() for state in shards]
    assert [tuple(h.shape) for h in halves] == [(150, 32), (150, 32)] and not torch.equal(*halves)

    # the evaluation (once, on rank 0) scored the gathered weights: a one-process trainer scoring the saved
    # model with the same evaluation settings gets the same held-out NLL
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["step"] == 4 and evals[0]["assd_nfe"] >= 1 and len(evals[0]["samples"]) == 1
    model = ASARM.from_pretrained(ckpt / "model", device="cpu")
    earlier = ASARM.from_pretrained(run_dir / "checkpoints" / "step_2" / "model", device="cpu")
    assert not torch.equal(model.backbone.embedding.weight, earlier.backbone.embedding.weight)
    scorer = Trainer(load_config(run_dir / "config.yaml", [f"train.run_dir={tmp_path / 'scorer'}",
                                                           "train.resume=none"]))
    assert scorer.evaluate(model)["nll_per_token"] == pytest.approx(evals[0]["nll_per_token"], rel=1e-5)

    # one closing line (the main process's), whose export command gives a model that loads as any other
    [line] = _closing_lines(output)
    assert line == (f"asarm train: finished at step 4; checkpoint {ckpt}, run directory {run_dir}; "
                    f"export: python scripts/export_model.py {run_dir} exports/full")
    command = shlex.split(line.split("export: ")[1])
    monkeypatch.chdir(tmp_path)
    assert command[:2] == ["python", "scripts/export_model.py"] and export_model.main(command[2:]) == 0
    exported = ASARM.from_pretrained(tmp_path / "exports" / "full", device="cpu")
    assert exported.backbone.name == "rope" and exported.config.n_layer == 2
    for (name, a), (_, b) in zip(exported.backbone.state_dict().items(), model.backbone.state_dict().items()):
        assert torch.equal(a, b), name


def test_fsdp_resume_matches_the_uninterrupted_run(fsdp_run, tmp_path, small_text, tokenizer_dir):  # noqa: F811
    """Stopped at step 2 and resumed with the command the run ends with: the same losses and final weights as the
    uninterrupted run, bit for bit (same processes, same gloo reduction order, every state restored)."""
    full_dir, _ = fsdp_run
    split_dir = tmp_path / "split"
    [line] = _closing_lines(_train(split_dir, small_text, tokenizer_dir, **{"train.stop_at": 2}))
    assert line.startswith(f"asarm train: stopped at step 2 of 4; checkpoint {split_dir / 'checkpoints' / 'step_2'}, "
                           f"run directory {split_dir}; resume: ")
    command = shlex.split(line.split("resume: ")[1])
    assert command[:2] == ["accelerate", "launch"]
    [line] = _closing_lines(_launch("accelerate", command[2:]))
    assert line.startswith("asarm train: finished at step 4")
    assert train_losses(split_dir) == train_losses(full_dir)
    a, b = (ASARM.from_pretrained(run / "checkpoints" / "step_4" / "model", device="cpu") for run in (full_dir,
                                                                                                       split_dir))
    for (name, pa), (_, pb) in zip(a.backbone.state_dict().items(), b.backbone.state_dict().items()):
        assert torch.equal(pa, pb), name
    evals = [[json.loads(line)["nll_per_token"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "eval"] for run in (full_dir, split_dir)]
    assert evals[0] == evals[1] and len(evals[0]) == 1


@pytest.mark.slow
def test_fsdp_trains_as_ddp_does(fsdp_run, tmp_path, small_text, tokenizer_dir):  # noqa: F811
    """The same run under DDP (torchrun, no FSDP config): the sharded gradients, averaged by reduce-scatter, give
    DDP's all-reduced ones up to the order of the float sums."""
    full_dir, _ = fsdp_run
    ddp_dir = tmp_path / "ddp"
    _train(ddp_dir, small_text, tokenizer_dir, fsdp=False)
    ckpt = latest_checkpoint(ddp_dir)
    assert (ckpt / "optimizer.pt").is_file() and not (ckpt / "optimizer_rank0.pt").exists()  # not sharded
    fsdp, ddp = train_losses(full_dir), train_losses(ddp_dir)
    assert sorted(ddp) == [1, 2, 3, 4] and all(abs(fsdp[step] - ddp[step]) <= 1e-6 for step in ddp)
    a, b = (ASARM.from_pretrained(run / "checkpoints" / "step_4" / "model", device="cpu") for run in (full_dir,
                                                                                                       ddp_dir))
    for (name, pa), (_, pb) in zip(a.backbone.state_dict().items(), b.backbone.state_dict().items()):
        assert torch.allclose(pa, pb, rtol=0, atol=1e-6), name


def test_a_stopped_run_ends_with_its_resume_command_and_a_finished_one_with_its_export(tmp_path, small_text,
                                                                                       tokenizer_dir, capsys):  # noqa: F811
    run_dir = tmp_path / "run"
    run_training(load_config(None, tiny_overrides(run_dir, small_text, tokenizer_dir,
                                                  **{"train.max_steps": 2, "train.stop_at": 1,
                                                     "train.resume": "none"})))
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == (f"asarm train: stopped at step 1 of 2; checkpoint {run_dir / 'checkpoints' / 'step_1'}, "
                    f"run directory {run_dir}; resume: asarm train --config {run_dir / 'config.yaml'} "
                    f"train.stop_at=null train.resume=auto")
    command = shlex.split(last.split("resume: ")[1])
    assert command[0] == "asarm" and cli.main(command[1:]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"asarm train: resumed {run_dir} at step 1 ({run_dir / 'checkpoints' / 'step_1'})"
    assert out[-1] == (f"asarm train: finished at step 2; checkpoint {run_dir / 'checkpoints' / 'step_2'}, "
                       f"run directory {run_dir}; export: python scripts/export_model.py {run_dir} exports/run")
    assert sorted(train_losses(run_dir)) == [1, 2]


def test_fsdp_on_cpus_names_a_wrap_class_the_backbone_lacks(monkeypatch):
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "RopeLayer")
    xlnet = XLNetBackbone.from_config(dict(d_model=16, n_layer=1, n_head=2, d_inner=32, vocab_size=40))
    with pytest.raises(ValueError, match=r"fsdp_transformer_layer_cls_to_wrap \(RopeLayer\) names no layer of the "
                                         r"xlnet backbone.*\(RopeLayer for rope\)"):
        _fully_shard(xlnet)
