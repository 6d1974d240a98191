"""The draft heads (chain and one-pass): wiring into both ASSD schedules, chaining, truncated vocabulary,
save/load."""

import json

import pytest
import torch

from asarm import orders
from asarm.draft_head import HEAD_CONFIG, HEAD_KINDS, DraftHead, OnePassDraftHead, outside_logit
from asarm.model import ASARM
from asarm.sampling import assd_decode
from asarm.sampling.drafters import HeadDrafter, chain_drafts

from helpers import random_head, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0, init_std=0.5, dtype=torch.float64)


def _batch(batch_size=6, seq_len=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_prompt = torch.randint(1, 4, (batch_size,), generator=gen)
    sigma = orders.any_subset(n_prompt, seq_len, batch_size=batch_size, generator=gen)
    tokens = torch.randint(7, 10, (batch_size, seq_len), generator=gen)
    return tokens, sigma, n_prompt


def _new_head(model, kind):
    return HEAD_KINDS[kind](model.config.d_model, model.vocab_size).to(model.dtype)


@pytest.mark.parametrize("kind", list(HEAD_KINDS))
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("engine", ["cached", "full"])
def test_untrained_head_drafts_exactly_like_the_model(model, fused, engine, kind):
    """A new head's output layers are zero: its drafts are the model's own draft rows, so the decode is the
    self drafter's token for token (same uniforms), in both schedules."""
    head = _new_head(model, kind)
    tokens, sigma, n_prompt = _batch()
    kwargs = dict(k=3, fused=fused, seed=torch.arange(6), engine=engine, draft_temperature_ratio=1.5,
                  **({"outcomes": "all"} if fused else {}))  # (the head orders partial coverage otherwise)
    with_head = assd_decode(model, tokens, sigma, n_prompt, drafter=HeadDrafter(head), **kwargs)
    own = assd_decode(model, tokens, sigma, n_prompt, drafter="self", **kwargs)
    assert torch.equal(with_head.tokens, own.tokens) and torch.equal(with_head.nfe, own.nfe)
    assert with_head.sampler == ("assd-fused-head" if fused else "assd-head")


def test_trained_looking_head_changes_the_drafts_but_not_the_committed_prefix_rules(model):
    """A head with random weights drafts differently (so it is used), and every decode stays complete."""
    tokens, sigma, n_prompt = _batch()
    head = HeadDrafter(random_head(model, seed=2))
    for fused in (False, True):
        out = assd_decode(model, tokens, sigma, n_prompt, k=3, fused=fused, drafter=head, seed=1, trace=True)
        own = assd_decode(model, tokens, sigma, n_prompt, k=3, fused=fused, seed=1)
        assert (out.tokens != model.mask_token_id).all()
        assert not torch.equal(out.accepted_by_index, own.accepted_by_index) or \
            not torch.equal(out.tokens, own.tokens)


@pytest.mark.parametrize("kind", list(HEAD_KINDS))
def test_chained_drafts_depend_on_the_token_before_them(model, kind):
    """Slot 0 follows the given token and slot 1 follows slot 0's draft: change the first and the
    proposals change; an untrained head's proposals do not depend on it."""
    states = torch.randn(2, 3, model.config.d_model, dtype=torch.float64)
    positions, prev_position = torch.tensor([[3, 4, 6], [3, 4, 6]]), torch.tensor([2, 2])
    uniforms = torch.rand(2, 3, dtype=torch.float64)

    def run(head, prev):
        return chain_drafts(head, model, states, prev, positions, prev_position, uniforms, model.probabilities, 1.0)

    trained = random_head(model, seed=3, std=1.0, kind=kind)
    _, probs_a = run(trained, torch.tensor([7, 7]))
    _, probs_b = run(trained, torch.tensor([8, 8]))
    assert not torch.allclose(probs_a[:, 0], probs_b[:, 0])
    fresh = _new_head(model, kind)
    _, fresh_a = run(fresh, torch.tensor([7, 7]))
    _, fresh_b = run(fresh, torch.tensor([8, 8]))
    assert torch.allclose(fresh_a, fresh_b)
    # each proposal is a distribution without <mask>, and each draft has mass under it
    drafts, probs = run(trained, torch.tensor([7, 8]))
    assert torch.allclose(probs.sum(-1), torch.ones(2, 3, dtype=torch.float64))
    assert (probs[..., model.mask_token_id] == 0).all()
    assert (probs.gather(2, drafts[..., None]) > 0).all()


def test_truncated_draft_vocabulary_proposes_only_its_tokens(model):
    vocab = torch.tensor([7, 8])
    head = HeadDrafter(random_head(model, seed=4, draft_vocab=vocab))
    tokens, sigma, n_prompt = _batch()
    out = assd_decode(model, tokens, sigma, n_prompt, k=3, fused=True, drafter=head, seed=2, trace=True)
    assert (out.tokens != model.mask_token_id).all()
    states = torch.randn(4, 2, model.config.d_model, dtype=torch.float64)
    drafts, probs = chain_drafts(head.head, model, states, torch.tensor([9] * 4), torch.tensor([[1, 2]] * 4),
                                 torch.tensor([0] * 4), torch.rand(4, 2, dtype=torch.float64), model.probabilities, 1.0)
    outside = torch.ones(model.vocab_size, dtype=torch.bool)
    outside[vocab] = False
    assert (probs[..., outside] == 0).all() and set(drafts.flatten().tolist()) <= {7, 8}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):  # the outside logit stays finite in any dtype
        assert torch.isfinite(torch.tensor(outside_logit(dtype), dtype=dtype))
    with pytest.raises(ValueError, match="distinct token ids"):
        DraftHead(model.config.d_model, model.vocab_size, draft_vocab=[7, 7])
    with pytest.raises(ValueError, match="distinct token ids"):
        DraftHead(model.config.d_model, model.vocab_size, draft_vocab=[3, model.vocab_size])


