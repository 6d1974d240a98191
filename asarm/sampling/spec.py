"""One object for a sampler and all its settings (:class:`SamplerSpec`), the registry of named samplers
(:data:`SAMPLERS`), and the command-line options that set them, declared once.

A spec travels unchanged from the command line (or Python) to the decode loop: ``SAMPLERS[name]`` plus
overrides (``spec.replace(k=3)``); :meth:`SamplerSpec.resolve` checks every setting, fills in the
drafter-dependent defaults and returns the spec the decode loop runs. A sampler's name is derived from its
settings (:attr:`SamplerSpec.name`), so the name a decode reports is the registry name.

Adding an ASSD option: a field of :class:`SamplerSpec` (with its command-line option in the field's
metadata, and its check in :meth:`SamplerSpec.resolve`) and its use in the decode loop (``assd.py``).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .draft_length import make_draft_length
from .drafters import DRAFTERS, PROPOSAL_DTYPES, MissingDraftHeadError, make_drafter, proposal_dtype

__all__ = ["SamplerSpec", "SAMPLERS", "available_samplers", "parse_samplers", "parse_choices", "parse_outcomes",
           "count_or_all", "SettingError", "add_sampler_arguments", "sampler_overrides", "apply_override",
           "resolve_samplers", "TEMPERATURE_MODES", "OUTCOME_ORDERS", "DEFAULT_OUTCOMES", "HEAD_OUTCOMES",
           "DEFAULT_DRAFT_TEMPERATURE_RATIO", "HEAD_DRAFT_TEMPERATURE_RATIO", "DEFAULT_ADAPTIVE_THRESHOLD",
           "ENGINE_NAMES", "DEFAULT_ENGINE", "ADAPTIVE", "STORED_SETTINGS", "LIBRARY"]

TEMPERATURE_MODES = ("target", "no_temp_oracle")
# the decode engines (asarm.sampling.engine.ENGINES), named here so the command line lists them without torch
ENGINE_NAMES = ("cached", "full")
DEFAULT_ENGINE = "cached"
OUTCOME_ORDERS = ("earliest-rejection", "accepted-first")  # which outcomes a single-pass call covers first
DEFAULT_OUTCOMES = 2  # outcomes a single-pass call covers by default (see assd_decode)
HEAD_OUTCOMES = "all"  # the same with drafter "head": its drafts pass so often that every outcome is worth a block
# verified drafts' temperature / the target's (see assd_decode): the paper's 1, which needed the fewest NFE on
# asarm-tiny, the previous one (benchmarks/sweep_defaults.py in RESULTS.md; 1.5 cost 6%) and the current one
# (measured when it was exported)
DEFAULT_DRAFT_TEMPERATURE_RATIO = 1.0
HEAD_DRAFT_TEMPERATURE_RATIO = 1.0  # the same with drafter "head": it is distilled to match the target at T = 1
# Confidence threshold of the adaptive draft length (ConfidenceLength): a draft slot is verified only
# while its proposal's top probability reaches it. Chosen from benchmarks/bench_speculative.py.
DEFAULT_ADAPTIVE_THRESHOLD = 0.3
# ``draft_length=ADAPTIVE``: adaptive at the default threshold (the *-adaptive samplers)
ADAPTIVE = "adaptive"
# The defaults above are the library's. A model can store its own (asarm.model.StoredDefaults: asarm.json for
# its own drafts, draft_head.json for its draft head's), measured on it (asarm.eval.sampler_defaults);
# resolve(model) uses those where the user set nothing. Stored name -> the spec field it fills:
STORED_SETTINGS = {"draft_temperature_ratio": "draft_temperature_ratio", "outcomes": "outcomes",
                   "outcome_order": "outcome_order", "adaptive_threshold": "draft_length"}
LIBRARY = "library"  # DecodeOutput.settings["defaults_from"]: a default that is the library's, not the model's


class SettingError(ValueError):
    """A sampler setting with a bad value: ``setting`` names it (the command line names its option instead)."""

    def __init__(self, setting: str, problem: str):
        super().__init__(f"{setting} {problem}")
        self.setting, self.problem = setting, problem

    def for_command_line(self) -> ValueError:
        """The same error naming the command-line option (``--k must be ...``)."""
        option = next((f.metadata["option"].flag for f in fields(SamplerSpec)
                       if f.name == self.setting and "option" in f.metadata), self.setting)
        return ValueError(f"{option} {self.problem}")


def count_or_all(value: str, all_means):
    """A positive integer, or ``all`` (returned as ``all_means``); argparse reports the option with the message."""
    if value.strip().lower() == "all":
        return all_means
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {value!r}")
    return count


def parse_outcomes(value: str) -> str | int:
    """``--outcomes``: a count, or ``all``."""
    return count_or_all(value, "all")


@dataclass(frozen=True)
class Option:
    """How one :class:`SamplerSpec` field is set from the command line.

    ``applies(spec, value)``: whether the setting means anything for that sampler (``asarm sample`` refuses
    it otherwise; in a ``--samplers`` list it goes to the samplers it applies to). ``every_command``: also an
    option of every evaluation that decodes (else of ``asarm sample`` only). ``given_default``: the option's
    value when not given is the field's default (else "not given", and the sampler keeps its own)."""

    flag: str
    help: str
    applies: Callable[[Any, Any], bool]
    every_command: bool = False
    given_default: bool = False
    kwargs: dict = field(default_factory=dict)


