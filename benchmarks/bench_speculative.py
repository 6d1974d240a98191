"""Speculative decoding against cached sequential decoding, side by side in one run.

Protocol (the paper's, at small sizes): WikiText-2 raw test packed into chunks of L tokens the way the
trainer packs (``runner.packed_text``), 95% of each chunk hidden (``any_subset`` orders: the visible
positions at random, the rest decoded left to right), k drafts, T = 1. Every sampler decodes the same
chunks with the same orders and per-row seeds, on the cached engine. Samplers: sequential, ASSD
(draft call + verify call), ASSD with the bonus row, single-pass ASSD (``assd-fused``; all outcomes,
and only the first two), each with and without the adaptive draft length.

Reported per (model, L, batch): tokens per model call (generated / NFE), accepted drafts per round,
acceptance by draft index, tokens/s (fastest of ``--repeats`` runs, samplers rotated between runs, one
untimed warm-up each) and the ratio to cached sequential decoding. Batch 1 decodes the chunks one at a
time; batch B decodes B chunks together. The xlnet-base-sized random model is for speed only (its
drafts are accepted at random-weight rates).

A second table times one cached-engine call against its numbers of query rows and new content rows
(the curve that decides how many rows a call can afford); the defaults of ``assd-fused`` were chosen
from it. Results are appended to benchmarks/RESULTS.md with the machine.

    python benchmarks/bench_speculative.py                          # everything (about 13 min on 2 cores)
    python benchmarks/bench_speculative.py --configs tiny:128:1      # one configuration
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from asarm import orders
from asarm.eval import runner
from asarm.model import ASARM, DEFAULT_MODEL

sys.path.insert(0, str(Path(__file__).parent))
from bench_sampling import machine, sync  # noqa: E402

RESULTS = Path(__file__).with_name("RESULTS.md")
DEFAULT_CONFIGS = "tiny:128:1,tiny:128:16,tiny:512:1,tiny:512:16,base:128:1,base:128:16"
BASE_SAMPLERS = ("sequential", "assd-self", "assd-bonus", "assd-fused", "assd-fused-2outcomes")


def samplers(threshold: float, k: int) -> dict[str, tuple[runner.SamplerSpec, int]]:
    """name -> (spec, drafts per round). Single-pass rounds also run with fewer drafts (k = 3) and fewer
    outcomes: their call holds about k * (k + 1) rows, and drafts far past the first are rarely accepted."""
    specs = runner.available_samplers()
    chosen = {name: (specs[name], k) for name in ("sequential", "assd-self", "assd-bonus")}
    chosen["assd-fused"] = (replace(specs["assd-fused"], outcomes="all"), k)
    chosen["assd-fused-2outcomes"] = (replace(specs["assd-fused"], name="assd-fused-2outcomes", outcomes=2), k)
    chosen["assd-fused-k3"] = (replace(specs["assd-fused"], name="assd-fused-k3", outcomes="all"), 3)
    chosen["assd-fused-k3-2outcomes"] = (replace(specs["assd-fused"], name="assd-fused-k3-2outcomes", outcomes=2), 3)
    for name in ("assd-self", "assd-bonus", "assd-fused"):
        chosen[f"{name}-adaptive"] = (replace(specs[f"{name}-adaptive"], draft_length=threshold), k)
    chosen["assd-fused-adaptive"] = (replace(chosen["assd-fused-adaptive"][0], outcomes="all"), k)
    chosen["assd-fused-k3-adaptive"] = (replace(specs["assd-fused-adaptive"], name="assd-fused-k3-adaptive",
                                                draft_length=threshold, outcomes="all"), 3)
    return chosen


def chunks_and_orders(tokenizer, seq_len: int, count: int, seed: int):
    chunks = runner.packed_text(tokenizer, seq_len, None, count)
    visible = int(orders.num_prompt_for_rate(0.95, seq_len))
    sigma = orders.any_subset(visible, seq_len, batch_size=chunks.shape[0], generator=torch.Generator().manual_seed(seed))
    return chunks, sigma, visible


def run_sampler(model, spec, chunks, sigma, visible, batch_size, k, max_new_tokens):
    """Decode every chunk (``batch_size`` at a time); returns totals over all rows."""
    totals = {"seconds": 0.0, "generated": 0, "nfe": 0, "rounds": 0, "accepted": 0, "drafted_by_index": torch.zeros(k),
              "accepted_by_index": torch.zeros(k), "k": k}
    for start in range(0, chunks.shape[0], batch_size):
        rows = slice(start, start + batch_size)
        seeds = torch.arange(start, min(start + batch_size, chunks.shape[0]))
        sync(model.device)
        began = time.perf_counter()
        out = runner.decode(model, spec, chunks[rows], sigma[rows], visible, seeds=seeds, k=k,
                            max_new_tokens=max_new_tokens)
        sync(model.device)
        totals["seconds"] += time.perf_counter() - began
        totals["generated"] += int((out.settings["stop"] - out.settings["n_prompt"]).sum())
        totals["nfe"] += int(out.nfe.sum())
        totals["rounds"] += int(out.rounds.sum())
        totals["accepted"] += int(out.accepted.sum())
        if out.drafted_by_index is not None:
            totals["drafted_by_index"] += out.drafted_by_index.sum(0)
            totals["accepted_by_index"] += out.accepted_by_index.sum(0)
    return totals


def bench_config(model, label, seq_len, batch_size, specs, args) -> list[dict]:
    count = max(2, args.sequences_b1 * 128 // seq_len) if batch_size == 1 else batch_size
    count = 2 if label == "base" and batch_size == 1 else count
    chunks, sigma, visible = chunks_and_orders(model.tokenizer, seq_len, count, args.seed)
    max_new = args.base_tokens if label == "base" else (args.batch_tokens if batch_size > 1 and seq_len > 128 else None)
    names = [name for name in specs if label != "base" or name in BASE_SAMPLERS]
    for name in names:  # warm-up
        spec, k = specs[name]
        runner.decode(model, spec, chunks[:batch_size], sigma[:batch_size], visible, seeds=0, k=k, max_new_tokens=4)
    runs = {name: [] for name in names}
    for repeat in range(args.repeats):
        rotated = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in rotated:
            runs[name].append(run_sampler(model, *specs[name][:1], chunks, sigma, visible, batch_size, specs[name][1],
                                          max_new))
    rows = []
    base_rate = None
    for name in names:
        best = min(runs[name], key=lambda r: r["seconds"])
        rate = best["generated"] / best["seconds"]
        base_rate = rate if name == "sequential" else base_rate
        drafted, accepted = best["drafted_by_index"], best["accepted_by_index"]
        rows.append({"model": label, "L": seq_len, "B": batch_size, "sampler": name, "k": best["k"],
                     "tokens/call": best["generated"] / best["nfe"],
                     "accepted/round": best["accepted"] / best["rounds"] if name != "sequential" else "-",
                     "acceptance by index": " ".join(f"{a / d:.2f}" if d else "-" for a, d in
                                                     zip(accepted.tolist(), drafted.tolist()))
                     if name != "sequential" else "-",
                     "tok/s": rate, "vs sequential": rate / base_rate})
        print(f"{label} L={seq_len} B={batch_size} {name}: {rows[-1]['tokens/call']:.3f} tokens/call, "
              f"{rate:.1f} tok/s, {rate / base_rate:.2f}x sequential", flush=True)
    return rows


def call_curve(model, seq_len: int, batch_size: int, repeats: int) -> list[dict]:
    """Seconds of one cached call with q query rows and c new content rows (after the prompt is cached)."""
    engine = runner.ENGINES["cached"](model)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, model.vocab_size, (batch_size, seq_len), generator=gen)
    visible = int(orders.num_prompt_for_rate(0.95, seq_len))
    sigma = orders.any_subset(visible, seq_len, batch_size=batch_size, generator=gen)
    rows, results = torch.arange(batch_size), []
    for content in (1, 5, 10):
        for queries in (1, 2, 4, 8, 16, 32, 64):
            times = []
            for _ in range(repeats):
                session = engine.start(tokens, sigma, torch.full((batch_size,), visible))
                session.prefill()
                n_fixed = torch.full((batch_size,), visible + content)  # ranks visible.. become content rows
                ranks = n_fixed[:, None] + torch.arange(queries)
                limits = n_fixed[:, None].expand_as(ranks).clone()
                session.logits(rows, tokens, torch.full((batch_size,), visible), ranks[:, :1] * 0 + visible,
                               draft=True)  # warm: the prompt states and the first-call costs
                sync(model.device)
                began = time.perf_counter()
                session.logits(rows, tokens, n_fixed, ranks, limits=limits)
                sync(model.device)
                times.append(time.perf_counter() - began)
            results.append({"L": seq_len, "B": batch_size, "content rows": content, "query rows": queries,
                            "ms per call": 1000 * min(times)})
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="model:L:batch, comma-separated (model: tiny | base)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the trained model of the 'tiny' configurations")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--sequences-b1", type=int, default=8,
                   help="chunks decoded one at a time at batch 1 at L=128 (fewer at longer L, at least 2)")
    p.add_argument("--batch-tokens", type=int, default=128, help="tokens per row at batch > 1 for L > 128")
    p.add_argument("--base-tokens", type=int, default=24, help="tokens per row on the base-sized model")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--adaptive-threshold", type=float, default=runner.DEFAULT_ADAPTIVE_THRESHOLD)
    p.add_argument("--no-curve", action="store_true", help="skip the call-time curve")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args(argv)
    for option in ("k", "sequences_b1", "base_tokens", "batch_tokens", "repeats"):
        if getattr(args, option) < 1:
            p.error(f"--{option.replace('_', '-')} must be >= 1")
    configs = []
    for item in args.configs.split(","):
        try:
            label, length, batch = item.split(":")
            configs.append((label, int(length), int(batch)))
        except ValueError:
            p.error(f"bad configuration {item!r}: expected model:L:batch, e.g. tiny:128:1")
        if label not in ("tiny", "base"):
            p.error(f"bad configuration {item!r}: model must be tiny or base")
    tiny = ASARM.from_pretrained(args.model, device="cpu" if not torch.cuda.is_available() else None)
    models = {"tiny": tiny}
    if any(label == "base" for label, _, _ in configs):
        models["base"] = ASARM.from_config(None, tokenizer=None, seed=0, device=tiny.device)
        models["base"].tokenizer = tiny.tokenizer
    specs = samplers(args.adaptive_threshold, args.k)
    rows = []
    for label, length, batch in configs:
        rows += bench_config(models[label], label, length, batch, specs, args)
    curve = [] if args.no_curve else [dict(r, model="tiny") for r in call_curve(tiny, 128, 1, 5)]
    if not args.no_curve and "base" in models:
        curve += [dict(r, model="base") for r in call_curve(models["base"], 128, 1, 3)]
    table = runner.markdown_table([{key: (f"{value:.3g}" if isinstance(value, float) else value)
                                    for key, value in row.items()} for row in rows])
    text = (f"\n## bench_speculative.py, {time.strftime('%Y-%m-%d %H:%M')}\nMachine: {machine()}. WikiText-2 test "
            f"chunks, 95% masked (any-subset orders), k={args.k}, T=1, cached engine, the same chunks, orders "
            f"and seeds for every sampler; batch 1: {args.sequences_b1} chunks one at a time at L=128 (2 at L=512); "
            f"batch > 1 at L > 128: {args.batch_tokens} tokens per row; base-sized model (random weights, speed "
            f"only, samplers {', '.join(BASE_SAMPLERS)}): {args.base_tokens} tokens per row; adaptive threshold "
            f"{args.adaptive_threshold}; tok/s: fastest of {args.repeats} rotated runs after a warm-up.\n\n{table}\n")
    if curve:
        text += ("\nOne cached call (batch 1, L=128, prompt cached): milliseconds against query rows and new "
                 "content rows (fastest of 5 for asarm-tiny, 3 for the base-sized model).\n\n"
                 + runner.markdown_table([{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()}
                                          for r in curve]) + "\n")
    print(text)
    if not args.no_write:
        with RESULTS.open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
