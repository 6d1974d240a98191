"""The backbone interface: everything of asarm that touches the network goes through these methods.

Inputs follow XLNet's two-stream layout (asarm.masks): ``perm_mask (B, L, L)``, 1 where position i may
NOT see position j (the content stream always sees itself), and ``target_mapping (B, k, L)``, one-hot
rows picking the query positions; query row t sees what its position's ``perm_mask`` row allows. The
query stream starts from one learned vector (it never sees its own token), the content stream from the
token embeddings.

A backbone (an ``nn.Module``) provides

* ``forward(input_ids, perm_mask, target_mapping) -> logits (B, k, V)``: training, scoring and the
  objectives (with gradients); ``query_states(...)`` the final query states behind them, ``lm_head`` their
  readout (``readout()``: its weight and bias), ``embed`` the input token embedding;
* the cached any-order pass behind ``CachedEngine`` (asarm.sampling.cached_engine), which owns the
  bookkeeping (which ranks are valid, batch rows coming and going), asks ``check_cached_supported()`` when
  it is built, sizes its :class:`asarm.backbones.kv_cache.RankCache` (key/value storage by rank) from
  ``config.n_layer``, ``config.n_head`` and ``d_head``, and calls ``cache_context(seq_len)`` once per session
  and ``cached_pass(...)`` once per batched layer stack;
* ``save_pretrained(directory)`` and the class methods ``from_pretrained(path, **kwargs)``,
  ``from_config(fields)`` (a random init from the global RNG) and ``check_config(fields, prefix)`` (a one-line
  ValueError for fields that cannot build the backbone; ``from_config`` calls it first); ``config`` (with
  ``vocab_size``, ``d_model``, ``n_layer``, ``n_head``, ``d_head``), ``name``, the registry key
  (asarm.backbones.BACKBONES), and ``model_type``, what its checkpoints' ``config.json`` says (how
  ``ASARM.from_pretrained`` picks the backbone).
"""

from __future__ import annotations

import torch
from torch import nn

from ..checks import check_integer, check_number

__all__ = ["Backbone", "check_sizes"]


class Backbone(nn.Module):
    """Base class of the backbones; see the module doc. Subclasses implement the methods that raise."""

    name = ""
    model_type = ""

    @classmethod
    def check_config(cls, fields: dict, prefix: str = "") -> None:
        """ValueError, one line naming the setting (``prefix`` + its field name) and its value, when the config
        fields of ``from_config`` cannot build this backbone; run before anything is built (``from_config``, and the
        trainer's config as it loads, with ``prefix="model."``). By default: :func:`check_sizes`."""
        check_sizes(fields, prefix)

    def forward(self, input_ids: torch.Tensor, perm_mask: torch.Tensor, target_mapping: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.query_states(input_ids, perm_mask, target_mapping))

    def query_states(self, input_ids, perm_mask, target_mapping) -> torch.Tensor:
        raise NotImplementedError

    def lm_head(self, states: torch.Tensor) -> torch.Tensor:
        weight, bias = self.readout()
        return nn.functional.linear(states, weight, bias)

    def readout(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def check_cached_supported(self) -> None:
        """Raise NotImplementedError, saying why, when this backbone or its configuration has no cached pass, so
        that ``CachedEngine`` refuses the model when it is built instead of failing in its first call. By default:
        a subclass that implements ``cached_pass`` supports every configuration."""
        if type(self).cached_pass is Backbone.cached_pass:
            raise NotImplementedError(f"the {self.name or type(self).__name__} backbone has no cached pass; "
                                      f"use engine='full'")

    def cache_context(self, seq_len: int):
        """Whatever ``cached_pass`` needs per sequence length (positional tables), computed once per session."""
        raise NotImplementedError

    def cached_pass(self, cache, context, layout, content_tokens: torch.Tensor) -> torch.Tensor:
        """One batched pass through all layers over the rows of ``layout`` (a
        :class:`asarm.backbones.kv_cache.PassLayout`: content rows holding ``content_tokens (b, nc)``, then
        query rows). The content rows' keys and values are written into ``cache`` (a ``RankCache``) first,
        so they see each other. Returns the final states of the query rows ``(b, k, d_model)``."""
        raise NotImplementedError

    @property
    def d_model(self) -> int:
        return int(self.config.d_model)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def d_head(self) -> int:
        """The width of one attention head: the last dimension of the keys and values in the ``RankCache``."""
        return int(self.config.d_head)


def check_sizes(fields: dict, prefix: str = "") -> None:
    """The settings every backbone shares, those of ``fields`` that are given: positive sizes, dropout in [0, 1), an
    initial weight scale >= 0 (0: all-zero weights, uniform conditionals), and a width that splits into whole heads."""
    for key in ("vocab_size", "d_model", "n_layer", "n_head", "d_inner"):
        if key in fields:
            check_integer(prefix + key, fields[key], 1)
    if "dropout" in fields:
        check_number(prefix + "dropout", fields["dropout"], 0, 1, high_open=True)
    if "initializer_range" in fields:
        check_number(prefix + "initializer_range", fields["initializer_range"], 0)
    if "d_model" in fields and "n_head" in fields and fields["d_model"] % fields["n_head"]:
        raise ValueError(f"{prefix}d_model={fields['d_model']} must be a multiple of {prefix}n_head={fields['n_head']} "
                         f"(d_model / n_head is the head width); change one of them")
