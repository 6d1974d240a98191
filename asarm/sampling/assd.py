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
  happened supplies the next pending drafts (with drafter ``"head"``, the model's draft head chains
  them on the token drawn at slot j and on each other: asarm.draft_head). Those drafts are proposals
  like any other (not exact by construction), so the next call verifies every one of them.

Single-pass rounds never call the drafter. A row with no pending drafts (its first call, or after an
uncovered outcome) makes a call with ``K = 0``: its bonus row is the exact conditional of rank ``n``
(committed at once) and its outcome block ``j = 0`` drafts the ranks after it. This is the classic
self-draft call, shifted by one rank, so every call of a single-pass decode commits at least one token.

Verified drafts may come from any proposal, so their temperature is free: ``draft_temperature_ratio``
tempers them at that multiple of the target's (a flatter proposal overlaps the target more when drafts
are weak). Only an exact first draft, accepted unverified, keeps the target temperature.

Why it is exact: each committed token is either an exact conditional or the output of the
accept/residual step (:func:`~asarm.sampling.rejection.verify_drafts`) for a draft drawn from a
proposal that depends only on tokens already committed (or accepted before it) and on fresh uniforms.
Every verify call commits at least one token, and a drafter call is followed by a verify call that
commits at least two (an exact first draft plus one) or is skipped when one exact draft is all that is
left, so ``NFE <= length - n_prompt`` for the self drafter with ``k >= 2``.
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

from ..model import ASARM
from ..orders import positions_of_ranks
from .batch import DecodeBatch, DecodeOutput, LossySamplingWarning, TokenProgress, add_rows, probabilities_fn
from .controller import ControlState, FixedSchedule, GoodputController
from .cost import CallCost, cached_profile, fit_call_cost, profile_key, remember_profile, timed
from .drafters import DraftRequest, chain_drafts
from .engine import DEFAULT_ENGINE, make_engine
from .random import RowStreams, sample_categorical
from .rejection import verify_drafts
from .spec import SamplerSpec
from .trace import TraceRecorder

__all__ = ["assd_decode", "profile_calls", "auto_controller"]


class _CountingSession:
    """An engine session that counts the model calls each batch row takes part in (and, when tracing,
    records the ranks they query)."""

    def __init__(self, session, calls: torch.Tensor, recorder: TraceRecorder | None):
        self.session, self.calls, self.recorder = session, calls, recorder

    def logits(self, rows, tokens, n_fixed, query_ranks, **kwargs):
        self._count(rows, query_ranks)
        return self.session.logits(rows, tokens, n_fixed, query_ranks, **kwargs)

    def states(self, rows, tokens, n_fixed, query_ranks, **kwargs):
        self._count(rows, query_ranks)
        return self.session.states(rows, tokens, n_fixed, query_ranks, **kwargs)

    def _count(self, rows, query_ranks) -> None:
        self.calls.index_add_(0, rows, torch.ones_like(rows))
        if self.recorder is not None:
            self.recorder.query(rows, query_ranks)


def _compact(ranks: torch.Tensor, limits: torch.Tensor):
    """Move each row's used query slots (rank >= 0) to the front and drop all-unused columns.
    Returns ``(ranks, limits, column)``: ``column[:, c]`` = where original column c went (None: nothing moved)."""
    used = ranks >= 0
    if bool(used.all()):
        return ranks, limits, None
    order = torch.argsort((~used).to(torch.int8), dim=1, stable=True)
    width = max(int(used.sum(1).max()), 1)
    column = torch.argsort(order, dim=1).clamp(max=width - 1)
    return ranks.gather(1, order)[:, :width], limits.gather(1, order)[:, :width], column


def _columns(logits: torch.Tensor, column, first: int, width: int) -> torch.Tensor:
    """The logits of the original query columns ``first .. first + width - 1`` (``column``: see _compact)."""
    if column is None:
        return logits[:, first:first + width]
    return logits.gather(1, column[:, first:first + width, None].expand(-1, -1, logits.shape[-1]))


