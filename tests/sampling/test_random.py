import torch

from asarm.sampling.random import RowStreams, sample_categorical


def test_inverse_cdf_boundaries_and_zero_mass_tokens():
    probs = torch.tensor([[0.0, 0.25, 0.25, 0.0, 0.5]], dtype=torch.float64).expand(6, -1)
    uniforms = torch.tensor([0.0, 0.2, 0.25, 0.3, 0.5, 0.9], dtype=torch.float64)
    # u = 0 must skip the leading zero-mass token; u on a cdf step belongs to the next token
    assert sample_categorical(probs, uniforms).tolist() == [1, 1, 2, 2, 4, 4]


def test_unnormalised_rows_and_leading_batch_dims():
    probs = torch.tensor([[[2.0, 0.0, 6.0], [0.0, 3.0, 1.0]]], dtype=torch.float64)  # (1, 2, 3)
    uniforms = torch.tensor([[0.24, 0.76]], dtype=torch.float64)
    assert sample_categorical(probs, uniforms).tolist() == [[0, 2]]


def test_a_threshold_at_the_total_takes_the_last_token_with_mass():
    # u = 1 is outside the contract, but it is what a rounded-up threshold looks like
    probs = torch.zeros(3, 10, dtype=torch.float64)
    probs[0, :7] = 0.1
    probs[1, [2, 5]] = 1.0 / 3.0
    probs[2, 9] = 1.0
    assert sample_categorical(probs, torch.ones(3, dtype=torch.float64)).tolist() == [6, 5, 9]


def test_draws_near_one_never_land_on_zero_mass():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(64, 50, generator=gen, dtype=torch.float64) * (torch.rand(64, 50, generator=gen) < 0.3)
    probs[:, 0] += 1e-3
    uniforms = 1 - torch.rand(64, generator=gen, dtype=torch.float64) * 1e-15
    drawn = sample_categorical(probs, uniforms)
    assert (probs.gather(1, drawn[:, None]) > 0).all()
    assert torch.equal(drawn, 49 - (probs.flip(1) > 0).to(torch.int8).argmax(1))  # the last token with mass


def test_row_streams_are_per_row():
    together = RowStreams(3, seed=7).uniform(torch.tensor([0, 1, 2]), 4)
    alone = RowStreams(3, seed=7).uniform(torch.tensor([1]), 4)
    assert torch.equal(together[1:2], alone)
    assert not torch.equal(together[0], together[1])
