"""An exact, cached inference engine for any-order decoding (``engine="cached"``), for every backbone.

Why a cache is possible (spec sections 2 and 8): under both inference masks a position only sees
positions of lower rank (prompt positions: the whole prompt), and the content stream also sees
itself. So the content-stream state of a committed token, at every layer, is a function of the
tokens of lower rank only; it never changes once computed, whatever the decoding order. Both backbones
see true token positions (XLNet's relative positions, rotary ones), so the positional score between a
query and a cached key depends only on their two positions, not on when the key was computed.

What the session keeps, per batch row and layer: the content-stream key and value heads of every
rank whose state is known, in a buffer indexed by RANK (asarm.backbones.kv_cache.RankCache,
``(n_layer, S, heads, L + 1, d_head)``; slot ``L`` is a scratch slot that padding rows of a batched pass
write to; it is never visible). The keys a row may attend to are then "slots below a limit" (plus its own
slot in the content stream): a mask over a prefix of the buffer, no ragged gathers, and a pass only reads
the prefix up to its largest limit. Memory: ``2 * n_layer * B * (L + 1) * d_model`` numbers.

Per call it computes only
  * the content stream of positions that became committed since they were last computed (lazy
    commit; several at once, rank-causal among themselves, in chunks of ``chunk_size`` ranks; the
    first call, or ``prefill()`` before it, computes the prompt as one block: it is bidirectional),
  * the content stream of the uncommitted drafts written below the highest query limit (an oracle
    query's limit is its rank; they are kept too, tagged with the tokens they were computed from: when a later call
    commits the same tokens, their states are reused instead of recomputed),
  * the query stream of the ``k`` query rows,
so one self-drafted ASSD round costs about ``k`` content rows plus ``2k - 1`` query rows (the verify
pass does not re-query the exact first draft) instead of ``2 L`` rows.

Validity is checked, not assumed: the session remembers which token each cached state was computed
from, and at every call the states are valid only up to the first rank whose token differs (ranks
are processed in order, so a changed token invalidates everything above it).

The session owns this bookkeeping; the backbone owns the layers: one ``cached_pass`` per batched layer
stack (asarm.backbones.base), over the rows that ``asarm.backbones.kv_cache.pass_layout`` lays out.

Rows of the batch may drop out (``rows`` shrinks): a row absent from ``drop_after`` consecutive
calls loses its cache slots (the buffers are compacted); a row that comes back later is recomputed
from its tokens. A call on a strict subset of the held rows gathers their buffers for that call.
"""

from __future__ import annotations

import torch

from ..backbones import RankCache, pass_layout
from ..masks import query_limits
from ..model import ASARM

__all__ = ["CachedEngine", "CachedSession"]


class CachedEngine:
    """Exact any-order inference with a per-position content-stream key/value cache.

    Args:
        model: the ``ASARM`` (any dtype, any device; eval mode).
        chunk_size: at most this many newly committed ranks per row are computed in one batched pass
            (bounds the memory of the first call; the prompt is always one block).
        drop_after: a batch row absent from this many consecutive calls loses its cache (memory is
            compacted); should it come back, its states are recomputed from its tokens (still exact).
    """

    name = "cached"

    def __init__(self, model: ASARM, chunk_size: int = 128, drop_after: int = 2):
        model.backbone.check_cached_supported()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if drop_after < 1:
            raise ValueError(f"drop_after must be >= 1, got {drop_after}")
        self.model = model
        self.chunk_size = int(chunk_size)
        self.drop_after = int(drop_after)

    def start(self, tokens: torch.Tensor, sigma: torch.Tensor, n_prompt: torch.Tensor) -> "CachedSession":
        return CachedSession(self, tokens, sigma, n_prompt)


