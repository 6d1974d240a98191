import pytest
import torch

from asarm import orders


def _slow_any_subset_check(sigma, n_prompt, length):
    """The 2^N family, written out: prompt ranks are < m; the rest increase with position; padding last."""
    seq_len = len(sigma)
    assert sorted(sigma) == list(range(seq_len))
    prompt = [p for p in range(length) if sigma[p] < n_prompt]
    assert len(prompt) == n_prompt
    decoded = [p for p in range(length) if sigma[p] >= n_prompt]
    assert [sigma[p] for p in decoded] == list(range(n_prompt, length))
    assert [sigma[p] for p in range(length, seq_len)] == list(range(length, seq_len))


def test_any_subset_matches_definition_with_padding():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([9, 5, 1, 9, 7])
    n_prompt = torch.tensor([3, 5, 1, 0, 2])
    for _ in range(20):
        sigma = orders.any_subset(n_prompt, 9, lengths=lengths, generator=gen)
        for b in range(5):
            _slow_any_subset_check(sigma[b].tolist(), int(n_prompt[b]), int(lengths[b]))


def test_any_subset_prompt_is_uniform_over_subsets():
    gen = torch.Generator().manual_seed(1)
    sigma = orders.any_subset(torch.full((6000,), 1), 4, generator=gen)
    counts = torch.bincount((sigma == 0).int().argmax(dim=1), minlength=4).float()
    assert ((counts / 6000 - 0.25).abs() < 0.03).all()


def test_any_permutation_is_a_permutation_of_real_positions():
    gen = torch.Generator().manual_seed(2)
    lengths = torch.tensor([6, 3])
    sigma = orders.any_permutation(torch.tensor([2, 1]), 6, lengths=lengths, generator=gen)
    assert sorted(sigma[0].tolist()) == list(range(6))
    assert sigma[1, 3:].tolist() == [3, 4, 5]
    # Not left to right among the decoded positions in general.
    many = orders.any_permutation(torch.full((200,), 1), 6, generator=gen)
    decoded_order_sorted = [(lambda r: sorted(r) == r)([x for x in row if x >= 1]) for row in many.tolist()]
    assert not all(decoded_order_sorted)


def test_left_to_right_and_infilling():
    assert orders.left_to_right(2, 4).tolist() == [[0, 1, 2, 3]] * 2
    visible = torch.tensor([[True, False, False, True, False], [False, True, True, True, True]])
    sigma, n_prompt = orders.infilling(visible)
    assert n_prompt.tolist() == [2, 4]
    assert sigma.tolist() == [[0, 2, 3, 1, 4], [4, 0, 1, 2, 3]]


def test_num_prompt_for_rate_matches_paper():
    assert int(orders.num_prompt_for_rate(0.95, 512)) == 26
    assert orders.num_prompt_for_rate(0.5, torch.tensor([10, 7])).tolist() == [5, 4]
    with pytest.raises(ValueError, match="masking_rate"):
        orders.num_prompt_for_rate(1.5, 10)


def test_positions_by_rank_inverts_sigma():
    sigma = orders.any_permutation(torch.tensor([1, 2]), 7, generator=torch.Generator().manual_seed(3))
    pos = orders.positions_by_rank(sigma)
    assert (sigma.gather(1, pos) == torch.arange(7)).all()
    ranks = torch.tensor([[3, 0, -1], [6, -1, -1]])
    picked = orders.positions_of_ranks(pos, ranks)
    assert picked[0, 2] == -1 and (picked[1, 1:] == -1).all()
    assert sigma[0, picked[0, 0]] == 3 and sigma[0, picked[0, 1]] == 0 and sigma[1, picked[1, 0]] == 6


def test_validate_order_errors():
    tokens = torch.tensor([[10, 11, 12, 13]])
    sigma = torch.tensor([[0, 1, 2, 3]])
    with pytest.raises(ValueError, match="shape"):
        orders.validate_order(tokens, sigma[:, :3], torch.tensor([1]))
    with pytest.raises(ValueError, match="not permutations"):
        orders.validate_order(tokens, torch.tensor([[0, 1, 1, 3]]), torch.tensor([1]))
    with pytest.raises(ValueError, match="n_prompt must be >= 1"):
        orders.validate_order(tokens, sigma, torch.tensor([0]))
    with pytest.raises(ValueError, match="<mask>"):
        orders.validate_order(torch.tensor([[6, 11, 12, 13]]), sigma, torch.tensor([2]), mask_token_id=6)
    with pytest.raises(ValueError, match="padding"):
        orders.validate_order(tokens, torch.tensor([[3, 0, 1, 2]]), torch.tensor([1]), lengths=torch.tensor([3]))
    with pytest.raises(ValueError, match="padding"):
        orders.validate_order(tokens, sigma, torch.tensor([1]),
                              padding_mask=torch.tensor([[True, False, False, False]]))
    with pytest.raises(ValueError, match="lengths"):
        orders.validate_order(tokens, sigma, torch.tensor([1]), lengths=torch.tensor([5]))
    # Left padding ranked last is fine.
    n_prompt, lengths = orders.validate_order(tokens, torch.tensor([[3, 0, 1, 2]]), torch.tensor([1]),
                                              padding_mask=torch.tensor([[True, False, False, False]]))
    assert lengths.tolist() == [3]
