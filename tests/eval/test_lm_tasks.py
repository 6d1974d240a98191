import json
import sys
import types

import numpy as np
import pytest

import asarm.eval.lm_tasks as lm
from asarm.eval.lm_tasks import (HellaSwagExample, LambadaExample, hellaswag_accuracy, lambada_accuracy,
                                 load_hellaswag, load_lambada, split_last_word)
from asarm.paths import DataFileNotFoundError


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


def test_lambada_accuracy():
    assert lambada_accuracy(["dog", " cat", "Cow"], ["dog", "cat", "cow"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        lambada_accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        lambada_accuracy([], [])


def _fake_datasets(monkeypatch, load_dataset):
    """Stand-in for the ``datasets`` package: no network, and no slow import."""
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def _offline(*args, **kwargs):
    raise ConnectionError("no network")


def test_hub_fallback_fails_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("ASARM_DATA_DIR", str(tmp_path))
    _fake_datasets(monkeypatch, _offline)
    with pytest.raises(DataFileNotFoundError, match="EleutherAI/lambada_openai.*no network"):
        load_lambada()
    with pytest.raises(DataFileNotFoundError, match="Rowan/hellaswag"):
        load_hellaswag()


def test_hub_rows_are_parsed(tmp_path, monkeypatch):
    monkeypatch.setenv("ASARM_DATA_DIR", str(tmp_path))
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
