"""The XLNet backbone: ``transformers.XLNetLMHeadModel`` behind the backbone interface (asarm.backbones.base).

Training, scoring and the full engine run Hugging Face's own two-stream forward, which stays the reference
the tests compare against. The cached pass re-implements XLNet's layers on the rank cache; what makes it
exact is in asarm.sampling.cached_engine. The positional term per layer is ``bd[i, j] = (q_i + r_r_bias) .
(W_r pe(pos_i - pos_j))``: the sinusoid of every distance ``d in [-L, L]`` is projected once per session
(:meth:`XLNetBackbone.cache_context`), each pass computes the ``(rows, heads, 2L + 1)`` table of dot
products and gathers each key's entry, so the ``(L x L x d)`` tensor Hugging Face builds is never formed.
"""

from __future__ import annotations

import functools
import inspect
import types

import torch
import transformers
from packaging.version import Version
from transformers import XLNetConfig, XLNetLMHeadModel

from ..checks import check_choice, check_number
from .base import Backbone, check_sizes
from .positional_tables import PositionalTables

__all__ = ["XLNetBackbone", "XLNET_BASE_SIZES"]

# xlnet-base-cased; XLNetConfig's own defaults are xlnet-large
XLNET_BASE_SIZES = {"vocab_size": 32000, "d_model": 768, "n_layer": 12, "n_head": 12, "d_inner": 3072}
# transformers renamed from_pretrained's torch_dtype to dtype in 4.56
_DTYPE_ARGUMENT = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


