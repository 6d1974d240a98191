"""The ``asarm`` command. Each subcommand is a plain function; ``main`` only parses arguments.

    asarm sample --text "The <mask:4> sat on the mat." --k 5 --batch-size 4     # the embedded asarm-tiny
    asarm sample --model DIR_OR_HUB_NAME --text "A whole sentence to mask." --masking-rate 0.7
    asarm train --config configs/tiny_cpu.yaml train.max_steps=100
    asarm train-draft-head --config configs/tiny_draft_head.yaml        # a chained draft head for asarm-tiny
    asarm eval speculative            # every evaluation runs with no arguments on the embedded model
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

import torch

from . import orders
from .eval.arguments import add_model_source_arguments
from .model import ASARM
from .sampling import SAMPLERS, decode
from .sampling.engine import DEFAULT_ENGINE, ENGINES
from .sampling.spec import SettingError, add_sampler_arguments, apply_override, sampler_overrides
from .sampling.trace import render_html, render_text
from .seeds import mix_seed

__all__ = ["main", "sample", "sample_spec", "profile", "add_sample_parser", "encode_template"]

# `asarm sample --sampler`: any registry name, or "assd" (two-call rounds with --drafter's drafts: assd-self,
# assd-ngram, ...)
SAMPLE_SAMPLERS = {"assd": "assd-self", "auto": "assd-auto", **{name: name for name in SAMPLERS}}
# Anything that looks like a blank tag (``<mask``, then ``:``, a space or ``>``) is parsed, so a
# mistyped tag is an error instead of literal text sent to the model.
_BLANK_TAG = re.compile(r"<mask(?=[\s:>])[^<>]*>")
_BLANK = re.compile(r"<mask(?::(\d+))?>")


def _blank_count(tag: str) -> int:
    match = _BLANK.fullmatch(tag)
    if match is None or int(match.group(1) or 1) < 1:
        raise ValueError(f"blank tag {tag!r} is not valid: write <mask> or <mask:N> with N >= 1 and no spaces")
    return int(match.group(1) or 1)


def encode_template(tokenizer, text: str, mask_token_id: int) -> list[int]:
    """Token ids of ``text`` where ``<mask>`` is one blank and ``<mask:N>`` is N blanks."""
    ids: list[int] = []
    cursor = 0
    for match in _BLANK_TAG.finditer(text):
        count = _blank_count(match.group(0))
        segment = text[cursor:match.start()]
        if segment.strip():
            ids += tokenizer(segment, add_special_tokens=False)["input_ids"]
        ids += [mask_token_id] * count
        cursor = match.end()
    if text[cursor:].strip():
        ids += tokenizer(text[cursor:], add_special_tokens=False)["input_ids"]
    return ids


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
           **settings) -> list[dict]:
    """Fill the blanks of ``text`` (or a random ``masking_rate`` of its tokens) ``batch_size`` times.

    ``sampler``: a registry name (``asarm.sampling.SAMPLERS``), or ``assd`` (two-call rounds with the drafts of
    ``drafter``); ``settings``: sampler settings (the fields of ``SamplerSpec``: ``k``, ``drafter``,
    ``temperature``, ``draft_length`` ...). ``trace``: write a picture of the decode (an HTML file);
    ``show_rounds``: print every round (the samples do not change). Returns one dict per completion (text,
    nfe, rounds, tokens_per_round, tokens_per_call) and prints them.
    """
    spec = sample_spec(sampler, **settings)
    if trace is not None and not Path(trace).resolve().parent.is_dir():
        raise ValueError(f"--trace {trace}: folder {Path(trace).resolve().parent} does not exist; create it first")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    asarm = ASARM.from_pretrained(model, revision=revision, device=device)
    if asarm.tokenizer is None:
        raise ValueError(f"model {model!r} has no tokenizer files; save one next to the weights")
    spec = spec.resolve(asarm)  # a drafter that needs a draft head the model lacks: refused before decoding
    ids = torch.tensor(encode_template(asarm.tokenizer, text, asarm.mask_token_id))
    if len(ids) == 0:
        raise ValueError("text is empty")
    if asarm.trained_length is not None and len(ids) > asarm.trained_length:
        print(f"asarm sample: warning: the text with its blanks is {len(ids)} tokens, longer than the "
              f"{asarm.trained_length} tokens {model!r} was trained on; expect poor fills (use shorter blanks)",
              file=sys.stderr)
    gen = torch.Generator().manual_seed(seed)
    blanks = ids == asarm.mask_token_id
    if masking_rate is not None:
        if blanks.any():
            raise ValueError("give either blanks in the text or --masking-rate, not both")
        n_prompt = orders.num_prompt_for_rate(masking_rate, torch.full((batch_size,), len(ids)))
        sigma = orders.any_subset(n_prompt, len(ids), generator=gen)
    else:
        if not blanks.any():
            raise ValueError("text has no blanks: write <mask> or <mask:N>, or pass --masking-rate")
        sigma, n_prompt = orders.infilling(~blanks.expand(batch_size, -1))
    tokens = ids.expand(batch_size, -1).clone()
    seeds = torch.tensor([mix_seed(seed, b) for b in range(batch_size)])
    out = decode(asarm, spec, tokens, sigma, n_prompt, seed=seeds, engine=engine, progress=progress,
                 trace=trace is not None or show_rounds)
    shown = tokens[0].masked_fill(sigma[0] >= n_prompt[0], asarm.mask_token_id)
    print(f"prompt: {asarm.tokenizer.decode(shown.tolist())}")
    if not out.exact:
        print(f"WARNING: r_atol={spec.r_atol} > 0: lossy sampling, not the model's distribution")
    if show_rounds:
        print(render_text(out.trace, out.tokens, asarm.tokenizer))
    if trace is not None:
        Path(trace).write_text(render_html(out.trace, out.tokens, asarm.tokenizer,
                                           title=f"asarm sample: {out.sampler}"), encoding="utf-8")
        print(f"wrote {trace}")
    results = []
    for b in range(batch_size):
        result = {"text": asarm.tokenizer.decode(out.tokens[b].tolist()), "nfe": int(out.nfe[b]),
                  "rounds": int(out.rounds[b]), "tokens_per_round": float(out.tokens_per_round[b]),
                  "tokens_per_call": float(out.tokens_per_call[b])}
        results.append(result)
        print(f"[{b}] nfe={result['nfe']} rounds={result['rounds']} tokens/round={result['tokens_per_round']:.2f} "
              f"tokens/call={result['tokens_per_call']:.2f}\n    {result['text']}")
    return results


def _positive_int(value: str) -> int:
    """argparse type: an integer >= 1 (argparse reports the option name with the message)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def add_sample_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("sample", help="fill blanks in a text with an AS-ARM",
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
    p.add_argument("--batch-size", type=_positive_int, default=1, help="number of completions (>= 1)")
    p.add_argument("--engine", choices=sorted(ENGINES), default=DEFAULT_ENGINE,
                   help="cached: each fixed token computed once (fast); full: a whole-sequence pass per NFE")
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
                  **sampler_overrides(args, every_command=False))


