"""Exact batched samplers for AS-ARMs: sequential and Any-Subset Speculative Decoding."""

from .assd import assd_decode
from .decode import DecodeOutput, LossySamplingWarning, sequential_decode
from .draft_length import ConfidenceLength
from .drafters import DRAFTERS, Drafter, DraftRequest, NGramDrafter, SelfDrafter, register_drafter
from .engine import ENGINES, CachedEngine, FullEngine
from .rejection import Verdict, verify_drafts

__all__ = ["DecodeOutput", "LossySamplingWarning", "assd_decode", "sequential_decode", "ConfidenceLength", "DRAFTERS",
           "Drafter", "DraftRequest", "NGramDrafter", "SelfDrafter", "register_drafter", "ENGINES", "CachedEngine",
           "FullEngine", "Verdict", "verify_drafts"]
