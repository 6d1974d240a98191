"""Measuring the sampler defaults whose best value depends on the model, and storing them with it.

The settings (per drafter: the model's own draft rows, "self", and its draft head, "head"): the draft temperature
ratio, the outcomes a single-pass call covers and their order, and the adaptive draft length's threshold. They
are stored in the model's ``asarm.json`` (self) and ``draft_head.json`` (head) under ``sampler_defaults``;
``SamplerSpec.resolve(model)`` uses them where the user set nothing (asarm.sampling.spec).

Protocol: the same decodes for every candidate (WikiText-2 test chunks at the model's length, 95% masked,
any-subset orders, per-row seeds, k = 5, T = 1), counted, not timed: NFE and query rows per call (from the
decode trace), which are deterministic given the seeds. One setting at a time, on the registry sampler that
uses it (``PLAN``), the other settings at the values chosen so far (at first the model's current defaults). A
candidate replaces the current value only on clear evidence, from paired 95% intervals over the decodes: the
draft temperature ratio, which changes what is drafted and not a call's rows, when it needs fewer NFE; the
outcomes, their order and the threshold, which trade tokens per call against query rows per call, when they
are clearly better on one and no worse on average on the other. Among such candidates the fewest NFE wins.
Counts, not seconds: on a shared machine wall-clock moves more than these settings do.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import orders
from ..draft_head import HEAD_CONFIG
from ..files import write_atomic
from ..inputs import read_json
from ..model import MODEL_DEFAULTS_FILE, SAMPLER_DEFAULTS, ASARM
from ..sampling import SAMPLERS, SamplerSpec, decode
from ..sampling.spec import OUTCOME_ORDERS, STORED_SETTINGS
from .stats import summarize
from .texts import packed_text

__all__ = ["PLAN", "CANDIDATES", "QUICK_CANDIDATES", "QUICK_TOKENS", "MASKED", "Measurement", "benchmark_decodes",
           "current_defaults", "measure", "store"]

MASKED = 0.95
# drafter -> (stored setting, the registry sampler it is measured on), in the order they are chosen
PLAN = {
    "self": (("draft_temperature_ratio", "assd-self"), ("outcomes", "assd-fused"), ("outcome_order", "assd-fused"),
             ("adaptive_threshold", "assd-self-adaptive")),
    "head": (("draft_temperature_ratio", "assd-fused-head"), ("outcomes", "assd-fused-head"),
             ("outcome_order", "assd-fused-head"), ("adaptive_threshold", "assd-fused-head-adaptive")),
}
CANDIDATES = {"draft_temperature_ratio": (0.8, 1.0, 1.25, 1.5), "outcomes": (1, 2, "all"),
              "outcome_order": OUTCOME_ORDERS, "adaptive_threshold": (0.1, 0.2, 0.3, 0.4, 0.5)}
# a short measurement's (the export's): the neighbours of the usual values, on each text's first QUICK_TOKENS
# (a call costs about the same for 8 rows as for 1 on a CPU: more texts, fewer tokens each)
QUICK_CANDIDATES = {"draft_temperature_ratio": (1.0, 1.5), "outcomes": (1, 2, "all"), "outcome_order": OUTCOME_ORDERS,
                    "adaptive_threshold": (0.2, 0.3, 0.4)}
QUICK_TOKENS = 32
_BY_NFE_ALONE = {"draft_temperature_ratio"}  # changes what is drafted, not a call's rows


def benchmark_decodes(tokenizer, length: int, count: int, seed: int = 0):
    """``count`` WikiText-2 test chunks of ``length`` tokens and their orders, ``MASKED`` of each hidden (the
    visible positions at random, the rest decoded left to right): ``(chunks, sigma, visible)``."""
    chunks = packed_text(tokenizer, length, None, count)
    visible = int(orders.num_prompt_for_rate(MASKED, length))
    sigma = orders.any_subset(visible, length, batch_size=chunks.shape[0],
                              generator=torch.Generator().manual_seed(seed))
    return chunks, sigma, visible


@dataclass(frozen=True)
class Runs:
    """Per decode: model calls, generated tokens, query rows over all calls."""

    nfe: np.ndarray
    tokens: np.ndarray
    query_rows: np.ndarray

    @property
    def rows_per_call(self) -> np.ndarray:
        return self.query_rows / self.nfe

    def row(self) -> dict:
        nfe = summarize(self.nfe)
        calls = self.nfe.sum()
        return {"NFE": f"{nfe.mean:.1f} ± {nfe.ci95[1] - nfe.mean:.1f}", "tokens/call": self.tokens.sum() / calls,
                "query rows/call": self.query_rows.sum() / calls}


def _run(model: ASARM, spec: SamplerSpec, decodes, max_new_tokens: int | None) -> Runs:
    chunks, sigma, visible = decodes
    out = decode(model, spec, chunks, sigma, visible, seed=torch.arange(len(chunks)), trace=True,
                 max_new_tokens=max_new_tokens)
    rows = [sum(len(round_.queried) for round_ in rounds) for rounds in out.trace.rows]
    return Runs(out.nfe.double().numpy(), (out.settings["stop"] - out.settings["n_prompt"]).double().numpy(),
                np.array(rows, dtype=float))


def _interval(diff: np.ndarray) -> tuple[float, float]:
    return summarize(diff).ci95 if len(diff) > 1 else (float("nan"), float("nan"))


def _clearly_better(setting: str, base: Runs, other: Runs) -> bool:
    """Whether ``other`` beats ``base`` on clear evidence (see the module docstring): fewer NFE (the upper end of
    the paired 95% interval below 0), or for a setting that shapes the calls, fewer NFE or fewer query rows per
    call with the other no higher on average (a trade of one for the other would need a price per row, which
    only timing gives). A nan interval (one decode) is no evidence."""
    calls, rows = other.nfe - base.nfe, other.rows_per_call - base.rows_per_call
    fewer_calls = _interval(calls)[1] < 0
    if setting in _BY_NFE_ALONE:
        return bool(fewer_calls)
    fewer_rows = _interval(rows)[1] < 0
    return bool(calls.mean() <= 0 and rows.mean() <= 0 and (fewer_calls or fewer_rows))


def _spec(sampler: str, values: dict) -> SamplerSpec:
    """The registry sampler with ``values`` (stored setting -> value) set explicitly where they apply to it."""
    spec = SAMPLERS[sampler]
    applies = {"draft_temperature_ratio": True, "outcomes": spec.fused, "outcome_order": spec.fused,
               "adaptive_threshold": spec.draft_length is not None}
    return spec.replace(**{STORED_SETTINGS[key]: value for key, value in values.items() if applies[key]})


def current_defaults(model: ASARM, drafter: str) -> dict:
    """The values ``drafter``'s samplers resolve to on ``model`` now (stored setting -> value)."""
    values = {}
    for setting, sampler in PLAN[drafter]:
        value = getattr(SAMPLERS[sampler].resolve(model), STORED_SETTINGS[setting])
        values[setting] = value.threshold if setting == "adaptive_threshold" else value
    return values


