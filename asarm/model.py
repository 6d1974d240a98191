"""The AS-ARM model: a backbone (asarm.backbones: XLNet or the rotary two-stream transformer) plus its
tokenizer, with any-order scoring.

Load a released checkpoint from the Hugging Face Hub (``ASARM.from_pretrained("therealgabeguo/ASARM",
revision="nlp")``), a local directory, or build a small random model from a config (tests).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from safetensors import SafetensorError
from transformers import XLNetConfig, XLNetLMHeadModel

from . import masks
from .backbones import Backbone, XLNetBackbone, backbone_class, backbone_of_model_type
from .backbones.xlnet import XLNET_BASE_SIZES
from .draft_head import HEAD_CONFIG, HEAD_WEIGHTS, DraftHead, load_draft_head, save_draft_head
from .inputs import check_model_dir, read_json, read_yaml
from .orders import check_token_ids, positions_by_rank, positions_of_ranks
from .offline import hub_offline, offline_reason
from .paths import DEFAULT_MODEL, EMBEDDED_MODELS
from .resources import pick_device

__all__ = ["ASARM", "ModelLoadError", "NonFiniteLogitsError", "pick_device", "hub_offline", "HUB_REPO",
           "HUB_REVISIONS", "XLNET_MASK_TOKEN_ID", "XLNET_BASE_SIZES", "EMBEDDED_MODELS", "DEFAULT_MODEL",
           "StoredDefaults", "SAMPLER_DEFAULTS", "MODEL_DEFAULTS_FILE"]

HUB_REPO = "therealgabeguo/ASARM"
# Branches of HUB_REPO (spec section 1); "xlnet-base-cased" is the off-the-shelf baseline.
HUB_REVISIONS = ("nlp", "nlp_210k_plus_75k", "code", "xlnet-base-cased")
XLNET_MASK_TOKEN_ID = 6
FALLBACK_TOKENIZER = "xlnet/xlnet-base-cased"
# Models shipped inside the package, loadable by name offline (see asarm/models/*/README.md).
_ASARM_FILE = "asarm.json"


class ModelLoadError(OSError):
    """A checkpoint could not be loaded (missing path, offline, unknown repository or revision)."""


class NonFiniteLogitsError(ValueError):
    """The model produced NaN or infinite logits (corrupt weights or a diverged checkpoint)."""


def check_finite(logits: torch.Tensor) -> torch.Tensor:
    """``logits``, unless some are NaN or infinite: those would turn into NaN scores or arbitrary samples
    downstream, never an error. (One float64 sum is NaN or infinite exactly when some element is: finite
    logits are far too small to overflow it. Two ops instead of isfinite's five, on every sampler call.)"""
    if not math.isfinite(logits.sum(dtype=torch.float64).item()):
        raise NonFiniteLogitsError("the model's logits are not finite (NaN or inf): its weights are corrupt or its "
                                   "training diverged; use another checkpoint")
    return logits


def _load_tokenizer(name_or_path: str, revision: str | None, offline: bool = False, xlnet_layout: bool = False):
    """``xlnet_layout``: the directory's config.json is not a transformers config (another backbone) but its
    tokenizer has XLNet's special-token layout; say so instead of letting transformers read that config."""
    from transformers import AutoTokenizer

    config = XLNetConfig() if xlnet_layout else None
    try:
        return AutoTokenizer.from_pretrained(name_or_path, revision=revision, local_files_only=offline, config=config)
    except (OSError, ValueError):
        return None


def _local_model_dir(source: str) -> Path | None:
    """The directory of a local or embedded model, None for a Hub name; ModelLoadError for a path
    that is missing or holds no model."""
    local = Path(source).expanduser()
    if source in EMBEDDED_MODELS and not local.exists():
        local = EMBEDDED_MODELS[source]
    if not local.exists():
        if source.startswith((".", "/", "~")) or os.sep in source.strip("/").split("/", 1)[-1]:
            raise ModelLoadError(f"model directory {source!r} does not exist")
        return None
    if not (local / "config.json").exists():
        raise ModelLoadError(f"{source!r} is not a model directory: it has no config.json")
    return local


def _hub_metadata_dir(repo: str, revision: str | None, offline: bool) -> Path | None:
    """The cached snapshot folder of a Hub model's optional asarm files (asarm.json, training_config.yaml,
    the draft head), so that a Hub load knows what a local load knows; None when the repository has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    folder = None
    for name in (_ASARM_FILE, "training_config.yaml", HEAD_CONFIG, HEAD_WEIGHTS):
        try:
            folder = Path(hf_hub_download(repo, name, revision=revision, local_files_only=offline)).parent
        except (EntryNotFoundError, LocalEntryNotFoundError, OSError):  # optional: absent from the repository
            continue
    return folder


def _model_type(local: Path | None, repo: str, revision: str | None, offline: bool) -> str | None:
    """config.json's ``model_type`` (which backbone reads the checkpoint); None when it cannot be read here (the
    load that follows then says why)."""
    if local is not None:
        path = local / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(repo, "config.json", revision=revision, local_files_only=offline))
        except Exception:  # noqa: BLE001 - offline, unknown repository or revision: explained by the load itself
            return None
    try:
        return read_json(path).get("model_type")
    except (OSError, ValueError):
        return None


def _trained_length(local: Path | None) -> int | None:
    """The sequence length a local model was trained at (asarm.json, else its training config)."""
    if local is None:
        return None
    if (local / _ASARM_FILE).exists():
        length = read_json(local / _ASARM_FILE).get("trained_length")
        if length:
            return int(length)
    if (local / "training_config.yaml").exists():
        length = (read_yaml(local / "training_config.yaml") or {}).get("data", {}).get("max_length")
        return int(length) if length else None
    return None


# The key of the sampler defaults a model stores in asarm.json (for its own drafts) and a draft head in
# draft_head.json (for its drafts), measured on them (asarm.eval.sampler_defaults); asarm.sampling.spec checks and
# applies them. asarm.json, not config.json: config.json is the backbone's (the rotary one refuses unknown fields).
SAMPLER_DEFAULTS = "sampler_defaults"
MODEL_DEFAULTS_FILE = _ASARM_FILE  # the file of a model's own (its drafts' defaults)


class StoredDefaults(NamedTuple):
    """The sampler defaults stored in ``file`` (``values``: setting -> value, as written there)."""

    file: str
    values: dict


def _stored_defaults(file: Path, fields: dict) -> StoredDefaults | None:
    values = fields.get(SAMPLER_DEFAULTS)
    if values is None:
        return None
    if not isinstance(values, dict):
        raise ModelLoadError(f"{file}: {SAMPLER_DEFAULTS} must be an object of setting: value, got {values!r}; "
                             f"fix or delete it")
    return StoredDefaults(str(file), values)


class ASARM(nn.Module):
    """An any-subset autoregressive model.

    Args:
        backbone: the network (an ``asarm.backbones.Backbone``; an ``XLNetLMHeadModel`` is wrapped in one).
        tokenizer: its tokenizer (optional; needed only to encode or decode text).
        mask_token_id: the placeholder id, never sampled (XLNet's ``<mask>`` = 6 by default).
    """

    # the sequence length the model was trained at, when known (asarm.json / training_config.yaml);
    # longer inputs ask XLNet for relative positions it never saw
    trained_length: int | None = None
    # the sampler defaults stored with it (asarm.json), when it has any; its draft head's are the head's own
    # ``sampler_defaults`` (draft_head.json), so that they go where the head goes
    sampler_defaults: StoredDefaults | None = None

    def __init__(self, backbone: Backbone | XLNetLMHeadModel, tokenizer=None, mask_token_id: int | None = None):
        super().__init__()
        if isinstance(backbone, XLNetLMHeadModel):
            backbone = XLNetBackbone(backbone)
        self.backbone = backbone.eval()
        self.tokenizer = tokenizer
        if mask_token_id is None:
            mask_token_id = getattr(tokenizer, "mask_token_id", None)
        if mask_token_id is None:
            mask_token_id = XLNET_MASK_TOKEN_ID
        if not 0 <= mask_token_id < backbone.vocab_size:
            raise ValueError(f"mask_token_id {mask_token_id} is outside the vocabulary of size {backbone.vocab_size}")
        self.mask_token_id = int(mask_token_id)
        self.draft_head: DraftHead | None = None  # the chained draft head (asarm.draft_head), when one is attached

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, revision: str | None = None, device=None,
                        dtype: torch.dtype | None = None, tokenizer=None) -> "ASARM":
        """Load from a local directory, an embedded model (``"asarm-tiny"``, the default of every
        command) or a Hub repository (``name`` + optional ``revision``).

        ``tokenizer`` overrides the tokenizer (an object or a name/path); by default it is loaded
        from the same place, falling back to ``xlnet/xlnet-base-cased`` for Hub checkpoints.
        Raises ModelLoadError with the reason when the path, repository or revision is missing, the
        weights are corrupt, or the Hub is unreachable (one quick check, skipped with ``HF_HUB_OFFLINE=1``;
        then only the local Hugging Face cache is used); ValueError for a revision of a local model.
        """
        source = str(name_or_path)
        local = _local_model_dir(source)
        if local is not None and revision is not None:
            raise ValueError(f"revision {revision!r} applies to Hub models only, not to the local model {source!r}; "
                             f"drop the revision or give a Hub name")
        offline = local is None and hub_offline()
        try:
            kind = backbone_of_model_type(_model_type(local, source, revision, offline))
        except ValueError as err:
            raise ModelLoadError(f"{source!r}: {err}") from err
        if local is not None:
            try:
                check_model_dir(local)  # weights present and whole before a backbone maps them
            except ValueError as err:
                raise ModelLoadError(str(err)) from None
        try:
            model = kind.from_pretrained(str(local or source), revision=revision, dtype=dtype, local_files_only=offline)
        except SafetensorError as err:
            where = f"{local}/model.safetensors" if local else f"the cached model.safetensors of {source!r}"
            raise ModelLoadError(f"{where} is truncated or corrupt ({err}); download or save the model again") from err
        except (OSError, ValueError) as err:
            raise ModelLoadError(_explain_load_failure(source, revision, err, offline)) from err
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = _load_tokenizer(str(tokenizer), None, offline)
        elif tokenizer is None:
            tokenizer = _load_tokenizer(str(local or source), revision, offline, kind is not XLNetBackbone)
            if tokenizer is None and local is None:
                tokenizer = _load_tokenizer(FALLBACK_TOKENIZER, None, offline)
        metadata = local if local is not None else _hub_metadata_dir(source, revision, offline)
        extra = {}
        if metadata is not None and (metadata / _ASARM_FILE).exists():
            extra = read_json(metadata / _ASARM_FILE)
        out = cls(model, tokenizer, extra.get("mask_token_id"))
        out.trained_length = _trained_length(metadata)
        if metadata is not None:
            out.attach_draft_head(load_draft_head(metadata, out.vocab_size, out.backbone.d_model))  # None: no head
            out.sampler_defaults = _stored_defaults(metadata / _ASARM_FILE, extra)
        if out.draft_head is not None:
            head_file = metadata / HEAD_CONFIG
            out.draft_head.sampler_defaults = _stored_defaults(head_file, read_json(head_file))
        return out.to(pick_device(device))

    @classmethod
    def from_config(cls, config: XLNetConfig | dict | None = None, tokenizer=None, mask_token_id: int | None = None,
                    seed: int | None = None, init_std: float | None = None, device=None,
                    dtype: torch.dtype | None = None, backbone: str = "xlnet", **overrides) -> "ASARM":
        """A randomly initialised model on ``backbone`` (a name in ``asarm.backbones.BACKBONES``). ``config``
        is a dict of the backbone config's fields (or an ``XLNetConfig``), or None (base sizes: xlnet-base-cased
        for XLNet; ``XLNetConfig``'s own defaults are xlnet-large); keyword overrides are applied on top.
        ``init_std`` rescales the initial weights (large values give peaked, strongly dependent conditionals:
        useful in tests)."""
        kind = backbone_class(backbone)
        if isinstance(config, XLNetConfig):
            config = config.to_dict()
        fields = dict(XLNET_BASE_SIZES if kind is XLNetBackbone else {}) if config is None else dict(config)
        fields.update(overrides)
        fields.setdefault("dropout", 0.0)
        if init_std is not None:
            fields["initializer_range"] = init_std
        if tokenizer is not None:
            fields.setdefault("vocab_size", len(tokenizer))
        with torch.random.fork_rng(devices=[], enabled=seed is not None):  # a seed leaves the global RNG as it was
            if seed is not None:
                torch.manual_seed(seed)
            model = kind.from_config(fields)
        if dtype is not None:
            model = model.to(dtype)
        return cls(model, tokenizer, mask_token_id).to(pick_device(device))

    def attach_draft_head(self, head: DraftHead | None) -> "ASARM":
        """Use ``head`` as this model's draft head (moved to its device and dtype; saved with it); None detaches."""
        if head is not None and (head.vocab_size, head.d_model) != (self.vocab_size, self.backbone.d_model):
            raise ValueError(f"the draft head is for vocabulary {head.vocab_size} and width {head.d_model}, the model "
                             f"has {self.vocab_size} and {self.backbone.d_model}")
        self.draft_head = None if head is None else head.to(device=self.device, dtype=self.dtype).eval()
        return self

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write safetensors weights, config, tokenizer, asarm.json and the draft head (if any) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        extra = {"mask_token_id": self.mask_token_id}
        if self.trained_length is not None:
            extra["trained_length"] = self.trained_length
        (directory / _ASARM_FILE).write_text(json.dumps(extra, indent=2) + "\n")
        if self.draft_head is not None:
            save_draft_head(self.draft_head, directory)

    # -------------------------------------------------------------------------------- properties
    @property
    def config(self):
        """The backbone's config (``vocab_size``, ``d_model``, ``n_layer``, ``n_head``, ``d_head``, ...)."""
        return self.backbone.config

    @property
    def vocab_size(self) -> int:
        return self.backbone.vocab_size

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    # --------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, sigma: torch.Tensor, n_prompt: torch.Tensor,
               query_positions: torch.Tensor, n_visible: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits ``(B, k, V)`` of ``query_positions (B, k)`` in one full forward pass.

        ``n_visible=None`` uses the oracle mask (a query on rank r sees ranks < r); a ``(B,)``
        tensor uses the draft mask (every query sees only ranks < n_visible).
        """
        states = self.query_states(tokens, sigma, n_prompt, query_positions, n_visible)
        return check_finite(self.backbone.lm_head(states))

    @torch.no_grad()
    def query_states(self, tokens: torch.Tensor, sigma: torch.Tensor, n_prompt: torch.Tensor,
                     query_positions: torch.Tensor, n_visible: torch.Tensor | None = None) -> torch.Tensor:
        """The final query-stream states ``(B, k, d_model)`` behind :meth:`logits` (the backbone's ``lm_head``
        of them gives the logits); what a draft head reads."""
        tokens = tokens.to(self.device)
        check_token_ids(tokens, self.vocab_size)
        sigma = sigma.to(self.device)
        pm = masks.perm_mask(sigma, n_prompt.to(self.device),
                             None if n_visible is None else n_visible.to(self.device), dtype=self.dtype)
        tm = masks.target_mapping(query_positions.to(self.device), tokens.shape[1], dtype=self.dtype)
        return self.backbone.query_states(tokens, pm, tm)

    def log_probs(self, tokens: torch.Tensor, sigma: torch.Tensor, n_prompt: torch.Tensor,
                  query_positions: torch.Tensor, n_visible: torch.Tensor | None = None,
                  temperature: float = 1.0) -> torch.Tensor:
        """Float64 log-probabilities ``(B, k, V)`` with ``<mask>`` excluded and the rest renormalised."""
        return self.normalize(self.logits(tokens, sigma, n_prompt, query_positions, n_visible), temperature)

    def normalize(self, logits: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
        """Float64 log-softmax of ``logits / temperature`` with the ``<mask>`` logit removed
        (``temperature``: a number or a tensor broadcasting against ``logits``)."""
        return torch.log_softmax(self._tempered_float64(logits, temperature), dim=-1)

    def probabilities(self, logits: torch.Tensor, temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
        """``normalize(...).exp()`` in one pass: float64 softmax without the ``<mask>`` token. Every sampler
        takes its probabilities from here, whatever the engine, so non-finite logits stop it here."""
        return torch.softmax(self._tempered_float64(check_finite(logits), temperature), dim=-1)

    def _tempered_float64(self, logits: torch.Tensor, temperature) -> torch.Tensor:
        logits = logits.to(torch.float64, copy=True)  # a copy: the mask logit is overwritten below
        if isinstance(temperature, torch.Tensor):
            if not bool((temperature == 1).all()):
                logits /= temperature.to(device=logits.device, dtype=torch.float64)
        elif temperature != 1:  # a plain number: no tensor ops on the per-call path
            logits /= temperature
        logits[..., self.mask_token_id] = float("-inf")
        return logits

    def score(self, tokens: torch.Tensor, sigma: torch.Tensor, n_prompt: torch.Tensor,
              lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Exact ``log p(x_{sigma >= m} | x_{sigma < m})`` per row ``(B,)`` in one oracle pass
        (teacher forcing: every non-prompt position is a query row)."""
        batch_size, seq_len = tokens.shape
        if lengths is None:
            lengths = torch.full((batch_size,), seq_len, dtype=torch.long, device=tokens.device)
        n_prompt = torch.as_tensor(n_prompt, device=tokens.device)
        num_targets = int((lengths - n_prompt).max())
        ranks = n_prompt[:, None] + torch.arange(num_targets, device=tokens.device)
        valid = ranks < lengths[:, None]
        # Rows with fewer targets leave their last slots unused (-1).
        positions = positions_of_ranks(positions_by_rank(sigma), torch.where(valid, ranks, -1))
        logp = self.log_probs(tokens, sigma, n_prompt, positions)
        targets = tokens.gather(1, positions.clamp(min=0)).to(logp.device)
        picked = logp.gather(2, targets[..., None]).squeeze(-1)
        return torch.where(valid.to(picked.device), picked, 0.0).sum(dim=1)


def _explain_load_failure(source: str, revision: str | None, err: Exception, offline: bool) -> str:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    lowered = str(err).lower()
    if offline:
        why = offline_reason()
        return (f"could not load {source!r} (revision {revision!r}): {why} and the model is not in the local cache; "
                f"download it on a connected machine or pass a local directory")
    if "revision" in lowered or "git identifier" in lowered:
        hint = f" Known revisions of {HUB_REPO}: {', '.join(HUB_REVISIONS)}." if source == HUB_REPO else ""
        return f"revision {revision!r} does not exist for {source!r}.{hint}"
    return f"could not load {source!r} (revision {revision!r}): {text}"
