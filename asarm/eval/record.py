"""An evaluation's output directory and record: raw samples, results.json (arguments, version, machine,
timings, metrics, warnings, files), summary.md, and optionally a Weights & Biases run."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

import torch

from .. import __version__
from ..files import write_atomic
from ..resources import load_average, load_warning
from .machine import machine_info

__all__ = ["EvalRun", "flatten_metrics"]


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
    not stop the run; ``finish(metrics, summary)`` writes ``results.json`` (arguments, version, machine and its
    threads, the load average at the start and the end, timings, metrics, warnings, files) and ``summary.md``,
    and closes with a line listing every file written; a load above the CPU count is a warning (distorted times).
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
        self.load_at_start = load_average()

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
        load = {"start": self.load_at_start, "end": load_average()}
        warning = load_warning(load.values())
        if warning is not None:
            self.warn(warning)
        files = ["results.json", "summary.md"] + [name for name in self._outputs if (self.dir / name).exists()]
        results = {"evaluation": self.name, "asarm_version": __version__, "args": _jsonable(self.args),
                   "machine": machine_info(), "load_average": load,
                   "started": datetime.fromtimestamp(self.started, timezone.utc).isoformat(timespec="seconds"),
                   "seconds": round(time.time() - self.started, 2), "metrics": _jsonable(metrics),
                   "warnings": self.warnings, "files": files}
        write_atomic(self.dir / "results.json", json.dumps(results, indent=2) + "\n")
        text = self._summary_text(summary)
        write_atomic(self.dir / "summary.md", text)
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