def profile(model: str = "asarm-tiny", revision: str | None = None, device: str | None = None, length: int = 128,
            batch_size: int = 1, k: int = 5, threads: int | None = None, out: str | None = None) -> dict:
    """Measure the call-cost model of assd-auto on WikiText-2 test chunks (95% masked) and print the profiled
    calls with the model's prediction beside each, and the predicted time of every schedule it can choose."""
    from .eval.arguments import set_threads
    from .eval.markdown import markdown_table
    from .eval.texts import packed_text
    from .sampling.assd import auto_controller, profile_calls

    spec = sample_spec("auto", k=k)
    if batch_size < 1 or length < 2:
        raise ValueError(f"--batch-size must be >= 1 and --length >= 2, got {batch_size} and {length}")
    set_threads(threads)
    asarm = ASARM.from_pretrained(model, revision=revision, device=device)
    spec = spec.resolve(asarm)
    chunks = packed_text(asarm.tokenizer, length, None, batch_size)
    visible = int(orders.num_prompt_for_rate(0.95, length))
    sigma = orders.any_subset(visible, length, batch_size=batch_size, generator=torch.Generator().manual_seed(0))
    n_prompt = torch.full((batch_size,), visible)
    cost = profile_calls(asarm, (chunks, sigma, n_prompt, None, None, None), spec)
    controller = auto_controller(asarm, spec, cost)
    print(f"call-cost profile of {model} ({spec.drafter.name} drafts) on {cost.device}, {cost.threads} threads, "
          f"batch {batch_size}, length {length}: {1000 * cost.profile_seconds:.0f} ms\n")
    print(markdown_table([{"schedule (drafts, outcomes)": f"{s['width']}, {s['cover']}", "query rows": s["query_rows"],
                           "head slots": s["head_slots"], "content rows": s["content_rows"],
                           "measured ms": 1000 * s["seconds"], "predicted ms": 1000 * s["predicted"]}
                          for s in cost.table()]))
    print(f"fit: {1000 * cost.host:.3f} ms a call + {1000 * cost.per_query_row:.4f} ms a query row + "
          f"{1000 * cost.per_head_slot:.4f} ms a head slot + {1000 * cost.per_content_row:.4f} ms a content row\n")
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
                              description=profile.__doc__.split("\n\n")[0])
    add_model_source_arguments(p)
    p.add_argument("--length", type=_positive_int, default=128, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="rows decoded together (default: %(default)s)")
    p.add_argument("--k", type=_positive_int, default=5, help="the most drafts a call verifies (default: %(default)s)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch (default: torch's)")
    p.add_argument("--out", default=None, help="write the profile here (JSON), for --cost-profile")
    p.set_defaults(func=lambda a: profile(a.model, a.revision, a.device, a.length, a.batch_size, a.k, a.threads,
                                          a.out))


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
    p = subparsers.add_parser(name, help=summary, description=description)
    p.add_argument("--config", required=True, help=f"YAML config ({configs})")
    p.add_argument("overrides", nargs="*", help=f"section.key=value overrides, e.g. {example}")

    def run(args):
        from .training.trainer import train  # lazy: keeps accelerate out of `asarm sample` start-up

        return train(args.config, [*args.overrides, *forced])

    p.set_defaults(func=run)


