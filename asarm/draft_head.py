"""A chained draft head: drafts that depend on each other, for ASSD's verified drafts.

The model's own draft rows (the draft mask) predict ranks ``m, m+1, ...`` independently from the tokens
below rank ``m - 1``: they cannot see the token at rank ``m - 1`` (drawn after the call, in single-pass
rounds) nor each other. The head adds what they miss. For draft slot ``i`` it takes

* ``h_i``, the model's final query-stream state of that draft row (which already encodes the target
  position and everything the row sees),
* the embedding of the token just before it in the order (rank ``m + i - 1``: the known token at
  ``m - 1`` for slot 0, else the previous draft),
* the position offset between the two (clipped to ``+-max_offset``; mostly +1 inside a gap),

runs a GRU over the slots (so slot i depends on every token drafted before it) and returns
``logits_i = lm_head(h_i + MLP([h_i, r_i]))`` with the model's own (frozen, tied) LM head. The MLP's last
layer starts at zero: an untrained head drafts exactly like the model's draft rows.

Optional truncated draft vocabulary (``draft_vocab``, token ids): the head proposes only those tokens
(probability 0 elsewhere). That stays exact: the verify step's residual covers the other tokens.

Exactness never depends on the head: its drafts are proposals that depend only on committed tokens,
earlier drafts and fresh uniforms, and the verify pass corrects them (asarm.sampling.assd).

A cheaper variant, :class:`OnePassDraftHead` (``kind: one-pass``): every slot's logits come from one batched
step over the outcome rows (``lm_head(h_i + MLP([h_i, offset_i]))``, one readout for all slots), and the chain
is a low-rank correction from the previous token only: ``logits_i += (W A) g_i`` with ``g_i`` a small function
of the slot and of the previous token's embedding, ``A (d, r)`` a low-rank map into the model's width and
``W`` the LM head (so ``W A`` is a ``(V, r)`` matrix, formed once). A slot then costs a few small matmuls
instead of a GRU step and a full readout (the semi-autoregressive drafter of DSpark, in this form).

Trained by self-distillation (``asarm train-draft-head``, asarm.training.draft_head); saved beside the
model as ``draft_head.safetensors`` + ``draft_head.json`` and loaded with it by ``ASARM.from_pretrained``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .inputs import read_json

__all__ = ["DraftHead", "OnePassDraftHead", "HEAD_KINDS", "HEAD_WEIGHTS", "HEAD_CONFIG", "OUTSIDE_LOGIT",
           "outside_logit", "make_draft_head", "save_draft_head", "load_draft_head"]

HEAD_WEIGHTS = "draft_head.safetensors"
HEAD_CONFIG = "draft_head.json"
# The logit of tokens outside a truncated draft vocabulary: finite (the samplers refuse non-finite logits) but
# so low that softmax gives them probability exactly 0, at any temperature (half the dtype's lowest in float16).
OUTSIDE_LOGIT = -1e30


def outside_logit(dtype: torch.dtype) -> float:
    return max(OUTSIDE_LOGIT, torch.finfo(dtype).min / 2)


class DraftHead(nn.Module):
    """See the module doc. ``d_model``: the backbone's width; ``hidden``: the MLP width (default 2 d_model)."""

    def __init__(self, d_model: int, vocab_size: int, hidden: int | None = None, max_offset: int = 8,
                 draft_vocab: torch.Tensor | list | None = None):
        super().__init__()
        if max_offset < 1:
            raise ValueError(f"max_offset must be >= 1, got {max_offset}")
        self.d_model, self.vocab_size, self.max_offset = int(d_model), int(vocab_size), int(max_offset)
        self.hidden = int(hidden or 2 * d_model)
        self.offset_embedding = nn.Embedding(2 * self.max_offset + 1, self.d_model)
        self.input_norm = nn.LayerNorm(self.d_model)
        self.gru = nn.GRUCell(self.d_model, self.d_model)
        self.mlp = nn.Sequential(nn.LayerNorm(2 * self.d_model), nn.Linear(2 * self.d_model, self.hidden), nn.GELU(),
                                 nn.Linear(self.hidden, self.d_model))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        nn.init.normal_(self.offset_embedding.weight, std=0.02)
        vocab = torch.empty(0, dtype=torch.long) if draft_vocab is None else torch.as_tensor(draft_vocab).long()
        if len(vocab) and (int(vocab.min()) < 0 or int(vocab.max()) >= self.vocab_size or
                           len(torch.unique(vocab)) != len(vocab)):
            raise ValueError(f"draft_vocab must hold distinct token ids in [0, {self.vocab_size})")
        self.register_buffer("draft_vocab", vocab, persistent=True)

    kind = "chain"

    def config(self) -> dict:
        return {"kind": self.kind, "d_model": self.d_model, "vocab_size": self.vocab_size, "hidden": self.hidden,
                "max_offset": self.max_offset, "draft_vocab_size": int(len(self.draft_vocab)) or None}

    def step(self, lm, states: torch.Tensor, prev_tokens: torch.Tensor, offsets: torch.Tensor,
             memory: torch.Tensor | None, readout=None) -> tuple[torch.Tensor, torch.Tensor]:
        """One slot for a batch: ``states (b, d)``, ``prev_tokens (b,)``, ``offsets (b,)`` -> ``(logits (b, V),
        memory (b, d))``. ``lm`` is the model's backbone (its token embedding and LM head, both frozen);
        ``readout``: :meth:`readout` of ``lm``, when the caller runs several slots."""
        clipped = offsets.clamp(-self.max_offset, self.max_offset) + self.max_offset
        inputs = lm.embed(prev_tokens).to(states.dtype) + self.offset_embedding(clipped)
        memory = self.gru(self.input_norm(inputs), memory)
        adjusted = states + self.mlp(torch.cat([states, memory], dim=-1))
        if not len(self.draft_vocab):
            return lm.lm_head(adjusted), memory
        weight, bias = self.readout(lm) if readout is None else readout
        logits = adjusted.new_full((*adjusted.shape[:-1], self.vocab_size), outside_logit(adjusted.dtype))
        logits[..., self.draft_vocab] = adjusted @ weight.t() + bias
        return logits, memory

    def readout(self, lm) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The LM head's rows of the truncated draft vocabulary ``(weight, bias)``; None without one."""
        if not len(self.draft_vocab):
            return None
        weight, bias = lm.readout()
        return weight[self.draft_vocab], bias[self.draft_vocab]

    def forward(self, lm, states: torch.Tensor, first_prev: torch.Tensor, positions: torch.Tensor,
                prev_position: torch.Tensor, pick, keep_logits: bool = True):
        """Slots ``0..K-1`` in order, at ``positions (b, K)``: slot 0 follows ``first_prev (b,)`` at
        ``prev_position (b,)``, slot i the token ``pick`` returned for slot i-1. ``pick(i, logits (b, V)) ->
        tokens (b,)`` draws (or chooses) each slot's token. Returns the logits ``(b, K, V)`` (None without
        ``keep_logits``: a sampler has what it needs from ``pick``, and stacking them costs a copy per call)."""
        offsets = positions - torch.cat([prev_position[:, None], positions[:, :-1]], 1)
        readout = self.readout(lm)  # gathered once, not per slot
        prev, memory, out = first_prev, None, []
        for i in range(states.shape[1]):
            logits, memory = self.step(lm, states[:, i], prev, offsets[:, i], memory, readout)
            if keep_logits:
                out.append(logits)
            prev = pick(i, logits)
        return torch.stack(out, dim=1) if keep_logits else None


