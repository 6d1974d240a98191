"""Trainer configuration: nested dataclasses loaded from YAML, with dotted CLI overrides.

    cfg = load_config("configs/tiny_cpu.yaml", ["optim.lr=3e-4", "train.max_steps=100"])
    save_config(cfg, run_dir / "config.yaml")     # the resolved config, written atomically

Override values are parsed as YAML (``true``, ``null``, ``[1, 2]``) and then coerced to the field's
declared type, so ``optim.lr=3e-4`` gives a float even though YAML 1.1 reads ``3e-4`` as a string.
Unknown keys raise ``ValueError`` (a typo must not silently train with the default).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import types
import typing
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from ..checks import check_choice, check_integer, check_number
from ..inputs import read_yaml
from .objectives import LOSS_SCALES, OBJECTIVES, ORDERS, PROMPT_ATTN, REDUCTIONS, ObjectiveConfig, \
    check_slot_weights, mixture_probabilities

__all__ = ["ModelSection", "DataSection", "OptimSection", "MaskingSection", "EvalSection", "LogSection",
           "RunSection", "DraftHeadSection", "TrainConfig", "load_config", "apply_overrides", "config_from_dict",
           "config_to_dict", "save_config"]


@dataclass
class ModelSection:
    """``init``: a Hub name or local directory to start from (``ASARM.from_pretrained``, e.g.
    ``xlnet/xlnet-base-cased``); None builds a random model of ``backbone`` (asarm.backbones: ``xlnet``, the
    default, or ``rope``, the rotary two-stream transformer; there ``d_inner`` is the gated MLP's width) and
    the sizes below. With ``init``, ``backbone`` may only repeat the checkpoint's. ``attention_dropout`` (rope only;
    XLNet's ``dropout`` covers its attention too): dropout on the attention probabilities, default 0."""

    init: str | None = None
    revision: str | None = None
    backbone: str | None = None
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    d_inner: int = 3072
    dropout: float = 0.1
    attention_dropout: float | None = None
    init_std: float | None = None
    # tokenizer: a path / Hub name (None: the data directory's xlnet-base-cased, else the Hub);
    # tokenizer_vocab_size > 0 trains a SentencePiece vocabulary on the training text into run_dir/tokenizer
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 0
    tokenizer_max_documents: int | None = None

    def __post_init__(self):
        from ..backbones import BACKBONES

        if self.backbone is not None and self.backbone not in BACKBONES:
            raise ValueError(f"model.backbone must be one of {', '.join(sorted(BACKBONES))}, got {self.backbone!r}")
        if self.attention_dropout is not None and self.backbone != "rope":
            raise ValueError("model.attention_dropout is an option of model.backbone: rope (XLNet's model.dropout "
                             "covers its attention too); drop it or set model.backbone: rope")
        # the backbone's own check, as ASARM.from_config runs it, but naming the keys of this section
        fields = dict(d_model=self.d_model, n_layer=self.n_layer, n_head=self.n_head, d_inner=self.d_inner,
                      dropout=self.dropout)
        if self.attention_dropout is not None:
            fields["attention_dropout"] = self.attention_dropout
        BACKBONES[self.backbone or "xlnet"].check_config(fields, "model.")
        check_number("model.init_std", self.init_std, 0, or_none=True)
        # 20: train_tokenizer's least size (XLNet's nine special pieces and the code escapes come first)
        size = self.tokenizer_vocab_size
        if isinstance(size, bool) or not isinstance(size, int) or (size != 0 and size < 20):
            raise ValueError(f"model.tokenizer_vocab_size={size!r} must be 0 (use model.tokenizer as it is) or an "
                             f"integer >= 20 (the size of a new SentencePiece vocabulary)")
        check_integer("model.tokenizer_max_documents", self.tokenizer_max_documents, 1, or_none=True)


DATA_SOURCES = ("text", "jsonl", "code_dir", "hub")


@dataclass
class DataSection:
    """``source``: ``text`` (files cut by ``unit``), ``jsonl`` (``field``), ``code_dir`` (``root`` +
    ``patterns``) or ``hub`` (``hub_preset`` of ``asarm.training.data.HUB_PRESETS``). Local paths are
    resolved with ``asarm.paths.data_file``."""

    source: str = "text"
    paths: list[str] = dataclasses.field(default_factory=list)
    unit: str = "line"
    field: str = "text"
    root: str | None = None
    patterns: list[str] = dataclasses.field(default_factory=lambda: ["**/*.py"])
    hub_preset: str | None = None
    code: bool = False
    heldout_fraction: float = 0.05
    heldout_mode: str = "tail"
    max_length: int = 512
    batch_size: int = 8  # per device micro-batch
    num_workers: int = 0
    epochs: int | None = None  # None: loop over the data forever

    def __post_init__(self):
        from .data import HUB_PRESETS

        check_choice("data.source", self.source, DATA_SOURCES)
        if self.source == "hub":
            check_choice("data.hub_preset", self.hub_preset, HUB_PRESETS)
        check_choice("data.unit", self.unit, ("line", "paragraph", "file"))
        check_choice("data.heldout_mode", self.heldout_mode, ("tail", "hash"))
        check_number("data.heldout_fraction", self.heldout_fraction, 0, 1, high_open=True)
        check_integer("data.max_length", self.max_length, 2)  # a prompt token and a target at least
        check_integer("data.batch_size", self.batch_size, 1)
        check_integer("data.num_workers", self.num_workers, 0)
        check_integer("data.epochs", self.epochs, 1, or_none=True)


@dataclass
class OptimSection:
    lr: float = 1e-5
    lr_scale_by_batch: bool = True  # lr x effective_batch / lr_reference_batch (the reference's rule)
    lr_reference_batch: int = 32
    weight_decay: float = 0.01
    betas: list[float] = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 5000
    decay: str = "linear"  # linear decay to 0 at train.max_steps, or "constant"
    grad_clip: float = 1.0  # <= 0: no clipping

    def __post_init__(self):
        check_number("optim.lr", self.lr, 0, low_open=True)
        check_integer("optim.lr_reference_batch", self.lr_reference_batch, 1)
        check_number("optim.weight_decay", self.weight_decay, 0)
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas={self.betas!r} must be two numbers in [0, 1), e.g. [0.9, 0.999]")
        for beta in self.betas:
            check_number("optim.betas", beta, 0, 1, high_open=True)
        check_number("optim.eps", self.eps, 0, low_open=True)
        check_integer("optim.warmup_steps", self.warmup_steps, 0)
        check_choice("optim.decay", self.decay, ("linear", "constant"))
        check_number("optim.grad_clip", self.grad_clip)


_OBJECTIVE_DEFAULTS = ObjectiveConfig()


@dataclass
class MaskingSection:
    """Masking-rate schedule (``asarm.training.schedule.MaskingRateSchedule``) and objective
    (``asarm.training.objectives.ObjectiveConfig``) settings."""

    start_masking_rate: float = _OBJECTIVE_DEFAULTS.min_masking_rate
    final_min_masking_rate: float = _OBJECTIVE_DEFAULTS.min_masking_rate
    final_max_masking_rate: float = _OBJECTIVE_DEFAULTS.max_masking_rate
    masking_warmup_steps: int = 0
    # objective fields: the defaults are ObjectiveConfig's, so the two never disagree
    objective: str = _OBJECTIVE_DEFAULTS.objective
    order: str = _OBJECTIVE_DEFAULTS.order
    prompt_attn: str = _OBJECTIVE_DEFAULTS.prompt_attn
    loss_scale: str = _OBJECTIVE_DEFAULTS.loss_scale
    reduction: str = _OBJECTIVE_DEFAULTS.reduction
    per_sequence: bool = _OBJECTIVE_DEFAULTS.per_sequence
    min_prompt: int = _OBJECTIVE_DEFAULTS.min_prompt
    # objective mixture, e.g. {joint: 0.7, parallel: 0.3}: each sequence draws its objective with these
    # weights (normalised); when given it replaces `objective`, and parallel rows use `prompt_attn`
    mixture: dict[str, float] | None = None
    # parallel loss weight per draft slot [w1, w2, ...]; slots past the list take the last; [] = all 1
    slot_weights: list[float] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        # checked here (as MaskingRateSchedule and ObjectiveConfig would) so that a bad value fails when the config
        # loads, naming its key
        for key in ("start_masking_rate", "final_min_masking_rate", "final_max_masking_rate"):
            check_number(f"masking.{key}", getattr(self, key), 0, 1, low_open=True, high_open=True)
        if self.final_min_masking_rate > self.final_max_masking_rate:
            raise ValueError(f"masking.final_min_masking_rate={self.final_min_masking_rate} must not exceed "
                             f"masking.final_max_masking_rate={self.final_max_masking_rate}; swap them")
        check_integer("masking.masking_warmup_steps", self.masking_warmup_steps, 0)
        for key, allowed in (("objective", OBJECTIVES), ("order", ORDERS), ("prompt_attn", PROMPT_ATTN),
                             ("loss_scale", LOSS_SCALES), ("reduction", REDUCTIONS)):
            check_choice(f"masking.{key}", getattr(self, key), allowed)
        check_integer("masking.min_prompt", self.min_prompt, 1)  # XLNet's query stream needs a visible token
        probabilities = {self.objective: 1.0}
        if self.mixture is not None:
            probabilities = mixture_probabilities(self.mixture, "masking.mixture")
        check_slot_weights(self.slot_weights, "masking.slot_weights", probabilities)


@dataclass
class EvalSection:
    every: int = 500  # 0: only at the end
    batches: int = 4  # held-out micro-batches scored
    batch_size: int | None = None  # default: data.batch_size
    masking_rate: float = 0.95
    seed: int = 1234
    samples: int = 2  # ASSD samples (0: none)
    sample_k: int = 5
    at_end: bool = True

    def __post_init__(self):
        check_integer("eval.every", self.every, 0)
        check_integer("eval.batches", self.batches, 1)
        check_integer("eval.batch_size", self.batch_size, 1, or_none=True)
        check_number("eval.masking_rate", self.masking_rate, 0, 1, low_open=True, high_open=True)
        check_integer("eval.seed", self.seed, 0)
        check_integer("eval.samples", self.samples, 0)
        check_integer("eval.sample_k", self.sample_k, 1)


@dataclass
class LogSection:
    """``wandb``: also log to Weights & Biases (needs the ``wandb`` extra; ``WANDB_MODE=offline`` works
    without an account). The run's id is kept in ``run_dir/wandb_run_id``, so a resume continues the same
    wandb run; ``wandb_run_name`` None: the run directory's name; ``wandb_entity`` None: wandb's default."""

    every: int = 10
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "asarm"
    wandb_run_name: str | None = None
    wandb_entity: str | None = None
    progress: bool = True

    def __post_init__(self):
        check_integer("log.every", self.every, 1)


@dataclass
class RunSection:
    run_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 1000  # optimizer steps
    stop_at: int | None = None  # stop (with a checkpoint) at this step, as if interrupted
    grad_accum: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16
    cpu: bool = False  # force CPU (gloo for multi-process)
    compile: bool = False
    save_every: int = 1000
    keep_last: int = 3
    resume: str = "auto"  # auto | none | path of a checkpoint directory

    def __post_init__(self):
        # YAML reads a bare `no` as the boolean false, which arrives here as "False"
        if self.mixed_precision in ("False", "false"):
            self.mixed_precision = "no"
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"train.mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        check_integer("train.seed", self.seed, 0, 2**32 - 1)  # numpy's seed range (accelerate's set_seed)
        check_integer("train.max_steps", self.max_steps, 1)
        check_integer("train.stop_at", self.stop_at, 1, or_none=True)
        check_integer("train.grad_accum", self.grad_accum, 1)
        check_integer("train.save_every", self.save_every, 0)
        check_integer("train.keep_last", self.keep_last, 0)


DRAFT_HEAD_KINDS = ("chain", "one-pass")  # asarm.draft_head.HEAD_KINDS (named here: this module imports no torch)


@dataclass
class DraftHeadSection:
    """``train: true`` trains a chained draft head (asarm.draft_head) for the frozen model ``model.init`` by
    self-distillation (asarm.training.draft_head) instead of training the model; ``asarm train-draft-head``
    sets it. ``kind``: ``chain`` (a GRU step per slot) or ``one-pass`` (every slot in one step, a low-rank
    correction from the previous token; ``rank``: its rank); ``slots``: drafts unrolled per training row;
    ``hidden``: the head's MLP width (None: 2 d_model for a chain, d_model for one-pass); ``vocab_size``: a
    truncated draft vocabulary of the most frequent tokens in the first ``vocab_batches`` training batches (None:
    the whole vocabulary; chain heads only)."""

    train: bool = False
    kind: str = "chain"
    slots: int = 4
    hidden: int | None = None
    max_offset: int = 8
    rank: int = 32
    vocab_size: int | None = None
    vocab_batches: int = 200

    def __post_init__(self):
        check_choice("draft_head.kind", self.kind, DRAFT_HEAD_KINDS)
        if self.kind != "chain" and self.vocab_size is not None:
            raise ValueError(f"draft_head.vocab_size (a truncated draft vocabulary) is for chain heads, not "
                             f"{self.kind}: set draft_head.vocab_size=null")
        check_integer("draft_head.rank", self.rank, 1)
        if self.slots < 1:
            raise ValueError(f"draft_head.slots must be >= 1, got {self.slots}")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ValueError(f"draft_head.vocab_size must be >= 2 or null (the whole vocabulary), "
                             f"got {self.vocab_size}")
        check_integer("draft_head.hidden", self.hidden, 1, or_none=True)
        check_integer("draft_head.max_offset", self.max_offset, 1)
        check_integer("draft_head.vocab_batches", self.vocab_batches, 1)


@dataclass
class TrainConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    masking: MaskingSection = dataclasses.field(default_factory=MaskingSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)
    log: LogSection = dataclasses.field(default_factory=LogSection)
    train: RunSection = dataclasses.field(default_factory=RunSection)
    draft_head: DraftHeadSection = dataclasses.field(default_factory=DraftHeadSection)

    def __post_init__(self):
        # the settings that only make sense together, across sections
        if self.masking.min_prompt >= self.data.max_length:
            raise ValueError(f"masking.min_prompt={self.masking.min_prompt} leaves nothing to predict in "
                             f"data.max_length={self.data.max_length} tokens; lower it or raise data.max_length")
        evaluates = self.eval.every > 0 or self.eval.at_end
        if evaluates and self.data.heldout_fraction == 0:
            raise ValueError("data.heldout_fraction=0 holds out no text for the evaluations; raise it, or set "
                             "eval.every=0 and eval.at_end=false")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _coerce(value, hint, where: str):
    """``value`` converted to type ``hint`` (handles ``X | None``, ``list[X]``, int/float/bool/str)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a mapping such as {{a: 1, b: 2}}, got {value!r}")
        key_hint, value_hint = args or (str, str)
        return {_coerce(k, key_hint, where): _coerce(v, value_hint, f"{where}.{k}") for k, v in value.items()}
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return [_coerce(v, args[0] if args else str, where) for v in value]
    try:
        if hint is bool:
            if isinstance(value, str):
                low = value.lower()
                if low in ("true", "yes", "1", "on"):
                    return True
                if low in ("false", "no", "0", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and ("e" in value.lower() or "." in value) \
                else int(value)
        if hint is float:
            return float(value)
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: cannot read {value!r} as {getattr(hint, '__name__', hint)}") from None
    return value


def _build(cls, data: dict | None, where: str):
    data = dict(data or {})
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data.pop(f.name)
        hint = hints[f.name]
        name = f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"{name} must be a mapping")
            kwargs[f.name] = _build(hint, value, name)
        else:
            kwargs[f.name] = _coerce(value, hint, name)
    if data:
        raise ValueError(f"unknown config key(s) in {where or 'top level'}: {sorted(data)}")
    return cls(**kwargs)


def config_from_dict(data: dict | None) -> TrainConfig:
    data = dict(data or {})
    data.pop("resolved", None)  # derived values written by save_config
    return _build(TrainConfig, data, "")


def config_to_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


def apply_overrides(cfg: TrainConfig, overrides) -> TrainConfig:
    """A new config with ``section.key=value`` overrides applied (values parsed as YAML, then typed)."""
    data = config_to_dict(cfg)
    for item in overrides or ():
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"unknown config key {key!r}")
            node = node[part]
        # a section cannot be replaced by a value; inside a mapping-valued field (masking.mixture.joint)
        # new keys are allowed, the field's own check judges them
        in_field = len(parts) > 2
        if not isinstance(node, dict) or len(parts) < 2 or (parts[-1] not in node and not in_field):
            raise ValueError(f"unknown config key {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node[parts[-1]] = value
    return config_from_dict(data)


def load_config(path: str | os.PathLike | None = None, overrides=None) -> TrainConfig:
    """The config in the YAML file ``path`` (None: defaults) with dotted ``overrides`` applied."""
    data = {}
    if path is not None:
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: the config must be a mapping of sections (model:, data:, train:, ...)")
    return apply_overrides(config_from_dict(data), overrides)


def save_config(cfg: TrainConfig, path: str | os.PathLike, extra: dict | None = None) -> None:
    """Write the resolved config (plus ``extra`` derived values under ``resolved``) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = config_to_dict(cfg)
    if extra:
        data["resolved"] = extra
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)
    os.replace(tmp, path)
