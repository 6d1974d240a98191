"""Export a training run's latest checkpoint as a self-contained model directory; optionally push it to the Hub.

    python scripts/export_model.py runs/tiny_cpu asarm/models/asarm-tiny --force
    python scripts/export_model.py runs/my_run exports/my-model --push-to-hub me/my-model --revision v1 --private \\
        --eval-results runs/eval/nll/results.json --eval-results runs/eval/speculative/results.json
    python scripts/export_model.py asarm/models/asarm-tiny --push-to-hub me/asarm-tiny   # an exported model as is

SOURCE is a run directory (its ``checkpoints/latest``, resolved ``config.yaml`` and ``metrics.jsonl``) or an
already exported model directory. DEST receives the weights, tokenizer and asarm.json, the config as
``training_config.yaml``, the log as ``training_log.jsonl`` and a generated model card ``README.md``
(a hand-written card already there is kept), and is replaced atomically. Before that, the model's sampler
defaults (draft temperature ratio, outcomes and their order, adaptive threshold; for its own drafts and its
draft head's) are re-measured on the first tokens of a few WikiText-2 test decodes by NFE
(asarm.eval.sampler_defaults; seconds on a CPU) and stored in its asarm.json and draft_head.json, where
decoding reads them; ``--skip-defaults`` exports without measuring them and says so. The embedded default model
``asarm/models/asarm-tiny`` is replaced only with ``--force``. With ``--push-to-hub`` the directory
(a temporary one without DEST) is uploaded in one commit to branch ``--revision`` (created if missing);
it loads back with ``ASARM.from_pretrained(REPO, revision=...)``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from asarm.hub import (CARD_MARKER, PublishError, check_hub_reachable, check_repo_id, load_eval_results, model_card,
                       push)
from asarm.draft_head import HEAD_CONFIG
from asarm.model import EMBEDDED_MODELS, MODEL_DEFAULTS_FILE, SAMPLER_DEFAULTS


def find_model(source: Path) -> tuple[Path, Path | None, Path | None]:
    """(model files, training config, training log) of a run directory or an exported model directory."""
    if not source.is_dir():
        raise PublishError(f"{source} does not exist or is not a directory (expected a run or model directory)")
    if (source / "config.json").is_file():
        return source, _existing(source / "training_config.yaml"), _existing(source / "training_log.jsonl")
    from asarm.training.trainer import latest_checkpoint  # heavy import, only for run directories

    checkpoint = latest_checkpoint(source)
    if checkpoint is None:
        raise PublishError(f"{source} has no checkpoint (checkpoints/latest) and is not a model directory")
    return checkpoint / "model", _existing(source / "config.yaml"), _existing(source / "metrics.jsonl")


def check_dest(dest: Path, model_dir: Path, force: bool) -> None:
    """Refuse destinations whose replacement would lose something: the embedded default model (every
    command's default, tracked in the checkout) and any existing directory that is not a model."""
    if any(dest.resolve() == path.resolve() for path in EMBEDDED_MODELS.values()) and not force:
        raise PublishError(f"refusing to overwrite the embedded model {dest} (the default of every command); "
                           f"pass --force to replace it")
    if dest.resolve() == model_dir.resolve():
        raise PublishError(f"{dest} is the source itself; give another DEST, or omit DEST to push it as is")
    if dest.exists() and not (dest.is_dir() and ((dest / "config.json").is_file() or not any(dest.iterdir()))):
        raise PublishError(f"{dest} exists and is not a model directory; refusing to replace it")


def head_run_model(config: Path | None) -> Path | None:
    """The model directory a draft-head run (``asarm train-draft-head``) distilled, when it is local; else None."""
    if config is None or config.name != "config.yaml":
        return None
    import yaml

    from asarm.model import _local_model_dir

    saved = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    if not (saved.get("draft_head") or {}).get("train"):
        return None
    init = (saved.get("model") or {}).get("init")
    try:
        return _local_model_dir(init) if init else None
    except OSError:
        return None


def measure_defaults(directory: Path, decodes: int) -> str:
    """Re-measure the sampler defaults of the model in ``directory`` and store them there; the line saying what
    was chosen. PublishError when they cannot be measured."""
    from asarm.eval.sampler_defaults import QUICK_CANDIDATES, QUICK_TOKENS, benchmark_decodes, measure, store
    from asarm.model import ASARM
    from asarm.resources import hide_library_progress_bars

    began = time.perf_counter()
    hide_library_progress_bars()  # a weight-loading bar on stderr would break the one-line errors
    try:
        model = ASARM.from_pretrained(directory)
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer to encode the test text")
        # no WikiText-2 here and no Hub, a text too short, a bad stored default: all end the same way
        measurement = measure(model, benchmark_decodes(model.tokenizer, model.trained_length or 128, decodes),
                              QUICK_CANDIDATES, QUICK_TOKENS)
    except (OSError, ValueError) as err:
        raise PublishError(f"cannot measure the sampler defaults ({err}); pass --skip-defaults to export without "
                           f"measuring them") from None
    store(directory, measurement, by="scripts/export_model.py")
    return f"{measurement.line()} ({time.perf_counter() - began:.0f} s)"


def defaults_not_measured(directory: Path) -> str:
    """The line of an export that skipped the measurement: which defaults its decodes will use."""
    stored = [name for name in (MODEL_DEFAULTS_FILE, HEAD_CONFIG) if (directory / name).is_file()
              and SAMPLER_DEFAULTS in json.loads((directory / name).read_text())]
    use = f"the ones its source stored ({', '.join(stored)})" if stored else "the library's"
    return f"sampler defaults not measured (--skip-defaults): decodes with this model use {use}"


def export(source: Path, dest: Path, card: str, force: bool = False,
           defaults: Callable[[Path], str] | None = None) -> tuple[Path, str | None]:
    """Copy the model of ``source`` into ``dest`` (atomically) with its config, log and model card;
    returns the model files' directory and what ``defaults`` (called on the copy before it replaces ``dest``:
    measures and stores the sampler defaults) says. The run of a draft head keeps the distilled model's own
    config and log, and adds its own as ``draft_head_training_config.yaml`` and ``draft_head_training_log.jsonl``."""
    model_dir, config, log = find_model(source)
    check_dest(dest, model_dir, force)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(model_dir, tmp)
    prefix = ""
    if (distilled := head_run_model(config)) is not None:
        prefix = "draft_head_"
        for name in ("training_config.yaml", "training_log.jsonl"):
            if (distilled / name).is_file():
                shutil.copy(distilled / name, tmp / name)
    if config is not None and config != model_dir / "training_config.yaml":
        shutil.copy(config, tmp / f"{prefix}training_config.yaml")
    if log is not None and log != model_dir / "training_log.jsonl":
        shutil.copy(log, tmp / f"{prefix}training_log.jsonl")
    try:
        said = None if defaults is None else defaults(tmp)
    except PublishError:
        shutil.rmtree(tmp)  # dest stays as it was
        raise
    old_card = _hand_written_card(dest) or _hand_written_card(tmp)
    # the card reads the files just copied, so it describes exactly what is exported
    (tmp / "README.md").write_text(old_card or card(tmp), encoding="utf-8")
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return model_dir, said


def _hand_written_card(directory: Path) -> str | None:
    card = directory / "README.md"
    if not card.is_file():
        return None
    text = card.read_text(encoding="utf-8")
    return None if CARD_MARKER in text else text


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, metavar="SOURCE", help="run directory or exported model directory")
    parser.add_argument("dest", type=Path, nargs="?", metavar="DEST", help="model directory to write")
    parser.add_argument("--force", action="store_true", help="allow replacing the embedded asarm-tiny model")
    parser.add_argument("--push-to-hub", metavar="REPO", help="push to this Hub repository (owner/name)")
    parser.add_argument("--revision", metavar="BRANCH", help="branch to push to, created if missing (default main)")
    parser.add_argument("--private", action="store_true",
                        help="create the repository private (an existing one keeps its visibility)")
    parser.add_argument("--license", default="apache-2.0", help="license in the model card (default apache-2.0)")
    parser.add_argument("--eval-results", type=Path, action="append", default=[], metavar="FILE",
                        help="results.json of `asarm eval nll` or `asarm eval speculative` for the card (repeat)")
    parser.add_argument("--skip-defaults", action="store_true",
                        help="do not re-measure the sampler defaults (the model keeps the ones its source stored, "
                             "if any; else decodes use the library's)")
    parser.add_argument("--defaults-decodes", type=int, default=8, metavar="N",
                        help="WikiText-2 test texts decoded per candidate when measuring the sampler defaults "
                             "(default 8)")
    args = parser.parse_args(argv)
    if args.dest is None and not args.push_to_hub:
        parser.error("give DEST, --push-to-hub REPO, or both")
    if not args.push_to_hub and (args.revision or args.private):
        parser.error("--revision and --private apply to --push-to-hub only")
    if args.defaults_decodes < 2:
        parser.error("--defaults-decodes must be >= 2 (the comparison is paired over decodes)")
    return args


def run(args: argparse.Namespace) -> int:
    repo = check_repo_id(args.push_to_hub) if args.push_to_hub else None
    load_eval_results(args.eval_results)  # a bad results file fails before any copying or network
    if repo:
        check_hub_reachable(repo)

    def card(directory: Path) -> str:
        return model_card(directory, repo, args.revision, args.license, args.eval_results)

    with tempfile.TemporaryDirectory(prefix="asarm-export-") as scratch:
        dest = args.dest or Path(scratch) / args.source.resolve().name
        defaults = defaults_not_measured if args.skip_defaults else \
            (lambda directory: measure_defaults(directory, args.defaults_decodes))
        model_dir, said = export(args.source, dest, card, args.force, defaults)
        size = sum(f.stat().st_size for f in dest.iterdir() if f.is_file())
        print(f"exported {model_dir} to {dest} ({size / 2**20:.1f} MB)")
        print(said)
        if repo:
            url = push(dest, repo, args.revision, args.private, args.license)
            revision = f', revision="{args.revision}"' if args.revision else ""
            print(f"pushed to {url}; load it with ASARM.from_pretrained(\"{repo}\"{revision})")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except PublishError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