def _is_assd(spec, value) -> bool:
    return spec.algorithm == "assd"


def _setting(default, option: Option | None = None):
    return field(default=default, metadata={"option": option} if option else {})


def _drafter_applies(spec, name) -> bool:
    return spec.algorithm == "assd" and (not spec.fused or make_drafter(name).single_pass)


@dataclass(frozen=True)
class SamplerSpec:
    """A decoding algorithm with every setting: ``sequential``, or ``assd`` with a drafter and a round schedule.

    ``drafter``: a name of ``DRAFTERS`` or a drafter object (asarm.sampling.drafters). ``None`` in
    ``outcomes``, ``outcome_order`` and ``draft_temperature_ratio``, and ``draft_length=ADAPTIVE``, mean the
    drafter's default, filled in by :meth:`resolve`: the one stored with the model (or its draft head) when it
    has one, else the library's. ``defaults_from`` records, for each value filled in, where it came from (a
    file, or ``LIBRARY``). See :func:`~asarm.sampling.assd.assd_decode` for what each setting does."""

    algorithm: str = "assd"
    drafter: Any = _setting("self", Option("--drafter", "ASSD draft proposer (head: the model's chained draft head; "
                                           "with assd or assd-fused)", _drafter_applies,
                                           kwargs={"choices": list(DRAFTERS)}))
    k: int = _setting(5, Option("--k", "ASSD drafts per round (>= 1)", _is_assd, every_command=True,
                                given_default=True, kwargs={"type": int}))
    temperature: float = _setting(1.0, Option("--temperature", "sampling temperature (> 0)", lambda spec, value: True,
                                              every_command=True, given_default=True, kwargs={"type": float}))
    temperature_mode: str = _setting("target", Option(
        "--temperature-mode", "target: sample the tempered joint; no_temp_oracle: temper drafts 2..k only (T=1 joint)",
        _is_assd, given_default=True, kwargs={"choices": TEMPERATURE_MODES}))
    bonus: bool = _setting(False, Option("--bonus", "assd: an all-accepted round commits one more exact token",
                                         lambda spec, value: spec.algorithm == "assd" and not spec.fused,
                                         kwargs={"action": "store_true", "default": None}))
    fused: bool = False
    outcomes: str | int | None = _setting(None, Option(
        "--outcomes", "single-pass (fused) samplers: outcomes whose next drafts one call holds ('all' or a count, "
        "most likely first); others fall back to a call without drafts (default%(default).0s: the model's stored "
        "one, else 2; all with the draft head)",
        lambda spec, value: spec.fused, every_command=True, kwargs={"type": parse_outcomes}))
    outcome_order: str | None = _setting(None, Option(
        "--outcome-order", "single-pass (fused) samplers: which outcomes a call covers first: earliest-rejection "
        "(first rejection at slot 1, 2, ...) or accepted-first (every draft accepted, then the earliest "
        "rejections) (default%(default).0s: the model's stored one, else accepted-first for the draft head, whose "
        "drafts mostly pass; "
        "earliest-rejection for the model's own)", lambda spec, value: spec.fused, every_command=True,
        kwargs={"choices": OUTCOME_ORDERS}))
    draft_length: Any = _setting(None, Option(
        "--adaptive-threshold", "adaptive draft length: verify a draft slot only while its proposal's top probability "
        "reaches this (exact; with --samplers: changes the *-adaptive ones' threshold; asarm sample: makes the "
        f"sampler adaptive) (default%(default).0s: the model's stored one, else {DEFAULT_ADAPTIVE_THRESHOLD:g}, for "
        "the *-adaptive samplers; else always k)", _is_assd, every_command=True, kwargs={"type": float}))
    draft_temperature_ratio: float | None = _setting(None, Option(
        "--draft-temperature-ratio", "ASSD: verified drafts are drawn at this multiple of --temperature (exact at any "
        f"value; > 1 flattens them) (default%(default).0s: the model's stored one, else "
        f"{DEFAULT_DRAFT_TEMPERATURE_RATIO:g} for its own drafts and {HEAD_DRAFT_TEMPERATURE_RATIO:g} for draft-head "
        f"drafts)", _is_assd,
        every_command=True,
        kwargs={"type": float}))
    controller: str | None = None  # "auto": the goodput controller (assd-auto; asarm.sampling.controller)
    cost_profile: str | None = _setting(None, Option(
        "--cost-profile", "assd-auto: a call-cost profile (JSON, `asarm profile --out`) to use when it was measured "
        "on this device and thread count, else measured again and written there (default%(default).0s: measured "
        "once per process)",
        lambda spec, value: spec.controller == "auto", every_command=True))
    learn_prices: bool = _setting(False, Option(
        "--learn-prices", "assd-auto: correct the cost profile's prices by each decode's measured call times "
        "(steadier on a shared machine; a row's draws then depend on timing too, so a seed no longer repeats them)",
        lambda spec, value: spec.controller == "auto", every_command=True,
        kwargs={"action": "store_true", "default": None}))
    proposal_dtype: str | None = _setting(None, Option(
        "--proposal-dtype", "draft head: the dtype it runs in, its LM-head readout included (its proposals are exact "
        "at any; default%(default).0s: float16 for a float32 model on an x86 CPU with AVX2 or AVX-512, else the "
        "model's)",
        lambda spec, value: spec.algorithm == "assd" and spec.drafter_name in ("head", "auto"), every_command=True,
        kwargs={"choices": PROPOSAL_DTYPES}))
    r_atol: float = _setting(0.0, Option("--r-atol", "LOSSY: slack added to the ASSD acceptance ratio (0 = exact)",
                                         _is_assd, given_default=True, kwargs={"type": float}))
    defaults_from: tuple = ()  # ((setting, file or LIBRARY), ...): the defaults resolve() filled in

    @property
    def drafter_name(self) -> str:
        return self.drafter if isinstance(self.drafter, str) else self.drafter.name

    @property
    def name(self) -> str:
        """The registry name: ``sequential``, ``assd-<drafter>``, ``assd-bonus``, ``assd-fused[-head]``, with
        ``-adaptive`` for an adaptive draft length (a drafter outside the registry gives ``assd-<its name>``);
        ``assd-auto`` for the goodput controller; ``assd-paper`` for the paper's settings (two-call rounds, self
        drafts at the target temperature, no bonus, always k drafts)."""
        if self.algorithm == "sequential":
            return "sequential"
        if self.controller == "auto":
            return "assd-auto"
        if self.fused:
            base = "assd-fused" + ("-head" if self.drafter_name == "head" else "")
        elif self.bonus:
            base = "assd-bonus" if self.drafter_name == "self" else f"assd-{self.drafter_name}-bonus"
        elif (self.drafter_name == "self" and self.draft_temperature_ratio == 1.0 and self.draft_length is None
              and self.temperature_mode == "target" and "draft_temperature_ratio" not in dict(self.defaults_from)):
            return "assd-paper"  # Guo & Ermon's ASSD: self drafts at the target temperature, two calls, no bonus
        else:
            base = f"assd-{self.drafter_name}"
        return base + ("-adaptive" if self.draft_length is not None else "")

    @property
    def exact(self) -> bool:
        return self.r_atol == 0

    def replace(self, **settings) -> SamplerSpec:
        """This spec with some settings changed; an unknown name is a one-line error."""
        unknown = sorted(set(settings) - {f.name for f in fields(self)})
        if unknown:
            raise ValueError(f"unknown sampler setting(s) {', '.join(unknown)}; the settings are "
                             f"{', '.join(f.name for f in fields(self))}")
        return replace(self, **settings)

    def resolve(self, model=None) -> SamplerSpec:
        """Check every setting and fill in the drafter-dependent defaults; the drafter (and an adaptive length)
        become objects. With ``model``, a drafter that needs a draft head the model lacks is refused here
        (MissingDraftHeadError), before any decoding. Resolving a resolved spec changes nothing."""
        if self.algorithm not in ("sequential", "assd"):
            raise SettingError("algorithm", f"must be 'sequential' or 'assd', got {self.algorithm!r}")
        if not (isinstance(self.temperature, (int, float)) and not isinstance(self.temperature, bool)
                and 0 < self.temperature < math.inf):
            raise SettingError("temperature", f"must be a finite number > 0, got {self.temperature}")
        if self.algorithm == "sequential":
            return self
        k = self.k
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise SettingError("k", f"must be an integer >= 1, got {k!r}")
        if self.temperature_mode not in TEMPERATURE_MODES:
            raise SettingError("temperature_mode", f"must be one of {TEMPERATURE_MODES}, got {self.temperature_mode!r}")
        if not (isinstance(self.r_atol, (int, float)) and not isinstance(self.r_atol, bool)
                and 0 <= self.r_atol < math.inf):
            raise SettingError("r_atol", f"must be >= 0 and finite, got {self.r_atol!r}")
        for name in ("bonus", "fused"):
            if not isinstance(getattr(self, name), bool):
                raise SettingError(name, f"must be True or False, got {getattr(self, name)!r}")
        if self.controller not in (None, "auto"):
            raise SettingError("controller", f"must be None or 'auto', got {self.controller!r}")
        if self.controller == "auto" and not self.fused:
            raise ValueError("controller='auto' schedules single-pass rounds: it needs fused=True")
        # a profile is written after it is measured: a missing folder would fail then, mid-run
        folder = None if self.cost_profile is None else Path(self.cost_profile).resolve().parent
        if folder is not None and not folder.is_dir():
            raise SettingError("cost_profile", f"{self.cost_profile}: folder {folder} does not exist; create it first")
        drafter = self.drafter
        if drafter == "auto":  # assd-auto: the model's draft head when it has one, else its own draft rows
            drafter = "head" if model is not None and model.draft_head is not None else "self"
        drafter = make_drafter(drafter)
        if self.fused and not drafter.single_pass:
            raise ValueError(f"fused=True drafts with the model's own draft rows (and its draft head): use "
                             f"drafter='self' or 'head', not {drafter.name!r}")
        where, stored = _drafter_defaults(drafter, model)
        filled = dict(self.defaults_from)

        def default(setting, library):  # the model's stored value, else the library's; noted in defaults_from
            filled[setting] = where if setting in stored else LIBRARY
            return stored.get(setting, library)

        outcomes = self.outcomes
        if outcomes is not None and not self.fused:
            raise ValueError("outcomes only applies to fused=True (single-pass rounds)")
        if self.fused and outcomes is None and self.controller is None:  # (assd-auto chooses them per call)
            outcomes = default("outcomes", HEAD_OUTCOMES if drafter.name == "head" else DEFAULT_OUTCOMES)
        if outcomes is not None and outcomes != "all" and (not isinstance(outcomes, int) or isinstance(outcomes, bool)
                                                 or outcomes < 1):
            raise SettingError("outcomes", f"must be 'all' or an integer >= 1, got {outcomes!r}")
        order = self.outcome_order
        if order is not None and not self.fused:
            raise ValueError("outcome_order only applies to fused=True (single-pass rounds)")
        if self.fused and order is None:
            order = default("outcome_order", "accepted-first" if drafter.name == "head" else "earliest-rejection")
        if self.fused and order not in OUTCOME_ORDERS:
            raise SettingError("outcome_order", f"must be one of {', '.join(OUTCOME_ORDERS)}, got {order!r}")
        ratio = self.draft_temperature_ratio
        if ratio is None:
            ratio = default("draft_temperature_ratio",
                            HEAD_DRAFT_TEMPERATURE_RATIO if drafter.name == "head" else DEFAULT_DRAFT_TEMPERATURE_RATIO)
        if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 < ratio < math.inf):
            raise SettingError("draft_temperature_ratio", f"must be a finite number > 0, got {ratio!r}")
        if model is not None:
            drafter.head_for(model)  # MissingDraftHeadError now, not mid-decode
        dtype = self._proposal_dtype(drafter, model)
        try:
            rule = make_draft_length(default("draft_length", DEFAULT_ADAPTIVE_THRESHOLD)
                                     if self.draft_length == ADAPTIVE else self.draft_length)
        except ValueError as err:
            raise SettingError("draft_length", f"is not valid: {err}") from None
        return replace(self, drafter=drafter, outcomes=outcomes, outcome_order=order, draft_temperature_ratio=ratio,
                       bonus=self.bonus or self.fused, draft_length=rule, proposal_dtype=dtype,
                       defaults_from=tuple(filled.items()))

    def _proposal_dtype(self, drafter, model) -> str | None:
        """The draft head's dtype: the one set, else (with ``model``) the device's default; None without a
        draft head. Set for drafts that no head makes, it is an error (it would be ignored)."""
        dtype = self.proposal_dtype
        if dtype is not None and dtype not in PROPOSAL_DTYPES:
            raise SettingError("proposal_dtype", f"must be one of {', '.join(PROPOSAL_DTYPES)}, got {dtype!r}")
        if drafter.name != "head":
            if dtype is not None and (model is not None or self.drafter_name != "auto"):
                raise SettingError("proposal_dtype", f"applies to draft-head drafts only, and {self.name} drafts with "
                                                     f"the model's own draft rows here: leave it out")
            return dtype
        return dtype if dtype is not None or model is None else proposal_dtype(model)

    def settings(self) -> dict:
        """The settings as plain values (a decode's ``DecodeOutput.settings``, results files)."""
        if self.algorithm == "sequential":
            return {"temperature": self.temperature}
        rule = self.draft_length
        return {"k": self.k, "temperature": self.temperature, "temperature_mode": self.temperature_mode,
                "r_atol": self.r_atol, "drafter": self.drafter_name, "bonus": self.bonus,
                "draft_temperature_ratio": self.draft_temperature_ratio, "fused": self.fused,
                "outcomes": self.outcomes if self.fused else None, "outcome_order": self.outcome_order,
                "draft_length": None if rule is None else getattr(rule, "name", repr(rule)),
                "proposal_dtype": self.proposal_dtype, "defaults_from": dict(self.defaults_from),
                "controller": self.controller} | ({"learn_prices": self.learn_prices} if self.controller else {})