class _Speculation:
    """Pending drafts and statistics of one ASSD decode; :meth:`draft` and :meth:`verify` are its steps.

    The steps take ``rows`` (the batch rows of the call) and index the per-row state with ``sel``: the same
    rows, or ``slice(None)`` when every row takes part (then state is read as views and updated in place:
    a batch-1 call does no gathers or scatters of bookkeeping)."""

    def __init__(self, model: ASARM, batch: DecodeBatch, session, streams: RowStreams, spec: SamplerSpec,
                 trace: bool, controller=None):
        k = spec.k
        self.model, self.batch, self.streams, self.drafter, self.k = model, batch, streams, spec.drafter, k
        self.bonus, self.fused, self.rule, self.r_atol = spec.bonus, spec.fused, spec.draft_length, spec.r_atol
        cover = k + 1 if spec.outcomes == "all" else spec.outcomes  # outcome blocks a fused call holds
        self.controller = controller or FixedSchedule(k, cover or 1)
        self.schedule: list[dict] | None = [] if isinstance(controller, GoodputController) else None
        B, device = batch.tokens.shape[0], batch.tokens.device
        self.recorder = TraceRecorder(batch.positions, batch.n_prompt, batch.nfe) if trace else None
        self.session = _CountingSession(session, batch.nfe, self.recorder)
        self.drafts = torch.zeros(B, k, dtype=torch.long, device=device)
        self.q = torch.zeros(B, k, model.vocab_size, dtype=torch.float64, device=device)
        self.count = torch.zeros(B, dtype=torch.long, device=device)  # pending drafts per row
        self.oracle_temp = float(spec.temperature) if spec.temperature_mode == "target" else 1.0
        # Verified drafts may come from any proposal, so their temperature is free (flatter ones overlap the
        # target more on asarm-tiny); an exact first draft is accepted unverified: it keeps the oracle's.
        self.proposal_temp = spec.temperature * spec.draft_temperature_ratio  # one number: no tensor ops per call
        self.draft_temps = torch.full((k,), self.proposal_temp, dtype=torch.float64)
        self.first_exact = self.drafter.first_draft_exact and not self.fused  # fused rounds never call the drafter
        # single-pass rounds with a head drafter: outcome drafts are chained by the model's draft head
        self.head = self.drafter.head_for(model) if self.fused else None
        self.proposal_dtype = getattr(torch, spec.proposal_dtype) if spec.proposal_dtype else None  # the head's
        self.accepted_first = spec.outcome_order == "accepted-first"
        if self.first_exact:
            self.draft_temps[0] = self.oracle_temp
            self.exact = torch.zeros(B, dtype=torch.bool, device=device)  # pending slot 0 is exact
        self.drafted_by_index = torch.zeros(B, k, dtype=torch.long, device=device)
        self.accepted_by_index = torch.zeros_like(self.drafted_by_index)
        self.bonus_tokens = torch.zeros(B, dtype=torch.long, device=device)
        self.draft_calls = torch.zeros(B, dtype=torch.long, device=device)
        self._layouts: dict[tuple, tuple] = {}
        self.probs = probabilities_fn(model)

    def _sel(self, rows: torch.Tensor):
        return slice(None) if len(rows) == len(self.count) else rows

    # ---------------------------------------------------------------------------- drafting
    def draft(self, rows: torch.Tensor) -> None:
        """A drafter call for ``rows`` (which have no pending drafts)."""
        if not len(rows):
            return
        batch, device, sel = self.batch, rows.device, self._sel(rows)
        n = batch.n_fixed[sel]
        count = torch.clamp(batch.stop[sel] - n, max=self.k)
        idx = torch.arange(int(count.max()), device=device)
        ranks = torch.where(idx[None, :] < count[:, None], n[:, None] + idx, -1)
        uniforms = self.streams.uniform(rows, self.k, device)[:, :len(idx)]
        calls_before = batch.nfe[sel].clone()
        drafts, q = self.drafter.propose(DraftRequest(
            session=self.session, rows=rows, tokens=batch.tokens[sel], sigma=batch.sigma[sel], n_fixed=n,
            query_ranks=ranks, query_positions=positions_of_ranks(batch.positions[sel], ranks), uniforms=uniforms,
            to_probs=self.probs, draft_temperatures=self.draft_temps[:len(idx)],
            mask_token_id=self.model.mask_token_id, vocab_size=self.model.vocab_size, model=self.model,
            proposal_dtype=self.proposal_dtype))
        add_rows(batch.model_free_draft_calls, sel, batch.nfe[sel] == calls_before)
        add_rows(self.draft_calls, sel, torch.ones_like(count))
        self._set_pending(sel, drafts, q, self._length(q, drafts, count))
        if self.first_exact:
            self.exact[sel] = True

    def _length(self, q, drafts, count) -> torch.Tensor:
        """Drafts to verify per row: ``count``, or fewer where the draft-length rule says so (at least 1)."""
        if self.rule is None:
            return count
        return torch.minimum(torch.as_tensor(self.rule(q, drafts, count), device=count.device), count).clamp(min=1)

    def _set_pending(self, sel, drafts, q, count) -> None:
        width = drafts.shape[1]
        self.drafts[sel, :width], self.q[sel, :width], self.count[sel] = drafts, q, count

    # ---------------------------------------------------------------------------- committing
    def _commit(self, sel, n, values, fixed, accepted, verified) -> None:
        """Write ``values[:, :fixed]`` at ranks ``n..`` and update the statistics."""
        batch = self.batch
        idx = torch.arange(values.shape[1], device=n.device)
        batch.write(sel, (n[:, None] + idx).masked_fill(idx >= fixed[:, None], -1), values)
        add_rows(batch.n_fixed, sel, fixed)
        add_rows(batch.accepted, sel, accepted)
        add_rows(batch.rounds, sel, 1)
        width = min(values.shape[1], self.k)
        add_rows(self.drafted_by_index[:, :width], sel, idx[:width] < verified[:, None])
        add_rows(self.accepted_by_index[:, :width], sel, idx[:width] < accepted[:, None])

    def commit_exact(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows whose only pending draft is exact commit it without a verify call; returns the others."""
        if not self.first_exact:
            return rows
        alone = self.exact[rows] & (self.count[rows] == 1)
        done = rows[alone]
        if len(done):
            one, n, drafts = torch.ones_like(done), self.batch.n_fixed[done], self.drafts[done, :1]
            self._commit(done, n, drafts, one, one, one)
            self.count[done] = 0
            if self.recorder is not None:
                q_x = self.q[done, :1].gather(2, drafts[..., None])[..., 0]
                self.recorder.round(done, n, drafts, one, [["draft"]] * len(done), drafts, q_x, p_x=q_x, drafted=one,
                                    verified=one, accepted=one)  # an exact draft: its target probability is q
        return rows[~alone]

    # ---------------------------------------------------------------------------- verifying
    def _layout(self, W: int, width: int, cover: int):
        """Query columns of a verify call whose rows hold at most ``W`` drafts: the verify columns
        ``0..W-1``, the bonus column ``W`` (if ``bonus``), then ``C = min(cover, W + 1)`` outcome blocks of
        ``width`` columns each (if ``fused``): outcomes ``j = 0..C-1`` (first rejection at slot j), or with
        ``accepted_first`` the all-accepted outcome (``j = K``) and then ``j = 0..C-2``. Per column: rank and
        limit offsets from ``n``, whether the row's ``K`` is added to both (the bonus column and the
        all-accepted block), the fewest pending drafts ``K`` that make it used, and for outcome columns their
        slot in the block (1..width; 0 elsewhere) and block index (-1 elsewhere): a row uses the slots up to its
        own width and the blocks below its own cover."""
        key = (W, width, cover)
        if key not in self._layouts:
            device = self.batch.tokens.device
            idx, zero = torch.arange(W, device=device), torch.zeros(1, dtype=torch.long, device=device)
            rank, limit, plus_k, needs, slot, block = [idx], [idx], [idx * 0], [idx + 1], [idx * 0], [idx * 0 - 1]
            if self.bonus:
                rank, limit, plus_k, needs = rank + [zero], limit + [zero], plus_k + [zero + 1], needs + [zero]
                slot, block = slot + [zero], block + [zero - 1]
            if self.fused and width:
                blocks = min(cover, W + 1)
                j = torch.arange(blocks - int(self.accepted_first), device=device)[:, None].expand(-1, width)
                after = torch.arange(1, width + 1, device=device)
                if self.accepted_first:  # ranks after n + K, seeing ranks < n + K: used by every row
                    rank, limit, plus_k, needs = rank + [after], limit + [after * 0], plus_k + [after * 0 + 1], \
                        needs + [after * 0]
                    slot, block = slot + [after], block + [after * 0]
                rank.append((j + after).flatten())
                limit.append(j.flatten())
                plus_k.append(j.flatten() * 0)
                needs.append(j.flatten() + int(self.accepted_first))  # (j = K is the all-accepted block then)
                slot.append(after.expand_as(j).flatten())
                block.append(j.flatten() + int(self.accepted_first))
            self._layouts[key] = tuple(torch.cat(parts)[None, :] for parts in (rank, limit, plus_k, needs, slot, block))
        return self._layouts[key]

    def _plan(self, rows, sel, K):
        """The controller's schedule for this call (asarm.sampling.controller)."""
        state = ControlState(n_fixed=self.batch.n_fixed[sel], stop=self.batch.stop[sel], pending=K,
                             drafted_by_index=self.drafted_by_index[sel],
                             accepted_by_index=self.accepted_by_index[sel], all_proposals=self.q, sel=sel)
        plan = self.controller.plan(state, rows)
        if plan.verify is not None:
            K = torch.minimum(K, plan.verify)
        return plan, K

    def verify(self, rows: torch.Tensor) -> None:
        """One model call: verify rows, bonus row and outcome rows; commit; set the next pending drafts."""
        batch, k, sel = self.batch, self.k, self._sel(rows)
        if self.fused and not getattr(self.controller, "drafting_can_pay", True) and not self.count[sel].any():
            return self._step_without_drafts(rows, sel, batch.n_fixed[sel].clone())  # no plan to make
        n, K, stop = batch.n_fixed[sel].clone(), self.count[sel].clone(), batch.stop[sel]
        plan, K = self._plan(rows, sel, K) if self.fused else (None, K)
        W = int(K.max())
        width, cover = (int(plan.width.max()), int(plan.cover.max())) if self.fused else (0, 0)
        if self._sequential_step(W, width):
            return self._step_without_drafts(rows, sel, n)
        rank_offset, limit_offset, plus_k, needs, slot, block = self._layout(W, width, cover)
        base = n[:, None] + K[:, None] * plus_k
        ranks, limits = base + rank_offset, base + limit_offset
        used = (needs <= K[:, None]) & (ranks < stop[:, None])
        if self.fused:
            used &= (slot <= plan.width[:, None]) & (block < plan.cover[:, None])
        exact = self.exact[sel] if self.first_exact and W else None
        if exact is not None:
            used[:, 0] &= ~exact  # an exact first draft is accepted by construction: not queried again
        query_ranks, query_limits, column = _compact(ranks.masked_fill(~used, -1), limits)
        self.last_call = {"query_rows": query_ranks.shape[1], "head_slots": width if self.head is not None else 0,
                          "content_rows": W}

        drafts, q = self.drafts[sel, :W], self.q[sel, :W]
        written = batch.with_values(sel, ranks[:, :W].masked_fill(needs[:, :W] > K[:, None], -1), drafts)
        if self.head is None:
            outputs = self.session.logits(rows, written, n, query_ranks, limits=query_limits)
            verify_logits = _columns(outputs, column, 0, W + int(self.bonus))
        else:  # the draft head reads the outcome rows' states; only the verify and bonus rows need logits
            outputs = self.session.states(rows, written, n, query_ranks, limits=query_limits)
            verify_logits = self.model.backbone.lm_head(_columns(outputs, column, 0, W + 1))

        p = self.probs(verify_logits, self.oracle_temp)
        bonus_p, p = (p[:, W], p[:, :W]) if self.bonus else (None, p)
        if exact is not None:
            p[:, 0] = torch.where(exact[:, None], q[:, 0], p[:, 0])
        uniforms = self.streams.uniform(rows, 2 * k + 1, rows.device)
        verdict = verify_drafts(p, q, drafts, K, uniforms[:, :W], uniforms[:, k], bonus=bonus_p,
                                has_bonus=used[:, W] if self.bonus else None, r_atol=self.r_atol)
        a = verdict.num_accepted
        fixed = a + verdict.has_next
        values = torch.cat([drafts, verdict.next_token[:, None]], 1)  # kept drafts, then the next token
        if W:
            values.scatter_(1, a[:, None], verdict.next_token[:, None])
        verified = torch.minimum(a + 1, K)
        self._commit(sel, n, values, fixed, a, verified)
        if self.recorder is not None:
            self._record(rows, n, values, fixed, verdict, K, verified, drafts, q, p)
        if self.bonus:
            add_rows(self.bonus_tokens, sel, verdict.bonus)
        if self.fused:
            add_rows(self.draft_calls, sel, K == 0)  # a call without drafts is the fused form of a draft call
            self._next_from_outcomes(rows, sel, n + fixed, stop, verdict, K, outputs, column, W, uniforms[:, k + 1:],
                                     plan, width, cover)
            self._log_schedule(rows, sel, width, cover)
        else:
            self.count[sel] = 0

    def _log_schedule(self, rows, sel, width: int, cover: int) -> None:
        """assd-auto's record of a call: its batch rows, query rows, predicted seconds, the schedule chosen, and the
        drafts each row has for the next call (fewer than the width where its outcome was not covered or its
        text ends)."""
        if self.schedule is not None:
            self.schedule.append({"rows": rows.tolist(), "query_rows": self.last_call["query_rows"],
                                  "predicted_seconds": self.controller.price(self.last_call), "width": width,
                                  "outcomes": cover, "drafts": self.count[sel].tolist()})

    def observe(self, seconds: float) -> None:
        """The last call's measured seconds: recorded in assd-auto's schedule and given to its controller."""
        if self.schedule is not None:
            self.schedule[-1]["seconds"] = seconds
            self.controller.observe(self.last_call, seconds)

    @staticmethod
    def _sequential_step(W: int, width: int) -> bool:
        """A call in which no row verifies drafts or prepares any (assd-auto where drafts do not pay)."""
        return W == 0 and width == 0

    def _step_without_drafts(self, rows, sel, n) -> None:
        """The same call as a single-pass one whose rows have no drafts and get none (its bonus row is the exact
        next token; same uniform, same token), without the outcome machinery: a sequential step's cost."""
        uniforms = self.streams.uniform(rows, 2 * self.k + 1, rows.device)
        logits = self.session.logits(rows, self.batch.tokens[rows], n, n[:, None], draft=False)
        token = sample_categorical(self.probs(logits, self.oracle_temp)[:, 0], uniforms[:, self.k])[:, None]
        one = torch.ones_like(n)
        self.batch.write(sel, n[:, None], token)
        for counter in (self.batch.n_fixed, self.batch.rounds, self.bonus_tokens, self.draft_calls):
            add_rows(counter, sel, one)
        self.count[sel] = 0
        self.last_call = {"query_rows": 1, "head_slots": 0, "content_rows": 0}
        self._log_schedule(rows, sel, 0, 1)
        if self.recorder is not None:
            self.recorder.round(rows, n, token, one, [["sequential"]] * len(rows))

    def _record(self, rows, n, values, fixed, verdict, K, verified, drafts, q, p) -> None:
        """The trace of a verify round: accepted drafts, then the residual, bonus or (no drafts) exact token."""
        next_origin = torch.where(verdict.rejected, 0, torch.where(K > 0, 1, 2)).tolist()
        origins = [["draft"] * int(a) + [("residual", "bonus", "sequential")[o]]
                   for a, o in zip(verdict.num_accepted.tolist(), next_origin)]
        q_x, p_x = (probs.gather(2, drafts[..., None])[..., 0] for probs in (q, p))
        self.recorder.round(rows, n, values, fixed, origins, drafts, q_x, p_x=p_x, drafted=K, verified=verified,
                            accepted=verdict.num_accepted)

    def _next_from_outcomes(self, rows, sel, n, stop, verdict, K, outputs, column, W, uniforms, plan, width,
                            cover) -> None:
        """Each row's next pending drafts, from the outcome block that happened (``outputs``: the call's logits,
        or with a draft head its query states, which the head turns into chained drafts that follow the token
        just committed); none (the next call then drafts for itself) where that outcome was not covered or the
        plan gave the row no drafts."""
        j = torch.where(verdict.rejected, verdict.num_accepted, K)  # the outcome: first rejected slot, or K
        count = torch.minimum(stop - n, plan.width)
        take, prev_token = verdict.has_next & (count > 0), verdict.next_token
        num_blocks = min(cover, W + 1)
        if self.accepted_first:
            j = torch.where(j == K, 0, j + 1)  # the outcome's block
        take &= (j < num_blocks) & (j < plan.cover)  # (a plan of width 0 gives count 0: nothing taken)
        if not bool(take.all()):
            self.count[sel] = 0
            if not take.any():
                self.last_call["head_slots"] = 0  # the head did not run: the call's price (and profile) says so
                return
            taken = take.nonzero().flatten()
            sel, j, count, uniforms, n = rows[taken], j[taken], count[taken], uniforms[taken], n[taken]
            outputs, column = outputs[taken], None if column is None else column[taken]
            prev_token = prev_token[taken]
        blocks = _columns(outputs, column, W + int(self.bonus), num_blocks * width).unflatten(1, (-1, width))
        block = blocks.gather(1, j[:, None, None, None].expand(-1, 1, width, blocks.shape[-1]))[:, 0]
        uniforms = uniforms[:, :width]
        if self.head is None:
            q = self.probs(block, self.proposal_temp)
            drafts = sample_categorical(q, uniforms)
        else:
            idx = torch.arange(-1, width, device=n.device)  # the committed token's rank n - 1, then the drafts'
            ranks = (n[:, None] + idx).masked_fill(idx >= count[:, None], -1)
            positions = positions_of_ranks(self.batch.positions[sel], ranks)
            drafts, q = chain_drafts(self.head, self.model, block, prev_token, positions[:, 1:], positions[:, 0],
                                     uniforms, self.probs, self.proposal_temp, self.proposal_dtype)
        self._set_pending(sel, drafts, q, self._length(q, drafts, count))


