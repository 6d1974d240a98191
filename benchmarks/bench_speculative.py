"""Speculative decoding against cached sequential decoding, side by side in one run.

Protocol (the paper's, at small sizes): WikiText-2 raw test packed into chunks of L tokens the way the
trainer packs (``asarm.eval.texts.packed_text``), 95% of each chunk hidden (``any_subset`` orders: the visible
positions at random, the rest decoded left to right), T = 1. Every sampler decodes the same chunks with
the same orders and per-row seeds, on the cached engine. Samplers: sequential; two-call ASSD
(``assd-self``) and ASSD with the bonus row (``assd-bonus``) at k = 5 (the paper's); single-pass ASSD
(``assd-fused``) at k = 1, 2, 3, 5, and at k = 1 with flattened drafts (``-ratio1.5``: the effect of
``draft_temperature_ratio``); the adaptive draft length on each schedule.

Reported per (model, L, batch): tokens per model call (generated / NFE), accepted drafts per round (the
mean accepted length), acceptance by draft index, tokens/s and the ratio to cached sequential decoding, and the
milliseconds of a model call (for assd-auto also the cost model's prediction). The draft head runs in the
device's default dtype (asarm.sampling.drafters.proposal_dtype), and in float32 beside it (``-float32``).
Timing alternates the samplers chunk by chunk (rotating their order), after one untimed warm-up each;
each chunk's time is the fastest of ``--repeats``, and tok/s = tokens / the sum of those times, so
slow spells of a noisy machine hit every sampler alike. Batch 1 decodes the chunks one at a time; batch
B decodes B chunks together. The xlnet-base-sized random model is for speed only (its drafts are
accepted at random-weight rates).

A second table times one cached-engine call against its numbers of query rows and new content rows
(the curve that decides how many rows a call can afford): sessions step through a chunk side by side,
and each cell is the median over the steps. The defaults of ``assd-fused`` were chosen from these tables.
Results are appended to benchmarks/RESULTS.md with the machine.

    python benchmarks/bench_speculative.py                          # everything (about 15 min on 2 cores)
    python benchmarks/bench_speculative.py --configs tiny:128:1      # one configuration
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from asarm import orders
from asarm.eval.markdown import markdown_table
from asarm.model import ASARM, DEFAULT_MODEL
from asarm.resources import load_average, load_warning
from asarm.sampling import ENGINES, SAMPLERS, SamplerSpec, decode
from asarm.sampling.drafters import HeadDrafter
from asarm.eval.sampler_defaults import benchmark_decodes, current_defaults
from asarm.sampling.spec import parse_choices

sys.path.insert(0, str(Path(__file__).parent))
from bench_sampling import machine, publish, sync  # noqa: E402

DEFAULT_CONFIGS = ",".join(f"tiny:{length}:{batch}" for length in (128, 512) for batch in (1, 4, 16, 64))
# name -> (registry sampler, k, other settings); the paper's k = 5 for two-call ASSD
CONTENDERS = {
    "sequential": ("sequential", 5, {}),
    "assd-self": ("assd-self", 5, {}),
    "assd-paper": ("assd-paper", 5, {}),  # the paper's settings: self drafts at the target temperature
    "assd-bonus": ("assd-bonus", 5, {}),
    "assd-fused-k1": ("assd-fused", 1, {}),
    "assd-fused-k1-ratio1.5": ("assd-fused", 1, {"draft_temperature_ratio": 1.5}),
    "assd-fused-k2": ("assd-fused", 2, {}),
    "assd-fused-k3": ("assd-fused", 3, {}),
    "assd-fused-k5": ("assd-fused", 5, {}),
    "assd-self-adaptive": ("assd-self-adaptive", 5, {}),
    "assd-bonus-adaptive": ("assd-bonus-adaptive", 5, {}),
    "assd-fused-k2-adaptive": ("assd-fused-adaptive", 2, {}),
    "assd-fused-k5-adaptive": ("assd-fused-adaptive", 5, {}),
    # the model's chained draft head (asarm.draft_head), when it ships one; single-pass rounds cover every
    # outcome by default with it (-outcomes2: the all-accepted outcome and the earliest rejection only;
    # -outcomes1: the all-accepted outcome only)
    "assd-head": ("assd-head", 5, {}),
    "assd-fused-head-k1": ("assd-fused-head", 1, {}),
    "assd-fused-head-k2": ("assd-fused-head", 2, {}),
    "assd-fused-head-k3": ("assd-fused-head", 3, {}),
    "assd-fused-head-k5": ("assd-fused-head", 5, {}),
    "assd-fused-head-k2-outcomes1": ("assd-fused-head", 2, {"outcomes": 1}),
    "assd-fused-head-k2-outcomes2": ("assd-fused-head", 2, {"outcomes": 2}),
    "assd-fused-head-k3-outcomes2": ("assd-fused-head", 3, {"outcomes": 2}),
    "assd-fused-head-k5-outcomes2": ("assd-fused-head", 5, {"outcomes": 2}),
    "assd-fused-head-k3-ratio1.5": ("assd-fused-head", 3, {"draft_temperature_ratio": 1.5}),
    "assd-fused-head-k3-adaptive": ("assd-fused-head-adaptive", 3, {}),
    # goodput-aware single-pass ASSD: drafts per call (0..k) and outcomes chosen from the cost model
    "assd-auto": ("assd-auto", 5, {}),
    "assd-auto-learn": ("assd-auto", 5, {"learn_prices": True}),  # prices corrected by the decode's own calls
    # the draft head in float32 (the model's dtype), against the device's default (float16 on an AVX2 CPU)
    "assd-fused-head-k3-float32": ("assd-fused-head", 3, {"proposal_dtype": "float32"}),
    "assd-auto-float32": ("assd-auto", 5, {"proposal_dtype": "float32"}),
}
# the default contenders: sequential, assd-auto, the fixed settings that won somewhere in earlier runs, and the
# draft head in float32 beside its default dtype
GRID_SAMPLERS = ("sequential", "assd-fused-k1", "assd-fused-head-k2", "assd-fused-head-k3", "assd-fused-head-k5",
                 "assd-fused-head-k2-outcomes1", "assd-fused-head-k3-outcomes2", "assd-auto",
                 "assd-fused-head-k3-float32", "assd-auto-float32")
BASE_SAMPLERS = ("sequential", "assd-self", "assd-bonus", "assd-fused-k1", "assd-fused-k2", "assd-fused-k5")


def samplers(threshold: float | None) -> dict[str, SamplerSpec]:
    """Contender name -> spec (its registry sampler with the contender's k and settings; the adaptive ones at
    ``threshold``, None: the model's default)."""
    chosen = {}
    for name, (base, k, overrides) in CONTENDERS.items():
        spec = SAMPLERS[base].replace(k=k, **overrides)
        adaptive = spec.draft_length is not None and threshold is not None
        chosen[name] = spec.replace(draft_length=threshold) if adaptive else spec
    return chosen


def timed_decode(model, spec, chunks, sigma, visible, rows: slice, max_new_tokens):
    """One decode of the chunks ``rows`` (per-row seeds = chunk indices): (seconds, output)."""
    seeds = torch.arange(rows.start, rows.stop)
    sync(model.device)
    began = time.perf_counter()
    out = decode(model, spec, chunks[rows], sigma[rows], visible, seed=seeds, max_new_tokens=max_new_tokens)
    sync(model.device)
    return time.perf_counter() - began, out


def bench_config(model, label, seq_len, batch_size, specs, args) -> list[dict]:
    count = max(2, args.sequences_b1 * 128 // seq_len) if batch_size == 1 else batch_size
    count = 2 if label == "base" and batch_size == 1 else count
    chunks, sigma, visible = benchmark_decodes(model.tokenizer, seq_len, count, args.seed)
    max_new = args.base_tokens if label == "base" else (args.batch_tokens if batch_size > 1 and seq_len > 128 else None)
    names = [name for name in specs if label != "base" or name in BASE_SAMPLERS]
    groups = [slice(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    for name in names:  # warm-up (assd-auto: a whole decode, whose profile the timed decodes then reuse)
        warm_tokens = max_new if specs[name].controller == "auto" else 4
        timed_decode(model, specs[name], chunks, sigma, visible, slice(0, batch_size), warm_tokens)
    fastest = {(name, g): float("inf") for name in names for g in range(len(groups))}
    outputs = {}
    for repeat in range(args.repeats):
        for g, rows in enumerate(groups):
            shift = (repeat * len(groups) + g) % len(names)
            for name in names[shift:] + names[:shift]:
                seconds, outputs[name, g] = timed_decode(model, specs[name], chunks, sigma, visible, rows, max_new)
                fastest[name, g] = min(fastest[name, g], seconds)
    rows, base_rate = [], None
    for name in names:
        k = specs[name].k
        outs = [outputs[name, g] for g in range(len(groups))]
        generated = sum(int((o.settings["stop"] - o.settings["n_prompt"]).sum()) for o in outs)
        nfe, rounds = sum(int(o.nfe.sum()) for o in outs), sum(int(o.rounds.sum()) for o in outs)
        rate = generated / sum(fastest[name, g] for g in range(len(groups)))
        base_rate = rate if name == "sequential" else base_rate
        row = {"model": label, "L": seq_len, "B": batch_size, "sampler": name,
               "k": k if name != "sequential" else "-", "tokens/call": generated / nfe,
               "accepted/round": "-", "acceptance by index": "-", "tok/s": rate, "vs sequential": rate / base_rate,
               "drafts/call": "-", "ms/call predicted": "-", "ms/call measured": "-"}
        if name != "sequential":
            drafted = sum(o.drafted_by_index.sum(0) for o in outs)
            accepted = sum(o.accepted_by_index.sum(0) for o in outs)
            row["accepted/round"] = sum(int(o.accepted.sum()) for o in outs) / rounds
            row["acceptance by index"] = " ".join(f"{a / d:.2f}" if d else "-"
                                                  for a, d in zip(accepted.tolist(), drafted.tolist()))
        # model calls of a batch: single-pass calls hold every active row, so the row with the most calls has been
        # in all of them (assd-auto's schedule lists them)
        calls = sum(len(o.schedule) if o.schedule is not None else int(o.nfe.max()) for o in outs)
        row["ms/call measured"] = 1000 * sum(fastest[name, g] for g in range(len(groups))) / calls
        if outs[0].schedule is not None:  # assd-auto: the cost model's time per call against the measured one
            row["ms/call predicted"] = 1000 * sum(c["predicted_seconds"] for o in outs for c in o.schedule) / calls
            row["drafts/call"] = sum(sum(c["drafts"]) / len(c["drafts"]) for o in outs for c in o.schedule) / calls
        rows.append(row)
        print(f"{label} L={seq_len} B={batch_size} {name}: {row['tokens/call']:.3f} tokens/call, "
              f"{rate:.1f} tok/s, {rate / base_rate:.2f}x sequential", flush=True)
    return rows


def call_curve(model, seq_len: int, batch_size: int, steps: int) -> list[dict]:
    """Seconds of one cached call that commits ``content`` new ranks and queries ``queries`` rows (limits
    one past the committed prefix, as single-pass rows have): one session per cell, the sessions stepping
    through the same chunk side by side, the median over ``steps`` calls per cell."""
    engine = ENGINES["cached"](model)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(10, model.vocab_size, (batch_size, seq_len), generator=gen)
    visible = int(orders.num_prompt_for_rate(0.95, seq_len))
    sigma = orders.any_subset(visible, seq_len, batch_size=batch_size, generator=gen)
    rows = torch.arange(batch_size)
    cells = [(content, queries) for content in (1, 2, 5) for queries in (1, 2, 4, 8, 16, 32)]
    sessions, times = {}, {cell: [] for cell in cells}
    for cell in cells:
        sessions[cell] = engine.start(tokens, sigma, torch.full((batch_size,), visible))
        sessions[cell].prefill()
    for step in range(steps):
        for content, queries in cells:
            n = visible + (step + 1) * content
            if n + queries + 1 >= seq_len:
                continue
            n_fixed = torch.full((batch_size,), n)
            ranks = n_fixed[:, None] + torch.arange(queries)
            sync(model.device)
            began = time.perf_counter()
            limits = torch.minimum(ranks, n_fixed[:, None] + 1)
            sessions[content, queries].logits(rows, tokens, n_fixed, ranks, limits=limits)
            sync(model.device)
            times[content, queries].append(time.perf_counter() - began)
    return [{"L": seq_len, "B": batch_size, "content rows": content, "query rows": queries,
             "ms per call": 1000 * statistics.median(times[content, queries]), "calls": len(times[content, queries])}
            for content, queries in cells if times[content, queries]]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help="model:L:batch, comma-separated (model: tiny | base)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="the trained model of the 'tiny' configurations")
    p.add_argument("--sequences-b1", type=int, default=8,
                   help="chunks decoded one at a time at batch 1 at L=128 (fewer at longer L, at least 2)")
    p.add_argument("--batch-tokens", type=int, default=128, help="tokens per row at batch > 1 for L > 128")
    p.add_argument("--base-tokens", type=int, default=24, help="tokens per row on the base-sized model")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each chunk per sampler (the fastest counts)")
    p.add_argument("--samplers", default=",".join(GRID_SAMPLERS),
                   help=f"comma-separated, from {', '.join(CONTENDERS)} (default: %(default)s)")
    p.add_argument("--adaptive-threshold", type=float, default=None,
                   help="the *-adaptive samplers' threshold (default: the model's sampler default)")
    p.add_argument("--no-curve", action="store_true", help="skip the call-time curve")
    p.add_argument("--variant-head", default=None,
                   help="a model directory whose draft head the head samplers also run with (as NAME-variant)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args(argv)
    for option in ("sequences_b1", "base_tokens", "batch_tokens", "repeats"):
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
    try:
        chosen = parse_choices(args.samplers, CONTENDERS, "sampler")
    except ValueError as error:
        p.error(str(error))
    if "sequential" not in chosen:
        p.error("--samplers must include sequential (the ratios are to it)")
    if tiny.draft_head is None and any("head" in name for name in chosen):
        print(f"{args.model} has no draft head: the head samplers are left out", flush=True)
        chosen = [name for name in chosen if "head" not in name]
    specs = {name: spec for name, spec in samplers(args.adaptive_threshold).items() if name in chosen}
    if args.variant_head is not None:  # the head samplers again with another head (a variant saved with a model)
        variant = ASARM.from_pretrained(args.variant_head, device=tiny.device).draft_head
        if variant is None:
            p.error(f"--variant-head {args.variant_head} has no draft head")
        specs |= {f"{name}-variant": spec.replace(drafter=HeadDrafter(variant)) for name, spec in list(specs.items())
                  if spec.algorithm == "assd" and spec.drafter in ("head", "auto")}
    load_at_start = load_average()
    rows = []
    for label, length, batch in configs:
        rows += bench_config(models[label], label, length, batch, specs, args)
    curve = [] if args.no_curve else [dict(r, model="tiny") for r in call_curve(tiny, 128, 1, 24)]
    if not args.no_curve and "base" in models:
        curve += [dict(r, model="base") for r in call_curve(models["base"], 128, 1, 5)]
    table = markdown_table([{key: (f"{value:.3g}" if isinstance(value, float) else value)
                                    for key, value in row.items()} for row in rows])
    drafters = ("self", "head") if tiny.draft_head is not None else ("self",)
    defaults = "; ".join(f"{drafter} drafts: " + ", ".join(f"{key} {value}" for key, value in
                                                          current_defaults(tiny, drafter).items())
                         for drafter in drafters)
    if args.adaptive_threshold is not None:
        defaults += f"; adaptive threshold {args.adaptive_threshold} (--adaptive-threshold)"
    text = (f"\n## bench_speculative.py, {time.strftime('%Y-%m-%d %H:%M')}\nMachine: {machine()}. WikiText-2 test "
            f"chunks, 95% masked (any-subset orders), T=1, cached engine, the same chunks, orders and seeds for "
            f"every sampler; batch 1: {args.sequences_b1} chunks one at a time at L=128 (fewer at longer L, at "
            f"least 2); batch > 1 at L > 128: {args.batch_tokens} tokens per row; base-sized model (random "
            f"weights, speed only): {args.base_tokens} tokens per row; the model's sampler defaults (stored with "
            f"it, else the library's) unless the name says otherwise: {defaults}; tok/s: samplers alternated chunk by "
            f"chunk, each chunk the fastest of {args.repeats}, after a warm-up.\n\n{table}\n")
    warning = load_warning([load_at_start, load_average()])
    if warning is not None:
        text += f"\n**Warning:** {warning}.\n"
    if curve:
        text += ("\nOne cached call (batch 1, L=128, prompt cached): milliseconds against query rows and new "
                 "content rows, median over the calls of sessions stepping side by side.\n\n"
                 + markdown_table([{k: (f"{v:.2f}" if isinstance(v, float) else v) for k, v in r.items()}
                                          for r in curve]) + "\n")
    publish(text, write=not args.no_write)


if __name__ == "__main__":
    main()