def _drafter_defaults(drafter, model) -> tuple[str, dict]:
    """(file, {spec field: value}): the defaults stored with what drafts (the model for its own draft rows, the
    draft head for the head's drafts; asarm.model.StoredDefaults), each checked as the setting itself is; a
    bad one is a one-line error naming the file. ``(LIBRARY, {})`` when none are stored."""
    if model is None or drafter.name not in ("self", "head"):
        return LIBRARY, {}
    stored = getattr(drafter.head_for(model) if drafter.name == "head" else model, "sampler_defaults", None)
    if stored is None:
        return LIBRARY, {}
    values = {}
    for key, value in stored.values.items():
        if key == "measured" or value is None:  # how they were measured; null: not stored
            continue
        if key not in STORED_SETTINGS:
            raise ValueError(f"{stored.file}: unknown sampler default {key!r} (known: {', '.join(STORED_SETTINGS)}); "
                             f"fix or delete it")
        try:
            SamplerSpec(fused=True, **{STORED_SETTINGS[key]: value}).resolve()
        except SettingError as err:
            raise ValueError(f"{stored.file}: sampler default {key} {err.problem}; fix it, or delete it to use the "
                             f"library's") from None
        values[STORED_SETTINGS[key]] = value
    return stored.file, values


def available_samplers() -> dict[str, SamplerSpec]:
    """Every sampler by name: sequential, ``assd-<drafter>`` for each registered drafter, the bonus schedule,
    single-pass (fused) rounds with the model's draft rows or its draft head, and adaptive-length variants."""
    specs = [SamplerSpec("sequential")] + [SamplerSpec(drafter=name) for name in DRAFTERS]
    specs += [SamplerSpec(bonus=True), SamplerSpec(bonus=True, fused=True),
              SamplerSpec(drafter="head", bonus=True, fused=True)]
    specs.append(SamplerSpec(drafter="auto", bonus=True, fused=True, controller="auto"))
    specs.append(SamplerSpec(draft_temperature_ratio=1.0))  # assd-paper
    by_name = {spec.name: spec for spec in specs}
    adaptive = [replace(by_name[name], draft_length=ADAPTIVE)
                for name in ("assd-self", "assd-bonus", "assd-fused", "assd-head", "assd-fused-head")]
    return by_name | {spec.name: spec for spec in adaptive}


