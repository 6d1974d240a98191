"""Exact likelihood scoring: ``log p(targets | visible)`` for any visible subset and decoding order.

One oracle forward pass per order scores every target at once (teacher forcing through the oracle
mask), so the value is exact for that order. AS-ARMs need not be order-consistent, so with the
any-permutation family the log-likelihood depends on the order; ``order_averaged_log_likelihood``
estimates its mean over random orders of the targets, with a confidence interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from scipy import stats

from .. import orders
from ..model import ASARM

__all__ = ["ORDER_FAMILIES", "order_for", "log_likelihood", "OrderAveragedLogLikelihood",
           "order_averaged_log_likelihood"]

ORDER_FAMILIES = ("left_to_right", "any_permutation")


def _check(tokens: torch.Tensor, visible: torch.Tensor, lengths) -> torch.Tensor:
    if tokens.dim() != 2 or visible.shape != tokens.shape or visible.dtype != torch.bool:
        raise ValueError(f"tokens (B, L) and a bool visible mask of the same shape are required, got "
                         f"{tuple(tokens.shape)} and {visible.dtype} {tuple(visible.shape)}")
    batch_size, seq_len = tokens.shape
    if lengths is None:
        lengths = torch.full((batch_size,), seq_len, dtype=torch.long)
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    pos = torch.arange(seq_len)
    real_visible = visible.cpu() & (pos[None, :] < lengths[:, None])
    if (real_visible.sum(1) < 1).any():
        raise ValueError("every row needs at least one visible token (XLNet's query stream needs one)")
    return lengths


def order_for(visible: torch.Tensor, family: str = "left_to_right", lengths=None,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigma, n_prompt)``: visible positions first, then the targets left to right
    (``"left_to_right"``, the 2^N family) or in a uniformly random order (``"any_permutation"``)."""
    if family not in ORDER_FAMILIES:
        raise ValueError(f"order family must be one of {ORDER_FAMILIES}, got {family!r}")
    sigma, n_prompt = orders.infilling(visible.cpu(), lengths)
    if family == "any_permutation":
        batch_size, seq_len = visible.shape
        lengths = torch.full((batch_size,), seq_len) if lengths is None else torch.as_tensor(lengths)
        # Give the targets the ranks n_prompt..length-1 in a random order (they sort before the rest).
        is_target = (sigma >= n_prompt[:, None]) & (sigma < lengths[:, None])
        keys = torch.where(is_target, torch.rand(batch_size, seq_len, generator=generator), math.inf)
        shuffled = n_prompt[:, None] + torch.argsort(torch.argsort(keys, dim=1), dim=1)
        sigma = torch.where(is_target, shuffled, sigma)
    return sigma, n_prompt


def log_likelihood(model: ASARM, tokens: torch.Tensor, visible: torch.Tensor, lengths=None,
                   family: str = "left_to_right", generator: torch.Generator | None = None) -> torch.Tensor:
    """Exact ``log p(x_targets | x_visible)`` per row ``(B,)`` (float64, nats) for one order per row."""
    lengths = _check(tokens, visible, lengths)
    sigma, n_prompt = order_for(visible, family, lengths, generator)
    device = tokens.device
    return model.score(tokens, sigma.to(device), n_prompt.to(device), lengths.to(device)).cpu()


@dataclass
class OrderAveragedLogLikelihood:
    mean: torch.Tensor  # (B,) mean over orders of log p(targets | visible)
    std: torch.Tensor  # (B,) across-order standard deviation
    ci95: torch.Tensor  # (B, 2) t-interval for the mean
    per_order: torch.Tensor  # (B, K)
    num_targets: torch.Tensor  # (B,)

    @property
    def nll_per_token(self) -> torch.Tensor:
        return -self.mean / self.num_targets.clamp(min=1)


def order_averaged_log_likelihood(model: ASARM, tokens: torch.Tensor, visible: torch.Tensor, lengths=None,
                                  num_orders: int = 8, generator: torch.Generator | None = None
                                  ) -> OrderAveragedLogLikelihood:
    """Mean, spread and 95% CI of the exact log-likelihood over ``num_orders`` random target orders."""
    if num_orders < 1:
        raise ValueError(f"num_orders must be >= 1, got {num_orders}")
    lengths = _check(tokens, visible, lengths)
    per_order = torch.stack([log_likelihood(model, tokens, visible, lengths, "any_permutation", generator)
                             for _ in range(num_orders)], dim=1)
    mean = per_order.mean(1)
    std = per_order.std(1) if num_orders > 1 else torch.zeros_like(mean)
    half = std / math.sqrt(num_orders) * (stats.t.ppf(0.975, num_orders - 1) if num_orders > 1 else 0.0)
    pos = torch.arange(tokens.shape[1])
    num_targets = ((~visible.cpu()) & (pos[None, :] < lengths[:, None])).sum(1)
    return OrderAveragedLogLikelihood(mean, std, torch.stack([mean - half, mean + half], 1), per_order, num_targets)
