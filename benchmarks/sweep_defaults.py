"""Re-measure the model-dependent sampler defaults on a model and append the sweep to benchmarks/RESULTS.md.

Every candidate of every setting (asarm.eval.sampler_defaults.CANDIDATES: the draft temperature ratio, the
outcomes a single-pass call covers and their order, the adaptive threshold; for the model's own drafts and
for its draft head's) decodes the same WikiText-2 test chunks (95% masked, any-subset orders, per-row seeds,
k = 5, T = 1), and is judged by NFE and query rows per call, which the seeds make deterministic, with paired
95% intervals over the decodes; the rule that picks a value is in that module's docstring. Wall-clock is not
used: on this shared CPU it moves more than these settings do. Then the check of issue 25: the default
``assd_decode`` (with the chosen defaults) against ``assd-paper`` on the same decodes. ``--store`` writes the
chosen defaults into the model directory (``asarm.json``, ``draft_head.json``), where ``SamplerSpec.resolve``
reads them.

    python benchmarks/sweep_defaults.py --store        # the embedded asarm-tiny, 60 decodes (about 15 min, 1 thread)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from asarm.eval.markdown import markdown_table
from asarm.eval.sampler_defaults import benchmark_decodes, measure, store
from asarm.eval.stats import summarize
from asarm.model import ASARM, DEFAULT_MODEL, StoredDefaults, _local_model_dir
from asarm.sampling import SAMPLERS, assd_decode, decode

sys.path.insert(0, str(Path(__file__).parent))
from bench_sampling import machine, publish  # noqa: E402



def done_when(model: ASARM, decodes) -> list[dict]:
    """NFE of the default ``assd_decode`` and of ``assd-paper`` on the same decodes, and their paired difference."""
    chunks, sigma, visible = decodes
    seeds = torch.arange(len(chunks))
    default = assd_decode(model, chunks, sigma, visible, seed=seeds)
    paper = decode(model, SAMPLERS["assd-paper"], chunks, sigma, visible, seed=seeds)
    rows = []
    for name, out in (("assd_decode defaults", default), ("assd-paper", paper)):
        nfe = summarize(out.nfe.double().numpy())
        rows.append({"sampler": name, "draft temperature ratio": out.settings["draft_temperature_ratio"],
                     "from": out.settings["defaults_from"].get("draft_temperature_ratio", "set"),
                     "NFE": f"{nfe.mean:.2f} ± {nfe.ci95[1] - nfe.mean:.2f}",
                     "tokens/call": float((out.settings["stop"] - out.settings["n_prompt"]).sum() / out.nfe.sum())})
    low, high = summarize((default.nfe - paper.nfe).double().numpy()).ci95
    rows[0]["ΔNFE vs assd-paper (95% CI)"] = f"[{low:+.2f}, {high:+.2f}]"
    rows[1]["ΔNFE vs assd-paper (95% CI)"] = "-"
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="a model directory or embedded name (default %(default)s)")
    p.add_argument("--decodes", type=int, default=60, help="WikiText-2 test chunks decoded per candidate")
    p.add_argument("--length", type=int, default=128, help="tokens per chunk")
    p.add_argument("--seed", type=int, default=0, help="seed of the decoding orders")
    p.add_argument("--store", action="store_true", help="write the chosen defaults into the model directory")
    p.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    args = p.parse_args(argv)
    if args.decodes < 2:
        p.error("--decodes must be >= 2 (the intervals are paired over decodes)")
    if args.store and _local_model_dir(args.model) is None:
        p.error(f"--store writes into a model directory, and {args.model!r} is a Hub name: download it first")
    torch.set_num_threads(1)
    model = ASARM.from_pretrained(args.model, device="cpu")
    decodes = benchmark_decodes(model.tokenizer, args.length, args.decodes, args.seed)
    began = time.perf_counter()
    measurement = measure(model, decodes, log=lambda row: print(row, flush=True))
    print(measurement.line(), f"({time.perf_counter() - began:.0f} s)", flush=True)
    if args.store:
        for file in store(_local_model_dir(args.model), measurement, by="benchmarks/sweep_defaults.py"):
            print(f"wrote {file}")
        model = ASARM.from_pretrained(args.model, device="cpu")  # the defaults as a user loads them
    else:
        model.sampler_defaults = StoredDefaults("this sweep (not stored)", measurement.defaults["self"])
        if model.draft_head is not None:
            model.draft_head.sampler_defaults = StoredDefaults("this sweep (not stored)", measurement.defaults["head"])
    check = done_when(model, decodes)
    text = (f"\n## sweep_defaults.py, {time.strftime('%Y-%m-%d %H:%M')}\nMachine: {machine()}. Model: {args.model} "
            f"({'with' if model.draft_head is not None else 'without'} its draft head). {args.decodes} WikiText-2 test "
            f"chunks of {args.length} tokens, 95% masked (any-subset orders, seed {args.seed}), per-row seeds, k=5, "
            f"T=1, cached engine; every candidate decodes the same chunks. NFE: mean ± half the 95% interval; Δ: "
            f"paired 95% intervals against the current value; query rows per call from the decode trace. Counts, "
            f"not wall-clock: this CPU is shared and its timings move more than these settings do. The rule "
            f"(asarm/eval/sampler_defaults.py): the draft temperature ratio changes to a value with clearly "
            f"fewer NFE; the outcomes, their order and the threshold, which trade tokens per call against query "
            f"rows per call, change only to a value clearly better on one and no worse on average on the other. "
            f"{measurement.line()}{' (stored in the model directory)' if args.store else ''}.\n\n"
            f"{markdown_table(measurement.table)}\nIssue 25's check: the default `assd_decode` against "
            f"`assd-paper` on the same decodes.\n\n{markdown_table(check)}")
    publish(text, write=not args.no_write)


if __name__ == "__main__":
    main()
