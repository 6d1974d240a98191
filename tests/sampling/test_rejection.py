"""The accept / residual / bonus step on hand-made distributions (exact cases, in the style of vLLM's
rejection-sampler tests), plus its distribution on one slot."""

import pytest
import torch

from asarm.sampling.rejection import verify_drafts

V = 4


def dist(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def run(p, q, drafts, num, u_accept, u_next, **kw):
    return verify_drafts(p[None], q[None], torch.tensor([drafts]), torch.tensor([num]),
                         torch.tensor([u_accept], dtype=torch.float64),
                         torch.tensor([u_next], dtype=torch.float64), **kw)


def test_always_accept_when_p_equals_q():
    p = dist([0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1])
    v = run(p, p.clone(), [3, 0, 2], 3, [0.999, 0.999, 0.999], 0.5)
    assert int(v.num_accepted) == 3 and not v.rejected and not v.has_next


def test_reject_at_slot_j_and_draw_from_the_residual():
    p = dist([0.5, 0.5, 0, 0], [0.0, 0.0, 1.0, 0.0], [0.25] * 4)
    q = dist([0.5, 0.5, 0, 0], [0.0, 1.0, 0.0, 0.0], [0.25] * 4)
    # slot 0 accepted (ratio 1), slot 1: p(1)/q(1) = 0 -> rejected; residual max(0, p - q) = point mass on 2
    v = run(p, q, [1, 1, 3], 3, [0.3, 0.0, 0.0], 0.99)
    assert int(v.num_accepted) == 1 and bool(v.rejected) and bool(v.has_next) and int(v.next_token) == 2
    assert not bool(v.bonus)


def test_acceptance_threshold_is_the_ratio():
    p, q = dist([0.2, 0.8, 0, 0]), dist([0.5, 0.5, 0, 0])
    assert int(run(p, q, [0], 1, [0.399], 0.0).num_accepted) == 1  # ratio 0.4
    assert int(run(p, q, [0], 1, [0.401], 0.0).num_accepted) == 0
    assert int(run(p, q, [1], 1, [0.999], 0.0).num_accepted) == 1  # ratio 1.6 >= 1: always


def test_point_mass_proposal():
    """q = a point mass on a token p gives probability 0.3: accepted 30% of the time, and the residual
    is p without that token, renormalised."""
    p, q = dist([0.3, 0.3, 0.4, 0.0]), dist([1.0, 0.0, 0.0, 0.0])
    assert int(run(p, q, [0], 1, [0.29], 0.0).num_accepted) == 1
    rejected = run(p, q, [0], 1, [0.31], 0.5)
    # residual = [0, 0.3, 0.4, 0] / 0.7: u = 0.5 falls in token 2 (cdf 0.4286, 1.0)
    assert bool(rejected.rejected) and int(rejected.next_token) == 2


def test_zero_mass_residual_falls_back_to_p():
    """p = q up to rounding but a rejection anyway (u at the top of the ratio): the residual has no mass,
    so the replacement is drawn from p itself, never from a zero vector."""
    p = dist([0.5, 0.5, 0.0, 0.0])
    q = p * (1 + 1e-12)
    v = run(p, q, [0], 1, [0.9999999999999], 0.75)
    assert bool(v.rejected) and int(v.next_token) == 1


def test_bonus_only_when_every_draft_is_accepted_and_allowed():
    p = dist([0.25] * 4, [0.25] * 4)
    bonus = dist([0.0, 0.0, 0.0, 1.0])
    v = run(p, p.clone(), [0, 1], 2, [0.5, 0.5], 0.1, bonus=bonus[None])
    assert bool(v.bonus) and int(v.next_token) == 3 and int(v.num_accepted) == 2
    v = run(p, p.clone(), [0, 1], 2, [0.5, 0.5], 0.1, bonus=bonus[None], has_bonus=torch.tensor([False]))
    assert not v.has_next
    # a rejection takes precedence over the bonus
    q = dist([0.25] * 4, [1.0, 0, 0, 0])
    v = run(p, q, [0, 0], 2, [0.5, 0.5], 0.1, bonus=bonus[None])
    assert bool(v.rejected) and not bool(v.bonus) and int(v.next_token) in (1, 2, 3)


def test_no_drafts_draws_the_bonus_token():
    """A row without drafts (a single-pass call that drafts for itself) commits one token from the bonus
    distribution; without a bonus distribution there is nothing to draw from."""
    bonus = dist([0.0, 0.5, 0.5, 0.0])
    empty = torch.zeros(1, 0, V, dtype=torch.float64)
    v = verify_drafts(empty, empty, torch.zeros(1, 0, dtype=torch.long), torch.tensor([0]),
                      torch.zeros(1, 0, dtype=torch.float64), torch.tensor([0.75], dtype=torch.float64),
                      bonus=bonus[None])
    assert int(v.num_accepted) == 0 and not bool(v.rejected) and bool(v.bonus) and int(v.next_token) == 2
    with pytest.raises(ValueError, match="needs a bonus"):
        verify_drafts(empty, empty, torch.zeros(1, 0, dtype=torch.long), torch.tensor([0]),
                      torch.zeros(1, 0, dtype=torch.float64), torch.tensor([0.75], dtype=torch.float64))


def test_slots_beyond_num_drafts_are_ignored():
    p, q = dist([0.5, 0.5, 0, 0], [1.0, 0, 0, 0]), dist([0.5, 0.5, 0, 0], [0, 1.0, 0, 0])
    v = run(p, q, [0, 1], 1, [0.1, 0.9], 0.0)  # slot 1 would be rejected, but only one draft counts
    assert int(v.num_accepted) == 1 and not bool(v.rejected)


def test_rows_are_independent_and_the_marginal_is_p():
    """Many rows, one slot: draft from q, accept or resample: the committed token follows p (chi-square)."""
    from scipy import stats

    n = 200_000
    g = torch.Generator().manual_seed(0)
    p, q = dist([0.1, 0.2, 0.3, 0.4])[0], dist([0.4, 0.3, 0.2, 0.1])[0]
    drafts = torch.multinomial(q, n, replacement=True, generator=g)[:, None]
    u = torch.rand(n, 2, dtype=torch.float64, generator=g)
    v = verify_drafts(p.expand(n, 1, V), q.expand(n, 1, V), drafts, torch.ones(n, dtype=torch.long), u[:, :1], u[:, 1])
    out = torch.where(v.rejected, v.next_token, drafts[:, 0])
    counts = torch.bincount(out, minlength=V).double()
    assert stats.chisquare(counts.numpy(), (p * n).numpy()).pvalue > 1e-3
    # negative control: the drafts themselves follow q, which the same test rejects
    assert stats.chisquare(torch.bincount(drafts[:, 0], minlength=V).double().numpy(), (p * n).numpy()).pvalue < 1e-12
