"""Sampler behaviour beyond exactness: NFE accounting, batching, seeding, bad input."""

import warnings

import pytest
import torch

from asarm import orders
from asarm.sampling import LossySamplingWarning, assd_decode, sequential_decode
from asarm.sampling.drafters import HeadDrafter
from asarm.sampling.engine import FullEngine

from helpers import random_head, tiny_model

_HEAD = HeadDrafter(random_head(tiny_model(seed=0, init_std=0.5), seed=1))

SAMPLERS = {
    "sequential": lambda m, *a, **kw: sequential_decode(m, *a, **kw),
    "assd-self": lambda m, *a, **kw: assd_decode(m, *a, k=3, **kw),
    "assd-ngram": lambda m, *a, **kw: assd_decode(m, *a, k=3, drafter="ngram", **kw),
    "assd-bonus": lambda m, *a, **kw: assd_decode(m, *a, k=3, bonus=True, **kw),
    "assd-fused": lambda m, *a, **kw: assd_decode(m, *a, k=3, fused=True, outcomes="all", **kw),
    "assd-fused-outcomes1": lambda m, *a, **kw: assd_decode(m, *a, k=3, fused=True, outcomes=1, **kw),
    "assd-fused-adaptive": lambda m, *a, **kw: assd_decode(m, *a, k=3, fused=True, draft_length=0.3, **kw),
    "assd-head": lambda m, *a, **kw: assd_decode(m, *a, k=3, drafter=_HEAD, **kw),
    "assd-fused-head": lambda m, *a, **kw: assd_decode(m, *a, k=3, fused=True, drafter=_HEAD, **kw),
}


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0, init_std=0.5)


def _batch(batch_size=8, seq_len=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, seq_len + 1, (batch_size,), generator=gen)
    n_prompt = torch.stack([torch.randint(1, int(n), (1,), generator=gen)[0] for n in lengths])
    half = batch_size // 2
    sigma = torch.cat([
        orders.any_subset(n_prompt[:half], seq_len, lengths=lengths[:half], generator=gen),
        orders.any_permutation(n_prompt[half:], seq_len, lengths=lengths[half:], generator=gen)])
    tokens = torch.randint(7, 10, (batch_size, seq_len), generator=gen)
    return tokens, sigma, n_prompt, lengths


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_row_output_does_not_depend_on_the_batch(model, name):
    tokens, sigma, n_prompt, lengths = _batch()
    seeds = torch.arange(100, 108)
    together = SAMPLERS[name](model, tokens, sigma, n_prompt, lengths, seed=seeds)
    for b in [0, 5, 7]:
        alone = SAMPLERS[name](model, tokens[b:b + 1], sigma[b:b + 1], n_prompt[b:b + 1], lengths[b:b + 1],
                               seed=seeds[b:b + 1])
        assert torch.equal(alone.tokens[0], together.tokens[b])
        assert alone.nfe[0] == together.nfe[b] and alone.rounds[0] == together.rounds[b]
    again = SAMPLERS[name](model, tokens, sigma, n_prompt, lengths, seed=seeds)
    assert torch.equal(again.tokens, together.tokens)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_prompt_and_padding_kept_and_no_mask_sampled(model, name):
    tokens, sigma, n_prompt, lengths = _batch(seed=1)
    out = SAMPLERS[name](model, tokens, sigma, n_prompt, lengths, seed=0)
    pos = torch.arange(tokens.shape[1])
    keep = (sigma < n_prompt[:, None]) | (pos >= lengths[:, None])
    assert torch.equal(out.tokens[keep], tokens[keep])
    assert not (out.tokens[~keep] == model.mask_token_id).any()


def test_sequential_nfe_is_exactly_tokens_to_generate(model):
    tokens, sigma, n_prompt, lengths = _batch(seed=2)
    out = sequential_decode(model, tokens, sigma, n_prompt, lengths, seed=0)
    assert torch.equal(out.nfe, lengths - n_prompt)
    assert torch.equal(out.rounds, out.nfe)


def test_assd_self_nfe_never_exceeds_sequential():
    """Property over random models, orders, prompt sizes and k >= 2: NFE <= L - m on every row, and the
    first self-draft token is accepted in every round."""
    for trial in range(6):
        model = tiny_model(seed=trial, init_std=[0.02, 0.5, 2.0][trial % 3])
        tokens, sigma, n_prompt, lengths = _batch(batch_size=10, seq_len=14, seed=10 + trial)
        for k in (2, 3, 5, 8):
            out = assd_decode(model, tokens, sigma, n_prompt, lengths, k=k, seed=trial)
            generated = lengths - n_prompt
            assert (out.nfe <= generated).all(), (trial, k, out.nfe, generated)
            assert torch.equal(out.accepted_by_index[:, 0], out.rounds)
            assert torch.equal(out.accepted_by_index.sum(1), out.accepted)
            assert (out.accepted_by_index <= out.drafted_by_index).all()
            # Each round fixes its accepted drafts plus one resampled token when one was rejected.
            rejected_rounds = out.drafted_by_index.sum(1) - out.accepted
            assert torch.equal(out.accepted + rejected_rounds, generated)


