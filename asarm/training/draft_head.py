"""Self-distillation of a chained draft head (asarm.draft_head) from a frozen AS-ARM.

One training row: a text chunk, an order (``masking.order``, prompt size from the masking-rate
schedule) and a draft point ``n`` drawn uniformly in ``[n_prompt, L - 2]``. The head drafts the ranks
``n + 1 .. n + slots`` from the model's draft rows there (every one sees ranks ``< n``: the single-pass
outcome rows and the self drafter's later slots see exactly this), the true token at rank ``n`` and its
own earlier drafts, unrolled on its own samples (drawn at temperature 1, no gradient through them).
The target of slot i is the model's oracle conditional at rank ``n + 1 + i`` with those drafts written
in, which is what the verify pass compares the draft with. Loss: the cross-entropy of the head's
proposal under the target, ``-sum_v p_i(v) log q_i(v)`` (forward KL up to a constant), averaged over
slots; with a truncated draft vocabulary only its tokens count (q is 0 elsewhere by design).
Reported: the expected acceptance of each slot's draft, ``sum_v min(p_i(v), q_i(v))`` (= 1 - TV).

``asarm train-draft-head --config configs/tiny_draft_head.yaml`` runs this through the trainer
(asarm.training.trainer: same run directory, checkpoints, exact resume and logs).
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel

from .. import orders
from ..draft_head import DraftHead
from ..model import ASARM

__all__ = ["draft_points", "distillation_loss", "frequent_tokens"]


def draft_points(n_prompt: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """A draft point per row, uniform in ``[n_prompt, length - 2]`` (so at least one rank is drafted)."""
    low = n_prompt.clamp(max=length - 2)
    return low + (torch.rand(len(n_prompt), generator=generator) * (length - 1 - low)).long()


def distillation_loss(asarm: ASARM, head: DraftHead, tokens: torch.Tensor, sigma: torch.Tensor,
                      n_prompt: torch.Tensor, n: torch.Tensor, slots: int, generator: torch.Generator):
    """The loss of one micro-batch (module doc) and its statistics: ``acceptance`` (per slot, over the rows
    where that slot exists), ``drafted`` (those rows per slot), ``loss`` and ``slots`` (scored slots in all).
    ``head``: the draft head, or its ``DistributedDataParallel`` wrapper (the trainer's, with several processes)."""
    batch, length = tokens.shape
    device = tokens.device
    idx = torch.arange(slots, device=device)
    ranks = n[:, None] + 1 + idx
    valid = ranks < length
    by_rank = orders.positions_by_rank(sigma)
    positions = orders.positions_of_ranks(by_rank, ranks.masked_fill(~valid, -1))
    prev_position = by_rank.gather(1, n[:, None])[:, 0]
    states = asarm.query_states(tokens, sigma, n_prompt, positions, n_visible=n)
    mask_column = torch.arange(asarm.vocab_size, device=device) == asarm.mask_token_id  # never drawn
    drafts = []

    def pick(i, logits):
        with torch.no_grad():
            probs = torch.softmax(logits.detach().float().masked_fill(mask_column, float("-inf")), -1)
            drafts.append(torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(device))
        return drafts[-1]

    first_prev = tokens.gather(1, prev_position[:, None])[:, 0]
    logits = head(asarm.backbone, states, first_prev, positions, prev_position, pick)
    drafted = tokens.clone()
    rows, cols = valid.nonzero(as_tuple=True)
    drafted[rows, positions[rows, cols]] = torch.stack(drafts, 1)[rows, cols]
    target = asarm.probabilities(asarm.logits(drafted, sigma, n_prompt, positions)).float()
    log_q = torch.log_softmax(logits.float().masked_fill(mask_column, float("-inf")), -1)
    draft_vocab = (head.module if isinstance(head, DistributedDataParallel) else head).draft_vocab
    scored = ~mask_column  # the tokens the head may propose: its draft vocabulary (empty: all), never <mask>
    if len(draft_vocab):
        scored = scored & torch.zeros_like(scored).index_fill_(0, draft_vocab, True)
    cross = -torch.where(scored, target * log_q, 0.0).sum(-1)  # (b, slots)
    count = valid.sum().clamp(min=1)
    loss = (cross * valid).sum() / count
    with torch.no_grad():
        accept = torch.minimum(target, log_q.exp()).sum(-1)
        per_slot = (accept * valid).sum(0) / valid.sum(0).clamp(min=1)
    return loss, {"loss": loss.detach(), "acceptance": per_slot, "drafted": valid.sum(0), "slots": count}


def frequent_tokens(batches, count: int, vocab_size: int, exclude: int) -> torch.Tensor:
    """The ``count`` most frequent token ids of ``batches`` (an iterable of ``(b, L)`` tensors), without
    ``exclude`` (``<mask>``); ties by id. The truncated draft vocabulary."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for tokens in batches:
        counts += torch.bincount(tokens.flatten().cpu(), minlength=vocab_size)
    counts[exclude] = -1
    order = torch.argsort(-counts * vocab_size + torch.arange(vocab_size), stable=True)  # frequency, then id
    return order[:count].sort().values
