"""The masking-distribution trainer (spec section 5), built on ``accelerate``.

    asarm train --config configs/tiny_cpu.yaml train.max_steps=200 optim.lr=3e-4
    torchrun --nproc_per_node 2 -m asarm.training.trainer --config configs/tiny_cpu.yaml train.cpu=true
    accelerate launch --config_file configs/accelerate_fsdp.yaml -m asarm.training.trainer --config ...   # FSDP

FSDP: accelerate shards the model on GPUs; on CPUs (where accelerate runs an FSDP launch as plain multi-CPU)
the trainer shards it with torch's ``fully_shard``. A run ends with one line on the main process: its last
checkpoint, the run directory and the command that resumes it (a run stopped by ``train.stop_at``) or exports it.

One optimizer step = ``train.grad_accum`` micro-batches of ``data.batch_size`` packed chunks on each
of the ``R`` processes. Micro-batch ``a`` on rank ``r`` draws its masking rates from stratum
``a * R + r`` of the scheduled range (``MaskingRateSchedule.sample``); orders and rates come from a
per-rank ``torch.Generator`` seeded from ``train.seed``. AdamW with linear warm-up then linear decay
(``optim.lr`` times ``effective_batch / 32`` with ``optim.lr_scale_by_batch``), grad clipping.

Run directory (``train.run_dir``)
    ``config.yaml``      the resolved config (plus derived values under ``resolved``)
    ``metrics.jsonl``    one JSON line per optimizer step (``kind: "train"``) and per evaluation
    ``tb/``              TensorBoard scalars (when ``tensorboard`` is installed)
    ``wandb/``, ``wandb_run_id``  with ``log.wandb``: the Weights & Biases run files (unless ``WANDB_DIR`` is
        set) and the run's id, which a resume reads to continue the same wandb run
    ``tokenizer/``       a SentencePiece tokenizer trained on the training text (``model.tokenizer_vocab_size``)
    ``checkpoints/step_N/``  ``model/`` (``ASARM.save_pretrained``), ``optimizer.pt``, ``scheduler.pt``,
        ``trainer_state.json``, ``rng_rank{r}.pt`` and ``data_rank{r}.pt`` per rank; written into
        ``step_N.tmp`` and renamed when complete, then ``checkpoints/latest`` (a file naming the
        directory) is replaced atomically. Half-written ``*.tmp`` directories are ignored and removed.

Exact resume: the model, optimizer, scheduler, grad scaler, every RNG (torch, CUDA, python, numpy,
the order generator) and each rank's stream position are restored, so a resumed run continues the
loss curve of an uninterrupted one bit for bit (on the same hardware and process count).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import shlex
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import orders
from ..draft_head import DraftHead, OnePassDraftHead, make_draft_head
from ..files import write_atomic
from ..model import ASARM
from ..paths import DataFileNotFoundError, data_dir, data_file
from ..seeds import mix_seed
from .config import TrainConfig, config_to_dict, load_config, save_config
from .data import (CodeDirectorySource, JsonlSource, PackedStream, StreamLoader, TextFileSource, hub_source,
                   make_encoder)
from .draft_head import distillation_loss, draft_points, frequent_tokens
from .objectives import ObjectiveConfig, compute_loss, num_predict_for_rates
from .schedule import MaskingRateSchedule

__all__ = ["train", "run_training", "Trainer", "latest_checkpoint", "main"]

CHECKPOINT_PREFIX = "step_"
# Config keys a resumed run may change: they set how far the run goes, what it logs and evaluates and
# where its directory is, never the training up to the checkpoint. (A new train.max_steps re-stretches
# the linear learning-rate decay from the resumed step on.) Any other change is refused.
RESUMABLE_KEYS = ("train.max_steps", "train.stop_at", "train.save_every", "train.keep_last", "train.resume",
                  "train.run_dir", "train.compile")
RESUMABLE_SECTIONS = ("log", "eval")
WANDB_ID_FILE = "wandb_run_id"  # in the run directory: the wandb run a resume continues


# ----------------------------------------------------------------------------------------------- helpers

@contextmanager
def _evaluation_mode(model: nn.Module):
    """``model.eval()`` for the block, then every submodule back in its own mode: in draft-head training the
    frozen model stays in eval mode and the draft head it carries goes back to training."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith(CHECKPOINT_PREFIX) or not path.is_dir():
        return None
    try:
        return int(name[len(CHECKPOINT_PREFIX):])
    except ValueError:  # step_N.tmp and the like
        return None


def _complete(path: Path) -> bool:
    return (path / "trainer_state.json").is_file()


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run: the ``latest`` pointer if valid, else the highest
    ``step_N`` directory holding a ``trainer_state.json``; None when there is none."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    pointer = ckpt_dir / "latest"
    if pointer.is_file():
        candidate = ckpt_dir / pointer.read_text(encoding="utf-8").strip()
        if _checkpoint_step(candidate) is not None and _complete(candidate):
            return candidate
    if not ckpt_dir.is_dir():
        return None
    found = [(s, p) for p in ckpt_dir.iterdir() if (s := _checkpoint_step(p)) is not None and _complete(p)]
    return max(found)[1] if found else None


