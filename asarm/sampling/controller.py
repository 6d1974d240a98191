"""Schedules of single-pass ASSD calls: before each call a controller (``plan(state, rows) -> Plan``; ``rows``:
the batch rows of the call) chooses, per row, how many pending drafts to verify, how many drafts the next call
gets (the width of the outcome blocks; 0 is a sequential step) and how many outcomes it covers.

Exactness condition (as for draft-length rules, asarm.sampling.draft_length): a plan may depend on the
committed tokens, earlier verdicts (acceptance counts), the pending drafts' proposal distributions and the
clock, never on the values of pending drafts or on the acceptance uniforms. Reading a pending draft's value to
decide how many drafts to verify biases the output; the exactness suite holds such a controller as a negative
control and rejects it.

* :class:`FixedSchedule`: every row the same width and cover (the fixed-k samplers).
* :class:`GoodputController` (``assd-auto``): the width and cover that maximise the batch's expected
  committed tokens per second, from a cost model of a call (asarm.sampling.cost) and each row's running
  acceptance estimate by slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Plan", "ControlState", "FixedSchedule", "GoodputController", "steady_state", "expected_rates"]

MAX_MARGIN = 0.25  # the most gain over sequential steps asked of drafting (a noisy profile must not stop it)


@dataclass
class Plan:
    """One call's schedule, per row: ``verify`` (None: every pending draft), ``width`` and ``cover``."""

    verify: torch.Tensor | None  # (b,) most pending drafts to verify
    width: torch.Tensor  # (b,) drafts per outcome block = the next call's drafts (0: none)
    cover: torch.Tensor  # (b,) outcome blocks held, most likely outcomes first (>= 1)


@dataclass
class ControlState:
    """What a controller may read before a call (the rows taking part, in order)."""

    n_fixed: torch.Tensor  # (b,) committed tokens
    stop: torch.Tensor  # (b,) rank at which the row ends
    pending: torch.Tensor  # (b,) pending drafts
    drafted_by_index: torch.Tensor  # (b, k) drafts verified so far, per slot
    accepted_by_index: torch.Tensor  # (b, k) drafts accepted so far, per slot
    all_proposals: torch.Tensor  # (B, k, V) every batch row's pending proposals (read through ``proposals``)
    sel: torch.Tensor | slice  # the call's rows in ``all_proposals``

    @property
    def proposals(self) -> torch.Tensor:
        """``(b, k, V)`` the pending drafts' proposal distributions (slots < pending), gathered on demand."""
        return self.all_proposals[self.sel]


class FixedSchedule:
    """Every row: outcome blocks of ``width`` drafts, ``cover`` of them; every pending draft verified."""

    def __init__(self, width: int, cover: int):
        self.width, self.cover = int(width), int(cover)

    def plan(self, state: ControlState, rows: torch.Tensor | None = None) -> Plan:
        full = torch.full_like(state.pending, self.width)
        return Plan(None, full, torch.full_like(state.pending, self.cover))


