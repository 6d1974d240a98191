"""Inference engines: how a sampler turns (tokens, order, query ranks) into logits.

A sampler opens one session per batch (``engine.start(tokens, sigma, n_prompt)``) and then calls
``session.logits(rows, tokens, n_fixed, query_ranks, draft=False, limits=None)`` once per NFE:

* ``rows (b,)``: which batch rows take part (finished rows drop out);
* ``tokens (b, L)``: those rows' current tokens; ranks ``< n_fixed`` are committed and never change
  afterwards (``n_fixed`` only grows per row), so an engine may cache whatever depends on them;
* ``query_ranks (b, k)``: ranks to predict, ``>= n_fixed``; ``-1`` marks an unused slot (rows needing
  fewer queries than others), whose logits are unspecified;
* ``limits (b, k)``: per-query visibility: query t sees the ranks ``< limits[:, t]`` plus the prompt
  (``n_prompt <= limit <= rank``; tokens on ranks ``n_fixed .. limit - 1`` are uncommitted drafts). One
  call may thus mix oracle rows, draft rows and rows that see any given prefix; a rank may be queried
  several times with different limits. Without ``limits`` the two classic patterns:
  ``draft=True``: the draft mask, every query sees ranks ``< n_fixed`` (inputs of higher rank are
  placeholders); ``draft=False``: the oracle mask, a query on rank r sees ranks ``< r``, i.e. also the
  uncommitted drafts written at ranks ``n_fixed .. r-1``.

Returns raw logits ``(b, k, V)``. ``session.states(...)`` (same arguments) returns the final query-stream
states ``(b, k, d_model)`` instead, whose LM head gives the logits; only draft heads need it (asarm.draft_head).
``FullEngine`` runs the backbone's plain full-sequence two-stream forward every call (for XLNet, Hugging
Face's own: the reference implementation's cost model); ``CachedEngine`` (the default) computes each
committed token's content stream once and only the new rows per call, with the same logits.
"""

from __future__ import annotations

import torch

from ..masks import check_distinct_queries, query_limits
from ..model import ASARM
from ..orders import positions_of_ranks
from .cached_engine import CachedEngine
from .spec import DEFAULT_ENGINE, ENGINE_NAMES  # noqa: F401 (re-exported)

__all__ = ["FullEngine", "CachedEngine", "make_engine", "ENGINES", "DEFAULT_ENGINE"]


class _FullSession:
    def __init__(self, model: ASARM, sigma: torch.Tensor, n_prompt: torch.Tensor):
        self.model = model
        self.sigma = sigma
        self.n_prompt = n_prompt
        self.positions = torch.argsort(sigma, dim=1)  # position of each rank

    def logits(self, rows: torch.Tensor, tokens: torch.Tensor, n_fixed: torch.Tensor, query_ranks: torch.Tensor,
               draft: bool = False, limits: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.backbone.lm_head(self.states(rows, tokens, n_fixed, query_ranks, draft, limits))

    def states(self, rows: torch.Tensor, tokens: torch.Tensor, n_fixed: torch.Tensor, query_ranks: torch.Tensor,
               draft: bool = False, limits: torch.Tensor | None = None) -> torch.Tensor:
        sigma, n_prompt = self.sigma[rows], self.n_prompt[rows]
        limits = query_limits(n_prompt, n_fixed, query_ranks, draft, limits)
        check_distinct_queries(query_ranks, limits)
        b, k = query_ranks.shape
        L = tokens.shape[1]
        # A two-stream forward has one visibility per position (perm_mask row), shared by its content
        # and query streams. The mask with v visible ranks (masks.perm_mask) serves every query whose
        # limit is min(rank, v): oracle queries (limit = rank) all fit v = L, any other query needs
        # v = its limit. So each batch row is split into one forward per distinct v, run as one batch.
        used = query_ranks >= 0
        visible = torch.where(used & (limits < query_ranks), limits, L)
        group_key = torch.arange(b, device=rows.device)[:, None] * (L + 1) + visible
        keys, group = torch.unique(group_key.flatten(), return_inverse=True)
        slot = _index_within_group(group, len(keys))
        source_row, forward_visible = keys // (L + 1), keys % (L + 1)
        query_positions = positions_of_ranks(self.positions[rows], query_ranks).flatten()
        grouped = torch.full((len(keys), int(slot.max()) + 1), -1, dtype=torch.long, device=rows.device)
        grouped[group, slot] = query_positions
        out = self.model.query_states(tokens[source_row], sigma[source_row], n_prompt[source_row], grouped,
                                      n_visible=forward_visible)
        return out[group, slot].reshape(b, k, -1)


def _index_within_group(group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """For each element, how many earlier elements share its group id."""
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=num_groups)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(group)
    slot[order] = torch.arange(len(group), device=group.device) - starts[group[order]]
    return slot


class FullEngine:
    """One full two-stream pass of the backbone over all L positions per call."""

    name = "full"

    def __init__(self, model: ASARM):
        self.model = model

    def start(self, tokens: torch.Tensor, sigma: torch.Tensor, n_prompt: torch.Tensor) -> _FullSession:
        return _FullSession(self.model, sigma, n_prompt)


ENGINES = {"full": FullEngine, "cached": CachedEngine}  # keys: spec.ENGINE_NAMES


def make_engine(engine, model: ASARM):
    """An engine object from a name in ``ENGINES`` or an object with ``start``."""
    if isinstance(engine, str):
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {sorted(ENGINES)}")
        return ENGINES[engine](model)
    if not hasattr(engine, "start"):
        raise TypeError(f"engine must be a name or an object with start(), got {type(engine).__name__}")
    return engine
