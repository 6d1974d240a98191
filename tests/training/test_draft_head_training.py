"""`asarm train-draft-head`: self-distillation of a draft head (chain or one-pass) through the trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from asarm.cli import main
from asarm.model import ASARM
from asarm.training import trainer
from asarm.training.config import config_to_dict, load_config
from asarm.training.draft_head import frequent_tokens
from asarm.training.trainer import run_training

REPO = Path(__file__).resolve().parents[2]


def head_overrides(run_dir, init, small_text, **extra) -> list[str]:
    items = {"model.init": str(init), "data.paths": f"[{small_text}]", "data.max_length": 32, "data.batch_size": 4,
             "data.heldout_fraction": 0.1, "train.run_dir": str(run_dir), "train.max_steps": 4, "train.save_every": 2,
             "eval.every": 0, "eval.at_end": False, "log.progress": False, "log.tensorboard": False,
             "optim.warmup_steps": 1, "draft_head.slots": 3}
    items.update(extra)
    return [f"{k}={v}" for k, v in items.items()]


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_train_draft_head_command_trains_only_the_head_and_ships_it(tmp_path, tiny_model_dir, small_text):
    run_dir = tmp_path / "run"
    extra = {"eval.at_end": True, "eval.batches": 2, "eval.samples": 1, "eval.sample_k": 2}
    assert main(["train-draft-head", "--config", str(REPO / "configs" / "tiny_draft_head.yaml"),
                 *head_overrides(run_dir, tiny_model_dir, small_text, **extra)]) == 0
    train = records(run_dir, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(r["cross_entropy"] > 0 and 0 <= r["acceptance"] <= 1 for r in train)
    (evaluation,) = records(run_dir, "eval")
    assert len(evaluation["acceptance_by_slot"]) == 3 and evaluation["assd_tokens_per_nfe"] >= 1
    trained = ASARM.from_pretrained(run_dir / "checkpoints" / "step_4" / "model", device="cpu")
    original = ASARM.from_pretrained(tiny_model_dir, device="cpu")
    assert trained.draft_head is not None and original.draft_head is None
    for name, weight in original.backbone.state_dict().items():  # the model itself is frozen
        assert torch.equal(weight, trained.backbone.state_dict()[name]), name
    assert trained.draft_head.mlp[-1].weight.abs().sum() > 0  # the head's output layer left its zero start


def test_a_one_pass_head_trains_and_ships_with_its_kind(tmp_path, tiny_model_dir, small_text):
    """draft_head.kind=one-pass trains an OnePassDraftHead (its output layers leave their zero start) and the
    checkpoint loads it back as one."""
    from asarm.draft_head import OnePassDraftHead

    run_dir = tmp_path / "run"
    overrides = head_overrides(run_dir, tiny_model_dir, small_text, **{"draft_head.kind": "one-pass",
                                                                       "draft_head.rank": 4})
    assert main(["train-draft-head", "--config", str(REPO / "configs" / "tiny_draft_head_onepass.yaml"),
                 *overrides]) == 0
    assert all(r["cross_entropy"] > 0 for r in records(run_dir, "train"))
    head = ASARM.from_pretrained(run_dir / "checkpoints" / "step_4" / "model", device="cpu").draft_head
    assert isinstance(head, OnePassDraftHead) and head.rank == 4
    assert head.base[-1].weight.abs().sum() > 0 and head.from_rank.weight.abs().sum() > 0


def test_draft_head_training_resumes_exactly(tmp_path, tiny_model_dir, small_text):
    config = REPO / "configs" / "tiny_draft_head.yaml"
    full = run_training(load_config(config, head_overrides(tmp_path / "full", tiny_model_dir, small_text)))
    run_training(load_config(config, head_overrides(tmp_path / "split", tiny_model_dir, small_text,
                                                    **{"train.stop_at": 2})))
    resumed = run_training(load_config(config, head_overrides(tmp_path / "split", tiny_model_dir, small_text)))
    assert sorted(resumed["losses"]) == [3, 4]
    assert all(resumed["losses"][s] == full["losses"][s] for s in (3, 4))
    a = ASARM.from_pretrained(Path(full["checkpoint"]) / "model", device="cpu").draft_head.state_dict()
    b = ASARM.from_pretrained(Path(resumed["checkpoint"]) / "model", device="cpu").draft_head.state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    with pytest.raises(ValueError, match="trained with other settings: draft_head.slots"):
        run_training(load_config(config, head_overrides(tmp_path / "split", tiny_model_dir, small_text,
                                                        **{"draft_head.slots": 2, "train.max_steps": 6})))


def test_the_head_trains_in_training_mode_after_every_evaluation(tmp_path, tiny_model_dir, small_text, monkeypatch):
    """An evaluation runs the head in eval mode; the training steps after it run it in training mode again, and the
    frozen model stays in eval mode throughout."""
    modes = []  # per distillation loss: (a training step: gradients on, the head's mode, the frozen model's mode)
    distil = trainer.distillation_loss

    def recording_distillation_loss(asarm, head, *args):
        modes.append((torch.is_grad_enabled(), head.training, asarm.training))
        return distil(asarm, head, *args)

    monkeypatch.setattr(trainer, "distillation_loss", recording_distillation_loss)
    extra = {"train.max_steps": 3, "eval.every": 1, "eval.batches": 1, "eval.samples": 0}
    run_training(load_config(REPO / "configs" / "tiny_draft_head.yaml",
                             head_overrides(tmp_path / "run", tiny_model_dir, small_text, **extra)))
    # steps 1, 2 and 3, with an evaluation after steps 1 and 2 (none after the last: eval.at_end is off)
    assert modes == [(True, True, False), (False, False, False)] * 2 + [(True, True, False)]


def test_draft_head_needs_a_model_to_distil(tmp_path, small_text, capsys):
    code = main(["train-draft-head", "--config", str(REPO / "configs" / "tiny_draft_head.yaml"),
                 *head_overrides(tmp_path / "r", "null", small_text)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "set model.init" in err
    with pytest.raises(ValueError, match="draft_head.slots must be >= 1"):
        load_config(REPO / "configs" / "tiny_draft_head.yaml", ["draft_head.slots=0"])


def test_frequent_tokens_orders_by_count_then_id():
    batches = [torch.tensor([[5, 5, 2, 9], [2, 5, 6, 6]]), torch.tensor([[6, 6, 6, 1]])]
    # counts: 6 -> 5 (excluded as <mask>), 5 -> 3, 2 -> 2, 1 and 9 -> 1 (tie: the lower id first)
    assert frequent_tokens(batches, 3, 10, exclude=6).tolist() == [1, 2, 5]
    assert frequent_tokens(batches, 2, 10, exclude=6).tolist() == [2, 5]


def test_paper_draft_head_recipe_runs_at_tiny_size_on_cpu(tmp_path, tiny_model_dir, small_text):
    """configs/paper_nlp_draft_head.yaml with only its scale swapped out (a tiny local model, a local text,
    fp32 on the CPU); its truncated draft vocabulary and slots are used as shipped, with fewer counting batches."""
    extra = {"model.revision": "null", "data.source": "text", "data.unit": "line", "data.heldout_mode": "tail",
             "data.num_workers": 0, "train.mixed_precision": "no", "train.max_steps": 2,
             "draft_head.vocab_batches": 3, "draft_head.slots": 4}
    cfg = load_config(REPO / "configs" / "paper_nlp_draft_head.yaml",
                      head_overrides(tmp_path / "run", tiny_model_dir, small_text, **extra))
    out = run_training(cfg)
    assert sorted(out["losses"]) == [1, 2]
    head = ASARM.from_pretrained(Path(out["checkpoint"]) / "model", device="cpu").draft_head
    assert len(head.draft_vocab) == 8000 and head.draft_vocab.tolist() == sorted(set(head.draft_vocab.tolist()))
    shipped = load_config(REPO / "configs" / "paper_nlp_draft_head.yaml")
    assert (shipped.model.init, shipped.model.revision, shipped.draft_head.train) == ("therealgabeguo/ASARM", "nlp",
                                                                                      True)


def test_export_of_a_head_run_keeps_the_models_own_training_files(tmp_path, tiny_model_dir, small_text):
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("export_model", REPO / "scripts" / "export_model.py")
    export_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(export_model)
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "training_config.yaml").write_text("data: {max_length: 32}\n")
    (model_dir / "training_log.jsonl").write_text('{"kind": "train", "step": 1}\n')
    run_training(load_config(REPO / "configs" / "tiny_draft_head.yaml",
                             head_overrides(tmp_path / "run", model_dir, small_text, **{"train.max_steps": 2})))
    assert export_model.main([str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert (out / "training_config.yaml").read_text() == "data: {max_length: 32}\n"
    assert (out / "training_log.jsonl").read_text() == '{"kind": "train", "step": 1}\n'
    head_run_config = load_config(out / "draft_head_training_config.yaml")  # the head run's own, as it trained
    assert config_to_dict(head_run_config) == config_to_dict(load_config(tmp_path / "run" / "config.yaml"))
    assert head_run_config.draft_head.train and head_run_config.model.init == str(model_dir)
    assert len((out / "draft_head_training_log.jsonl").read_text().splitlines()) == 2
    assert ASARM.from_pretrained(out, device="cpu").draft_head is not None