class _RecordingEngine:
    """The full engine, recording (n_fixed, query_ranks, draft) of every call."""

    def __init__(self, model):
        self.inner = FullEngine(model)
        self.calls = []

    def start(self, tokens, sigma, n_prompt):
        session = self.inner.start(tokens, sigma, n_prompt)
        engine = self

        class Session:
            def logits(self, rows, tokens, n_fixed, query_ranks, draft=False, limits=None):
                engine.calls.append((n_fixed.clone(), query_ranks.clone(), draft, limits))
                return session.logits(rows, tokens, n_fixed, query_ranks, draft, limits)
        return Session()


def test_self_drafted_verify_pass_does_not_requery_the_exact_first_draft(model):
    tokens, sigma, n_prompt, lengths = _batch(seed=5)
    engine = _RecordingEngine(model)
    assd_decode(model, tokens, sigma, n_prompt, lengths, k=3, seed=0, engine=engine)
    verify_calls = [(n, ranks) for n, ranks, draft, limits in engine.calls if not draft]
    draft_calls = [(n, ranks) for n, ranks, draft, limits in engine.calls if draft]
    assert verify_calls and draft_calls
    for n, ranks in verify_calls:  # drafts 2..k only: ranks n+1 .. n+k-1
        used = ranks >= 0
        assert (ranks[used] > n[:, None].expand_as(ranks)[used]).all()
        assert torch.equal(ranks[:, 0], n + 1)
    for n, ranks in draft_calls:
        assert torch.equal(ranks[:, 0], n)


def test_assd_k1_is_one_exact_draft_per_token(model):
    tokens, sigma, n_prompt, lengths = _batch(seed=3)
    out = assd_decode(model, tokens, sigma, n_prompt, lengths, k=1, seed=0)
    assert torch.equal(out.nfe, lengths - n_prompt)


def test_ngram_counts_one_model_call_and_one_ngram_call_per_round(model):
    tokens, sigma, n_prompt, lengths = _batch(seed=4)
    out = assd_decode(model, tokens, sigma, n_prompt, lengths, k=4, drafter="ngram", seed=0)
    assert torch.equal(out.nfe, out.rounds) and torch.equal(out.model_free_draft_calls, out.rounds)
    assert (out.nfe <= lengths - n_prompt).all()


def test_ngram_drafter_copies_a_repeated_context():
    """On a sequence that repeats one bigram pattern, the context n-gram proposal is that pattern."""
    from asarm.sampling.drafters import DraftRequest, NGramDrafter

    tokens = torch.tensor([[7, 8, 7, 8, 7, 6, 6, 6]])
    sigma = torch.arange(8)[None]
    req = DraftRequest(session=None, rows=torch.tensor([0]), tokens=tokens, sigma=sigma, n_fixed=torch.tensor([5]),
                       query_ranks=torch.tensor([[5, 6, 7]]), query_positions=torch.tensor([[5, 6, 7]]),
                       uniforms=torch.tensor([[0.5, 0.5, 0.5]], dtype=torch.float64), to_probs=None,
                       draft_temperatures=torch.ones(3), mask_token_id=6, vocab_size=10)
    drafts, probs = NGramDrafter().propose(req)
    assert drafts.tolist() == [[8, 7, 8]]
    assert probs[0, 0, 8] == 1.0 and probs[0, 1, 7] == 1.0


def test_r_atol_is_flagged_lossy(model):
    tokens, sigma, n_prompt, lengths = _batch(seed=5)
    with pytest.warns(LossySamplingWarning, match="lossy"):
        out = assd_decode(model, tokens, sigma, n_prompt, lengths, k=3, r_atol=0.1, seed=0)
    assert not out.exact
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert assd_decode(model, tokens, sigma, n_prompt, lengths, k=3, seed=0).exact


