"""Trainer: config loading and overrides, checkpoints (atomic, pruned), exact resume, evaluation."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from asarm.model import ASARM
from asarm.training.config import TrainConfig, apply_overrides, load_config
from asarm.training.trainer import latest_checkpoint, run_training, train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer_dir(small_text, tmp_path_factory) -> Path:
    from asarm.tokenization import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer([small_text.read_text(encoding="utf-8")], 300, out)
    return out


def tiny_overrides(run_dir, small_text, tokenizer_dir, **extra) -> list[str]:
    items = {
        "train.run_dir": str(run_dir), "data.paths": f"[{small_text}]", "model.tokenizer": str(tokenizer_dir),
        "model.d_model": 32, "model.n_layer": 2, "model.n_head": 4, "model.d_inner": 64, "model.dropout": 0.1,
        "data.max_length": 32, "data.batch_size": 2, "data.heldout_fraction": 0.1, "train.grad_accum": 2,
        "train.max_steps": 6, "train.save_every": 2, "train.keep_last": 2, "optim.lr": 1e-3,
        "optim.warmup_steps": 2, "masking.start_masking_rate": 0.5, "masking.final_min_masking_rate": 0.6,
        "masking.final_max_masking_rate": 0.95, "masking.masking_warmup_steps": 3, "eval.every": 0,
        "eval.at_end": False, "log.progress": False, "log.tensorboard": False,
    }
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def train_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["step"]] = rec["loss"]
    return out


def test_config_overrides_and_types():
    cfg = apply_overrides(TrainConfig(), ["optim.lr=3e-4", "data.paths=[a.txt, b.txt]", "train.stop_at=null",
                                          "eval.batch_size=4", "optim.betas=0.9,0.95", "log.wandb=true"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.paths == ["a.txt", "b.txt"] and cfg.train.stop_at is None and cfg.eval.batch_size == 4
    assert cfg.optim.betas == [0.9, 0.95] and cfg.log.wandb is True
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(TrainConfig(), ["optim.lrr=1"])
    with pytest.raises(ValueError, match="cannot read"):
        apply_overrides(TrainConfig(), ["train.max_steps=lots"])


@pytest.mark.parametrize("name", ["tiny_cpu", "tiny_cpu_mixture", "tiny_draft_head", "paper_nlp", "paper_code",
                                  "paper_nlp_mixture", "paper_nlp_draft_head"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.train.max_steps > 0 and cfg.data.max_length > 0


def test_mixture_config_keys():
    cfg = load_config(REPO / "configs" / "tiny_cpu_mixture.yaml")
    assert cfg.masking.mixture == {"joint": 0.7, "parallel": 0.3} and cfg.masking.prompt_attn == "prompt_only"
    weighted = apply_overrides(cfg, ["masking.mixture.parallel=3e-1", "masking.slot_weights=[2, 1.5]"])
    assert weighted.masking.mixture == {"joint": 0.7, "parallel": 0.3} and weighted.masking.slot_weights == [2.0, 1.5]
    with pytest.raises(ValueError, match="masking.slot_weights weighs the parallel"):
        apply_overrides(weighted, ["masking.mixture=null"])  # back to the joint objective alone
    assert cfg.masking.slot_weights == [1.0, 3.0, 2.0, 1.5, 1.0]  # asarm-tiny's recipe
    with pytest.raises(ValueError, match="masking.slot_weights weighs the parallel"):
        apply_overrides(cfg, ["masking.mixture={joint: 1}"])  # slot weights with no parallel row do nothing
    unweighted = apply_overrides(cfg, ["masking.slot_weights=[]"])
    assert apply_overrides(unweighted, ["masking.mixture=null"]).masking.mixture is None
    assert apply_overrides(unweighted, ["masking.mixture={joint: 1}"]).masking.mixture == {"joint": 1.0}
    for override, message in (("masking.mixture={joint: 1, mlm: 1}", "masking.mixture: unknown objective"),
                              ("masking.mixture.joint=-1", "masking.mixture.joint must be a finite weight"),
                              ("masking.mixture={joint: 0, parallel: 0}", "masking.mixture: the weights are all zero"),
                              ("masking.mixture=joint", "masking.mixture must be a mapping"),
                              ("masking.slot_weights=[1, -1]", "masking.slot_weights must be finite")):
        with pytest.raises(ValueError, match=message):
            apply_overrides(cfg, [override])
    with pytest.raises(ValueError, match="masking.slot_weights weighs the parallel"):
        apply_overrides(TrainConfig(), ["masking.slot_weights=[2]"])  # the default objective is joint


def test_mixture_config_trains(tmp_path, small_text, tokenizer_dir, monkeypatch):
    from asarm.training import trainer as trainer_module

    drawn = []  # which sequences of each micro-batch drew the parallel objective

    def spy(*args, **kwargs):
        loss, stats = compute_loss(*args, **kwargs)
        drawn.extend(stats["batch"].parallel.tolist())
        return loss, stats

    compute_loss = trainer_module.compute_loss
    monkeypatch.setattr(trainer_module, "compute_loss", spy)
    run_dir = tmp_path / "mix"
    overrides = tiny_overrides(run_dir, small_text, tokenizer_dir, **{"train.max_steps": 2, "train.save_every": 2,
                                                                      "model.tokenizer_vocab_size": 0,
                                                                      "masking.slot_weights": "[2.0, 1.0]"})
    cfg = load_config(REPO / "configs" / "tiny_cpu_mixture.yaml", overrides)
    out = run_training(cfg)
    assert sorted(out["losses"]) == [1, 2] and all(0 < v < 50 for v in out["losses"].values())
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["masking"]["mixture"] == {"joint": 0.7, "parallel": 0.3}
    assert saved["masking"]["slot_weights"] == [2.0, 1.0]
    assert len(drawn) == 8 and set(drawn) == {True, False}  # 2 steps x 2 micro-batches x 2 sequences


def test_exact_resume_atomic_checkpoints_and_saved_config(tmp_path, small_text, tokenizer_dir):
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    full = run_training(load_config(None, tiny_overrides(full_dir, small_text, tokenizer_dir,
                                                         **{"eval.at_end": True, "eval.batches": 1,
                                                            "eval.samples": 1, "eval.sample_k": 3,
                                                            "log.tensorboard": True})))
    assert sorted(full["losses"]) == [1, 2, 3, 4, 5, 6]
    # lr x effective_batch / 32 (batch 2 x accumulation 2), linear warm-up over 2 steps then linear decay
    records = [json.loads(line) for line in (full_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["kind"] == "train"]
    peak = 1e-3 * 4 / 32
    assert lrs == pytest.approx([peak / 2, peak, peak, peak * 3 / 4, peak / 2, peak / 4])
    if importlib.util.find_spec("tensorboard") is not None:  # optional dependency
        assert any((full_dir / "tb").glob("events.out.tfevents.*"))
    # an already finished run resumes as a no-op (no extra steps, no duplicate evaluation)
    again = train(None, tiny_overrides(full_dir, small_text, tokenizer_dir, **{"eval.at_end": True}))
    assert again["losses"] == {} and again["step"] == 6
    assert len((full_dir / "metrics.jsonl").read_text().splitlines()) == len(records)

    # interrupted run: stops at step 3 (a checkpoint is written there)
    first = run_training(load_config(None, tiny_overrides(split_dir, small_text, tokenizer_dir,
                                                          **{"train.stop_at": 3})))
    assert sorted(first["losses"]) == [1, 2, 3]
    for step in (1, 2, 3):
        assert first["losses"][step] == full["losses"][step]
    ckpts = split_dir / "checkpoints"
    assert latest_checkpoint(split_dir) == ckpts / "step_3"
    # a crash while writing step 5: half-written .tmp directory, and a step dir with no completion marker
    (ckpts / "step_5.tmp" / "model").mkdir(parents=True)
    (ckpts / "step_5.tmp" / "optimizer.pt").write_bytes(b"garbage")
    (ckpts / "step_9").mkdir()
    (ckpts / "step_9" / "optimizer.pt").write_bytes(b"garbage")
    (ckpts / "latest").unlink()  # the pointer may also be missing after a crash
    assert latest_checkpoint(split_dir) == ckpts / "step_3"

    resumed = run_training(load_config(None, tiny_overrides(split_dir, small_text, tokenizer_dir)))
    assert sorted(resumed["losses"]) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(resumed["losses"][step] - full["losses"][step]) <= 1e-6, step
    assert train_losses(split_dir) == train_losses(full_dir)

    a = ASARM.from_pretrained(full_dir / "checkpoints" / "step_6" / "model", device="cpu")
    b = ASARM.from_pretrained(ckpts / "step_6" / "model", device="cpu")
    for (name, pa), (_, pb) in zip(a.backbone.state_dict().items(), b.backbone.state_dict().items()):
        assert torch.equal(pa, pb), name

    # atomic writes, pruning to keep_last=2, latest pointer
    names = sorted(p.name for p in ckpts.iterdir())
    assert "step_5.tmp" not in names and "step_3" not in names
    assert (ckpts / "step_6").is_dir() and (ckpts / "latest").read_text().strip() == "step_6"

    # the resolved config is saved and loads back to the same settings
    saved = yaml.safe_load((split_dir / "config.yaml").read_text())
    assert saved["resolved"]["resumed_from"].endswith("step_3")
    assert saved["resolved"]["effective_batch"] == 4
    reloaded = load_config(split_dir / "config.yaml")
    assert reloaded.train.max_steps == 6 and reloaded.model.d_model == 32

    # evaluation: oracle NLL per token and ASSD NFE in metrics.jsonl
    evals = [json.loads(line) for line in (full_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "eval"]
    assert len(evals) == 1 and evals[0]["step"] == 6
    assert 0 < evals[0]["nll_per_token"] < 20 and evals[0]["assd_nfe"] >= 1 and len(evals[0]["samples"]) == 1


def _torchrun(run_dir, small_text, tokenizer_dir, port, **extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "asarm.training.trainer",
           *tiny_overrides(run_dir, small_text, tokenizer_dir, **{"train.cpu": True, **extra})]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cpu_run(tmp_path, small_text, tokenizer_dir):
    """Two DDP processes on the CPU (gloo), on the rotary backbone (XLNet's DDP runs: tests/training/test_multinode.py
    and the slow exact-resume test below)."""
    run_dir = tmp_path / "ddp"
    _torchrun(run_dir, small_text, tokenizer_dir, _free_port(),
              **{"train.max_steps": 2, "train.grad_accum": 1, "model.backbone": "rope", "model.d_inner": 48})
    ckpt = latest_checkpoint(run_dir)
    assert ASARM.from_pretrained(ckpt / "model", device="cpu").backbone.name == "rope"
    assert ckpt is not None and ckpt.name == "step_2"
    for rank in (0, 1):
        assert (ckpt / f"data_rank{rank}.pt").is_file() and (ckpt / f"rng_rank{rank}.pt").is_file()
    # each rank read its own shard
    d0 = torch.load(ckpt / "data_rank0.pt", weights_only=False)
    d1 = torch.load(ckpt / "data_rank1.pt", weights_only=False)
    assert d0 != d1
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["resolved"]["world_size"] == 2 and saved["resolved"]["effective_batch"] == 4
    assert sorted(train_losses(run_dir)) == [1, 2]


@pytest.mark.slow
def test_two_process_exact_resume(tmp_path, small_text, tokenizer_dir):
    full_dir, split_dir = tmp_path / "full", tmp_path / "split"
    _torchrun(full_dir, small_text, tokenizer_dir, _free_port(), **{"train.max_steps": 4})
    _torchrun(split_dir, small_text, tokenizer_dir, _free_port(), **{"train.max_steps": 4, "train.stop_at": 2})
    _torchrun(split_dir, small_text, tokenizer_dir, _free_port(), **{"train.max_steps": 4})
    full, split = train_losses(full_dir), train_losses(split_dir)
    assert sorted(split) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(full[step] - split[step]) <= 1e-6, step
    a = ASARM.from_pretrained(full_dir / "checkpoints" / "step_4" / "model", device="cpu")
    b = ASARM.from_pretrained(split_dir / "checkpoints" / "step_4" / "model", device="cpu")
    for (name, pa), (_, pb) in zip(a.backbone.state_dict().items(), b.backbone.state_dict().items()):
        assert torch.equal(pa, pb), name


def test_resume_rules(tmp_path, small_text, tokenizer_dir, capsys):
    """A resume refuses changed settings (naming them and the two ways out), allows the ones in
    RESUMABLE_KEYS, says where it resumed and when there is nothing to do, and leaves every step
    once in metrics.jsonl; train.resume=none starts over."""
    run_dir = tmp_path / "run"

    def run(**extra):
        return train(None, tiny_overrides(run_dir, small_text, tokenizer_dir,
                                          **{"train.max_steps": 3, "train.save_every": 2, **extra}))

    run(**{"train.stop_at": 2})
    # a crash after step 3 was logged but before its checkpoint
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"kind": "train", "step": 3, "loss": 0.0}) + "\n")
    capsys.readouterr()
    for change, named in (({"optim.lr": 5e-3}, "optim.lr (0.001 -> 0.005)"),
                          ({"model.d_model": 64}, "model.d_model (32 -> 64)")):
        with pytest.raises(ValueError, match="other settings") as err:
            run(**change)
        assert named in str(err.value) and "train.run_dir" in str(err.value) and "train.resume=none" in str(err.value)
    out = run(**{"train.max_steps": 4, "eval.every": 0, "log.every": 1})  # allowed changes
    assert "resumed" in capsys.readouterr().out and sorted(out["losses"]) == [3, 4]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    for max_steps in (4, 3):
        again = run(**{"train.max_steps": max_steps})
        assert again["losses"] == {} and again["step"] == 4
        assert f"nothing to do: the checkpoint is at step 4 and train.max_steps={max_steps}" in capsys.readouterr().out
    fresh = run(**{"train.resume": "none", "optim.lr": 5e-3})
    assert "starting over" in capsys.readouterr().out and sorted(fresh["losses"]) == [1, 2, 3]
    assert sorted(train_losses(run_dir)) == [1, 2, 3]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_2", "step_3"]


def test_paper_mixture_recipe_runs_at_tiny_size_on_cpu(tmp_path, small_text, tiny_model_dir):
    """configs/paper_nlp_mixture.yaml (fine-tune therealgabeguo/ASARM@nlp with the objective mixture) with only
    its scale swapped out: a tiny local checkpoint instead of the Hub one, a local text instead of OpenWebText,
    fp32 on the CPU. Its mixture, slot weights and schedule are used as shipped."""
    overrides = {"model.init": str(tiny_model_dir), "model.revision": "null", "data.source": "text",
                 "data.paths": f"[{small_text}]", "data.unit": "line", "data.heldout_mode": "tail",
                 "data.heldout_fraction": 0.1, "data.max_length": 32, "data.batch_size": 2, "data.num_workers": 0,
                 "train.grad_accum": 1, "train.max_steps": 2, "train.save_every": 2, "train.mixed_precision": "no",
                 "train.run_dir": str(tmp_path / "run"), "eval.every": 0, "log.progress": False,
                 "log.tensorboard": False}
    cfg = load_config(REPO / "configs" / "paper_nlp_mixture.yaml", [f"{k}={v}" for k, v in overrides.items()])
    assert cfg.masking.mixture == {"joint": 0.7, "parallel": 0.3} and cfg.masking.slot_weights == [2.0, 1.5, 1.0]
    out = run_training(cfg)
    assert sorted(out["losses"]) == [1, 2] and all(0 < v < 50 for v in out["losses"].values())
    shipped = load_config(REPO / "configs" / "paper_nlp_mixture.yaml")
    assert (shipped.model.init, shipped.model.revision) == ("therealgabeguo/ASARM", "nlp")


def test_mixed_precision_reads_a_bare_no_and_rejects_unknown_modes():
    """YAML reads `no` as false: train.mixed_precision=no must still mean no mixed precision."""
    assert apply_overrides(TrainConfig(), ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert apply_overrides(TrainConfig(), ["train.mixed_precision=bf16"]).train.mixed_precision == "bf16"
    with pytest.raises(ValueError, match="train.mixed_precision must be no, bf16 or fp16"):
        apply_overrides(TrainConfig(), ["train.mixed_precision=fp32"])
