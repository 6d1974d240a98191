"""Exact batched samplers for AS-ARMs: sequential and Any-Subset Speculative Decoding, named and set by one
spec (``spec.py``) and run by one entry point (``decode``).

The names below load on first use, so the command line can read the sampler registry and its options
(``spec.py``) without importing torch."""

import importlib

_SOURCES = {
    "assd_decode": "assd", "DecodeOutput": "batch", "LossySamplingWarning": "batch", "decode": "dispatch",
    "ConfidenceLength": "draft_length", "DRAFTERS": "drafters", "Drafter": "drafters", "DraftRequest": "drafters",
    "MissingDraftHeadError": "drafters", "NGramDrafter": "drafters", "SelfDrafter": "drafters",
    "register_drafter": "drafters", "ENGINES": "engine", "CachedEngine": "engine", "FullEngine": "engine",
    "Verdict": "rejection", "verify_drafts": "rejection", "sequential_decode": "sequential", "SAMPLERS": "spec",
    "SamplerSpec": "spec", "available_samplers": "spec",
}

__all__ = list(_SOURCES)


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