# asarm eval NAME -> the runner module defining add_arguments(parser) and run(args) (see asarm.eval.arguments)
EVALUATIONS = {
    "speculative": ("asarm.eval.speculative", "speculative-decoding benchmark: NFE, wall-clock, gen. perplexity"),
    "rocstories": ("asarm.eval.nlp_infill", "ROCStories story infilling with ROUGE"),
    "humaneval": ("asarm.eval.code_infill", "HumanEval infilling: sandboxed execution, pass@k"),
    "lm-tasks": ("asarm.eval.lm_tasks", "left-to-right tasks: LAMBADA and HellaSwag"),
    "nll": ("asarm.eval.nll", "held-out NLL per token (random orders) vs a unigram baseline"),
}


def _add_eval_parser(subparsers) -> None:
    p = subparsers.add_parser("eval", help="run an evaluation (writes results.json, summary.md, samples)",
                              description="Evaluations; each runs with no arguments on the embedded default model.")
    evaluations = p.add_subparsers(dest="evaluation", required=True)
    for name, (module_name, summary) in EVALUATIONS.items():
        module = importlib.import_module(module_name)
        q = evaluations.add_parser(name, help=summary, description=module.__doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(q)
        q.set_defaults(func=module.run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asarm", description="Any-subset autoregressive models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_sample_parser(subparsers)
    _add_profile_parser(subparsers)
    _add_train_parser(subparsers)
    _add_eval_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, OSError) as err:
        print(f"asarm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
