"""What every evaluation runner shares: common arguments, the sampler set, per-row seeds, and the
output directory (``results.json``, ``summary.md``, raw samples, plots).

A runner module (``asarm.eval.speculative`` ...) defines ``add_arguments(parser)`` and
``run(args) -> dict``; ``asarm eval <name>`` wires them to the command line.

Pairing: a sampler's row seed depends only on (``--seed``, trial, item index), never on the sampler,
batch size or the other rows, so every sampler sees the same prompts, orders and seeds.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from .. import __version__
from ..model import ASARM, DEFAULT_MODEL
from ..paths import data_file
from ..sampling import DRAFTERS, assd_decode, sequential_decode
from ..sampling.assd import DEFAULT_DRAFT_TEMPERATURE_RATIO, HEAD_DRAFT_TEMPERATURE_RATIO
from ..sampling.decode import DecodeOutput
from ..sampling.engine import DEFAULT_ENGINE, ENGINES

__all__ = ["SAMPLERS", "SamplerSpec", "available_samplers", "samplers_from_args", "check_samplers",
           "DEFAULT_ADAPTIVE_THRESHOLD", "parse_choices", "parse_samplers", "parse_outcomes", "parse_count_or_all",
           "decode", "row_seeds", "unset_means", "add_model_source_arguments", "add_model_arguments",
           "add_common_arguments", "load_model", "WIKITEXT_TEST_FILE", "packed_text", "machine_info",
           "markdown_table", "label_bars", "EvalRun", "flatten_metrics"]

WIKITEXT_TEST_FILE = "wikitext-2-raw/wiki.test.raw"  # the paper's benchmark text; never train on it


# Confidence threshold of the adaptive draft length (ConfidenceLength): a draft slot is verified only
# while its proposal's top probability reaches it. Chosen from benchmarks/bench_speculative.py.
DEFAULT_ADAPTIVE_THRESHOLD = 0.3


@dataclass(frozen=True)
class SamplerSpec:
    """One decoding algorithm: ``sequential`` or ``assd`` with a drafter and its round schedule."""

    name: str
    algorithm: str
    drafter: str | None = None
    bonus: bool = False  # the verify call also holds the next rank's oracle row
    fused: bool = False  # single-pass rounds (implies bonus)
    draft_length: float | None = None  # adaptive length: confidence threshold (None: always k)
    outcomes: str | int | None = None  # outcomes covered by a fused call (None: assd_decode's default)
    draft_temperature_ratio: float | None = None  # verified drafts' temperature / T (None: assd_decode's default)

    def assd_options(self) -> dict:
        if self.algorithm != "assd":
            return {}
        options = {"drafter": self.drafter, "bonus": self.bonus, "fused": self.fused, "draft_length": self.draft_length}
        if self.draft_temperature_ratio is not None:
            options["draft_temperature_ratio"] = self.draft_temperature_ratio
        return options | ({"outcomes": self.outcomes} if self.fused and self.outcomes is not None else {})


def _assd_specs() -> dict[str, SamplerSpec]:
    specs = {f"assd-{name}": SamplerSpec(f"assd-{name}", "assd", name) for name in DRAFTERS}
    specs["assd-bonus"] = SamplerSpec("assd-bonus", "assd", "self", bonus=True)
    specs["assd-fused"] = SamplerSpec("assd-fused", "assd", "self", bonus=True, fused=True)
    specs["assd-fused-head"] = SamplerSpec("assd-fused-head", "assd", "head", bonus=True, fused=True)
    for base in ("assd-self", "assd-bonus", "assd-fused", "assd-head", "assd-fused-head"):
        specs[f"{base}-adaptive"] = replace(specs[base], name=f"{base}-adaptive",
                                            draft_length=DEFAULT_ADAPTIVE_THRESHOLD)
    return specs


def available_samplers() -> dict[str, SamplerSpec]:
    """Every sampler by name: sequential, ``assd-<drafter>`` for each registered drafter, the bonus schedule,
    single-pass (fused) rounds with the model's draft rows or its draft head, and adaptive-length variants."""
    return {"sequential": SamplerSpec("sequential", "sequential"), **_assd_specs()}


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


