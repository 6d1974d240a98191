"""Generative perplexity of decoded text under a causal language model, and the tokenizer whose ids
give the unigram-entropy diversity metric.

Cleaning: AS-ARM output is decoded with ``skip_special_tokens=True`` (``asarm.tokenization.decode_text``,
which also undoes its escapes), every literal special-token string of the AS-ARM tokenizer
(``<mask>``, ``<unk>``, ``<cls>``, ``<sep>``, ``<pad>``, ``<eod>`` ...) is removed as well, and
whitespace is collapsed (the reference scored text that still held these strings).

Perplexity of one text: with its LM token ids ``x_1..x_n`` (no special tokens added), the text scores
``exp(mean_{t=2..n} -log p(x_t | x_<t))``. Texts longer than the LM's context ``max_length`` are cut
into windows starting every ``stride`` tokens; each window scores only the tokens the previous window
did not, so after the first window every scored token sees at least ``max_length - stride`` tokens of
context (``stride = max_length``: non-overlapping windows, whose first tokens are then not scored).

The LM (``gpt2-large`` in the paper; any Hub name or local directory) is loaded lazily with
``transformers.AutoModelForCausalLM``; :func:`try_load_causal_lm` turns a failure (offline, missing
directory) into a reason string so that an evaluation can go on without perplexities.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ..offline import hub_offline, offline_reason
from ..paths import data_file
from ..tokenization import decode_text

__all__ = ["DISABLED", "PerplexityModelUnavailable", "CausalLM", "clean_text", "decode_clean", "load_causal_lm",
           "try_load_causal_lm", "entropy_tokenizer"]

DISABLED = "none"  # --ppl-model value that turns generative perplexity off


class PerplexityModelUnavailable(OSError):
    """The perplexity model or its tokenizer could not be loaded."""


def clean_text(text: str, special_tokens: Iterable[str]) -> str:
    """``text`` without the literal ``special_tokens`` strings, whitespace collapsed to single spaces."""
    # Longest first, so that a token containing another one is removed whole.
    for token in sorted((t for t in special_tokens if t), key=len, reverse=True):
        text = text.replace(token, " ")
    return " ".join(text.split())


def decode_clean(tokenizer, ids: Sequence[int]) -> str:
    """Decode ``ids`` with ``tokenizer`` into plain text for scoring (see the module docstring)."""
    return clean_text(decode_text(ids, tokenizer), tokenizer.all_special_tokens)


@dataclass
class _Window:
    text: int  # index of the text it belongs to
    ids: list[int]
    score_from: int  # first index in ``ids`` whose token is scored (>= 1)


class CausalLM:
    """A loaded causal LM that scores texts (see the module docstring for the windowing)."""

    def __init__(self, model, tokenizer, name: str, max_length: int, stride: int | None = None,
                 batch_size: int = 8):
        stride = max_length // 2 if stride is None else stride
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if not 1 <= stride <= max_length:
            raise ValueError(f"stride must lie in [1, max_length={max_length}], got {stride}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = max_length
        self.stride = stride
        self.batch_size = batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def _windows(self, index: int, ids: list[int]) -> list[_Window]:
        windows, scored_to, start = [], 1, 0
        while scored_to < len(ids):
            end = min(start + self.max_length, len(ids))
            score_from = max(scored_to, start + 1)
            if score_from < end:
                windows.append(_Window(index, ids[start:end], score_from - start))
            scored_to, start = end, start + self.stride
        return windows

    @torch.no_grad()
    def perplexities(self, texts: Sequence[str], progress: bool = False) -> list[float | None]:
        """Perplexity of each text; None for a text with fewer than 2 LM tokens."""
        windows = [w for i, text in enumerate(texts) for w in self._windows(i, self.encode(text))]
        nll_sum = torch.zeros(len(texts), dtype=torch.float64)
        count = torch.zeros(len(texts), dtype=torch.long)
        # Any id works as padding: padded positions are masked out of attention and of the loss.
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        device = self.device
        for start in tqdm(range(0, len(windows), self.batch_size), desc="perplexity", unit="batch",
                          disable=not progress, leave=False):
            batch = windows[start:start + self.batch_size]
            width = max(len(w.ids) for w in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros(len(batch), width, dtype=torch.long)
            scored = torch.zeros(len(batch), width, dtype=torch.bool)
            for row, w in enumerate(batch):
                ids[row, :len(w.ids)] = torch.tensor(w.ids)
                attention[row, :len(w.ids)] = 1
                scored[row, w.score_from:len(w.ids)] = True
            # Right padding keeps GPT-style absolute positions of the real tokens at 0..n-1.
            logits = self.model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:].to(device),
                                                    reduction="none").double().cpu()
            nll = nll * scored[:, 1:]
            text_index = torch.tensor([w.text for w in batch])
            nll_sum.index_add_(0, text_index, nll.sum(1))
            count.index_add_(0, text_index, scored[:, 1:].sum(1))
        return [math.exp(float(s / c)) if c > 0 else None for s, c in zip(nll_sum, count)]


def _context_length(model, tokenizer) -> int:
    for field in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(model.config, field, None)
        if isinstance(value, int) and value > 1:
            return value
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 1 < limit < 1_000_000 else 1024


def load_causal_lm(name: str, device=None, revision: str | None = None, stride: int | None = None,
                   batch_size: int = 8) -> CausalLM:
    """Load ``name`` (Hub name or local directory) as a :class:`CausalLM` on ``device``.

    Raises PerplexityModelUnavailable with the reason when it cannot be loaded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = not Path(name).expanduser().exists() and hub_offline()  # then the cache only: no retries
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, local_files_only=offline)
    except (OSError, ValueError) as err:
        reason = (f"{offline_reason()} and it is not in the local cache" if offline
                  else " ".join(str(err).split()) or type(err).__name__)
        raise PerplexityModelUnavailable(f"could not load perplexity model {name!r}: {reason}") from err
    model = model.to(torch.device(device) if device is not None else torch.device("cpu"))
    return CausalLM(model, tokenizer, name, _context_length(model, tokenizer), stride, batch_size)


