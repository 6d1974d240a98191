"""Decoding orders for any-subset autoregressive models.

An order is a tensor ``sigma`` of shape ``(B, L)`` with ``sigma[b, pos]`` = the rank of position
``pos`` in row ``b``'s decoding order. Ranks ``< n_prompt[b]`` are the prompt (visible conditioning);
ranks ``n_prompt[b] .. length[b] - 1`` are decoded in rank order. Rows shorter than ``L`` (padding)
give their padded positions the ranks ``length[b] .. L - 1``: in every mask of this package a
position only sees lower ranks, so padding is never seen by a real token.

All constructors are vectorised over the batch: they build one sort key per position and rank it.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "left_to_right",
    "any_subset",
    "any_permutation",
    "infilling",
    "num_prompt_for_rate",
    "positions_by_rank",
    "positions_of_ranks",
    "validate_order",
    "check_token_ids",
]


def _as_lengths(lengths, batch_size: int, seq_len: int, device) -> torch.Tensor:
    if lengths is None:
        return torch.full((batch_size,), seq_len, dtype=torch.long, device=device)
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=device)
    if lengths.shape != (batch_size,):
        raise ValueError(f"lengths must have shape ({batch_size},), got {tuple(lengths.shape)}")
    if (lengths < 1).any() or (lengths > seq_len).any():
        raise ValueError(f"lengths must lie in [1, {seq_len}], got {lengths.tolist()}")
    return lengths


def _as_n_prompt(n_prompt, batch_size: int, lengths: torch.Tensor) -> torch.Tensor:
    n_prompt = torch.as_tensor(n_prompt, dtype=torch.long, device=lengths.device)
    if n_prompt.dim() == 0:
        n_prompt = n_prompt.expand(batch_size).clone()
    if n_prompt.shape != (batch_size,):
        raise ValueError(f"n_prompt must be an int or have shape ({batch_size},), got {tuple(n_prompt.shape)}")
    if (n_prompt < 0).any() or (n_prompt > lengths).any():
        raise ValueError(f"n_prompt must lie in [0, length] per row, got {n_prompt.tolist()} for lengths "
                         f"{lengths.tolist()}")
    return n_prompt


def _rank_keys(keys: torch.Tensor) -> torch.Tensor:
    """Ranks of ``keys`` along the last dim (0 = smallest); keys are distinct by construction."""
    return torch.argsort(torch.argsort(keys, dim=-1, stable=True), dim=-1, stable=True)


def _keys(prompt: torch.Tensor, lengths: torch.Tensor, decode_keys: torch.Tensor) -> torch.Tensor:
    """Sort keys: prompt positions first (by position), then decoded positions by ``decode_keys``
    (values in [0, L)), then padding (by position)."""
    batch_size, seq_len = prompt.shape
    pos = torch.arange(seq_len, device=prompt.device).expand(batch_size, seq_len)
    padding = pos >= lengths[:, None]
    keys = torch.where(prompt, pos, seq_len + decode_keys)
    return torch.where(padding, 2 * seq_len + pos, keys)


def _random_prompt(n_prompt: torch.Tensor, lengths: torch.Tensor, seq_len: int, generator) -> torch.Tensor:
    """A uniformly random subset of ``n_prompt[b]`` real positions per row, as a bool mask."""
    batch_size = lengths.shape[0]
    scores = torch.rand(batch_size, seq_len, generator=generator, device=lengths.device)
    pos = torch.arange(seq_len, device=lengths.device)
    scores = torch.where(pos[None, :] >= lengths[:, None], 2.0, scores)  # padding never drawn
    return _rank_keys(scores) < n_prompt[:, None]


def left_to_right(batch_size: int, seq_len: int, n_prompt=0, lengths=None, device=None) -> torch.Tensor:
    """The causal order: rank = position. ``n_prompt`` only validates; the prompt is the first tokens."""
    lengths = _as_lengths(lengths, batch_size, seq_len, device)
    _as_n_prompt(n_prompt, batch_size, lengths)
    return torch.arange(seq_len, device=lengths.device).expand(batch_size, seq_len).clone()


def any_subset(n_prompt, seq_len: int, batch_size: int | None = None, lengths=None,
               generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """The 2^N family: a uniformly random prompt subset of ``n_prompt[b]`` positions, every other
    position decoded left to right by position."""
    if batch_size is None:
        batch_size = torch.as_tensor(n_prompt).numel()
    lengths = _as_lengths(lengths, batch_size, seq_len, device)
    n_prompt = _as_n_prompt(n_prompt, batch_size, lengths)
    prompt = _random_prompt(n_prompt, lengths, seq_len, generator)
    pos = torch.arange(seq_len, device=lengths.device).expand(batch_size, seq_len)
    return _rank_keys(_keys(prompt, lengths, pos))


def any_permutation(n_prompt, seq_len: int, batch_size: int | None = None, lengths=None,
                    generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """The N! family: a uniformly random permutation of each row's real positions."""
    if batch_size is None:
        batch_size = torch.as_tensor(n_prompt).numel()
    lengths = _as_lengths(lengths, batch_size, seq_len, device)
    n_prompt = _as_n_prompt(n_prompt, batch_size, lengths)
    prompt = _random_prompt(n_prompt, lengths, seq_len, generator)
    decode_keys = _rank_keys(torch.rand(batch_size, seq_len, generator=generator, device=lengths.device))
    return _rank_keys(_keys(prompt, lengths, decode_keys))


