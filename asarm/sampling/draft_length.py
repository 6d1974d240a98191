"""Adaptive draft length: how many of a round's drafts each row sends to verification.

A rule is called as ``rule(probs, drafts, count) -> (b,)`` with the proposal distributions
``probs (b, K, V)`` (float64), the drafts ``(b, K)`` and the number available ``count (b,)``; it returns
how many leading drafts to verify (clamped to ``[1, count]`` by the sampler).

Exactness condition. Speculative sampling stays exact when the decision to verify slot ``i``, like the
proposal there, depends only on what was known before draft ``i`` was drawn: the committed tokens,
the proposal distributions (``probs[:, :i + 1]``: ``q_i`` is fixed before ``x_i`` is drawn from it),
the earlier drafts ``drafts[:, :i]``, and nothing else. It is NOT exact when the rule reads the
value of draft ``i`` itself (e.g. "verify it only if ``q_i(x_i)`` is large"), or the acceptance
uniforms: both select drafts by how they will fare, which biases the output. The exactness suite
(tests/sampling/test_exactness.py) includes such a rule as a negative control and rejects it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["ConfidenceLength", "make_draft_length"]


class ConfidenceLength:
    """Stop drafting at the first slot (after the first) whose proposal is not confident:
    ``max_v q_i(v) < threshold``. Exact: reads only the proposal distributions."""

    def __init__(self, threshold: float):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"the adaptive-length threshold must lie in [0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.name = f"confidence>={threshold:g}"

    def __call__(self, probs: torch.Tensor, drafts: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        import torch  # here, not at the top: the command line reads this module's rules without loading torch

        confident = probs.amax(dim=-1) >= self.threshold
        confident[:, 0] = True  # at least one draft per round
        stops = ~confident
        return torch.where(stops.any(1), stops.to(torch.int8).argmax(1), count)


def make_draft_length(rule):
    """``None`` (fixed ``k``), a threshold in [0, 1] (:class:`ConfidenceLength`), or a callable rule."""
    if rule is None or callable(rule):
        return rule
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        return ConfidenceLength(float(rule))
    raise ValueError(f"draft_length must be None, a confidence threshold in [0, 1] or a callable, got {rule!r}")
