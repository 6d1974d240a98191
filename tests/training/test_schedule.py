"""Tests of asarm.training.schedule: the masking-rate warm-up and stratified draws."""

from __future__ import annotations

import pytest
import torch

from asarm.training.schedule import MaskingRateSchedule, stratified_rates, stratum_bounds


def test_warmup_is_linear_for_both_ends():
    s = MaskingRateSchedule(start_masking_rate=0.15, final_min_masking_rate=0.75, final_max_masking_rate=0.85,
                            masking_warmup_steps=100)
    assert s.bounds(0) == pytest.approx((0.15, 0.15))
    assert s.bounds(50) == pytest.approx((0.45, 0.50))
    assert s.bounds(25) == pytest.approx((0.15 + 0.6 * 0.25, 0.15 + 0.7 * 0.25))
    assert s.bounds(100) == pytest.approx((0.75, 0.85))
    assert s.bounds(10_000) == pytest.approx((0.75, 0.85))
    instant = MaskingRateSchedule(0.5, 0.9, 0.99, masking_warmup_steps=0)
    assert instant.bounds(0) == pytest.approx((0.9, 0.99))


def test_strata_tile_the_range_in_order():
    s = MaskingRateSchedule(0.2, 0.9, 0.99, masking_warmup_steps=0)
    accum, world = 3, 2
    edges = []
    for a in range(accum):
        for r in range(world):
            edges.append(s.stratum(7, a, accum, r, world))
    # stratum index a * R + r: consecutive, equal, covering [min, max]
    assert edges[0][0] == pytest.approx(0.9) and edges[-1][1] == pytest.approx(0.99)
    for (lo, hi), (lo2, _) in zip(edges, edges[1:]):
        assert hi == pytest.approx(lo2)
    widths = [hi - lo for lo, hi in edges]
    assert max(widths) - min(widths) < 1e-12 and widths[0] == pytest.approx(0.09 / 6)
    assert s.stratum(0, 1, 3, 0, 2) == pytest.approx(stratum_bounds(0.9, 0.99, 2, 6))


def test_samples_fall_in_their_stratum_and_are_uniform_there():
    s = MaskingRateSchedule(0.1, 0.5, 0.9, masking_warmup_steps=10)
    g = torch.Generator().manual_seed(0)
    for a in range(2):
        for r in range(4):
            lo, hi = s.stratum(5, a, 2, r, 4)
            draws = torch.stack([s.sample(5, a, 2, r, 4, generator=g) for _ in range(400)])
            assert draws.dtype == torch.float64 and draws.shape == (400,)
            assert (draws >= lo).all() and (draws <= hi).all()
            assert draws.mean().item() == pytest.approx((lo + hi) / 2, abs=0.08 * (hi - lo))


def test_shared_and_per_sequence_draws():
    s = MaskingRateSchedule(0.9, 0.9, 0.99, masking_warmup_steps=0)
    g = torch.Generator().manual_seed(1)
    shared = s.sample(3, 1, 4, 0, 1, batch_size=5, generator=g)
    assert shared.shape == (5,) and (shared == shared[0]).all()
    lo, hi = s.stratum(3, 1, 4)
    per_seq = s.sample(3, 1, 4, 0, 1, batch_size=5, per_sequence=True, generator=g)
    assert per_seq.shape == (5,)
    width = (hi - lo) / 5
    for b in range(5):  # row b in sub-stratum b
        assert lo + b * width - 1e-12 <= per_seq[b].item() <= lo + (b + 1) * width + 1e-12
    # reproducible with the same generator state
    a = s.sample(3, 0, 4, batch_size=3, per_sequence=True, generator=torch.Generator().manual_seed(5))
    b = s.sample(3, 0, 4, batch_size=3, per_sequence=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_one_step_of_strata_covers_the_range_evenly():
    # all S strata of one optimizer step together: one draw in each of S equal bins
    g = torch.Generator().manual_seed(2)
    draws = [stratified_rates(0.0, 1.0, i, 8, generator=g).item() for i in range(8)]
    assert sorted(int(d * 8) for d in draws) == list(range(8))


def test_validation():
    with pytest.raises(ValueError, match="final_min_masking_rate"):
        MaskingRateSchedule(0.1, 0.9, 0.8)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        MaskingRateSchedule(0.0, 0.5, 0.6)
    with pytest.raises(ValueError, match="masking_warmup_steps"):
        MaskingRateSchedule(0.1, 0.5, 0.6, masking_warmup_steps=-1)
    s = MaskingRateSchedule()
    with pytest.raises(ValueError, match="accum_index"):
        s.sample(0, accum_index=2, accum_steps=2)
    with pytest.raises(ValueError, match="rank"):
        s.stratum(0, rank=3, world_size=2)
    with pytest.raises(ValueError, match="step"):
        s.bounds(-1)
    assert MaskingRateSchedule(**s.to_dict()) == s