SAMPLERS = available_samplers()


def parse_choices(value: str | Sequence[str], choices: Iterable[str], what: str) -> list[str]:
    """A comma-separated option (or a list) -> its names in the given order, without repeats;
    ValueError naming ``what`` when a name is not one of ``choices`` or none is given."""
    choices = list(choices)
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else list(value)
    names = list(dict.fromkeys(n for n in names if n))
    unknown = [n for n in names if n not in choices]
    if unknown or not names:
        raise ValueError(f"unknown {what}(s) {unknown or value!r}; choose from {', '.join(choices)}")
    return names


def _options(every_command: bool) -> list[tuple[str, Option]]:
    return [(f.name, f.metadata["option"]) for f in fields(SamplerSpec) if "option" in f.metadata
            and (f.metadata["option"].every_command or not every_command)]


def add_sampler_arguments(parser, *, every_command: bool) -> None:
    """The sampler settings' options: all of them (``asarm sample``), or (``every_command``) those that every
    evaluation takes."""
    defaults = {f.name: f.default for f in fields(SamplerSpec)}
    for name, option in _options(every_command):
        kwargs = dict(option.kwargs)
        kwargs.setdefault("default", defaults[name] if option.given_default else None)
        if kwargs.get("action") != "store_true" and "choices" not in kwargs:
            kwargs["metavar"] = option.flag.lstrip("-").upper().replace("-", "_")
        shown = " (default: %(default)s)" if option.given_default else ""
        parser.add_argument(option.flag, dest=name, help=option.help + shown, **kwargs)


