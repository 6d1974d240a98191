"""XLNet against the rotary backbone (asarm.backbones.rope) at equal parameter count, side by side in one run.

1. Training speed: tokens/s of one optimizer step (the joint objective on any_subset orders, masking rates drawn
   in [0.5, 0.99] per sequence as the tiny configs do, forward + backward + AdamW step) at L = 128 and 512, tiny
   size (the tiny configs: d 256, 4 layers, vocabulary 6000) and base size (d 768, 12 layers, vocabulary
   32000). The rotary backbone's gated MLP is ``(d + 2 d_inner) / 3`` wide, which gives it XLNet's parameter
   count (both counts are printed). The two contenders alternate step by step after a warm-up step, on the
   same batches; each cell is the median step. Peak memory: the training steps' peak above the memory held
   before the first step (activations, gradients, optimizer state), each measured in a fresh process (CPU:
   peak resident set size; CUDA: the allocator's peak).
2. Cached sampling speed: sequential decoding on the cached engine, L = 128, 95% masked, batch 1 and 16,
   tiny size (the models trained in 3); alternated chunk by chunk, fastest of ``--repeats``.
3. Quality at equal wall-clock: configs/tiny_cpu.yaml and configs/tiny_cpu_rope.yaml trained for the same
   minutes each on WikiText-2 valid (asarm-tiny's tokenizer), one after the other. Each run's ``max_steps`` is
   its backbone's measured step rate times the budget, so both finish their learning-rate schedule. Then the
   held-out oracle NLL on WikiText-2 raw test, 95% masked (the ``asarm eval nll`` protocol), on the same chunks
   and orders for both, with a paired 95% interval of the difference.

Results are appended to benchmarks/RESULTS.md with the machine.

    python benchmarks/bench_backbones.py                        # everything (about 50 min on 2 cores)
    python benchmarks/bench_backbones.py --skip-quality         # speed and memory only (about 8 min)
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

import torch

from asarm.eval.markdown import markdown_table
from asarm.eval.nll import heldout_nll, unigram_log_probs
from asarm.eval.stats import paired_comparison
from asarm.eval.texts import packed_text
from asarm.model import ASARM, EMBEDDED_MODELS, pick_device
from asarm.sampling import sequential_decode
from asarm.training.config import load_config
from asarm.training.objectives import ObjectiveConfig, compute_loss
from asarm.training.trainer import latest_checkpoint, run_training

sys.path.insert(0, str(Path(__file__).parent))
from bench_sampling import machine, publish, sync  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BACKBONES = ("xlnet", "rope")
# name -> (sizes, XLNet's d_inner, batch size at L = 128; at L = 512 a quarter of it)
SIZES = {"tiny": (dict(d_model=256, n_layer=4, n_head=4, vocab_size=6000), 1024, 8),
         "base": (dict(d_model=768, n_layer=12, n_head=12, vocab_size=32000), 3072, 4)}
CONFIGS = {"xlnet": "configs/tiny_cpu.yaml", "rope": "configs/tiny_cpu_rope.yaml"}


def build(backbone: str, size: str, device, seed: int = 0) -> ASARM:
    sizes, xlnet_inner, _ = SIZES[size]
    d_inner = xlnet_inner if backbone == "xlnet" else (sizes["d_model"] + 2 * xlnet_inner) // 3
    return ASARM.from_config(backbone=backbone, d_inner=d_inner, dropout=0.1, seed=seed, device=device, **sizes)


def batch_size(size: str, seq_len: int) -> int:
    return max(1, SIZES[size][2] * 128 // seq_len)


def training_step(model: ASARM, optimizer, tokens, generator) -> None:
    loss, _ = compute_loss(model, tokens, ObjectiveConfig(min_masking_rate=0.5, max_masking_rate=0.99), generator)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def batches(size: str, seq_len: int, count: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch_size(size, seq_len), seq_len)
    return [torch.randint(10, SIZES[size][0]["vocab_size"], shape, generator=gen) for _ in range(count)]


def train_speed(size: str, seq_len: int, steps: int, device) -> dict[str, dict]:
    """Median training step of each backbone, alternating step by step on the same batches and masks."""
    models = {name: build(name, size, device).train() for name in BACKBONES}
    optimizers = {name: torch.optim.AdamW(m.backbone.parameters(), lr=1e-4) for name, m in models.items()}
    data = batches(size, seq_len, steps + 1, seed=seq_len)
    times = {name: [] for name in BACKBONES}
    for i, tokens in enumerate(data):
        for name in (BACKBONES if i % 2 == 0 else BACKBONES[::-1]):
            tokens_on = tokens.to(device)
            sync(device)
            began = time.perf_counter()
            training_step(models[name], optimizers[name], tokens_on, torch.Generator().manual_seed(i))
            sync(device)
            if i > 0:  # step 0 warms up
                times[name].append(time.perf_counter() - began)
    out = {}
    for name, model in models.items():
        seconds = statistics.median(times[name])
        out[name] = {"parameters": sum(p.numel() for p in model.backbone.parameters()), "step_s": seconds,
                     "tokens_per_s": data[0].numel() / seconds}
    return out


def peak_memory_mib(backbone: str, size: str, seq_len: int, device) -> float:
    """The training steps' peak memory above what was held before them, in a fresh process."""
    probe = [sys.executable, __file__, "--probe", f"{backbone}:{size}:{seq_len}", "--device", str(device)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(probe, capture_output=True, text=True, check=True, env=env)
    return float(done.stdout.strip().splitlines()[-1])


def probe_memory(spec: str, device) -> float:
    backbone, size, seq_len = spec.split(":")
    model = build(backbone, size, device).train()
    optimizer = torch.optim.AdamW(model.backbone.parameters(), lr=1e-4)
    data = batches(size, int(seq_len), 2, seed=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _resident_bytes()
    for i, tokens in enumerate(data):
        training_step(model, optimizer, tokens.to(device), torch.Generator().manual_seed(i))
    sync(device)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else _peak_resident_bytes()
    return (peak - before) / 2 ** 20


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_resident_bytes() -> int:
    """This process image's peak resident set (VmHWM). Not getrusage's ru_maxrss: Linux carries that over from
    the parent through fork and exec, so a probe started by a big benchmark process would report the parent's."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


# ------------------------------------------------------------------------------ quality at equal wall-clock
def train_for(backbone: str, minutes: float, run_dir: Path, seed: int, overrides=()) -> tuple[ASARM, dict]:
    """Train the tiny config of ``backbone`` for about ``minutes``: a 25-step probe measures its step time (its mean
    throughput, first step included), the run gets the steps that fit (its schedule scaled to them). Returns the
    final model and the run's figures. ``overrides``: dotted config overrides of both runs (e.g. another lr)."""
    tokenizer = str(EMBEDDED_MODELS["asarm-tiny"])
    base = [f"model.tokenizer={tokenizer}", "model.tokenizer_vocab_size=0", "eval.every=0", "eval.at_end=false",
            "log.progress=false", "log.tensorboard=false", "train.resume=none", f"train.seed={seed}", *overrides]
    probe_dir = run_dir / f"{backbone}_probe"
    # the probe draws masking rates from the final range at once: the early, lower rates have fewer query rows
    run_training(load_config(REPO / CONFIGS[backbone], base + [f"train.run_dir={probe_dir}", "train.max_steps=25",
                                                               "train.save_every=0", "masking.masking_warmup_steps=0"]))
    last = [json.loads(line) for line in (probe_dir / "metrics.jsonl").read_text().splitlines()][-1]
    cfg = load_config(REPO / CONFIGS[backbone])
    step_s = cfg.data.batch_size * cfg.data.max_length / last["tokens_per_s"]
    steps = max(50, int(minutes * 60 / step_s))
    cfg = load_config(REPO / CONFIGS[backbone], base + [
        f"train.run_dir={run_dir / backbone}", f"train.max_steps={steps}", f"train.save_every={steps}",
        f"optim.warmup_steps={max(10, steps // 20)}", f"masking.masking_warmup_steps={max(10, steps // 10)}"])
    began = time.perf_counter()
    run_training(cfg)
    seconds = time.perf_counter() - began
    model = ASARM.from_pretrained(latest_checkpoint(run_dir / backbone) / "model", device="cpu")
    return model, {"steps": steps, "train_minutes": seconds / 60, "probe_step_s": step_s}


def sampling_speed(models: dict[str, ASARM], repeats: int) -> dict:
    """Cached sequential decoding tokens/s at batch 1 and 16 (L = 128, 95% masked), alternated."""
    tokenizer = models["xlnet"].tokenizer
    chunks = packed_text(tokenizer, 128, None, 16)
    n_prompt = int(round(128 * 0.05))
    sigma = torch.stack([torch.randperm(128, generator=torch.Generator().manual_seed(i)) for i in range(16)])
    prompt = torch.full((16,), n_prompt)
    out = {}
    for rows in (1, 16):
        groups = [slice(0, 1), slice(1, 2), slice(2, 3), slice(3, 4)] if rows == 1 else [slice(0, 16)]
        best = {name: [float("inf")] * len(groups) for name in models}
        for name, model in models.items():  # warm-up
            sequential_decode(model, chunks[:rows], sigma[:rows], prompt[:rows], seed=0, max_new_tokens=4)
        for r in range(repeats):
            for g, rows_slice in enumerate(groups):
                for name in (BACKBONES if (r + g) % 2 == 0 else BACKBONES[::-1]):
                    began = time.perf_counter()
                    sequential_decode(models[name], chunks[rows_slice], sigma[rows_slice], prompt[rows_slice], seed=g)
                    best[name][g] = min(best[name][g], time.perf_counter() - began)
        tokens = (128 - n_prompt) * sum(s.stop - s.start for s in groups)
        out[rows] = {name: tokens / sum(best[name]) for name in models}
    return out


def heldout(models: dict[str, ASARM], sequences: int, seed: int) -> dict:
    tokenizer = models["xlnet"].tokenizer
    chunks = packed_text(tokenizer, 128, None, sequences)
    unigram = unigram_log_probs(chunks, models["xlnet"].vocab_size, models["xlnet"].mask_token_id)
    per_chunk = {}
    for name, model in models.items():
        result = heldout_nll(model, chunks, 0.95, unigram, generator=torch.Generator().manual_seed(seed))
        per_chunk[name] = (result["model"] / result["targets"]).tolist()
    paired = paired_comparison(per_chunk["rope"], per_chunk["xlnet"])
    return {"sequences": len(chunks), "xlnet": paired.mean_b, "rope": paired.mean_a,
            "rope_minus_xlnet": paired.mean_diff, "ci95": paired.ci95_diff}


# ------------------------------------------------------------------------------ the report
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="128,512")
    p.add_argument("--sizes", default="tiny,base")
    p.add_argument("--steps", type=int, default=4, help="timed training steps per (size, L), after one warm-up")
    p.add_argument("--train-minutes", type=float, default=12.0, help="wall-clock budget of each quality run")
    p.add_argument("--nll-sequences", type=int, default=512, help="WikiText-2 test chunks for the held-out NLL")
    p.add_argument("--repeats", type=int, default=2, help="timed sampling runs (the fastest counts)")
    p.add_argument("--skip-quality", action="store_true", help="speed and memory only (no training runs)")
    p.add_argument("--run-dir", default="runs/bench_backbones")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
    args = p.parse_args()
    device = pick_device(args.device)
    if args.probe:
        print(probe_memory(args.probe, device))
        return
    torch.manual_seed(args.seed)
    lines = [f"\n## bench_backbones.py, {time.strftime('%Y-%m-%d %H:%M')}\n",
             "XLNet vs the rotary backbone at equal parameter count (module doc of benchmarks/bench_backbones.py).\n"]
    rows = []
    for size in args.sizes.split(","):
        for seq_len in (int(x) for x in args.lengths.split(",")):
            speed = train_speed(size, seq_len, args.steps, device)
            memory = {name: peak_memory_mib(name, size, seq_len, device) for name in BACKBONES}
            ratio = speed["rope"]["tokens_per_s"] / speed["xlnet"]["tokens_per_s"]
            rows.append({"size": size, "L": seq_len, "batch": batch_size(size, seq_len),
                         "params xlnet / rope": f"{speed['xlnet']['parameters'] / 1e6:.2f}M / "
                                                f"{speed['rope']['parameters'] / 1e6:.2f}M",
                         "train tok/s xlnet": round(speed["xlnet"]["tokens_per_s"]),
                         "train tok/s rope": round(speed["rope"]["tokens_per_s"]), "rope / xlnet": f"{ratio:.2f}x",
                         "peak MiB xlnet": round(memory["xlnet"]), "peak MiB rope": round(memory["rope"])})
            print(rows[-1], flush=True)
    lines += ["### Training speed and memory\n", markdown_table(rows), ""]
    if not args.skip_quality:
        run_dir = Path(args.run_dir)
        trained, figures = {}, {}
        for name in BACKBONES:
            trained[name], figures[name] = train_for(name, args.train_minutes, run_dir, args.seed)
            print(name, figures[name], flush=True)
        sampling = sampling_speed(trained, args.repeats)
        nll = heldout(trained, args.nll_sequences, args.seed)
        print(sampling, nll, flush=True)
        quality = [{"backbone": name, "steps": figures[name]["steps"],
                    "minutes": f"{figures[name]['train_minutes']:.1f}", "test NLL (95% masked)": f"{nll[name]:.3f}",
                    "cached sampling tok/s, batch 1": round(sampling[1][name]),
                    "batch 16": round(sampling[16][name])} for name in BACKBONES]
        lo, hi = nll["ci95"]
        lines += [f"### Equal wall-clock training ({args.train_minutes:g} min each, tiny configs, WikiText-2 valid) "
                  f"and cached sampling\n", markdown_table(quality), "",
                  f"Held-out NLL, rope minus xlnet: {nll['rope_minus_xlnet']:+.3f} nats per token, paired 95% "
                  f"interval [{lo:+.3f}, {hi:+.3f}] over {nll['sequences']} chunks of WikiText-2 raw test. Cached "
                  f"sampling, rope / xlnet: {sampling[1]['rope'] / sampling[1]['xlnet']:.2f}x at batch 1, "
                  f"{sampling[16]['rope'] / sampling[16]['xlnet']:.2f}x at batch 16.\n"]
    lines.append(f"Machine: {machine()}.\n")
    report = "\n".join(lines)
    publish(report, write=not args.no_write)


if __name__ == "__main__":
    main()
