"""Left-to-right tasks through lm-evaluation-harness: LAMBADA (greedy last-word exact match and per-word
perplexity, ``lambada_openai``'s scoring) and HellaSwag (``hellaswag``'s acc and acc_norm over the endings),
both scored exactly with the oracle mask by the ``asarm`` lm-eval model (:mod:`asarm.eval.lm_eval_model`).

Each loader reads ``path`` if given; else a conventional file in the data directory
(``lambada/lambada_test.jsonl``, ``hellaswag/hellaswag_val.jsonl``); else the Hugging Face Hub via
``datasets``. If the Hub cannot be reached, DataFileNotFoundError says what to download or pass.

``run`` loads the rows first (so missing data fail at once, without lm-eval or the model), writes them as
JSON lines into the output directory and hands lm-eval one task per dataset over that local file:
LAMBADA as ``lambada_openai`` formulates it (context = the passage up to its last word, continuation =
``" " + word``, ``acc`` = greedy reproduces the word, ``perplexity`` = exp of the mean negative
log-likelihood), HellaSwag as ``hellaswag`` does (continuation ``" " + ending``, ``acc`` on the summed
log-likelihood, ``acc_norm`` on it divided by the ending's length in characters) but with ``ctx`` as given
(no activity label, no text clean-up). Nothing is sampled, so the results are deterministic (no seed).
lm-eval is an optional dependency, imported only here.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from numpy.typing import ArrayLike

from ..inputs import content_suffix, iter_jsonl, read_text
from ..offline import hub_offline, offline_reason
from ..paths import DataFileNotFoundError, data_dir, data_file
from .commands import check_lm_tasks
from .arguments import load_model
from .markdown import markdown_table
from .record import EvalRun

__all__ = ["LAMBADA_FILE", "LAMBADA_HUB", "HELLASWAG_FILE", "HELLASWAG_HUB", "LambadaExample",
           "split_last_word", "load_lambada", "HellaSwagExample", "load_hellaswag", "hellaswag_accuracy",
           "task_configs", "run"]

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
    if hub_offline():
        raise DataFileNotFoundError(f"no {default_file} in the data directory ({data_dir()}), and the Hub dataset "
                                    f"{name!r} cannot be fetched: {offline_reason()}; pass the file or set "
                                    f"ASARM_DATA_DIR")
    try:
        import datasets
        return datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        raise DataFileNotFoundError(
            f"no {default_file} in the data directory ({data_dir()}) and the Hub dataset {name!r} (split "
            f"{split!r}) could not be loaded ({type(exc).__name__}: {' '.join(str(exc).split())})") from exc


def _read_file(file: Path) -> list[Any]:
    if content_suffix(file) in (".jsonl", ".json"):
        return [row for _, row in iter_jsonl(file)]
    return [line for line in read_text(file).splitlines() if line.strip()]


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


# ----------------------------------------------------------------------------------------- CLI
def _load(task: str, path: str | None, limit: int | None) -> list:
    loader, option = {"lambada": (load_lambada, "--lambada-file"),
                      "hellaswag": (load_hellaswag, "--hellaswag-file")}[task]
    try:
        examples = loader(path, limit)
    except DataFileNotFoundError as err:
        raise DataFileNotFoundError(f"{task} data not found: {err}. Pass {option} PATH, place the file in the data "
                                    f"directory, or leave {task} out of --tasks") from err
    if not examples:
        raise ValueError(f"no {task} examples were loaded")
    return examples


def task_configs(files: dict[str, Path]) -> list[dict]:
    """lm-eval task configs over local JSON-lines files (``lambada``: rows with ``context`` and ``target``;
    ``hellaswag``: rows with ``context``, ``endings`` and ``label``), formulated as ``lambada_openai`` and
    ``hellaswag`` are."""
    configs = {
        "lambada": {"output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{' ' + target}}",
                    "target_delimiter": "", "metric_list": [
                        {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                        {"metric": "acc", "aggregation": "mean", "higher_is_better": True}]},
        "hellaswag": {"output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_target": "{{label}}",
                      "doc_to_choice": "{{endings}}", "metric_list": [
                          {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                          {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]},
    }
    return [{"task": f"asarm_{task}", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(file)}},
             "test_split": "test", **configs[task], "metadata": {"version": 1.0}} for task, file in files.items()]


def _lm_eval():
    try:
        import lm_eval
        from . import lm_eval_model
    except ImportError as err:
        raise ValueError(f"asarm eval lm-tasks runs on lm-eval, which is not installed ({err}); "
                         f"pip install 'lm-eval>=0.4.13,<0.5'") from err
    return lm_eval, lm_eval_model


def _samples(results: dict, task: str) -> list[dict]:
    return sorted(results["samples"][f"asarm_{task}"], key=lambda s: s["doc_id"])


def _lambada_metrics(results: dict, lm, examples: list[LambadaExample], out: EvalRun) -> dict:
    encoded = [lm.encode_pair(ex.context, " " + ex.target) for ex in examples]
    cut = [len(lm.windows(c, t)[0][0]) < len(c) for c, t in encoded]
    samples = _samples(results, "lambada")
    lls = np.array([s["resps"][0][0][0] for s in samples])
    correct = [bool(s["resps"][0][0][1]) for s in samples]
    out.samples({"task": "lambada", "index": i, "target": ex.target, "correct": ok, "log_likelihood": float(ll),
                 "target_tokens": len(t), "context_tokens": len(c), "context_truncated": truncated}
                for i, (ex, (c, t), truncated, ll, ok) in enumerate(zip(examples, encoded, cut, lls, correct)))
    task = results["results"]["asarm_lambada"]
    return {"examples": len(examples), "acc": float(task["acc,none"]),
            # per word, as lm-eval reports LAMBADA perplexity: exp(-mean log-likelihood)
            "ppl": float(task["perplexity,none"]),
            "nll_per_token": -float(lls.sum()) / sum(len(t) for _, t in encoded), "truncated": sum(cut)}


def _hellaswag_metrics(results: dict, lm, examples: list[HellaSwagExample], out: EvalRun) -> dict:
    samples = _samples(results, "hellaswag")
    scores = np.array([[r[0][0] for r in s["resps"]] for s in samples])
    # acc_norm divides by the ending's length in characters (without the leading space), as lm-eval does
    chars = np.array([[len(e) for e in ex.endings] for ex in examples])
    encoded = [[lm.encode_pair(ex.context, " " + e) for e in ex.endings] for ex in examples]
    cut = [any(len(lm.windows(c, t)[0][0]) < len(c) for c, t in row) for row in encoded]
    predictions, predictions_norm = scores.argmax(1), (scores / chars).argmax(1)
    out.samples({"task": "hellaswag", "index": i, "label": ex.label, "prediction": int(predictions[i]),
                 "prediction_norm": int(predictions_norm[i]), "correct": bool(predictions[i] == ex.label),
                 "correct_norm": bool(predictions_norm[i] == ex.label), "scores": scores[i].tolist(),
                 "chars": chars[i].tolist(), "ending_tokens": [len(t) for _, t in encoded[i]],
                 "context_truncated": cut[i]}
                for i, ex in enumerate(examples))
    task = results["results"]["asarm_hellaswag"]
    return {"examples": len(examples), "acc": float(task["acc,none"]), "acc_norm": float(task["acc_norm,none"]),
            "truncated": sum(cut)}


def run(args: argparse.Namespace) -> dict:
    tasks = check_lm_tasks(args)
    # Load the data before lm-eval and the model, so missing data fail at once.
    files = {"lambada": args.lambada_file, "hellaswag": args.hellaswag_file}
    data = {task: _load(task, files[task], args.limit) for task in tasks}
    if "hellaswag" in data and len({len(ex.endings) for ex in data["hellaswag"]}) != 1:
        raise ValueError("every HellaSwag example needs the same number of endings")
    lm_eval, lm_eval_model = _lm_eval()
    model = load_model(args)
    out = EvalRun("lm-tasks", args)
    local = {task: out.path(f"{task}_docs.jsonl") for task in tasks}
    for task, file in local.items():
        file.write_text("".join(json.dumps(asdict(ex)) + "\n" for ex in data[task]))
    lm = lm_eval_model.ASARMLM(model=model, batch_size=args.batch_size, max_length=args.max_length)
    results = lm_eval.simple_evaluate(model=lm, tasks=task_configs(local), log_samples=True, bootstrap_iters=0)
    runners = {"lambada": _lambada_metrics, "hellaswag": _hellaswag_metrics}
    metrics = {task: runners[task](results, lm, data[task], out) for task in tasks}
    rows = [{"task": task, **m} for task, m in metrics.items()]
    columns = ["task", "examples", "acc", "acc_norm", "ppl", "nll_per_token", "truncated"]
    summary = (f"Model `{args.model}`, scored by lm-eval {lm_eval.__version__} (model `asarm`). LAMBADA: greedy "
               f"last-word exact match (acc) and per-word perplexity; HellaSwag: argmax of the summed (acc) and "
               f"per-character (acc_norm) ending log-likelihood.\n\n"
               + markdown_table(rows, columns)
               + f"\n'truncated': examples whose context was cut to its last tokens to fit --max-length "
                 f"{args.max_length}.\n")
    return out.finish(metrics, summary)