class CachedSession:
    """One batch's cache; see the module docstring. Counters for tests and benchmarks:
    ``stats`` (totals) and ``last`` (the latest call): ``content_rows`` computed, ``query_rows``,
    ``reused_rows`` (draft states from an earlier call accepted as committed, not recomputed),
    ``passes`` (batched layer stacks run)."""

    def __init__(self, engine: CachedEngine, tokens: torch.Tensor, sigma: torch.Tensor, n_prompt: torch.Tensor):
        model = engine.model
        self.engine = engine
        self.model = model
        device = model.device
        if sigma.dim() != 2:
            raise ValueError(f"sigma must have shape (B, L), got {tuple(sigma.shape)}")
        self.batch_size, self.seq_len = sigma.shape
        B, L = self.batch_size, self.seq_len
        self.sigma = sigma.to(device=device, dtype=torch.long)
        self.n_prompt = torch.as_tensor(n_prompt, device=device, dtype=torch.long).reshape(B)
        if (self.n_prompt < 1).any():
            raise ValueError("n_prompt must be >= 1 on every row (the query stream needs a visible token)")
        self.positions = torch.argsort(self.sigma, dim=1)
        self.start_tokens = tokens.to(device=device, dtype=torch.long)  # for prefill(); prompts never change
        self.computed = torch.zeros(B, dtype=torch.long, device=device)  # ranks < computed hold valid states
        self.state_tokens = torch.full((B, L), -1, dtype=torch.long, device=device)
        self.committed = torch.zeros(B, dtype=torch.long, device=device)  # largest n_fixed seen
        config = model.config
        self.cache = RankCache(config.n_layer, B, config.n_head, L, model.backbone.d_head, model.dtype, device)
        self.slot_rows = torch.arange(B, device=device)  # batch row held by each cache slot
        self.slot_of = torch.arange(B, device=device)  # cache slot of each batch row, -1 if none
        self.absent = torch.zeros(B, dtype=torch.long, device=device)
        self.context = model.backbone.cache_context(L)
        self.stats = {"calls": 0, "passes": 0, "content_rows": 0, "query_rows": 0, "reused_rows": 0}
        self.last = dict(self.stats)

    # ------------------------------------------------------------------------- slots
    def _slots(self, rows: torch.Tensor) -> torch.Tensor:
        """Cache slots of ``rows`` (adding or compacting slots as rows come and go)."""
        device = rows.device
        new = rows[self.slot_of[rows] < 0]
        if new.numel():
            S = self.slot_rows.numel()
            self.cache.add_slots(new.numel())
            self.slot_rows = torch.cat([self.slot_rows, new])
            self.absent = torch.cat([self.absent, torch.zeros_like(new)])
            self.slot_of[new] = S + torch.arange(new.numel(), device=device)
            self.computed[new] = 0
            self.committed[new] = 0
            self.state_tokens[new] = -1
        self.absent += 1
        self.absent[self.slot_of[rows]] = 0
        drop = self.absent >= self.engine.drop_after
        if drop.any():
            keep = (~drop).nonzero().flatten()
            gone = self.slot_rows[drop]
            self.slot_of[gone] = -1
            self.computed[gone] = 0
            self.committed[gone] = 0
            self.state_tokens[gone] = -1
            self.cache.keep_slots(keep)
            self.slot_rows = self.slot_rows[keep]
            self.absent = self.absent[keep]
            self.slot_of[self.slot_rows] = torch.arange(keep.numel(), device=device)
        return self.slot_of[rows]

    # ------------------------------------------------------------------------- public
    @torch.no_grad()
    def logits(self, rows: torch.Tensor, tokens: torch.Tensor, n_fixed: torch.Tensor, query_ranks: torch.Tensor,
               draft: bool = False, limits: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.backbone.lm_head(self.states(rows, tokens, n_fixed, query_ranks, draft, limits))

    @torch.no_grad()
    def states(self, rows: torch.Tensor, tokens: torch.Tensor, n_fixed: torch.Tensor, query_ranks: torch.Tensor,
               draft: bool = False, limits: torch.Tensor | None = None) -> torch.Tensor:
        """The final query-stream states ``(b, k, d_model)`` of the queries (``logits`` = the LM head of these)."""
        device = self.sigma.device
        L = self.seq_len
        rows = torch.as_tensor(rows, device=device, dtype=torch.long).reshape(-1)
        tokens = tokens.to(device=device, dtype=torch.long)
        n_fixed = torch.as_tensor(n_fixed, device=device, dtype=torch.long).reshape(-1)
        query_ranks = query_ranks.to(device=device, dtype=torch.long)
        b = rows.numel()
        if tokens.shape != (b, L) or n_fixed.shape != (b,) or query_ranks.dim() != 2 or query_ranks.shape[0] != b:
            raise ValueError(f"shapes: rows {tuple(rows.shape)}, tokens {tuple(tokens.shape)} (want ({b}, {L})), "
                             f"n_fixed {tuple(n_fixed.shape)}, query_ranks {tuple(query_ranks.shape)}")
        if b == 0:
            width = self.model.backbone.d_model
            return torch.zeros(0, query_ranks.shape[1], width, dtype=self.model.dtype, device=device)
        n_prompt = self.n_prompt[rows]
        used = query_ranks >= 0  # -1 marks an unused query slot (its logits are unspecified)
        if (n_fixed < n_prompt).any() or (used & (query_ranks < n_fixed[:, None])).any() or (query_ranks >= L).any() \
                or (n_fixed > L).any():
            raise ValueError("need n_prompt <= n_fixed <= query_ranks < L on every row (or query rank -1: unused)")
        q_limit = query_limits(n_prompt, n_fixed, query_ranks, draft, limits)
        # an unused slot becomes a draft-style query on the lowest open rank: finite, needs nothing new
        q_rank = torch.where(used, query_ranks, n_fixed.clamp(max=L - 1)[:, None])
        slots = self._slots(rows)
        sigma = self.sigma[rows]
        positions = self.positions[rows]

        # states are valid up to the first rank whose token differs from the one they were computed from
        changed = torch.where(tokens != self.state_tokens[rows], sigma, L).amin(dim=1)
        previously = self.computed[rows]
        valid = torch.minimum(previously, changed)
        valid = torch.where(valid < n_prompt, 0, valid)  # the prompt is one bidirectional block
        # content states of every rank some query sees: committed ones, and drafts written below a limit
        need = torch.maximum(n_fixed, q_limit.amax(dim=1))
        # draft states computed by an earlier call and now committed unchanged: not recomputed
        reused = (torch.minimum(valid, n_fixed) - self.committed[rows]).clamp(min=0)
        out, passes, content_rows = self._advance(slots, tokens, positions, n_prompt, valid, need, (q_rank, q_limit))
        self.last = {"calls": 1, "passes": passes, "content_rows": content_rows, "query_rows": int(used.sum()),
                     "reused_rows": int(reused.sum())}
        self._record(rows, tokens, torch.maximum(valid, need), n_fixed)
        return out

    @torch.no_grad()
    def prefill(self) -> None:
        """Compute every row's prompt states now, from the tokens the session was started with (the first
        ``logits`` call does it otherwise), e.g. to time prompt encoding apart from decoding. Only on a
        fresh session."""
        if self.stats["passes"]:
            raise RuntimeError("prefill() must come before the first logits() call")
        start = torch.zeros_like(self.n_prompt)
        _, passes, content_rows = self._advance(self.slot_of, self.start_tokens, self.positions, self.n_prompt,
                                                start, self.n_prompt, None)
        self.last = {"calls": 0, "passes": passes, "content_rows": content_rows, "query_rows": 0, "reused_rows": 0}
        self._record(torch.arange(self.batch_size, device=start.device), self.start_tokens, self.n_prompt,
                     self.n_prompt)

    def _advance(self, slots, tokens, positions, n_prompt, cur, need, queries):
        """Content states of ranks ``cur .. need - 1`` of each row, in chunks of ``chunk_size`` ranks (a row
        still inside its prompt takes the whole prompt); the last pass also runs ``queries`` =
        ``(q_rank, q_limit)`` and returns their final states. Returns ``(states or None, passes, content rows)``."""
        L, device = self.seq_len, self.sigma.device
        chunk = self.engine.chunk_size
        passes = content_rows = 0
        while True:
            end = torch.minimum(need, torch.maximum(cur + chunk, torch.where(cur < n_prompt, n_prompt, 0)))
            end = torch.maximum(cur, end)
            final = bool((end >= need).all())
            count = end - cur
            t = torch.arange(int(count.max()), device=device)
            real = t[None, :] < count[:, None]
            c_rank = torch.where(real, cur[:, None] + t, L)  # rank L = the scratch slot
            c_tok = tokens.gather(1, positions.gather(1, c_rank.clamp(max=L - 1)))
            q_rank, q_limit = queries if final and queries is not None else (None, None)
            layout = pass_layout(slots, self.cache.num_slots, positions, n_prompt, c_rank, q_rank, q_limit)
            out = self.model.backbone.cached_pass(self.cache, self.context, layout, c_tok)
            passes += 1
            content_rows += int(count.sum())
            cur = end
            if final:
                return out, passes, content_rows

    def _record(self, rows, tokens, computed, n_fixed) -> None:
        self.computed[rows] = computed
        self.committed[rows] = torch.maximum(self.committed[rows], n_fixed)
        self.state_tokens[rows] = tokens
        for name, value in self.last.items():
            self.stats[name] += value
