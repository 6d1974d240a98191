"""Speculative-decoding benchmark (the paper's protocol): sequential vs ASSD sampling of WikiText-2
test chunks with 95% of the tokens hidden, comparing NFE, wall-clock time, generative perplexity and
unigram entropy with paired tests.

Protocol: the text (WikiText-2 raw test from the data directory, else the Hub, or ``--text-file``)
is tokenized with the model's tokenizer and packed into consecutive chunks of ``--length`` tokens
the way the trainer packs its data (one document a line, ``</s>`` after each:
``asarm.eval.texts.packed_text``). Each chunk shows
``length - floor(length * (1 - start_fraction))`` random positions (26 of 512 in the paper) and the
rest is decoded left to right (``orders.any_subset``). Paired design: for each (sequence, trial) every
sampler gets the same order and the same per-row seed (``asarm.seeds.row_seeds``), so per-sample differences
are paired.

Timing: one untimed warm-up decode per sampler, ``torch.cuda.synchronize`` around each timed decode
on CUDA, and the sampler order rotated by one per (trial, batch) so no sampler always runs first.
A row's wall-clock time is its batch's time divided by the rows (batch size 1, the default, is the
paper's per-sample latency).

Quality: the decoded text (special tokens stripped, see ``asarm.eval.perplexity``) is scored by a
causal LM (``--ppl-model``, GPT-2 large by default; when it cannot be loaded the run goes on and
records null perplexities, with the reason among the run's warnings), and its unigram entropy (bits)
is taken over GPT-2 tokens.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .. import orders
from ..sampling import decode
from ..sampling.cost import timed
from ..sampling.spec import resolve_samplers
from ..seeds import row_seeds
from .arguments import load_model, samplers_from_args
from .commands import SPECULATIVE_SAMPLERS, check_speculative
from .markdown import markdown_table
from .plots import index_lines, label_bars
from .record import EvalRun
from .texts import WIKITEXT_TEST_FILE, packed_text
from .perplexity import decode_clean, entropy_tokenizer, try_load_causal_lm
from .stats import geometric_summary, paired_comparison, paired_ratio, significance, summarize, unigram_entropy

__all__ = ["run", "aggregate"]

BASELINE = "sequential"
# Per-sample metrics: record key -> table label.
METRICS = {"nfe": "NFE", "model_calls": "model calls", "model_free_draft_calls": "model-free draft calls",
           "rounds": "rounds",
           "tokens_per_round": "tokens/round", "tokens_per_call": "tokens/model call",
           "seconds": "wall-clock s", "gen_ppl": "gen. ppl", "entropy": "entropy (bits)"}
# Positive metrics summarised by their geometric mean with a log-scale interval, which stays positive.
LOG_SCALE_METRICS = ("seconds",)
PAIRED_METRICS = ("nfe", "seconds", "gen_ppl", "entropy")


def _order_seed(seed: int, trial: int) -> int:
    # Orders have their own generator per trial, drawn for all sequences at once, so they do not
    # depend on the batch size or the samplers.
    return (seed * 1_000_003 + trial) * 7_919 + 17


def _timed_decode(model, spec, tokens, sigma, n_visible, seeds, args) -> tuple[Any, float]:
    seconds, out = timed(model.device, lambda: decode(model, spec, tokens, sigma, n_visible, seed=seeds,
                                                      engine=args.engine))
    return out, seconds


def _records(out, spec, tokenizer, tokens, sigma, n_visible, items, trial, seeds, seconds, slot) -> list[dict]:
    decoded = out.tokens.cpu()
    rows = len(items)
    records = []
    for b, item in enumerate(items):
        prompt_positions = (sigma[b] < n_visible).nonzero().flatten()
        generated = int(out.settings["stop"][b] - out.settings["n_prompt"][b])
        ids = decoded[b].tolist()
        records.append({
            "sampler": spec.name, "trial": trial, "sequence": int(item), "seed": int(seeds[b]),
            "prompt_positions": prompt_positions.tolist(), "prompt_tokens": tokens[b, prompt_positions].tolist(),
            "generated_tokens": generated, "nfe": int(out.nfe[b]), "model_calls": int(out.nfe[b]),
            "model_free_draft_calls": int(out.model_free_draft_calls[b]), "rounds": int(out.rounds[b]),
            "accepted": int(out.accepted[b]),
            "tokens_per_round": float(out.tokens_per_round[b]), "tokens_per_call": float(out.tokens_per_call[b]),
            "bonus_tokens": None if out.bonus_tokens is None else int(out.bonus_tokens[b]),
            "draft_calls": None if out.draft_calls is None else int(out.draft_calls[b]),
            "drafted_by_index": None if out.drafted_by_index is None else out.drafted_by_index[b].tolist(),
            "accepted_by_index": None if out.accepted_by_index is None else out.accepted_by_index[b].tolist(),
            "seconds": seconds / rows, "batch_seconds": seconds, "batch_rows": rows, "run_slot": slot,
            "token_ids": ids, "text": decode_clean(tokenizer, ids), "gen_ppl": None, "entropy": None})
    return records


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _summary(values: Sequence[float | None], log_scale: bool = False) -> dict | None:
    """Mean and 95% CI of the values present; ``log_scale``: geometric mean, interval on the log scale."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    if log_scale:
        return {**geometric_summary(values), "scale": "log"}
    s = summarize(values)
    return {"n": s.n, "mean": s.mean, "std": _finite(s.std), "ci95": [_finite(s.ci95[0]), _finite(s.ci95[1])]}