def try_load_causal_lm(name: str, device=None, revision: str | None = None, stride: int | None = None,
                       batch_size: int = 8) -> tuple[CausalLM | None, str | None]:
    """``(model, None)``, or ``(None, reason)`` when ``name`` is ``"none"`` or cannot be loaded."""
    if name.strip().lower() == DISABLED:
        return None, f"disabled (--ppl-model {DISABLED})"
    try:
        return load_causal_lm(name, device, revision, stride, batch_size), None
    except PerplexityModelUnavailable as err:
        return None, str(err)


def entropy_tokenizer(lm: CausalLM | None = None) -> tuple[object | None, str]:
    """The tokenizer for unigram entropy and where it came from: the perplexity model's if loaded,
    else GPT-2's from the data directory (``gpt2/encoder.json``, ``gpt2/vocab.bpe``), else the Hub's
    ``gpt2``. ``(None, reason)`` when none can be loaded."""
    if lm is not None:
        return lm.tokenizer, f"{lm.name} (perplexity model)"
    from transformers import AutoTokenizer, GPT2Tokenizer

    vocab, merges = data_file("gpt2/encoder.json", required=False), data_file("gpt2/vocab.bpe", required=False)
    if vocab is not None and merges is not None:
        # transformers 5 names the file arguments vocab/merges, 4.x vocab_file/merges_file.
        if "vocab_file" in inspect.signature(GPT2Tokenizer.__init__).parameters:
            tokenizer = GPT2Tokenizer(vocab_file=str(vocab), merges_file=str(merges))
        else:
            tokenizer = GPT2Tokenizer(vocab=str(vocab), merges=str(merges))
        return tokenizer, f"gpt2 ({vocab.parent})"
    try:
        return AutoTokenizer.from_pretrained("gpt2", local_files_only=hub_offline()), "gpt2 (Hub)"
    except (OSError, ValueError) as err:
        return None, f"no GPT-2 tokenizer: not in the data directory and the Hub failed: {' '.join(str(err).split())}"
