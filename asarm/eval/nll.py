"""Held-out oracle NLL at a masking rate with random any-subset orders, next to a unigram baseline: per
token, per byte and per word.

Each chunk of the evaluation text (packed as the trainer packs) gets a random visible subset of
``(1 - masking_rate) * length`` positions; the other tokens (the targets) are scored left to right under
the oracle mask in one exact forward pass (``ASARM.score``). The unigram baseline predicts every target
token from add-one smoothed token frequencies of a training text (``<mask>`` excluded), on the same
targets.

Units. Nats per token do not compare across tokenizers; nats per byte and per word do:

- **per token**: total target NLL / number of target tokens.
- **per byte**: total target NLL / the UTF-8 bytes of the text the targets stand for. A token stands for
  its piece's text (SentencePiece's ``▁`` is one space, so a word-initial piece counts the space before
  its word), ``</s>`` (the end of a line, after each document) for one byte (the newline), other special
  tokens for none, ``<unk>`` for one byte (it hides at least one character the tokenizer cannot spell;
  the number of ``<unk>`` targets is reported). The bytes are those of the text as the tokenizer
  normalises it (XLNet's normaliser: runs of spaces and accents dropped), so two tokenizers with the
  same normaliser count the same bytes for the same text (``token_byte_lengths``).
- **per word**: total target NLL / the words the targets cover, i.e. their bytes times the words per
  byte of the whole evaluated text (its words: the tokens that begin with ``▁``, one per
  whitespace-separated word, plus one per line end). It is the per-byte figure times the evaluated
  text's bytes per word, so per byte and per word rank two models alike on the same text.

At masking rate r each chunk scores about r of its tokens and so about r of its bytes; the visible ones
are the context. To compare two tokenizers on exactly the same text, score the whole text
(``--num-sequences all``): a prefix of N chunks of L tokens covers more text with the tokenizer that
spells it in fewer tokens.

Intervals (95%, Student t over the chunks): per token, of the chunks' own NLL per target token (every
chunk has the same number of targets, so their mean is the pooled figure); per byte and per word, the
ratio estimator's interval around the pooled figure R = sum(NLL) / sum(bytes): R plus the t interval of
the mean of (NLL_i - R bytes_i) / mean(bytes) (the delta method; chunks hold different numbers of bytes,
so the mean of the chunks' own ratios is not R).
"""

from __future__ import annotations

import argparse
import math

import torch
from tqdm.auto import tqdm

from .. import orders
from ..tokenization import WORD_START
from .arguments import load_model
from .commands import check_nll
from .markdown import markdown_table
from .record import EvalRun
from .texts import packed_text
from .stats import summarize

__all__ = ["unigram_log_probs", "token_byte_lengths", "token_word_starts", "heldout_nll", "run"]



def unigram_log_probs(chunks: torch.Tensor, vocab_size: int, mask_token_id: int) -> torch.Tensor:
    """Float64 log-probabilities ``(V,)`` of add-one smoothed token counts (``<mask>``: -inf)."""
    counts = torch.bincount(chunks.reshape(-1), minlength=vocab_size).double() + 1.0
    counts[mask_token_id] = 0.0
    return (counts / counts.sum()).log()


_EOS_TOKEN_ID = 2


def _pieces(tokenizer) -> list[str]:
    return tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def token_byte_lengths(tokenizer) -> torch.Tensor:
    """``(V,)`` int64: the UTF-8 bytes of the text each token id stands for (see the module doc):
    its piece with ``▁`` as one space; ``</s>`` 1 (a line end); ``<unk>`` 1; other special tokens 0."""
    special = set(tokenizer.all_special_ids)
    out = []
    for i, piece in enumerate(_pieces(tokenizer)):
        if i == _EOS_TOKEN_ID or i == tokenizer.unk_token_id:
            out.append(1)
        elif i in special or piece is None:
            out.append(0)
        else:
            out.append(len(piece.replace(WORD_START, " ").encode("utf-8")))
    return torch.tensor(out, dtype=torch.long)


def token_word_starts(tokenizer) -> torch.Tensor:
    """``(V,)`` int64: 1 for the tokens that begin a word (a piece starting with ``▁``, and ``</s>``, the
    line end counted as a word as WikiText's word counts do), else 0."""
    return torch.tensor([int(i == _EOS_TOKEN_ID or (piece is not None and piece.startswith(WORD_START)))
                         for i, piece in enumerate(_pieces(tokenizer))], dtype=torch.long)