@dataclass
class Measurement:
    """The chosen defaults (drafter -> stored setting -> value), the table of every candidate, the protocol
    (``tokens``: decoded per text, None: all of it)."""

    defaults: dict
    table: list
    decodes: int
    length: int
    tokens: int | None = None

    def line(self) -> str:
        chosen = "; ".join(f"{drafter}: " + ", ".join(f"{key} {value}" for key, value in values.items())
                           for drafter, values in self.defaults.items())
        texts = f"{self.length}-token texts" if self.tokens is None else \
            f"the first {self.tokens} tokens of {self.length}-token texts"
        return (f"sampler defaults measured on {self.decodes} decodes ({texts}, {MASKED:.0%} masked, by NFE and query "
                f"rows per call): {chosen}")


def measure(model: ASARM, decodes, candidates: dict | None = None, max_new_tokens: int | None = None,
            log=None) -> Measurement:
    """Measure the defaults of every drafter ``model`` has (self; head when it has a draft head) on ``decodes``
    (:func:`benchmark_decodes`), each decoded whole or its first ``max_new_tokens``; ``candidates``: stored
    setting -> values to try (default ``CANDIDATES``); ``log``: called with each table row as it is measured."""
    candidates = CANDIDATES if candidates is None else candidates
    runs: dict[SamplerSpec, Runs] = {}  # a spec measured for one setting is reused for the next
    defaults, table = {}, []
    for drafter in ("self",) + (("head",) if model.draft_head is not None else ()):
        chosen = current_defaults(model, drafter)
        for setting, sampler in PLAN[drafter]:
            if setting == "outcome_order" and chosen["outcomes"] == "all":
                continue  # every outcome is covered: their order changes nothing
            current = chosen[setting]
            tried = {}
            for value in dict.fromkeys((current, *candidates[setting])):
                spec = _spec(sampler, chosen | {setting: value})
                if spec not in runs:
                    runs[spec] = _run(model, spec, decodes, max_new_tokens)
                tried[value] = runs[spec]
            better = [v for v, r in tried.items() if v != current and _clearly_better(setting, tried[current], r)]
            chosen[setting] = min(better, key=lambda v: (tried[v].nfe.mean(), tried[v].rows_per_call.mean()),
                                  default=current)
            for value, result in tried.items():
                base = tried[current]
                verdict = ("current" if value == current else "") + (" chosen" if value == chosen[setting] else "")
                row = {"drafter": drafter, "setting": setting, "value": value, "sampler": sampler, **result.row(),
                       "ΔNFE vs current (95% CI)": _shown(value == current, result.nfe - base.nfe),
                       "Δ rows/call (95% CI)": _shown(value == current, result.rows_per_call - base.rows_per_call),
                       "verdict": verdict.strip()}
                table.append(row)
                if log is not None:
                    log(row)
        defaults[drafter] = chosen
    chunks, _, visible = decodes
    partial = max_new_tokens is not None and max_new_tokens < chunks.shape[1] - visible
    return Measurement(defaults, table, chunks.shape[0], chunks.shape[1], max_new_tokens if partial else None)


def _shown(is_current: bool, diff: np.ndarray) -> str:
    low, high = _interval(diff)
    return "-" if is_current or np.isnan(low) else f"[{low:+.2f}, {high:+.2f}]"


def store(directory: str | Path, measurement: Measurement, by: str) -> list[Path]:
    """Write the measured defaults into the model directory (``asarm.json``; ``draft_head.json`` for the head's),
    each with how they were measured; returns the files written."""
    directory = Path(directory)
    measured = {"by": by, "date": time.strftime("%Y-%m-%d"), "decodes": measurement.decodes,
                "length": measurement.length, "tokens": measurement.tokens, "masked": MASKED,
                "text": "WikiText-2 raw test", "k": SAMPLERS["assd-self"].k}
    written = []
    for drafter, name in (("self", MODEL_DEFAULTS_FILE), ("head", HEAD_CONFIG)):
        if drafter not in measurement.defaults:
            continue
        file = directory / name
        fields = read_json(file) if file.is_file() else {}
        fields[SAMPLER_DEFAULTS] = measurement.defaults[drafter] | {"measured": measured}
        write_atomic(file, json.dumps(fields, indent=2) + "\n")
        written.append(file)
    return written
