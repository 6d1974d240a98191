"""Each evaluation's command line: its options, and the checks of their values that need no model.

``asarm eval NAME`` builds its parser from here and runs the checks before it imports the runner module
(``asarm.eval.speculative`` ...), so ``--help`` and a bad option come back at once: importing this module
loads no torch. A runner's ``run(args)`` repeats its check, for callers from Python.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Callable

from ..sampling.spec import parse_choices
from .arguments import add_common_arguments, add_model_arguments, parse_count_or_all, samplers_from_args, unset_means
from .humaneval import BENCHMARKS
from .rocstories import DEFAULT_FILE, SETTINGS

__all__ = ["Evaluation", "EVALUATIONS", "SPECULATIVE_SAMPLERS", "NLL_UNIGRAM_TEXT", "NLL_NUM_SEQUENCES",
           "LM_TASKS", "parse_limit", "parse_settings", "parse_benchmarks", "parse_pass_k",
           "check_speculative", "check_nll", "check_infill", "check_humaneval", "check_lm_tasks"]

# the default --samplers of `asarm eval speculative`; with a model that ships a draft head, assd-fused-head is
# added (assd-auto then drafts with the head too)
SPECULATIVE_SAMPLERS = "sequential,assd-self,assd-ngram,assd-fused,assd-auto"
# The unigram baseline's counts: in-domain text (WikiText-2 valid; asarm-tiny trains on the enwiki sample), small
# enough to count in a second; the test text is WikiText-2 raw test.
NLL_UNIGRAM_TEXT = "wikitext-2/valid.txt"
# Small enough for about a minute on 2 CPU cores with the embedded model; --num-sequences all for the whole text.
NLL_NUM_SEQUENCES = 512
LM_TASKS = ("lambada", "hellaswag")


@dataclass(frozen=True)
class Evaluation:
    """``asarm eval NAME``: ``runner`` is the module whose ``run(args)`` does the work."""

    runner: str
    summary: str
    description: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    check: Callable[[argparse.Namespace], object]


def _at_least(args: argparse.Namespace, minimum: int, *options: str) -> None:
    for option in options:
        value = getattr(args, option)
        if value is not None and value < minimum:
            raise ValueError(f"--{option.replace('_', '-')} must be >= {minimum}, got {value}")


def _visible_tokens(length: int, masking_rate: float) -> int:
    """What ``orders.num_prompt_for_rate`` gives for one sequence (a test holds the two equal)."""
    return length - math.floor(length * masking_rate + 1e-9)


def add_speculative_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("benchmark (paper: --length 512 --num-sequences all --model therealgabeguo/ASARM "
                                  "--revision nlp)")
    g.add_argument("--text-file", default=None,
                   help="plain-text file to chunk" + unset_means("WikiText-2 raw test from the data directory, "
                                                                 "else the Hub"))
    g.add_argument("--length", type=int, default=128, help="tokens per sequence (the paper: 512)")
    g.add_argument("--num-sequences", type=parse_count_or_all, default=8,
                   help="consecutive chunks to decode, or 'all' (the paper: all)")
    g.add_argument("--start-fraction", type=float, default=0.05,
                   help="fraction of each sequence shown at random positions; the rest is decoded left to right")
    g = parser.add_argument_group("generative perplexity and entropy")
    g.add_argument("--ppl-model", default="gpt2-large",
                   help="causal LM (Hub name or local directory) scoring the decoded text; 'none' disables it")
    g.add_argument("--ppl-batch-size", type=int, default=8, help="texts (windows) scored together")
    g.add_argument("--ppl-stride", type=int, default=None,
                   help="window stride for texts longer than the LM's context" + unset_means("half the context"))
    add_common_arguments(parser, out="runs/eval/speculative", batch_size=1, samplers=SPECULATIVE_SAMPLERS)


def check_speculative(args: argparse.Namespace) -> int:
    """Validate the options before anything is loaded; return the number of visible tokens per sequence."""
    samplers_from_args(args)
    if not 0.0 < args.start_fraction < 1.0:
        raise ValueError(f"--start-fraction must lie strictly between 0 and 1, got {args.start_fraction}")
    _at_least(args, 1, "batch_size", "trials", "ppl_batch_size", "num_sequences", "ppl_stride")
    visible = _visible_tokens(args.length, 1.0 - args.start_fraction) if args.length >= 2 else 0
    if not 1 <= visible < args.length:
        raise ValueError(f"--length {args.length} is too short for --start-fraction {args.start_fraction}: a "
                         f"sequence needs at least one visible and one generated token")
    return visible


def add_nll_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, out="runs/eval/nll")
    g = parser.add_argument_group("data")
    g.add_argument("--text-file", default=None,
                   help="evaluation text, one document a line" + unset_means("WikiText-2 raw test, else the Hub"))
    g.add_argument("--unigram-file", default=NLL_UNIGRAM_TEXT,
                   help="text whose token counts make the unigram baseline (default: %(default)s, in-domain "
                        "text that the benchmark split does not hold)")
    g.add_argument("--length", type=int, default=128, help="tokens per chunk")
    g.add_argument("--num-sequences", type=parse_count_or_all, default=NLL_NUM_SEQUENCES,
                   help="first chunks of the text to score, or 'all' (WikiText-2 raw test: 3227 of 128 tokens with "
                        "asarm-tiny)")
    g.add_argument("--masking-rate", type=float, default=0.95, help="fraction of each chunk scored")
    g.add_argument("--batch-size", type=int, default=16, help="chunks per forward pass")


def check_nll(args: argparse.Namespace) -> None:
    if not 0.0 < args.masking_rate < 1.0:
        raise ValueError(f"--masking-rate must lie strictly between 0 and 1, got {args.masking_rate}")
    _at_least(args, 1, "batch_size", "num_sequences")
    _at_least(args, 2, "length")
    if _visible_tokens(args.length, args.masking_rate) < 1:
        raise ValueError(f"--masking-rate {args.masking_rate} leaves no visible token at --length {args.length}")


def parse_limit(value: str) -> int | None:
    """``--limit``: a positive integer, or ``all``."""
    value = value.strip()
    if value.lower() == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"--limit must be a positive integer or 'all', got {value!r}")
    return int(value)


def _add_infill_arguments(parser: argparse.ArgumentParser, *, limit: int | None, k: int) -> None:
    """``--limit`` and the blank-length options; sets the default ASSD ``k`` (the paper uses 10).
    Call it after ``add_common_arguments``: a default set before ``--k`` exists is ignored."""
    g = parser.add_argument_group("infilling")
    g.add_argument("--limit", type=parse_limit, default=limit,
                   help="items per setting or benchmark, the first in file order ('all' = every item)")
    blank = g.add_mutually_exclusive_group()
    blank.add_argument("--blank-length", type=int, default=None,
                       help="blank tokens per item; None = the reference's token count")
    blank.add_argument("--blank-ratio", type=float, default=None,
                       help="blank = max(1, round(ratio x the reference's token count))")
    parser.set_defaults(k=k)


def check_infill(args: argparse.Namespace) -> None:
    """The options both infilling evaluations share."""
    _at_least(args, 1, "trials", "batch_size", "blank_length")
    if args.blank_ratio is not None and not args.blank_ratio > 0:
        raise ValueError(f"--blank-ratio must be > 0, got {args.blank_ratio}")
    samplers_from_args(args)


def add_rocstories_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("ROCStories")
    g.add_argument("--data", default=None,
                   help=f"Story Cloze CSV or TSV; None = the data directory's {DEFAULT_FILE}")
    g.add_argument("--settings", default="1/5,3/5", help=f"comma-separated, from {', '.join(SETTINGS)}")
    add_common_arguments(parser, out="runs/eval/rocstories", batch_size=16)
    _add_infill_arguments(parser, limit=16, k=10)


def parse_settings(value: str) -> list[str]:
    return parse_choices(value, SETTINGS, "ROCStories setting")


def check_rocstories(args: argparse.Namespace) -> list[str]:
    check_infill(args)
    return parse_settings(args.settings)


def add_humaneval_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("HumanEval infilling")
    g.add_argument("--benchmarks", default="single-line",
                   help=f"comma-separated, from {', '.join(BENCHMARKS)}")
    g.add_argument("--data-dir", default=None,
                   help="folder holding the HumanEval-*Infilling.jsonl.gz files; None = the data directory's "
                        "human-eval-infilling/")
    g.add_argument("--no-code-mapping", action="store_true",
                   help="tokenise code as natural text, for models not trained on whitespace-mapped code "
                        "(newlines and indentation are then lost)")
    g.add_argument("--num-samples", type=int, default=1, help="completions per task and trial")
    g.add_argument("--pass-k", default="1", help="comma-separated k for pass@k (each <= trials x num-samples)")
    g.add_argument("--timeout", type=float, default=3.0, help="seconds per program (wall clock)")
    g.add_argument("--workers", type=int, default=None, help="programs run in parallel; None = the CPU count")
    add_common_arguments(parser, out="runs/eval/humaneval", batch_size=8)
    _add_infill_arguments(parser, limit=8, k=10)


def parse_benchmarks(value: str) -> list[str]:
    return parse_choices(value, BENCHMARKS, "HumanEval-infilling benchmark")


def parse_pass_k(value: str, n: int) -> list[int]:
    """``"1,10"`` -> [1, 10]; each k must lie in [1, n] (n = completions per task)."""
    try:
        ks = sorted({int(k) for k in value.split(",") if k.strip()})
    except ValueError:
        raise ValueError(f"--pass-k must be comma-separated integers, got {value!r}") from None
    if not ks or ks[0] < 1 or ks[-1] > n:
        raise ValueError(f"--pass-k values must lie in [1, {n}] (trials x num-samples completions per task), "
                         f"got {value!r}")
    return ks


def check_humaneval(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """The benchmarks and the pass@k values asked for."""
    check_infill(args)
    _at_least(args, 1, "num_samples", "workers")
    if args.timeout <= 0:
        raise ValueError(f"--timeout must be > 0, got {args.timeout}")
    return parse_benchmarks(args.benchmarks), parse_pass_k(args.pass_k, args.trials * args.num_samples)


def add_lm_tasks_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("tasks")
    g.add_argument("--tasks", default=",".join(LM_TASKS), help=f"comma-separated, from {', '.join(LM_TASKS)}")
    g.add_argument("--lambada-file", default=None,
                   help="LAMBADA .jsonl with a 'text' field per line (lambada_openai), or one passage per line"
                        + unset_means("lambada/lambada_test.jsonl in the data directory, else the Hub "
                                      "EleutherAI/lambada_openai"))
    g.add_argument("--hellaswag-file", default=None,
                   help="HellaSwag .jsonl in the official format (ctx, endings, label)"
                        + unset_means("hellaswag/hellaswag_val.jsonl in the data directory, else the Hub "
                                      "Rowan/hellaswag"))
    g.add_argument("--limit", type=int, default=None, help="first N examples of each task" + unset_means("all"))
    g.add_argument("--max-length", type=int, default=512,
                   help="tokens per row; a longer context keeps its last tokens (counted as 'truncated')")
    g.add_argument("--batch-size", type=int, default=16, help="rows scored together (HellaSwag: one row per ending)")
    add_model_arguments(parser, out="runs/eval/lm_tasks", seed=False)  # nothing is sampled


def check_lm_tasks(args: argparse.Namespace) -> list[str]:
    """The tasks asked for."""
    _at_least(args, 1, "limit", "batch_size")
    _at_least(args, 2, "max_length")
    return parse_choices(args.tasks, LM_TASKS, "task")


EVALUATIONS = {
    "speculative": Evaluation(
        "asarm.eval.speculative", "speculative-decoding benchmark: NFE, wall-clock, gen. perplexity",
        "Speculative-decoding benchmark (the paper's protocol): sequential vs ASSD sampling of WikiText-2 test chunks "
        "with 95% of the tokens hidden, comparing NFE, wall-clock time, generative perplexity and unigram entropy "
        "with paired tests.", add_speculative_arguments, check_speculative),
    "rocstories": Evaluation(
        "asarm.eval.nlp_infill", "ROCStories story infilling with ROUGE",
        "ROCStories story infilling (Story Cloze 2016 val): fill the blank sentences with every sampler and score "
        "them with ROUGE-1/2/L F x100, with NFE and tokens per round.", add_rocstories_arguments, check_rocstories),
    "humaneval": Evaluation(
        "asarm.eval.code_infill", "HumanEval infilling: sandboxed execution, pass@k",
        "HumanEval infilling (single-line, multi-line, random-span, random-span-light): fill each task's blank with "
        "every sampler, execute the programs in the sandbox and report pass@k, NFE and tokens per round.",
        add_humaneval_arguments, check_humaneval),
    "lm-tasks": Evaluation(
        "asarm.eval.lm_tasks", "left-to-right tasks: LAMBADA and HellaSwag",
        "Left-to-right tasks through lm-evaluation-harness: LAMBADA (greedy last-word exact match and per-word "
        "perplexity) and HellaSwag (acc and acc_norm over the endings), scored exactly with the oracle mask.",
        add_lm_tasks_arguments, check_lm_tasks),
    "nll": Evaluation(
        "asarm.eval.nll", "held-out NLL per token (random orders) vs a unigram baseline",
        "Held-out oracle NLL at a masking rate with random any-subset orders, next to a unigram baseline: per "
        "token, per byte and per word.", add_nll_arguments, check_nll),
}