PROFILE_CALLS = 2  # timed calls per block of a profiled schedule (after one untimed call that fills the cache)
PROFILE_BUDGET_SECONDS = 0.5  # the profile stops adding blocks past this (after at least PROFILE_MIN_BLOCKS)
PROFILE_MIN_BLOCKS = 5
PRIOR_ACCEPTANCE = {True: 0.7, False: 0.3}  # a row's acceptance before its own drafts: with the head, without


def _profiled_schedules(k: int) -> list[tuple[int, int]]:
    """(width, cover) of the profile: from a sequential step to the widest call, so the fit spans the query
    rows that the controller can choose, then every other width's widest call (each width gets its measured
    residual, asarm.sampling.cost; a tight budget drops those first)."""
    return list(dict.fromkeys([(0, 1), (1, 2), (min(2, k), min(3, k + 1)), (k, 1), (k, k + 1), (min(3, k), 2),
                               *((width, width + 1) for width in range(3, k))]))


def profile_calls(model: ASARM, inputs: tuple, spec: SamplerSpec, engine=DEFAULT_ENGINE,
                  budget_seconds: float = PROFILE_BUDGET_SECONDS) -> CallCost:
    """Time real single-pass calls of a few fixed schedules on the decode's own inputs (``(tokens, sigma,
    n_prompt, lengths, padding_mask, max_new_tokens)``) and fit the call cost model (asarm.sampling.cost).
    The calls are timed halfway through the span each row decodes (up to ``max_new_tokens``; what precedes it
    taken as the prompt, blanks filled with a stand-in token) and may run on to the end of the text: a query
    row's cost grows with the ranks it sees, so the middle prices the average call.
    Every block starts from the same prompt, on one engine session. After one untimed call of every schedule
    (the process's first calls of these shapes run cold), each
    schedule is timed in two blocks of consecutive calls (warm, as in a decode), the second pass over the
    schedules in reversed order, so that a slow spell of a shared machine does not price one kind of call
    alone."""
    samples, began = [], time.perf_counter()
    full, max_new_tokens = DecodeBatch(model, *inputs), inputs[5]
    middle = full.n_prompt + (full.stop - full.n_prompt) // 2
    stand_in = (model.mask_token_id + 1) % model.vocab_size
    inputs = (full.tokens.masked_fill(full.tokens == model.mask_token_id, stand_in), full.sigma, middle,
              *inputs[3:5], None)
    schedules = _profiled_schedules(spec.k)
    # one session for every block: a block starts from the prompt again, and the session finds its states above
    # the prompt stale (their tokens differ) and recomputes them, so the prompt, as costly as tens of calls at
    # a large batch, is encoded once
    session = make_engine(engine, model).start(inputs[0], inputs[1], middle)
    blocks = [(schedule, 0) for schedule in schedules] + [(schedule, PROFILE_CALLS)
                                                          for schedule in schedules + schedules[::-1]]
    for done, ((width, cover), timed_calls) in enumerate(blocks):
        if timed_calls and done >= len(schedules) + PROFILE_MIN_BLOCKS and time.perf_counter() - began > \
                budget_seconds:
            break
        batch = DecodeBatch(model, *inputs)
        run = _Speculation(model, batch, session, RowStreams(batch.tokens.shape[0], done, None), spec,
                           trace=False, controller=FixedSchedule(width, cover))
        for call in range(1 + timed_calls):
            rows = batch.active_rows()
            if not len(rows):
                break
            seconds, _ = timed(model.device, lambda: run.verify(rows))
            if call:
                samples.append(dict(run.last_call, width=width, cover=cover, block=done, seconds=seconds))
    B, L = inputs[0].shape
    cost = fit_call_cost(samples, B, L, model.device, time.perf_counter() - began)
    cost.proposal_dtype, cost.max_new_tokens = spec.proposal_dtype, max_new_tokens
    return cost