@pytest.mark.parametrize("kind", list(HEAD_KINDS))
def test_head_is_saved_beside_the_model_and_loaded_with_it(tmp_path, kind):
    model = tiny_model(seed=0)
    head = random_head(model, seed=5, draft_vocab=[1, 2, 7]) if kind == "chain" else random_head(model, 5, kind=kind)
    model.attach_draft_head(head)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / HEAD_CONFIG).is_file() and (tmp_path / "m" / "draft_head.safetensors").is_file()
    loaded = ASARM.from_pretrained(tmp_path / "m", device="cpu")
    assert type(loaded.draft_head) is type(head) and not loaded.draft_head.training
    assert loaded.draft_head.config() == head.config()
    for (name, a), (_, b) in zip(head.state_dict().items(), loaded.draft_head.state_dict().items()):
        assert torch.equal(a, b), name
    tokens, sigma, n_prompt = _batch()
    a = assd_decode(model, tokens, sigma, n_prompt, k=2, drafter="head", fused=True, seed=3)
    b = assd_decode(loaded, tokens, sigma, n_prompt, k=2, drafter="head", fused=True, seed=3)
    assert torch.equal(a.tokens, b.tokens)
    # a model saved without a head loads without one; a head of another model is refused in one line
    tiny_model(seed=1).save_pretrained(tmp_path / "plain")
    assert ASARM.from_pretrained(tmp_path / "plain", device="cpu").draft_head is None
    other = (tmp_path / "m" / HEAD_CONFIG).read_text().replace('"d_model": 32', '"d_model": 64')
    (tmp_path / "plain" / HEAD_CONFIG).write_text(other)
    with pytest.raises(ValueError, match="retrain it with asarm train-draft-head"):
        ASARM.from_pretrained(tmp_path / "plain", device="cpu")
    with pytest.raises(ValueError, match="the draft head is for vocabulary"):
        tiny_model(seed=0, vocab_size=12).attach_draft_head(head)


def test_head_kind_is_read_from_its_config(tmp_path):
    """A head saved before there were kinds (no "kind" in its config) loads as a chain; an unknown kind is refused
    in one line; the training config offers exactly the kinds there are."""
    from asarm.training.config import DRAFT_HEAD_KINDS

    assert DRAFT_HEAD_KINDS == tuple(HEAD_KINDS)
    model = tiny_model(seed=0)
    model.attach_draft_head(random_head(model, seed=6))
    model.save_pretrained(tmp_path / "m")
    path = tmp_path / "m" / HEAD_CONFIG
    config = json.loads(path.read_text())
    assert config.pop("kind") == "chain"
    path.write_text(json.dumps(config))
    assert type(ASARM.from_pretrained(tmp_path / "m", device="cpu").draft_head) is DraftHead
    path.write_text(json.dumps({**config, "kind": "tree"}))
    with pytest.raises(ValueError, match="unknown draft head kind 'tree'.*upgrade asarm or retrain the head"):
        ASARM.from_pretrained(tmp_path / "m", device="cpu")