def steady_state(acceptance: torch.Tensor, widths: torch.Tensor, covers: torch.Tensor,
                 accepted_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and option ``o`` (``widths[o]`` drafts per block, ``covers[o]`` blocks), in the steady state of a
    row that follows it, from its per-slot conditional acceptance ``(b, k)``: the expected tokens per call and
    the share of calls without drafts, both ``(b, O)``. A call with drafts commits ``E = 1 + sum_i S_i`` tokens
    (``S_i``: the first i drafts all accepted) and leaves the next call drafts with the probability ``P`` that
    its outcome is covered; a call without drafts commits 1 token and always leaves drafts. So a share
    ``(1 - P) / (2 - P)`` of the calls has no drafts, and a call commits ``(E + 1 - P) / (2 - P)`` tokens on
    average. Width 0 is plain sequential decoding (one token, no drafts)."""
    b, k = acceptance.shape
    survival = torch.cat([acceptance.new_ones(b, 1), acceptance.cumprod(1)], 1)  # S_0 .. S_k
    tokens = survival.cumsum(1)[:, widths]  # 1 + S_1 + ... + S_w
    all_accepted = survival[:, widths]
    if accepted_first:  # the all-accepted block, then first rejections at slots 0 .. cover - 2
        covered = all_accepted + 1 - survival[:, (covers - 1).clamp(max=k)]
    else:  # first rejections at slots 0 .. cover - 1 (slot w: all accepted)
        covered = torch.where(covers > widths, 1.0, 1 - survival[:, covers.clamp(max=k)])
    covered = torch.where(widths == 0, 1.0, covered.clamp(0, 1))
    tokens = torch.where(widths == 0, 1.0, tokens)
    missed = 1 - covered
    without = torch.where(widths == 0, 1.0, missed / (2 - covered))
    return torch.where(widths == 0, 1.0, (tokens + missed) / (2 - covered)), without


def expected_rates(acceptance: torch.Tensor, widths: torch.Tensor, covers: torch.Tensor, seconds_with: torch.Tensor,
                   seconds_without: torch.Tensor, accepted_first: bool) -> torch.Tensor:
    """Expected committed tokens per second ``(O,)`` of a batch whose rows all follow option ``o``: the rows'
    tokens per call (:func:`steady_state`) over the seconds of a call, which costs ``seconds_without`` only
    when no row of it has drafts (the call's widest row sets its cost) and ``seconds_with`` otherwise."""
    tokens, without = steady_state(acceptance, widths, covers, accepted_first)
    none_drafting = without.clamp(min=1e-300).log().sum(0).exp()  # every row of the call without drafts
    seconds = none_drafting * seconds_without + (1 - none_drafting) * seconds_with
    return tokens.sum(0) / seconds


class GoodputController:
    """For each call, the (width, cover) of ``options`` with the most expected committed tokens per second for the
    batch (one schedule for the call: its widest row sets its cost, so a row with fewer drafts saves nothing),
    from each row's own acceptance; rows then differ where they explore or probe.

    ``cost(query_rows, head_slots, content_rows)`` predicts a call's seconds (asarm.sampling.cost.CallCost).
    A row's acceptance at slot i is its own count plus ``prior_weight`` pseudo-drafts at the row's rate over
    all slots, itself its count plus ``prior_weight`` pseudo-drafts at ``prior``: a row starts from the prior
    and follows its own drafts. A row without any verdict yet drafts at least one, to get one; a row that
    chose no drafts for ``probe_every`` calls in a row tries width 1 once, so it notices when drafts start to
    pass again, where such a call costs less than 1.25 sequential steps (a probe widens the whole call).

    Drafting must beat sequential steps by more than the cost model's own error on this machine
    (``margin``; default: the fit's largest relative error over the profiled calls, at most ``MAX_MARGIN``):
    a gain smaller than the error of the prices it rests on is as likely a loss."""

    def __init__(self, cost, k_max: int, options: list[tuple[int, int]], accepted_first: bool, head: bool,
                 prior: float, prior_weight: float = 4.0, probe_every: int = 16, margin: float | None = None):
        self.cost, self.k_max, self.accepted_first = cost, k_max, accepted_first
        self.margin = min(cost.relative_error, MAX_MARGIN) if margin is None else float(margin)
        self.sequential = options.index((0, 1)) if (0, 1) in options else None
        self.prior, self.prior_weight, self.probe_every = prior, prior_weight, probe_every
        self.widths = torch.tensor([w for w, _ in options])
        self.covers = torch.tensor([c for _, c in options])
        # a call with drafts holds w verify rows, the bonus row and min(cover, w + 1) blocks of w; one without
        # drafts the bonus row and one block; the head chains w slots after either
        blocks = torch.minimum(self.covers, self.widths + 1)
        slots = self.widths * int(head)
        self.seconds_with = torch.tensor([cost(int(w + 1 + c * w), int(s), int(w)) for w, c, s in
                                          zip(self.widths, blocks, slots)], dtype=torch.float64)
        self.seconds_without = torch.tensor([cost(int(1 + w), int(s), 0) for w, s in zip(self.widths, slots)],
                                            dtype=torch.float64)
        self.idle = torch.zeros(0, dtype=torch.long)  # per batch row: calls in a row without drafts (probing)
        self._seen, self._best = None, None  # the last plan's inputs and choices
        # a probe widens the whole call: worth it only where a call's cost is mostly fixed (small batches)
        probe = int(((self.widths == 1) & (self.covers == 2)).nonzero()[0]) if (1, 2) in options else None
        self.probe_pays = probe is not None and float(self.seconds_with[probe]) < 1.25 * float(self.seconds_with[0])

    def acceptance(self, state: ControlState) -> torch.Tensor:
        """Per row and slot: the slot's own rate, shrunk towards the row's rate over all slots (so a slot the
        row has not drafted yet takes the row's), which is shrunk towards the prior."""
        drafted, accepted = state.drafted_by_index.double(), state.accepted_by_index.double()
        overall = (accepted.sum(1, keepdim=True) + self.prior_weight * self.prior) / \
            (drafted.sum(1, keepdim=True) + self.prior_weight)
        return (accepted + self.prior_weight * overall) / (drafted + self.prior_weight)

    def plan(self, state: ControlState, rows: torch.Tensor | None = None) -> Plan:
        # the same rows with no new verdicts since the last call (e.g. sequential steps) keep their choice
        seen = (len(state.pending), int(state.drafted_by_index.sum()), int(state.accepted_by_index.sum()),
                None if rows is None else int(rows.sum()))
        if seen != self._seen:
            rates = expected_rates(self.acceptance(state).cpu(), self.widths, self.covers, self.seconds_with,
                                   self.seconds_without, self.accepted_first)
            best = int(rates.argmax())
            if self.sequential is not None and rates[best] < (1 + self.margin) * rates[self.sequential]:
                best = self.sequential  # the predicted gain is within the cost model's error
            self._seen, self._best = seen, best
        b = len(state.pending)
        width, cover = self.widths[self._best].expand(b).clone(), self.covers[self._best].expand(b).clone()
        # a row with no verdict yet tries drafts once, so that a pessimistic prior cannot keep it from learning
        fresh = ((state.drafted_by_index.sum(1) == 0) & (state.pending == 0)).cpu() & (width == 0)
        width, cover = torch.where(fresh, 1, width), torch.where(fresh, 2, cover)
        if rows is not None and self.probe_pays:  # rows that have not drafted for probe_every calls try one draft
            rows = rows.cpu()
            if len(self.idle) <= int(rows.max()):
                self.idle = torch.cat([self.idle, self.idle.new_zeros(int(rows.max()) + 1 - len(self.idle))])
            idle = torch.where(width == 0, self.idle[rows] + 1, 0)
            probe = idle >= self.probe_every
            width, cover = torch.where(probe, 1, width), torch.where(probe, 2, cover)
            self.idle[rows] = idle.masked_fill(probe, 0)
        device = state.pending.device
        return Plan(None, width.to(device), cover.to(device))
