"""Weights & Biases logging of the trainer (``log.wandb``) and of ``asarm eval ... --wandb`` (EvalRun), in
offline mode: the offline run's transaction log (``run-ID.wandb``) is read back to check its config and summary."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from test_trainer import tiny_overrides, tokenizer_dir, train_losses  # noqa: F401 (fixtures; small_text: conftest)

from asarm.cli import main as asarm_main
from asarm.eval.record import EvalRun, flatten_metrics
from asarm.training.trainer import WANDB_ID_FILE, main as trainer_main, train


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch) -> Path:
    """Offline wandb with every file it writes under ``tmp_path``; yields WANDB_DIR. wandb reads the
    environment once per process (its setup singleton), hence the teardown on both sides."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()
    root = tmp_path / "wandb_home"
    for var, sub in (("WANDB_DIR", "dir"), ("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"),
                     ("WANDB_DATA_DIR", "data")):
        (root / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(root / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_PROJECT", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_NAME"):
        monkeypatch.delenv(var, raising=False)
    yield root / "dir"
    wandb.teardown()


def _records(path: Path):
    """The protobuf payloads of a wandb transaction log: a 7-byte file header, then LevelDB-style blocks of
    32 KiB holding records (crc32 4 bytes, length 2, type 1: full, first, middle, last), zero-padded."""
    data = path.read_bytes()
    if data[:4] != b":W&B":  # not written yet (or not a wandb log): no records
        return
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            yield payload
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            yield pending + payload
        else:
            return


def offline_runs(wandb_dir: Path, timeout: float = 30.0) -> list[dict]:
    """Each offline run under ``wandb_dir`` (oldest first): its id, name, project, config and summary.
    wandb's service process may still be writing a run's log after ``finish()`` returns (seen on a loaded
    machine), so read until every run has its run record and a summary, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        runs = _read_offline_runs(wandb_dir)
        complete = all("start" in run and run["summary"] for run in runs)
        if complete or time.monotonic() > deadline:
            assert complete, f"incomplete offline wandb runs under {wandb_dir}"
            return sorted(runs, key=lambda r: r["start"])  # directory names hold the time in seconds only
        time.sleep(0.2)


def _read_offline_runs(wandb_dir: Path) -> list[dict]:
    from wandb.proto import wandb_internal_pb2 as pb

    def key(item):
        return item.key or "/".join(item.nested_key)

    runs = []
    for run_dir in sorted((wandb_dir / "wandb").glob("offline-run-*")):
        run = {"dir": run_dir, "config": {}, "summary": {}}
        runs.append(run)
        logs = sorted(run_dir.glob("run-*.wandb"))
        for payload in _records(logs[0]) if logs else ():  # no log yet: incomplete, read again
            record = pb.Record()
            record.ParseFromString(payload)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, name=record.run.display_name, project=record.run.project,
                           start=record.run.start_time.ToNanoseconds())
                run["config"].update({key(u): json.loads(u.value_json) for u in record.run.config.update})
            elif kind == "config":
                run["config"].update({key(u): json.loads(u.value_json) for u in record.config.update})
            elif kind == "summary":
                run["summary"].update({key(u): json.loads(u.value_json) for u in record.summary.update})
    return runs


def test_trainer_logs_to_wandb_and_a_resume_continues_the_run(tmp_path, small_text, tokenizer_dir,  # noqa: F811
                                                              wandb_offline):
    run_dir = tmp_path / "run"

    def run(**extra):
        return train(None, tiny_overrides(run_dir, small_text, tokenizer_dir,
                                          **{"train.max_steps": 2, "train.save_every": 1, "log.wandb": True,
                                             "log.every": 1, "log.wandb_project": "asarm-test", **extra}))

    run(**{"train.stop_at": 1})  # interrupted after step 1, then resumed to step 2
    run()
    losses = train_losses(run_dir)
    assert sorted(losses) == [1, 2]
    first, second = offline_runs(wandb_offline)
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    assert first["id"] == second["id"] == run_id and first["project"] == "asarm-test" and first["name"] == "run"
    for wb in (first, second):  # the resolved config, with the derived values
        assert wb["config"]["model"]["d_model"] == 32 and wb["config"]["train"]["max_steps"] == 2
        assert wb["config"]["log"]["wandb"] is True and wb["config"]["resolved"]["effective_batch"] == 4
    assert first["config"]["resolved"]["resumed_from"] is None
    assert second["config"]["resolved"]["resumed_from"].endswith("step_1")
    # the summary: the last value of each metric, where the run ended
    assert first["summary"]["train/loss"] == pytest.approx(losses[1]) and first["summary"]["step"] == 1
    assert second["summary"]["train/loss"] == pytest.approx(losses[2]) and second["summary"]["step"] == 2
    assert second["summary"]["checkpoint"].endswith("step_2") and 0 < second["summary"]["train/lr"]

    # starting over in the same directory begins a new wandb run
    run(**{"train.resume": "none", "train.max_steps": 1})
    runs = offline_runs(wandb_offline)
    assert len(runs) == 3 and runs[-1]["id"] != run_id
    assert (run_dir / WANDB_ID_FILE).read_text().strip() == runs[-1]["id"] and runs[-1]["summary"]["step"] == 1


def test_wandb_files_default_to_the_run_directory(tmp_path, small_text, tokenizer_dir, wandb_offline,  # noqa: F811
                                                  monkeypatch):
    monkeypatch.delenv("WANDB_DIR")
    run_dir = tmp_path / "run"
    train(None, tiny_overrides(run_dir, small_text, tokenizer_dir,
                               **{"train.max_steps": 1, "log.wandb": True, "log.wandb_run_name": "named"}))
    (wb,) = offline_runs(run_dir)
    assert wb["name"] == "named" and wb["summary"]["step"] == 1


def test_missing_wandb_is_a_one_line_error(tmp_path, small_text, tokenizer_dir, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec gives None, import fails
    code = trainer_main(tiny_overrides(tmp_path / "run", small_text, tokenizer_dir, **{"log.wandb": True}))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "asarm[wandb]" in err and "log.wandb" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # it stopped before training
    with pytest.raises(ValueError, match=r"--wandb needs the wandb package: pip install 'asarm\[wandb\]'"):
        EvalRun("nll", {"out": str(tmp_path / "eval"), "wandb": True})


def test_wandb_without_an_account_is_a_one_line_error(tmp_path, small_text, tokenizer_dir, wandb_offline,  # noqa: F811
                                                       monkeypatch, capsys):
    for var in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a key
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    code = trainer_main(tiny_overrides(tmp_path / "run", small_text, tokenizer_dir,
                                       **{"log.wandb": True, "train.max_steps": 1}))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("asarm train: error: log.wandb: ") and "WANDB_MODE=offline" in err[-1]


def test_flatten_metrics():
    metrics = {"model": {"nll": 4.5, "ci": [1.0, None]}, "n": 3, "ok": True, "name": "x", "rates": {0.5: 2}}
    assert flatten_metrics(metrics) == {"model/nll": 4.5, "model/ci/0": 1.0, "n": 3, "ok": 1.0, "rates/0.5": 2}


def test_eval_logs_to_wandb(tmp_path, tiny_model_dir, wandb_offline):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog .\n" * 30)
    out = tmp_path / "out"
    assert asarm_main(["eval", "nll", "--model", str(tiny_model_dir), "--text-file", str(text), "--unigram-file",
                       str(text), "--length", "16", "--num-sequences", "2", "--out", str(out), "--no-progress",
                       "--wandb"]) == 0
    results = json.loads((out / "results.json").read_text())
    (wb,) = offline_runs(wandb_offline)
    assert wb["name"] == "eval-nll" and wb["project"] == "asarm"
    assert wb["config"]["evaluation"] == "nll" and wb["config"]["length"] == 16 and wb["config"]["wandb"] is True
    metrics = results["metrics"]
    assert wb["summary"]["model/nll_per_token"] == pytest.approx(metrics["model"]["nll_per_token"])
    assert wb["summary"]["sequences"] == 2 and wb["summary"]["seconds"] == pytest.approx(results["seconds"])
    for key, value in flatten_metrics(metrics).items():
        assert wb["summary"][key] == pytest.approx(value), key
    assert (wb["dir"] / "files" / "results.json").is_file() and (wb["dir"] / "files" / "summary.md").is_file()
