"""Exact batched samplers for AS-ARMs: sequential and Any-Subset Speculative Decoding."""

from .decode import DecodeOutput, LossySamplingWarning, assd_decode, sequential_decode
from .drafters import NGramDrafter, SelfDrafter
from .engine import ENGINES, CachedEngine, FullEngine

__all__ = ["DecodeOutput", "LossySamplingWarning", "assd_decode", "sequential_decode", "NGramDrafter",
           "SelfDrafter", "ENGINES", "CachedEngine", "FullEngine"]
