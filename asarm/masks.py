"""Attention masks and target mappings for XLNet's two-stream attention, batched.

Conventions (those of ``transformers.XLNetLMHeadModel``):
``perm_mask[b, i, j] = 1`` means position ``i`` may NOT see position ``j``;
``target_mapping[b, t, j] = 1`` makes query row ``t`` predict position ``j``.

One rule gives both inference masks. With ``v`` = the number of visible ranks,
position ``i`` sees ``j`` iff ``rank(j) < min(rank(i), v)``, or both are prompt positions
(the prompt is bidirectional among itself).

* Oracle (joint) mask: ``v = L``. A query on rank ``r`` gives ``p(x_r | x_{<r})``; with drafts written
  in at ranks ``n..n+k-1``, one pass gives the chained conditionals of all of them.
* Draft (parallel) mask at step ``n``: ``v = n``. Ranks ``< n`` keep the oracle pattern, every other
  position sees exactly ranks ``< n``, so queries on ranks ``n..n+k-1`` give the independent marginals
  ``p(x_{n+i} | x_{<n})``.

In both masks no output depends on a position of rank ``>= v`` or above the query, so undecoded
inputs are pure placeholders. XLNet itself opens the diagonal of the content stream.
"""

from __future__ import annotations

import torch

__all__ = ["perm_mask", "oracle_perm_mask", "draft_perm_mask", "target_mapping", "query_limits",
           "check_distinct_queries"]


def perm_mask(sigma: torch.Tensor, n_prompt: torch.Tensor, n_visible: torch.Tensor | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B, L, L)`` perm_mask; ``n_visible=None`` gives the oracle mask, a ``(B,)`` tensor the draft mask."""
    if sigma.dim() != 2:
        raise ValueError(f"sigma must have shape (B, L), got {tuple(sigma.shape)}")
    n_prompt = torch.as_tensor(n_prompt, device=sigma.device).reshape(-1, 1, 1)
    rank_i = sigma[:, :, None]
    rank_j = sigma[:, None, :]
    if n_visible is not None:
        n_visible = torch.as_tensor(n_visible, device=sigma.device).reshape(-1, 1, 1)
        rank_i = torch.minimum(rank_i, n_visible)
    sees = (rank_j < rank_i) | ((sigma[:, :, None] < n_prompt) & (rank_j < n_prompt))
    return (~sees).to(dtype)


def oracle_perm_mask(sigma: torch.Tensor, n_prompt: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return perm_mask(sigma, n_prompt, None, dtype)


def draft_perm_mask(sigma: torch.Tensor, n_prompt: torch.Tensor, n_fixed: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return perm_mask(sigma, n_prompt, n_fixed, dtype)


def target_mapping(query_positions: torch.Tensor, seq_len: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(B, k, L)`` one-hot rows selecting ``query_positions (B, k)``; a position of -1 gives an
    all-zero row (an unused slot). Positions must be distinct within a row: XLNet sums the query
    heads of rows that share a position, which would corrupt both."""
    if query_positions.dim() != 2:
        raise ValueError(f"query_positions must have shape (B, k), got {tuple(query_positions.shape)}")
    used = query_positions >= 0
    one_hot = torch.nn.functional.one_hot(query_positions.clamp(min=0), seq_len)
    return (one_hot * used[..., None]).to(dtype)


def query_limits(n_prompt: torch.Tensor, n_fixed: torch.Tensor, query_ranks: torch.Tensor, draft: bool = False,
                 limits: torch.Tensor | None = None) -> torch.Tensor:
    """Per-query visibility ``(b, k)``: query ``t`` sees the ranks ``< limits[:, t]`` (and the whole prompt).

    ``limits=None`` gives the two classic patterns: the oracle (``draft=False``, a query on rank r sees
    ranks ``< r``) or the draft mask (``draft=True``, every query sees ranks ``< n_fixed``). Explicit
    limits must satisfy ``n_prompt <= limit <= rank`` on used slots (rank -1: unused, limit ignored).
    Raises ValueError otherwise. (Two queries of a row with the same rank and limit get the same logits.)
    """
    used = query_ranks >= 0
    if limits is None:
        limits = n_fixed[:, None].expand_as(query_ranks) if draft else query_ranks
        return torch.where(used, limits, n_fixed[:, None])
    if draft:
        raise ValueError("pass either draft=True or explicit limits, not both")
    limits = torch.as_tensor(limits, device=query_ranks.device, dtype=torch.long)
    if limits.shape != query_ranks.shape:
        raise ValueError(f"limits must have the shape of query_ranks {tuple(query_ranks.shape)}, "
                         f"got {tuple(limits.shape)}")
    if (used & ((limits < n_prompt[:, None]) | (limits > query_ranks))).any():
        raise ValueError("every used query needs n_prompt <= limit <= its rank (a query never sees itself)")
    return torch.where(used, limits, n_fixed[:, None])


def check_distinct_queries(query_ranks: torch.Tensor, limits: torch.Tensor) -> None:
    """ValueError when two used queries of a row share both rank and limit. One Hugging Face forward holds
    at most one query per (position, visibility): XLNet sums the query heads of targets that share a
    position, which would corrupt both (the cached engine has no such limit)."""
    used = query_ranks >= 0
    key = torch.where(used, query_ranks * (int(limits.max()) + 1) + limits, -1)
    sorted_key = key.sort(dim=1).values
    if ((sorted_key[:, 1:] == sorted_key[:, :-1]) & (sorted_key[:, 1:] >= 0)).any():
        raise ValueError("two queries of a row share both rank and limit: the full engine cannot hold both in one "
                         "forward; query each (rank, limit) once")
