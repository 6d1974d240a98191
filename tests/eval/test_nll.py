import json
import math

import pytest
import torch

from asarm import orders
from asarm.cli import main
from asarm.eval.nll import heldout_nll, unigram_log_probs
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


def test_heldout_nll_rejects_bad_rates():
    model = tiny_model(vocab_size=12)
    chunks = torch.zeros(1, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="masking_rate"):
        heldout_nll(model, chunks, 1.0, torch.zeros(12))
    with pytest.raises(ValueError, match="no visible token"):
        heldout_nll(model, torch.zeros(1, 4, dtype=torch.long), 1 - 1e-12, torch.zeros(12))


def test_eval_nll_end_to_end(tmp_path, tiny_model_dir):
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
