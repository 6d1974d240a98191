"""Any-Subset Speculative Decoding: classic two-call rounds, bonus tokens, single-pass rounds, adaptive length.

Every row keeps a set of *pending* drafts (ranks ``n .. n+K-1``, proposals ``q``). A step either drafts
(a drafter call, when a row has none) or verifies: one model call holds, per row,

* the **verify rows**: oracle queries on the pending drafts, written in (an exact first draft is not
  queried again: it is accepted by construction);
* the **bonus row** (``bonus=True``): the oracle query on rank ``n+K``; when every draft is accepted the
  round commits one more exact token from it;
* the **outcome rows** (``fused=True``): for each covered outcome "first rejection at slot j" (or "all
  accepted", j = K), the next round's ``k`` draft rows on the ranks after that outcome's committed
  prefix, each seeing only ranks ``< n + j``: the committed tokens and the drafts accepted before slot
  j, never the token drawn at slot j (it is drawn after the call). After the call the outcome that
  happened supplies the next pending drafts, so the next round needs no draft call; an uncovered
  outcome falls back to a drafter call. Those drafts are proposals like any other (not exact by
  construction), so the next call verifies every one of them.

Why it is exact: each committed token is either an exact conditional or the output of the
accept/residual step (:func:`~asarm.sampling.rejection.verify_drafts`) for a draft drawn from a
proposal that depends only on tokens already committed (or accepted before it) and on fresh uniforms.
Every verify call commits at least one token, and a drafter call is followed by a verify call that
commits at least two (an exact first draft plus one) or is skipped when one exact draft is all that is
left, so ``NFE <= length - n_prompt`` for the self drafter with ``k >= 2``.
"""

from __future__ import annotations

import warnings

import torch

from ..model import ASARM
from ..orders import positions_of_ranks
from .decode import TEMPERATURE_MODES, DecodeOutput, LossySamplingWarning, _Batch, _check_temperature, _progress, \
    _write
from .draft_length import make_draft_length
from .drafters import DraftRequest, drafter_name, first_draft_exact, make_drafter
from .engine import DEFAULT_ENGINE, make_engine
from .random import RowStreams, sample_categorical
from .rejection import verify_drafts

__all__ = ["assd_decode", "DEFAULT_OUTCOMES"]

DEFAULT_OUTCOMES = 2  # outcomes a single-pass call covers by default (see assd_decode)


class _CountingSession:
    """An engine session that counts the model calls each batch row takes part in."""

    def __init__(self, session, calls: torch.Tensor):
        self.session, self.calls = session, calls

    def logits(self, rows, *args, **kwargs):
        self.calls[rows] += 1
        return self.session.logits(rows, *args, **kwargs)


def _compact(ranks: torch.Tensor, limits: torch.Tensor):
    """Move each row's used query slots (rank >= 0) to the front and drop all-unused columns.
    Returns ``(ranks, limits, column)``: ``column[:, c]`` = where original column c went."""
    unused = (ranks < 0).to(torch.int8)
    order = torch.argsort(unused, dim=1, stable=True)
    width = max(int((ranks >= 0).sum(1).max()), 1)
    column = torch.argsort(order, dim=1).clamp(max=width - 1)
    return ranks.gather(1, order)[:, :width], limits.gather(1, order)[:, :width], column


