import json
import sys
import types

import numpy as np
import pytest
import torch

import asarm.eval.lm_tasks as lm
from asarm.cli import main
from asarm.eval.lm_tasks import (HellaSwagExample, LambadaExample, hellaswag_accuracy, load_hellaswag, load_lambada,
                                 split_last_word)
from asarm.model import ASARM
from asarm.paths import DataFileNotFoundError
from asarm.tokenization import encode_text

from helpers import greedy_decode


def test_split_last_word():
    assert split_last_word("He opened the door and saw his dog\n") == LambadaExample(
        "He opened the door and saw his", "dog")
    with pytest.raises(ValueError):
        split_last_word("word")


def test_load_lambada_jsonl_and_txt(tmp_path):
    jsonl = tmp_path / "lambada.jsonl"
    jsonl.write_text(json.dumps({"text": "a b c"}) + "\n\n" + json.dumps({"text": "she said hello"}) + "\n")
    assert load_lambada(jsonl) == [LambadaExample("a b", "c"), LambadaExample("she said", "hello")]
    txt = tmp_path / "lambada.txt"
    txt.write_text("one two three\nfour five\n")
    assert load_lambada(txt, limit=1) == [LambadaExample("one two", "three")]


def test_lambada_default_file_in_data_dir(tmp_path, monkeypatch):
    (tmp_path / "lambada").mkdir()
    (tmp_path / "lambada" / "lambada_test.jsonl").write_text(json.dumps({"text": "x y"}) + "\n")
    monkeypatch.setenv("ASARM_DATA_DIR", str(tmp_path))
    assert load_lambada() == [LambadaExample("x", "y")]


def _fake_datasets(monkeypatch, load_dataset):
    """Stand-in for the ``datasets`` package: no network, and no slow import."""
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def _offline(*args, **kwargs):
    raise ConnectionError("no network")