class OnePassDraftHead(nn.Module):
    """See the module doc. ``hidden``: the width of both MLPs (default d_model); ``rank``: the correction's rank.
    Both output layers start at zero: an untrained head drafts exactly like the model's draft rows."""

    kind = "one-pass"

    def __init__(self, d_model: int, vocab_size: int, hidden: int | None = None, max_offset: int = 8,
                 rank: int = 32):
        super().__init__()
        if max_offset < 1 or rank < 1:
            raise ValueError(f"max_offset and rank must be >= 1, got {max_offset} and {rank}")
        self.d_model, self.vocab_size, self.max_offset, self.rank = int(d_model), int(vocab_size), int(max_offset), \
            int(rank)
        self.hidden = int(hidden or d_model)
        self.offset_embedding = nn.Embedding(2 * self.max_offset + 1, self.d_model)
        self.slot_norm = nn.LayerNorm(2 * self.d_model)
        self.base = nn.Sequential(nn.Linear(2 * self.d_model, self.hidden), nn.GELU(),
                                  nn.Linear(self.hidden, self.d_model))
        self.from_slot = nn.Linear(2 * self.d_model, self.hidden)  # the correction's view of the slot (batched)
        self.prev_norm = nn.LayerNorm(self.d_model)
        self.from_prev = nn.Linear(self.d_model, self.hidden, bias=False)  # ... and of the previous token (per slot)
        self.to_rank = nn.Linear(self.hidden, self.rank)
        self.from_rank = nn.Linear(self.rank, self.d_model, bias=False)  # A: folded into the readout, W A
        for layer in (self.base[-1], self.from_rank):
            nn.init.zeros_(layer.weight)
        nn.init.zeros_(self.base[-1].bias)
        nn.init.normal_(self.offset_embedding.weight, std=0.02)
        # the whole vocabulary (the interface of DraftHead, whose draft_vocab may truncate it)
        self.register_buffer("draft_vocab", torch.empty(0, dtype=torch.long), persistent=False)
        self._folded: tuple | None = None  # (key, W A) at inference: formed once per weights

    def config(self) -> dict:
        return {"kind": self.kind, "d_model": self.d_model, "vocab_size": self.vocab_size, "hidden": self.hidden,
                "max_offset": self.max_offset, "rank": self.rank}

    def correction_readout(self, lm) -> torch.Tensor:
        """``W A (V, r)``: the LM head's rows mapped to the correction's rank; kept while no weight changes (and
        formed anew where gradients flow, in training)."""
        weight, a = lm.readout()[0], self.from_rank.weight
        if torch.is_grad_enabled():
            return weight @ a
        key = (weight.data_ptr(), weight._version, a.data_ptr(), a._version, weight.dtype, weight.device)
        if self._folded is None or self._folded[0] != key:
            self._folded = (key, weight @ a)
        return self._folded[1]

    def forward(self, lm, states: torch.Tensor, first_prev: torch.Tensor, positions: torch.Tensor,
                prev_position: torch.Tensor, pick, keep_logits: bool = True):
        """As :meth:`DraftHead.forward`: slots in order, slot i corrected by the token ``pick`` chose for slot i-1."""
        offsets = positions - torch.cat([prev_position[:, None], positions[:, :-1]], 1)
        clipped = offsets.clamp(-self.max_offset, self.max_offset) + self.max_offset
        slots = self.slot_norm(torch.cat([states, self.offset_embedding(clipped).to(states.dtype)], -1))
        logits = lm.lm_head(states + self.base(slots))  # every slot in one readout
        from_slot, folded = self.from_slot(slots), self.correction_readout(lm)
        prev, out = first_prev, []
        for i in range(states.shape[1]):
            prev_embedding = self.prev_norm(lm.embed(prev).to(states.dtype))
            hidden = nn.functional.gelu(from_slot[:, i] + self.from_prev(prev_embedding))
            slot_logits = torch.addmm(logits[:, i], self.to_rank(hidden), folded.t())
            if keep_logits:
                out.append(slot_logits)
            prev = pick(i, slot_logits)
        return torch.stack(out, dim=1) if keep_logits else None


