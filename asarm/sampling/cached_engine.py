"""An exact, cached inference engine for any-order XLNet decoding (``engine="cached"``).

Why a cache is possible (spec sections 2 and 8): under both inference masks a position only sees
positions of lower rank (prompt positions: the whole prompt), and XLNet's content stream also sees
itself. So the content-stream state of a committed token, at every layer, is a function of the
tokens of lower rank only; it never changes once computed, whatever the decoding order. XLNet's
relative positions are true token positions, so the positional score between a query and a cached
key depends only on their two positions, not on when the key was computed.

What the session keeps, per batch row and layer: the content-stream key and value heads of every
rank whose state is known, in a buffer indexed by RANK, ``(n_layer, S, heads, L + 1, d_head)`` for
keys and values (slot ``L`` is a scratch slot that padding rows of a batched pass write to; it is
never visible). The keys a row may attend to are then "slots below a limit" (plus its own slot in
the content stream): a mask over a prefix of the buffer, no ragged gathers, and a pass only reads
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

The positional term: per layer ``bd[i, j] = (q_i + r_r_bias) . (W_r pe(pos_i - pos_j))``. The engine
projects the sinusoid table of every distance ``d in [-L, L]`` once per (length, dtype, weights) and
per pass computes the ``(n_rows, heads, 2L + 1)`` table of dot products, then gathers each key's
entry; the ``(L x L x d)`` tensor Hugging Face builds is never formed. The sinusoids themselves are
taken from the model's own ``relative_positional_encoding`` so that they are bit-identical to the
full forward's. Hugging Face computes them in float32 whatever the model's dtype (and its two-stream
attention then fails for float64 weights); this engine casts those float32 sinusoids to the model's
dtype, which is what a float64 Hugging Face forward gives once that cast is patched in.

Rows of the batch may drop out (``rows`` shrinks): a row absent from ``drop_after`` consecutive
calls loses its cache slots (the buffers are compacted); a row that comes back later is recomputed
from its tokens. A call on a strict subset of the held rows gathers their buffers for that call.
"""

from __future__ import annotations

import torch

from ..masks import query_limits
from ..model import ASARM

__all__ = ["CachedEngine", "CachedSession"]


