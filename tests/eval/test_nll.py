import json
import math

import pytest
import torch

from asarm import orders
from asarm.eval.nll import _predictor_metrics, heldout_nll, token_byte_lengths, token_word_starts, unigram_log_probs
from helpers import tiny_model


def test_unigram_is_add_one_smoothed_without_mask():
    logp = unigram_log_probs(torch.tensor([[0, 0, 1], [1, 1, 3]]), vocab_size=5, mask_token_id=4)
    # counts + 1: [3, 4, 1, 2, (mask) 0] over 10
    assert torch.allclose(logp.exp(), torch.tensor([0.3, 0.4, 0.1, 0.2, 0.0], dtype=torch.float64))


def test_heldout_nll_matches_rank_by_rank_conditionals():
    model = tiny_model(seed=3, vocab_size=12, init_std=0.5)
    chunks = torch.randint(0, 6, (3, 10))  # ids < 6: never the mask token (6)
    unigram = unigram_log_probs(chunks, 12, model.mask_token_id)
    out = heldout_nll(model, chunks, 0.7, unigram, batch_size=2, generator=torch.Generator().manual_seed(0),
                      progress=False)
    assert out["targets"].tolist() == [7, 7, 7]
    sigma = orders.any_subset(
        torch.full((3,), 3), 10, generator=torch.Generator().manual_seed(0))
    for b in range(3):
        want_model, want_unigram = 0.0, 0.0
        positions = torch.argsort(sigma[b])
        for rank in range(3, 10):
            pos = positions[rank]
            logp = model.log_probs(chunks[b:b + 1], sigma[b:b + 1], torch.tensor([3]), pos.view(1, 1))[0, 0]
            want_model -= float(logp[chunks[b, pos]])
            want_unigram -= float(unigram[chunks[b, pos]])
        assert out["model"][b].item() == pytest.approx(want_model, rel=1e-6)
        assert out["unigram"][b].item() == pytest.approx(want_unigram, rel=1e-9)


def test_token_bytes_and_words_spell_the_text(xlnet_tokenizer):
    """A token stands for its piece's bytes (the word-initial ▁ a space), </s> for the line end."""
    text = "The quick brown fox , 1 @-@ 2 jumps ."
    ids = xlnet_tokenizer(text, add_special_tokens=False).input_ids + [2]  # </s> ends the document
    nbytes, starts = token_byte_lengths(xlnet_tokenizer), token_word_starts(xlnet_tokenizer)
    assert int(nbytes[ids].sum()) == len(" " + text) + 1  # SentencePiece's leading space, then the newline
    assert int(starts[ids].sum()) == len(text.split()) + 1  # the words, and the line end
    assert nbytes[xlnet_tokenizer.convert_tokens_to_ids("<mask>")] == 0
    assert nbytes[xlnet_tokenizer.unk_token_id] == 1


def test_per_byte_and_per_word_by_hand():
    # two chunks: 2.0 nats over 2 target tokens of 4 bytes, 4.0 nats over 2 tokens of 6 bytes; 1 word in 4 bytes
    m = _predictor_metrics(torch.tensor([2.0, 4.0]), torch.tensor([2, 2]), torch.tensor([4, 6]), 0.25)
    assert m["nll_per_token"] == pytest.approx(6.0 / 4)
    assert m["nll_per_byte"] == pytest.approx(6.0 / 10) and m["bits_per_byte"] == pytest.approx(0.6 / math.log(2))
    assert m["nll_per_word"] == pytest.approx(6.0 / (10 * 0.25))
    assert m["word_perplexity"] == pytest.approx(math.exp(2.4))
    # the ratio estimator's interval, around the pooled 0.6 (not the chunks' mean ratio, 0.583): residuals
    # 2 - 0.6 * 4 = -0.4 and 4 - 0.6 * 6 = 0.4 over the mean 5 bytes, so a standard error of 0.08; t(1 df) 12.706
    lo, hi = m["per_byte_ci95"]
    assert (lo + hi) / 2 == pytest.approx(0.6) and (hi - lo) / 2 == pytest.approx(12.7062 * 0.08, rel=1e-4)
    assert m["per_word_ci95"] == pytest.approx([lo * 4, hi * 4])
    # equal bytes per chunk: the same as the t interval of the chunks' own ratios
    even = _predictor_metrics(torch.tensor([2.0, 3.0, 7.0]), torch.tensor([2, 2, 2]), torch.tensor([5, 5, 5]))
    assert even["per_byte_ci95"] == pytest.approx([x / 2.5 for x in even["per_sequence_ci95"]])


