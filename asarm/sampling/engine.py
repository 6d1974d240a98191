"""Inference engines: how a sampler turns (tokens, order, query ranks) into logits.

A sampler opens one session per batch (``engine.start(tokens, sigma, n_prompt)``) and then calls
``session.logits(rows, tokens, n_fixed, query_ranks, draft)`` once per NFE:

* ``rows (b,)``: which batch rows take part (finished rows drop out);
* ``tokens (b, L)``: those rows' current tokens; ranks ``< n_fixed`` are committed and never change
  afterwards (``n_fixed`` only grows per row), so an engine may cache whatever depends on them;
* ``query_ranks (b, k)``: ranks to predict, distinct and ``>= n_fixed``; ``-1`` marks an unused slot
  (rows needing fewer queries than others), whose logits are unspecified;
* ``draft=True``: draft mask, every query sees ranks ``< n_fixed`` only (inputs of higher rank are
  placeholders); ``draft=False``: oracle mask, a query on rank r sees ranks ``< r``, i.e. also the
  uncommitted drafts written at ranks ``n_fixed .. r-1``.

Returns raw logits ``(b, k, V)``. ``FullEngine`` runs the plain full-sequence Hugging Face forward
every call (the reference implementation's cost model); ``CachedEngine`` (the default) computes each
committed token's content stream once and only the new rows per call, with the same logits.
"""

from __future__ import annotations

import torch

from ..model import ASARM
from ..orders import positions_of_ranks
from .cached_engine import CachedEngine

__all__ = ["FullEngine", "CachedEngine", "make_engine", "ENGINES", "DEFAULT_ENGINE"]


class _FullSession:
    def __init__(self, model: ASARM, sigma: torch.Tensor, n_prompt: torch.Tensor):
        self.model = model
        self.sigma = sigma
        self.n_prompt = n_prompt
        self.positions = torch.argsort(sigma, dim=1)  # position of each rank

    def logits(self, rows: torch.Tensor, tokens: torch.Tensor, n_fixed: torch.Tensor, query_ranks: torch.Tensor,
               draft: bool) -> torch.Tensor:
        query_positions = positions_of_ranks(self.positions[rows], query_ranks)
        return self.model.logits(tokens, self.sigma[rows], self.n_prompt[rows], query_positions,
                                 n_visible=n_fixed if draft else None)


class FullEngine:
    """One full two-stream XLNet pass over all L positions per call."""

    name = "full"

    def __init__(self, model: ASARM):
        self.model = model

    def start(self, tokens: torch.Tensor, sigma: torch.Tensor, n_prompt: torch.Tensor) -> _FullSession:
        return _FullSession(self.model, sigma, n_prompt)


ENGINES = {"full": FullEngine, "cached": CachedEngine}
DEFAULT_ENGINE = "cached"


def make_engine(engine, model: ASARM):
    """An engine object from a name in ``ENGINES`` or an object with ``start``."""
    if isinstance(engine, str):
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {sorted(ENGINES)}")
        return ENGINES[engine](model)
    if not hasattr(engine, "start"):
        raise TypeError(f"engine must be a name or an object with start(), got {type(engine).__name__}")
    return engine
