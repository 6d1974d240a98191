"""The cached engine returns the full forward's logits (for XLNet: Hugging Face's own), call for call, under
the call patterns of the samplers (draft and verify calls, lazy commits, rejections, rows dropping out), and
it computes only the new rows. Every test runs on both backbones (the ``backbone`` fixture)."""

from __future__ import annotations

import pytest
import torch

from asarm import orders
from asarm.model import ASARM
from asarm.sampling.cached_engine import CachedEngine
from asarm.sampling.engine import ENGINES, FullEngine, make_engine

TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
XLNET_ONLY = {"ff_activation", "clamp_len"}
BACKBONE = "xlnet"  # set for each test by the fixture below


@pytest.fixture(autouse=True, params=["xlnet", "rope"])
def backbone(request, monkeypatch):
    monkeypatch.setitem(globals(), "BACKBONE", request.param)
    return request.param


def make_model(dtype=torch.float32, seed=0, **overrides) -> ASARM:
    if BACKBONE != "xlnet" and XLNET_ONLY & set(overrides):
        pytest.skip(f"XLNet options: {sorted(XLNET_ONLY & set(overrides))}")
    cfg = dict(vocab_size=16, d_model=32, n_layer=2, n_head=4, d_inner=64)
    cfg.update(overrides)
    return ASARM.from_config(seed=seed, init_std=0.5, device="cpu", backbone=BACKBONE, **cfg).to(dtype)


class Pair:
    """Runs a full session and a cached session side by side and compares every call."""

    def __init__(self, model, tokens, sigma, n_prompt, **engine_kwargs):
        self.lm_head = model.backbone.lm_head
        self.full = FullEngine(model).start(tokens, sigma, n_prompt)
        self.cached = CachedEngine(model, **engine_kwargs).start(tokens, sigma, n_prompt)
        self.tol = TOL[model.dtype]
        self.calls = 0
        self.worst = 0.0

    def __call__(self, rows, tokens, n_fixed, query_ranks, draft=False, limits=None):
        # the final query states (what a draft head reads), then the logits (their LM head)
        want = self.full.states(rows, tokens.clone(), n_fixed.clone(), query_ranks.clone(), draft, limits)
        got = self.cached.states(rows, tokens.clone(), n_fixed.clone(), query_ranks.clone(), draft, limits)
        used = query_ranks >= 0  # -1: an unused slot, output unspecified
        for what, a, b in (("states", got, want), ("logits", self.lm_head(got), self.lm_head(want))):
            assert a.shape == b.shape and a.dtype == b.dtype
            assert torch.isfinite(a).all()
            diff = (a - b).abs()[used].max().item()
            self.worst = max(self.worst, diff)
            assert diff <= self.tol, f"call {self.calls} (draft={draft}): {what} max abs diff {diff:.3g} > {self.tol:g}"
        self.calls += 1
        return self.lm_head(got)


