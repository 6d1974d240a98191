"""Sampling speed: full vs cached engine, sequential vs ASSD, batch 1 vs 16, side by side in one run.

Every configuration decodes the same prompts and orders (95% masked by default) for a fixed number of
generated tokens per row, after a warm-up decode, with device synchronisation. Prints tokens/s, the
cached/full ratio and the batch-16/batch-1 ratio, and appends a table to benchmarks/RESULTS.md with
the machine it ran on. A second process measures the peak memory of one base-size 512-token decode.

Token budgets: the full engine's cost per token does not depend on how far the decode is (every NFE
is a whole-sequence pass), so a few tokens measure it (``--full-tokens``, fewer at batch > 1). The
cached engine pays for the prompt once and then a little per token, so it is measured over more
tokens (``--tokens``, still far fewer than the 486 of a paper-length decode, so its rates are
conservative); ratios are tokens/s over tokens/s. A cached configuration takes a few seconds, so host
noise matters: it is timed ``--repeats`` times, interleaved with the other configurations, and its
fastest run counts. The cached engine's prompt encoding (prefill, one pass over every prompt) is also
timed alone, and the table adds the rate after it: over a 64-token window the prompt is a sizeable
share of the work, while a paper-length decode (486 tokens at L=512) runs at the after-prompt rate.

    python benchmarks/bench_sampling.py                       # xlnet-base sizes (random weights) + asarm-tiny
    python benchmarks/bench_sampling.py --model-dir DIR       # another trained model instead of asarm-tiny
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from asarm import orders
from asarm.eval.machine import machine_info
from asarm.model import ASARM, DEFAULT_MODEL, pick_device
from asarm.sampling import SAMPLERS
from asarm.sampling import decode as decode_spec
from asarm.sampling.engine import CachedEngine, FullEngine

RESULTS = Path(__file__).with_name("RESULTS.md")
BENCH_SAMPLERS = {"sequential": SAMPLERS["sequential"], "assd": SAMPLERS["assd-self"]}


def machine() -> str:
    info = machine_info()
    gpu = f", GPU {info['gpu']}" if "gpu" in info else ""
    load = f", load average {os.getloadavg()[0]:.1f} at the end" if hasattr(os, "getloadavg") else ""
    return (f"{info['cpu']}, {info['cpu_count']} cores, torch {info['torch']}, {info['torch_threads']} threads"
            f"{gpu}{load}")


def publish(text: str, write: bool = True) -> None:
    """Print a benchmark's report and, with ``write`` (no ``--no-write``), append it to benchmarks/RESULTS.md."""
    print(text)
    if write:
        with RESULTS.open("a") as f:
            f.write(text)
        print(f"appended to {RESULTS}")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_batch(model: ASARM, seq_len: int, batch_size: int, masking_rate: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(10, model.vocab_size, (batch_size, seq_len), generator=gen)
    n_prompt = orders.num_prompt_for_rate(masking_rate, torch.full((batch_size,), seq_len))
    sigma = orders.any_subset(n_prompt, seq_len, generator=gen)
    return tokens, sigma, n_prompt


def decode(model, engine, sampler: str, batch, tokens_per_row: int, k: int):
    tokens, sigma, n_prompt = batch
    return decode_spec(model, BENCH_SAMPLERS[sampler].replace(k=k), tokens, sigma, n_prompt, seed=0, engine=engine,
                       max_new_tokens=tokens_per_row)


def timed_decode(model, engine, sampler, batch, tokens_per_row, k, warm_up: bool) -> dict:
    device = model.device
    if warm_up:  # first-call costs (allocations, positional tables) stay out of the timing
        decode(model, engine, sampler, batch, min(tokens_per_row, 1 if engine.name == "full" else 2), k)
    sync(device)
    start = time.perf_counter()
    out = decode(model, engine, sampler, batch, tokens_per_row, k)
    sync(device)
    seconds = time.perf_counter() - start
    generated = int((out.settings["stop"] - out.settings["n_prompt"]).sum())
    result = {"seconds": seconds, "tokens": generated, "nfe_per_row": float(out.nfe.double().mean()),
              "tokens_per_round": float(out.tokens_per_round.mean()), "prefill_seconds": None}
    if engine.name == "cached":  # prompt encoding alone, as the decode's first call does it
        sync(device)
        start = time.perf_counter()
        engine.start(*batch).prefill()
        sync(device)
        result["prefill_seconds"] = time.perf_counter() - start
    return result


def best_of(runs: list[dict]) -> dict:
    """The fastest run; prefill and whole decode are minimised separately (host noise only slows down)."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["tokens_per_s"] = best["tokens"] / best["seconds"]
    best["decode_tokens_per_s"] = None
    if best["prefill_seconds"] is not None:
        best["prefill_seconds"] = min(r["prefill_seconds"] for r in runs)
        best["decode_tokens_per_s"] = best["tokens"] / (best["seconds"] - best["prefill_seconds"])
    return best


def memory_probe(seq_len: int, device: str | None) -> dict:
    """Peak memory of one base-size cached ASSD decode of ``seq_len`` tokens (run in a fresh process)."""
    model = ASARM.from_config(None, seed=0, device=device)
    dev = model.device
    batch = make_batch(model, seq_len, 1, 0.95, 0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out = decode(model, "cached", "assd", batch, seq_len, 5)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cache = 2 * model.config.n_layer * (seq_len + 1) * model.config.d_model * 4
    result = {"weights_mib": weights / 2**20, "cache_mib_per_sequence": cache / 2**20,
              "peak_rss_mib": peak / 1024, "rss_growth_during_decode_mib": (peak - before) / 1024,
              "generated": int(out.settings["stop"][0] - out.settings["n_prompt"][0])}
    if dev.type == "cuda":
        result["cuda_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--masking-rate", type=float, default=0.95)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64, help="generated tokens per row, cached engine")
    parser.add_argument("--full-tokens", type=int, default=8, help="generated tokens per row, full engine, batch 1")
    parser.add_argument("--full-batch-tokens", type=int, default=2,
                        help="generated tokens per row, full engine at batch > 1 (minutes per NFE on 2 CPU cores)")
    parser.add_argument("--full-batch-max-length", type=int, default=128,
                        help="skip the full engine at batch > 1 above this length (minutes per NFE on 2 CPU cores)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timed decodes per cached-engine configuration, interleaved, the fastest reported "
                             "(the full engine's runs last tens of seconds and are timed once)")
    parser.add_argument("--model-dir", default=DEFAULT_MODEL,
                        help="trained model benchmarked besides the base size (default: the embedded model)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory-probe", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args(argv)
    for name in ("repeats", "tokens", "full_tokens", "full_batch_tokens", "k"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.device)))
        return

    models = {"base (random weights)": ASARM.from_config(None, seed=0, device=pick_device(args.device)),
              args.model_dir: ASARM.from_pretrained(args.model_dir, device=args.device)}
    configs = []  # (key, model, engine, batch, tokens per row, timed runs)
    for model_name, model in models.items():
        engines = {"full": FullEngine(model), "cached": CachedEngine(model)}
        for seq_len in args.lengths:
            for batch_size in args.batch_sizes:
                batch = make_batch(model, seq_len, batch_size, args.masking_rate, seed=seq_len)
                for engine_name, engine in engines.items():
                    if engine_name == "full" and batch_size > 1 and seq_len > args.full_batch_max_length:
                        continue
                    budget = args.tokens if engine_name == "cached" else \
                        args.full_tokens if batch_size == 1 else args.full_batch_tokens
                    for sampler in ("sequential", "assd"):
                        key = {"model": model_name, "L": seq_len, "B": batch_size, "engine": engine_name,
                               "sampler": sampler}
                        configs.append((key, model, engine, batch, budget,
                                        args.repeats if engine_name == "cached" else 1))

    # Repeats are interleaved (every configuration once, then again) so that a slow spell of the host
    # does not hit all runs of one configuration; each configuration keeps its fastest run.
    runs = {}
    for run in range(args.repeats):
        for key, model, engine, batch, budget, repeats in configs:
            if run >= repeats:
                continue
            result = timed_decode(model, engine, key["sampler"], batch, budget, args.k, warm_up=run == 0)
            runs.setdefault(tuple(key.values()), (key, []))[1].append(result)
            prefill = f", prefill {result['prefill_seconds']:.2f} s" if result["prefill_seconds"] is not None else ""
            print(f"run {run + 1}: {key['model']:24s} L={key['L']:4d} B={key['B']:2d} {key['engine']:6s} "
                  f"{key['sampler']:10s} {result['tokens'] / result['seconds']:9.2f} tok/s  ({result['tokens']} "
                  f"tokens, {result['seconds']:.1f} s{prefill}, {result['tokens_per_round']:.2f} tok/round)",
                  flush=True)
    rows = [{**key, **best_of(results)} for key, results in runs.values()]

    def find(**key):
        return next((r for r in rows if all(r[k] == v for k, v in key.items())), None)

    ratios = []
    for r in rows:
        if r["engine"] == "cached":
            full = find(model=r["model"], L=r["L"], B=r["B"], sampler=r["sampler"], engine="full")
            b1 = find(model=r["model"], L=r["L"], B=1, sampler=r["sampler"], engine="cached")
            ratios.append({**{k: r[k] for k in ("model", "L", "B", "sampler")},
                           "full_tokens_per_s": full["tokens_per_s"] if full else None,
                           "cached_tokens_per_s": r["tokens_per_s"],
                           "cached_over_full": r["tokens_per_s"] / full["tokens_per_s"] if full else None,
                           "batch_over_b1": r["tokens_per_s"] / b1["tokens_per_s"] if r["B"] > 1 else None,
                           "prefill_seconds": r["prefill_seconds"],
                           "decode_tokens_per_s": r["decode_tokens_per_s"],
                           "decode_batch_over_b1": r["decode_tokens_per_s"] / b1["decode_tokens_per_s"]
                           if r["B"] > 1 else None})
    print("\nratios (tokens/s): cached / full at the same batch; batch B / batch 1 for the cached engine, "
          "whole decode and decode after the prompt encoding")
    for q in ratios:
        c = f"{q['cached_over_full']:6.1f}x" if q["cached_over_full"] else "     -"
        b = f"{q['batch_over_b1']:6.1f}x" if q["batch_over_b1"] else "     -"
        d = f"{q['decode_batch_over_b1']:6.1f}x" if q["decode_batch_over_b1"] else "     -"
        print(f"{q['model']:24s} L={q['L']:4d} B={q['B']:2d} {q['sampler']:10s} cached/full {c}  B/B1 {b}  "
              f"after prompt B/B1 {d}")

    probe = subprocess.run([sys.executable, __file__, "--memory-probe", str(max(args.lengths))]
                           + (["--device", args.device] if args.device else [])
                           + (["--threads", str(args.threads)] if args.threads else []),
                           capture_output=True, text=True, check=True)
    memory = json.loads(probe.stdout.strip().splitlines()[-1])
    print(f"\nmemory of one base-size {max(args.lengths)}-token cached ASSD decode: {memory}")
    if not args.no_write:
        write_results(args, ratios, memory)


def write_results(args, ratios, memory) -> None:
    def cell(value, fmt):
        return fmt % value if value is not None else "-"

    lines = [f"\n## bench_sampling.py, {time.strftime('%Y-%m-%d %H:%M')}",
             f"Machine: {machine()}. Masking rate {args.masking_rate}, k={args.k}, self-draft ASSD, "
             f"any-subset orders; tokens/s after a warm-up over {args.tokens} generated tokens per row (cached "
             f"engine, fastest of {args.repeats} interleaved runs), {args.full_tokens} (full engine, batch 1) and "
             f"{args.full_batch_tokens} (full engine, batch > 1; skipped above L={args.full_batch_max_length}: "
             "'-'). Batch rows: tokens/s of all rows. Prefill: the cached engine's prompt encoding, timed alone; "
             "'after prompt': tokens/s of the decode without it (the rate of any longer decode).",
             "", "| model | L | B | sampler | full tok/s | cached tok/s | cached/full | cached B/B1 | prefill s "
             "| after prompt tok/s | after prompt B/B1 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for q in ratios:
        full = cell(q["full_tokens_per_s"], "%.2f")
        lines.append(f"| {q['model']} | {q['L']} | {q['B']} | {q['sampler']} | {full} "
                     f"| {q['cached_tokens_per_s']:.2f} | {cell(q['cached_over_full'], '%.1fx')} "
                     f"| {cell(q['batch_over_b1'], '%.1fx')} | {q['prefill_seconds']:.2f} "
                     f"| {q['decode_tokens_per_s']:.2f} | {cell(q['decode_batch_over_b1'], '%.1fx')} |")
    lines += ["", f"Peak memory, one base-size {max(args.lengths)}-token cached ASSD decode (batch 1): "
              f"weights {memory['weights_mib']:.0f} MiB, KV cache {memory['cache_mib_per_sequence']:.1f} MiB per "
              f"sequence (2 x layers x (L+1) x d_model float32), peak process RSS {memory['peak_rss_mib']:.0f} MiB"
              + (f", CUDA peak {memory['cuda_peak_allocated_mib']:.0f} MiB" if "cuda_peak_allocated_mib" in memory
                 else "") + "."]
    with RESULTS.open("a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