def test_heldout_nll_counts_the_bytes_of_the_targets_only():
    model = tiny_model(seed=1, vocab_size=12, init_std=0.5)
    chunks = torch.randint(0, 6, (3, 10))
    token_bytes = torch.tensor([1, 2, 3, 4, 5, 7, 0, 0, 0, 0, 0, 0])
    unigram = unigram_log_probs(chunks, 12, model.mask_token_id)
    out = heldout_nll(model, chunks, 0.7, unigram, batch_size=2, generator=torch.Generator().manual_seed(0),
                      progress=False, token_bytes=token_bytes)
    sigma = orders.any_subset(torch.full((3,), 3), 10, generator=torch.Generator().manual_seed(0))
    want = [sum(int(token_bytes[chunks[b, p]]) for p in range(10) if sigma[b, p] >= 3) for b in range(3)]
    assert out["target_bytes"].tolist() == want
    m = _predictor_metrics(out["model"], out["targets"], out["target_bytes"])
    assert m["nll_per_byte"] == pytest.approx(float(out["model"].sum()) / sum(want))
    assert "nll_per_word" not in m


def test_heldout_nll_rejects_bad_rates():
    model = tiny_model(vocab_size=12)
    chunks = torch.zeros(1, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="masking_rate"):
        heldout_nll(model, chunks, 1.0, torch.zeros(12))
    with pytest.raises(ValueError, match="no visible token"):
        heldout_nll(model, torch.zeros(1, 4, dtype=torch.long), 1 - 1e-12, torch.zeros(12))


def test_eval_nll_end_to_end(tmp_path, tiny_model_dir):
    from asarm.cli import main

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog .\n" * 30)
    out = tmp_path / "out"
    assert main(["eval", "nll", "--model", str(tiny_model_dir), "--text-file", str(text), "--unigram-file", str(text),
                 "--length", "32", "--num-sequences", "4", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    metrics = results["metrics"]
    assert metrics["sequences"] == 4 and metrics["targets"] == 4 * (32 - 2)
    # a repeated sentence: even add-one smoothed over 32000 ids, its own unigram frequencies beat a random model
    assert metrics["unigram"]["nll_per_token"] < math.log(32000) - 2 < metrics["model"]["nll_per_token"]
    assert results["args"]["masking_rate"] == 0.95 and "machine" in results
    assert len((out / "samples.jsonl").read_text().splitlines()) == 4
    assert "| model |" in (out / "summary.md").read_text()
    # per byte and per word: the same nats over the targets' bytes, and over their share of the words
    model = metrics["model"]
    assert model["nll_per_byte"] * metrics["target_bytes"] == pytest.approx(model["nll_per_token"] * metrics["targets"])
    assert model["nll_per_word"] == pytest.approx(model["nll_per_byte"] * metrics["text_bytes"] / metrics["text_words"])
    line = "The quick brown fox jumps over the lazy dog ."  # 4 x 32 tokens: whole lines and part of one
    per_line = (len(" " + line) + 1) / (len(line.split()) + 1)
    assert metrics["text_bytes"] / metrics["text_words"] == pytest.approx(per_line, rel=0.1)
    assert 0 < metrics["target_bytes"] < metrics["text_bytes"] and metrics["unk_tokens"] == 0