def parse_samplers(names: str | Sequence[str], adaptive_threshold: float | None = None,
                   outcomes: str | int | None = None, draft_temperature_ratio: float | None = None
                   ) -> list[SamplerSpec]:
    """``"sequential,assd-self"`` (or a list) -> specs, in the given order, without repeats; the adaptive
    samplers take ``adaptive_threshold`` (default: DEFAULT_ADAPTIVE_THRESHOLD), fused ones ``outcomes``,
    every ASSD sampler ``draft_temperature_ratio``."""
    specs = available_samplers()
    out = []
    for name in parse_choices(names, specs, "sampler"):
        spec = specs[name]
        if spec.draft_length is not None and adaptive_threshold is not None:
            spec = replace(spec, draft_length=adaptive_threshold)
        if spec.algorithm == "assd" and draft_temperature_ratio is not None:
            spec = replace(spec, draft_temperature_ratio=draft_temperature_ratio)
        out.append(replace(spec, outcomes=outcomes) if spec.fused and outcomes is not None else spec)
    return out


def decode(model: ASARM, spec: SamplerSpec, tokens, sigma, n_prompt, *, seeds, k: int = 5,
           temperature: float = 1.0, engine=DEFAULT_ENGINE, lengths=None, max_new_tokens: int | None = None,
           progress: bool = False, trace: bool = False, **assd_options) -> DecodeOutput:
    """Run one sampler (a :class:`SamplerSpec`, e.g. of :data:`SAMPLERS`) on a batch; ``assd_options``
    (``temperature_mode``, ``r_atol``) go to ASSD only."""
    common = dict(temperature=temperature, seed=seeds, engine=engine, max_new_tokens=max_new_tokens,
                  progress=progress, trace=trace)
    if spec.algorithm == "sequential":
        return sequential_decode(model, tokens, sigma, n_prompt, lengths, **common)
    return assd_decode(model, tokens, sigma, n_prompt, lengths, k=k, **spec.assd_options(), **common, **assd_options)


def row_seeds(seed: int, trial: int, items: Iterable[int]) -> torch.Tensor:
    """Per-row sampling seeds for ``items`` (their indices in the evaluation set) in ``trial``."""
    return torch.tensor([(seed * 1_000_003 + trial) * 1_000_033 + int(i) for i in items], dtype=torch.long)


def unset_means(meaning: str) -> str:
    """Help-text ending that says what an option left unset (default None) means, shown once whatever the
    help formatter: ``%(default).0s`` prints nothing, but it tells ``ArgumentDefaultsHelpFormatter`` (the
    ``asarm eval`` commands) not to append a second "(default: None)"."""
    return f" (default%(default).0s: {meaning})"


def add_model_source_arguments(parser) -> None:
    """``--model``, ``--revision`` and ``--device`` (every command that loads a model)."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="local model directory, Hub repository or embedded model (default: %(default)s)")
    parser.add_argument("--revision", default=None,
                        help="Hub revision, e.g. nlp or code (Hub models only)" + unset_means("the main branch"))
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ..." + unset_means("cuda if available"))


def add_model_arguments(parser: argparse.ArgumentParser, *, out: str, seed: bool = True) -> None:
    """Model, device, output and (if ``seed``) seed options (every runner)."""
    g = parser.add_argument_group("model and output")
    add_model_source_arguments(g)
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch; 1 is much faster when other jobs share the CPU"
                        + unset_means("torch's choice"))
    if seed:
        g.add_argument("--seed", type=int, default=0, help="base seed (orders, prompts and sampling)")
    g.add_argument("--out", default=out, help="output directory (results.json, summary.md, samples.jsonl, plots)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g.add_argument("--wandb", action="store_true",
                   help="also log the arguments and the metrics (as scalars) to Weights & Biases, project "
                        "$WANDB_PROJECT or asarm; WANDB_MODE=offline needs no account (the wandb extra)")


def _count_or_all(value: str, all_means):
    """A positive integer, or ``all`` (returned as ``all_means``)."""
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
    return _count_or_all(value, "all")


def parse_count_or_all(value: str) -> int | None:
    """A ``--num-sequences``-style option: a positive count, or ``all`` (None)."""
    return _count_or_all(value, None)


def samplers_from_args(args: argparse.Namespace) -> list[SamplerSpec]:
    """The specs of ``--samplers`` with ``--adaptive-threshold``, ``--outcomes`` and
    ``--draft-temperature-ratio`` applied."""
    return parse_samplers(args.samplers, args.adaptive_threshold, args.outcomes, args.draft_temperature_ratio)


def add_common_arguments(parser: argparse.ArgumentParser, *, samplers: str = "sequential,assd-self,assd-ngram",
                         out: str, batch_size: int = 8) -> None:
    """:func:`add_model_arguments` plus the sampler options of the runners that decode."""
    add_model_arguments(parser, out=out)
    g = parser.add_argument_group("sampling")
    g.add_argument("--engine", choices=sorted(ENGINES), default=DEFAULT_ENGINE,
                   help="cached: each fixed token computed once; full: whole-sequence pass per NFE (reference cost)")
    g.add_argument("--samplers", default=samplers,
                   help=f"comma-separated, from {', '.join(available_samplers())}")
    g.add_argument("--k", type=int, default=5, help="ASSD drafts per round (>= 1)")
    g.add_argument("--adaptive-threshold", type=float, default=DEFAULT_ADAPTIVE_THRESHOLD,
                   help="the *-adaptive samplers verify a draft slot only while its proposal's top probability "
                        "reaches this (exact)")
    g.add_argument("--outcomes", type=parse_outcomes, default=None,
                   help="assd-fused: outcomes whose next drafts one call holds ('all' or a count, earliest "
                        "rejection first); others fall back to a draft call"
                        + unset_means("2; all for assd-fused-head"))
    g.add_argument("--draft-temperature-ratio", type=float, default=None,
                   help="ASSD: verified drafts are drawn at this multiple of --temperature (exact at any value; "
                        "> 1 flattens them, which raises the acceptance of the model's own drafts)"
                        + unset_means(f"{DEFAULT_DRAFT_TEMPERATURE_RATIO:g}, or {HEAD_DRAFT_TEMPERATURE_RATIO:g} "
                                      f"for draft-head drafts"))
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    g.add_argument("--batch-size", type=int, default=batch_size, help="rows decoded together")
    g.add_argument("--trials", type=int, default=1, help="independent repetitions with fresh seeds")


def load_model(args: argparse.Namespace) -> ASARM:
    """The model of ``--model``/``--revision`` on ``--device``, after applying ``--threads``."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    model = ASARM.from_pretrained(args.model, revision=args.revision, device=args.device)
    if model.tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer files; save one next to the weights")
    return model


