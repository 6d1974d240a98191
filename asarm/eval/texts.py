"""Evaluation texts packed into model-length chunks exactly as the trainer packs its data."""

from __future__ import annotations

import itertools
import os

import torch

from ..paths import data_file

__all__ = ["WIKITEXT_TEST_FILE", "packed_text"]

WIKITEXT_TEST_FILE = "wikitext-2-raw/wiki.test.raw"  # the paper's benchmark text; never train on it


def packed_text(tokenizer, length: int, path: str | os.PathLike | None = None, limit: int | None = None,
                hub_preset: str = "wikitext-2", hub_split: str = "test") -> torch.Tensor:
    """``(N, length)`` consecutive chunks of a text, packed exactly as the trainer packs its data
    (one document a line, ``</s>`` after each, ``asarm.training.data.PackedStream``), so a model
    is evaluated on the layout it was trained on. ``path`` (a file, or a data-directory name)
    defaults to WikiText-2 raw test; without the local file, the Hub preset's ``hub_split`` is read."""
    from ..training.data import PackedStream, TextFileSource, hub_source, make_encoder

    if length < 2:
        raise ValueError(f"length must be >= 2 tokens, got {length}")
    if limit is not None and limit < 1:
        raise ValueError(f"the number of sequences must be >= 1 (or None for all), got {limit}")
    file = data_file(path if path is not None else WIKITEXT_TEST_FILE, required=path is not None)
    source = (TextFileSource([file], unit="line", split="all") if file is not None
              else hub_source(hub_preset, hub_split=hub_split))
    stream = PackedStream(source, make_encoder(tokenizer), max_length=length, rank=0, world_size=1, epochs=1)
    chunks = [chunk["input_ids"] for chunk in itertools.islice(stream, limit)]
    if not chunks:
        raise ValueError(f"the text has fewer than {length} tokens: no full chunk to evaluate")
    if limit is not None and len(chunks) < limit:
        raise ValueError(f"{limit} sequences asked for, but the text has only {len(chunks)} chunks of {length} tokens")
    return torch.stack(chunks)
