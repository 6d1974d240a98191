"""Run any sampler spec: the one entry point above the sequential and the ASSD decode loops."""

from __future__ import annotations

from ..model import ASARM
from .assd import assd_decode
from .batch import DecodeOutput
from .sequential import sequential_decode
from .spec import SamplerSpec

__all__ = ["decode"]


def decode(model: ASARM, spec: SamplerSpec, tokens, sigma, n_prompt, lengths=None, **options) -> DecodeOutput:
    """Decode a batch with the sampler ``spec`` (e.g. ``SAMPLERS["assd-fused"].replace(k=3)``). ``options`` are
    the decode's own (``seed``, ``generator``, ``engine``, ``padding_mask``, ``max_new_tokens``, ``progress``,
    ``trace``), the same for every sampler."""
    if spec.algorithm == "sequential":
        return sequential_decode(model, tokens, sigma, n_prompt, lengths, temperature=spec.resolve(model).temperature,
                                 **options)
    return assd_decode(model, tokens, sigma, n_prompt, lengths, spec=spec, **options)
