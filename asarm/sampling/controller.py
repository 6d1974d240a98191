"""Schedules of single-pass ASSD calls: before each call a controller (``plan(state, rows) -> Plan``; ``rows``:
the batch rows of the call) chooses, per row, how many pending drafts to verify, how many drafts the next call
gets (the width of the outcome blocks; 0 is a sequential step) and how many outcomes it covers. A controller
whose ``drafting_can_pay`` is False (where it has that attribute) is not asked: a call whose rows have no
pending drafts is then a sequential step.

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

import math
import statistics
from dataclasses import dataclass

import torch

from .cost import is_drafting_call

__all__ = ["Plan", "ControlState", "FixedSchedule", "GoodputController", "steady_state", "expected_rates"]

MAX_MARGIN = 0.1  # the most gain over sequential steps asked of drafting (a noisy profile must not stop it)
PROBE_BUDGET = 0.05  # the share of sequential decoding's time that probing rows may add
OBSERVED_CALLS, MIN_OBSERVED = 15, 3  # recent calls of a kind whose median corrects its profiled price
WIDTH_TOLERANCE = 0.03  # options with drafts within this of the best rate count as ties (the narrowest wins)
REPLAN_VERDICTS = 8  # once rates settle (SETTLED_VERDICTS), a new choice every this many new verdicts
SETTLED_VERDICTS = 32
RESCALE_TOLERANCE = 0.03  # a correction that moves a price less than this is not applied (no new plan)
CEILING_ACCEPTANCE = 0.8  # per slot: the high end of what a distilled head reaches on text (asarm-tiny: 0.72-0.78)


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
        self.drafting_can_pay = self.width > 0  # width 0: every call a sequential step

    def plan(self, state: ControlState, rows: torch.Tensor | None = None) -> Plan:
        full = torch.full_like(state.pending, self.width)
        return Plan(None, full, torch.full_like(state.pending, self.cover))


def steady_state(acceptance: torch.Tensor, widths: torch.Tensor, covers: torch.Tensor,
                 accepted_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and option ``o`` (``widths[o]`` drafts per block, ``covers[o]`` blocks), in the steady state of a
    row that follows it, from its per-slot conditional acceptance ``(..., b, k)``: the expected tokens per call
    and the share of calls without drafts, both ``(..., b, O)``. A call with drafts commits ``E = 1 + sum_i S_i`` tokens
    (``S_i``: the first i drafts all accepted) and leaves the next call drafts with the probability ``P`` that
    its outcome is covered; a call without drafts commits 1 token and always leaves drafts. So a share
    ``(1 - P) / (2 - P)`` of the calls has no drafts, and a call commits ``(E + 1 - P) / (2 - P)`` tokens on
    average. Width 0 is plain sequential decoding (one token, no drafts)."""
    k = acceptance.shape[-1]
    survival = torch.cat([acceptance.new_ones(*acceptance.shape[:-1], 1), acceptance.cumprod(-1)], -1)  # S_0..S_k
    tokens = survival.cumsum(-1)[..., widths]  # 1 + S_1 + ... + S_w
    all_accepted = survival[..., widths]
    if accepted_first:  # the all-accepted block, then first rejections at slots 0 .. cover - 2
        covered = all_accepted + 1 - survival[..., (covers - 1).clamp(max=k)]
    else:  # first rejections at slots 0 .. cover - 1 (slot w: all accepted)
        covered = torch.where(covers > widths, 1.0, 1 - survival[..., covers.clamp(max=k)])
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
    none_drafting = without.clamp(min=1e-300).log().sum(-2).exp()  # every row of the call without drafts
    seconds = none_drafting * seconds_without + (1 - none_drafting) * seconds_with
    return tokens.sum(-2) / seconds


