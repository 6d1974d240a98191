"""The rope backbone: a two-stream transformer of current design behind the backbone interface (asarm.backbones.base).

XLNet's two streams on a modern block: the content stream ``h`` starts from the token embeddings (times
``embedding_scale``, sqrt(d_model) by default: the embedding is also the head, so it is small), the query stream
``g`` from one learned vector (a query never sees its own token). Both streams run through the same weights; per
layer (pre-norm, RMSNorm)::

    keys, values and content queries from norm(h), query-stream queries from norm(g)
    h += o(attend(h-queries)), g += o(attend(g-queries))      both attend to the same keys and values
    h += mlp(norm(h)),         g += mlp(norm(g))               gated SiLU MLP, no biases anywhere

and a final RMSNorm of ``g``; the LM head is the token embedding (tied) plus a bias.

Positions are rotary (RoPE) at the TRUE token positions, applied to queries and keys only: the score of a
query and a key depends on their two positions alone, not on the decoding order nor on when the key was
computed. So a content key, once computed, can be cached by rank (asarm.backbones.kv_cache) and any order runs
on a plain masked ``scaled_dot_product_attention``. Because norms are per row, the two streams are processed as
one tensor of rows (content rows, then query rows), which is exactly what the cached pass does too: the full
forward and the cached pass share the layer code and the rotary tables, so they agree to rounding.

A row that may see nothing (a query on rank 0 with an empty prompt) gets a zero attention output instead of
the NaN of an all-masked softmax (torch < 2.5): its state is then the mask embedding's alone, an unconditional
prediction that leaks nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from ..checks import check_number
from .base import Backbone, check_sizes
from .positional_tables import PositionalTables

__all__ = ["RopeBackbone", "RopeConfig", "check_rope_config", "RMSNorm", "rotary_table", "apply_rotary", "CONFIG_NAME",
           "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# ---------------------------------------------------------------------------------------------- config
@dataclass
class RopeConfig:
    """Sizes and hyper-parameters; the defaults are XLNet-base-like (with ``d_inner = 3 d_model``, a gated MLP
    has the parameters of XLNet's ``4 d_model`` MLP plus its positional projection: the sizes match)."""

    model_type: ClassVar[str] = "asarm-rope"

    vocab_size: int = 32000
    d_model: int = 768
    n_layer: int = 12
    n_head: int = 12
    d_inner: int = 2304
    dropout: float = 0.0  # on the residual branches
    # on the attention probabilities: off by default (as in current LLMs), which leaves scaled_dot_product_attention
    # its fused kernels; any dropout there makes it materialise the (rows x keys) probabilities and their masks
    attention_dropout: float = 0.0
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    initializer_range: float = 0.02
    # the content stream starts from embedding x this (None: sqrt(d_model)). The embedding is tied to the head, so
    # it is small (initializer_range); unscaled, the first residual branches (rms ~0.1) drown the token identity of
    # the pre-norm stream (rms 0.02), and rope learned markedly more slowly per step than XLNet
    embedding_scale: float | None = None

    def __post_init__(self):
        check_rope_config(dataclasses.asdict(self))
        if self.embedding_scale is None:  # saved configs carry the number
            self.embedding_scale = float(self.d_model) ** 0.5

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return {"model_type": self.model_type, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, fields: dict) -> "RopeConfig":
        fields = {key: value for key, value in fields.items() if key != "model_type"}
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown RopeConfig field(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**fields)


def check_rope_config(fields: dict, prefix: str = "") -> None:
    """One-line ValueError for settings (every field of :class:`RopeConfig`) that cannot build the backbone."""
    check_sizes(fields, prefix)
    d_head = fields["d_model"] // fields["n_head"]
    if d_head % 2:  # rotary turns pairs of coordinates
        raise ValueError(f"{prefix}d_model={fields['d_model']} / {prefix}n_head={fields['n_head']} = {d_head} (the "
                         f"head width) must be even for rotary positions; change one of them")
    check_number(prefix + "attention_dropout", fields["attention_dropout"], 0, 1, high_open=True)
    for key in ("rope_theta", "norm_eps"):
        check_number(prefix + key, fields[key], 0, low_open=True)
    check_number(prefix + "embedding_scale", fields["embedding_scale"], 0, low_open=True, or_none=True)


# ---------------------------------------------------------------------------------------------- rotary
def rotary_table(n_positions: int, d_head: int, theta: float, dtype: torch.dtype, device=None):
    """``(cos, sin)``, each ``(n_positions, d_head)``, for positions ``0 .. n_positions - 1`` (rotate-half
    layout: coordinate ``i`` and ``i + d_head / 2`` form a pair turned by ``pos * theta^(-2i / d_head)``).
    Computed in float32 or ``dtype``, whichever is wider: half-precision angles are wrong beyond a few hundred."""
    wide = torch.promote_types(dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(0, d_head, 2, device=device, dtype=wide) / d_head)
    angles = torch.arange(n_positions, device=device, dtype=wide)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn ``x (..., d_head)`` by the angles of ``cos``/``sin`` (broadcast to ``x``), in the tables' (wider) dtype;
    the result has ``x``'s dtype."""
    wide = x.to(torch.promote_types(x.dtype, cos.dtype))
    first, second = wide.chunk(2, dim=-1)
    turned = torch.cat([-second, first], dim=-1)
    return (wide * cos + turned * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in float32 at least (nn.RMSNorm needs torch >= 2.4)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return (wide * self.weight).to(x.dtype)


class GatedMLP(nn.Module):
    """``down(silu(gate x) * up x)``; gate and up are one matrix (one product instead of two)."""

    def __init__(self, d_model: int, d_inner: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.down = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Visibility:
    """A pass's bool mask ``(b, 1, n, K)`` (True: may attend), made ready for SDPA once for all layers: a row that
    sees nothing would give NaN (torch < 2.5), so it attends to everything and its output is zeroed instead."""

    def __init__(self, visible: torch.Tensor):
        empty = ~visible.any(dim=-1, keepdim=True)
        self.empty = empty if bool(empty.any()) else None
        self.mask = visible if self.empty is None else visible | self.empty

    def attend(self, q, keys, values, dropout_p: float) -> torch.Tensor:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask, dropout_p=dropout_p)
        return out if self.empty is None else out.masked_fill(self.empty, 0.0)


class RopeLayer(nn.Module):
    """One block over rows ``x (b, n, d)``: ``n_content`` content rows (which provide the keys and values), then
    query rows. Both kinds of row go through the same weights."""

    def __init__(self, config: RopeConfig):
        super().__init__()
        d, self.n_head, self.attention_dropout = config.d_model, config.n_head, config.attention_dropout
        self.norm_attn = RMSNorm(d, config.norm_eps)
        # queries for every row; keys and values (one matrix) for the content rows only
        self.q, self.kv = nn.Linear(d, d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.norm_mlp = RMSNorm(d, config.norm_eps)
        self.mlp = GatedMLP(d, config.d_inner)
        self.drop = nn.Dropout(config.dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.n_head, x.shape[2] // self.n_head)  # (b, n, H, d_head)

    def forward(self, x, n_content: int, cos, sin, visible, store) -> torch.Tensor:
        """``cos``/``sin (b, n, 1, d_head)``: each row's rotary; ``visible``: the rows' :class:`Visibility`;
        ``store(keys, values)`` takes the content rows' ``(b, nc, H, d_head)`` and returns what the rows attend to,
        ``(b, H, K, d_head)`` (the full forward: those; the cached pass: the rank cache after writing them)."""
        a = self.norm_attn(x)
        q = apply_rotary(self._heads(self.q(a)), cos, sin).transpose(1, 2)
        keys, values = self.kv(a[:, :n_content]).chunk(2, dim=-1)
        keys = apply_rotary(self._heads(keys), cos[:, :n_content], sin[:, :n_content])
        keys, values = store(keys, self._heads(values))
        vec = visible.attend(q, keys, values, self.attention_dropout if self.training else 0.0)
        x = x + self.drop(self.o(vec.transpose(1, 2).reshape(x.shape)))
        return x + self.drop(self.mlp(self.norm_mlp(x)))


def _own_keys(layer: int, keys, values):
    return keys.transpose(1, 2), values.transpose(1, 2)


def _cached_keys(cache, layout, layer: int, keys, values):
    if keys.shape[1]:  # the pass's content rows go into the cache first: they see each other
        cache.write(layer, layout.slots, layout.content_ranks, keys, values)
    return cache.read(layer, layout.n_keys, layout.read_slots)


# ---------------------------------------------------------------------------------------------- the backbone
class RopeBackbone(Backbone):
    name = "rope"
    model_type = RopeConfig.model_type

    def __init__(self, config: RopeConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.mask_embedding = nn.Parameter(torch.empty(config.d_model))
        self.layers = nn.ModuleList(RopeLayer(config) for _ in range(config.n_layer))
        self.norm_out = RMSNorm(config.d_model, config.norm_eps)
        self.lm_bias = nn.Parameter(torch.zeros(config.vocab_size))  # the head's weight is the embedding's
        self._tables = PositionalTables()
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Normal(0, initializer_range), except the projections that write into the residual stream (``o``,
        ``mlp.down``): divided by sqrt(2 n_layer), so the stream's initial size does not grow with depth
        (GPT-2's rule; it made rope learn faster per step on the tiny config)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
        for layer in self.layers:
            for residual in (layer.o, layer.mlp.down):
                residual.weight.normal_(0.0, std / (2 * self.config.n_layer) ** 0.5)
        self.mask_embedding.normal_(0.0, std)

    # ------------------------------------------------------------------ construction and saving
    @classmethod
    def check_config(cls, fields: dict, prefix: str = "") -> None:
        defaults = {field.name: field.default for field in dataclasses.fields(RopeConfig)}
        check_rope_config({**defaults, **fields}, prefix)

    @classmethod
    def from_config(cls, fields: dict) -> "RopeBackbone":
        return cls(RopeConfig.from_dict(fields))  # checked as the config is made

    @classmethod
    def from_pretrained(cls, path, revision: str | None = None, dtype: torch.dtype | None = None,
                        local_files_only: bool = False) -> "RopeBackbone":
        from safetensors.torch import load_file

        config_file, weights_file = (_resolve(str(path), name, revision, local_files_only)
                                     for name in (CONFIG_NAME, WEIGHTS_NAME))
        try:
            fields = json.loads(Path(config_file).read_text())
            config = RopeConfig.from_dict(fields)
        except (ValueError, TypeError, AttributeError) as err:  # json.JSONDecodeError is a ValueError
            raise OSError(f"{config_file} is not a valid {cls.model_type} config: {err}") from None
        if fields.get("embedding_scale") is None:  # its default changed: such a model was trained unscaled
            raise OSError(f"{config_file} has no embedding_scale: it was saved by asarm before the embedding was "
                          f"scaled; add \"embedding_scale\": 1.0 to it to load the model as it was trained")
        state = load_file(weights_file)
        with torch.device("meta"):  # no random init of weights that are about to be replaced
            model = cls(config)
        saved = state.get("embedding.weight", torch.empty(0)).dtype  # None: the dtype it was saved in
        model = model.to_empty(device="cpu").to(saved)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise OSError(f"{weights_file} does not match its config: {' '.join(str(err).split())}") from None
        return model if dtype is None else model.to(dtype)

    def save_pretrained(self, directory) -> None:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        # the tied head has no tensor of its own: the embedding is stored once
        save_file({key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()},
                  str(directory / WEIGHTS_NAME), metadata={"format": "pt"})

    # ------------------------------------------------------------------ the two-stream forward
    def readout(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embedding.weight, self.lm_bias

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embedding(tokens)

    def _rows(self, tokens: torch.Tensor, n_query: int) -> torch.Tensor:
        """Content rows (the tokens' scaled embeddings), then ``n_query`` query rows starting from the mask
        embedding."""
        content = self.embed(tokens) * self.config.embedding_scale
        g = self.mask_embedding.to(content.dtype).expand(content.shape[0], n_query, -1)
        return torch.cat([content, g], dim=1)

    def query_states(self, input_ids, perm_mask, target_mapping) -> torch.Tensor:
        B, L = input_ids.shape
        k = target_mapping.shape[1]
        hidden = perm_mask.bool()
        q_pos = target_mapping.argmax(dim=-1)  # an unused (all-zero) row: position 0, output unspecified
        # content rows see what perm_mask allows and themselves; a query row sees its position's row
        eye = torch.eye(L, dtype=torch.bool, device=hidden.device)
        visible = torch.cat([~hidden | eye, ~hidden.gather(1, q_pos[:, :, None].expand(B, k, L))], dim=1)
        positions = torch.cat([torch.arange(L, device=q_pos.device).expand(B, L), q_pos], dim=1)
        cos, sin = self.cache_context(L)
        x = self._rows(input_ids, k)
        x = self._layers(x, L, cos[positions][:, :, None], sin[positions][:, :, None], visible[:, None], _own_keys)
        return self.norm_out(x[:, L:])

    def _layers(self, x, n_content, cos, sin, visible, store) -> torch.Tensor:
        """All layers; ``store(layer_id, keys, values)``: see :meth:`RopeLayer.forward`."""
        visible = Visibility(visible)
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, n_content, cos, sin, visible, partial(store, layer_id))
        return x

    # ------------------------------------------------------------------ the cached pass
    @torch.no_grad()
    def cache_context(self, seq_len: int):
        """Rotary ``(cos, sin)``, each ``(L + 1, d_head)``, for positions ``0 .. L`` (``L``: padding rows). Kept
        per length, for the weights' dtype and device; the full forward reads the same tables, so both passes agree."""
        weight = self.embedding.weight
        return self._tables.get(seq_len, (weight.dtype, weight.device), lambda: rotary_table(
            seq_len + 1, self.d_head, self.config.rope_theta, weight.dtype, weight.device))

    def cached_pass(self, cache, context, layout, content_tokens):
        b, nc = content_tokens.shape
        n = layout.row_positions.shape[1]
        cos, sin = (table[layout.row_positions][:, :, None] for table in context)
        x = self._rows(content_tokens, n - nc)
        x = self._layers(x, nc, cos, sin, ~layout.hidden, partial(_cached_keys, cache, layout))
        return self.norm_out(x[:, nc:])


def _resolve(path: str, name: str, revision: str | None, local_files_only: bool) -> str:
    """The local file ``name`` of a model directory or Hub repository; OSError (one line) when it is missing."""
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / name).is_file():
            raise OSError(f"{path!r} holds no {name}: not a saved {RopeBackbone.model_type} model")
        return str(local / name)
    if local.exists() or path.startswith((".", "/", "~")) or os.sep in path.strip("/").split("/", 1)[-1]:
        raise OSError(f"model directory {path!r} does not exist")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(path, name, revision=revision, local_files_only=local_files_only)
    except (OSError, ValueError) as err:  # the Hub's errors are OSErrors, a malformed repo id a ValueError
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OSError(f"cannot get {name} of {path!r} from the Hugging Face Hub: {reason}") from None