def sampler_overrides(args: argparse.Namespace, *, every_command: bool) -> dict[str, Any]:
    """The settings given on the command line (those left unset keep each sampler's own)."""
    return {name: getattr(args, name) for name, _ in _options(every_command) if getattr(args, name) is not None}


def apply_override(spec: SamplerSpec, name: str, value, sampler: str) -> SamplerSpec:
    """``spec`` with one command-line setting; a setting that does not apply to it is a one-line error."""
    setting = next(f for f in fields(SamplerSpec) if f.name == name)
    option = setting.metadata["option"]
    if not option.applies(spec, value):
        if option.given_default and value == setting.default:  # not set by the user: nothing is ignored
            return spec
        given = option.flag if option.kwargs.get("action") == "store_true" else f"{option.flag} {value}"
        raise ValueError(f"{given} does not apply to --sampler {sampler}")
    return spec.replace(**{name: value})


def parse_samplers(names: str | Sequence[str], overrides: dict[str, Any] | None = None) -> list[SamplerSpec]:
    """``"sequential,assd-self"`` (or a list) -> specs, in the given order, without repeats, each with the
    ``overrides`` (command-line settings) that apply to it: ``draft_length`` (``--adaptive-threshold``) only to
    the adaptive samplers. A setting explicitly given that applies to none of them is an error."""
    specs = [SAMPLERS[name] for name in parse_choices(names, SAMPLERS, "sampler")]
    options = dict(_options(every_command=False))
    for name, value in (overrides or {}).items():
        takes = [options[name].applies(spec, value) and (name != "draft_length" or spec.draft_length is not None)
                 for spec in specs]
        if not any(takes) and not options[name].given_default:
            raise ValueError(f"{options[name].flag} applies to none of the samplers {', '.join(s.name for s in specs)}")
        specs = [spec.replace(**{name: value}) if take else spec for spec, take in zip(specs, takes)]
    return specs


def resolve_samplers(specs: Sequence[SamplerSpec], model, source: str) -> list[SamplerSpec]:
    """Every spec resolved against ``model`` before any decoding; the samplers that need a draft head the model
    lacks are named together in one line."""
    resolved, needing = [], []
    for spec in specs:
        try:
            resolved.append(spec.resolve(model))
        except MissingDraftHeadError:
            needing.append(spec.name)
    if needing:
        raise ValueError(f"{', '.join(needing)} need a draft head and {source!r} has none: train one with "
                         f"`asarm train-draft-head`, or drop them from --samplers")
    return resolved
