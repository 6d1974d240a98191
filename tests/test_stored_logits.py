"""Regression: asarm-tiny's logits on a fixed input, stored once, against every engine and the full forward.

A change in the backbone code, an engine, a transformers release or the shipped weights that moves any
logit shows here. After an intended change (a retrained asarm-tiny), regenerate the file with
``ASARM_REGENERATE_LOGITS=1 python -m pytest tests/test_stored_logits.py`` and say why in the commit.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from asarm import orders
from asarm.model import ASARM
from asarm.sampling.engine import ENGINES

STORED = Path(__file__).parent / "data" / "asarm_tiny_logits.pt"
SEQ_LEN, N_PROMPT, N_QUERIES, VOCAB_SLICE = 48, 12, 6, 400
TEXT = ("The tower is 324 metres tall , about the same height as an 81 @-@ storey building , and the tallest "
        "structure in Paris . Its base is square , measuring 125 metres on each side .")


@pytest.fixture(scope="module")
def tiny():
    return ASARM.from_pretrained("asarm-tiny", device="cpu", dtype=torch.float32)


def fixed_input(model: ASARM):
    tokens = torch.tensor(model.tokenizer(TEXT)["input_ids"][:SEQ_LEN])[None].repeat(2, 1)
    sigma = orders.any_subset(N_PROMPT, SEQ_LEN, batch_size=2, generator=torch.Generator().manual_seed(0))
    return tokens, sigma


def engine_logits(model: ASARM, engine: str, tokens, sigma) -> torch.Tensor:
    """Oracle queries on the ranks after the prompt (row 0) and draft queries from the prompt (row 1)."""
    ranks = N_PROMPT + torch.arange(N_QUERIES)
    session = ENGINES[engine](model).start(tokens, sigma, torch.full((2,), N_PROMPT))
    rows, n_fixed = torch.tensor([0]), torch.tensor([N_PROMPT])
    oracle = session.logits(rows, tokens[:1], n_fixed, ranks[None], draft=False)
    draft = session.logits(rows + 1, tokens[1:], n_fixed, ranks[None], draft=True)
    return torch.cat([oracle, draft])[..., :VOCAB_SLICE].clone()  # a copy: torch.save keeps a view's storage


def test_asarm_tiny_logits_match_the_stored_ones(tiny):
    tokens, sigma = fixed_input(tiny)
    got = {engine: engine_logits(tiny, engine, tokens, sigma) for engine in sorted(ENGINES)}
    if os.environ.get("ASARM_REGENERATE_LOGITS") == "1":
        torch.save({"tokens": tokens, "sigma": sigma, "logits": got["full"]}, STORED)
        pytest.skip(f"regenerated {STORED}")
    stored = torch.load(STORED)
    assert torch.equal(stored["tokens"], tokens) and torch.equal(stored["sigma"], sigma), \
        "the fixed input changed (tokenizer or order generator): regenerate the stored logits"
    for engine, logits in got.items():
        torch.testing.assert_close(logits, stored["logits"], atol=2e-4, rtol=0, msg=lambda m: f"{engine}: {m}")
    # the stored logits carry information: oracle and draft queries differ, and they are not all alike
    assert (stored["logits"][0] - stored["logits"][1]).abs().max() > 0.1
    assert stored["logits"].std() > 0.5
