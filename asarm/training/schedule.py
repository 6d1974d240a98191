"""Masking-rate schedule with stratified draws (spec section 5).

Both ends of the rate range warm up linearly with the optimizer step ``t``:
``min(t) = start + (final_min - start) * p`` and ``max(t) = start + (final_max - start) * p`` with
``p = min(1, t / masking_warmup_steps)`` (``p = 1`` when the warm-up is 0 steps).

Stratification: a global batch is made of ``A`` gradient-accumulation micro-batches on each of ``R``
ranks. Micro-batch ``a`` on rank ``r`` draws its rate uniformly from stratum ``s = a * R + r`` of the
``S = A * R`` equal strata of ``[min(t), max(t)]``, so every optimizer step covers the whole range
evenly (lower variance than i.i.d. draws). With ``per_sequence=True`` each of the ``B`` sequences of
the micro-batch gets its own sub-stratum ``b`` of that stratum (``S * B`` strata per step).
The reference code stratified over accumulation steps only without DDP and over ranks only with it;
this does both at once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["MaskingRateSchedule", "stratum_bounds", "stratified_rates"]


def stratum_bounds(low: float, high: float, index: int, count: int) -> tuple[float, float]:
    """Bounds of stratum ``index`` of ``count`` equal strata of ``[low, high]``."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"stratum index {index} is outside 0..{count - 1}")
    width = (high - low) / count
    return low + width * index, low + width * (index + 1) if index + 1 < count else high


def stratified_rates(low: float, high: float, index: int, count: int, batch_size: int | None = None,
                     per_sequence: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rates drawn from stratum ``index`` of ``count`` of ``[low, high]``: a float64 tensor of shape
    ``(batch_size,)`` (a 0-d tensor when ``batch_size`` is None). Without ``per_sequence`` one draw
    is shared by the batch; with it, row ``b`` draws from sub-stratum ``b`` of ``batch_size``."""
    lo, hi = stratum_bounds(low, high, index, count)
    if batch_size is None:
        return lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if not per_sequence:
        u = torch.rand((), generator=generator, dtype=torch.float64)
        return (lo + (hi - lo) * u).expand(batch_size).clone()
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    sub = torch.arange(batch_size, dtype=torch.float64)
    return lo + (hi - lo) * (sub + u) / batch_size


@dataclass(frozen=True)
class MaskingRateSchedule:
    """Linear warm-up of the masking-rate range, then stratified draws (module doc).

    Defaults are the reference script's; the released NLP model used rates 0.90-0.99.
    """

    start_masking_rate: float = 0.15
    final_min_masking_rate: float = 0.75
    final_max_masking_rate: float = 0.85
    masking_warmup_steps: int = 5000

    def __post_init__(self):
        for name in ("start_masking_rate", "final_min_masking_rate", "final_max_masking_rate"):
            value = getattr(self, name)
            if not 0.0 < value < 1.0:
                raise ValueError(f"{name} must lie in (0, 1), got {value}")
        if self.final_min_masking_rate > self.final_max_masking_rate:
            raise ValueError(f"final_min_masking_rate {self.final_min_masking_rate} exceeds final_max_masking_rate "
                             f"{self.final_max_masking_rate}")
        if self.masking_warmup_steps < 0:
            raise ValueError(f"masking_warmup_steps must be >= 0, got {self.masking_warmup_steps}")

    def progress(self, step: int) -> float:
        """Warm-up progress in [0, 1] at optimizer step ``step``."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self.masking_warmup_steps == 0:
            return 1.0
        return min(1.0, step / self.masking_warmup_steps)

    def bounds(self, step: int) -> tuple[float, float]:
        """``(min, max)`` masking rate at optimizer step ``step``."""
        p = self.progress(step)
        start = self.start_masking_rate
        return (start + (self.final_min_masking_rate - start) * p, start + (self.final_max_masking_rate - start) * p)

    def stratum(self, step: int, accum_index: int = 0, accum_steps: int = 1, rank: int = 0,
                world_size: int = 1) -> tuple[float, float]:
        """Bounds of the stratum of micro-batch ``accum_index`` of ``accum_steps`` on ``rank`` of ``world_size``."""
        _check_index("accum_index", accum_index, accum_steps)
        _check_index("rank", rank, world_size)
        low, high = self.bounds(step)
        return stratum_bounds(low, high, accum_index * world_size + rank, accum_steps * world_size)

    def sample(self, step: int, accum_index: int = 0, accum_steps: int = 1, rank: int = 0, world_size: int = 1,
               batch_size: int | None = None, per_sequence: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Masking rates for one micro-batch (float64; shape ``(batch_size,)`` or 0-d); see the module doc."""
        _check_index("accum_index", accum_index, accum_steps)
        _check_index("rank", rank, world_size)
        low, high = self.bounds(step)
        return stratified_rates(low, high, accum_index * world_size + rank, accum_steps * world_size, batch_size,
                                per_sequence, generator)

    def to_dict(self) -> dict:
        return asdict(self)


def _check_index(name: str, index: int, count: int) -> None:
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"{name} {index} is outside 0..{count - 1}")