def check_samplers(model: ASARM, specs: Sequence[SamplerSpec], source: str) -> None:
    """ValueError before any decoding when a sampler needs a draft head that the model does not have."""
    needing = [spec.name for spec in specs if spec.drafter == "head"]
    if needing and model.draft_head is None:
        raise ValueError(f"{', '.join(needing)} need a draft head and {source!r} has none: train one with "
                         f"`asarm train-draft-head`, or drop them from --samplers")


def packed_text(tokenizer, length: int, path: str | os.PathLike | None = None, limit: int | None = None,
                hub_preset: str = "wikitext-2", hub_split: str = "test") -> torch.Tensor:
    """``(N, length)`` consecutive chunks of a text, packed exactly as the trainer packs its data
    (one document a line, ``</s>`` after each, ``asarm.training.data.PackedStream``), so a model
    is evaluated on the layout it was trained on. ``path`` (a file, or a data-directory name)
    defaults to WikiText-2 raw test; without the local file, the Hub preset's ``hub_split`` is read."""
    from ..training.data import PackedStream, TextFileSource, hub_source, make_encoder

    if length < 2:
        raise ValueError(f"length must be >= 2 tokens, got {length}")
    if limit is not None and limit < 1:
        raise ValueError(f"the number of sequences must be >= 1 (or None for all), got {limit}")
    file = data_file(path if path is not None else WIKITEXT_TEST_FILE, required=path is not None)
    source = (TextFileSource([file], unit="line", split="all") if file is not None
              else hub_source(hub_preset, hub_split=hub_split))
    stream = PackedStream(source, make_encoder(tokenizer), max_length=length, rank=0, world_size=1, epochs=1)
    chunks = [chunk["input_ids"] for chunk in itertools.islice(stream, limit)]
    if not chunks:
        raise ValueError(f"the text has fewer than {length} tokens: no full chunk to evaluate")
    if limit is not None and len(chunks) < limit:
        raise ValueError(f"{limit} sequences asked for, but the text has only {len(chunks)} chunks of {length} tokens")
    return torch.stack(chunks)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    info = {"hostname": socket.gethostname(), "platform": platform.platform(), "cpu": _cpu_name(),
            "python": sys.version.split()[0],
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub markdown table of ``rows`` (floats to 4 significant digits)."""
    if not rows:
        return "(no rows)\n"
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def label_bars(ax, bars, values: Sequence[float], fmt: str = "{:.3g}") -> None:
    """Write each bar's value on it and draw the zero line, so a panel whose values are all zero (a
    pass@k of 0 everywhere) still shows its bars, named on the x axis, with their values."""
    ax.bar_label(bars, labels=[fmt.format(v) for v in values], padding=2, fontsize="small")
    ax.axhline(0.0, color="black", linewidth=0.8)
    if not any(values):
        ax.set_ylim(0.0, 1.0)  # autoscaling would centre the zero line in an empty, tiny range
    else:
        bottom, top = ax.get_ylim()
        ax.set_ylim(bottom, top * 1.08)  # room for the labels above the tallest bar


def flatten_metrics(value: Any, prefix: str = "") -> dict[str, float]:
    """The numbers of a (nested) metrics dict as ``{"a/b/0": x}`` scalars; strings and None are left out."""
    value = _jsonable(value)
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    elif isinstance(value, (bool, int, float)):
        return {prefix: float(value) if isinstance(value, bool) else value}
    else:
        return {}
    out = {}
    for key, item in items:
        out.update(flatten_metrics(item, f"{prefix}/{key}" if prefix else str(key)))
    return out


class EvalRun:
    """An evaluation's output directory. ``samples(...)`` appends raw records to ``samples.jsonl``;
    ``path(name)`` names any other output file (plots); ``warn(message)`` records a problem that does
    not stop the run; ``finish(metrics, summary)`` writes ``results.json`` (arguments, version, machine,
    timings, metrics, warnings, files) and ``summary.md``, and closes with a line listing every file written.
    With ``--wandb`` (``args["wandb"]``) ``finish`` also logs a Weights & Biases run: the arguments as its
    config, the metrics flattened to scalars as its summary, results.json and summary.md as its files."""

    def __init__(self, name: str, args: argparse.Namespace | dict, out: str | os.PathLike | None = None):
        self.name = name
        self.args = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
        self.args.pop("func", None)
        self.wandb = bool(self.args.get("wandb"))
        if self.wandb and importlib.util.find_spec("wandb") is None:  # before the evaluation, not after it
            raise ValueError("--wandb needs the wandb package: pip install 'asarm[wandb]'")
        self.dir = Path(out if out is not None else self.args["out"])
        self.dir.mkdir(parents=True, exist_ok=True)
        self.samples_path = self.dir / "samples.jsonl"
        self.samples_path.write_text("")
        self.warnings: list[str] = []
        self._outputs = ["samples.jsonl"]
        self.started = time.time()

    def path(self, name: str) -> Path:
        """Where to write the output file ``name``; once it exists, the closing line and results.json list it."""
        if name not in self._outputs:
            self._outputs.append(name)
        return self.dir / name

    def warn(self, message: str) -> None:
        """Print ``message`` to stderr now and keep it for results.json ("warnings") and summary.md (a
        Warnings section): error text such as a Hub connection error goes here, never into the metrics."""
        self.warnings.append(" ".join(message.split()))
        print(f"WARNING: {message}", file=sys.stderr)

    def samples(self, records: Iterable[dict]) -> None:
        with self.samples_path.open("a") as f:
            for record in records:
                f.write(json.dumps(_jsonable(record)) + "\n")

    def _summary_text(self, summary: str) -> str:
        text = f"# asarm eval {self.name}\n\n{summary}"
        if self.warnings:
            text += "\n## Warnings\n\n" + "".join(f"- {w}\n" for w in self.warnings)
        return text

    def finish(self, metrics: dict, summary: str) -> dict:
        files = ["results.json", "summary.md"] + [name for name in self._outputs if (self.dir / name).exists()]
        results = {"evaluation": self.name, "asarm_version": __version__, "args": _jsonable(self.args),
                   "machine": machine_info(),
                   "started": datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds"),
                   "seconds": round(time.time() - self.started, 2), "metrics": _jsonable(metrics),
                   "warnings": self.warnings, "files": files}
        _write_atomic(self.dir / "results.json", json.dumps(results, indent=2) + "\n")
        text = self._summary_text(summary)
        _write_atomic(self.dir / "summary.md", text)
        print(f"\n{text}\nwrote {len(files)} files to {self.dir}: {', '.join(files)}")
        if self.wandb:
            self._log_wandb(results)
        return results

    def _log_wandb(self, results: dict) -> None:
        import wandb

        # the output directory holds the wandb files too, unless WANDB_DIR says otherwise
        try:
            run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "asarm", name=f"eval-{self.name}",
                             job_type="eval", dir=None if os.environ.get("WANDB_DIR") else str(self.dir),
                             config={"evaluation": self.name, "asarm_version": __version__, **results["args"]})
        except wandb.errors.Error as err:  # no API key, no network: results.json is written, say why wandb is not
            raise ValueError(f"--wandb: {err} (the results are in {self.dir}; WANDB_MODE=offline logs without an "
                             f"account)") from None
        try:
            run.summary.update({**flatten_metrics(results["metrics"]), "seconds": results["seconds"],
                                "warnings": len(self.warnings)})
            for name in ("results.json", "summary.md"):
                run.save(str(self.dir / name), base_path=str(self.dir), policy="now")
        finally:
            run.finish()
