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
At inference a head may run in a dtype of its own, its LM-head readout included (:meth:`in_dtype`, a copy kept
while its weights are unchanged; the samplers' ``proposal_dtype``, asarm.sampling.drafters.proposal_dtype):
its proposals are exact at any precision, and at batch 1 on a CPU a slot costs about what reading its
weights costs.

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


def _derived(module: nn.Module, slot: str, sources: tuple, make, *settings):
    """``make()``, kept on ``module`` while no tensor of ``sources`` changes (nor ``settings``); formed anew on
    every call where gradients flow (training)."""
    if torch.is_grad_enabled():
        return make()
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources) + settings
    kept = module.__dict__.get(slot)
    if kept is None or kept[0] != key:
        kept = (key, make())
        module.__dict__[slot] = kept
    return kept[1]


class _HeadPrecision(nn.Module):
    """What both kinds of head share: at inference they may run in a dtype of their own, the LM head's readout
    included (their proposals are exact at any precision; asarm.sampling.drafters.proposal_dtype says why)."""

    draft_vocab: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.offset_embedding.weight.dtype

    def in_dtype(self, dtype: torch.dtype | None) -> "_HeadPrecision":
        """This head with its weights in ``dtype``: itself when they already are (or ``dtype`` is None), else a
        copy, kept while none of its weights changes."""
        if dtype is None or dtype == self.dtype:
            return self

        def make():
            copy = head_from_state(self.config(), self.state_dict())
            return copy.to(device=self.offset_embedding.weight.device, dtype=dtype).eval()
        return _derived(self, "_in_dtype", tuple(self.parameters()), make, dtype)

    def readout(self, lm) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM head's ``(weight, bias)`` for the head's proposals, in the head's dtype: the rows of the truncated
        draft vocabulary when it has one (kept while the LM head is unchanged)."""
        weight, bias = lm.readout()
        if not len(self.draft_vocab) and weight.dtype == self.dtype:
            return weight, bias

        def make():
            rows = (weight[self.draft_vocab], bias[self.draft_vocab]) if len(self.draft_vocab) else (weight, bias)
            return tuple(tensor.to(self.dtype) for tensor in rows)
        return _derived(self, "_readout", (weight, bias, self.draft_vocab), make, self.dtype)


class DraftHead(_HeadPrecision):
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
        logits = nn.functional.linear(adjusted, *(self.readout(lm) if readout is None else readout))
        if not len(self.draft_vocab):
            return logits, memory
        full = logits.new_full((*logits.shape[:-1], self.vocab_size), outside_logit(logits.dtype))
        full[..., self.draft_vocab] = logits
        return full, memory

    def forward(self, lm, states: torch.Tensor, first_prev: torch.Tensor, positions: torch.Tensor,
                prev_position: torch.Tensor, pick, keep_logits: bool = True):
        """Slots ``0..K-1`` in order, at ``positions (b, K)``: slot 0 follows ``first_prev (b,)`` at
        ``prev_position (b,)``, slot i the token ``pick`` returned for slot i-1. ``pick(i, logits (b, V)) ->
        tokens (b,)`` draws (or chooses) each slot's token. Returns the logits ``(b, K, V)`` (None without
        ``keep_logits``: a sampler has what it needs from ``pick``, and stacking them costs a copy per call)."""
        offsets = positions - torch.cat([prev_position[:, None], positions[:, :-1]], 1)
        readout = self.readout(lm)  # formed once, not per slot
        prev, memory, out = first_prev, None, []
        for i in range(states.shape[1]):
            logits, memory = self.step(lm, states[:, i], prev, offsets[:, i], memory, readout)
            if keep_logits:
                out.append(logits)
            prev = pick(i, logits)
        return torch.stack(out, dim=1) if keep_logits else None


class OnePassDraftHead(_HeadPrecision):
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

    def config(self) -> dict:
        return {"kind": self.kind, "d_model": self.d_model, "vocab_size": self.vocab_size, "hidden": self.hidden,
                "max_offset": self.max_offset, "rank": self.rank}

    def correction_readout(self, lm) -> torch.Tensor:
        """``W A (V, r)``: the LM head's rows mapped to the correction's rank, in the head's dtype; kept while no
        weight changes (and formed anew where gradients flow, in training)."""
        weight, a = lm.readout()[0], self.from_rank.weight
        return _derived(self, "_folded", (weight, a), lambda: (weight @ a.to(weight.dtype)).to(a.dtype))

    def forward(self, lm, states: torch.Tensor, first_prev: torch.Tensor, positions: torch.Tensor,
                prev_position: torch.Tensor, pick, keep_logits: bool = True):
        """As :meth:`DraftHead.forward`: slots in order, slot i corrected by the token ``pick`` chose for slot i-1."""
        offsets = positions - torch.cat([prev_position[:, None], positions[:, :-1]], 1)
        clipped = offsets.clamp(-self.max_offset, self.max_offset) + self.max_offset
        slots = self.slot_norm(torch.cat([states, self.offset_embedding(clipped).to(states.dtype)], -1))
        logits = nn.functional.linear(states + self.base(slots), *self.readout(lm))  # every slot in one readout
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


def head_from_state(config: dict, state: dict) -> DraftHead | OnePassDraftHead:
    """The head of ``config`` (a head's ``config()``, draft_head.json) with the weights ``state``."""
    kind = config.get("kind", DraftHead.kind)  # heads saved before there were kinds are chains
    head = make_draft_head(kind, config["d_model"], config["vocab_size"], config["hidden"], config["max_offset"],
                           rank=config.get("rank"), draft_vocab=state.get("draft_vocab"))
    head.load_state_dict(state)
    return head


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
    kind = config.get("kind", DraftHead.kind)
    if kind not in HEAD_KINDS:
        raise ValueError(f"{directory / HEAD_CONFIG}: unknown draft head kind {kind!r} (known: "
                         f"{', '.join(HEAD_KINDS)}): upgrade asarm or retrain the head")
    return head_from_state(config, load_file(str(directory / HEAD_WEIGHTS))).eval()
