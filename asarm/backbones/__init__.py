"""Backbones: the networks an AS-ARM runs on, each behind one interface (asarm.backbones.base).

``xlnet``: Hugging Face's XLNet (the released checkpoints, asarm-tiny). ``rope``: a two-stream transformer
of current design (rotary positions, pre-norm, gated MLP, ``scaled_dot_product_attention``). A new backbone
is one module and one entry in ``BACKBONES``; its checkpoints' ``config.json`` names it by the class's
``model_type``.
"""

from __future__ import annotations

from .base import Backbone
from .kv_cache import PassLayout, RankCache, pass_layout
from .rope import RopeBackbone
from .xlnet import XLNetBackbone

__all__ = ["Backbone", "BACKBONES", "backbone_class", "RankCache", "PassLayout", "pass_layout",
           "XLNetBackbone", "RopeBackbone"]

BACKBONES: dict[str, type[Backbone]] = {"xlnet": XLNetBackbone, "rope": RopeBackbone}
# config.json's model_type -> backbone name
MODEL_TYPES = {kind.model_type: name for name, kind in BACKBONES.items()}


def backbone_class(name: str) -> type[Backbone]:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name]


def backbone_of_model_type(model_type: str | None) -> type[Backbone]:
    """The backbone of a checkpoint whose config.json has ``model_type`` (missing: XLNet, the Hub checkpoints)."""
    name = MODEL_TYPES.get(model_type or "xlnet")
    if name is None:
        raise ValueError(f"config.json has model_type {model_type!r}, which no asarm backbone reads "
                         f"(known: {', '.join(sorted(MODEL_TYPES))})")
    return BACKBONES[name]
