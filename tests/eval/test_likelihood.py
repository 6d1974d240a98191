import math

import pytest
import torch

from asarm.eval.likelihood import log_likelihood, order_averaged_log_likelihood, order_for

from helpers import exact_joint, tiny_model


def test_orders_put_visible_first_and_shuffle_only_targets():
    visible = torch.tensor([[True, False, False, True, False, False]] * 50)
    sigma, n_prompt = order_for(visible, "left_to_right")
    assert sigma[0].tolist() == [0, 2, 3, 1, 4, 5] and n_prompt[0] == 2
    sigma, n_prompt = order_for(visible, "any_permutation", generator=torch.Generator().manual_seed(0))
    assert (sigma[:, [0, 3]] == torch.tensor([0, 1])).all()
    assert all(sorted(row) == [2, 3, 4, 5] for row in sigma[:, [1, 2, 4, 5]].tolist())
    assert len({tuple(row) for row in sigma.tolist()}) > 10  # really random
    with pytest.raises(ValueError, match="order family"):
        order_for(visible, "random")


def test_log_likelihood_is_the_exact_joint_of_the_completion():
    """Against brute force: the joint of a completion is its probability in the enumerated joint."""
    model = tiny_model(seed=0, init_std=0.5)
    tokens = torch.tensor([1, 7, 3, 4, 8])
    visible = torch.tensor([True, False, True, False, False])
    sigma, n_prompt = order_for(visible[None], "left_to_right")
    completions, probs = exact_joint(model, tokens, sigma[0], int(n_prompt[0]))
    scores = log_likelihood(model, completions[:40], visible.expand(40, -1))
    assert torch.allclose(scores, probs[:40].log(), atol=1e-5)


def test_order_average_and_interval():
    model = tiny_model(seed=1, init_std=0.5)
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(7, 10, (3, 7), generator=gen)
    visible = torch.tensor([[True, False, False, True, False, False, False]] * 3)
    result = order_averaged_log_likelihood(model, tokens, visible, num_orders=6, generator=gen)
    assert result.per_order.shape == (3, 6)
    assert torch.allclose(result.mean, result.per_order.mean(1))
    assert (result.ci95[:, 0] <= result.mean).all() and (result.mean <= result.ci95[:, 1]).all()
    assert (result.std > 0).all()  # a random model is not order-consistent
    assert torch.equal(result.num_targets, torch.tensor([5, 5, 5]))
    assert torch.allclose(result.nll_per_token, -result.mean / 5)
    assert math.isclose(float(result.ci95[0, 1] - result.ci95[0, 0]),
                        2 * 2.5706 * float(result.std[0]) / math.sqrt(6), rel_tol=1e-3)


def test_bad_input():
    model = tiny_model(seed=1)
    tokens = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="at least one visible"):
        log_likelihood(model, tokens, torch.tensor([[False, False, False]]))
    with pytest.raises(ValueError, match="bool visible mask"):
        log_likelihood(model, tokens, torch.tensor([[1, 0, 0]]))
    with pytest.raises(ValueError, match="num_orders"):
        order_averaged_log_likelihood(model, tokens, torch.tensor([[True, False, False]]), num_orders=0)
