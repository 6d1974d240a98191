"""One way to derive an integer seed from several (a base seed, a trial, a row, a process rank).

Every place that needs a per-row or per-process seed mixes its parts here, so that the same parts always
give the same seed and ``(a, b)`` never collides with ``(b, a)``.
"""

from __future__ import annotations

import torch

__all__ = ["mix_seed", "row_seeds"]

# One prime per mixing stage: h = h * M_i + part_i.
_MULTIPLIERS = (1_000_003, 1_000_033, 1_000_037)


def mix_seed(*parts: int) -> int:
    """``mix_seed(seed, trial, row)`` = ``(seed * 1_000_003 + trial) * 1_000_033 + row`` (two parts: the
    first stage only)."""
    if not parts:
        raise ValueError("mix_seed needs at least one part")
    if len(parts) > len(_MULTIPLIERS) + 1:
        raise ValueError(f"mix_seed takes at most {len(_MULTIPLIERS) + 1} parts, got {len(parts)}")
    seed = int(parts[0])
    for multiplier, part in zip(_MULTIPLIERS, parts[1:]):
        seed = seed * multiplier + int(part)
    return seed


def row_seeds(seed: int, trial: int, items) -> torch.Tensor:
    """Per-row sampling seeds for ``items`` (their indices in an evaluation set) in ``trial``: they depend only
    on (seed, trial, item), never on the sampler, the batch size or the other rows, so samplers are paired."""
    return torch.tensor([mix_seed(seed, trial, item) for item in items], dtype=torch.long)
