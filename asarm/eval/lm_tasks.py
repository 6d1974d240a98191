"""Left-to-right tasks: LAMBADA (greedy last-word exact match, with its log-likelihood) and HellaSwag
(ending log-likelihoods, summed and per character), scored exactly with the oracle mask.

Each loader reads ``path`` if given; else a conventional file in the data directory
(``lambada/lambada_test.jsonl``, ``hellaswag/hellaswag_val.jsonl``); else the Hugging Face Hub via
``datasets``. If the Hub cannot be reached, DataFileNotFoundError says what to download or pass.

The context is visible and the continuation (``" " + word`` or ``" " + ending``) is decoded left to
right, so one teacher-forced oracle pass per row gives every conditional needed. Nothing is sampled,
so the results are deterministic (no seed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike
from tqdm.auto import tqdm

from ..model import ASARM
from ..orders import infilling
from ..paths import DataFileNotFoundError, data_dir, data_file
from ..tokenization import decode_text, encode_text
from .likelihood import log_likelihood
from .runner import EvalRun, add_model_arguments, load_model, markdown_table, parse_choices, unset_means

__all__ = ["LAMBADA_FILE", "LAMBADA_HUB", "HELLASWAG_FILE", "HELLASWAG_HUB", "TASKS", "LambadaExample",
           "split_last_word", "load_lambada", "HellaSwagExample", "load_hellaswag",
           "hellaswag_accuracy", "encode_pair", "GreedyCheck", "greedy_check", "continuation_log_likelihoods",
           "add_arguments", "run"]

LAMBADA_FILE = "lambada/lambada_test.jsonl"
LAMBADA_HUB = ("EleutherAI/lambada_openai", "default", "test")  # (dataset, config, split)
HELLASWAG_FILE = "hellaswag/hellaswag_val.jsonl"
HELLASWAG_HUB = ("Rowan/hellaswag", None, "validation")
TASKS = ("lambada", "hellaswag")


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
            f"no {default_file} in the data directory ({data_dir()}) and the Hub dataset {name!r} (split "
            f"{split!r}) could not be loaded ({type(exc).__name__}: {' '.join(str(exc).split())})") from exc


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


# ------------------------------------------------------------------------------------- scoring
Pair = tuple[list[int], list[int]]  # (context token ids, continuation token ids)


def encode_pair(tokenizer, context: str, continuation: str, max_length: int) -> tuple[list[int], list[int], bool]:
    """``(context_ids, continuation_ids, truncated)`` with at most ``max_length`` tokens in all.

    The two are tokenised separately so the continuation's tokens are well defined. XLNet's
    SentencePiece tokenizer drops the leading space of ``" " + word`` and starts the word with a
    "▁" piece, which is exactly how the word is tokenised inside the whole passage (pieces never
    span a space), so ``context_ids + continuation_ids`` equals the passage's own tokens. A context
    too long keeps its last tokens (``truncated`` is then True).
    """
    context_ids, continuation_ids = encode_text(context, tokenizer), encode_text(continuation, tokenizer)
    if not continuation_ids:
        raise ValueError(f"the continuation {continuation!r} has no tokens")
    room = max_length - len(continuation_ids)
    if room < 1:
        raise ValueError(f"the continuation {continuation[:80]!r} has {len(continuation_ids)} tokens, which leaves "
                         f"no room for context within --max-length {max_length}")
    if not context_ids:
        # XLNet's query stream needs at least one visible token.
        raise ValueError(f"the context {context[:80]!r} has no tokens")
    return context_ids[-room:], continuation_ids, len(context_ids) > room


def _batches(model: ASARM, pairs: Sequence[Pair], batch_size: int, progress: bool, desc: str
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(tokens, visible, lengths, n_context)`` per batch: rows ``context + continuation``, right-padded
    (padding holds the last ranks, so no real token sees it)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    with tqdm(total=len(pairs), desc=desc, unit="row", disable=not progress) as bar:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            n_context = torch.tensor([len(c) for c, _ in chunk])
            lengths = torch.tensor([len(c) + len(t) for c, t in chunk])
            tokens = torch.full((len(chunk), int(lengths.max())), model.mask_token_id, dtype=torch.long)
            for row, (context, target) in enumerate(chunk):
                tokens[row, :lengths[row]] = torch.tensor(context + target)
            visible = torch.arange(tokens.shape[1])[None, :] < n_context[:, None]
            yield tokens, visible, lengths, n_context
            bar.update(len(chunk))


@dataclass(frozen=True)
class GreedyCheck:
    correct: bool              # greedy decoding of len(continuation) tokens reproduces the continuation
    log_likelihood: float      # log p(continuation | context), nats, left to right
    greedy_prefix: list[int]   # greedy's tokens up to and including its first wrong one (all when correct)


def greedy_check(model: ASARM, pairs: Sequence[Pair], batch_size: int = 16, progress: bool = False
                 ) -> list[GreedyCheck]:
    """Whether greedy left-to-right decoding of each continuation's length reproduces it exactly.

    Greedy picks ``y_i = argmax p(. | context, y_<i)``. If ``y_<i`` equals the true ``x_<i``, then
    ``y_i = argmax p(. | context, x_<i)``; so by induction the output is ``x`` iff at every position
    the argmax of the conditional given the context and the TRUE previous tokens is the true token,
    and the first position where that fails is where greedy leaves ``x``. The oracle mask gives all of
    these conditionals in one teacher-forced pass. The argmax is over the vocabulary without
    ``<mask>`` (``log_probs`` excludes it, as every sampler does).
    """
    results = []
    for tokens, visible, lengths, n_context in _batches(model, pairs, batch_size, progress, "lambada"):
        sigma, n_prompt = infilling(visible, lengths)  # visible prefix, then the continuation left to right
        num_targets = lengths - n_context
        slots = torch.arange(int(num_targets.max()))
        valid = slots[None, :] < num_targets[:, None]
        positions = torch.where(valid, n_context[:, None] + slots, -1)  # -1: unused query slot
        logp = model.log_probs(tokens, sigma, n_prompt, positions)
        truth = tokens.gather(1, positions.clamp(min=0))
        picked = logp.gather(2, truth[..., None].to(logp.device)).squeeze(-1).cpu()
        argmax = logp.argmax(-1).cpu()
        for row in range(len(tokens)):
            n = int(num_targets[row])
            wrong = (argmax[row, :n] != truth[row, :n]).nonzero().flatten().tolist()
            end = wrong[0] + 1 if wrong else n
            prefix = truth[row, :end].tolist()
            prefix[-1] = int(argmax[row, end - 1])
            results.append(GreedyCheck(not wrong, float(picked[row, :n].sum()), prefix))
    return results


def continuation_log_likelihoods(model: ASARM, pairs: Sequence[Pair], batch_size: int = 16, progress: bool = False,
                                 desc: str = "score") -> torch.Tensor:
    """Exact ``log p(continuation | context)`` (left to right) per pair, ``(N,)`` float64 nats."""
    scores = [log_likelihood(model, tokens, visible, lengths)
              for tokens, visible, lengths, _ in _batches(model, pairs, batch_size, progress, desc)]
    return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)


# ----------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tasks")
    g.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    g.add_argument("--lambada-file", default=None,
                   help="LAMBADA .jsonl with a 'text' field per line (lambada_openai), or one passage per line"
                        + unset_means(f"{LAMBADA_FILE} in the data directory, else the Hub {LAMBADA_HUB[0]}"))
    g.add_argument("--hellaswag-file", default=None,
                   help="HellaSwag .jsonl in the official format (ctx, endings, label)"
                        + unset_means(f"{HELLASWAG_FILE} in the data directory, else the Hub {HELLASWAG_HUB[0]}"))
    g.add_argument("--limit", type=int, default=None, help="first N examples of each task" + unset_means("all"))
    g.add_argument("--max-length", type=int, default=512,
                   help="tokens per row; a longer context keeps its last tokens (counted as 'truncated')")
    g.add_argument("--batch-size", type=int, default=16, help="rows scored together (HellaSwag: one row per ending)")
    add_model_arguments(parser, out="runs/eval/lm_tasks", seed=False)  # nothing is sampled


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


def _run_lambada(model: ASARM, examples: list[LambadaExample], args, out: EvalRun) -> dict:
    encoded = [encode_pair(model.tokenizer, ex.context, " " + ex.target, args.max_length) for ex in examples]
    checks = greedy_check(model, [(c, t) for c, t, _ in encoded], args.batch_size, not args.no_progress)
    out.samples({"task": "lambada", "index": i, "target": ex.target,
                 # on a miss: greedy's output up to its first wrong token (the rest would need more passes)
                 "prediction": decode_text(check.greedy_prefix, model.tokenizer), "correct": check.correct,
                 "log_likelihood": check.log_likelihood, "target_tokens": len(target),
                 "context_tokens": len(context), "context_truncated": cut}
                for i, (ex, (context, target, cut), check) in enumerate(zip(examples, encoded, checks)))
    log_likelihoods = np.array([c.log_likelihood for c in checks])
    num_tokens = sum(len(t) for _, t, _ in encoded)
    return {"examples": len(examples), "acc": float(np.mean([c.correct for c in checks])),
            # per word, as lm-eval-harness reports LAMBADA perplexity
            "ppl": math.exp(-float(log_likelihoods.mean())),
            "nll_per_token": -float(log_likelihoods.sum()) / num_tokens,
            "truncated": sum(cut for _, _, cut in encoded)}


def _run_hellaswag(model: ASARM, examples: list[HellaSwagExample], args, out: EvalRun) -> dict:
    if len({len(ex.endings) for ex in examples}) != 1:
        raise ValueError("every HellaSwag example needs the same number of endings")
    encoded = [[encode_pair(model.tokenizer, ex.context, " " + ending, args.max_length) for ending in ex.endings]
               for ex in examples]
    pairs = [(c, t) for row in encoded for c, t, _ in row]
    scores = continuation_log_likelihoods(model, pairs, args.batch_size, not args.no_progress, "hellaswag")
    scores = scores.reshape(len(examples), -1).numpy()
    # acc_norm divides by the ending's length in characters, as lm-eval-harness does.
    chars = np.array([[len(" " + ending) for ending in ex.endings] for ex in examples])
    labels = np.array([ex.label for ex in examples])
    predictions, predictions_norm = scores.argmax(1), (scores / chars).argmax(1)
    out.samples({"task": "hellaswag", "index": i, "label": ex.label, "prediction": int(predictions[i]),
                 "prediction_norm": int(predictions_norm[i]), "correct": bool(predictions[i] == ex.label),
                 "correct_norm": bool(predictions_norm[i] == ex.label), "scores": scores[i].tolist(),
                 "chars": chars[i].tolist(), "ending_tokens": [len(t) for _, t, _ in encoded[i]],
                 "context_truncated": any(cut for _, _, cut in encoded[i])}
                for i, ex in enumerate(examples))
    return {"examples": len(examples), **hellaswag_accuracy(scores, chars, labels),
            "truncated": sum(any(cut for _, _, cut in row) for row in encoded)}


def run(args: argparse.Namespace) -> dict:
    tasks = parse_choices(args.tasks, TASKS, "task")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.max_length < 2:
        raise ValueError(f"--max-length must be >= 2, got {args.max_length}")
    # Load the data before the model, so a missing file fails at once.
    files = {"lambada": args.lambada_file, "hellaswag": args.hellaswag_file}
    data = {task: _load(task, files[task], args.limit) for task in tasks}
    model = load_model(args)
    out = EvalRun("lm-tasks", args)
    runners = {"lambada": _run_lambada, "hellaswag": _run_hellaswag}
    metrics = {task: runners[task](model, data[task], args, out) for task in tasks}
    rows = [{"task": task, **m} for task, m in metrics.items()]
    columns = ["task", "examples", "acc", "acc_norm", "ppl", "nll_per_token", "truncated"]
    summary = (f"Model `{args.model}`. LAMBADA: greedy last-word exact match (acc) and per-word perplexity; "
               f"HellaSwag: argmax of the summed (acc) and per-character (acc_norm) ending log-likelihood.\n\n"
               + markdown_table(rows, columns)
               + f"\n'truncated': examples whose context was cut to its last tokens to fit --max-length "
                 f"{args.max_length}.\n")
    return out.finish(metrics, summary)
