"""Shared test utilities: tiny models, brute-force joints, distribution tests."""

from __future__ import annotations


import numpy as np
import torch
from scipy import stats

from asarm.model import ASARM


def tiny_model(seed: int = 0, vocab_size: int = 10, init_std: float = 1.0, dtype=torch.float32, **overrides) -> ASARM:
    """A small random model (XLNet; ``backbone="rope"``: the rotary one); a large ``init_std`` gives peaked,
    strongly dependent conditionals."""
    cfg = dict(vocab_size=vocab_size, d_model=32, n_layer=2, n_head=4, d_inner=64)
    cfg.update(overrides)
    return ASARM.from_config(seed=seed, init_std=init_std, dtype=dtype, device="cpu", **cfg)


def exact_joint(model: ASARM, tokens: torch.Tensor, sigma: torch.Tensor, n_prompt: int,
                temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every completion of one row and its exact probability, as a product of oracle conditionals
    enumerated rank by rank. Returns ``(completions (N, L), probs (N,))`` in float64."""
    seq_len = tokens.shape[0]
    positions = torch.argsort(sigma)
    real = [v for v in range(model.vocab_size) if v != model.mask_token_id]
    partial = tokens.clone()
    partial[sigma >= n_prompt] = model.mask_token_id
    partial = partial[None]
    logp = torch.zeros(1, dtype=torch.float64)
    for rank in range(n_prompt, seq_len):
        pos = positions[rank]
        rows = partial.shape[0]
        cond = model.log_probs(partial, sigma.expand(rows, -1), torch.full((rows,), n_prompt),
                               torch.full((rows, 1), int(pos)), temperature=temperature)[:, 0, real]
        partial = partial.repeat_interleave(len(real), dim=0)
        partial[:, pos] = torch.tensor(real).repeat(rows)
        logp = (logp[:, None] + cond).reshape(-1)
    return partial, logp.exp()


def outcome_index(samples: torch.Tensor, completions: torch.Tensor) -> np.ndarray:
    """Index of each sampled row in ``completions`` (raises if a sample is not a completion)."""
    lookup = {tuple(row): i for i, row in enumerate(completions.tolist())}
    return np.array([lookup[tuple(row)] for row in samples.tolist()])


def chi_square_pvalue(samples: torch.Tensor, completions: torch.Tensor, probs: torch.Tensor,
                      min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit; outcomes with expected count < ``min_expected`` are pooled."""
    n = samples.shape[0]
    counts = np.bincount(outcome_index(samples, completions), minlength=len(probs)).astype(float)
    expected = probs.numpy() * n
    big = expected >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] < min_expected:  # pool too small to stand alone: merge it into the smallest cell
        obs[-2] += obs[-1]
        exp[-2] += exp[-1]
        obs, exp = obs[:-1], exp[:-1]
    return float(stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def total_variation(samples: torch.Tensor, completions: torch.Tensor, probs: torch.Tensor) -> float:
    counts = np.bincount(outcome_index(samples, completions), minlength=len(probs))
    return 0.5 * float(np.abs(counts / counts.sum() - probs.numpy()).sum())


def tv_threshold(probs: torch.Tensor, n: int, quantile: float = 0.999, trials: int = 300, seed: int = 0) -> float:
    """The ``quantile`` of the TV distance between ``n`` exact draws and ``probs`` (Monte Carlo)."""
    rng = np.random.default_rng(seed)
    p = probs.numpy() / probs.numpy().sum()
    tvs = [0.5 * np.abs(rng.multinomial(n, p) / n - p).sum() for _ in range(trials)]
    return float(np.quantile(tvs, quantile))




def random_head(model: ASARM, seed: int = 0, std: float = 0.5, draft_vocab=None, kind: str = "chain"):
    """A draft head (``kind``: chain or one-pass) with random weights everywhere (its output layers too, so its
    drafts differ from the model's own draft rows), in the model's dtype."""
    from asarm.draft_head import DraftHead, OnePassDraftHead

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "chain":
            head = DraftHead(model.config.d_model, model.vocab_size, max_offset=3, draft_vocab=draft_vocab)
            outputs = [head.mlp[-1]]
        else:
            head = OnePassDraftHead(model.config.d_model, model.vocab_size, max_offset=3, rank=4)
            outputs = [head.base[-1], head.from_rank]
        for param in (param for layer in outputs for param in layer.parameters()):
            torch.nn.init.normal_(param, std=std)
    return head.to(model.dtype)


def greedy_decode(model: ASARM, context: list[int], num_tokens: int) -> list[int]:
    """Explicit left-to-right greedy decoding, one forward pass per token, on the raw logits without
    <mask>: the reference the lm-evaluation answers are checked against."""
    out = []
    for _ in range(num_tokens):
        tokens = torch.tensor([context + out + [model.mask_token_id] * (num_tokens - len(out))])
        sigma = torch.arange(tokens.shape[1])[None]
        logits = model.logits(tokens, sigma, torch.tensor([len(context)]), torch.tensor([[len(context) + len(out)]]))
        logits[..., model.mask_token_id] = float("-inf")
        out.append(int(logits[0, 0].argmax()))
    return out


def use_hub_cache(monkeypatch, path) -> None:
    """Point the Hugging Face cache at ``path`` for one test: huggingface_hub's constant, and transformers 4.x's own
    copy of it (read once at import; transformers 5 reads huggingface_hub's at each call)."""
    import huggingface_hub.constants
    import transformers.utils.hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(path))
    if hasattr(transformers.utils.hub, "TRANSFORMERS_CACHE"):
        monkeypatch.setattr(transformers.utils.hub, "TRANSFORMERS_CACHE", str(path))
