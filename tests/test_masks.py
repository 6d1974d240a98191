import torch

from asarm import masks, orders

from helpers import tiny_model


def _slow_perm_mask(sigma, n_prompt, n_visible=None):
    seq_len = len(sigma)
    limit = seq_len if n_visible is None else n_visible
    out = torch.ones(seq_len, seq_len)
    for i in range(seq_len):
        for j in range(seq_len):
            both_prompt = sigma[i] < n_prompt and sigma[j] < n_prompt
            if sigma[j] < min(sigma[i], limit) or both_prompt:
                out[i, j] = 0
    return out


def test_perm_masks_match_slow_reference():
    gen = torch.Generator().manual_seed(0)
    n_prompt = torch.tensor([1, 3, 2, 6])
    sigma = torch.cat([orders.any_subset(n_prompt[:2], 6, generator=gen),
                       orders.any_permutation(n_prompt[2:], 6, generator=gen)])
    n_visible = torch.tensor([1, 4, 5, 6])
    oracle = masks.oracle_perm_mask(sigma, n_prompt)
    draft = masks.draft_perm_mask(sigma, n_prompt, n_visible)
    for b in range(4):
        s, m = sigma[b].tolist(), int(n_prompt[b])
        assert torch.equal(oracle[b], _slow_perm_mask(s, m))
        assert torch.equal(draft[b], _slow_perm_mask(s, m, int(n_visible[b])))
    # The draft mask with everything visible is the oracle mask.
    assert torch.equal(masks.draft_perm_mask(sigma, n_prompt, torch.full((4,), 6)), oracle)


def test_target_mapping_one_hot_and_unused_slots():
    tm = masks.target_mapping(torch.tensor([[2, 0, -1]]), 4)
    assert tm.tolist() == [[[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]]


def test_no_output_depends_on_undecoded_positions():
    """Placeholders (ranks >= the visible limit, or above every query) can hold anything."""
    model = tiny_model(seed=1, init_std=0.5)
    gen = torch.Generator().manual_seed(4)
    seq_len, batch = 8, 3
    n_prompt = torch.tensor([2, 3, 1])
    sigma = orders.any_permutation(n_prompt, seq_len, generator=gen)
    tokens = torch.randint(0, 10, (batch, seq_len), generator=gen)
    n_visible = torch.tensor([4, 3, 5])
    queries = torch.stack([torch.argsort(sigma[b])[int(n_visible[b]):int(n_visible[b]) + 3] for b in range(batch)])
    draft = model.logits(tokens, sigma, n_prompt, queries, n_visible=n_visible)
    oracle = model.logits(tokens, sigma, n_prompt, queries)
    top_query_rank = sigma.gather(1, queries).max(1).values
    other = tokens.clone()
    scramble = torch.randint(0, 10, other.shape, generator=gen)
    other = torch.where(sigma >= n_visible[:, None], scramble, other)
    assert torch.allclose(model.logits(other, sigma, n_prompt, queries, n_visible=n_visible), draft, atol=1e-5)
    other = torch.where(sigma >= top_query_rank[:, None], scramble, tokens)
    assert torch.allclose(model.logits(other, sigma, n_prompt, queries), oracle, atol=1e-5)
    # ... but the oracle does depend on the tokens between the visible limit and the queries.
    other = torch.where(sigma >= n_visible[:, None], scramble, tokens)
    assert not torch.allclose(model.logits(other, sigma, n_prompt, queries), oracle, atol=1e-5)


def test_first_draft_query_equals_oracle_query():
    """Lemma 1: the draft mask's first query is exactly the oracle conditional."""
    model = tiny_model(seed=2, init_std=0.5)
    gen = torch.Generator().manual_seed(5)
    n_prompt = torch.tensor([2, 4])
    sigma = orders.any_subset(n_prompt, 7, generator=gen)
    tokens = torch.randint(0, 10, (2, 7), generator=gen)
    first = torch.argsort(sigma)[:, 4:5]
    draft = model.logits(tokens, sigma, n_prompt, first, n_visible=torch.tensor([4, 4]))
    oracle = model.logits(tokens, sigma, n_prompt, first)
    assert torch.allclose(draft, oracle, atol=1e-6)