class XLNetBackbone(Backbone):
    name = "xlnet"
    model_type = "xlnet"

    def __init__(self, hf_model: XLNetLMHeadModel):
        super().__init__()
        self.hf = hf_model
        xl = hf_model.transformer
        # Hugging Face builds the sinusoids in float32 whatever the weights' dtype and its two-stream attention
        # does not cast them, so float64 (or half) weights fail: cast them at call time. A bound method (not a
        # closure) so that copy.deepcopy binds the copy's to the copy.
        xl.relative_positional_encoding = types.MethodType(_positional_encoding_in_weight_dtype, xl)
        self._tables = PositionalTables()

    @property
    def config(self) -> XLNetConfig:
        return self.hf.config

    # ------------------------------------------------------------------ construction and saving
    @classmethod
    def check_config(cls, fields: dict, prefix: str = "") -> None:
        # the sizes XLNetConfig would take by default, so that a width is checked against the head count it gets
        defaults = {key: getattr(_default_config(), key) for key in ("d_model", "n_head")}
        fields = {**defaults, **fields}
        check_sizes(fields, prefix)
        d_head = fields["d_model"] // fields["n_head"]
        if fields.get("d_head") not in (None, d_head):  # a dict of an XLNetConfig carries the d_head of its sizes
            raise ValueError(f"{prefix}d_head={fields['d_head']!r} must be {prefix}d_model // {prefix}n_head = "
                             f"{d_head}; leave it out")
        if "layer_norm_eps" in fields:
            check_number(prefix + "layer_norm_eps", fields["layer_norm_eps"], 0, low_open=True)
        if "attn_type" in fields:
            check_choice(prefix + "attn_type", fields["attn_type"], ("bi", "uni"))

    @classmethod
    def from_config(cls, fields: dict) -> "XLNetBackbone":
        cls.check_config(fields)
        return cls(XLNetLMHeadModel(XLNetConfig(**fields)))

    @classmethod
    def from_pretrained(cls, path: str, revision: str | None = None, dtype: torch.dtype | None = None,
                        local_files_only: bool = False) -> "XLNetBackbone":
        return cls(XLNetLMHeadModel.from_pretrained(path, revision=revision, local_files_only=local_files_only,
                                                    **{_DTYPE_ARGUMENT: dtype}))

    def save_pretrained(self, directory) -> None:
        self.hf.save_pretrained(directory, safe_serialization=True)

    # ------------------------------------------------------------------ the two-stream forward
    def query_states(self, input_ids, perm_mask, target_mapping) -> torch.Tensor:
        return self.hf.transformer(input_ids=input_ids, perm_mask=perm_mask, target_mapping=target_mapping,
                                   use_mems=False)[0]

    def lm_head(self, states: torch.Tensor) -> torch.Tensor:
        return self.hf.lm_loss(states)

    def readout(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.hf.lm_loss.weight, self.hf.lm_loss.bias

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.hf.transformer.word_embedding(tokens)

    # ------------------------------------------------------------------ the cached pass
    def check_cached_supported(self) -> None:
        if getattr(self.config, "attn_type", "bi") != "bi":
            raise NotImplementedError(f"the cached engine supports attn_type='bi' only, got {self.config.attn_type!r}")
        if getattr(self.config, "bi_data", False):
            raise NotImplementedError("the cached engine does not support bi_data=True (a training-only layout)")

    @torch.no_grad()
    def cache_context(self, seq_len: int) -> torch.Tensor:
        """``(n_layer, heads, d_head, 2 L + 1)``: column ``d + L`` is ``W_r pe(d)`` for the relative distance
        ``d = query position - key position`` in ``[-L, L]`` (``d = -L`` only reaches the scratch slot and is
        zero). Kept per length, dtype, device and weight version."""
        xl = self.hf.transformer
        dtype, device = xl.word_embedding.weight.dtype, xl.word_embedding.weight.device
        # the projections change as the model trains: a weight replaced or changed in place makes a new table
        weights = tuple((layer.rel_attn.r.data_ptr(), layer.rel_attn.r._version) for layer in xl.layer)
        return self._tables.get(seq_len, (dtype, device, weights),
                                lambda: _projected_sinusoids(xl, seq_len, dtype, device))

    def cached_pass(self, cache, context, layout, content_tokens):
        xl = self.hf.transformer
        b, nc = content_tokens.shape
        H, dh = self.config.n_head, self.d_head
        L = cache.keys.shape[3] - 1
        x = xl.word_embedding(content_tokens)  # (b, nc, d)
        k = layout.row_positions.shape[1] - nc
        if k:
            x = torch.cat([x, xl.mask_emb.reshape(1, 1, -1).expand(b, k, -1).to(x.dtype)], dim=1)
        n, n_keys = layout.row_positions.shape[1], layout.n_keys
        # relative distance (query position - key position), as a column of the 2L + 1 table
        dist = (layout.row_positions[:, :, None] - layout.key_positions[:, None, :] + L)[None].expand(H, b, n, n_keys)
        d_model = x.shape[-1]
        for layer_id, layer in enumerate(xl.layer):
            attn = layer.rel_attn
            q = (x @ attn.q.reshape(d_model, H * dh)).reshape(b, n, H, dh)
            if nc:  # the new content rows' keys and values go into the cache first: rows see each other
                xc = x[:, :nc]
                cache.write(layer_id, layout.slots, layout.content_ranks,
                            (xc @ attn.k.reshape(d_model, H * dh)).reshape(b, nc, H, dh),
                            (xc @ attn.v.reshape(d_model, H * dh)).reshape(b, nc, H, dh))
            keys, values = cache.read(layer_id, n_keys, layout.read_slots)
            # content term (q + r_w_bias) . k
            ac = torch.matmul((q + attn.r_w_bias).transpose(1, 2), keys.transpose(-1, -2))  # (b, H, n, K)
            # positional term: per head, (q + r_r_bias) . W_r pe(d) for every distance d, then pick
            qr = (q + attn.r_r_bias).permute(2, 0, 1, 3).reshape(H, b * n, dh)
            table = torch.bmm(qr, context[layer_id]).reshape(H, b, n, 2 * L + 1)
            bd = table.gather(3, dist).permute(1, 0, 2, 3)  # (b, H, n, K)
            score = ((ac + bd) * attn.scale).masked_fill_(layout.hidden, float("-inf"))
            prob = torch.softmax(score, dim=-1)
            vec = torch.matmul(prob, values).transpose(1, 2).reshape(b, n, H * dh)
            x = attn.layer_norm(vec @ attn.o.reshape(d_model, H * dh).t() + x)
            x = layer.ff(x)
        return x[:, nc:]


@functools.cache
def _default_config() -> XLNetConfig:
    return XLNetConfig()


def _projected_sinusoids(xl, seq_len: int, dtype, device) -> torch.Tensor:
    """The table of :meth:`XLNetBackbone.cache_context`, computed."""
    layers = [layer.rel_attn for layer in xl.layer]
    # Hugging Face's own sinusoids for qlen = klen = L (bit-identical to the full forward's): rows are the
    # distances L, L-1, ..., -L+1, with clamp_len applied inside
    pe = xl.relative_positional_encoding(seq_len, seq_len, bsz=None, **_device_argument(xl, device))
    pe = pe[:, 0, :].to(device=device, dtype=dtype).flip(0)  # distances -L+1 .. L
    pe = torch.cat([pe.new_zeros(1, pe.shape[1]), pe], dim=0)  # distances -L .. L
    n_head, d_head = layers[0].n_head, layers[0].d_head
    return torch.stack([(pe @ a.r.reshape(a.r.shape[0], n_head * d_head)).reshape(-1, n_head, d_head)
                        .permute(1, 2, 0).contiguous() for a in layers])


def _positional_encoding_in_weight_dtype(self, *args, **kwargs):
    return type(self).relative_positional_encoding(self, *args, **kwargs).to(self.word_embedding.weight.dtype)


def _device_argument(xl, device) -> dict:
    """transformers 5 takes the device of the sinusoids as an argument; 4.x has no such parameter."""
    parameters = inspect.signature(type(xl).relative_positional_encoding).parameters
    return {"device": device} if "device" in parameters else {}
