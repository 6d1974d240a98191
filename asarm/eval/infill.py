"""What the ROCStories and HumanEval infilling runners share: tokenising an item's three parts
(prefix, reference blank, suffix), the blank length, padded batches in the infilling order,
decoding the blanks with any sampler spec (``asarm.sampling.spec``), cost statistics, and the plot.

An item becomes one row: prefix tokens, ``blank`` placeholders, suffix tokens. The order is
``orders.infilling``: every given token is visible, the blank is decoded left to right. Rows of
different lengths share a batch through ``lengths`` (right padding with the tokenizer's pad id).
A row's sampling seed belongs to the row (``asarm.seeds.row_seeds``), so rows are batched in whatever
grouping is cheapest (similar lengths together) without changing what any row decodes.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..model import ASARM
from ..orders import infilling
from ..tokenization import CLS_ID, SEP_ID, UNK_ID, CodeTokenizer, decode_text, encode_text
from ..sampling import SamplerSpec, decode
from ..seeds import row_seeds

__all__ = ["TextCodec", "CodeCodec", "blank_length",
           "describe_blank", "InfillRow", "encode_rows", "repeat_trials", "make_batch", "InfillOutput", "infill"]


class TextCodec:
    """Natural text: each part is tokenised on its own with the tokenizer's normalisation
    (``encode_text``); SentencePiece's dummy prefix on each part stands for the single space
    between parts. The blank is decoded alone (special tokens dropped)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode_parts(self, parts: Sequence[str]) -> list[list[int]]:
        return [encode_text(part, self.tokenizer) for part in parts]

    def decode_blank(self, prefix: Sequence[int], blank: Sequence[int]) -> str:
        # the prefix does not matter: every part starts a new word (see the class docstring)
        return decode_text(blank, self.tokenizer)


class CodeCodec:
    """Code with the whitespace mapping of spec section 5, through the exact codec
    (``CodeTokenizer``): ``decode_blank(prefix, encode_parts(parts)[1]) == parts[1]`` exactly."""

    def __init__(self, tokenizer):
        self.codec = CodeTokenizer(tokenizer)

    def encode_parts(self, parts: Sequence[str]) -> list[list[int]]:
        return self.codec.encode_parts(parts)

    def decode_blank(self, prefix: Sequence[int], blank: Sequence[int]) -> str:
        # Only the blank's tokens are decoded, so an empty suffix needs no special case. The blank
        # continues the prefix's last word-stretch (its first piece carries no dummy "▁") unless the
        # prefix ends with a whitespace token, exactly as CodeTokenizer.encode_parts split them.
        continues = bool(prefix) and prefix[-1] not in (UNK_ID, CLS_ID, SEP_ID)
        return self.codec.decode(blank, continues=continues)


def blank_length(reference_tokens: int, fixed: int | None = None, ratio: float | None = None) -> int:
    """The reference's token count, or ``fixed``, or ``max(1, round(ratio x count))``."""
    if fixed is not None:
        return fixed
    if ratio is not None:
        return max(1, round(ratio * reference_tokens))
    return reference_tokens


def describe_blank(args: argparse.Namespace) -> str:
    if args.blank_length is not None:
        return f"fixed {args.blank_length} tokens"
    if args.blank_ratio is not None:
        return f"{args.blank_ratio:g} x reference tokens"
    return "reference token count"


@dataclass(frozen=True)
class InfillRow:
    prefix: tuple[int, ...]
    blank: int  # number of placeholders
    suffix: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.prefix) + self.blank + len(self.suffix)


def encode_rows(codec: TextCodec | CodeCodec, items: Iterable[Sequence[str]], fixed: int | None = None,
                ratio: float | None = None) -> tuple[list[InfillRow], list[list[int]]]:
    """Rows for ``(prefix, reference, suffix)`` texts (blank length by :func:`blank_length`), and
    each reference's token ids."""
    rows, references = [], []
    for parts in items:
        prefix, reference, suffix = codec.encode_parts(parts)
        rows.append(InfillRow(tuple(prefix), blank_length(len(reference), fixed, ratio), tuple(suffix)))
        references.append(reference)
    return rows, references


def repeat_trials(rows: Sequence[InfillRow], trials: int, seed: int):
    """Every row in every trial, trial-major: ``(pairs, rows, seeds)`` with ``pairs[j] = (trial, item)``
    and ``seeds[j] = runner.row_seeds(seed, trial, [item])``, so one :func:`infill` call decodes them all."""
    pairs = [(t, i) for t in range(trials) for i in range(len(rows))]
    seeds = torch.cat([row_seeds(seed, t, range(len(rows))) for t in range(trials)])
    return pairs, [rows[i] for _, i in pairs], seeds


