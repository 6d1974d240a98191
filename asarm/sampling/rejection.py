"""The accept / residual / bonus step of speculative sampling, as one pure function.

Given, for each row, ``K`` drafts ``x_i ~ q_i`` and the target conditionals ``p_i`` (each ``p_i``
conditioned on the drafts before it), :func:`verify_drafts` accepts draft ``i`` while
``u_i < p_i(x_i) / q_i(x_i)``; at the first rejection it draws the replacement from
``normalize(max(0, p_i - q_i))``; when every draft is accepted and a bonus distribution is given it
draws one more token from it. The committed tokens then follow ``p`` exactly (Leviathan et al. 2023,
Chen et al. 2023), whatever the proposals ``q`` are, as long as each draft was drawn from its ``q``
independently of the uniforms used here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .random import sample_categorical

__all__ = ["Verdict", "verify_drafts", "RESIDUAL_EPS"]

# Below this residual mass p and q are equal up to rounding: a rejection there is numerical noise,
# and the residual is taken to be p itself.
RESIDUAL_EPS = 1e-9


@dataclass
class Verdict:
    """Outcome per row: the drafts ``[0, num_accepted)`` are kept, then ``next_token`` (when
    ``has_next``) is committed after them: the residual draw at slot ``num_accepted`` if ``rejected``,
    else the bonus draw."""

    num_accepted: torch.Tensor  # (b,) long
    rejected: torch.Tensor  # (b,) bool
    has_next: torch.Tensor  # (b,) bool: rejected, or all accepted and a bonus drawn
    next_token: torch.Tensor  # (b,) long; meaningless where not has_next

    @property
    def bonus(self) -> torch.Tensor:
        return self.has_next & ~self.rejected


def verify_drafts(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, num_drafts: torch.Tensor,
                  u_accept: torch.Tensor, u_next: torch.Tensor, bonus: torch.Tensor | None = None,
                  has_bonus: torch.Tensor | None = None, r_atol: float = 0.0) -> Verdict:
    """Speculative acceptance for a batch of rows.

    Args:
        p, q: ``(b, K, V)`` float64 target and proposal distributions (rows sum to 1; ``q_i(x_i) > 0``).
            A draft accepted by construction (an exact first draft) passes ``p_i = q_i``.
        drafts: ``(b, K)`` proposed tokens; slots ``>= num_drafts`` are ignored.
        num_drafts: ``(b,)`` drafts to check per row (``0 <= num_drafts <= K``; 0 needs ``bonus``: the row
            then only draws its bonus token).
        u_accept: ``(b, K)`` uniforms in [0, 1), one per slot; ``u_next``: ``(b,)``, for the residual or
            the bonus draw (only one of them happens per row).
        bonus: ``(b, V)`` distribution of the token after the last draft, used where every draft is
            accepted and ``has_bonus`` (``(b,)`` bool; default: every row) is true.
        r_atol: LOSSY when > 0 (added to the acceptance ratio).
    """
    b, K = drafts.shape
    slot = torch.arange(K, device=drafts.device)
    valid = slot[None, :] < num_drafts[:, None]
    index = drafts[..., None]
    p_x, q_x = p.gather(2, index).squeeze(-1), q.gather(2, index).squeeze(-1)
    accept = u_accept < (p_x / q_x + r_atol if r_atol else p_x / q_x)
    failed = valid & ~accept
    rejected = failed.any(1)
    if not K and bonus is None:
        raise ValueError("verify_drafts without drafts needs a bonus distribution to draw from")
    if K:
        num_accepted = torch.where(rejected, failed.to(torch.int8).argmax(1), num_drafts)
        rows = torch.arange(b, device=drafts.device)
        j = num_accepted.clamp(max=K - 1)
        p_j = p[rows, j]
        residual = (p_j - q[rows, j]).clamp(min=0)
        residual = torch.where(residual.sum(-1, keepdim=True) > RESIDUAL_EPS, residual, p_j)
    else:
        num_accepted = num_drafts
    if bonus is None:
        has_next, next_dist = rejected, residual
    else:
        has_next = rejected | (torch.ones_like(rejected) if has_bonus is None else has_bonus)
        next_dist = torch.where(rejected[:, None], residual, bonus) if K else bonus
    next_token = sample_categorical(next_dist, u_next)
    return Verdict(num_accepted=num_accepted, rejected=rejected, has_next=has_next, next_token=next_token)