HEAD_KINDS = {DraftHead.kind: DraftHead, OnePassDraftHead.kind: OnePassDraftHead}


def make_draft_head(kind: str, d_model: int, vocab_size: int, hidden: int | None, max_offset: int, *,
                    rank: int | None = None, draft_vocab=None) -> DraftHead | OnePassDraftHead:
    """A new draft head of ``kind`` (a key of ``HEAD_KINDS``): a chain takes the optional truncated
    ``draft_vocab``, a one-pass head its correction's ``rank``."""
    if kind == OnePassDraftHead.kind:
        return OnePassDraftHead(d_model, vocab_size, hidden, max_offset, rank)
    return DraftHead(d_model, vocab_size, hidden, max_offset, draft_vocab)


def save_draft_head(head: DraftHead, directory: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in head.state_dict().items()}
    save_file(state, str(directory / HEAD_WEIGHTS))
    (directory / HEAD_CONFIG).write_text(json.dumps(head.config(), indent=2) + "\n")


def load_draft_head(directory: str | os.PathLike, vocab_size: int, d_model: int) -> DraftHead | None:
    """The head saved in ``directory``, None when there is none; ValueError when it does not fit the model."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / HEAD_CONFIG).is_file():
        return None
    config = read_json(directory / HEAD_CONFIG)
    if (config["vocab_size"], config["d_model"]) != (vocab_size, d_model):
        raise ValueError(f"{directory / HEAD_CONFIG} is for a model of vocabulary {config['vocab_size']} and width "
                         f"{config['d_model']}, not {vocab_size} and {d_model}: retrain it with asarm train-draft-head")
    state = load_file(str(directory / HEAD_WEIGHTS))
    kind = config.get("kind", DraftHead.kind)  # heads saved before there were kinds are chains
    if kind not in HEAD_KINDS:
        raise ValueError(f"{directory / HEAD_CONFIG}: unknown draft head kind {kind!r} (known: "
                         f"{', '.join(HEAD_KINDS)}): upgrade asarm or retrain the head")
    head = make_draft_head(kind, config["d_model"], config["vocab_size"], config["hidden"], config["max_offset"],
                           rank=config.get("rank"), draft_vocab=state.get("draft_vocab"))
    head.load_state_dict(state)
    return head.eval()
