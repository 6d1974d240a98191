import math

import pytest
import torch

from asarm import orders
from asarm.model import ASARM, ModelLoadError, pick_device

from helpers import tiny_model


def test_from_config_and_save_round_trip(tmp_path, xlnet_tokenizer):
    model = ASARM.from_config(tokenizer=xlnet_tokenizer, d_model=16, n_layer=1, n_head=2, d_inner=32, seed=0,
                              device="cpu")
    assert model.vocab_size == 32000 and model.mask_token_id == 6
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists()
    loaded = ASARM.from_pretrained(tmp_path / "m", device="cpu")
    assert loaded.mask_token_id == 6 and loaded.tokenizer is not None
    assert loaded.tokenizer("Hello world")["input_ids"] == xlnet_tokenizer("Hello world")["input_ids"]
    tokens = torch.tensor([[17, 11368, 185, 9, 4, 3]])
    sigma = orders.any_subset(torch.tensor([2]), 6, generator=torch.Generator().manual_seed(0))
    queries = torch.argsort(sigma)[:, 2:]
    assert torch.equal(model.logits(tokens, sigma, torch.tensor([2]), queries),
                       loaded.logits(tokens, sigma, torch.tensor([2]), queries))


@pytest.mark.parametrize("backbone", ["xlnet", "rope"])
def test_from_config_seed_is_reproducible_and_dtype(backbone):
    def build(seed):
        return ASARM.from_config(backbone=backbone, seed=seed, device="cpu", vocab_size=20, d_model=16, n_layer=1,
                                 n_head=2, d_inner=32)

    before = torch.random.get_rng_state()
    a, b, c = build(3), build(3), build(4)
    assert torch.equal(torch.random.get_rng_state(), before)  # a seeded build leaves the global stream alone
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.backbone.embed(torch.arange(20)), c.backbone.embed(torch.arange(20)))
    assert tiny_model(seed=3, dtype=torch.float64).dtype == torch.float64


def test_load_errors_are_clear(tmp_path, hub_offline):
    with pytest.raises(ModelLoadError, match="does not exist"):
        ASARM.from_pretrained(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        ASARM.from_pretrained(tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="therealgabeguo/ASARM"):
        ASARM.from_pretrained("therealgabeguo/ASARM", revision="nlp")


def test_unknown_revision_message(monkeypatch):
    """The Hub's answer for a missing branch becomes a message listing the known revisions."""
    from transformers import XLNetLMHeadModel

    def fake_from_pretrained(*args, **kwargs):
        raise OSError("nlq is not a valid git identifier (branch name, tag name or commit id) that exists for "
                      "this model name.")

    monkeypatch.setattr(XLNetLMHeadModel, "from_pretrained", fake_from_pretrained)
    monkeypatch.setattr("asarm.model.hub_offline", lambda: False)  # the Hub answered
    monkeypatch.setattr("asarm.model._model_type", lambda *args: None)  # its config.json: not asked here
    with pytest.raises(ModelLoadError, match="revision 'nlq' does not exist.*nlp_210k_plus_75k"):
        ASARM.from_pretrained("therealgabeguo/ASARM", revision="nlq")


def test_log_probs_exclude_mask_and_normalise():
    model = tiny_model(seed=0)
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    sigma = torch.tensor([[0, 1, 2, 3, 4]])
    logp = model.log_probs(tokens, sigma, torch.tensor([2]), torch.tensor([[2, 3, -1]]))
    assert logp.dtype == torch.float64
    assert torch.isneginf(logp[..., model.mask_token_id]).all()
    assert torch.allclose(logp[:, :2].exp().sum(-1), torch.ones(1, 2, dtype=torch.float64))


def test_probabilities_temper_per_slot_and_leave_the_logits_alone():
    model = tiny_model(seed=0)
    logits = torch.randn(2, 3, model.vocab_size, dtype=torch.float64)
    before = logits.clone()
    temperatures = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)[None, :, None]
    probs = model.probabilities(logits, temperatures)
    assert torch.equal(logits, before)  # float64 input: no in-place masking of the caller's tensor
    assert (probs[..., model.mask_token_id] == 0).all()
    torch.testing.assert_close(probs, model.normalize(logits, temperatures).exp(), rtol=0, atol=1e-15)
    for slot, t in enumerate([1.0, 0.5, 2.0]):
        torch.testing.assert_close(probs[:, slot], model.normalize(logits[:, slot] / t).exp(), rtol=0, atol=1e-15)
    assert not torch.allclose(probs[:, 0], probs[:, 1])


