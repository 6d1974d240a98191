"""The command-line options that the evaluations share (model, device, threads, output, sampling), and
loading the model they name.

A runner module (``asarm.eval.speculative`` ...) defines ``add_arguments(parser)`` and ``run(args) -> dict``;
``asarm eval <name>`` wires them to the command line. Sampler settings are declared once, with the spec
(asarm.sampling.spec); ``--samplers`` starts from the registry and applies the settings given. Importing this
module loads no torch (the command line builds its parsers from it); loading the model does.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ..paths import DEFAULT_MODEL
from ..resources import hide_library_progress_bars, set_threads
from ..sampling.spec import DEFAULT_ENGINE, ENGINE_NAMES, SAMPLERS, SamplerSpec, SettingError, add_sampler_arguments, \
    count_or_all, parse_samplers, sampler_overrides

if TYPE_CHECKING:
    from ..model import ASARM

__all__ = ["unset_means", "add_model_source_arguments", "add_threads_argument", "positive_int", "add_model_arguments",
           "add_common_arguments", "parse_count_or_all", "samplers_from_args", "set_threads", "load_model"]


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


def add_threads_argument(parser) -> None:
    """``--threads`` (every command that computes)."""
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="CPU threads for torch" + unset_means("the CPUs this process may use (its affinity "
                                                                   "and cgroup quota) that no other task runs on "
                                                                   "when it starts, at least 1"))


def positive_int(value: str) -> int:
    """argparse type: an integer >= 1 (argparse reports the option name with the message)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def add_model_arguments(parser: argparse.ArgumentParser, *, out: str, seed: bool = True) -> None:
    """Model, device, output and (if ``seed``) seed options (every runner)."""
    g = parser.add_argument_group("model and output")
    add_model_source_arguments(g)
    add_threads_argument(g)
    if seed:
        g.add_argument("--seed", type=int, default=0, help="base seed (orders, prompts and sampling)")
    g.add_argument("--out", default=out, help="output directory (results.json, summary.md, samples.jsonl, plots)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    g.add_argument("--wandb", action="store_true",
                   help="also log the arguments and the metrics (as scalars) to Weights & Biases, project "
                        "$WANDB_PROJECT or asarm; WANDB_MODE=offline needs no account (the wandb extra)")


def parse_count_or_all(value: str) -> int | None:
    """A ``--num-sequences``-style option: a positive count, or ``all`` (None)."""
    return count_or_all(value, None)


def samplers_from_args(args: argparse.Namespace, names: str | None = None) -> list[SamplerSpec]:
    """The specs of ``--samplers`` (or ``names``) with the sampler settings given on the command line applied,
    each checked before any model is loaded (an error names the option)."""
    specs = parse_samplers(args.samplers if names is None else names, sampler_overrides(args, every_command=True))
    for spec in specs:
        try:
            spec.resolve()
        except SettingError as err:
            raise err.for_command_line() from None
    return specs


def add_common_arguments(parser: argparse.ArgumentParser, *, samplers: str = "sequential,assd-self,assd-ngram",
                         out: str, batch_size: int = 8) -> None:
    """:func:`add_model_arguments` plus the sampler options of the runners that decode."""
    add_model_arguments(parser, out=out)
    g = parser.add_argument_group("sampling")
    g.add_argument("--engine", choices=sorted(ENGINE_NAMES), default=DEFAULT_ENGINE,
                   help="cached: each fixed token computed once; full: whole-sequence pass per NFE (reference cost)")
    g.add_argument("--samplers", default=samplers, help=f"comma-separated, from {', '.join(SAMPLERS)}")
    add_sampler_arguments(g, every_command=True)
    g.add_argument("--batch-size", type=int, default=batch_size, help="rows decoded together")
    g.add_argument("--trials", type=int, default=1, help="independent repetitions with fresh seeds")


def load_model(args: argparse.Namespace) -> ASARM:
    """The model of ``--model``/``--revision`` on ``--device``, after applying ``--threads``."""
    from ..model import ASARM

    set_threads(args.threads)
    if args.no_progress:
        hide_library_progress_bars()
    model = ASARM.from_pretrained(args.model, revision=args.revision, device=args.device)
    if model.tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer files; save one next to the weights")
    return model
