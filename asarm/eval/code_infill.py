"""HumanEval infilling (single-line, multi-line, random-span, random-span-light): fill each task's
blank with every sampler, execute the programs in the sandbox and report pass@k, NFE and tokens per
round.

The blank has as many tokens as the canonical solution (or ``--blank-length`` / ``--blank-ratio``).
Code goes through the whitespace mapping the paper's code model was trained with (spec section 5;
the exact codec ``asarm.tokenization.CodeTokenizer``); pass ``--no-code-mapping`` for a model trained
on natural text. A completion is the decoded blank alone, so an empty suffix needs no special case.
Before scoring, every run checks that the canonical solutions pass, that empty completions fail, and
that the canonical solution survives tokenising and decoding as a blank. ``--num-samples`` completions
per task and trial (trials pooled) give the unbiased pass@k. Paper settings:
``_run_code_infill_eval.sh`` (therealgabeguo/ASARM, revision code, k 10, all four benchmarks).

The programs are untrusted model output; each runs in the sandbox of ``asarm.eval.code_execution`` (its
own process, user, PID and network namespaces where the kernel allows, resource limits, output through
pipes, a pass only when the test code ran to its end). Its docstring lists what it does not isolate
(the file system is readable), so run untrusted checkpoints inside a container or VM as well.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .humaneval import BENCHMARKS, evaluate_completions, load_problems, self_check
from .infill import (CodeCodec, TextCodec, describe_blank,
                     encode_rows, infill, repeat_trials)
from ..sampling.spec import resolve_samplers
from .commands import check_humaneval
from .arguments import load_model, samplers_from_args
from .markdown import markdown_table
from .plots import bar_chart
from .record import EvalRun

__all__ = ["run"]


def _problems_file(data_dir: str | None, benchmark: str) -> Path | None:
    return None if data_dir is None else Path(data_dir) / Path(BENCHMARKS[benchmark]).name


def run(args: argparse.Namespace) -> dict:
    benchmarks, ks = check_humaneval(args)
    n_samples = args.trials * args.num_samples
    samplers = samplers_from_args(args)
    problem_sets = {b: load_problems(b, _problems_file(args.data_dir, b), args.limit) for b in benchmarks}
    empty = [b for b, problems in problem_sets.items() if not problems]
    if empty:
        raise ValueError(f"no problems in benchmark(s) {empty}")
    model = load_model(args)
    samplers = resolve_samplers(samplers, model, args.model)
    codec = TextCodec(model.tokenizer) if args.no_code_mapping else CodeCodec(model.tokenizer)
    out = EvalRun("humaneval", args)
    checks: dict[str, dict] = {}
    results: dict[str, dict[str, dict]] = {}
    for benchmark, problems in problem_sets.items():
        check = self_check(problems, workers=args.workers, timeout=args.timeout)
        rows, references = encode_rows(codec, [(p.prompt, p.canonical_solution, p.suffix) for p in problems],
                                       args.blank_length, args.blank_ratio)
        roundtrip = [codec.decode_blank(row.prefix, reference) == p.canonical_solution
                     for p, row, reference in zip(problems, rows, references)]
        checks[benchmark] = {"tasks": check.n_tasks, "canonical_pass_rate": check.canonical_pass_rate,
                             "canonical_failures": check.canonical_failures, "empty_pass_rate": check.empty_pass_rate,
                             "empty_passes": check.empty_passes, "blank_roundtrip_rate": sum(roundtrip) / len(problems)}
        print(f"{benchmark}: self-check on {check.n_tasks} tasks: canonical solutions pass "
              f"{100 * check.canonical_pass_rate:.1f}%, empty completions pass {100 * check.empty_pass_rate:.1f}%, "
              f"canonical solution decoded back exactly {100 * checks[benchmark]['blank_roundtrip_rate']:.1f}%")
        if check.canonical_failures:
            print(f"WARNING: canonical solutions fail for {len(check.canonical_failures)} task(s), e.g. "
                  f"{check.canonical_failures[:3]}: pass@k is underestimated there (a loaded machine may need a "
                  f"longer --timeout)")
        # completion s of a task is seeded like trial s: pooled trials x num-samples
        samples, sample_rows, seeds = repeat_trials(rows, n_samples, args.seed)
        results[benchmark] = {}
        for spec in samplers:
            decoded = infill(model, spec, sample_rows, seeds, batch_size=args.batch_size, engine=args.engine,
                             progress=not args.no_progress)
            completions = {p.task_id: [] for p in problems}
            for j, (_, i) in enumerate(samples):
                completions[problems[i].task_id].append(codec.decode_blank(rows[i].prefix, decoded.blank(j)))
            report = evaluate_completions(problems, completions, workers=args.workers, timeout=args.timeout, ks=ks)
            results[benchmark][spec.name] = {**report.pass_at_k, **decoded.summary()}
            records = []
            for j, (s, i) in enumerate(samples):
                task = problems[i].task_id
                executed = report.results[task][s]
                records.append({"benchmark": benchmark, "task_id": task, "sampler": spec.name, "sample": s,
                                "completion": completions[task][s], "passed": executed.passed,
                                "status": executed.status, "error": executed.error, "blank_tokens": rows[i].blank,
                                "nfe": int(decoded.nfe[j]), "rounds": int(decoded.rounds[j])})
            out.samples(records)
            print(f"{benchmark} {spec.name}: " + " ".join(f"{k} {100 * v:.2f}%" for k, v in report.pass_at_k.items())
                  + f", NFE {results[benchmark][spec.name]['nfe']:.1f} ({decoded.seconds:.1f} s decoding)")
    metrics = {"benchmarks": benchmarks, "samplers": [s.name for s in samplers], "k": args.k,
               "completions_per_task": n_samples, "pass_k": ks, "code_mapping": not args.no_code_mapping,
               "blank": describe_blank(args), "self_check": checks, "results": results}
    bar_chart(out.path("pass_at_k.png"), {f"pass@{k}": {b: {name: 100 * m[f"pass@{k}"] for name, m in by.items()}
                                                         for b, by in results.items()} for k in ks}, "% of tasks")
    check_table = [{"benchmark": b, "tasks": c["tasks"], "canonical pass": c["canonical_pass_rate"],
                    "empty pass": c["empty_pass_rate"], "blank round trip": c["blank_roundtrip_rate"]}
                   for b, c in checks.items()]
    table = [{"benchmark": b, "sampler": name, **{f"pass@{k} %": 100 * m[f"pass@{k}"] for k in ks},
              "NFE": m["nfe"], "tokens/round": m["tokens_per_round"], "blank tokens": m["blank_tokens"]}
             for b, by in results.items() for name, m in by.items()]
    summary = (f"Model `{args.model}`{f' (revision {args.revision})' if args.revision else ''}; code mapping "
               f"{'off' if args.no_code_mapping else 'on'}; {n_samples} completion(s) per task; blank = "
               f"{describe_blank(args)}; ASSD k = {args.k}, T = {args.temperature:g}.\n\n"
               f"Self-check (rates; expect canonical 1, empty 0, round trip 1 with the code mapping):\n\n"
               + markdown_table(check_table) + "\nResults (NFE per completion):\n\n" + markdown_table(table)
               + "\n![pass@k](pass_at_k.png)\n")
    return out.finish(metrics, summary)