def infilling(visible: torch.Tensor, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The order implied by an infilling template: visible positions first, the blanks left to right.

    Args:
        visible: bool ``(B, L)``, True where the token is given.
    Returns:
        ``(sigma, n_prompt)``.
    """
    if visible.dim() != 2 or visible.dtype != torch.bool:
        raise ValueError(f"visible must be a bool tensor of shape (B, L), got {visible.dtype} {tuple(visible.shape)}")
    batch_size, seq_len = visible.shape
    lengths = _as_lengths(lengths, batch_size, seq_len, visible.device)
    pos = torch.arange(seq_len, device=visible.device)
    visible = visible & (pos[None, :] < lengths[:, None])
    n_prompt = visible.sum(dim=1)
    pos = pos.expand(batch_size, seq_len)
    return _rank_keys(_keys(visible, lengths, pos)), n_prompt


def num_prompt_for_rate(masking_rate: float, lengths) -> torch.Tensor:
    """Prompt size for a masking rate: ``floor(length * rate)`` tokens are generated, the rest shown
    (length 512 at rate 0.95 gives 26 visible and 486 generated, as in the paper)."""
    if not 0.0 <= masking_rate <= 1.0:
        raise ValueError(f"masking_rate must lie in [0, 1], got {masking_rate}")
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    # The small epsilon keeps e.g. 100 * 0.29 = 28.999999999999996 from flooring to 28.
    num_generated = torch.tensor([math.floor(int(n) * masking_rate + 1e-9) for n in lengths.reshape(-1)])
    return (lengths.reshape(-1) - num_generated).reshape(lengths.shape)


def positions_by_rank(sigma: torch.Tensor) -> torch.Tensor:
    """Inverse permutation: ``out[b, r]`` is the position holding rank ``r``."""
    return torch.argsort(sigma, dim=-1)


def positions_of_ranks(positions: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """``out[b, i]`` = the position holding rank ``ranks[b, i]`` (``positions`` from
    ``positions_by_rank``); a rank of -1 (an unused query slot) stays -1."""
    return torch.where(ranks >= 0, positions.gather(1, ranks.clamp(min=0)), -1)


def check_token_ids(tokens: torch.Tensor, vocab_size: int | None = None) -> None:
    """ValueError naming the offending ids when ``tokens`` holds a negative id or one ``>= vocab_size``
    (an embedding lookup would otherwise fail with an index error deep inside the model)."""
    bad = tokens < 0 if vocab_size is None else (tokens < 0) | (tokens >= vocab_size)
    if bool(bad.any()):
        ids = sorted(set(tokens[bad].tolist()))
        shown = ", ".join(map(str, ids[:5])) + (", ..." if len(ids) > 5 else "")
        limit = "" if vocab_size is None else f" 0..{vocab_size - 1}"
        raise ValueError(f"token ids {shown} are outside the vocabulary{limit}; encode the text with the model's "
                         f"own tokenizer")


def validate_order(tokens: torch.Tensor, sigma: torch.Tensor, n_prompt: torch.Tensor,
                   lengths: torch.Tensor | None = None, padding_mask: torch.Tensor | None = None,
                   mask_token_id: int | None = None, min_prompt: int = 1,
                   vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a batch handed to a sampler; return ``(n_prompt, lengths)`` as long tensors.

    Rows of different length are given either by ``lengths (B,)`` (padding on the right) or by
    ``padding_mask (B, L)`` (True at padding, on any side); padding must hold the highest ranks.

    Raises ValueError naming the problem: wrong shapes, a row of sigma that is not a permutation,
    padding that is not ranked last, a prompt smaller than ``min_prompt`` (XLNet's query stream
    needs at least one visible token), a ``<mask>`` token inside the prompt, or a token id outside
    the vocabulary (negative ids always; ids ``>= vocab_size`` when it is given).
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (B, L), got {tuple(tokens.shape)}")
    if sigma.shape != tokens.shape:
        raise ValueError(f"sigma must have the shape of tokens {tuple(tokens.shape)}, got {tuple(sigma.shape)}")
    if tokens.dtype not in (torch.long, torch.int) or sigma.dtype not in (torch.long, torch.int):
        raise ValueError(f"tokens and sigma must be integer tensors, got {tokens.dtype} and {sigma.dtype}")
    check_token_ids(tokens, vocab_size)
    batch_size, seq_len = tokens.shape
    arange = torch.arange(seq_len, device=tokens.device)
    if padding_mask is not None:
        if lengths is not None:
            raise ValueError("pass either lengths or padding_mask, not both")
        if padding_mask.shape != tokens.shape or padding_mask.dtype != torch.bool:
            raise ValueError(f"padding_mask must be a bool tensor of shape {tuple(tokens.shape)}, "
                             f"got {padding_mask.dtype} {tuple(padding_mask.shape)}")
        padded = padding_mask.to(tokens.device)
        lengths = (~padded).sum(dim=1)
    lengths = _as_lengths(lengths, batch_size, seq_len, tokens.device)
    if padding_mask is None:
        padded = arange[None, :] >= lengths[:, None]
    n_prompt = _as_n_prompt(n_prompt, batch_size, lengths)
    bad = (torch.sort(sigma, dim=1).values != arange).any(dim=1)
    if bad.any():
        raise ValueError(f"sigma rows {bad.nonzero().flatten().tolist()} are not permutations of 0..{seq_len - 1}")
    bad = (padded & (sigma < lengths[:, None])).any(dim=1)
    if bad.any():
        raise ValueError(f"rows {bad.nonzero().flatten().tolist()}: padding positions must hold the ranks "
                         f"length..L-1 (pad on any side, but rank padding last)")
    if (n_prompt < min_prompt).any():
        raise ValueError(f"n_prompt must be >= {min_prompt} on every row, got {n_prompt.tolist()}: with nothing "
                         f"visible XLNet's query stream attends uniformly to placeholders; prepend a token "
                         f"(e.g. <s>) as the prompt for unconditional generation")
    if mask_token_id is not None:
        in_prompt = (sigma < n_prompt[:, None]) & (tokens == mask_token_id)
        bad = in_prompt.any(dim=1)
        if bad.any():
            raise ValueError(f"rows {bad.nonzero().flatten().tolist()} have the <mask> token (id {mask_token_id}) "
                             f"inside the prompt; a prompt position must hold a real token")
    return n_prompt, lengths
