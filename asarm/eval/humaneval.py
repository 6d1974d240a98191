"""HumanEval infilling (Bavarian et al. 2022): load the benchmarks, execute completions, pass@k.

A completion is correct when ``prompt + completion + suffix + "\\n" + test + "\\n" +
f"check({entry_point})"`` runs to the end without error inside the time limit (see
``asarm.eval.code_execution`` for the sandbox). This module takes already decoded strings; the
code whitespace mapping of the tokenizer is not its business.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..inputs import iter_jsonl
from ..paths import data_file
from .code_execution import ExecutionResult, SandboxLimits, aggregate_pass_at_k, run_programs

__all__ = ["BENCHMARKS", "InfillingProblem", "load_problems", "build_program", "EvaluationReport",
           "evaluate_completions", "SelfCheckReport", "self_check", "CompletionMismatchError",
           "extract_completion"]

BENCHMARKS = {
    "single-line": "human-eval-infilling/HumanEval-SingleLineInfilling.jsonl.gz",
    "multi-line": "human-eval-infilling/HumanEval-MultiLineInfilling.jsonl.gz",
    "random-span": "human-eval-infilling/HumanEval-RandomSpanInfilling.jsonl.gz",
    "random-span-light": "human-eval-infilling/HumanEval-RandomSpanInfillingLight.jsonl.gz",
}


@dataclass(frozen=True)
class InfillingProblem:
    task_id: str
    prompt: str               # code before the blank
    suffix: str               # code after the blank (may be empty)
    canonical_solution: str   # the blank's reference text
    test: str                 # defines check(candidate)
    entry_point: str


def load_problems(benchmark: str = "single-line", path: str | os.PathLike | None = None,
                  limit: int | None = None) -> list[InfillingProblem]:
    """The problems of one benchmark (a key of BENCHMARKS) from the data directory, or those of ``path``
    (a .jsonl or .jsonl.gz file in the same format) if given; in file order, the first ``limit`` only."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown HumanEval-infilling benchmark {benchmark!r}; choose one of {sorted(BENCHMARKS)}")
    file = data_file(path if path is not None else BENCHMARKS[benchmark])
    problems = [InfillingProblem(row["task_id"], row["prompt"], row["suffix"], row["canonical_solution"], row["test"],
                                 row["entry_point"]) for _, row in iter_jsonl(file)]
    return problems[:limit]


def build_program(problem: InfillingProblem, completion: str) -> str:
    """The program whose clean run means the completion is correct."""
    return (problem.prompt + completion + problem.suffix + "\n" + problem.test + "\n"
            + f"check({problem.entry_point})")


@dataclass
class EvaluationReport:
    results: dict[str, list[ExecutionResult]]  # task_id -> one result per completion, in order
    pass_at_k: dict[str, float]                # {"pass@1": fraction, ...}


def evaluate_completions(problems: Sequence[InfillingProblem], completions_per_task: Mapping[str, Sequence[str]],
                         workers: int | None = None, timeout: float = 3.0, ks: Sequence[int] = (1,),
                         limits: SandboxLimits = SandboxLimits()) -> EvaluationReport:
    """Execute every completion of every problem and compute pass@k (mean over the given problems).

    ``completions_per_task`` maps each problem's task_id to its completions (at least one); keys
    that are not among the problems are an error (a sign of mixed-up benchmarks).
    """
    by_id = {p.task_id: p for p in problems}
    missing = [task for task in by_id if not completions_per_task.get(task)]
    unknown = [task for task in completions_per_task if task not in by_id]
    if missing or unknown:
        raise ValueError(f"completions do not match the problems: {len(missing)} problem(s) without completions "
                         f"(e.g. {missing[:1]}), {len(unknown)} unknown task id(s) (e.g. {unknown[:1]})")
    jobs = [(task, build_program(by_id[task], c)) for task in by_id for c in completions_per_task[task]]
    outcomes = run_programs([program for _, program in jobs], timeout=timeout, workers=workers, limits=limits)
    results: dict[str, list[ExecutionResult]] = {task: [] for task in by_id}
    for (task, _), outcome in zip(jobs, outcomes):
        results[task].append(outcome)
    flags = {task: [r.passed for r in rs] for task, rs in results.items()}
    return EvaluationReport(results, aggregate_pass_at_k(flags, ks))


@dataclass
class SelfCheckReport:
    n_tasks: int
    canonical_pass_rate: float    # should be 1.0
    canonical_failures: list[str]  # task ids whose canonical solution did not pass
    empty_pass_rate: float        # should be 0.0
    empty_passes: list[str]        # task ids that pass with an empty completion


def self_check(problems: Sequence[InfillingProblem], workers: int | None = None, timeout: float = 3.0,
               limits: SandboxLimits = SandboxLimits()) -> SelfCheckReport:
    """Run each problem with its canonical solution (should pass) and with an empty completion (should fail)."""
    if not problems:
        raise ValueError("no problems to check")
    programs = [build_program(p, p.canonical_solution) for p in problems] + [build_program(p, "") for p in problems]
    outcomes = run_programs(programs, timeout=timeout, workers=workers, limits=limits)
    n = len(problems)
    canonical_failures = [p.task_id for p, r in zip(problems, outcomes[:n]) if not r.passed]
    empty_passes = [p.task_id for p, r in zip(problems, outcomes[n:]) if r.passed]
    return SelfCheckReport(n, 1 - len(canonical_failures) / n, canonical_failures, len(empty_passes) / n, empty_passes)


class CompletionMismatchError(ValueError):
    """A decoded document does not start with the prompt and end with the suffix."""


def extract_completion(decoded: str, prompt: str = "", suffix: str = "") -> str:
    """The infilled text of a decoded document ``prompt + completion + suffix``.

    * Decoded text of the blank's tokens only: leave ``prompt`` and ``suffix`` empty; it is returned
      as is.
    * A whole decoded document: it must start with ``prompt`` and end with ``suffix`` (an empty
      suffix is fine: everything after the prompt is the completion), without the two overlapping;
      otherwise CompletionMismatchError says where they diverge. Nothing is trimmed or guessed.

    SentencePiece drops the leading space of a span's first piece when the span is decoded alone,
    and may not reproduce the raw prompt exactly. To keep the blank's boundary whitespace, decode
    ``prompt_ids + blank_ids`` together and pass ``prompt=decode(prompt_ids)``, ``suffix=""``.
    """
    if not decoded.startswith(prompt):
        raise CompletionMismatchError(f"decoded text does not start with the prompt: they differ at character "
                                      f"{_first_difference(decoded, prompt)}")
    if not decoded.endswith(suffix):
        at = _first_difference(decoded[::-1], suffix[::-1])
        raise CompletionMismatchError(f"decoded text does not end with the suffix: they differ at character {at} "
                                      f"from the end")
    end = len(decoded) - len(suffix)
    if end < len(prompt):
        raise CompletionMismatchError(f"prompt ({len(prompt)} chars) and suffix ({len(suffix)} chars) overlap in "
                                      f"a decoded text of {len(decoded)} chars")
    return decoded[len(prompt):end]


def _first_difference(a: str, b: str) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