class GoodputController:
    """For each call, the (width, cover) of ``options`` with the most expected committed tokens per second for the
    batch (one schedule for the call: its widest row sets its cost, so a row with fewer drafts saves nothing),
    from each row's own acceptance; rows then differ where they explore or probe.

    ``cost(query_rows, head_slots, content_rows)`` predicts a call's seconds (asarm.sampling.cost.CallCost).
    A row's acceptance at slot i is its own count plus ``prior_weight`` pseudo-drafts at the row's rate over
    all slots, itself its count plus ``prior_weight`` pseudo-drafts at the rate pooled over the call's rows,
    itself their counts plus ``prior_weight`` pseudo-drafts at ``prior``: rows start from the prior, learn from
    each other and follow their own drafts. Whether to draft at all is judged on those rates taken
    ``optimism`` standard errors of the pooled rate high, so that a few early rejections do not stop drafting
    on a guess. A row without any verdict yet drafts once, to get one; a row that chose no drafts for
    ``probe_every`` calls in a row drafts once (with the option it would draft with), so it notices when drafts
    start to pass again (default: as rarely as keeps a probe's extra price within ``PROBE_BUDGET`` of the
    sequential steps it follows). Where no option beats sequential steps by the margin even at
    ``CEILING_ACCEPTANCE`` per slot (a compute-bound batch), no row ever drafts.

    Drafting must beat sequential steps by more than the cost model's own error on this machine
    (``margin``; default: the fit's largest relative error over the profiled calls, at most ``MAX_MARGIN``):
    a gain smaller than the error of the prices it rests on is as likely a loss."""

    def __init__(self, cost, k_max: int, options: list[tuple[int, int]], accepted_first: bool, head: bool,
                 prior: float, prior_weight: float = 16.0, probe_every: int | None = None, margin: float | None = None,
                 optimism: float = 1.0, learn_prices: bool = True):
        self.cost, self.k_max, self.accepted_first = cost, k_max, accepted_first
        self.margin = min(cost.relative_error, MAX_MARGIN) if margin is None else float(margin)
        self.sequential = options.index((0, 1)) if (0, 1) in options else None
        self.prior, self.prior_weight, self.optimism = prior, prior_weight, optimism
        self.widths = torch.tensor([w for w, _ in options])
        self.covers = torch.tensor([c for _, c in options])
        # a call with drafts holds w verify rows, the bonus row and min(cover, w + 1) blocks of w; one without
        # drafts the bonus row and one block; the head chains w slots after either
        blocks = torch.minimum(self.covers, self.widths + 1)
        slots = self.widths * int(head)
        self._profiled = (torch.tensor([cost(int(w + 1 + c * w), int(s), int(w)) for w, c, s in
                                        zip(self.widths, blocks, slots)], dtype=torch.float64),
                          torch.tensor([cost(int(1 + w), int(s), 0) for w, s in zip(self.widths, slots)],
                                       dtype=torch.float64))
        self.idle = torch.zeros(0, dtype=torch.long)  # per batch row: calls in a row without drafts (probing)
        self._idle_rows = False  # whether any row of ``idle`` counts calls
        self._plans = {}  # (rows, option, device) -> the plan giving every row that option
        self._seen, self._best, self._probe = None, None, None  # the last plan's inputs and choices
        self.probe_every = probe_every
        self._observed = {0: [], 1: []}  # measured over predicted seconds of recent calls: sequential, drafting
        # the corrections of the profiled prices (sequential steps, calls with drafts): shared with the profile,
        # so the next decode of the process starts from them; fixed at 1 where prices are not learned
        self.learn_prices = learn_prices
        self.scales = cost.corrections if learn_prices else [1.0, 1.0]
        self._rescale()

    def _rescale(self) -> None:
        """Prices of every option from the profile and the current corrections; whether drafting can pay at all
        (drafting that cannot beat sequential steps even at CEILING_ACCEPTANCE is never tried: no first drafts,
        no probes, so where calls are compute-bound assd-auto is sequential decoding)."""
        sequential_scale, drafting_scale = self.scales
        scale = torch.where(self.widths == 0, sequential_scale, drafting_scale)
        self.seconds_with, self.seconds_without = (prices * scale for prices in self._profiled)
        ceiling = torch.full((1, self.k_max), CEILING_ACCEPTANCE, dtype=torch.float64)
        self.drafting_can_pay = self.sequential is not None and bool(self._gain(self._rates(ceiling)) > self.margin)
        self._seen = None

    def price(self, call: dict) -> float:
        """The predicted seconds of a call (``call``: its ``CALL_COLUMNS``), with the current correction."""
        return self.cost(**call) * self.scales[is_drafting_call(**call)]

    def observe(self, call: dict, seconds: float) -> None:
        """A call's measured seconds (``call``: its ``CALL_COLUMNS``): the prices of its kind (sequential step,
        call with drafts) follow the median ratio of measured to predicted seconds over its last
        ``OBSERVED_CALLS`` calls, once it has ``MIN_OBSERVED`` of them, so a profile taken in a slow or fast
        spell of the machine is corrected by the decode's own calls (unless ``learn_prices`` is off)."""
        predicted = self.cost(**call)
        if predicted <= 0 or not self.learn_prices:
            return
        kind = is_drafting_call(**call)
        recent = self._observed[kind]
        recent.append(seconds / predicted)
        del recent[:-OBSERVED_CALLS]
        if len(recent) >= MIN_OBSERVED:
            ratio = statistics.median(recent)
            if abs(ratio / self.scales[kind] - 1) > RESCALE_TOLERANCE:
                self.scales[kind] = ratio
                self._rescale()

    def acceptance(self, state: ControlState, optimism: float = 0.0) -> torch.Tensor:
        """Per row and slot: the slot's own rate, shrunk towards the row's rate over all slots (so a slot the row
        has not drafted yet takes the row's), which is shrunk towards the call's pooled rate and that towards the
        prior; plus ``optimism`` standard errors of the pooled rate (at most 1)."""
        rate, error = self._rate_and_error(state)
        return (rate + optimism * error).clamp(max=1.0)

    def _rate_and_error(self, state: ControlState) -> tuple[torch.Tensor, torch.Tensor]:
        """The shrunk rates ``(b, k)`` and the standard error of the call's pooled rate (on the CPU): each row's
        rate over all slots is shrunk towards the rate pooled over the call's rows, itself shrunk towards the
        prior, so rows of one batch (one model, one head) learn from each other's verdicts."""
        drafted, accepted = state.drafted_by_index.cpu().double(), state.accepted_by_index.cpu().double()
        weight = drafted.sum() + self.prior_weight
        pooled = (accepted.sum() + self.prior_weight * self.prior) / weight
        overall = (accepted.sum(1, keepdim=True) + self.prior_weight * pooled) / \
            (drafted.sum(1, keepdim=True) + self.prior_weight)
        rate = (accepted + self.prior_weight * overall) / (drafted + self.prior_weight)
        return rate, (pooled * (1 - pooled) / (weight + 1)).sqrt()

    def _rates(self, acceptance: torch.Tensor) -> torch.Tensor:
        return expected_rates(acceptance, self.widths, self.covers, self.seconds_with, self.seconds_without,
                              self.accepted_first)

    def _drafting_best(self, rates: torch.Tensor) -> int:
        """The option with drafts of the highest rate, or the narrowest within ``WIDTH_TOLERANCE`` of it: wider
        calls are priced less surely (their later slots' acceptance and chain cost), so near-ties go narrow."""
        drafting = rates.masked_fill(self.widths == 0, -1.0)
        near = drafting >= (1 - WIDTH_TOLERANCE) * drafting.max()
        return int(torch.where(near, self.widths, self.widths.max() + 1).argmin())

    def _gain(self, rates: torch.Tensor) -> float:
        """How much the best option with drafts beats sequential steps, relatively."""
        return float(rates[self._drafting_best(rates)] / rates[self.sequential]) - 1

    def _choose(self, state: ControlState) -> tuple[int, int]:
        """(the call's option, the option with drafts that a probing row takes): the drafting option of the
        highest expected rate, or sequential steps. Sequential steps switch to drafting where the optimistic
        rates beat them by the margin; drafting goes on while the rates beat them at all (switching costs a call
        that only prepares drafts, so a choice near the line must not flap)."""
        if self.sequential is not None and not self.drafting_can_pay:
            return self.sequential, self.sequential
        rate, error = self._rate_and_error(state)
        rates, hopeful = self._rates(torch.stack([rate, (rate + self.optimism * error).clamp(max=1.0)]))
        if self.sequential is None:
            return int(rates.argmax()), int(rates.argmax())
        drafting = self._drafting_best(rates)
        if self._best in (None, self.sequential):
            start = self._gain(hopeful) > self.margin  # else the predicted gain is within the cost model's error
            return (drafting if start else self.sequential), drafting
        return (drafting if self._gain(rates) > 0 else self.sequential), drafting

    def plan(self, state: ControlState, rows: torch.Tensor | None = None) -> Plan:
        # the same rows keep their choice until they have REPLAN_VERDICTS new verdicts (every new verdict while
        # the rates are young): rates move slowly, and a choice costs tens of small tensor operations
        verdicts = int(state.drafted_by_index.sum())
        rows_key = (len(state.pending), None if rows is None else int(rows.sum()))
        if self._seen is None or self._seen[0] != rows_key or not 0 <= verdicts - self._seen[1] < \
                (1 if verdicts < SETTLED_VERDICTS else REPLAN_VERDICTS):
            self._seen, (self._best, self._probe) = (rows_key, verdicts), self._choose(state)
        device = state.pending.device
        if self._best != self.sequential and not self._idle_rows:
            return self._uniform_plan(len(state.pending), device)  # every row drafts: nothing to probe
        choice = torch.full((len(state.pending),), self._best)
        if self.drafting_can_pay:
            # a row with no verdict yet drafts once, so that a pessimistic prior cannot keep it from learning
            fresh = ((state.drafted_by_index.sum(1) == 0) & (state.pending == 0)).cpu() & (choice == self.sequential)
            choice = choice.masked_fill(fresh, self._probe)
            if rows is not None:  # rows that have not drafted for probe_every calls draft once
                choice = self._probe_idle(rows.cpu(), choice)
        return Plan(None, self.widths[choice].to(device), self.covers[choice].to(device))

    def _uniform_plan(self, rows: int, device: torch.device) -> Plan:
        """The plan that gives every row of the call the chosen option, kept: at batch 1 a call costs a few
        milliseconds, and building a plan tensor by tensor a few percent of that."""
        key = (rows, self._best, device)
        if key not in self._plans:
            self._plans[key] = Plan(None, torch.full((rows,), int(self.widths[self._best]), device=device),
                                    torch.full((rows,), int(self.covers[self._best]), device=device))
        return self._plans[key]

    def _probe_idle(self, rows: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """``choice`` with the probe option for rows that chose sequential steps for ``probe_every`` calls (by
        default as rarely as keeps a probe's extra price within ``PROBE_BUDGET`` of the steps it follows)."""
        every = self.probe_every or _probe_interval(float(self.seconds_with[self._probe]),
                                                    float(self.seconds_with[self.sequential]))
        if len(self.idle) <= int(rows.max()):
            self.idle = torch.cat([self.idle, self.idle.new_zeros(int(rows.max()) + 1 - len(self.idle))])
        idle = torch.where(choice == self.sequential, self.idle[rows] + 1, 0)
        probe = idle >= every
        self.idle[rows] = idle.masked_fill(probe, 0)
        self._idle_rows = bool(self.idle.any())
        return choice.masked_fill(probe, self._probe)


def _probe_interval(probe_seconds: float, sequential_seconds: float) -> int:
    """Sequential calls between probes such that a probe's extra price, spread over them, stays within
    ``PROBE_BUDGET`` of a sequential step's."""
    extra = max(probe_seconds - sequential_seconds, 0.0)
    return max(1, math.ceil(extra / (PROBE_BUDGET * max(sequential_seconds, 1e-12))))