def test_one_pass_head_folds_its_correction_into_the_readout_once(model):
    """Inference keeps W A (the LM head times the low-rank map) until a weight changes; with gradients on it is
    formed anew, so training sees the graph; both give the same logits."""
    head, lm = random_head(model, seed=7, kind="one-pass"), model.backbone
    states = torch.randn(3, 4, model.config.d_model, dtype=torch.float64)
    positions, prev_position = torch.tensor([[2, 3, 5, 6]] * 3), torch.tensor([1, 1, 1])

    def logits():
        return head(lm, states, torch.tensor([7, 8, 9]), positions, prev_position, lambda i, x: x.argmax(-1))

    with torch.no_grad():
        first = logits()
        folded = head.correction_readout(lm)
        assert head.correction_readout(lm) is folded  # kept
        again = logits()
    assert torch.equal(first, again)
    with torch.enable_grad():
        graded = logits()
        assert graded.requires_grad and torch.allclose(graded, first)
    with torch.no_grad():
        head.from_rank.weight.mul_(2.0)  # a changed weight refolds
        assert not torch.equal(head.correction_readout(lm), folded)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        OnePassDraftHead(model.config.d_model, model.vocab_size, rank=0)


def test_head_defaults_target_temperature_and_every_outcome(model):
    """A distilled head matches the target at T = 1: its drafts keep the target's temperature unless asked;
    its single-pass rounds cover every outcome unless asked."""
    tokens, sigma, n_prompt = _batch()
    head = HeadDrafter(random_head(model, seed=6))
    assert assd_decode(model, tokens, sigma, n_prompt, k=2, drafter=head, seed=0).settings[
        "draft_temperature_ratio"] == 1.0
    assert assd_decode(model, tokens, sigma, n_prompt, k=2, seed=0).settings["draft_temperature_ratio"] == 1.0
    assert assd_decode(model, tokens, sigma, n_prompt, k=2, drafter=head, seed=0, draft_temperature_ratio=2.0
                       ).settings["draft_temperature_ratio"] == 2.0
    assert assd_decode(model, tokens, sigma, n_prompt, k=2, drafter=head, fused=True, seed=0).settings[
        "outcomes"] == "all"
    assert assd_decode(model, tokens, sigma, n_prompt, k=2, fused=True, seed=0).settings["outcomes"] == 2


def test_head_drafter_without_a_head_fails_before_decoding(model):
    tokens, sigma, n_prompt = _batch()
    for fused in (False, True):
        with pytest.raises(ValueError, match="train one with `asarm train-draft-head`"):
            assd_decode(model, tokens, sigma, n_prompt, k=2, drafter="head", fused=fused)
    with pytest.raises(ValueError, match="use drafter='self' or 'head'"):
        assd_decode(model, tokens, sigma, n_prompt, k=2, drafter="ngram", fused=True)


