"""Key/value storage by rank for the cached any-order engine, and the row layout of one cached pass.

Shared by every backbone (asarm.backbones.base). Why by rank: under the inference masks a committed
position only sees lower ranks, so its content-stream keys and values never change once computed, and
the keys a row may attend to are the slots below a limit (plus its own slot): a prefix of the buffer, no
ragged gathers (asarm.sampling.cached_engine has the whole argument).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RankCache", "PassLayout", "pass_layout"]


class RankCache:
    """Keys and values ``(n_layer, slots, n_head, L + 1, d_head)`` indexed by rank; slot ``L`` is scratch
    space that padding rows write to and nothing reads. One cache slot holds one batch row."""

    def __init__(self, n_layer: int, slots: int, n_head: int, seq_len: int, d_head: int, dtype, device):
        shape = (n_layer, slots, n_head, seq_len + 1, d_head)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def num_slots(self) -> int:
        return self.keys.shape[1]

    def write(self, layer: int, slots: torch.Tensor, ranks: torch.Tensor, keys: torch.Tensor,
              values: torch.Tensor) -> None:
        """Store ``keys``/``values (b, n, n_head, d_head)`` of rows at ``ranks (b, n)`` of ``slots (b,)``."""
        where = slots[:, None].expand_as(ranks)
        self.keys[layer][where, :, ranks] = keys
        self.values[layer][where, :, ranks] = values

    def read(self, layer: int, n_keys: int, slots: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Ranks ``0 .. n_keys - 1`` of ``slots`` (None: every slot, in order): ``(b, n_head, n_keys, d_head)``."""
        keys, values = self.keys[layer][:, :, :n_keys], self.values[layer][:, :, :n_keys]
        if slots is None:
            return keys, values
        return keys.index_select(0, slots), values.index_select(0, slots)

    def add_slots(self, count: int) -> None:
        extra = (self.keys.shape[0], count) + tuple(self.keys.shape[2:])
        self.keys = torch.cat([self.keys, self.keys.new_zeros(extra)], dim=1)
        self.values = torch.cat([self.values, self.values.new_zeros(extra)], dim=1)

    def keep_slots(self, keep: torch.Tensor) -> None:
        """Keep only the slots ``keep`` (in that order): the others' memory is freed."""
        self.keys = self.keys.index_select(1, keep)
        self.values = self.values.index_select(1, keep)


@dataclass
class PassLayout:
    """The rows of one cached pass, per batch row: ``n_content`` content rows, then the query rows.

    ``slots (b,)``: cache slots; ``read_slots``: the same, or None when they are every slot in order (no
    gather); ``content_ranks (b, n_content)`` (rank ``L``: padding, written to the scratch slot);
    ``row_positions (b, n)``: true token position of every row (``L`` for padding rows);
    ``key_positions (b, n_keys)``: the positions of cache ranks ``0 .. n_keys - 1``; ``hidden (b, 1, n,
    n_keys)``: True where a row may not look."""

    slots: torch.Tensor
    read_slots: torch.Tensor | None
    n_content: int
    content_ranks: torch.Tensor
    row_positions: torch.Tensor
    key_positions: torch.Tensor
    hidden: torch.Tensor

    @property
    def n_keys(self) -> int:
        return self.key_positions.shape[1]


def pass_layout(slots, num_slots: int, positions, n_prompt, c_rank, q_rank=None, q_limit=None) -> PassLayout:
    """The layout of a pass (see ``Backbone.cached_pass``): content rows on ``c_rank (b, nc)`` (rank ``L``:
    padding) see the ranks below their own (prompt rows: the whole prompt) and themselves; query rows on
    ``q_rank (b, k)`` (None: none) see the ranks ``< q_limit`` and never themselves. ``positions (b, L)``:
    each rank's position."""
    b, L = positions.shape
    device = positions.device
    real = c_rank < L
    # padding rows see rank 0 only (anything finite will do; their output is dropped)
    limit = torch.where(real, torch.maximum(c_rank, n_prompt[:, None]), 1)
    selfs = torch.where(real, c_rank, -1)
    rank = c_rank
    if q_rank is not None:
        limit = torch.cat([limit, q_limit], 1)
        rank = torch.cat([rank, q_rank], 1)
        selfs = torch.cat([selfs, torch.full_like(q_rank, -1)], 1)
    n_keys = int(torch.maximum(limit, selfs + 1).max())
    key_ids = torch.arange(n_keys, device=device)
    hidden = ~((key_ids < limit[:, :, None]) | (key_ids == selfs[:, :, None]))[:, None]
    row_positions = torch.cat([positions, positions.new_full((b, 1), L)], 1).gather(1, rank)
    every_slot = slots.numel() == num_slots and bool((slots == torch.arange(num_slots, device=device)).all())
    return PassLayout(slots=slots, read_slots=None if every_slot else slots, n_content=c_rank.shape[1],
                      content_ranks=c_rank, row_positions=row_positions, key_positions=positions[:, :n_keys],
                      hidden=hidden)
