"""Left-to-right tasks: LAMBADA and HellaSwag data loading and metrics (the model scoring lives elsewhere).

Each loader reads ``path`` if given; else a conventional file in the data directory
(``lambada/lambada_test.jsonl``, ``hellaswag/hellaswag_val.jsonl``); else the Hugging Face Hub via
``datasets``. If the Hub cannot be reached, DataFileNotFoundError says what to download or pass.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from numpy.typing import ArrayLike

from ..paths import DataFileNotFoundError, data_file

__all__ = ["LAMBADA_FILE", "LAMBADA_HUB", "HELLASWAG_FILE", "HELLASWAG_HUB", "LambadaExample", "split_last_word",
           "load_lambada", "lambada_accuracy", "HellaSwagExample", "load_hellaswag", "hellaswag_accuracy"]

LAMBADA_FILE = "lambada/lambada_test.jsonl"
LAMBADA_HUB = ("EleutherAI/lambada_openai", "default", "test")  # (dataset, config, split)
HELLASWAG_FILE = "hellaswag/hellaswag_val.jsonl"
HELLASWAG_HUB = ("Rowan/hellaswag", None, "validation")


def _rows(path: str | os.PathLike | None, default_file: str, hub: tuple[str, str | None, str]) -> Iterable[Any]:
    """JSON rows (or raw text lines, for a non-JSON-lines file) from a file, else from the Hub."""
    file = data_file(path) if path is not None else data_file(default_file, required=False)
    if file is not None:
        return _read_file(file)
    name, config, split = hub
    try:
        import datasets
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        raise DataFileNotFoundError(
            f"no local file (looked for {default_file!r} in the data directory) and the Hub dataset {name!r} "
            f"(split {split!r}) could not be loaded ({type(exc).__name__}: {exc}); pass a local file's path "
            f"or place it there") from exc


def _read_file(file: Path) -> list[Any]:
    lines = [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if file.suffix in (".jsonl", ".json"):
        return [json.loads(line) for line in lines]
    return lines


@dataclass(frozen=True)
class LambadaExample:
    context: str  # the passage up to the last word, no trailing space
    target: str   # the last word; the continuation to score or generate is " " + target


def split_last_word(passage: str) -> LambadaExample:
    """Split a passage at its last space into context and last word."""
    context, _, target = passage.strip().rpartition(" ")
    if not context or not target:
        raise ValueError(f"cannot split a LAMBADA passage into context and last word: {passage[:80]!r}")
    return LambadaExample(context, target)


def load_lambada(path: str | os.PathLike | None = None, limit: int | None = None) -> list[LambadaExample]:
    """LAMBADA passages split into (context, last word). A .jsonl/.json file has one object with a
    "text" field per line (the lambada_openai format); any other file has one passage per line."""
    rows = _rows(path, LAMBADA_FILE, LAMBADA_HUB)
    return [split_last_word(row["text"] if isinstance(row, dict) else row) for row in rows][:limit]


def lambada_accuracy(predicted_words: Sequence[str], targets: Sequence[str]) -> float:
    """Fraction of exact matches (after stripping surrounding whitespace; no other normalisation)."""
    if len(predicted_words) != len(targets):
        raise ValueError(f"{len(predicted_words)} predictions but {len(targets)} targets")
    if not targets:
        raise ValueError("no LAMBADA predictions to score")
    return sum(p.strip() == t.strip() for p, t in zip(predicted_words, targets)) / len(targets)


@dataclass(frozen=True)
class HellaSwagExample:
    context: str               # the "ctx" field as given (no lm-eval-harness text clean-up)
    endings: tuple[str, ...]   # the candidate continuations are " " + ending
    label: int                 # index of the true ending


def load_hellaswag(path: str | os.PathLike | None = None, limit: int | None = None) -> list[HellaSwagExample]:
    """HellaSwag rows in the official JSON-lines format (fields ctx, endings, label)."""
    examples = []
    for row in _rows(path, HELLASWAG_FILE, HELLASWAG_HUB):
        if not isinstance(row, dict) or not {"ctx", "endings", "label"} <= row.keys():
            raise ValueError("HellaSwag rows need the fields ctx, endings and label")
        if str(row["label"]).strip() == "":
            raise ValueError("a HellaSwag row has no label (the test split is unlabelled; use validation)")
        examples.append(HellaSwagExample(row["ctx"], tuple(row["endings"]), int(row["label"])))
    return examples[:limit]


def hellaswag_accuracy(scores: ArrayLike, lengths: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Accuracy of the argmax ending per example against its label.

    ``scores (N, K)``: summed log-probabilities of each ending given the context; ``lengths (N, K)``:
    each ending's length in the caller's unit (tokens, or bytes as lm-eval-harness uses) for the
    normalised score ``scores / lengths``; ``labels (N,)``: true ending indices. Returns
    ``{"acc": sum-logprob accuracy, "acc_norm": length-normalised accuracy}``; ties go to the first ending.
    """
    scores, lengths, labels = np.asarray(scores, float), np.asarray(lengths, float), np.asarray(labels)
    if scores.ndim != 2 or scores.shape[0] == 0 or scores.shape != lengths.shape:
        raise ValueError(f"scores and lengths must both be (N, K) with N > 0, got {scores.shape} and {lengths.shape}")
    if labels.shape != (scores.shape[0],):
        raise ValueError(f"labels must be ({scores.shape[0]},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"labels must be integers in [0, {scores.shape[1]})")
    if np.any(lengths <= 0):
        raise ValueError("lengths must be positive")
    return {"acc": float(np.mean(scores.argmax(1) == labels)),
            "acc_norm": float(np.mean((scores / lengths).argmax(1) == labels))}
