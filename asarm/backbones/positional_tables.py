"""The positional tables a backbone computes once per sequence length and reuses (XLNet's projected sinusoids,
rope's rotary angles), shared by every backbone's ``cache_context``."""

from __future__ import annotations

from typing import Callable, Hashable

__all__ = ["PositionalTables", "TABLES_KEPT"]

# Sequence lengths kept at once. A decode uses one length and an evaluation a few (its batches' lengths); every
# table grows with the length (XLNet's: n_layer * d_model * (2L + 1) numbers), so they are not kept without bound.
TABLES_KEPT = 4


class PositionalTables:
    """Tables by sequence length, at most ``TABLES_KEPT`` of them (the oldest length is dropped first). Each is kept
    with the ``source`` it was computed from (dtype, device, weight versions): asked with another one, it is
    recomputed in its place."""

    def __init__(self):
        self._tables: dict[int, tuple[Hashable, object]] = {}

    def get(self, seq_len: int, source: Hashable, compute: Callable[[], object]):
        """The table of ``seq_len`` for ``source``: the kept one, or ``compute()`` (then kept)."""
        kept = self._tables.get(seq_len)
        if kept is not None and kept[0] == source:
            return kept[1]
        if kept is None and len(self._tables) >= TABLES_KEPT:
            self._tables.pop(next(iter(self._tables)))
        table = compute()
        self._tables[seq_len] = (source, table)
        return table