def test_hub_fallback_fails_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("ASARM_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(lm, "hub_offline", lambda: False)  # the probe answered; the dataset load itself fails
    _fake_datasets(monkeypatch, _offline)
    with pytest.raises(DataFileNotFoundError, match="EleutherAI/lambada_openai.*no network"):
        load_lambada()
    with pytest.raises(DataFileNotFoundError, match="Rowan/hellaswag"):
        load_hellaswag()


def test_hub_rows_are_parsed(tmp_path, monkeypatch):
    monkeypatch.setenv("ASARM_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(lm, "hub_offline", lambda: False)  # the Hub answered
    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return [{"ctx": "A man", "endings": ["runs.", "sits."], "label": "1"}]

    _fake_datasets(monkeypatch, fake_load)
    assert load_hellaswag() == [HellaSwagExample("A man", ("runs.", "sits."), 1)]
    assert calls == [lm.HELLASWAG_HUB]


def test_missing_explicit_file(tmp_path):
    with pytest.raises(DataFileNotFoundError):
        load_lambada(tmp_path / "missing.jsonl")
    with pytest.raises(DataFileNotFoundError):
        load_hellaswag(tmp_path / "missing.jsonl")


def test_load_hellaswag_official_format(tmp_path):
    row = {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
           "ctx_b": "then", "ctx": "Then, the man writes over the snow. then",
           "endings": [", the man is gone.", ", he leaves.", ", the car stops.", ", the snow melts."],
           "source_id": "x", "split": "val", "split_type": "indomain", "label": 3}
    path = tmp_path / "hellaswag.jsonl"
    path.write_text(json.dumps(row) + "\n")
    assert load_hellaswag(path) == [HellaSwagExample(row["ctx"], tuple(row["endings"]), 3)]
    path.write_text(json.dumps({**row, "label": ""}) + "\n")
    with pytest.raises(ValueError, match="no label"):
        load_hellaswag(path)
    path.write_text(json.dumps({"ctx": "only"}) + "\n")
    with pytest.raises(ValueError, match="fields"):
        load_hellaswag(path)


def test_hellaswag_accuracy_sum_vs_normalised():
    scores = [[-10.0, -12.0, -30.0, -40.0],   # sum picks 0; per length (-5, -2, -3, -4) picks 1
              [-1.0, -5.0, -6.0, -7.0],       # both pick 0
              [-9.0, -8.0, -7.0, -6.0]]       # sum picks 3; per length (-9, -4, -2.33, -1.5) picks 3
    lengths = [[2, 6, 10, 10], [1, 1, 1, 1], [1, 2, 3, 4]]
    labels = [1, 0, 2]
    assert hellaswag_accuracy(scores, lengths, labels) == pytest.approx({"acc": 1 / 3, "acc_norm": 2 / 3})
    # labels are compared with the argmax, not with the row index
    assert hellaswag_accuracy(np.array([[-2.0, -1.0]]), np.ones((1, 2)), [1]) == {"acc": 1.0, "acc_norm": 1.0}


def test_hellaswag_accuracy_errors():
    with pytest.raises(ValueError):
        hellaswag_accuracy([[0.0, 1.0]], [[1, 1, 1]], [0])
    with pytest.raises(ValueError):
        hellaswag_accuracy([[0.0, 1.0]], [[1, 1]], [2])
    with pytest.raises(ValueError):
        hellaswag_accuracy([[0.0, 1.0]], [[1, 0]], [0])
    with pytest.raises(ValueError):
        hellaswag_accuracy([[0.0, 1.0]], [[1, 1]], [0.5])
    with pytest.raises(ValueError):
        hellaswag_accuracy(np.zeros((0, 4)), np.zeros((0, 4)), [])


# ----------------------------------------------------------------------------------- scoring
@pytest.fixture(scope="module")
def model(xlnet_tokenizer):
    return ASARM.from_config(tokenizer=xlnet_tokenizer, d_model=16, n_layer=1, n_head=2, d_inner=32, seed=0,
                             device="cpu")


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    model.save_pretrained(directory)
    return directory


def _step_log_probs(model, context, prefix):
    """Log-probabilities (V,) of the token after ``context + prefix``, computed alone: one query, the
    later positions of the row still placeholders."""
    total = len(context) + len(prefix) + 1
    tokens = torch.tensor([context + prefix + [model.mask_token_id]])
    sigma = torch.arange(total)[None]
    return model.log_probs(tokens, sigma, torch.tensor([len(context)]), torch.tensor([[total - 1]]))[0, 0]


def _hand_log_likelihood(model, context, target):
    return sum(float(_step_log_probs(model, context, target[:i])[tok]) for i, tok in enumerate(target))


def _pair(tokenizer, context, continuation, max_length):
    """The token ids the lm-eval model scores: apart, the context cut to its last tokens to fit."""
    context_ids, target = encode_text(context, tokenizer), encode_text(continuation, tokenizer)
    return context_ids[-(max_length - len(target)):], target


# --------------------------------------------------------------------------------------- CLI
HELLASWAG_ROWS = [
    ("A man is standing in a kitchen. He", ["cracks two eggs into a bowl.", "jumps over the moon.",
                                            "plays the violin loudly.", "reads a newspaper."]),
    ("The dog runs across the park and", ["catches the frisbee.", "sings.", "files his taxes on time today.",
                                          "sleeps."]),
    ("She puts on her running shoes. She", ["goes for a run.", "eats soup.", "paints the fence green.",
                                            "calls her mother."]),
]


def _write_hellaswag(path, labels):
    path.write_text("".join(json.dumps(
        {"ind": i, "activity_label": "x", "ctx_a": ctx, "ctx_b": "", "ctx": ctx, "endings": endings,
         "source_id": "s", "split": "val", "split_type": "indomain", "label": str(label)}) + "\n"
        for i, ((ctx, endings), label) in enumerate(zip(HELLASWAG_ROWS, labels))))


def _run_cli(model_dir, out, *options):
    return main(["eval", "lm-tasks", "--model", str(model_dir), "--device", "cpu", "--out", str(out),
                 "--no-progress", "--batch-size", "3", *options])


def _samples(out, task):
    return [r for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines()) if r["task"] == task]


def test_cli_end_to_end(model, model_dir, tmp_path, xlnet_tokenizer):
    """The lm-eval-backed command agrees with hand-computed LAMBADA and HellaSwag scores (one pass per token)."""
    pytest.importorskip("lm_eval")
    passages = ["The cat sat on the mat and looked at the dog",
                "He said hello",
                "A very long passage " + "with many words " * 6 + "ends here"]
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    hellaswag = tmp_path / "hellaswag.jsonl"
    _write_hellaswag(hellaswag, [0, 1, 2])
    out = tmp_path / "out"
    assert _run_cli(model_dir, out, "--lambada-file", str(lambada), "--hellaswag-file", str(hellaswag),
                    "--max-length", "16") == 0

    results = json.loads((out / "results.json").read_text())
    assert results["evaluation"] == "lm-tasks" and results["args"]["max_length"] == 16
    metrics = results["metrics"]
    assert metrics["lambada"]["examples"] == 3 and metrics["lambada"]["truncated"] == 1
    assert metrics["hellaswag"]["examples"] == 3 and metrics["hellaswag"]["truncated"] == 0
    summary = (out / "summary.md").read_text()
    assert "| lambada | 3 |" in summary and "| hellaswag | 3 |" in summary and "--max-length 16" in summary

    rows = _samples(out, "lambada")
    assert [r["target"] for r in rows] == ["dog", "hello", "here"] and rows[2]["context_truncated"]
    for passage, row in zip(passages, rows):
        ex = split_last_word(passage)
        context, target = _pair(xlnet_tokenizer, ex.context, " " + ex.target, 16)
        decoded = greedy_decode(model, context, len(target))
        assert row["correct"] == (decoded == target)
        assert row["log_likelihood"] == pytest.approx(_hand_log_likelihood(model, context, target), abs=1e-6)
    assert metrics["lambada"]["acc"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    assert metrics["lambada"]["ppl"] == pytest.approx(np.exp(-np.mean([r["log_likelihood"] for r in rows])))

    rows = _samples(out, "hellaswag")
    for (ctx, endings), row in zip(HELLASWAG_ROWS, rows):
        expected = [_hand_log_likelihood(model, *_pair(xlnet_tokenizer, ctx, " " + e, 16)) for e in endings]
        assert row["scores"] == pytest.approx(expected, abs=1e-6)
        assert row["chars"] == [len(e) for e in endings]  # lm-eval's acc_norm: the ending without its space
        assert row["prediction"] == int(np.argmax(expected)) and row["correct"] == (row["prediction"] == row["label"])
    assert metrics["hellaswag"]["acc"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    assert metrics["hellaswag"]["acc_norm"] == pytest.approx(np.mean([r["correct_norm"] for r in rows]))


def test_cli_hellaswag_accuracy_compares_labels_not_loop_indices(model_dir, tmp_path):
    pytest.importorskip("lm_eval")
    hellaswag = tmp_path / "hellaswag.jsonl"
    _write_hellaswag(hellaswag, [0, 0, 0])
    assert _run_cli(model_dir, tmp_path / "first", "--tasks", "hellaswag", "--hellaswag-file", str(hellaswag)) == 0
    predictions = [r["prediction"] for r in _samples(tmp_path / "first", "hellaswag")]
    # Labelled with the model's own choices, accuracy must be 1; comparing with the example index
    # (the reference defect) would give less, as the predictions are not 0, 1, 2.
    assert predictions != [0, 1, 2]
    _write_hellaswag(hellaswag, predictions)
    assert _run_cli(model_dir, tmp_path / "own", "--tasks", "hellaswag", "--hellaswag-file", str(hellaswag)) == 0
    assert json.loads((tmp_path / "own" / "results.json").read_text())["metrics"]["hellaswag"]["acc"] == 1.0
    _write_hellaswag(hellaswag, [(p + 1) % 4 for p in predictions])
    assert _run_cli(model_dir, tmp_path / "other", "--tasks", "hellaswag", "--hellaswag-file", str(hellaswag)) == 0
    assert json.loads((tmp_path / "other" / "results.json").read_text())["metrics"]["hellaswag"]["acc"] == 0.0


@pytest.mark.parametrize("task,option", [("lambada", "--lambada-file"), ("hellaswag", "--hellaswag-file")])
def test_cli_missing_data_names_the_option(task, option, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ASARM_DATA_DIR", str(tmp_path))
    _fake_datasets(monkeypatch, _offline)
    # the data are loaded before the model, so the model never needs to exist
    assert main(["eval", "lm-tasks", "--tasks", task, "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    default_file = {"lambada": lm.LAMBADA_FILE, "hellaswag": lm.HELLASWAG_FILE}[task]
    assert len(err) == 1 and err[0].startswith(f"asarm eval lm-tasks: error: {task} data not found: no {default_file} "
                                               f"in "
                                               f"the data directory ({tmp_path})")
    assert f"Pass {option} PATH" in err[0] and "--tasks" in err[0]


def test_cli_rejects_bad_options(tmp_path, capsys):
    assert main(["eval", "lm-tasks", "--tasks", "lambada,piqa"]) == 2
    assert "piqa" in capsys.readouterr().err
    assert main(["eval", "lm-tasks", "--limit", "0"]) == 2
    assert "--limit" in capsys.readouterr().err


def test_cli_without_lm_eval_says_what_to_install(model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    monkeypatch.delitem(sys.modules, "asarm.eval.lm_eval_model", raising=False)
    lambada = tmp_path / "lambada.jsonl"
    lambada.write_text(json.dumps({"text": "He said hello"}) + "\n")
    assert main(["eval", "lm-tasks", "--tasks", "lambada", "--lambada-file", str(lambada), "--model",
                 str(model_dir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'lm-eval" in err[0]
