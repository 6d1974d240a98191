"""The ``asarm`` command. Each subcommand is a plain function; ``main`` only parses arguments.

Importing this module loads no torch: the parsers come from light modules (asarm.sampling.spec,
asarm.eval.commands) and each command imports what it needs, so ``--help`` and a bad option come back at
once. Any error that escapes a command is one line; ``--debug`` shows its traceback.

    asarm sample --text "The <mask:4> sat on the mat." --k 5 --batch-size 4     # the embedded asarm-tiny
    asarm sample --model DIR_OR_HUB_NAME --text "A whole sentence to mask." --masking-rate 0.7
    asarm train --config configs/tiny_cpu.yaml train.max_steps=100
    asarm train-draft-head --config configs/tiny_draft_head.yaml        # a chained draft head for asarm-tiny
    asarm eval speculative            # every evaluation runs with no arguments on the embedded model
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .eval.arguments import add_model_source_arguments, add_threads_argument, positive_int
from .eval.commands import EVALUATIONS
from .resources import hide_library_progress_bars, set_threads
from .sampling.spec import DEFAULT_ENGINE, ENGINE_NAMES, SAMPLERS, SettingError, add_sampler_arguments, \
    apply_override, sampler_overrides
from .templates import blank_counts, encode_template, parse_template, show_completion, show_prompt, token_blanks

__all__ = ["main", "sample", "sample_spec", "profile", "add_sample_parser", "encode_template"]

# `asarm sample --sampler`: any registry name, or "assd" (two-call rounds with --drafter's drafts: assd-self,
# assd-ngram, ...)
SAMPLE_SAMPLERS = {"assd": "assd-self", "auto": "assd-auto", **{name: name for name in SAMPLERS}}


def sample_spec(sampler: str = "assd", **settings):
    """The spec of ``asarm sample --sampler NAME`` with the given settings (SamplerSpec fields), checked
    without a model; a setting that does not apply to the sampler is a one-line error."""
    if sampler not in SAMPLE_SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLE_SAMPLERS)}")
    spec = SAMPLERS[SAMPLE_SAMPLERS[sampler]]
    for name, value in settings.items():
        spec = apply_override(spec, name, value, sampler)
    try:
        spec.resolve()
    except SettingError as err:
        raise err.for_command_line() from None
    return spec


def sample(model: str, text: str, revision: str | None = None, masking_rate: float | None = None,
           sampler: str = "assd", seed: int = 0, batch_size: int = 1, engine: str = DEFAULT_ENGINE,
           device: str | None = None, progress: bool = True, trace: str | None = None, show_rounds: bool = False,
           threads: int | None = None, **settings) -> list[dict]:
    """Fill the blanks of ``text`` (or a random ``masking_rate`` of its tokens) ``batch_size`` times.

    ``sampler``: a registry name (``asarm.sampling.SAMPLERS``), or ``assd`` (two-call rounds with the drafts of
    ``drafter``); ``settings``: sampler settings (the fields of ``SamplerSpec``: ``k``, ``drafter``,
    ``temperature``, ``draft_length`` ...). ``trace``: write a picture of the decode (an HTML file);
    ``show_rounds``: print every round (the samples do not change); ``threads``: torch's CPU threads (None: the
    available CPUs no other task runs on, asarm.resources.default_threads). Returns one dict per completion
    (text, nfe, rounds, tokens_per_round, tokens_per_call) and prints them.
    """
    spec = sample_spec(sampler, **settings)
    _check_sample_arguments(text, masking_rate, batch_size, trace)
    import torch

    from . import orders
    from .model import ASARM
    from .sampling import decode
    from .sampling.trace import render_html, render_text
    from .seeds import mix_seed

    set_threads(threads)
    if not progress:
        hide_library_progress_bars()
    asarm = ASARM.from_pretrained(model, revision=revision, device=device)
    if asarm.tokenizer is None:
        raise ValueError(f"model {model!r} has no tokenizer files; save one next to the weights")
    spec = spec.resolve(asarm)  # a drafter that needs a draft head the model lacks: refused before decoding
    template = parse_template(asarm.tokenizer, text, asarm.mask_token_id)
    ids = torch.tensor(template.ids)
    if len(ids) == 0:
        raise ValueError("text is empty")
    if asarm.trained_length is not None and len(ids) > asarm.trained_length:
        print(f"asarm sample: warning: the text with its blanks is {len(ids)} tokens, longer than the "
              f"{asarm.trained_length} tokens {model!r} was trained on; expect poor fills (use shorter blanks)",
              file=sys.stderr)
    gen = torch.Generator().manual_seed(seed)
    blanks = ids == asarm.mask_token_id
    if masking_rate is not None:
        n_prompt = orders.num_prompt_for_rate(masking_rate, torch.full((batch_size,), len(ids)))
        sigma = orders.any_subset(n_prompt, len(ids), generator=gen)
    else:
        sigma, n_prompt = orders.infilling(~blanks.expand(batch_size, -1))
    tokens = ids.expand(batch_size, -1).clone()
    seeds = torch.tensor([mix_seed(seed, b) for b in range(batch_size)])
    out = decode(asarm, spec, tokens, sigma, n_prompt, seed=seeds, engine=engine, progress=progress,
                 trace=trace is not None or show_rounds)
    shown = template.blanks if masking_rate is None else \
        token_blanks(asarm.tokenizer, template.ids, (sigma[0] >= n_prompt[0]).tolist())
    print(f"prompt: {show_prompt(asarm.tokenizer, template.ids, shown, asarm.mask_token_id)}")
    if not out.exact:
        print(f"WARNING: r_atol={spec.r_atol} > 0: lossy sampling, not the model's distribution")
    if show_rounds:
        print(render_text(out.trace, out.tokens, asarm.tokenizer))
    if trace is not None:
        Path(trace).write_text(render_html(out.trace, out.tokens, asarm.tokenizer, sampler=out.sampler,
                                           settings={"seed": seed, **spec.settings()}), encoding="utf-8")
        print(f"wrote {trace}")
    results = []
    for b in range(batch_size):
        result = {"text": show_completion(asarm.tokenizer, out.tokens[b].tolist(), template.blanks),
                  "nfe": int(out.nfe[b]),
                  "rounds": int(out.rounds[b]), "tokens_per_round": float(out.tokens_per_round[b]),
                  "tokens_per_call": float(out.tokens_per_call[b])}
        results.append(result)
        print(f"[{b}] nfe={result['nfe']} rounds={result['rounds']} tokens/round={result['tokens_per_round']:.2f} "
              f"tokens/call={result['tokens_per_call']:.2f}\n    {result['text']}")
    return results


def _check_sample_arguments(text: str, masking_rate: float | None, batch_size: int, trace: str | None) -> None:
    """The checks of ``asarm sample``'s arguments that need no model (they run before it loads)."""
    if trace is not None and not Path(trace).resolve().parent.is_dir():
        raise ValueError(f"--trace {trace}: folder {Path(trace).resolve().parent} does not exist; create it first")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    if not text.strip():
        raise ValueError("--text is empty; give a text with blanks (<mask>, <mask:N>) or with --masking-rate")
    tags = blank_counts(text)
    if masking_rate is not None:
        if tags:
            raise ValueError("give either blanks in the text or --masking-rate, not both")
        if not 0.0 < masking_rate < 1.0:
            raise ValueError(f"--masking-rate must lie strictly between 0 and 1, got {masking_rate}")
    elif not tags:
        raise ValueError("text has no blanks: write <mask> or <mask:N>, or pass --masking-rate")


