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
import math
import re
import sys
from pathlib import Path

import torch

from . import orders
from .eval.runner import SamplerSpec, parse_outcomes, add_model_source_arguments, decode
from .model import ASARM
from .sampling import DRAFTERS
from .sampling.assd import DEFAULT_DRAFT_TEMPERATURE_RATIO, HEAD_DRAFT_TEMPERATURE_RATIO
from .sampling.decode import TEMPERATURE_MODES
from .sampling.trace import render_html, render_text
from .sampling.engine import DEFAULT_ENGINE, ENGINES

__all__ = ["main", "sample", "encode_template"]

SAMPLE_ALGORITHMS = ("assd", "assd-fused", "sequential")
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


def sample(model: str, text: str, revision: str | None = None, masking_rate: float | None = None,
           sampler: str = "assd", drafter: str = "self", k: int = 5, temperature: float = 1.0,
           temperature_mode: str = "target", r_atol: float = 0.0, seed: int = 0, batch_size: int = 1,
           engine: str = DEFAULT_ENGINE, device: str | None = None, progress: bool = True, bonus: bool = False,
           adaptive_threshold: float | None = None, outcomes: str | int | None = None,
           draft_temperature_ratio: float | None = None, trace: str | None = None,
           show_rounds: bool = False) -> list[dict]:
    """Fill the blanks of ``text`` (or a random ``masking_rate`` of its tokens) ``batch_size`` times.

    ``sampler``: ``assd``, ``assd-fused`` (single-pass rounds; drafter ``self`` or ``head``) or ``sequential``.
    ``drafter``: a name of ``DRAFTERS`` (``head``: the model's chained draft head, when it ships one). ``trace``: write
    a picture of the decode (an HTML file); ``show_rounds``: print every round (the samples do not change).
    Returns one dict per completion (text, nfe, rounds, tokens_per_round, tokens_per_call) and prints them.
    """
    if sampler not in SAMPLE_ALGORITHMS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLE_ALGORITHMS)}")
    if sampler != "assd" and bonus:
        raise ValueError(f"--bonus applies to --sampler assd only (assd-fused always has it), not {sampler!r}")
    if (sampler == "sequential" and drafter != "self") or (sampler == "assd-fused" and drafter not in ("self", "head")):
        raise ValueError(f"--drafter {drafter} does not apply to --sampler {sampler} (assd: any drafter; assd-fused: "
                         f"self or head)")
    if sampler == "sequential" and adaptive_threshold is not None:
        raise ValueError("--adaptive-threshold does not apply to --sampler sequential")
    if sampler != "assd-fused" and outcomes is not None:
        raise ValueError("--outcomes applies to --sampler assd-fused only")
    if sampler == "sequential" and draft_temperature_ratio is not None:
        raise ValueError("--draft-temperature-ratio does not apply to --sampler sequential")
    if trace is not None and not Path(trace).resolve().parent.is_dir():
        raise ValueError(f"--trace {trace}: folder {Path(trace).resolve().parent} does not exist; create it first")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    if not 0 < temperature < math.inf:
        raise ValueError(f"--temperature must be a finite number > 0, got {temperature}")
    asarm = ASARM.from_pretrained(model, revision=revision, device=device)
    if asarm.tokenizer is None:
        raise ValueError(f"model {model!r} has no tokenizer files; save one next to the weights")
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
    seeds = torch.tensor([seed * 1_000_003 + b for b in range(batch_size)])
    spec = SamplerSpec(sampler, "sequential") if sampler == "sequential" else SamplerSpec(
        sampler, "assd", drafter, bonus=bonus or sampler == "assd-fused", fused=sampler == "assd-fused",
        draft_length=adaptive_threshold, outcomes=outcomes, draft_temperature_ratio=draft_temperature_ratio)
    out = decode(asarm, spec, tokens, sigma, n_prompt, seeds=seeds, k=k, temperature=temperature, engine=engine,
                 progress=progress, temperature_mode=temperature_mode, r_atol=r_atol,
                 trace=trace is not None or show_rounds)
    shown = tokens[0].masked_fill(sigma[0] >= n_prompt[0], asarm.mask_token_id)
    print(f"prompt: {asarm.tokenizer.decode(shown.tolist())}")
    if not out.exact:
        print(f"WARNING: r_atol={r_atol} > 0: lossy sampling, not the model's distribution")
    if show_rounds:
        print(render_text(out.trace, out.tokens, asarm.tokenizer))
    if trace is not None:
        Path(trace).write_text(render_html(out.trace, out.tokens, asarm.tokenizer, title=f"asarm sample: {sampler}"),
                               encoding="utf-8")
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