def _paired(a: dict, b: dict, metric: str) -> dict:
    """Paired comparison of sampler ``a`` vs ``b`` (records keyed by (trial, sequence)) on ``metric``."""
    keys = [key for key in a if key in b and a[key][metric] is not None and b[key][metric] is not None]
    if len(keys) < 2:
        return {"n": len(keys), "skipped": f"{len(keys)} pair(s) with a {metric} value; paired tests need 2"}
    c = paired_comparison([a[key][metric] for key in keys], [b[key][metric] for key in keys])
    return {"n": c.n, "mean_a": c.mean_a, "mean_b": c.mean_b, "mean_diff": c.mean_diff,
            "ci95_diff": [_finite(c.ci95_diff[0]), _finite(c.ci95_diff[1])], "t_statistic": _finite(c.t_statistic),
            "t_pvalue": _finite(c.t_pvalue), "wilcoxon_statistic": _finite(c.wilcoxon_statistic),
            "wilcoxon_pvalue": _finite(c.wilcoxon_pvalue)}


def aggregate(records: Sequence[dict], samplers: Sequence[str], k: int) -> tuple[dict, dict]:
    """Per-sampler summaries (means with 95% CIs, acceptance by draft index, tokens per round) and
    paired tests of every other sampler against the sequential baseline."""
    by_sampler = {name: {(r["trial"], r["sequence"]): r for r in records if r["sampler"] == name} for name in samplers}
    per_sampler = {}
    for name, rows in by_sampler.items():
        rows = list(rows.values())
        entry: dict[str, Any] = {"n_samples": len(rows),
                                 "metrics": {m: _summary([r[m] for r in rows], m in LOG_SCALE_METRICS)
                                             for m in METRICS}}
        generated, rounds = sum(r["generated_tokens"] for r in rows), sum(r["rounds"] for r in rows)
        entry["tokens_per_round_pooled"] = generated / rounds if rounds else None
        calls = sum(r["model_calls"] for r in rows)
        entry["tokens_per_call_pooled"] = generated / calls if calls else None
        if rows and rows[0]["drafted_by_index"] is not None:
            drafted = [sum(r["drafted_by_index"][i] for r in rows) for i in range(k)]
            accepted = [sum(r["accepted_by_index"][i] for r in rows) for i in range(k)]
            entry.update(drafted_by_index=drafted, accepted_by_index=accepted,
                         acceptance_by_index=[a / d if d else None for a, d in zip(accepted, drafted)])
        per_sampler[name] = entry
    paired = {}
    if BASELINE in by_sampler:
        base = per_sampler[BASELINE]["metrics"]
        for name in samplers:
            if name == BASELINE:
                continue
            paired[f"{name} vs {BASELINE}"] = {m: _paired(by_sampler[name], by_sampler[BASELINE], m)
                                               for m in PAIRED_METRICS}
            mine = per_sampler[name]["metrics"]["nfe"]
            per_sampler[name]["speedup_nfe"] = base["nfe"]["mean"] / mine["mean"] if mine and mine["mean"] else None
            pairs = [key for key in by_sampler[name] if key in by_sampler[BASELINE]]
            per_sampler[name]["wallclock_ratio"] = paired_ratio(
                [by_sampler[BASELINE][key]["seconds"] for key in pairs],
                [by_sampler[name][key]["seconds"] for key in pairs]) if len(pairs) >= 2 else None
    return per_sampler, paired