def add_sample_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sample", help="fill blanks in a text with an AS-ARM", parents=[_DEBUG],
                              description="Fill the blanks of a text (or a random subset of its tokens).")
    add_model_source_arguments(p)
    p.add_argument("--text", required=True, help="text; <mask> is one blank token, <mask:N> is N blank tokens")
    p.add_argument("--masking-rate", type=float, default=None,
                   help="mask this fraction of the text's tokens at random instead of using blanks")
    p.add_argument("--sampler", choices=list(SAMPLE_SAMPLERS), default="assd", metavar="SAMPLER",
                   help="assd: draft call + verify call per round (with --drafter's drafts); assd-fused: single-pass "
                        "rounds; sequential; or any of " + ", ".join(SAMPLERS) + " (default: %(default)s)")
    add_sampler_arguments(p, every_command=False)
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--batch-size", type=positive_int, default=1, help="number of completions (>= 1)")
    p.add_argument("--engine", choices=sorted(ENGINE_NAMES), default=DEFAULT_ENGINE,
                   help="cached: each fixed token computed once (fast); full: a whole-sequence pass per NFE")
    add_threads_argument(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--trace", metavar="FILE.html", default=None,
                   help="write a self-contained page showing each round: tokens coloured by origin (prompt, "
                        "accepted draft, residual, bonus, sequential), the decode order, accepted lengths")
    p.add_argument("--show-rounds", action="store_true", help="print every round (drafts, accepted, committed)")
    p.set_defaults(func=_run_sample)
    return p


