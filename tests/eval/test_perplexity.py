import math

import pytest
import torch

from asarm.eval.perplexity import (clean_text, decode_clean, entropy_tokenizer, load_causal_lm,
                                   try_load_causal_lm)

WORDS = [" the", " cat", " sat", " on", " a", " mat", " and", " dog"]  # one GPT-2 token each


def save_tiny_gpt2(path, n_positions: int = 64, seed: int = 0):
    """A random one-layer GPT-2 with the real GPT-2 tokenizer (from the data directory) in ``path``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(n_positions=n_positions, n_embd=16, n_layer=1, n_head=2)).save_pretrained(path)
    tokenizer, source = entropy_tokenizer(None)
    assert "data" in source  # the data-directory copy, no network
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("gpt2"), n_positions=16)


@pytest.fixture(scope="module")
def lm(gpt2_dir):
    return load_causal_lm(str(gpt2_dir), batch_size=2)


def _nll_terms(lm, ids):
    """-log p(ids[t] | ids[:t]) for t >= 1, from one unpadded forward pass."""
    logits = lm.model(torch.tensor([ids])).logits[0]
    return torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="none").double()


def test_perplexity_matches_hand_computation_with_padding(lm):
    texts = [" the cat sat on the mat", " a dog", "Hello world, this is a test."]
    got = lm.perplexities(texts)
    for text, ppl in zip(texts, got):
        ids = lm.tokenizer(text)["input_ids"]
        assert 2 <= len(ids) <= lm.max_length
        assert ppl == pytest.approx(math.exp(_nll_terms(lm, ids).mean().item()), rel=1e-5)
    assert lm.perplexities(["Hello"]) == [None]  # one token: nothing to score


def test_long_texts_use_windows(gpt2_dir, lm):
    text = "".join(WORDS[i % len(WORDS)] for i in range(40))
    ids = lm.tokenizer(text)["input_ids"]
    assert len(ids) == 40 and lm.max_length == 16
    # Non-overlapping windows of 16: each window's first token is context only.
    disjoint = load_causal_lm(str(gpt2_dir), stride=16)
    terms = torch.cat([_nll_terms(lm, ids[s:s + 16]) for s in range(0, 40, 16)])
    assert len(terms) == 15 + 15 + 7
    assert disjoint.perplexities([text])[0] == pytest.approx(math.exp(terms.mean().item()), rel=1e-5)
    # Default stride 8: windows start at 0, 8, 16, 24; each scores the tokens the last one did not.
    assert lm.stride == 8
    pieces = [_nll_terms(lm, ids[0:16])]
    for start, first in ((8, 16), (16, 24), (24, 32)):
        pieces.append(_nll_terms(lm, ids[start:start + 16])[first - start - 1:])
    terms = torch.cat(pieces)
    assert len(terms) == 39
    assert lm.perplexities([text])[0] == pytest.approx(math.exp(terms.mean().item()), rel=1e-5)


def test_clean_text_strips_special_token_strings(xlnet_tokenizer):
    assert clean_text("a <mask>  b\n<cls>c <unk><unk>", ["<mask>", "<cls>", "<unk>"]) == "a b c"
    ids = (xlnet_tokenizer("The cat", add_special_tokens=False)["input_ids"] + [6, 0, 3, 4, 5, 7, 8, 1, 2]
           + xlnet_tokenizer("sat <unk> down <mask>", add_special_tokens=False)["input_ids"])
    text = decode_clean(xlnet_tokenizer, ids)
    for token in xlnet_tokenizer.all_special_tokens:
        assert token not in text
    assert text.split() == ["The", "cat", "sat", "down"]


def test_unloadable_models_give_a_reason(tmp_path, hub_offline):
    assert try_load_causal_lm("none") == (None, "disabled (--ppl-model none)")
    lm, reason = try_load_causal_lm(str(tmp_path / "missing"))
    assert lm is None and "could not load perplexity model" in reason
    lm, reason = try_load_causal_lm("asarm-tests/no-such-lm")
    assert lm is None and "no-such-lm" in reason


def test_entropy_tokenizer_prefers_the_perplexity_model(lm):
    tokenizer, source = entropy_tokenizer(lm)
    assert tokenizer is lm.tokenizer and "perplexity model" in source
    tokenizer, source = entropy_tokenizer(None)
    assert tokenizer("Hello world")["input_ids"] == [15496, 995] and "gpt2" in source