def test_score_is_the_chain_of_oracle_conditionals():
    """One teacher-forced pass equals the product of one-query passes, rank by rank, per row."""
    model = tiny_model(seed=1, init_std=0.5)
    gen = torch.Generator().manual_seed(2)
    n_prompt, lengths = torch.tensor([2, 3, 1]), torch.tensor([7, 5, 6])
    sigma = orders.any_permutation(n_prompt, 7, lengths=lengths, generator=gen)
    tokens = torch.randint(7, 10, (3, 7), generator=gen)
    score = model.score(tokens, sigma, n_prompt, lengths)
    positions = torch.argsort(sigma, dim=1)
    for b in range(3):
        total = 0.0
        for rank in range(int(n_prompt[b]), int(lengths[b])):
            pos = positions[b, rank]
            logp = model.log_probs(tokens[b:b + 1], sigma[b:b + 1], n_prompt[b:b + 1], pos.view(1, 1))
            total += float(logp[0, 0, tokens[b, pos]])
        assert score[b].item() == pytest.approx(total, abs=1e-5)


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device().type in ("cpu", "cuda")


def test_embedded_default_model_loads_by_name_offline(hub_offline):
    """asarm-tiny ships with the package: it loads without the Hub and is a trained model (it predicts
    a plain sentence far better than a uniform guess over its vocabulary)."""
    from asarm.model import DEFAULT_MODEL, EMBEDDED_MODELS

    assert DEFAULT_MODEL in EMBEDDED_MODELS
    model = ASARM.from_pretrained(DEFAULT_MODEL, device="cpu")
    assert model.mask_token_id == 6 == model.tokenizer.convert_tokens_to_ids("<mask>")
    assert model.vocab_size == len(model.tokenizer)
    ids = model.tokenizer("The game was released in Japan in 2011 , and the series sold well .",
                          add_special_tokens=False, return_tensors="pt").input_ids
    n = ids.shape[1]
    nll = -model.score(ids, torch.arange(n)[None], torch.tensor([n // 2]))[0] / (n - n // 2)
    assert nll < math.log(model.vocab_size) - 2


def test_a_deep_copy_converts_to_float64_on_its_own():
    """The float64 cast of XLNet's sinusoids belongs to each copy: a copy converted to float64 runs, and the
    original (still float32) is unaffected."""
    import copy

    model = tiny_model(seed=3)
    doubled = copy.deepcopy(model).to(torch.float64)
    tokens = torch.tensor([[1, 2, 3, 4, 5, 7]])
    sigma, n_prompt, query = torch.arange(6)[None], torch.tensor([2]), torch.tensor([[2, 3]])
    want = model.logits(tokens, sigma, n_prompt, query)
    got = doubled.logits(tokens, sigma, n_prompt, query)
    assert got.dtype == torch.float64 and want.dtype == torch.float32
    torch.testing.assert_close(got.float(), want, atol=1e-4, rtol=0)
    for engine in ("full", "cached"):
        from asarm.sampling.engine import ENGINES

        session = ENGINES[engine](doubled).start(tokens, sigma, n_prompt)
        out = session.logits(torch.tensor([0]), tokens, n_prompt, torch.tensor([[2, 3]]))
        torch.testing.assert_close(out, got, atol=1e-10, rtol=0)
