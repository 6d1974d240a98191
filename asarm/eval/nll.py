"""Held-out oracle NLL per token at a masking rate with random any-subset orders, next to a unigram baseline.

Each chunk of the evaluation text (packed as the trainer packs) gets a random visible subset of
``(1 - masking_rate) * length`` positions; the other tokens are scored left to right under the
oracle mask in one exact forward pass (``ASARM.score``). The unigram baseline predicts every target
token from add-one smoothed token frequencies of a training text (``<mask>`` excluded), on the
same targets. Both are in nats per target token.
"""

from __future__ import annotations

import argparse
import math

import torch
from tqdm.auto import tqdm

from .. import orders
from .arguments import add_model_arguments, load_model, parse_count_or_all, unset_means
from .markdown import markdown_table
from .record import EvalRun
from .texts import packed_text
from .stats import summarize

__all__ = ["unigram_log_probs", "heldout_nll", "add_arguments", "run"]

# The embedded model's training text (its unigram baseline); the test text is WikiText-2 raw test.
DEFAULT_UNIGRAM_TEXT = "wikitext-2/valid.txt"
# Small enough for about a minute on 2 CPU cores with the embedded model; --num-sequences all for the whole text.
DEFAULT_NUM_SEQUENCES = 512


def unigram_log_probs(chunks: torch.Tensor, vocab_size: int, mask_token_id: int) -> torch.Tensor:
    """Float64 log-probabilities ``(V,)`` of add-one smoothed token counts (``<mask>``: -inf)."""
    counts = torch.bincount(chunks.reshape(-1), minlength=vocab_size).double() + 1.0
    counts[mask_token_id] = 0.0
    return (counts / counts.sum()).log()


@torch.no_grad()
def heldout_nll(model, chunks: torch.Tensor, masking_rate: float, unigram: torch.Tensor, batch_size: int = 16,
                generator: torch.Generator | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
    """Per-chunk summed NLLs of the model and of the unigram baseline, and target counts."""
    if not 0.0 < masking_rate < 1.0:
        raise ValueError(f"masking_rate must lie in (0, 1), got {masking_rate}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num, length = chunks.shape
    n_prompt = orders.num_prompt_for_rate(masking_rate, torch.full((num,), length))
    if int(n_prompt.min()) < 1:
        raise ValueError(f"masking_rate {masking_rate} leaves no visible token at length {length}")
    sigma = orders.any_subset(n_prompt, length, generator=generator)
    model_nll, unigram_nll = [], []
    device = model.device
    for start in tqdm(range(0, num, batch_size), desc="nll", disable=not progress):
        rows = slice(start, start + batch_size)
        model_nll.append(-model.score(chunks[rows].to(device), sigma[rows].to(device), n_prompt[rows].to(device)).cpu())
        targets = sigma[rows] >= n_prompt[rows, None]
        unigram_nll.append(-(unigram[chunks[rows]] * targets).sum(1))
    return {"model": torch.cat(model_nll), "unigram": torch.cat(unigram_nll), "targets": length - n_prompt}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, out="runs/eval/nll")
    g = parser.add_argument_group("data")
    g.add_argument("--text-file", default=None,
                   help="evaluation text, one document a line" + unset_means("WikiText-2 raw test, else the Hub"))
    g.add_argument("--unigram-file", default=DEFAULT_UNIGRAM_TEXT,
                   help="training text for the unigram baseline (default: %(default)s, the embedded model's "
                        "training text)")
    g.add_argument("--length", type=int, default=128, help="tokens per chunk")
    g.add_argument("--num-sequences", type=parse_count_or_all, default=DEFAULT_NUM_SEQUENCES,
                   help="first chunks of the text to score, or 'all' (WikiText-2 raw test: 3284 of 128 tokens)")
    g.add_argument("--masking-rate", type=float, default=0.95, help="fraction of each chunk scored")
    g.add_argument("--batch-size", type=int, default=16, help="chunks per forward pass")


def _predictor_metrics(nll: torch.Tensor, targets: torch.Tensor) -> dict:
    """NLL per target token (pooled over chunks), its perplexity and a t interval of the per-chunk means."""
    per_token = float(nll.sum()) / int(targets.sum())
    lo, hi = summarize((nll / targets).tolist()).ci95
    return {"nll_per_token": per_token, "perplexity": math.exp(per_token),
            "per_sequence_ci95": [None if math.isnan(lo) else lo, None if math.isnan(hi) else hi]}


def _table_row(name: str, metrics: dict) -> dict:
    lo, hi = metrics["per_sequence_ci95"]
    return {"predictor": name, "NLL/token (nats)": metrics["nll_per_token"],
            "per-sequence 95% CI": "n/a" if lo is None else f"[{lo:.3f}, {hi:.3f}]",
            "perplexity": metrics["perplexity"]}


def run(args: argparse.Namespace) -> dict:
    model = load_model(args)
    run_ = EvalRun("nll", args)
    chunks = packed_text(model.tokenizer, args.length, args.text_file, args.num_sequences)
    train_chunks = packed_text(model.tokenizer, args.length, args.unigram_file)
    unigram = unigram_log_probs(train_chunks, model.vocab_size, model.mask_token_id)
    generator = torch.Generator().manual_seed(args.seed)
    nll = heldout_nll(model, chunks, args.masking_rate, unigram, args.batch_size, generator, not args.no_progress)
    total = int(nll["targets"].sum())
    metrics = {"sequences": len(chunks), "length": args.length, "masking_rate": args.masking_rate,
               "targets": total, "unigram_training_tokens": int(train_chunks.numel())}
    for name in ("model", "unigram"):
        metrics[name] = _predictor_metrics(nll[name], nll["targets"])
    run_.samples({"index": i, "model_nll": float(nll["model"][i]), "unigram_nll": float(nll["unigram"][i]),
                  "targets": int(nll["targets"][i])} for i in range(len(chunks)))
    summary = (f"{len(chunks)} chunks of {args.length} tokens, {args.masking_rate:.0%} masked "
               f"(random any-subset orders, oracle mask), {total} target tokens.\n\n"
               + markdown_table([_table_row(name, metrics[name]) for name in ("model", "unigram")]))
    return run_.finish(metrics, summary)