def make_batch(rows: Sequence[InfillRow], pad_id: int, mask_id: int):
    """``(tokens, sigma, n_prompt, lengths)`` for the samplers: right-padded rows, blank positions
    holding ``mask_id``, order = visible tokens first, then the blank left to right."""
    lengths = torch.tensor([row.length for row in rows], dtype=torch.long)
    tokens = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    visible = torch.zeros_like(tokens, dtype=torch.bool)
    for b, row in enumerate(rows):
        start, end = len(row.prefix), len(row.prefix) + row.blank
        tokens[b, :start] = torch.tensor(row.prefix, dtype=torch.long)
        tokens[b, start:end] = mask_id
        tokens[b, end:row.length] = torch.tensor(row.suffix, dtype=torch.long)
        visible[b, :row.length] = True
        visible[b, start:end] = False
    sigma, n_prompt = infilling(visible, lengths)
    return tokens, sigma, n_prompt, lengths


@dataclass
class InfillOutput:
    """Decoded rows (unpadded, in the input order) and per-row costs of one sampler."""

    rows: list[InfillRow]
    decoded: list[list[int]]
    nfe: torch.Tensor            # (N,)
    rounds: torch.Tensor         # (N,)
    model_free_draft_calls: torch.Tensor  # (N,)
    drafted_by_index: torch.Tensor | None   # (k,) summed over rows (ASSD only)
    accepted_by_index: torch.Tensor | None  # (k,)
    seconds: float

    def blank(self, i: int) -> list[int]:
        start = len(self.rows[i].prefix)
        return self.decoded[i][start:start + self.rows[i].blank]

    def summary(self) -> dict:
        """Mean NFE, rounds and model-free draft calls (n-gram drafts) per row; tokens per round pooled over rows; draft
        acceptance rate per draft index (None where no draft reached that index)."""
        generated = sum(row.blank for row in self.rows)
        out = {"rows": len(self.rows), "blank_tokens": generated / len(self.rows),
               "nfe": float(self.nfe.double().mean()), "rounds": float(self.rounds.double().mean()),
               "tokens_per_round": generated / max(1, int(self.rounds.sum())),
               "model_free_draft_calls": float(self.model_free_draft_calls.double().mean()),
               "seconds": round(self.seconds, 3)}
        if self.accepted_by_index is not None:
            out["acceptance_by_index"] = [a / d if d else None for a, d in
                                          zip(self.accepted_by_index.tolist(), self.drafted_by_index.tolist())]
        return out


def infill(model: ASARM, spec: SamplerSpec, rows: Sequence[InfillRow], seeds: torch.Tensor, *, batch_size: int,
           engine: str, progress: bool = False) -> InfillOutput:
    """Fill every row's blank with one sampler; row ``i`` uses ``seeds[i]`` whatever its batch."""
    rows = list(rows)
    if len(seeds) != len(rows):
        raise ValueError(f"{len(seeds)} seeds for {len(rows)} rows")
    # padding is never attended to, so its id only has to be valid
    pad_id = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.mask_token_id
    order = sorted(range(len(rows)), key=lambda i: rows[i].length)  # similar lengths: little padding
    decoded: list[list[int]] = [[] for _ in rows]
    nfe = torch.zeros(len(rows), dtype=torch.long)
    row_rounds, model_free_draft_calls = torch.zeros_like(nfe), torch.zeros_like(nfe)
    assd, k = spec.algorithm == "assd", spec.k
    drafted = torch.zeros(k, dtype=torch.long) if assd else None
    accepted = torch.zeros(k, dtype=torch.long) if assd else None
    start_time = time.perf_counter()
    for start in range(0, len(rows), batch_size):
        idx = order[start:start + batch_size]
        tokens, sigma, n_prompt, lengths = make_batch([rows[i] for i in idx], pad_id, model.mask_token_id)
        out = decode(model, spec, tokens, sigma, n_prompt, lengths, seed=seeds[idx], engine=engine, progress=progress)
        result = out.tokens.cpu()
        for j, i in enumerate(idx):
            decoded[i] = result[j, :rows[i].length].tolist()
        nfe[idx], row_rounds[idx], model_free_draft_calls[idx] = out.nfe, out.rounds, out.model_free_draft_calls
        if assd:
            drafted += out.drafted_by_index.sum(0)
            accepted += out.accepted_by_index.sum(0)
    return InfillOutput(rows, decoded, nfe, row_rounds, model_free_draft_calls, drafted, accepted,
                        time.perf_counter() - start_time)