def _call_cost(model: ASARM, inputs: tuple, spec: SamplerSpec, engine) -> CallCost:
    """The cost model for this decode: the process's profile of the same setting, else the saved one of
    ``spec.cost_profile`` if it was measured here, else a new profile (saved there when a path is given)."""
    (B, L), max_new_tokens = inputs[0].shape, inputs[5]
    key = profile_key(model, B, L, (spec.drafter.name, spec.k, spec.outcome_order, str(engine), spec.proposal_dtype,
                                    max_new_tokens))
    cost = cached_profile(key)
    if cost is None and spec.cost_profile is not None and Path(spec.cost_profile).is_file():
        cost = CallCost.load(spec.cost_profile)
        if not cost.matches(model.device, B, L, spec.proposal_dtype, max_new_tokens):
            print(f"assd-auto: the cost profile {spec.cost_profile} was measured for {cost.device}, "
                  f"{cost.threads} threads, batch {cost.batch_rows}, length {cost.length}, max_new_tokens "
                  f"{cost.max_new_tokens}, draft head in {cost.proposal_dtype}: measuring again", file=sys.stderr)
            cost = None
    if cost is None:
        cost = profile_calls(model, inputs, spec, engine)
        if spec.cost_profile is not None:
            cost.save(spec.cost_profile)
    remember_profile(key, cost)
    return cost