def test_generator_and_int_seed(model):
    tokens, sigma, n_prompt, lengths = _batch(seed=6)
    a = sequential_decode(model, tokens, sigma, n_prompt, lengths, generator=torch.Generator().manual_seed(1))
    b = sequential_decode(model, tokens, sigma, n_prompt, lengths, generator=torch.Generator().manual_seed(1))
    c = sequential_decode(model, tokens, sigma, n_prompt, lengths, seed=7)
    d = sequential_decode(model, tokens, sigma, n_prompt, lengths, seed=7)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(c.tokens, d.tokens)
    with pytest.raises(ValueError, match="either seed or generator"):
        sequential_decode(model, tokens, sigma, n_prompt, lengths, seed=1, generator=torch.Generator())
    with pytest.raises(ValueError, match="per-row seeds"):
        sequential_decode(model, tokens, sigma, n_prompt, lengths, seed=torch.arange(3))


def test_bad_input_is_rejected_with_clear_errors(model):
    tokens, sigma, n_prompt, lengths = _batch(seed=7)
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        assd_decode(model, tokens, sigma, n_prompt, lengths, k=0)
    for temperature in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            sequential_decode(model, tokens, sigma, n_prompt, lengths, temperature=temperature)
    for ratio in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="draft_temperature_ratio must be"):
            assd_decode(model, tokens, sigma, n_prompt, lengths, draft_temperature_ratio=ratio)
    too_large = tokens.clone()
    too_large[0, 0] = model.vocab_size
    with pytest.raises(ValueError, match=str(model.vocab_size)):
        assd_decode(model, too_large, sigma, n_prompt, lengths)
    with pytest.raises(ValueError, match="temperature_mode"):
        assd_decode(model, tokens, sigma, n_prompt, lengths, temperature_mode="cold")
    with pytest.raises(ValueError, match="unknown drafter"):
        assd_decode(model, tokens, sigma, n_prompt, lengths, drafter="oracle")
    with pytest.raises(ValueError, match="unknown engine"):
        assd_decode(model, tokens, sigma, n_prompt, lengths, engine="warp")
    with pytest.raises(ValueError, match="shape"):
        sequential_decode(model, tokens, sigma[:, :-1], n_prompt, lengths)
    bad = tokens.clone()
    bad[0, torch.argsort(sigma[0])[0]] = model.mask_token_id
    with pytest.raises(ValueError, match="<mask>"):
        sequential_decode(model, bad, sigma, n_prompt, lengths)
    with pytest.raises(ValueError, match="n_prompt must be >= 1"):
        sequential_decode(model, tokens, sigma, torch.zeros_like(n_prompt), lengths)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_max_new_tokens_stops_early_and_matches_the_full_decode_prefix(model, name):
    """Partial decoding fills exactly the first ranks and leaves the rest masked; for the sequential
    sampler those tokens equal a full decode's with the same seed."""
    tokens, sigma, n_prompt, lengths = _batch(seed=8)
    partial = SAMPLERS[name](model, tokens, sigma, n_prompt, lengths, seed=3, max_new_tokens=2)
    stop = torch.minimum(lengths, n_prompt + 2)
    decoded = (sigma >= n_prompt[:, None]) & (sigma < stop[:, None])
    later = (sigma >= stop[:, None]) & (sigma < lengths[:, None])
    assert not (partial.tokens[decoded] == model.mask_token_id).any()
    assert (partial.tokens[later] == model.mask_token_id).all()
    if name == "sequential":
        full = SAMPLERS[name](model, tokens, sigma, n_prompt, lengths, seed=3)
        assert torch.equal(partial.tokens[decoded], full.tokens[decoded])
        assert torch.equal(partial.nfe, stop - n_prompt)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SAMPLERS[name](model, tokens, sigma, n_prompt, lengths, max_new_tokens=0)


@pytest.mark.parametrize("options", [{"bonus": True}, {"fused": True}, {"fused": True, "outcomes": 1},
                                     {"fused": True, "draft_length": 0.5}, {"draft_length": 0.5}],
                         ids=["bonus", "fused", "fused-outcomes1", "fused-adaptive", "adaptive"])
def test_new_modes_never_exceed_sequential_nfe(options):
    """Property: every call commits at least one token, so NFE <= L - m on every row, for random models,
    orders, prompt sizes and k."""
    for trial in range(4):
        model = tiny_model(seed=trial, init_std=[0.02, 0.5, 2.0][trial % 3])
        tokens, sigma, n_prompt, lengths = _batch(batch_size=10, seq_len=14, seed=20 + trial)
        for k in (1, 2, 3, 5):
            out = assd_decode(model, tokens, sigma, n_prompt, lengths, k=k, seed=trial, **options)
            assert (out.nfe <= lengths - n_prompt).all(), (trial, k, options, out.nfe, lengths - n_prompt)
            assert torch.equal(out.accepted_by_index.sum(1), out.accepted)