def float64_scenario(seed: int, n_prompt: torch.Tensor, seq_len: int, order=orders.any_permutation):
    """Random tokens and order for a float64 model of ``seed`` (data from ``seed + 1``):
    ``(tokens, positions by rank, Pair)``."""
    model = make_model(torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    sigma = order(n_prompt, seq_len, generator=g)
    tokens = torch.randint(0, 16, (len(n_prompt), seq_len), generator=g)
    return tokens, torch.argsort(sigma, dim=1), Pair(model, tokens, sigma, n_prompt)


def simulate_assd(model, *, batch, seq_len, lengths, n_prompt, order, seed, k_max=4, skip_prob=0.0,
                  garbage=True, draft_vocab=3, on_start=None, **engine_kwargs):
    """ASSD's call pattern with random tokens: per round a draft call on ranks n..n+k-1, drafts written
    in, a verify call (k >= 2), a random accepted prefix (the first draft always), a different token
    at the rejection rank. Undecoded ranks above the drafts hold fresh garbage at every call."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.vocab_size
    lengths = torch.as_tensor(lengths)
    n_prompt = torch.as_tensor(n_prompt)
    sigma = order(n_prompt, seq_len, lengths=lengths, generator=g)
    positions = torch.argsort(sigma, dim=1)
    tokens = torch.randint(0, vocab, (batch, seq_len), generator=g)
    tokens[sigma >= n_prompt[:, None]] = model.mask_token_id
    n_fixed = n_prompt.clone()
    pair = Pair(model, tokens, sigma, n_prompt, **engine_kwargs)
    if on_start is not None:
        on_start(pair)
    verify_drafts = 0

    def call_tokens(rows, upto):
        tok = tokens[rows].clone()
        if garbage:
            junk = sigma[rows] >= upto[:, None]
            tok[junk] = torch.randint(0, vocab, (int(junk.sum()),), generator=g)
        return tok

    while True:
        rows = (n_fixed < lengths).nonzero().flatten()
        if rows.numel() == 0:
            break
        if skip_prob:
            keep = torch.rand(rows.numel(), generator=g) >= skip_prob
            if keep.any():
                rows = rows[keep]
        nf = n_fixed[rows]
        k = int(torch.randint(1, k_max + 1, (1,), generator=g))
        k_row = torch.minimum(lengths[rows] - nf, torch.tensor(k))  # rows near their end use fewer slots
        ranks = nf[:, None] + torch.arange(k)
        ranks = torch.where(torch.arange(k) < k_row[:, None], ranks, -1)
        pair(rows, call_tokens(rows, nf + k), nf, ranks, True)
        qpos = positions[rows].gather(1, ranks.clamp(min=0))
        # drafts from a few tokens only: a new draft often repeats the old one at the same rank, as
        # with a peaked model, which is where stale draft states would be (wrongly) reused
        drafts = torch.randint(0, draft_vocab, (rows.numel(), k), generator=g)
        for i, row in enumerate(rows.tolist()):
            kr = int(k_row[i])
            tokens[row, qpos[i, :kr]] = drafts[i, :kr]
        verify = k_row >= 2  # a row with one open slot is done after the draft call
        if verify.any():
            vrows = rows[verify]
            pair(vrows, call_tokens(vrows, nf[verify] + k), nf[verify], ranks[verify], False)
            verify_drafts += int((k_row[verify] - 1).sum())
        for i, row in enumerate(rows.tolist()):
            kr = int(k_row[i])
            a = int(torch.randint(1, kr + 1, (1,), generator=g))
            if a < kr:
                shift = int(torch.randint(1, vocab, (1,), generator=g))
                tokens[row, qpos[i, a]] = (drafts[i, a] + shift) % vocab
                n_fixed[row] += a + 1
            else:
                n_fixed[row] += kr
    return pair, int(lengths.sum()), verify_drafts


CONFIGS = [
    pytest.param(torch.float32, {}, id="f32-4heads"),
    pytest.param(torch.float64, {}, id="f64-4heads"),
    pytest.param(torch.float64, {"n_head": 2}, id="f64-2heads"),
    pytest.param(torch.float64, {"n_layer": 3, "ff_activation": "relu", "clamp_len": 5}, id="f64-clamp-relu"),
]


@pytest.mark.parametrize("dtype,overrides", CONFIGS)
@pytest.mark.parametrize("order", [orders.any_subset, orders.any_permutation], ids=["subset", "perm"])
def test_assd_pattern_matches_full_forward(dtype, overrides, order):
    model = make_model(dtype, seed=1, **overrides)
    lengths = [24, 15, 20, 7]
    pair, total_len, verify_drafts = simulate_assd(
        model, batch=4, seq_len=24, lengths=lengths, n_prompt=[3, 1, 5, 2], order=order, seed=2, k_max=5,
        chunk_size=4)
    stats = pair.cached.stats
    assert pair.calls >= 8 and stats["calls"] == pair.calls
    # each rank's content stream is computed once when committed (or reused from its verify pass),
    # plus the drafts of the verify passes: never the L x calls rows of a full forward
    assert stats["content_rows"] <= total_len + verify_drafts
    assert stats["content_rows"] < 0.5 * pair.calls * len(lengths) * 24
    assert stats["reused_rows"] > 0


@pytest.mark.parametrize("drop_after", [1, 2])
def test_rows_dropping_out_and_coming_back(drop_after):
    model = make_model(torch.float64, seed=3)
    events = {"subset": 0, "dropped": 0, "returned": 0}

    def spy(pair):
        session = pair.cached
        slots = session._slots

        def watched(rows):
            events["returned"] += int((session.slot_of[rows] < 0).sum())
            before = session.slot_rows.numel()
            out = slots(rows)
            events["dropped"] += before + int((out >= before).sum()) - session.slot_rows.numel()
            events["subset"] += int(rows.numel() < session.slot_rows.numel())
            return out

        session._slots = watched

    pair, _, _ = simulate_assd(model, batch=5, seq_len=16, lengths=[16, 9, 13, 16, 5], n_prompt=[2, 3, 1, 4, 1],
                               order=orders.any_permutation, seed=4, skip_prob=0.35, drop_after=drop_after,
                               on_start=spy)
    assert pair.calls >= 6
    assert pair.cached.slot_rows.numel() <= 5
    # the gathered-subset, compaction and recompute-on-return paths all ran
    assert events["dropped"] > 0
    if drop_after == 1:  # absent rows are dropped at once: skipped rows come back and are recomputed
        assert events["returned"] > 0
    else:  # a row skipped once keeps its cache: the call runs on a gathered subset of slots
        assert events["subset"] > 0


def test_float32_default_engine_settings():
    model = make_model(torch.float32, seed=5, n_head=2, d_model=24, d_inner=40)
    pair, _, _ = simulate_assd(model, batch=3, seq_len=16, lengths=[16, 16, 11], n_prompt=[1, 4, 2],
                               order=orders.any_subset, seed=6, k_max=3)
    assert pair.worst <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_first_call_with_many_committed(dtype):
    """Prompt plus many committed tokens at once: lazily computed in several rank-causal chunks."""
    model = make_model(dtype, seed=7)
    g = torch.Generator().manual_seed(8)
    B, L = 3, 16
    lengths = torch.tensor([16, 13, 15])
    n_prompt = torch.tensor([2, 5, 1])
    sigma = orders.any_permutation(n_prompt, L, lengths=lengths, generator=g)
    tokens = torch.randint(0, 16, (B, L), generator=g)
    n_fixed = lengths - 3
    ranks = n_fixed[:, None] + torch.arange(3)
    pair = Pair(model, tokens, sigma, n_prompt, chunk_size=3)
    pair(torch.arange(B), tokens, n_fixed, ranks, True)
    last = pair.cached.last
    assert last["passes"] >= 4 and last["content_rows"] == int(n_fixed.sum())
    pair(torch.arange(B), tokens, n_fixed, ranks, False)
    assert pair.cached.last["content_rows"] == 2 * B  # the two drafts below the last query
    # a whole-prompt-only first call (n_fixed = n_prompt) in oracle mode with queries far above
    pair2 = Pair(model, tokens, sigma, n_prompt, chunk_size=2)
    rows = torch.tensor([0, 2])
    pair2(rows, tokens[rows], n_prompt[rows], torch.stack([n_prompt[rows] + 6, n_prompt[rows] + 9], 1), False)


def test_sequential_pattern_computes_one_row_per_call():
    B, L = 2, 10
    n_prompt = torch.tensor([3, 2])
    tokens, _, pair = float64_scenario(9, n_prompt, L, orders.any_subset)
    rows = torch.arange(B)
    for step in range(L - 3):
        n_fixed = n_prompt + step
        pair(rows, tokens, n_fixed, n_fixed[:, None], False)
        if step == 0:
            assert pair.cached.last["content_rows"] == int(n_prompt.sum())
        else:
            assert pair.cached.last["content_rows"] == B
    # a draft call with the same n_fixed needs nothing new
    ranks = n_fixed[:, None] + torch.arange(2)
    pair(rows, tokens, n_fixed, torch.where(ranks < L, ranks, -1), True)
    assert pair.cached.last["content_rows"] == 0


def test_prefill_encodes_the_prompts_up_front():
    B, L = 3, 10
    n_prompt = torch.tensor([3, 1, 5])
    tokens, _, pair = float64_scenario(12, n_prompt, L, orders.any_subset)
    pair.cached.prefill()
    assert pair.cached.last == {"calls": 0, "passes": 1, "content_rows": int(n_prompt.sum()), "query_rows": 0,
                                "reused_rows": 0}
    rows = torch.arange(B)
    for step in range(4):  # the decode then matches the full forward and computes one new row per call
        n_fixed = n_prompt + step
        pair(rows, tokens, n_fixed, n_fixed[:, None], False)
        assert pair.cached.last["content_rows"] == (0 if step == 0 else B)
    with pytest.raises(RuntimeError, match="before the first logits"):
        pair.cached.prefill()


def test_verify_states_are_reused_and_rejections_recomputed():
    B, L, k = 2, 12, 4
    n_prompt = torch.tensor([2, 3])
    tokens, positions, pair = float64_scenario(11, n_prompt, L)
    rows = torch.arange(B)
    n_fixed = n_prompt.clone()
    ranks = n_fixed[:, None] + torch.arange(k)
    pair(rows, tokens, n_fixed, ranks, True)
    pair(rows, tokens, n_fixed, ranks, False)
    assert pair.cached.last["content_rows"] == B * (k - 1)
    # row 0 accepts everything, row 1 accepts one draft and gets a different token at rank n + 1
    pos = positions[1, n_fixed[1] + 1]
    tokens[1, pos] = (tokens[1, pos] + 1) % 16
    n_fixed = n_fixed + torch.tensor([k, 2])
    ranks = n_fixed[:, None] + torch.arange(k)
    pair(rows, tokens, n_fixed, ranks, True)
    last = pair.cached.last
    # row 0: ranks n..n+2 reused from the verify pass, rank n+3 new; row 1: rank n reused, n+1 recomputed
    assert last["reused_rows"] == (k - 1) + 1
    assert last["content_rows"] == 1 + 1


def test_states_above_a_rejection_are_not_reused():
    """Drafts above a rejected one keep their tokens, but their states saw the rejected token."""
    L, k = 12, 5
    n_prompt = torch.tensor([2])
    tokens, positions, pair = float64_scenario(17, n_prompt, L)
    rows = torch.tensor([0])
    n_fixed = n_prompt.clone()
    ranks = n_fixed[:, None] + torch.arange(k)
    pair(rows, tokens, n_fixed, ranks, True)
    pair(rows, tokens, n_fixed, ranks, False)  # states for ranks 2..5 computed
    pos = positions[0, 3]
    tokens[0, pos] = (tokens[0, pos] + 1) % 16  # rejection at rank 3; ranks 4.. keep their drafts
    n_fixed = torch.tensor([4])
    ranks = n_fixed[:, None] + torch.arange(k)
    pair(rows, tokens, n_fixed, ranks, True)  # needs ranks < 4 only
    assert pair.cached.last["content_rows"] == 1
    pair(rows, tokens, n_fixed, ranks, False)  # same draft tokens at ranks 4..7: 4 and 5 must be recomputed
    assert pair.cached.last["content_rows"] == k - 1


def test_changed_committed_token_is_detected():
    """Outside the contract (a committed token changes), the engine still returns exact logits."""
    B, L = 2, 10
    n_prompt = torch.tensor([2, 2])
    tokens, positions, pair = float64_scenario(13, n_prompt, L)
    rows = torch.arange(B)
    n_fixed = torch.tensor([6, 7])
    pair(rows, tokens, n_fixed, n_fixed[:, None], False)
    tokens[0, positions[0, 4]] = (tokens[0, positions[0, 4]] + 3) % 16  # committed, not prompt
    tokens[1, positions[1, 0]] = (tokens[1, positions[1, 0]] + 3) % 16  # a prompt token
    pair(rows, tokens, n_fixed, n_fixed[:, None], False)
    assert pair.cached.last["content_rows"] == (6 - 4) + 7


def test_cached_engine_never_runs_the_full_forward():
    model = make_model(torch.float32, seed=15)
    g = torch.Generator().manual_seed(16)
    n_prompt = torch.tensor([3])
    sigma = orders.any_subset(n_prompt, 12, generator=g)
    tokens = torch.randint(0, 16, (1, 12), generator=g)
    rows, n_fixed, ranks = torch.tensor([0]), torch.tensor([5]), torch.tensor([[5, 6, 7]])
    want = FullEngine(model).start(tokens, sigma, n_prompt).logits(rows, tokens, n_fixed, ranks, False)

    def boom(*args, **kwargs):
        raise AssertionError("the full two-stream forward was called")

    model.backbone.query_states = boom
    try:
        got = CachedEngine(model).start(tokens, sigma, n_prompt).logits(rows, tokens, n_fixed, ranks, False)
    finally:
        del model.backbone.query_states
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_registration_and_argument_checks():
    model = make_model(torch.float32)
    assert ENGINES["cached"] is CachedEngine
    engine = make_engine("cached", model)
    assert isinstance(engine, CachedEngine) and engine.name == "cached"
    n_prompt = torch.tensor([2])
    sigma = orders.any_subset(n_prompt, 8)
    tokens = torch.zeros(1, 8, dtype=torch.long)
    session = engine.start(tokens, sigma, n_prompt)
    with pytest.raises(ValueError):
        session.logits(torch.tensor([0]), tokens, torch.tensor([3]), torch.tensor([[2]]), True)
    with pytest.raises(ValueError):
        session.logits(torch.tensor([0]), tokens, torch.tensor([1]), torch.tensor([[2]]), True)
    out = session.logits(torch.tensor([], dtype=torch.long), tokens[:0], torch.tensor([], dtype=torch.long),
                         torch.zeros(0, 2, dtype=torch.long), True)
    assert out.shape == (0, 2, 16)


@pytest.mark.parametrize("sampler,kwargs", [("assd", {"k": 4}), ("assd", {"k": 3, "drafter": "ngram"}),
                                            ("sequential", {})], ids=["assd-self", "assd-ngram", "sequential"])
def test_samplers_give_the_same_samples_with_either_engine(sampler, kwargs):
    from asarm.sampling import assd_decode, sequential_decode

    decode = assd_decode if sampler == "assd" else sequential_decode
    model = make_model(torch.float64, seed=19)
    n_prompt, lengths = torch.tensor([2, 5, 3, 1]), torch.tensor([20, 15, 18, 9])
    sigma = orders.any_subset(n_prompt, 20, lengths=lengths, generator=torch.Generator().manual_seed(20))
    tokens = torch.randint(0, 16, (4, 20), generator=torch.Generator().manual_seed(21))
    tokens[tokens == model.mask_token_id] = 7
    full = decode(model, tokens, sigma, n_prompt, lengths, seed=22, engine="full", **kwargs)
    cached = decode(model, tokens, sigma, n_prompt, lengths, seed=22, engine="cached", **kwargs)
    assert torch.equal(full.tokens, cached.tokens)
    assert torch.equal(full.nfe, cached.nfe)


def mixed_queries(n_fixed, stop, k_max, g):
    """Random per-query visibility, as a single-pass ASSD call uses it: oracle rows on the pending drafts,
    and rows on later ranks seeing a random prefix; the same rank queried with several limits."""
    ranks, limits = [], []
    for nf, st in zip(n_fixed.tolist(), stop.tolist()):
        row = set()
        for _ in range(int(torch.randint(1, 2 * k_max + 1, (1,), generator=g))):
            rank = int(torch.randint(nf, st, (1,), generator=g))
            limit = rank if torch.rand(1, generator=g) < 0.4 else int(torch.randint(nf, rank + 1, (1,), generator=g))
            row.add((rank, limit))
        ranks.append([r for r, _ in sorted(row)])
        limits.append([lim for _, lim in sorted(row)])
    width = max(map(len, ranks))
    pad = lambda rows: torch.tensor([r + [-1] * (width - len(r)) for r in rows])  # noqa: E731
    return pad(ranks), pad([lim + [0] * (width - len(lim)) for lim in limits]).clamp(min=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_mixed_visibility_calls_match_the_full_forward(seed):
    """Calls mixing oracle rows, draft rows and rows seeing any prefix (a rank queried under several
    limits, which the full engine splits into several forwards) give the full forward's logits, across
    commits and drafts that change between calls."""
    n_prompt = torch.tensor([1, 3, 2])
    tokens, positions, pair = float64_scenario(seed, n_prompt, seq_len=10)
    g = torch.Generator().manual_seed(seed + 7)
    n_fixed, stop = n_prompt.clone(), torch.full((3,), 10)
    limits_used = 0
    while (n_fixed < stop).any():
        rows = (n_fixed < stop).nonzero().flatten()
        ranks, limits = mixed_queries(n_fixed[rows], stop[rows], 3, g)
        limits = torch.where(ranks >= 0, limits, 0)
        call_tokens = tokens[rows].clone()
        undecided = torch.gather(torch.argsort(positions[rows], 1), 1, torch.arange(10).expand(len(rows), -1)) \
            >= n_fixed[rows, None]
        call_tokens[undecided] = torch.randint(0, 16, (int(undecided.sum()),), generator=g)  # fresh drafts
        pair(rows, call_tokens, n_fixed[rows], ranks, limits=limits)
        limits_used += int(((limits < ranks) & (ranks >= 0)).sum())
        tokens[rows] = call_tokens
        n_fixed[rows] = torch.minimum(n_fixed[rows] + torch.randint(1, 4, (len(rows),), generator=g), stop[rows])
    assert pair.calls >= 3 and limits_used > 0


def test_classic_patterns_are_special_cases_of_limits():
    """draft=True equals limits = n_fixed, draft=False equals limits = the query ranks, on both engines."""
    n_prompt = torch.tensor([2, 3])
    tokens, positions, pair = float64_scenario(5, n_prompt, seq_len=8)
    rows, n_fixed = torch.arange(2), n_prompt.clone()
    ranks = torch.tensor([[2, 3, 4], [3, 4, -1]])
    for session in (pair.full, pair.cached):
        used = ranks >= 0
        draft = session.logits(rows, tokens, n_fixed, ranks, draft=True)[used]
        by_limits = session.logits(rows, tokens, n_fixed, ranks, limits=n_fixed[:, None].expand(-1, 3))[used]
        torch.testing.assert_close(draft, by_limits, rtol=0, atol=1e-12)
        oracle = session.logits(rows, tokens, n_fixed, ranks)[used]
        by_limits = session.logits(rows, tokens, n_fixed, ranks, limits=ranks.clamp(min=2))[used]
        torch.testing.assert_close(oracle, by_limits, rtol=0, atol=1e-12)


@pytest.mark.parametrize("limits,message", [
    ([[1, 3, 4]], "n_prompt <= limit"), ([[2, 5, 4]], "n_prompt <= limit"), ([[2, 2, 2]], None)])
def test_bad_limits_are_rejected(limits, message):
    n_prompt = torch.tensor([2])
    tokens, _, pair = float64_scenario(6, n_prompt, seq_len=8)
    ranks = torch.tensor([[2, 3, 4]])
    for session in (pair.full, pair.cached):
        if message is None:
            session.logits(torch.arange(1), tokens, n_prompt, ranks, limits=torch.tensor(limits))
        else:
            with pytest.raises(ValueError, match=message):
                session.logits(torch.arange(1), tokens, n_prompt, ranks, limits=torch.tensor(limits))
    # the same (rank, limit) twice: the cached engine returns it twice; one Hugging Face forward cannot hold it
    twice, same_limits = torch.tensor([[3, 3]]), torch.tensor([[2, 2]])
    logits = pair.cached.logits(torch.arange(1), tokens, n_prompt, twice, limits=same_limits)
    torch.testing.assert_close(logits[:, 0], logits[:, 1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="share both rank and limit"):
        pair.full.logits(torch.arange(1), tokens, n_prompt, twice, limits=same_limits)