def _with_interval(value: float, ci95, spec: str, note: str = "") -> str:
    """``value [lo, hi]note``, or the value alone when there is no interval."""
    lo, hi = ci95
    return format(value, spec) if lo is None else f"{value:{spec}} [{lo:{spec}}, {hi:{spec}}]{note}"


def _fmt(summary: dict | None) -> str:
    return "n/a" if summary is None else _with_interval(summary["mean"], summary["ci95"], ".4g")


def _fmt_ratio(ratio: dict | None) -> str:
    if ratio is None:
        return "n/a"
    return _with_interval(ratio["ratio"], ratio["ci95"], ".3g", "" if ratio["significant"] else " (not significant)")


def _fmt_number(value: float | None, spec: str = ".4g") -> str:
    return "n/a" if value is None else format(value, spec)


def _quality_line(perplexity: dict, entropy: dict) -> str:
    ppl = perplexity["model"] + ("" if perplexity["available"] else " (not computed, see Warnings)")
    tokens = entropy["tokenizer"] if entropy["available"] else "none (not computed, see Warnings)"
    return f"Generative perplexity: {ppl}; entropy tokens: {tokens}."


def _paired_rows(paired: dict) -> tuple[list[dict], list[str]]:
    """Table rows of the paired tests, each with its verdict, and lines for the comparisons not tested."""
    tests, skipped = [], []
    for comparison, metrics in paired.items():
        for metric, c in metrics.items():
            if "skipped" in c:
                skipped.append(f"- {comparison}, {METRICS[metric]}: not tested ({c['skipped']})")
                continue
            lo, hi = c["ci95_diff"]
            tests.append({"comparison": comparison, "metric": METRICS[metric], "pairs": c["n"],
                          "mean diff": f"{c['mean_diff']:.4g}",
                          "95% CI": "n/a" if lo is None else f"[{lo:.4g}, {hi:.4g}]",
                          "t": _fmt_number(c["t_statistic"]), "t-test p": _fmt_number(c["t_pvalue"]),
                          "Wilcoxon p": _fmt_number(c["wilcoxon_pvalue"]),
                          "verdict (5%)": significance(c["t_pvalue"], c["wilcoxon_pvalue"])})
    return tests, skipped