def _add_sample_parser(subparsers) -> None:
    p = subparsers.add_parser("sample", help="fill blanks in a text with an AS-ARM",
                              description="Fill the blanks of a text (or a random subset of its tokens).")
    add_model_source_arguments(p)
    p.add_argument("--text", required=True, help="text; <mask> is one blank token, <mask:N> is N blank tokens")
    p.add_argument("--masking-rate", type=float, default=None,
                   help="mask this fraction of the text's tokens at random instead of using blanks")
    p.add_argument("--sampler", choices=SAMPLE_ALGORITHMS, default="assd",
                   help="assd: draft call + verify call per round; assd-fused: single-pass rounds; sequential")
    p.add_argument("--drafter", choices=list(DRAFTERS), default="self",
                   help="ASSD draft proposer (head: the model's chained draft head; with assd or assd-fused)")
    p.add_argument("--bonus", action="store_true", help="assd: an all-accepted round commits one more exact token")
    p.add_argument("--adaptive-threshold", type=float, default=None,
                   help="adaptive draft length: verify a draft slot only while its proposal's top probability "
                        "reaches this (exact; default: always k)")
    p.add_argument("--outcomes", type=parse_outcomes, default=None,
                   help="assd-fused: outcomes covered per call ('all' or a count; default 2, all with --drafter head)")
    p.add_argument("--k", type=int, default=5, help="ASSD drafts per round (>= 1)")
    p.add_argument("--draft-temperature-ratio", type=float, default=None,
                   help="ASSD: verified drafts are drawn at this multiple of --temperature (exact at any value; "
                        f"default {DEFAULT_DRAFT_TEMPERATURE_RATIO:g}, or {HEAD_DRAFT_TEMPERATURE_RATIO:g} with "
                        f"--drafter head)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0)")
    p.add_argument("--temperature-mode", choices=TEMPERATURE_MODES, default="target",
                   help="target: sample the tempered joint; no_temp_oracle: temper drafts 2..k only (T=1 joint)")
    p.add_argument("--r-atol", type=float, default=0.0,
                   help="LOSSY: slack added to the ASSD acceptance ratio (0 = exact)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--batch-size", type=_positive_int, default=1, help="number of completions (>= 1)")
    p.add_argument("--engine", choices=sorted(ENGINES), default=DEFAULT_ENGINE,
                   help="cached: each fixed token computed once (fast); full: a whole-sequence pass per NFE")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--trace", metavar="FILE.html", default=None,
                   help="write a self-contained page showing each round: tokens coloured by origin (prompt, "
                        "accepted draft, residual, bonus, sequential), the decode order, accepted lengths")
    p.add_argument("--show-rounds", action="store_true", help="print every round (drafts, accepted, committed)")
    p.set_defaults(func=lambda a: sample(
        a.model, a.text, a.revision, a.masking_rate, a.sampler, a.drafter, a.k, a.temperature, a.temperature_mode,
        a.r_atol, a.seed, a.batch_size, a.engine, a.device, not a.no_progress, a.bonus, a.adaptive_threshold,
        a.outcomes, a.draft_temperature_ratio, a.trace, a.show_rounds))


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


# asarm eval NAME -> the runner module defining add_arguments(parser) and run(args) (asarm.eval.runner)
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
    _add_sample_parser(subparsers)
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
