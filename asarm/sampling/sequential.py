"""Batched exact sequential any-order decoding (ASSD: ``assd.py``; what every sampler shares: ``batch.py``).

Samplers take ``tokens (B, L)``, ``sigma (B, L)`` (rank of each position), ``n_prompt (B,)`` and
optionally ``lengths (B,)`` or ``padding_mask (B, L)``; every row keeps its own order, prompt size,
acceptance count and random stream. Tokens on ranks ``>= n_prompt`` are ignored (they are replaced
by ``<mask>`` placeholders) and returned filled in.

Exactness (tested against brute-force joints in tests/sampling): the sequential sampler draws from
``prod_r p_T(x_r | x_{<r})``; ASSD draws from the same joint (``temperature_mode="target"``) or from
the T=1 joint (``"no_temp_oracle"``) for every drafter, unless ``r_atol > 0``, which is lossy.
"""

from __future__ import annotations

import torch

from ..model import ASARM
from .batch import DecodeBatch, DecodeOutput, TokenProgress, check_temperature, probabilities_fn
from .engine import DEFAULT_ENGINE, make_engine
from .random import RowStreams, sample_categorical
from .trace import TraceRecorder

__all__ = ["sequential_decode"]


@torch.no_grad()
def sequential_decode(model: ASARM, tokens, sigma, n_prompt, lengths=None, *, padding_mask=None,
                      temperature: float = 1.0, seed=None, generator: torch.Generator | None = None,
                      engine=DEFAULT_ENGINE, max_new_tokens: int | None = None, progress: bool = False,
                      trace: bool = False) -> DecodeOutput:
    """One oracle pass per token, in each row's order: NFE = length - n_prompt exactly.

    ``max_new_tokens`` stops each row after that many tokens (the rest stay ``<mask>``); ``trace=True``
    records every step in ``DecodeOutput.trace`` (same tokens as without it)."""
    check_temperature(temperature)
    batch = DecodeBatch(model, tokens, sigma, n_prompt, lengths, padding_mask, max_new_tokens)
    streams = RowStreams(batch.tokens.shape[0], seed, generator)
    session = make_engine(engine, model).start(batch.tokens, batch.sigma, batch.n_prompt)
    to_probs = probabilities_fn(model)
    bar = TokenProgress(batch, progress, "sequential")
    recorder = TraceRecorder(batch.positions, batch.n_prompt, batch.nfe) if trace else None
    while len(rows := batch.active_rows()):
        n = batch.n_fixed[rows]
        logits = session.logits(rows, batch.tokens[rows], n, n[:, None], draft=False)
        probs = to_probs(logits, float(temperature))[:, 0]
        new = sample_categorical(probs, streams.uniform(rows, 1, probs.device)[:, 0])
        batch.tokens[rows, batch.positions[rows, n]] = new
        batch.n_fixed[rows] += 1
        batch.nfe[rows] += 1
        if recorder is not None:
            recorder.query(rows, n[:, None])
            recorder.round(rows, n, new[:, None], torch.ones_like(n), [["sequential"]] * len(rows))
        bar.advance()
    bar.close()
    batch.rounds.copy_(batch.nfe)
    return batch.output(sampler="sequential", settings={"temperature": temperature},
                        trace=None if recorder is None else recorder.trace)