def _summary_markdown(settings: dict, per_sampler: dict, paired: dict, perplexity: dict, entropy: dict,
                      k: int) -> str:
    lines = [f"Model `{settings['model']}` on {settings['device']} ({settings['engine']} engine); text: "
             f"{settings['text_source']}.",
             f"{settings['num_sequences']} sequences x {settings['trials']} trial(s) of {settings['length']} tokens: "
             f"{settings['visible']} visible at random positions, {settings['generated']} decoded left to right; "
             f"k={k}, T={settings['temperature']}, batch size {settings['batch_size']}.",
             _quality_line(perplexity, entropy), "",
             "## Per sampler (mean [95% CI]; wall-clock: geometric mean, interval on the log scale)", ""]
    rows = [{"sampler": name, "n": entry["n_samples"], **{label: _fmt(entry["metrics"][m])
                                                           for m, label in METRICS.items()}}
            for name, entry in per_sampler.items()]
    lines.append(markdown_table(rows))
    speedups = [{"sampler": name, "NFE speed-up": _fmt_number(e.get("speedup_nfe")),
                 "wall-clock ratio [95% CI]": _fmt_ratio(e.get("wallclock_ratio")),
                 "tokens/round (pooled)": _fmt_number(e["tokens_per_round_pooled"]),
                 "tokens/model call (pooled)": _fmt_number(e["tokens_per_call_pooled"])}
                for name, e in per_sampler.items() if name != BASELINE]
    if speedups:
        lines += [f"## Versus {BASELINE} (NFE speed-up: ratio of means; wall-clock ratio: {BASELINE} time / sampler "
                  f"time, geometric mean of the paired ratios, t interval on the log scale; not significant: the "
                  f"interval holds 1)", "",
                  markdown_table(speedups)]
    acceptance = [{"sampler": name, **{f"draft {i + 1}": _fmt_number(rate, ".3f")
                                       for i, rate in enumerate(e["acceptance_by_index"])}}
                  for name, e in per_sampler.items() if "acceptance_by_index" in e]
    if acceptance:
        lines += ["## Acceptance rate by draft index (accepted / drafted, pooled over samples)", "",
                  markdown_table(acceptance)]
    tests, skipped = _paired_rows(paired)
    if tests or skipped:
        lines += [f"## Paired tests against {BASELINE} (two-sided; difference = sampler - {BASELINE}; verdict: "
                  f"significant when both p < 0.05, not significant when neither is)", ""]
        if tests:
            lines.append(markdown_table(tests))
        lines += skipped
    return "\n".join(lines) + "\n"


