"""Per-row random streams and float64 categorical sampling.

Every batch row owns a ``torch.Generator`` and draws a fixed number of uniforms per step, whatever the
other rows do, so a row's output for a given seed does not depend on the rest of the batch.
Sampling is by inverse CDF on float64 probabilities, so a zero-probability token (``<mask>``) can
never be drawn.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["RowStreams", "sample_categorical"]


def _row_seed(seed: int, row: int) -> int:
    # SeedSequence mixes (seed, row) so neighbouring rows get unrelated streams.
    return int(np.random.SeedSequence([int(seed) & (2**63 - 1), row]).generate_state(1, dtype=np.uint64)[0] >> 1)


class RowStreams:
    """One generator per row.

    ``seed`` is an int (row b uses a stream derived from (seed, b)) or a ``(B,)`` tensor/list of
    per-row seeds (row b uses exactly ``seeds[b]``, so a row decodes identically alone or in any batch);
    alternatively ``generator`` (a ``torch.Generator``) draws the per-row seeds.
    """

    def __init__(self, batch_size: int, seed=None, generator: torch.Generator | None = None):
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if generator is not None:
            seeds = torch.randint(0, 2**62, (batch_size,), generator=generator).tolist()
        elif seed is None:
            seeds = torch.randint(0, 2**62, (batch_size,)).tolist()
        elif isinstance(seed, int):
            seeds = [_row_seed(seed, b) for b in range(batch_size)]
        else:
            seeds = torch.as_tensor(seed).reshape(-1).tolist()
            if len(seeds) != batch_size:
                raise ValueError(f"per-row seeds must have length {batch_size}, got {len(seeds)}")
        self.seeds = [int(s) for s in seeds]
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    def uniform(self, rows: torch.Tensor, n: int, device=None) -> torch.Tensor:
        """``(len(rows), n)`` float64 uniforms in [0, 1), ``n`` drawn from each listed row's stream."""
        draws = [torch.rand(n, generator=self.generators[r], dtype=torch.float64) for r in rows.tolist()]
        out = draws[0][None] if len(draws) == 1 else torch.stack(draws)
        return out.to(device) if device is not None else out


def sample_categorical(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws: ``probs (..., V)`` (non-negative, not necessarily normalised, float64),
    ``uniforms (...)`` in [0, 1). Tokens of probability zero are never returned."""
    cdf = probs.cumsum(dim=-1)
    threshold = (uniforms * cdf[..., -1]).unsqueeze(-1)
    # The first token whose cdf exceeds the threshold has mass (equal cdf values mean zero mass) ...
    idx = torch.searchsorted(cdf, threshold, right=True).clamp(max=probs.shape[-1] - 1)
    # ... as long as the cdf is monotone and the threshold below the total. A parallel (GPU) cumsum
    # rounds each prefix separately, so guard anyway: a zero-mass hit takes the last token with mass.
    on_zero_mass = (probs.gather(-1, idx) <= 0).squeeze(-1)
    idx = idx.squeeze(-1)
    if on_zero_mass.any():
        has_mass = (probs[on_zero_mass] > 0).to(torch.int8)
        idx[on_zero_mass] = probs.shape[-1] - 1 - torch.argmax(has_mass.flip(-1), dim=-1)
    return idx