def test_the_embedded_model_ships_its_draft_head():
    """asarm-tiny loads with its distilled head, and the head's single-pass decode fills every blank."""
    tiny = ASARM.from_pretrained("asarm-tiny", device="cpu")
    assert tiny.draft_head is not None and tiny.draft_head.config()["hidden"] == 256
    tokens = torch.randint(10, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    sigma = orders.any_subset(torch.tensor([3, 3]), 16, generator=torch.Generator().manual_seed(1))
    out = assd_decode(tiny, tokens, sigma, torch.tensor([3, 3]), k=3, drafter="head", fused=True, seed=0)
    assert out.sampler == "assd-fused-head" and (out.tokens != tiny.mask_token_id).all()
    assert int(out.nfe.max()) < 13  # at most one call per token, and the head's drafts pass


@pytest.mark.parametrize("outcomes", [1, 2])
@pytest.mark.parametrize("drafter, order", [("head", None), ("self", None), ("self", "accepted-first"),
                                            ("head", "earliest-rejection")])
def test_covered_outcomes_most_likely_first(model, drafter, order, outcomes):
    """Single-pass rounds prepare the next drafts for the covered outcomes only: with the head (drafts mostly
    all accepted) the all-accepted outcome first, then the earliest rejections; with the model's own drafts
    the earliest rejections; ``outcome_order`` picks either for any drafter. Read from the trace: a round
    verifies drafts exactly when the outcome of the row's previous round was covered."""
    tokens, sigma, n_prompt = _batch(batch_size=8, seq_len=12)
    chosen = HeadDrafter(random_head(model, seed=7)) if drafter == "head" else "self"
    out = assd_decode(model, tokens, sigma, n_prompt, k=3, fused=True, drafter=chosen, outcomes=outcomes,
                      outcome_order=order, seed=torch.arange(8), trace=True)
    accepted_first = (order or ("accepted-first" if drafter == "head" else "earliest-rejection")) == "accepted-first"
    assert out.settings["outcome_order"] == ("accepted-first" if accepted_first else "earliest-rejection")
    checked = 0
    for rounds in out.trace.rows:
        for before, after in zip(rounds, rounds[1:]):
            all_accepted = before.committed[-1][2] in ("bonus", "sequential")
            j = len(before.drafts) if all_accepted else before.accepted  # the outcome: first rejected slot, or K
            if accepted_first:
                covered = all_accepted or j + 1 < outcomes
            else:
                covered = j < outcomes
            assert (len(after.drafts) > 0) == covered
            checked += 1
    assert checked > 20


@pytest.mark.parametrize("kind", list(HEAD_KINDS))
def test_head_in_another_dtype_is_a_kept_copy_of_its_weights(kind):
    model = tiny_model(seed=0, init_std=0.5)  # float32
    head = random_head(model, seed=3, kind=kind).eval()
    assert head.in_dtype(None) is head and head.in_dtype(torch.float32) is head
    with torch.no_grad():
        half = head.in_dtype(torch.float16)
        assert half is not head and half.dtype == torch.float16 and head.in_dtype(torch.float16) is half  # kept
        for (name, mine), (_, theirs) in zip(head.state_dict().items(), half.state_dict().items()):
            assert torch.equal(mine.to(theirs.dtype), theirs), name
        weight, bias = half.readout(model.backbone)
        assert weight.dtype == bias.dtype == torch.float16 and half.readout(model.backbone)[0] is weight
        head.offset_embedding.weight.add_(1.0)  # a weight changes: the copy is formed again
        assert not torch.equal(head.in_dtype(torch.float16).offset_embedding.weight, half.offset_embedding.weight)
    assert head.in_dtype(torch.float16) is not head.in_dtype(torch.float16)  # where gradients flow: never kept


@pytest.mark.parametrize("kind", list(HEAD_KINDS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_proposals_are_close_to_the_heads_own(kind, dtype):
    """The same chain in a half-precision copy: proposals a small total variation away (the drafts follow the
    chosen tokens), each draft drawn from its own proposal."""
    model = tiny_model(seed=0, init_std=0.5)
    head = random_head(model, seed=5, kind=kind).eval()
    gen = torch.Generator().manual_seed(0)
    states, uniforms = torch.randn(4, 3, model.config.d_model, generator=gen), torch.rand(4, 3, generator=gen,
                                                                                           dtype=torch.float64)
    args = (states, torch.tensor([7, 8, 9, 7]), torch.tensor([[2, 3, 4]] * 4), torch.tensor([1] * 4), uniforms,
            model.probabilities, 1.0)
    own_drafts, own = chain_drafts(head, model, *args)
    drafts, probs = chain_drafts(head, model, *args, dtype=dtype)
    assert probs.dtype == torch.float64 and torch.allclose(probs.sum(-1), torch.ones(4, 3, dtype=torch.float64))
    assert (probs.gather(2, drafts[..., None]) > 0).all()
    same = (drafts == own_drafts).cumprod(1).bool()  # slots whose chain so far followed the same tokens
    tv = 0.5 * (probs - own).abs().sum(-1)
    assert same[:, 0].all() and tv[same].max() < (0.02 if dtype == torch.bfloat16 else 0.005)


def test_default_proposal_dtype_follows_the_device(monkeypatch):
    from asarm.sampling.drafters import proposal_dtype

    model = tiny_model(seed=0, init_std=0.5)
    for capability, expected in (("AVX512", "float16"), ("AVX2", "float16"), ("DEFAULT", "float32")):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert proposal_dtype(model) == expected
    assert proposal_dtype(tiny_model(seed=0, init_std=0.5, dtype=torch.float64)) == "float64"  # not a float32 model