def test_fused_rounds_need_one_draft_call_per_row(model):
    """With every outcome covered the next drafts always come from the verify call: the drafter is never
    called, and only a row's first call holds no drafts (it draws its first token from the bonus row and
    drafts the next ranks). Each call holds oracle rows, the bonus row and outcome rows that see a prefix
    (limit < rank)."""
    tokens, sigma, n_prompt, lengths = _batch(seed=6)
    engine = _RecordingEngine(model)
    out = assd_decode(model, tokens, sigma, n_prompt, lengths, k=3, fused=True, outcomes="all", seed=0,
                      engine=engine)
    assert torch.equal(out.draft_calls, torch.ones_like(out.draft_calls))
    assert all(limits is not None and not draft for _, _, draft, limits in engine.calls)
    first_n, first_ranks, _, first_limits = engine.calls[0]
    assert torch.equal(first_ranks[:, 0], first_n) and torch.equal(first_limits[:, 0], first_n)  # the bonus row
    prefix_rows = 0
    for n, ranks, _, limits in engine.calls:
        used = ranks >= 0
        assert (limits[used] >= n[:, None].expand_as(ranks)[used]).all() and (limits[used] <= ranks[used]).all()
        prefix_rows += int((used & (limits < ranks)).sum())
    assert prefix_rows > 0
    partial = assd_decode(model, tokens, sigma, n_prompt, lengths, k=3, fused=True, outcomes=1, seed=0)
    assert (partial.draft_calls >= 1).all() and partial.draft_calls.sum() > out.draft_calls.sum()


def test_bonus_tokens_raise_tokens_per_round():
    model = tiny_model(seed=1, init_std=0.02)  # near-uniform conditionals: drafts are accepted often
    tokens, sigma, n_prompt, lengths = _batch(seed=7)
    plain = assd_decode(model, tokens, sigma, n_prompt, lengths, k=2, seed=0)
    bonus = assd_decode(model, tokens, sigma, n_prompt, lengths, k=2, bonus=True, seed=0)
    assert plain.bonus_tokens.sum() == 0 and bonus.bonus_tokens.sum() > 0
    assert bonus.tokens_per_call.mean() > plain.tokens_per_call.mean()


def test_custom_drafter_with_only_propose(model):
    """The protocol promise: an object with just propose() works (no name, no flags); its model calls are
    counted from the engine, not declared."""
    class UniformDrafter:
        def propose(self, req):
            b, K = req.query_ranks.shape
            probs = torch.ones(b, K, req.vocab_size, dtype=torch.float64)
            probs[..., req.mask_token_id] = 0
            probs /= probs.sum(-1, keepdim=True)
            return torch.searchsorted(probs.cumsum(-1), req.uniforms[..., None]).squeeze(-1), probs

    tokens, sigma, n_prompt, lengths = _batch(seed=8)
    out = assd_decode(model, tokens, sigma, n_prompt, lengths, k=3, drafter=UniformDrafter(), seed=0)
    assert out.sampler == "assd-UniformDrafter" and torch.equal(out.nfe, out.rounds)
    assert torch.equal(out.model_free_draft_calls, out.draft_calls)  # calls without a model forward


def test_drafter_registry_and_bad_modes(model):
    from asarm.sampling import DRAFTERS, NGramDrafter, register_drafter

    register_drafter("ngram-copy", NGramDrafter)
    try:
        tokens, sigma, n_prompt, lengths = _batch(seed=9)
        assert assd_decode(model, tokens, sigma, n_prompt, lengths, drafter="ngram-copy", seed=0).exact
    finally:
        DRAFTERS.pop("ngram-copy")
    with pytest.raises(TypeError, match="propose"):
        register_drafter("nothing", object)
    with pytest.raises(ValueError, match="unknown drafter 'nope'"):
        assd_decode(model, tokens, sigma, n_prompt, lengths, drafter="nope")
    with pytest.raises(ValueError, match="drafter='self'"):
        assd_decode(model, tokens, sigma, n_prompt, lengths, drafter="ngram", fused=True)
    with pytest.raises(ValueError, match="only applies to fused"):
        assd_decode(model, tokens, sigma, n_prompt, lengths, outcomes=2)
    with pytest.raises(ValueError, match="outcomes must be"):
        assd_decode(model, tokens, sigma, n_prompt, lengths, fused=True, outcomes=0)
    with pytest.raises(ValueError, match="threshold must lie"):
        assd_decode(model, tokens, sigma, n_prompt, lengths, draft_length=1.5)
