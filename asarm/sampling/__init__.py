"""Exact batched samplers for AS-ARMs: sequential and Any-Subset Speculative Decoding, named and set by one
spec (``spec.py``) and run by one entry point (``decode``)."""

from .assd import assd_decode
from .batch import DecodeOutput, LossySamplingWarning
from .dispatch import decode
from .draft_length import ConfidenceLength
from .drafters import DRAFTERS, Drafter, DraftRequest, MissingDraftHeadError, NGramDrafter, SelfDrafter, \
    register_drafter
from .engine import ENGINES, CachedEngine, FullEngine
from .rejection import Verdict, verify_drafts
from .sequential import sequential_decode
from .spec import SAMPLERS, SamplerSpec, available_samplers

__all__ = ["DecodeOutput", "LossySamplingWarning", "assd_decode", "sequential_decode", "decode", "SamplerSpec",
           "SAMPLERS", "available_samplers", "ConfidenceLength", "DRAFTERS", "Drafter", "DraftRequest",
           "MissingDraftHeadError", "NGramDrafter", "SelfDrafter", "register_drafter", "ENGINES", "CachedEngine",
           "FullEngine", "Verdict", "verify_drafts"]