@torch.no_grad()
def heldout_nll(model, chunks: torch.Tensor, masking_rate: float, unigram: torch.Tensor, batch_size: int = 16,
                generator: torch.Generator | None = None, progress: bool = True,
                token_bytes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-chunk summed NLLs of the model and of the unigram baseline, and target counts; with
    ``token_bytes`` (``token_byte_lengths``) also each chunk's target bytes (``target_bytes``)."""
    if not 0.0 < masking_rate < 1.0:
        raise ValueError(f"masking_rate must lie in (0, 1), got {masking_rate}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    num, length = chunks.shape
    n_prompt = orders.num_prompt_for_rate(masking_rate, torch.full((num,), length))
    if int(n_prompt.min()) < 1:
        raise ValueError(f"masking_rate {masking_rate} leaves no visible token at length {length}")
    sigma = orders.any_subset(n_prompt, length, generator=generator)
    model_nll, unigram_nll, target_bytes = [], [], []
    device = model.device
    for start in tqdm(range(0, num, batch_size), desc="nll", disable=not progress):
        rows = slice(start, start + batch_size)
        model_nll.append(-model.score(chunks[rows].to(device), sigma[rows].to(device), n_prompt[rows].to(device)).cpu())
        targets = sigma[rows] >= n_prompt[rows, None]
        unigram_nll.append(-(unigram[chunks[rows]] * targets).sum(1))
        if token_bytes is not None:
            target_bytes.append((token_bytes[chunks[rows]] * targets).sum(1))
    out = {"model": torch.cat(model_nll), "unigram": torch.cat(unigram_nll), "targets": length - n_prompt}
    if token_bytes is not None:
        out["target_bytes"] = torch.cat(target_bytes)
    return out


def _ci(values: torch.Tensor, scale: float = 1.0, shift: float = 0.0) -> list:
    lo, hi = summarize(values.double().tolist()).ci95
    return [None if math.isnan(lo) else (shift + lo) * scale, None if math.isnan(hi) else (shift + hi) * scale]


def _ratio_ci(nll: torch.Tensor, denominators: torch.Tensor, scale: float = 1.0) -> list:
    """95% interval of the pooled ratio sum(nll) / sum(denominators) over chunks (delta method), times scale."""
    nll, den = nll.double(), denominators.double()
    ratio = float(nll.sum() / den.sum())
    return _ci((nll - ratio * den) / den.mean(), scale, shift=ratio)


def _predictor_metrics(nll: torch.Tensor, targets: torch.Tensor, target_bytes: torch.Tensor | None = None,
                       words_per_byte: float | None = None) -> dict:
    """NLL per target token (pooled over chunks), its perplexity and a t interval of the per-chunk means;
    with ``target_bytes``, the same per byte and (with ``words_per_byte``) per word (see the module doc)."""
    per_token = float(nll.sum()) / int(targets.sum())
    out = {"nll_per_token": per_token, "perplexity": math.exp(per_token), "per_sequence_ci95": _ci(nll / targets)}
    if target_bytes is not None:
        per_byte = float(nll.sum()) / int(target_bytes.sum())
        out.update(nll_per_byte=per_byte, bits_per_byte=per_byte / math.log(2),
                   per_byte_ci95=_ratio_ci(nll, target_bytes))
        if words_per_byte:
            out.update(nll_per_word=per_byte / words_per_byte, word_perplexity=math.exp(per_byte / words_per_byte),
                       per_word_ci95=_ratio_ci(nll, target_bytes, 1.0 / words_per_byte))
    return out


def _fmt_ci(ci) -> str:
    return "n/a" if ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _table_row(name: str, metrics: dict) -> dict:
    row = {"predictor": name, "NLL/token (nats)": metrics["nll_per_token"],
           "per-sequence 95% CI": _fmt_ci(metrics["per_sequence_ci95"]), "perplexity": metrics["perplexity"]}
    if "nll_per_byte" in metrics:
        row.update({"NLL/byte (nats)": metrics["nll_per_byte"], "per-byte 95% CI": _fmt_ci(metrics["per_byte_ci95"])})
    if "nll_per_word" in metrics:
        row.update({"NLL/word (nats)": metrics["nll_per_word"], "per-word 95% CI": _fmt_ci(metrics["per_word_ci95"])})
    return row


def run(args: argparse.Namespace) -> dict:
    check_nll(args)
    model = load_model(args)
    run_ = EvalRun("nll", args)
    chunks = packed_text(model.tokenizer, args.length, args.text_file, args.num_sequences)
    train_chunks = packed_text(model.tokenizer, args.length, args.unigram_file)
    unigram = unigram_log_probs(train_chunks, model.vocab_size, model.mask_token_id)
    generator = torch.Generator().manual_seed(args.seed)
    token_bytes = token_byte_lengths(model.tokenizer)
    nll = heldout_nll(model, chunks, args.masking_rate, unigram, args.batch_size, generator, not args.no_progress,
                      token_bytes=token_bytes)
    total = int(nll["targets"].sum())
    text_bytes = int(token_bytes[chunks].sum())
    text_words = int(token_word_starts(model.tokenizer)[chunks].sum())
    words_per_byte = text_words / text_bytes
    unk = model.tokenizer.unk_token_id
    metrics = {"sequences": len(chunks), "length": args.length, "masking_rate": args.masking_rate,
               "targets": total, "target_bytes": int(nll["target_bytes"].sum()), "text_bytes": text_bytes,
               "text_words": text_words, "text_tokens": int(chunks.numel()),
               "unk_tokens": None if unk is None else int((chunks == unk).sum()),
               "unigram_training_tokens": int(train_chunks.numel())}
    for name in ("model", "unigram"):
        metrics[name] = _predictor_metrics(nll[name], nll["targets"], nll["target_bytes"], words_per_byte)
    run_.samples({"index": i, "model_nll": float(nll["model"][i]), "unigram_nll": float(nll["unigram"][i]),
                  "targets": int(nll["targets"][i]), "target_bytes": int(nll["target_bytes"][i])}
                 for i in range(len(chunks)))
    summary = (f"{len(chunks)} chunks of {args.length} tokens, {args.masking_rate:.0%} masked "
               f"(random any-subset orders, oracle mask), {total} target tokens standing for "
               f"{metrics['target_bytes']} bytes; the chunks hold {text_bytes} bytes, {text_words} words "
               f"({metrics['unk_tokens']} <unk> tokens). Per byte and per word: asarm.eval.nll's module doc.\n\n"
               + markdown_table([_table_row(name, metrics[name]) for name in ("model", "unigram")]))
    return run_.finish(metrics, summary)