def _check_supported(config) -> None:
    if getattr(config, "attn_type", "bi") != "bi":
        raise NotImplementedError(f"CachedEngine supports attn_type='bi' only, got {config.attn_type!r}")
    if getattr(config, "bi_data", False):
        raise NotImplementedError("CachedEngine does not support bi_data=True (a training-only layout)")


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
        _check_supported(model.config)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if drop_after < 1:
            raise ValueError(f"drop_after must be >= 1, got {drop_after}")
        self.model = model
        self.chunk_size = int(chunk_size)
        self.drop_after = int(drop_after)
        self._rel_cache: dict = {}

    def start(self, tokens: torch.Tensor, sigma: torch.Tensor, n_prompt: torch.Tensor) -> "CachedSession":
        return CachedSession(self, tokens, sigma, n_prompt)

    # --------------------------------------------------------------------- positional tables
    @torch.no_grad()
    def relative_keys(self, seq_len: int) -> torch.Tensor:
        """``(n_layer, heads, d_head, 2 L + 1)``: column ``d + L`` is ``W_r pe(d)`` for the relative
        distance ``d = query position - key position`` in ``[-L, L]`` (``d = -L`` only reaches the
        scratch slot and is zero). Cached per length, dtype, device and weight version."""
        xl = self.model.model.transformer
        layers = [layer.rel_attn for layer in xl.layer]
        dtype, device = self.model.dtype, self.model.device
        key = (seq_len, dtype, device, tuple((a.r.data_ptr(), a.r._version) for a in layers))
        table = self._rel_cache.get(seq_len)
        if table is not None and table[0] == key:
            return table[1]
        if len(self._rel_cache) >= 4:  # keep a few lengths only
            self._rel_cache.pop(next(iter(self._rel_cache)))
        # Hugging Face's own sinusoids for qlen = klen = L: rows are distances L, L-1, ..., -L+1
        # (float32 whatever the model dtype), with clamp_len applied inside.
        try:
            pe = xl.relative_positional_encoding(seq_len, seq_len, bsz=None, device=device)
        except TypeError:  # transformers 4.x: no device argument
            pe = xl.relative_positional_encoding(seq_len, seq_len, bsz=None)
        pe = pe[:, 0, :].to(device)
        pe = pe.flip(0).to(dtype)  # distances -L+1 .. L
        pe = torch.cat([pe.new_zeros(1, pe.shape[1]), pe], dim=0)  # distances -L .. L
        n_head, d_head = layers[0].n_head, layers[0].d_head
        out = torch.stack([(pe @ a.r.reshape(a.r.shape[0], n_head * d_head)).reshape(-1, n_head, d_head)
                           .permute(1, 2, 0).contiguous() for a in layers])
        self._rel_cache[seq_len] = (key, out)
        return out


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
            raise ValueError("n_prompt must be >= 1 on every row (XLNet's query stream needs a visible token)")
        self.positions = torch.argsort(self.sigma, dim=1)
        self.start_tokens = tokens.to(device=device, dtype=torch.long)  # for prefill(); prompts never change
        self.computed = torch.zeros(B, dtype=torch.long, device=device)  # ranks < computed hold valid states
        self.state_tokens = torch.full((B, L), -1, dtype=torch.long, device=device)
        self.committed = torch.zeros(B, dtype=torch.long, device=device)  # largest n_fixed seen
        xl = model.model.transformer
        attn = xl.layer[0].rel_attn
        self.n_layer, self.n_head, self.d_head = len(xl.layer), attn.n_head, attn.d_head
        shape = (self.n_layer, B, self.n_head, L + 1, self.d_head)
        self.k_cache = torch.zeros(shape, dtype=model.dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=model.dtype, device=device)
        self.slot_rows = torch.arange(B, device=device)  # batch row held by each cache slot
        self.slot_of = torch.arange(B, device=device)  # cache slot of each batch row, -1 if none
        self.absent = torch.zeros(B, dtype=torch.long, device=device)
        self.rel = engine.relative_keys(L)
        self.stats = {"calls": 0, "passes": 0, "content_rows": 0, "query_rows": 0, "reused_rows": 0}
        self.last = dict(self.stats)

    # ------------------------------------------------------------------------- slots
    def _slots(self, rows: torch.Tensor) -> torch.Tensor:
        """Cache slots of ``rows`` (adding or compacting slots as rows come and go)."""
        device = rows.device
        new = rows[self.slot_of[rows] < 0]
        if new.numel():
            S = self.slot_rows.numel()
            extra = (self.n_layer, new.numel()) + tuple(self.k_cache.shape[2:])
            self.k_cache = torch.cat([self.k_cache, self.k_cache.new_zeros(extra)], dim=1)
            self.v_cache = torch.cat([self.v_cache, self.v_cache.new_zeros(extra)], dim=1)
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
            self.k_cache = self.k_cache.index_select(1, keep)
            self.v_cache = self.v_cache.index_select(1, keep)
            self.slot_rows = self.slot_rows[keep]
            self.absent = self.absent[keep]
            self.slot_of[self.slot_rows] = torch.arange(keep.numel(), device=device)
        return self.slot_of[rows]

    # ------------------------------------------------------------------------- public
    @torch.no_grad()
    def logits(self, rows: torch.Tensor, tokens: torch.Tensor, n_fixed: torch.Tensor, query_ranks: torch.Tensor,
               draft: bool = False, limits: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.model.lm_loss(self.states(rows, tokens, n_fixed, query_ranks, draft, limits))

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
            width = self.model.config.d_model
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
            out = self._pass(slots, positions, n_prompt, c_rank, c_tok, q_rank, q_limit)
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

    # ------------------------------------------------------------------------- the pass
    def _pass(self, slots, positions, n_prompt, c_rank, c_tok, q_rank, q_limit):
        """One batched pass through all layers. Content rows ``(b, nc)`` at ranks ``c_rank`` (rank ``L``:
        padding, written to the scratch slot) are written into the cache; query rows ``(b, k)`` on
        ranks ``q_rank`` seeing ranks ``< q_limit`` are returned as final states ``(b, k, d)``."""
        lm = self.model.model
        xl = lm.transformer
        L = self.seq_len
        b, nc = c_rank.shape
        device = c_rank.device
        H, dh = self.n_head, self.d_head
        full_batch = slots.numel() == self.slot_rows.numel() and \
            bool((slots == torch.arange(slots.numel(), device=device)).all())

        real = c_rank < L
        # a content row sees ranks below its own (prompt rows: the whole prompt) and itself;
        # padding rows see rank 0 only (anything finite will do; their output is dropped)
        c_limit = torch.where(real, torch.maximum(c_rank, n_prompt[:, None]), 1)
        c_self = torch.where(real, c_rank, -1)
        x = xl.word_embedding(c_tok)  # (b, nc, d)
        limit, rank, selfs = c_limit, c_rank, c_self
        if q_rank is not None:
            k = q_rank.shape[1]
            g = xl.mask_emb.reshape(1, 1, -1).expand(b, k, -1).to(x.dtype)
            x = torch.cat([x, g], dim=1)
            limit = torch.cat([limit, q_limit], 1)
            rank = torch.cat([rank, q_rank], 1)
            selfs = torch.cat([selfs, torch.full_like(q_rank, -1)], 1)  # the query stream never sees itself
        n = rank.shape[1]
        # keys: the slots (= ranks) below the largest limit of the pass; a prefix, no gathers
        n_keys = int(torch.maximum(limit, selfs + 1).max())
        key_ids = torch.arange(n_keys, device=device)
        hidden = ~((key_ids < limit[:, :, None]) | (key_ids == selfs[:, :, None]))[:, None]  # (b, 1, n, K)
        # relative distance (query position - key position), as a column of the 2L + 1 table
        q_pos = torch.cat([positions, positions.new_full((b, 1), L)], 1).gather(1, rank)
        dist = (q_pos[:, :, None] - positions[:, None, :n_keys] + L)[None].expand(H, b, n, n_keys)
        write_slot = slots[:, None].expand(b, nc)

        d_model = x.shape[-1]
        for layer_id, layer in enumerate(xl.layer):
            attn = layer.rel_attn
            q = (x @ attn.q.reshape(d_model, H * dh)).reshape(b, n, H, dh)
            if nc:  # the new content rows' keys and values go into the cache first: rows see each other
                xc = x[:, :nc]
                k_new = (xc @ attn.k.reshape(d_model, H * dh)).reshape(b, nc, H, dh)
                v_new = (xc @ attn.v.reshape(d_model, H * dh)).reshape(b, nc, H, dh)
                self.k_cache[layer_id][write_slot, :, c_rank] = k_new
                self.v_cache[layer_id][write_slot, :, c_rank] = v_new
            keys = self.k_cache[layer_id][:, :, :n_keys]
            values = self.v_cache[layer_id][:, :, :n_keys]
            if not full_batch:
                keys, values = keys.index_select(0, slots), values.index_select(0, slots)
            # content term (q + r_w_bias) . k
            ac = torch.matmul((q + attn.r_w_bias).transpose(1, 2), keys.transpose(-1, -2))  # (b, H, n, K)
            # positional term: per head, (q + r_r_bias) . W_r pe(d) for every distance d, then pick
            qr = (q + attn.r_r_bias).permute(2, 0, 1, 3).reshape(H, b * n, dh)
            table = torch.bmm(qr, self.rel[layer_id]).reshape(H, b, n, 2 * L + 1)
            bd = table.gather(3, dist).permute(1, 0, 2, 3)  # (b, H, n, K)
            score = ((ac + bd) * attn.scale).masked_fill_(hidden, float("-inf"))
            prob = torch.softmax(score, dim=-1)
            vec = torch.matmul(prob, values).transpose(1, 2).reshape(b, n, H * dh)
            x = attn.layer_norm(vec @ attn.o.reshape(d_model, H * dh).t() + x)
            x = layer.ff(x)
        return None if q_rank is None else x[:, nc:]