def _rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
             "generator": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _lr_lambda(warmup: int, total: int, decay: str):
    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if decay == "constant":
            return 1.0
        if total <= warmup:
            return 1.0
        return max(0.0, (total - step) / (total - warmup))
    return factor


def _data_path(path: str, key: str) -> str:
    """``path`` resolved in the data directory; a missing file names the config key and the directory."""
    try:
        return str(data_file(path))
    except DataFileNotFoundError:
        where = "ASARM_DATA_DIR" if os.environ.get("ASARM_DATA_DIR") else "the data directory"
        raise DataFileNotFoundError(f"{key}: {path!r} is neither a file nor in {where} ({data_dir()}); put it there, "
                                    f"point ASARM_DATA_DIR at the folder holding it, or give its path") from None


def _resolve_paths(paths) -> list[str]:
    return [_data_path(p, "data.paths") if not any(c in str(p) for c in "*?[") else str(p) for p in paths]


def _check_wandb_installed() -> None:
    """Fail at start-up, in one line, when ``log.wandb`` is on but wandb is missing (not after the model
    is built, nor on rank 0 alone, which would leave the other ranks waiting)."""
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise ValueError("log.wandb=true needs the wandb package: pip install 'asarm[wandb]' (or set log.wandb=false)")


def _no_training_data(cfg: TrainConfig) -> ValueError:
    d = cfg.data
    what = d.hub_preset if d.source == "hub" else d.root if d.source == "code_dir" else ", ".join(d.paths)
    return ValueError(f"the training split of {what} has no document for this process: the text is empty or blank, "
                      f"or too short (data.heldout_fraction={d.heldout_fraction} keeps the last documents for "
                      f"evaluation); add text or lower data.heldout_fraction")


def _fsdp_on_cpu(accelerator) -> bool:
    """An FSDP launch (``accelerate launch --config_file configs/accelerate_fsdp.yaml ...``) of CPU processes:
    accelerate passes the FSDP request on (``ACCELERATE_USE_FSDP``) but takes FSDP on GPUs only, and runs it as plain
    multi-CPU."""
    from accelerate.utils import DistributedType, parse_flag_from_env

    return accelerator.distributed_type == DistributedType.MULTI_CPU and parse_flag_from_env("ACCELERATE_USE_FSDP")