def _run_sample(args: argparse.Namespace) -> list[dict]:
    return sample(args.model, args.text, revision=args.revision, masking_rate=args.masking_rate,
                  sampler=args.sampler, seed=args.seed, batch_size=args.batch_size, engine=args.engine,
                  device=args.device, progress=not args.no_progress, trace=args.trace, show_rounds=args.show_rounds,
                  threads=args.threads, **sampler_overrides(args, every_command=False))


def profile(model: str = "asarm-tiny", revision: str | None = None, device: str | None = None, length: int = 128,
            batch_size: int = 1, k: int = 5, threads: int | None = None, out: str | None = None,
            max_new_tokens: int | None = None) -> dict:
    """Measure the call-cost model of assd-auto on WikiText-2 test chunks (95% masked) and print the profiled
    calls with the model's prediction beside each, and the predicted time of every schedule it can choose."""
    spec = sample_spec("auto", k=k)
    if batch_size < 1 or length < 2:
        raise ValueError(f"--batch-size must be >= 1 and --length >= 2, got {batch_size} and {length}")
    import torch

    from .eval.markdown import markdown_table
    from .eval.sampler_defaults import benchmark_decodes
    from .model import ASARM
    from .sampling.assd import auto_controller, profile_calls

    set_threads(threads)
    asarm = ASARM.from_pretrained(model, revision=revision, device=device)
    spec = spec.resolve(asarm)
    chunks, sigma, visible = benchmark_decodes(asarm.tokenizer, length, batch_size)
    n_prompt = torch.full((batch_size,), visible)
    cost = profile_calls(asarm, (chunks, sigma, n_prompt, None, None, max_new_tokens), spec)
    controller = auto_controller(asarm, spec, cost)
    head = f", the head in {spec.proposal_dtype}" if spec.proposal_dtype else ""
    print(f"call-cost profile of {model} ({spec.drafter.name} drafts{head}) on {cost.device}, {cost.threads} threads, "
          f"batch {batch_size}, length {length}{'' if max_new_tokens is None else f', {max_new_tokens} new tokens'}: "
          f"{1000 * cost.profile_seconds:.0f} ms\n")
    print(markdown_table([{"schedule (drafts, outcomes)": f"{s['width']}, {s['cover']}", "query rows": s["query_rows"],
                           "head slots": s["head_slots"], "content rows": s["content_rows"],
                           "measured ms": 1000 * s["seconds"], "predicted ms": 1000 * s["predicted"]}
                          for s in cost.table()]))
    misses = ", ".join(f"{drafts}: {1000 * miss:+.3f} ms" for drafts, miss in cost.residuals.items())
    print(f"fit: {1000 * cost.host:.3f} ms a call (+ {1000 * cost.per_drafting_call:.3f} ms one with drafts) + "
          f"{1000 * cost.per_query_row:.4f} ms a query row + "
          f"{1000 * cost.per_head_slot:.4f} ms a head slot + {1000 * cost.per_content_row:.4f} ms a content row"
          f"{f', plus its measured miss by drafts verified ({misses})' if misses else ''}; largest relative error "
          f"{cost.relative_error:.1%} (drafting must beat sequential steps by {controller.margin:.1%})\n")
    print(markdown_table([{"drafts": int(w), "outcomes": int(c), "ms a call with drafts": 1000 * float(t_with),
                           "ms a call without": 1000 * float(t_without)}
                          for w, c, t_with, t_without in zip(controller.widths, controller.covers,
                                                             controller.seconds_with, controller.seconds_without)]))
    if out is not None:
        cost.save(out)
        print(f"wrote {out} (use it with --cost-profile)")
    return cost.summary()


