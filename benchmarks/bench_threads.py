"""Decoding speed against torch's thread settings, on an idle machine and under a competing load.

Each setting (intra-op threads, OpenMP wait policy, inter-op threads, or asarm's default: the CPUs no other
task runs on, asarm.resources.default_threads) runs the same decodes in a fresh process (OpenMP reads its
environment once, at start-up): asarm-tiny, sequential and assd-fused-head (or assd-fused without a head) on
WikiText-2 test chunks, 95% masked, at batch 1 (chunks one at a time) and at batch 16. The competing load
is N processes that keep a CPU busy each (default: one per available CPU), started before and stopped after
each condition's measurements. Settings alternate, and each is measured ``--repeats`` times (the median
counts). Appends the table to benchmarks/RESULTS.md.

    python benchmarks/bench_threads.py                  # idle and under a 2-process load on a 2-CPU machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampling import machine, publish  # noqa: E402

from asarm.eval.markdown import markdown_table  # noqa: E402
from asarm.resources import available_cpus, load_average  # noqa: E402


# One decode workload, run in a child process with the setting's environment; prints its seconds as JSON.
_WORKLOAD = """
import json, sys, time, torch
from asarm.eval.sampler_defaults import benchmark_decodes
from asarm.model import ASARM
from asarm.sampling import SAMPLERS, decode
from asarm.resources import set_threads
threads, interop, sequences, batch, length = (int(v) for v in sys.argv[1:6])
set_threads(threads or None)  # 0: asarm's default
if interop:
    torch.set_num_interop_threads(interop)
model = ASARM.from_pretrained("asarm-tiny", device="cpu")
chunks, sigma, visible = benchmark_decodes(model.tokenizer, length, sequences)
names = ["sequential", "assd-fused-head" if model.draft_head is not None else "assd-fused"]
decode(model, SAMPLERS[names[0]], chunks[:1], sigma[:1], visible, seed=torch.tensor([0]))  # warm-up
started = time.perf_counter()
for name in names:
    for i in range(0, sequences, batch):
        rows = slice(i, i + batch)
        decode(model, SAMPLERS[name], chunks[rows], sigma[rows], visible, seed=torch.arange(i, i + batch))
print(json.dumps({"seconds": time.perf_counter() - started, "threads": torch.get_num_threads()}))
"""

_BUSY = "while True: pass"


def settings(cpus: int) -> list[dict]:
    """The settings compared: asarm's default (threads 0), 1 thread, and one per CPU with OpenMP's default and
    passive waiting and with one inter-op thread."""
    out = [{"threads": 0, "OMP_WAIT_POLICY": None, "interop": 0}, {"threads": 1, "OMP_WAIT_POLICY": None, "interop": 0}]
    if cpus > 1:
        out += [{"threads": cpus, "OMP_WAIT_POLICY": wait, "interop": interop}
                for wait, interop in ((None, 0), ("PASSIVE", 0), (None, 1))]
    return out


def measure(setting: dict, sequences: int, batch: int, length: int, timeout: float) -> dict | None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if setting["OMP_WAIT_POLICY"]:
        env["OMP_WAIT_POLICY"] = setting["OMP_WAIT_POLICY"]
    argv = [sys.executable, "-c", _WORKLOAD, str(setting["threads"]), str(setting["interop"]), str(sequences),
            str(batch), str(length)]
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def with_load(processes: int):
    """Start ``processes`` busy processes; returns a function that stops them."""
    busy = [subprocess.Popen([sys.executable, "-c", _BUSY]) for _ in range(processes)]
    time.sleep(1.0)

    def stop():
        for proc in busy:
            proc.kill()
            proc.wait()
    return stop


def label(setting: dict) -> str:
    if not setting["threads"]:
        return "asarm's default (CPUs no other task runs on)"
    wait = setting["OMP_WAIT_POLICY"] or "default"
    interop = f", {setting['interop']} inter-op" if setting["interop"] else ""
    return f"{setting['threads']} thread(s), OpenMP wait {wait}{interop}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", type=int, default=available_cpus(), help="competing busy processes (0: idle only)")
    p.add_argument("--sequences", type=int, default=16, help="chunks decoded per sampler, in each workload")
    p.add_argument("--batches", default="1,16", help="batch sizes, comma-separated (each a workload)")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds before a measurement counts as '>'")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    cpus, batches = available_cpus(), [int(b) for b in args.batches.split(",")]
    conditions = ["idle"] + ([f"{args.load} busy processes"] if args.load else [])
    times: dict[tuple, list[float]] = {}
    chosen: dict[str, int] = {}  # condition -> the threads asarm's default took
    load_seen = load_average()
    for repeat in range(args.repeats):
        for condition in conditions:
            stop = with_load(args.load) if condition != "idle" else None
            try:
                for setting in settings(cpus)[::1 if repeat % 2 == 0 else -1]:  # alternate the order
                    for batch in batches:
                        result = measure(setting, args.sequences, batch, args.length, args.timeout)
                        seconds = float("inf") if result is None else result["seconds"]
                        if result is not None and not setting["threads"]:
                            chosen[condition] = result["threads"]
                        times.setdefault((label(setting), condition, batch), []).append(seconds)
                        print(f"{condition:>18} | batch {batch:>3} | {label(setting):<44} | {seconds:.2f} s",
                              flush=True)
            finally:
                if stop is not None:
                    stop()

    def cell(key):
        median = statistics.median(times[key])
        return f">{args.timeout:.0f}" if median == float("inf") else f"{median:.2f}"

    rows = [{"setting": label(setting), **{f"{condition}, batch {batch} (s)": cell((label(setting), condition, batch))
                                          for condition in conditions for batch in batches}}
            for setting in settings(cpus)]
    picked = "; ".join(f"{condition}: {threads}" for condition, threads in chosen.items())
    text = (f"\n## bench_threads.py, {time.strftime('%Y-%m-%d %H:%M')}\nMachine: {machine()}; {cpus} CPUs "
            f"available; load average {load_seen:.1f} before the run. asarm-tiny, {args.sequences} chunks of "
            f"{args.length} tokens (95% masked) decoded by sequential and the fused head sampler at each batch size, "
            f"each setting in a fresh process, median of {args.repeats}; the load: {args.load} processes each "
            f"keeping a CPU busy. Threads asarm's default took: {picked}.\n\n{markdown_table(rows)}\n")
    publish(text, write=not args.no_write)


if __name__ == "__main__":
    main()