class _Speculation:
    """Pending drafts and statistics of one ASSD decode; :meth:`draft` and :meth:`verify` are its steps."""

    def __init__(self, model: ASARM, batch: _Batch, session, streams: RowStreams, drafter, k: int,
                 temperature: float, temperature_mode: str, bonus: bool, fused: bool, cover: int, rule,
                 r_atol: float):
        self.model, self.batch, self.streams, self.drafter, self.k = model, batch, streams, drafter, k
        self.bonus, self.fused, self.cover, self.rule, self.r_atol = bonus, fused, cover, rule, r_atol
        B, device = batch.tokens.shape[0], batch.tokens.device
        self.session = _CountingSession(session, batch.nfe)
        self.drafts = torch.zeros(B, k, dtype=torch.long, device=device)
        self.q = torch.zeros(B, k, model.vocab_size, dtype=torch.float64, device=device)
        self.count = torch.zeros(B, dtype=torch.long, device=device)  # pending drafts per row
        self.exact = torch.zeros(B, dtype=torch.bool, device=device)  # pending slot 0 is the exact conditional
        self.draft_temps = torch.full((k,), float(temperature), dtype=torch.float64)
        # outcome drafts are verified like any proposal, so their temperature is free: the draft temperature
        self.proposal_temps = self.draft_temps.clone()
        self.oracle_temp = torch.tensor([float(temperature) if temperature_mode == "target" else 1.0],
                                        dtype=torch.float64)
        self.first_exact = first_draft_exact(drafter)
        if temperature_mode == "no_temp_oracle" and self.first_exact:
            self.draft_temps[0] = 1.0  # the exact first draft is accepted unverified: it must be the T=1 conditional
        self.drafted_by_index = torch.zeros(B, k, dtype=torch.long, device=device)
        self.accepted_by_index = torch.zeros_like(self.drafted_by_index)
        self.bonus_tokens = torch.zeros(B, dtype=torch.long, device=device)
        self.draft_calls = torch.zeros(B, dtype=torch.long, device=device)

    def probs(self, logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
        return self.model.probabilities(logits, temperatures.reshape(1, -1, 1))

    # ---------------------------------------------------------------------------- drafting
    def draft(self, rows: torch.Tensor) -> None:
        """A drafter call for ``rows`` (which have no pending drafts)."""
        if not len(rows):
            return
        batch, device = self.batch, rows.device
        n = batch.n_fixed[rows]
        count = torch.clamp(batch.stop[rows] - n, max=self.k)
        idx = torch.arange(int(count.max()), device=device)
        ranks = torch.where(idx[None, :] < count[:, None], n[:, None] + idx, -1)
        uniforms = self.streams.uniform(rows, self.k, device)[:, :len(idx)]
        calls_before = batch.nfe[rows].clone()
        drafts, q = self.drafter.propose(DraftRequest(
            session=self.session, rows=rows, tokens=batch.tokens[rows], sigma=batch.sigma[rows], n_fixed=n,
            query_ranks=ranks, query_positions=positions_of_ranks(batch.positions[rows], ranks), uniforms=uniforms,
            to_probs=self.probs, draft_temperatures=self.draft_temps[:len(idx)],
            mask_token_id=self.model.mask_token_id, vocab_size=self.model.vocab_size))
        batch.ngram_calls[rows] += (batch.nfe[rows] == calls_before).long()
        self.draft_calls[rows] += 1
        self._set_pending(rows, drafts, q, count, self.first_exact)

    def _set_pending(self, rows, drafts, q, count, exact: bool) -> None:
        if self.rule is not None:
            count = torch.minimum(torch.as_tensor(self.rule(q, drafts, count), device=count.device), count).clamp(min=1)
        width = drafts.shape[1]
        self.drafts[rows, :width], self.q[rows, :width] = drafts, q
        self.count[rows], self.exact[rows] = count, exact

    # ---------------------------------------------------------------------------- committing
    def _commit(self, rows, values, fixed, accepted, verified) -> None:
        """Write ``values[:, :fixed]`` at ranks ``n..`` and update the statistics."""
        batch = self.batch
        n = batch.n_fixed[rows]
        idx = torch.arange(values.shape[1], device=rows.device)
        ranks = torch.where(idx[None, :] < fixed[:, None], n[:, None] + idx, -1)
        batch.tokens[rows] = _write(batch.tokens[rows], positions_of_ranks(batch.positions[rows], ranks), values)
        batch.n_fixed[rows] += fixed
        batch.accepted[rows] += accepted
        batch.rounds[rows] += 1
        width = min(values.shape[1], self.k)
        self.drafted_by_index[rows, :width] += (idx[None, :width] < verified[:, None]).long()
        self.accepted_by_index[rows, :width] += (idx[None, :width] < accepted[:, None]).long()

    def commit_exact(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows whose only pending draft is exact commit it without a verify call; returns the others."""
        alone = self.exact[rows] & (self.count[rows] == 1)
        done = rows[alone]
        if len(done):
            one = torch.ones_like(done)
            self._commit(done, self.drafts[done, :1], one, one, one)
            self.count[done] = 0
        return rows[~alone]

    # ---------------------------------------------------------------------------- verifying
    def verify(self, rows: torch.Tensor) -> None:
        """One model call: verify rows, bonus row and outcome rows; commit; set the next pending drafts."""
        batch, k, device = self.batch, self.k, rows.device
        n, K, stop = batch.n_fixed[rows], self.count[rows], batch.stop[rows]
        exact = self.exact[rows]
        W = int(K.max())
        idx = torch.arange(W, device=device)
        checked = (idx[None, :] >= exact[:, None].long()) & (idx[None, :] < K[:, None])
        oracle = torch.where(checked, n[:, None] + idx, -1)  # oracle rows: limit = rank
        ranks, limits = [oracle], [oracle]
        has_bonus = self.bonus & (n + K < stop)
        if self.bonus:
            bonus_rank = torch.where(has_bonus, n + K, -1)[:, None]
            ranks, limits = ranks + [bonus_rank], limits + [bonus_rank]
        if self.fused:  # block j: the next round's drafts if slot j is the first rejected (j = K: none is)
            j = torch.arange(W + 1, device=device)[None, :, None]
            covered = (j >= exact[:, None, None].long()) & (j <= K[:, None, None]) & \
                      (j - exact[:, None, None].long() < self.cover)
            block = n[:, None, None] + j + 1 + torch.arange(k, device=device)
            block = torch.where(covered & (block < stop[:, None, None]), block, -1)
            ranks.append(block.flatten(1))
            limits.append((n[:, None, None] + j).expand_as(block).flatten(1))
        ranks, limits = torch.cat(ranks, 1), torch.cat(limits, 1)
        compact_ranks, compact_limits, column = _compact(ranks, limits)
        drafts, q = self.drafts[rows, :W], self.q[rows, :W]
        written = _write(batch.tokens[rows], positions_of_ranks(batch.positions[rows], torch.where(
            idx[None, :] < K[:, None], n[:, None] + idx, -1)), drafts)
        logits = self.session.logits(rows, written, n, compact_ranks, limits=compact_limits)
        V = logits.shape[-1]

        def rows_at(cols: torch.Tensor, sel=slice(None)) -> torch.Tensor:  # logits of original columns (b, c)
            return logits[sel].gather(1, column[sel].gather(1, cols)[..., None].expand(-1, -1, V))

        cols = torch.arange(W + 1, device=device).expand(len(rows), -1)
        p = self.probs(rows_at(cols[:, :W]), self.oracle_temp.expand(W))
        p = torch.where((exact[:, None] & (idx[None, :] == 0))[..., None], q, p)
        bonus_p = self.probs(rows_at(cols[:, W:]), self.oracle_temp)[:, 0] if self.bonus else None
        uniforms = self.streams.uniform(rows, 2 * k + 1, device)
        verdict = verify_drafts(p, q, drafts, K, uniforms[:, :W], uniforms[:, k], bonus=bonus_p, has_bonus=has_bonus,
                                r_atol=self.r_atol)
        a = verdict.num_accepted
        values = torch.cat([drafts, torch.zeros_like(drafts[:, :1])], 1)  # kept drafts, then the next token
        arange = torch.arange(len(rows), device=device)
        values[arange, a] = torch.where(verdict.has_next, verdict.next_token, values[arange, a])
        self._commit(rows, values, a + verdict.has_next.long(), a, torch.minimum(a + 1, K))
        self.bonus_tokens[rows] += verdict.bonus.long()
        self.count[rows] = 0
        if self.fused:
            self._take_outcome_drafts(rows, verdict, K, exact, rows_at, W, uniforms[:, k + 1:])

    def _take_outcome_drafts(self, rows, verdict, K, exact, rows_at, W, uniforms) -> None:
        """The next pending drafts of each row, from the outcome block that happened (if it was covered)."""
        k, batch = self.k, self.batch
        j = torch.where(verdict.rejected, verdict.num_accepted, K)
        n = batch.n_fixed[rows]  # already advanced past this round's tokens
        take = verdict.has_next & (j - exact.long() < self.cover) & (n < batch.stop[rows])
        if not take.any():
            return
        sel = take.nonzero().flatten()
        cols = W + int(self.bonus) + j[sel, None] * k + torch.arange(k, device=rows.device)
        q = self.probs(rows_at(cols, sel), self.proposal_temps)
        drafts = sample_categorical(q, uniforms[sel])
        count = torch.clamp(batch.stop[rows[sel]] - n[sel], max=k)
        self._set_pending(rows[sel], drafts, q, count, False)


@torch.no_grad()
def assd_decode(model: ASARM, tokens, sigma, n_prompt, lengths=None, *, padding_mask=None, k: int = 5,
                drafter="self", temperature: float = 1.0, temperature_mode: str = "target", r_atol: float = 0.0,
                bonus: bool = False, fused: bool = False, outcomes=None, draft_length=None,
                seed=None, generator: torch.Generator | None = None, engine=DEFAULT_ENGINE,
                max_new_tokens: int | None = None, progress: bool = False) -> DecodeOutput:
    """Any-Subset Speculative Decoding (see the module docstring for the schedules).

    Per round (n tokens fixed) the pending drafts for ranks ``n..n+K-1`` (``K <= k``) are verified by one
    oracle pass with the drafts written in: draft i is accepted with probability
    ``min(1, p_i(x_i) / q_i(x_i))`` and the first rejected one is replaced by a draw from
    ``normalize(max(0, p_i - q_i))``. With the self drafter the first draft is the exact conditional and
    is accepted by construction.

    Args:
        k: drafts per round (>= 1).
        drafter: a name of ``DRAFTERS`` (``"self"``, ``"ngram"``) or an object with ``propose(DraftRequest)``.
        temperature: > 0. ``temperature_mode="target"`` tempers drafts and oracle (target = tempered
            sequential joint); ``"no_temp_oracle"`` keeps the oracle and the exact first draft at T=1 and
            tempers only the other drafts (target = the T=1 joint).
        bonus: the verify call also queries rank ``n+K``; an all-accepted round commits that token too.
        fused: single-pass rounds (self drafter only; implies ``bonus``): the verify call also holds the
            next round's drafts for each covered outcome.
        outcomes: ``"all"`` or the number of outcomes covered, earliest rejection first (the most likely
            order when drafts are accepted less than half the time); uncovered outcomes fall back to a
            draft call. Only with ``fused``; default ``DEFAULT_OUTCOMES`` (2): a call holds about
            ``outcomes x k`` outcome rows, and on asarm-tiny covering all of them bought no more tokens per
            call but cost 15% in speed (benchmarks/RESULTS.md, bench_speculative.py).
        draft_length: None (always ``k``), a confidence threshold in [0, 1]
            (:class:`~asarm.sampling.draft_length.ConfidenceLength`) or a rule (see that module for the
            exactness condition).
        r_atol: LOSSY when > 0: added to the acceptance ratio, so more drafts pass and the output no
            longer follows the target distribution (per-token TV error roughly 0.6-0.7 x r_atol).
            The output is marked ``exact=False`` and a LossySamplingWarning is emitted.
        seed: int, or ``(B,)`` per-row seeds (a row then decodes identically alone or in any batch);
            or pass ``generator``.
        engine: ``"cached"`` (default), ``"full"`` (a plain Hugging Face forward per NFE, the reference's
            cost model; same outputs up to floating-point tolerance), or an engine object.
        max_new_tokens: stop each row after that many tokens (the rest stay ``<mask>``).
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    _check_temperature(temperature)
    if temperature_mode not in TEMPERATURE_MODES:
        raise ValueError(f"temperature_mode must be one of {TEMPERATURE_MODES}, got {temperature_mode!r}")
    if r_atol < 0:
        raise ValueError(f"r_atol must be >= 0, got {r_atol}")
    drafter = make_drafter(drafter)
    if fused and drafter_name(drafter) != "self":
        raise ValueError(f"fused=True drafts with the model's own draft rows: use drafter='self', not "
                         f"{drafter_name(drafter)!r}")
    if outcomes is not None and not fused:
        raise ValueError("outcomes only applies to fused=True (single-pass rounds)")
    outcomes = DEFAULT_OUTCOMES if outcomes is None else outcomes
    if outcomes != "all" and (not isinstance(outcomes, int) or isinstance(outcomes, bool) or outcomes < 1):
        raise ValueError(f"outcomes must be 'all' or an integer >= 1, got {outcomes!r}")
    rule = make_draft_length(draft_length)
    if r_atol > 0:
        warnings.warn(f"r_atol={r_atol} > 0 makes ASSD lossy: samples no longer follow the model's distribution",
                      LossySamplingWarning, stacklevel=2)
    batch = _Batch(model, tokens, sigma, n_prompt, lengths, padding_mask, max_new_tokens)
    streams = RowStreams(batch.tokens.shape[0], seed, generator)
    session = make_engine(engine, model).start(batch.tokens, batch.sigma, batch.n_prompt)
    bonus = bonus or fused
    run = _Speculation(model, batch, session, streams, drafter, k, temperature, temperature_mode, bonus, fused,
                       k + 1 if outcomes == "all" else outcomes, rule, r_atol)
    name = "assd-fused" if fused else f"assd-{drafter_name(drafter)}" + ("-bonus" if bonus else "")
    name += "-adaptive" if rule is not None else ""
    bar = _progress(batch, progress, name)

    while len(rows := batch.active_rows()):
        before = batch.n_fixed[rows].clone()
        run.draft(rows[run.count[rows] == 0])
        verify_rows = run.commit_exact(rows)
        if len(verify_rows):
            run.verify(verify_rows)
        bar.update(int((batch.n_fixed[rows] - before).sum()))
    bar.close()
    return batch.output(sampler=name, exact=r_atol == 0, drafted_by_index=run.drafted_by_index.cpu(),
                        accepted_by_index=run.accepted_by_index.cpu(), bonus_tokens=run.bonus_tokens.cpu(),
                        draft_calls=run.draft_calls.cpu(),
                        settings={"k": k, "temperature": temperature, "temperature_mode": temperature_mode,
                                  "r_atol": r_atol, "drafter": drafter_name(drafter), "bonus": bonus,
                                  "fused": fused, "outcomes": outcomes if fused else None,
                                  "draft_length": None if rule is None else getattr(rule, "name", repr(rule))})