def _add_profile_parser(subparsers) -> None:
    p = subparsers.add_parser("profile", help="measure the call-cost model that assd-auto schedules with",
                              parents=[_DEBUG], description=profile.__doc__.split("\n\n")[0])
    add_model_source_arguments(p)
    p.add_argument("--length", type=positive_int, default=128, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="rows decoded together (default: %(default)s)")
    p.add_argument("--k", type=positive_int, default=5, help="the most drafts a call verifies (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="price decodes that stop after this many new tokens a row (max_new_tokens of "
                        "asarm.sampling.decode; default: decodes to the end of the text)")
    add_threads_argument(p)
    p.add_argument("--out", default=None, help="write the profile here (JSON), for --cost-profile")
    p.set_defaults(func=lambda a: profile(a.model, a.revision, a.device, a.length, a.batch_size, a.k, a.threads,
                                          a.out, a.max_new_tokens))


def _add_train_parser(subparsers) -> None:
    _add_config_command(subparsers, "train", "train or fine-tune an AS-ARM (masking-distribution objective)",
                        "Train from a YAML config (configs/*.yaml) with dotted overrides, e.g. optim.lr=3e-4 "
                        "train.max_steps=100. Several processes: torchrun --nproc_per_node N -m "
                        "asarm.training.trainer --config ...",
                        "configs/tiny_cpu.yaml, paper_nlp.yaml, paper_code.yaml", "train.run_dir=runs/x optim.lr=3e-4")
    _add_config_command(subparsers, "train-draft-head", "train a chained draft head for a frozen model (distillation)",
                        "Self-distil a chained draft head (asarm.draft_head) for the model model.init, e.g. "
                        "--config configs/tiny_draft_head.yaml; the trainer's run directory, checkpoints, exact "
                        "resume and overrides (draft_head.slots=3).",
                        "configs/tiny_draft_head.yaml, paper_nlp_draft_head.yaml",
                        "model.init=DIR train.max_steps=500", forced=("draft_head.train=true",))


def _add_config_command(subparsers, name: str, summary: str, description: str, configs: str, example: str,
                        forced: tuple[str, ...] = ()) -> None:
    """A subcommand that runs the trainer on ``--config`` plus dotted overrides (and the ``forced`` ones)."""
    p = subparsers.add_parser(name, help=summary, description=description, parents=[_DEBUG])
    p.add_argument("--config", required=True, help=f"YAML config ({configs})")
    add_threads_argument(p)
    p.add_argument("overrides", nargs="*", help=f"section.key=value overrides, e.g. {example}")

    def run(args):
        from .training.trainer import train

        set_threads(args.threads)
        return train(args.config, [*args.overrides, *forced])

    p.set_defaults(func=run)


def _add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="run an evaluation (writes results.json, summary.md, samples)",
                              parents=[_DEBUG],
                              description="Evaluations; each runs with no arguments on the embedded default model.")
    evaluations = p.add_subparsers(dest="evaluation", required=True)
    for name, evaluation in EVALUATIONS.items():
        q = evaluations.add_parser(name, help=evaluation.summary, description=evaluation.description,
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter, parents=[_DEBUG])
        evaluation.add_arguments(q)
        q.set_defaults(func=_evaluation_runner(evaluation))


def _evaluation_runner(evaluation):
    """Check the options (no model needed), then import the runner and run it."""
    def run(args):
        evaluation.check(args)
        return importlib.import_module(evaluation.runner).run(args)

    return run


# --debug on every subcommand (SUPPRESS: a subcommand that is not given it keeps the top level's value)
_DEBUG = argparse.ArgumentParser(add_help=False)
_DEBUG.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                    help="show the traceback of an error instead of one line")


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line, like every other error of the command (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="asarm", description="Any-subset autoregressive models.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_sample_parser(subparsers)
    _add_profile_parser(subparsers)
    _add_train_parser(subparsers)
    _add_eval_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "asarm " + " ".join(filter(None, (args.command, getattr(args, "evaluation", None))))
    try:
        args.func(args)
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the one top-level guard: one line, the traceback with --debug
        if args.debug:
            raise
        if isinstance(err, (ValueError, OSError)):
            print(f"{command}: error: {_one_line(err)}", file=sys.stderr)
            return 2
        print(f"{command}: error: {type(err).__name__}: {_one_line(err)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
