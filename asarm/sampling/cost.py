"""A cost model of one ASSD call, measured on the machine in use: ``seconds = host + per_drafting_call x [the call
verifies or prepares drafts] + per_query_row x query rows + per_head_slot x head slots + per_content_row x new
content rows``, at the batch size of the decode. A sequential step (one query row, nothing else) skips the
outcome machinery and its host work, so it gets its own fixed price (``host``) rather than a drafting call's.
A call that verifies c drafts also gets the fit's miss on the profiled call that verified c drafts
(``residuals``): a CPU's matrix products are not linear in their rows (on a 2-core VM the LM-head readout over
3 verify rows cost more than over 4), so a linear fit alone priced a width-2 call about 10% below a width-3 one
that cost the same, and ``assd-auto`` chose the narrower, worse width.

It is fitted (least squares) to calls timed in a short profile at the start of a decode
(``asarm.sampling.assd.profile_calls``: a few real single-pass calls of each of a handful of schedules, on the
decode's own inputs, a few hundred milliseconds), and kept for the process: a later decode with the same
model, device, dtype, threads, batch size, length, max_new_tokens and draft-head dtype reuses it.
``save``/``load`` keep it beside a run or a model; a saved profile taken for another of those is not used (it
is measured again). On CUDA the timings synchronise the device.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from ..files import write_atomic
from ..inputs import read_json

__all__ = ["CallCost", "fit_call_cost", "is_drafting_call", "profile_key", "cached_profile", "remember_profile",
           "timed"]

_PROFILES: dict[tuple, "CallCost"] = {}
CALL_COLUMNS = ("query_rows", "head_slots", "content_rows")  # what a call's price depends on, in __call__'s order
SLOPES = ("drafting", *CALL_COLUMNS)  # the fitted terms beside ``host``


@dataclass
class CallCost:
    """Seconds of one call (see the module docstring), with the machine it was measured on and its samples."""

    host: float
    per_query_row: float
    per_head_slot: float
    per_content_row: float
    batch_rows: int
    length: int
    device: str
    threads: int
    samples: list[dict] = field(default_factory=list)  # the profiled calls: query_rows, head_slots, ..., seconds
    profile_seconds: float = 0.0
    per_drafting_call: float = 0.0  # (last: profiles saved before it load as a model without the term)
    proposal_dtype: str | None = None  # the draft head's dtype in the profiled calls (None: no head, or unknown)
    max_new_tokens: int | None = None  # the decodes it prices stop after this many tokens (None: at the text's end)
    # corrections of the prices of sequential steps and of calls with drafts that decodes have measured in this
    # process (asarm.sampling.controller), kept with the profile for the next decode; not saved
    corrections: list = field(default_factory=lambda: [1.0, 1.0], compare=False)
    # drafts verified -> the measured minus the linear price of the profiled call that verified that many
    # (the one that prepared the most drafts); {} in profiles saved before it
    residuals: dict = field(default_factory=dict)

    def __post_init__(self):
        self.residuals = {int(drafts): float(seconds) for drafts, seconds in self.residuals.items()}  # JSON keys

    def __call__(self, query_rows: int, head_slots: int = 0, content_rows: int = 0) -> float:
        return self.linear(query_rows, head_slots, content_rows) + self.residuals.get(content_rows, 0.0)

    def linear(self, query_rows: int, head_slots: int = 0, content_rows: int = 0) -> float:
        """The fitted linear price alone (without ``residuals``)."""
        return (self.host + self.per_drafting_call * is_drafting_call(query_rows, head_slots, content_rows)
                + self.per_query_row * query_rows + self.per_head_slot * head_slots
                + self.per_content_row * content_rows)

    @property
    def relative_error(self) -> float:
        """The largest relative error of the fit over the profiled blocks of calls (their median times; the
        kinds of call where samples name no block): how far a predicted price may be off on this machine, the
        fit's misses and the machine's noise from block to block together (0 without samples)."""
        errors = [abs(self(*key[:len(CALL_COLUMNS)]) - seconds) / seconds
                  for key, seconds in _median_by_kind(self.samples, ("block",)).items() if seconds > 0]
        return max(errors, default=0.0)

    def summary(self) -> dict:
        """The coefficients, the fit's relative error and the machine, without the samples (a decode's settings)."""
        return self._fields_but("samples", "corrections") | {"relative_error": round(self.relative_error, 4)}

    def _fields_but(self, *left_out: str) -> dict:
        return {key: value for key, value in asdict(self).items() if key not in left_out}

    def table(self) -> list[dict]:
        """The profiled calls with the model's prediction beside each (``asarm profile``)."""
        return [dict(sample, predicted=self(sample["query_rows"], sample["head_slots"], sample["content_rows"]))
                for sample in self.samples]

    def matches(self, device: torch.device | str, batch_rows: int, length: int, proposal_dtype: str | None = None,
                max_new_tokens: int | None = None) -> bool:
        return (self.device == str(device) and self.threads == torch.get_num_threads()
                and self.batch_rows == batch_rows and self.length == length and self.proposal_dtype == proposal_dtype
                and self.max_new_tokens == max_new_tokens)

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(path, json.dumps(self._fields_but("corrections"), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CallCost":
        try:
            return cls(**read_json(path))
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(f"cost profile {path}: cannot be read ({err}); write one with `asarm profile`") from None


def fit_call_cost(samples: list[dict], batch_rows: int, length: int, device: torch.device | str,
                  profile_seconds: float) -> CallCost:
    """Least-squares fit of the linear model to the median time of each kind of call in ``samples`` (medians: a
    call slowed by another process does not move the fit); non-negative coefficients: a term that fits a
    negative slope is dropped and the fit repeated. Then the residuals (see the module docstring): per number of
    drafts verified, the median time of the kind that verified that many with the most head slots and query
    rows (the widest schedule's steady calls, the shape the controller prices) minus its linear price."""
    points = [dict(zip(CALL_COLUMNS, key), drafting=is_drafting_call(*key), seconds=seconds)
              for key, seconds in _median_by_kind(samples).items()]
    kept = [term for term in SLOPES if len({p[term] for p in points}) > 1]
    while True:
        design = torch.tensor([[1.0] + [float(p[term]) for term in kept] for p in points], dtype=torch.float64)
        seconds = torch.tensor([[p["seconds"]] for p in points], dtype=torch.float64)
        coef = torch.linalg.lstsq(design, seconds).solution[:, 0].tolist()
        negative = [term for term, value in zip(kept, coef[1:]) if value < 0]
        if not negative:
            break
        kept.remove(negative[0])
    slopes = dict.fromkeys(SLOPES, 0.0) | dict(zip(kept, coef[1:]))
    cost = CallCost(host=max(coef[0], 0.0), per_query_row=slopes["query_rows"], per_head_slot=slopes["head_slots"],
                    per_content_row=slopes["content_rows"], per_drafting_call=slopes["drafting"],
                    batch_rows=batch_rows, length=length, device=str(device), threads=torch.get_num_threads(),
                    samples=samples, profile_seconds=round(profile_seconds, 4))
    widest = {}  # drafts verified -> the point of the widest call that verified that many
    for p in sorted(points, key=lambda p: (p["head_slots"], p["query_rows"])):
        if p["content_rows"]:
            widest[p["content_rows"]] = p
    cost.residuals = {drafts: p["seconds"] - cost.linear(*(p[c] for c in CALL_COLUMNS))
                      for drafts, p in sorted(widest.items())}
    return cost


def is_drafting_call(query_rows: int, head_slots: int = 0, content_rows: int = 0) -> int:
    """1 for a call that verifies or prepares drafts, 0 for a sequential step (one query row and nothing else)."""
    return int(query_rows > 1 or head_slots > 0 or content_rows > 0)


def _median_by_kind(samples: list[dict], also: tuple[str, ...] = ()) -> dict[tuple, float]:
    """The median seconds of each kind of profiled call, keyed by its ``CALL_COLUMNS`` values (and those of
    the columns ``also``, where samples have them)."""
    groups: dict[tuple, list[float]] = {}
    for sample in samples:
        key = tuple(sample[c] for c in CALL_COLUMNS) + tuple(sample.get(c) for c in also)
        groups.setdefault(key, []).append(sample["seconds"])
    return {key: statistics.median(times) for key, times in groups.items()}


def profile_key(model, batch_rows: int, length: int, schedule: tuple) -> tuple:
    return (id(model), str(model.device), str(model.dtype), torch.get_num_threads(), batch_rows, length, schedule)


def cached_profile(key: tuple) -> CallCost | None:
    return _PROFILES.get(key)


def remember_profile(key: tuple, cost: CallCost) -> None:
    _PROFILES[key] = cost


def timed(device: torch.device, step):
    """``(seconds, step())``, with the device synchronised on both sides on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    result = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - began, result