def auto_controller(model: ASARM, spec: SamplerSpec, cost: CallCost) -> GoodputController:
    """The goodput controller of ``assd-auto``: widths 0..k, covers 1, 2 and every outcome (or the spec's
    ``outcomes``), priced by ``cost``, and with ``spec.learn_prices`` by the decodes' measured call times."""
    k, head = spec.k, spec.drafter.head_for(model) is not None
    options = [(0, 1)]
    for width in range(1, k + 1):
        covers = {1, 2, width + 1} if spec.outcomes is None else \
            {width + 1 if spec.outcomes == "all" else min(spec.outcomes, width + 1)}
        options += [(width, cover) for cover in sorted(covers)]
    return GoodputController(cost, k, options, spec.outcome_order == "accepted-first", head, PRIOR_ACCEPTANCE[head],
                             learn_prices=spec.learn_prices)


@torch.no_grad()
def assd_decode(model: ASARM, tokens, sigma, n_prompt, lengths=None, *, spec: SamplerSpec | None = None,
                padding_mask=None, seed=None, generator: torch.Generator | None = None, engine=DEFAULT_ENGINE,
                max_new_tokens: int | None = None, progress: bool = False, trace: bool = False,
                **settings) -> DecodeOutput:
    """Any-Subset Speculative Decoding (see the module docstring for the schedules).

    Per round (n tokens fixed) the pending drafts for ranks ``n..n+K-1`` (``K <= k``) are verified by one
    oracle pass with the drafts written in: draft i is accepted with probability
    ``min(1, p_i(x_i) / q_i(x_i))`` and the first rejected one is replaced by a draw from
    ``normalize(max(0, p_i - q_i))``. With the self drafter the first draft is the exact conditional and
    is accepted by construction.

    The sampler is ``spec`` (a :class:`~asarm.sampling.spec.SamplerSpec`, e.g. ``SAMPLERS["assd-fused"]``;
    default: two-call rounds with self drafts) with the keyword ``settings`` applied on top, one keyword per
    spec field:

        k: drafts per round (>= 1; default 5).
        drafter: a name of ``DRAFTERS`` (``"self"``, ``"head"``, ``"ngram"``) or a drafter object
            (asarm.sampling.drafters).
        temperature: > 0. ``temperature_mode="target"`` tempers drafts and oracle (target = tempered
            sequential joint); ``"no_temp_oracle"`` keeps the oracle and the exact first draft at T=1 and
            tempers only the other drafts (target = the T=1 joint).
        bonus: the verify call also queries rank ``n+K``; an all-accepted round commits that token too.
        fused: single-pass rounds (a ``single_pass`` drafter: ``"self"`` or ``"head"``; implies ``bonus``):
            the verify call also holds the next round's draft rows for each covered outcome; the drafter is
            never called (with ``"head"`` the draft head turns the outcome's rows into chained drafts after
            the call).
        outcomes: ``"all"`` or the number of outcomes covered, most likely first: the earliest rejections
            for the model's own drafts (accepted less than half the time), the all-accepted outcome and then
            the earliest rejections for the draft head's (mostly all accepted). After an uncovered outcome
            the next call has no drafts to verify (it drafts for itself, see above). Only with ``fused``;
            default: the model's stored one, else ``DEFAULT_OUTCOMES`` (2), or ``HEAD_OUTCOMES`` ("all") with
            drafter ``"head"``: a call holds about ``outcomes x k`` outcome rows.
        draft_temperature_ratio: verified drafts (self drafts after the first, single-pass drafts) are
            drawn at ``temperature x draft_temperature_ratio``; exact at any value > 0. Default: the model's
            stored one (asarm.json, draft_head.json; asarm.sampling.spec), else
            ``DEFAULT_DRAFT_TEMPERATURE_RATIO`` (1.0, the paper's: the fewest NFE on asarm-tiny,
            benchmarks/RESULTS.md), or with drafter ``"head"`` ``HEAD_DRAFT_TEMPERATURE_RATIO`` (1.0), since a
            distilled head already matches the target at T = 1. The n-gram drafter ignores it.
        draft_length: None (always ``k``), a confidence threshold in [0, 1]
            (:class:`~asarm.sampling.draft_length.ConfidenceLength`) or a rule (see that module for the
            exactness condition).
        r_atol: LOSSY when > 0: added to the acceptance ratio, so more drafts pass and the output no
            longer follows the target distribution (per-token TV error roughly 0.6-0.7 x r_atol).
            The output is marked ``exact=False`` and a LossySamplingWarning is emitted.

    Args:
        seed: int, or ``(B,)`` per-row seeds (a row then decodes identically alone or in any batch);
            or pass ``generator``.
        engine: ``"cached"`` (default), ``"full"`` (a plain two-stream forward per NFE, the reference's
            cost model; same outputs up to floating-point tolerance), or an engine object.
        max_new_tokens: stop each row after that many tokens (the rest stay ``<mask>``).
        trace: record every round in ``DecodeOutput.trace`` (:mod:`asarm.sampling.trace`; same tokens).
    """
    spec = (spec or SamplerSpec()).replace(**settings)
    if spec.algorithm != "assd":
        raise ValueError(f"assd_decode runs ASSD samplers, not {spec.name!r} (asarm.sampling.decode runs any sampler)")
    spec = spec.resolve(model)
    if not spec.exact:
        warnings.warn(f"r_atol={spec.r_atol} > 0 makes ASSD lossy: samples no longer follow the model's distribution",
                      LossySamplingWarning, stacklevel=2)
    inputs = (tokens, sigma, n_prompt, lengths, padding_mask, max_new_tokens)
    batch = DecodeBatch(model, *inputs)
    cost = _call_cost(model, (batch.tokens, *inputs[1:]), spec, engine) if spec.controller == "auto" else None
    streams = RowStreams(batch.tokens.shape[0], seed, generator)
    session = make_engine(engine, model).start(batch.tokens, batch.sigma, batch.n_prompt)
    run = _Speculation(model, batch, session, streams, spec, trace,
                       controller=None if cost is None else auto_controller(model, spec, cost))
    bar = TokenProgress(batch, progress, spec.name)

    while len(rows := batch.active_rows()):
        verify_rows = rows
        if not spec.fused:  # single-pass rounds never call the drafter: a call without drafts drafts itself
            run.draft(rows[run.count[rows] == 0])
            verify_rows = run.commit_exact(rows)
        if len(verify_rows):
            began = time.perf_counter()
            run.verify(verify_rows)
            run.observe(time.perf_counter() - began)
        bar.advance()
    bar.close()
    return batch.output(sampler=spec.name, exact=spec.exact, drafted_by_index=run.drafted_by_index.cpu(),
                        accepted_by_index=run.accepted_by_index.cpu(), bonus_tokens=run.bonus_tokens.cpu(),
                        draft_calls=run.draft_calls.cpu(), trace=None if run.recorder is None else run.recorder.trace,
                        schedule=run.schedule, settings=spec.settings() | ({} if cost is None else
                                                                           {"cost_model": cost.summary()}))