def _plots(run: EvalRun, per_sampler: dict) -> list[str]:
    """Bar charts of NFE and wall-clock per sampler (95% CI) and acceptance rate by draft index."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def bars(ax, metric: str, title: str) -> None:
        names = [n for n, e in per_sampler.items() if e["metrics"][metric] is not None]
        means = [per_sampler[n]["metrics"][metric]["mean"] for n in names]
        cis = [per_sampler[n]["metrics"][metric]["ci95"] for n in names]
        errors = [[m - lo if lo is not None else 0.0 for m, (lo, _) in zip(means, cis)],
                  [hi - m if hi is not None else 0.0 for m, (_, hi) in zip(means, cis)]]
        label_bars(ax, ax.bar(names, means, yerr=errors, capsize=4, color="tab:blue"), means)
        ax.set_title(title)
        ax.tick_params(axis="x", labelrotation=15)

    written = []
    fig = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(fig)
    ax_nfe, ax_time = fig.subplots(1, 2)
    bars(ax_nfe, "nfe", "NFE per sample (95% CI)")
    bars(ax_time, "seconds", "wall-clock s per sample (geo. mean, 95% CI)")
    fig.tight_layout()
    fig.savefig(run.path("nfe_wallclock.png"), dpi=120)
    written.append("nfe_wallclock.png")
    drafting = {n: e["acceptance_by_index"] for n, e in per_sampler.items() if "acceptance_by_index" in e}
    if drafting:
        fig = index_lines(drafting, "draft index", "acceptance rate", "ASSD acceptance by draft index")
        fig.savefig(run.path("acceptance_by_index.png"), dpi=120)
        written.append("acceptance_by_index.png")
    return written


def run(args: argparse.Namespace) -> dict:
    visible = check_speculative(args)
    specs = samplers_from_args(args)
    model = load_model(args)
    if args.samplers == SPECULATIVE_SAMPLERS and model.draft_head is not None:  # the default shows the model's head
        args.samplers = args.samplers.replace("assd-fused,", "assd-fused,assd-fused-head,")
        specs = samplers_from_args(args)
    specs = resolve_samplers(specs, model, args.model)
    progress = not args.no_progress
    source = args.text_file or WIKITEXT_TEST_FILE
    chunks = packed_text(model.tokenizer, args.length, args.text_file, args.num_sequences)
    num_sequences, length = chunks.shape
    print(f"speculative benchmark: {num_sequences} sequences x {args.trials} trial(s) of {length} tokens "
          f"({visible} visible), samplers {', '.join(s.name for s in specs)}, on {model.device}")

    run_dir = EvalRun("speculative", args)
    # Loaded before decoding so that a failure is reported at once, not after a long run.
    lm, ppl_reason = try_load_causal_lm(args.ppl_model, model.device, stride=args.ppl_stride,
                                        batch_size=args.ppl_batch_size)
    if lm is None:
        run_dir.warn(f"generative perplexity will not be computed: {ppl_reason} (--ppl-model takes a local model "
                     f"directory; --ppl-model none skips it)")
    entropy_tok, entropy_source = entropy_tokenizer(lm)
    if entropy_tok is None:
        run_dir.warn(f"unigram entropy will not be computed: {entropy_source}")
    sigmas = [orders.any_subset(visible, length, batch_size=num_sequences,
                                generator=torch.Generator().manual_seed(_order_seed(args.seed, trial)))
              for trial in range(args.trials)]
    jobs = [(trial, list(range(start, min(start + args.batch_size, num_sequences))))
            for trial in range(args.trials) for start in range(0, num_sequences, args.batch_size)]

    # Warm-up: lazy initialisation, allocator and kernel caches are paid outside the timed regions.
    trial, items = jobs[0]
    warmup, _ = timed(model.device, lambda: [decode(model, spec, chunks[items], sigmas[trial][items], visible,
                                                    seed=row_seeds(args.seed, trial, items), engine=args.engine)
                                             for spec in specs])
    print(f"estimated decoding time: about {warmup * len(jobs):.0f} s ({len(jobs)} batch(es) x the warm-up's "
          f"{warmup:.1f} s for all samplers)", flush=True)

    records: list[dict] = []
    for j, (trial, items) in enumerate(tqdm(jobs, desc="speculative", unit="batch", disable=not progress)):
        tokens, sigma = chunks[items], sigmas[trial][items]
        seeds = row_seeds(args.seed, trial, items)
        rotation = j % len(specs)
        for slot, spec in enumerate(specs[rotation:] + specs[:rotation]):
            out, seconds = _timed_decode(model, spec, tokens, sigma, visible, seeds, args)
            records += _records(out, spec, model.tokenizer, tokens, sigma, visible, items, trial, seeds, seconds,
                                slot)

    if lm is not None:
        for record, ppl in zip(records, lm.perplexities([r["text"] for r in records], progress=progress)):
            record["gen_ppl"] = ppl
    if entropy_tok is not None:
        for record in records:
            ids = entropy_tok(record["text"], add_special_tokens=False, verbose=False)["input_ids"]
            record["entropy"] = unigram_entropy(ids) if ids else None
    run_dir.samples(records)

    names = [s.name for s in specs]
    per_sampler, paired = aggregate(records, names, args.k)
    settings = {"model": args.model, "revision": args.revision, "device": str(model.device), "engine": args.engine,
                "text_source": source, "num_sequences": num_sequences, "trials": args.trials, "length": length,
                "start_fraction": args.start_fraction, "visible": visible, "generated": length - visible,
                "k": args.k, "temperature": args.temperature, "batch_size": args.batch_size, "samplers": names,
                "warmup": "one untimed decode per sampler",
                "sampler_order": "rotated by one per (trial, batch)"}
    perplexity = {"model": args.ppl_model, "available": lm is not None,
                  "max_length": lm.max_length if lm else None, "stride": lm.stride if lm else None}
    entropy = {"tokenizer": entropy_source if entropy_tok is not None else None, "available": entropy_tok is not None,
               "unit": "bits"}
    metrics = {"settings": settings, "samplers": per_sampler, "paired": paired, "perplexity": perplexity,
               "entropy": entropy}
    metrics["plots"] = _plots(run_dir, per_sampler)
    return run_dir.finish(metrics, _summary_markdown(settings, per_sampler, paired, perplexity, entropy, args.k))