def _fully_shard(backbone: nn.Module) -> None:
    """Shard ``backbone`` in place over all processes with torch's ``fully_shard`` (FSDP2, gloo on CPUs), as the
    FSDP config asks: each layer of the class its ``fsdp_transformer_layer_cls_to_wrap`` names (RopeLayer) one
    unit, the rest (embedding, output norm) one unit at the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = {n.strip() for n in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if n.strip()}
    layers = [m for m in backbone.modules() if type(m).__name__ in names]
    if not layers:
        named = ", ".join(sorted(names)) or "unset"
        raise ValueError(f"the FSDP config's fsdp_transformer_layer_cls_to_wrap ({named}) names no layer of the "
                         f"{backbone.name} backbone; on CPUs the trainer shards by layer class: set it to the "
                         f"backbone's layer class (RopeLayer for rope)")
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(backbone, mesh=mesh)


def _config_changes(saved: TrainConfig, new: TrainConfig) -> list[str]:
    """``key (old -> new)`` for every setting that differs and may not change on resume."""
    old, cur = config_to_dict(saved), config_to_dict(new)
    return [f"{section}.{key} ({old[section][key]!r} -> {value!r})"
            for section, fields in cur.items() if section not in RESUMABLE_SECTIONS
            for key, value in fields.items()
            if f"{section}.{key}" not in RESUMABLE_KEYS and old[section][key] != value]


def build_source(cfg: TrainConfig, split: str):
    """The document source of ``split`` (``train`` / ``heldout``) described by ``cfg.data``."""
    d = cfg.data
    common = dict(split=split, heldout_fraction=d.heldout_fraction)
    if d.source == "text":
        return TextFileSource(_resolve_paths(d.paths), unit=d.unit, heldout_mode=d.heldout_mode, **common)
    if d.source == "jsonl":
        return JsonlSource(_resolve_paths(d.paths), field=d.field, heldout_mode=d.heldout_mode, **common)
    if d.source == "code_dir":
        return CodeDirectorySource(_data_path(d.root, "data.root"), patterns=d.patterns, heldout_mode=d.heldout_mode,
                                   **common)
    if d.source == "hub":
        if not d.hub_preset:
            raise ValueError("data.source=hub needs data.hub_preset")
        return hub_source(d.hub_preset, **common)
    raise ValueError(f"data.source must be text, jsonl, code_dir or hub, got {d.source!r}")


# ----------------------------------------------------------------------------------------------- trainer

class Trainer:
    """Holds the state of one training run; :meth:`fit` runs it. See the module doc."""

    def __init__(self, cfg: TrainConfig):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed

        self.cfg = cfg
        run = cfg.train
        if cfg.log.wandb:
            _check_wandb_installed()
        # XLNet's segment parameters (r_s_bias, seg_embed) get no gradient, since asarm passes no token_type_ids:
        # DDP must know
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        self.accelerator = Accelerator(gradient_accumulation_steps=run.grad_accum,
                                       mixed_precision=run.mixed_precision, cpu=run.cpu, kwargs_handlers=[ddp])
        acc = self.accelerator
        self.rank, self.world_size = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        self.run_dir = Path(run.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.resume_from = self._checkpoint_to_resume()
        if self.is_main:
            if self.resume_from is None:
                self._start_over()
            else:
                self._trim_metrics(int(self._trainer_state(self.resume_from)["step"]))
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        # the global RNGs (python, numpy, torch), the same on every rank: dropout and a new draft head's initial
        # weights draw from them (the model's own initial weights have their seed in ASARM.from_config)
        set_seed(run.seed)

        self.head_mode = cfg.draft_head.train
        if self.head_mode and not cfg.model.init:
            raise ValueError("draft_head.train distils a trained model: set model.init to it (a local directory, "
                             "asarm-tiny or a Hub name)")
        self.tokenizer = self._tokenizer()
        self.asarm = self._model()
        self.encode = make_encoder(self.tokenizer, code=cfg.data.code)
        trainable = self._draft_head() if self.head_mode else self.asarm.backbone
        self.effective_batch = cfg.data.batch_size * run.grad_accum * self.world_size
        self.lr = cfg.optim.lr * (self.effective_batch / cfg.optim.lr_reference_batch
                                  if cfg.optim.lr_scale_by_batch else 1.0)
        # FSDP shards the model: evaluation and checkpoints use a copy with the gathered weights on the main process.
        # accelerate shards on GPUs; on CPUs, where it runs an FSDP launch as plain multi-CPU, the trainer shards
        # with torch's fully_shard (FSDP2) before the optimizer sees the parameters
        shard_here = _fsdp_on_cpu(acc)
        self.sharded = acc.distributed_type == DistributedType.FSDP or shard_here
        if self.sharded and self.head_mode:
            raise ValueError("draft_head.train runs with DDP or one process, not FSDP (the head is small): launch it "
                             "without the FSDP config")
        self.gathered = copy.deepcopy(self.asarm) if self.sharded and self.is_main else None
        if shard_here:
            _fully_shard(trainable)
        decay, no_decay = [], []
        for name, p in trainable.named_parameters():
            if not p.requires_grad:
                continue
            # norms and biases are not decayed; XLNet's attention biases (r_w_bias, ...) are 2-d, hence the name
            (no_decay if p.ndim < 2 or name.endswith("bias") else decay).append(p)
        groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=self.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _lr_lambda(cfg.optim.warmup_steps, run.max_steps, cfg.optim.decay))
        # the scheduler is stepped by hand once per optimizer step (accelerate's wrapper would step it
        # once per process)
        if shard_here:  # accelerate would wrap the sharded module in DDP
            self.model, self.optimizer = trainable, acc.prepare(optimizer)
        else:
            self.model, self.optimizer = acc.prepare(trainable, optimizer)  # with draft_head.train: the head
        self.forward_model = torch.compile(self.model) if run.compile and not self.head_mode else self.model

        self.schedule = MaskingRateSchedule(cfg.masking.start_masking_rate, cfg.masking.final_min_masking_rate,
                                            cfg.masking.final_max_masking_rate, cfg.masking.masking_warmup_steps)
        m = cfg.masking
        self.objective = ObjectiveConfig(objective=m.objective, order=m.order, prompt_attn=m.prompt_attn,
                                         loss_scale=m.loss_scale, reduction=m.reduction, per_sequence=m.per_sequence,
                                         min_masking_rate=m.final_min_masking_rate,
                                         max_masking_rate=m.final_max_masking_rate, min_prompt=m.min_prompt,
                                         mask_token_id=self.asarm.mask_token_id, mixture=m.mixture,
                                         slot_weights=tuple(m.slot_weights))
        self.generator = torch.Generator().manual_seed(mix_seed(run.seed, self.rank))
        self.stream = PackedStream(build_source(cfg, "train"), self.encode, max_length=cfg.data.max_length,
                                   rank=self.rank, world_size=self.world_size, epochs=cfg.data.epochs)
        # the DataLoader draws its workers' base seed from this generator, not the global RNG (which would
        # shift dropout after a resume, since the iterator is created after the RNG states are restored)
        self.loader = StreamLoader(self.stream, batch_size=cfg.data.batch_size, num_workers=cfg.data.num_workers,
                                   generator=torch.Generator().manual_seed(run.seed + 7919 * self.rank))
        self.step = 0
        self.writer = None
        self.wandb = None
        self.resolved: dict = {}  # derived settings, saved under `resolved` in config.yaml and sent to wandb

    # -- construction
    def _tokenizer(self):
        from ..tokenization import load_xlnet_tokenizer, train_tokenizer

        mc = self.cfg.model
        if mc.tokenizer_vocab_size and mc.tokenizer_vocab_size > 0:
            tok_dir = self.run_dir / "tokenizer"
            if self.is_main and not (tok_dir / "tokenizer.json").is_file():
                docs = build_source(self.cfg, "train").documents()
                if mc.tokenizer_max_documents:
                    docs = (d for i, d in zip(range(mc.tokenizer_max_documents), docs))
                docs = list(docs)
                if not docs:
                    raise _no_training_data(self.cfg)
                tmp = self.run_dir / "tokenizer.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                train_tokenizer(list(docs), mc.tokenizer_vocab_size, tmp, code=self.cfg.data.code)
                shutil.rmtree(tok_dir, ignore_errors=True)
                os.replace(tmp, tok_dir)
            self.accelerator.wait_for_everyone()
            return load_xlnet_tokenizer(tok_dir)
        if mc.tokenizer:
            return load_xlnet_tokenizer(mc.tokenizer)
        if mc.init:
            return None  # from_pretrained loads the checkpoint's own
        return load_xlnet_tokenizer()

    def _model(self) -> ASARM:
        mc = self.cfg.model
        if mc.init:
            model = ASARM.from_pretrained(mc.init, revision=mc.revision, device="cpu", dtype=torch.float32,
                                          tokenizer=self.tokenizer)
            if self.tokenizer is None:
                self.tokenizer = model.tokenizer
            if mc.backbone and mc.backbone != model.backbone.name:
                raise ValueError(f"model.backbone is {mc.backbone!r} but model.init {mc.init!r} is a "
                                 f"{model.backbone.name!r} model; drop model.backbone or start from another model")
        else:
            fields = dict(vocab_size=len(self.tokenizer), d_model=mc.d_model, n_layer=mc.n_layer, n_head=mc.n_head,
                          d_inner=mc.d_inner, dropout=mc.dropout)
            if mc.attention_dropout is not None:
                fields["attention_dropout"] = mc.attention_dropout
            model = ASARM.from_config(fields, backbone=mc.backbone or "xlnet", tokenizer=self.tokenizer,
                                      seed=self.cfg.train.seed, init_std=mc.init_std, device="cpu", dtype=torch.float32)
        model.trained_length = self.cfg.data.max_length  # saved with every checkpoint (asarm.json)
        return model.to(self.accelerator.device)

    def _draft_head(self) -> DraftHead | OnePassDraftHead:
        """A new draft head attached to the frozen model (draft_head.train)."""
        hc = self.cfg.draft_head
        self.asarm.requires_grad_(False)
        self.asarm.eval()  # the teacher's conditionals without dropout
        vocab = None
        if hc.vocab_size:
            stream = PackedStream(build_source(self.cfg, "train"), self.encode, max_length=self.cfg.data.max_length,
                                  rank=0, world_size=1, epochs=None)
            loader = StreamLoader(stream, batch_size=self.cfg.data.batch_size, generator=torch.Generator())
            batches = (tokens for _, tokens in zip(range(hc.vocab_batches), loader))
            vocab = frequent_tokens(batches, hc.vocab_size, self.asarm.vocab_size, self.asarm.mask_token_id)
        head = make_draft_head(hc.kind, self.asarm.config.d_model, self.asarm.vocab_size, hc.hidden, hc.max_offset,
                               rank=hc.rank, draft_vocab=vocab)
        self.asarm.attach_draft_head(head)
        return self.asarm.draft_head

    def _head_loss(self, tokens: torch.Tensor, rates: torch.Tensor):
        """Distillation loss of a micro-batch (draft_head.train), with the statistics the loop logs."""
        batch, length = tokens.shape
        rates = torch.as_tensor(rates, dtype=torch.float64).reshape(-1).expand(batch)
        n_prompt = length - num_predict_for_rates(rates, length, self.cfg.masking.min_prompt)
        order = orders.any_subset if self.cfg.masking.order == "any_subset" else orders.any_permutation
        sigma = order(n_prompt, length, generator=self.generator)
        n = draft_points(n_prompt, length, self.generator)
        device = tokens.device
        loss, stats = distillation_loss(self.asarm, self.model, tokens, sigma.to(device), n_prompt.to(device),
                                        n.to(device), self.cfg.draft_head.slots, self.generator)
        stats.update(nll_per_token=stats["loss"], accuracy=stats["acceptance"].mean(),
                     mean_masking_rate=rates.mean())
        return loss, stats

    # -- checkpoints
    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        final = self.ckpt_dir / f"{CHECKPOINT_PREFIX}{self.step}"
        tmp = self.ckpt_dir / f"{CHECKPOINT_PREFIX}{self.step}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        torch.save(_rng_state(self.generator), tmp / f"rng_rank{self.rank}.pt")
        torch.save(self.loader.state_dict(), tmp / f"data_rank{self.rank}.pt")
        model = self._unsharded()
        if self.sharded:  # each process's optimizer state is its own shard
            torch.save(self.optimizer.state_dict(), tmp / f"optimizer_rank{self.rank}.pt")
        if self.is_main:
            model.save_pretrained(tmp / "model")
            if not self.sharded:
                torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            if acc.scaler is not None:
                torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
        acc.wait_for_everyone()
        if self.is_main:
            state = {"step": self.step, "world_size": self.world_size, "time": time.time()}
            write_atomic(tmp / "trainer_state.json", json.dumps(state))  # marks the directory complete
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_atomic(self.ckpt_dir / "latest", final.name + "\n")
            self._prune()
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        keep = self.cfg.train.keep_last
        for p in self.ckpt_dir.iterdir():
            if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name.endswith(".tmp"):
                shutil.rmtree(p, ignore_errors=True)  # crashed writes
        if keep and keep > 0:
            done = sorted((s, p) for p in self.ckpt_dir.iterdir() if (s := _checkpoint_step(p)) is not None)
            for _, p in done[:-keep]:
                shutil.rmtree(p, ignore_errors=True)

    def load_checkpoint(self, path: Path) -> None:
        state = self._trainer_state(path)
        if state["world_size"] != self.world_size:
            raise ValueError(f"checkpoint {path} was written by {state['world_size']} processes, resuming with "
                             f"{self.world_size}: the data streams cannot be resumed exactly")
        loaded = ASARM.from_pretrained(path / "model", device="cpu", dtype=torch.float32, tokenizer=self.tokenizer)
        sizes = ("backbone", "vocab_size", "d_model", "n_layer", "n_head", "d_inner")
        theirs, ours = ([m.backbone.name] + [getattr(m.config, k) for k in sizes[1:]] for m in (loaded, self.asarm))
        if theirs != ours:
            raise ValueError(f"checkpoint {path} holds a model of sizes {dict(zip(sizes, theirs))}, the config asks "
                             f"for {dict(zip(sizes, ours))}; use a new train.run_dir or train.resume=none")
        if self.sharded:  # every process hands the full weights to the sharded module, which keeps its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, loaded.backbone.state_dict(),
                                 options=StateDictOptions(full_state_dict=True))
        else:
            self.asarm.backbone.load_state_dict(loaded.backbone.state_dict())
        if self.head_mode:
            if loaded.draft_head is None:
                raise ValueError(f"checkpoint {path} holds no draft head; use a new train.run_dir or train.resume=none")
            self.asarm.draft_head.load_state_dict(loaded.draft_head.state_dict())
        del loaded
        optimizer = f"optimizer_rank{self.rank}.pt" if self.sharded else "optimizer.pt"
        self.optimizer.load_state_dict(torch.load(path / optimizer, map_location="cpu", weights_only=False))
        self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False))
        if self.accelerator.scaler is not None and (path / "scaler.pt").is_file():
            self.accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=False))
        self.loader.load_state_dict(torch.load(path / f"data_rank{self.rank}.pt", weights_only=False))
        _set_rng_state(torch.load(path / f"rng_rank{self.rank}.pt", weights_only=False), self.generator)
        self.step = int(state["step"])

    @staticmethod
    def _trainer_state(path: Path) -> dict:
        return json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))

    def _checkpoint_to_resume(self) -> Path | None:
        """The checkpoint ``train.resume`` names, after checking that the run it belongs to had the
        same config (up to RESUMABLE_KEYS): a resume otherwise ignores the new settings."""
        resume = self.cfg.train.resume
        if resume in (None, "", "none", "no", "false"):
            return None
        path = latest_checkpoint(self.run_dir) if resume == "auto" else Path(resume)
        if path is None:
            return None
        if not _complete(path):
            raise ValueError(f"train.resume: {path} is not a complete checkpoint (no trainer_state.json)")
        saved = path.parent.parent / "config.yaml"
        if saved.is_file():
            changes = _config_changes(load_config(saved), self.cfg)
            if changes:
                raise ValueError(f"{path} was trained with other settings: {', '.join(changes)}; resuming would "
                                 f"ignore them: use a new train.run_dir, or train.resume=none to start over there")
        return path

    def _start_over(self) -> None:
        """A run that does not resume replaces what an earlier run left in its directory (a stale
        tokenizer, checkpoints the pruning would prefer to the new ones, duplicate metrics)."""
        old = [p for p in (self.ckpt_dir, self.run_dir / "tokenizer", self.run_dir / "tb",
                           self.run_dir / "metrics.jsonl") if p.exists()]
        if old:
            print(f"asarm train: starting over in {self.run_dir}: removing {', '.join(p.name for p in old)}",
                  flush=True)
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()

    def _trim_metrics(self, step: int) -> None:
        """Drop the records of steps after ``step`` (written before a crash), so that after any number
        of resumes metrics.jsonl holds each step once."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        if len(kept) != len(lines):
            write_atomic(path, "".join(kept))

    def maybe_resume(self) -> Path | None:
        """Load the checkpoint chosen at construction, if any."""
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
        return self.resume_from

    # -- logging
    def _open_loggers(self) -> None:
        if not self.is_main:
            return
        if self.cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.run_dir / "tb"))
            except ImportError:
                print("asarm train: tensorboard is not installed; TensorBoard logging is off", file=sys.stderr)
        if self.cfg.log.wandb:
            self.wandb = self._open_wandb()

    def _open_wandb(self):
        """A wandb run holding the resolved config. A resumed run continues the wandb run it started (its
        id is kept in the run directory), so the curve stays one run; a run that starts over begins a new one."""
        import wandb

        lc = self.cfg.log
        id_file = self.run_dir / WANDB_ID_FILE
        run_id = None
        if self.resume_from is not None and id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip() or None
        try:
            run = wandb.init(project=lc.wandb_project, entity=lc.wandb_entity, job_type="train",
                             name=lc.wandb_run_name or self.run_dir.name, id=run_id,
                             resume="allow" if run_id else None,
                             # the run directory holds the wandb files too, unless WANDB_DIR says otherwise
                             dir=None if os.environ.get("WANDB_DIR") else str(self.run_dir))
        except wandb.errors.Error as err:  # no API key, no network: one line, not a traceback
            raise ValueError(f"log.wandb: {err} (WANDB_MODE=offline logs without an account)") from None
        # after init, with allow_val_change: a resume may change log.*, eval.* or train.max_steps
        run.config.update({**config_to_dict(self.cfg), "resolved": self.resolved}, allow_val_change=True)
        write_atomic(id_file, run.id + "\n")
        return run

    def log(self, record: dict, to_trackers: bool = True) -> None:
        """Append ``record`` to metrics.jsonl and, with ``to_trackers``, send its numbers to TensorBoard and wandb
        (the training loop sends every ``log.every``-th step; metrics.jsonl holds every step)."""
        if not self.is_main:
            return
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if not to_trackers:
            return
        kind = record.get("kind", "train")
        scalars = {f"{kind}/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    # -- evaluation
    @torch.no_grad()
    def evaluate(self, model: ASARM | None = None) -> dict:
        """Oracle NLL per token on the first ``eval.batches`` held-out batches, with any-subset orders
        at ``eval.masking_rate`` drawn from a fixed seed (comparable across steps), plus ASSD samples.
        ``model``: the model with full weights (default: the one trained; see :meth:`_unsharded`)."""
        model = self.asarm if model is None else model
        ec = self.cfg.eval
        gen = torch.Generator().manual_seed(ec.seed)
        stream = PackedStream(build_source(self.cfg, "heldout"), self.encode, max_length=self.cfg.data.max_length,
                              rank=0, world_size=1, epochs=1)
        loader = StreamLoader(stream, batch_size=ec.batch_size or self.cfg.data.batch_size,
                              generator=torch.Generator().manual_seed(ec.seed))
        total_nll, total_tokens, first = 0.0, 0, None
        accepted, drafted = 0.0, 0.0  # draft_head.train: expected acceptance per slot, summed over rows
        device = self.accelerator.device
        with _evaluation_mode(model):
            for i, tokens in enumerate(loader):
                if i >= ec.batches:
                    break
                tokens = tokens.to(device)
                batch, length = tokens.shape
                n_prompt = orders.num_prompt_for_rate(ec.masking_rate, torch.full((batch,), length))
                sigma = orders.any_subset(n_prompt, length, batch_size=batch, generator=gen).to(device)
                with self.accelerator.autocast():
                    if self.head_mode:
                        n = draft_points(n_prompt, length, gen).to(device)
                        _, stats = distillation_loss(model, model.draft_head, tokens, sigma, n_prompt.to(device), n,
                                                     self.cfg.draft_head.slots, gen)
                        slot_rows = stats["drafted"].double().cpu()
                        accepted += stats["acceptance"].double().cpu() * slot_rows
                        drafted += slot_rows
                    logp = model.score(tokens, sigma, n_prompt.to(device))
                total_nll -= float(logp.double().sum())
                total_tokens += int((length - n_prompt).sum())
                if first is None:
                    first = (tokens, sigma, n_prompt)
            record = {"kind": "eval", "step": self.step, "nll_per_token": total_nll / max(total_tokens, 1),
                      "eval_tokens": total_tokens}
            if self.head_mode:
                by_slot = accepted / drafted.clamp(min=1)
                record.update(acceptance=float(accepted.sum() / drafted.sum().clamp(min=1)),
                              acceptance_by_slot=[round(float(a), 4) for a in by_slot])
            if ec.samples > 0 and first is not None:
                from ..sampling import assd_decode
                tokens, sigma, n_prompt = (x[:ec.samples] for x in first)
                drafter = "head" if self.head_mode else "self"
                out = assd_decode(model, tokens, sigma, n_prompt.to(device), k=ec.sample_k, seed=ec.seed,
                                  drafter=drafter)
                record["assd_nfe"] = float(out.nfe.double().mean())
                record["assd_tokens_per_nfe"] = float(out.tokens_per_call.mean())
                if self.tokenizer is not None:
                    record["samples"] = [self.tokenizer.decode(row.tolist()) for row in out.tokens.cpu()]
        return record

    def _run_eval(self) -> None:
        model = self._unsharded()
        if self.is_main:
            self.log(self.evaluate(model))
        self.accelerator.wait_for_everyone()

    def _unsharded(self) -> ASARM | None:
        """The model with its full weights on the main process (None elsewhere). Under FSDP each process holds a
        shard: every process takes part in gathering them into the main process's copy (``self.gathered``)."""
        if not self.sharded:
            return self.asarm
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # torch's API for both FSDP versions (accelerate's FSDP1 on GPUs, fully_shard on CPUs); cpu_offload: the
        # full tensors on the main process only, on its CPU
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.is_main:
            self.gathered.backbone.load_state_dict(state)
            return self.gathered
        return None

    # -- the loop
    def fit(self) -> dict:
        cfg, acc = self.cfg, self.accelerator
        run = cfg.train
        resumed = self.maybe_resume()
        stop = min(run.max_steps, run.stop_at) if run.stop_at is not None else run.max_steps
        if resumed is not None and self.is_main:
            print(f"asarm train: resumed {self.run_dir} at step {self.step} ({resumed})", flush=True)
        if resumed is not None and self.step >= stop:
            if self.is_main:
                key = "train.stop_at" if stop < run.max_steps else "train.max_steps"
                print(f"asarm train: nothing to do: the checkpoint is at step {self.step} and {key}={stop}; raise "
                      f"{key} to train longer", flush=True)
            return {"step": self.step, "losses": {}, "checkpoint": str(resumed), "run_dir": str(self.run_dir)}
        self.resolved = {"world_size": self.world_size, "effective_batch": self.effective_batch, "lr": self.lr,
                         "device": str(acc.device), "vocab_size": self.asarm.vocab_size,
                         "parameters": sum(p.numel() for p in self.model.parameters()),  # trained ones
                         "resumed_from": str(resumed) if resumed else None}
        if self.is_main:
            save_config(cfg, self.run_dir / "config.yaml", extra=self.resolved)
        self._open_loggers()
        progress = None
        if self.is_main and cfg.log.progress:
            from tqdm.auto import tqdm
            progress = tqdm(total=run.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        losses: dict[int, float] = {}
        start_step = self.step
        self.model.train()
        batches = iter(self.loader)
        tokens_seen = 0
        grad_norm = None
        t0 = time.time()
        while self.step < stop:
            step_loss = torch.zeros((), device=acc.device)
            step_stats = torch.zeros(3, device=acc.device)  # nll_per_token, accuracy, mean masking rate
            for a in range(run.grad_accum):
                try:
                    tokens = next(batches)
                except StopIteration:
                    if cfg.data.epochs is None:  # an endless stream only ends when it has no document at all
                        raise _no_training_data(cfg) from None
                    raise ValueError(f"the training data ran out after data.epochs={cfg.data.epochs} before "
                                     f"train.max_steps={run.max_steps}; raise data.epochs or set it to null") from None
                tokens = tokens.to(acc.device)
                rates = self.schedule.sample(self.step, a, run.grad_accum, self.rank, self.world_size,
                                             batch_size=tokens.shape[0], per_sequence=cfg.masking.per_sequence,
                                             generator=self.generator)
                with acc.accumulate(self.model):
                    with acc.autocast():
                        if self.head_mode:
                            loss, stats = self._head_loss(tokens, rates)
                        else:
                            loss, stats = compute_loss(self.forward_model, tokens, self.objective,
                                                       generator=self.generator, rates=rates)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.optim.grad_clip > 0:
                        grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                    elif acc.sync_gradients:
                        grad_norm = None
                step_loss += loss.detach().float() / run.grad_accum
                step_stats += torch.stack([stats["nll_per_token"].float(), stats["accuracy"].float(),
                                           stats["mean_masking_rate"].float()]).detach() / run.grad_accum
                tokens_seen += tokens.numel()
            lr_used = self.scheduler.get_last_lr()[0]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            gathered = acc.reduce(torch.cat([step_loss[None], step_stats]), reduction="mean")
            loss_value = float(gathered[0])
            losses[self.step] = loss_value
            first, second = ("cross_entropy", "acceptance") if self.head_mode else ("nll_per_token", "accuracy")
            record = {"kind": "train", "step": self.step, "loss": loss_value, first: float(gathered[1]),
                      second: float(gathered[2]), "masking_rate": float(gathered[3]),
                      "lr": lr_used,
                      "grad_norm": float(grad_norm) if grad_norm is not None else None,
                      "tokens_per_s": tokens_seen * self.world_size / max(time.time() - t0, 1e-9)}
            self.log(record, to_trackers=self.step % max(cfg.log.every, 1) == 0 or self.step == stop)
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}")
            if cfg.eval.every > 0 and self.step % cfg.eval.every == 0 and self.step < run.max_steps:
                self._run_eval()
            if run.save_every > 0 and self.step % run.save_every == 0 and self.step < stop:
                self.save_checkpoint()
        if progress is not None:
            progress.close()
        final = latest_checkpoint(self.run_dir)
        if final is None or _checkpoint_step(final) != self.step:  # the final (or interrupted-at) step
            final = self.save_checkpoint()
        if self.step >= run.max_steps and cfg.eval.at_end and self.step > start_step:
            self._run_eval()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            # the last logged value of every metric is in the summary already; add where the run ended
            self.wandb.summary.update({"step": self.step, "checkpoint": str(final)})
            self.wandb.finish()
        acc.wait_for_everyone()
        if self.is_main:
            print(self._closing_line(final), flush=True)
        return {"step": self.step, "losses": losses, "checkpoint": str(final), "run_dir": str(self.run_dir)}

    def _closing_line(self, checkpoint: Path) -> str:
        """Where the run ended and the command that goes on from there: the resume of a run stopped before
        train.max_steps (train.stop_at), else the export of its model (scripts/export_model.py)."""
        run = self.cfg.train
        where = f"checkpoint {checkpoint}, run directory {self.run_dir}"
        if self.step < run.max_steps:
            # the run directory's resolved config is this run's; a resume picks up checkpoints/latest
            overrides = ["train.stop_at=null"] + ([] if run.resume == "auto" else ["train.resume=auto"])
            return (f"asarm train: stopped at step {self.step} of {run.max_steps}; {where}; resume: "
                    f"{self._resume_command(overrides)}")
        dest = Path("exports") / self.run_dir.name
        return (f"asarm train: finished at step {self.step}; {where}; export: python scripts/export_model.py "
                f"{shlex.quote(str(self.run_dir))} {shlex.quote(str(dest))}")

    def _resume_command(self, overrides: list[str]) -> str:
        """The command that continues this run with its saved config, on as many processes as it ran on (a resume
        needs as many, each reloading its own data stream): the launch the README gives for that layout."""
        config, args = shlex.quote(str(self.run_dir / "config.yaml")), " ".join(overrides)
        n, per_node = self.world_size, int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))
        if n == 1:
            return f"asarm train --config {config} {args}"
        if self.sharded:
            launch = f"accelerate launch --config_file configs/accelerate_fsdp.yaml --num_processes {n}"
            if self.accelerator.device.type == "cpu":  # accelerate refuses this setting where no GPU is present
                launch += " --fsdp_sync_module_states false"
        elif per_node < n:  # several nodes: the job script, which starts one torchrun a node
            return f"NPROC={per_node} sbatch --nodes {n // per_node} _run_training.sh {config} {args}"
        else:
            launch = f"torchrun --nproc_per_node {n}"
        return f"{launch} -m asarm.training.trainer --config {config} {args}"


def run_training(cfg: TrainConfig) -> dict:
    """Train with a loaded config; returns ``{"step", "losses" (step -> loss), "checkpoint", "run_dir"}``."""
    return Trainer(cfg).fit()


def train(config_path: str | os.PathLike | None, overrides=()) -> dict:
    """``asarm train --config PATH [section.key=value ...]``: load, override, train."""
    return run_training(load_config(config_path, list(overrides or ())))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asarm.training.trainer", description="Train an AS-ARM.")
    parser.add_argument("--config", default=None, help="YAML config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=3e-4 train.max_steps=10")
    args = parser.parse_args(argv)
    try:
        train(args.config, args.overrides)
    except (ValueError, OSError) as err:  # the same one-line report as `asarm train`
        print(f"asarm train: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
