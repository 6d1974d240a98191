"""Draft proposers for Any-Subset Speculative Decoding, declared by one protocol and registered by name.

A drafter proposes ``K`` tokens for the ranks ``n .. n+K-1`` of each active row, together with the
full proposal distributions it drew them from (needed for the acceptance ratio and the residual).
Any proposal keeps ASSD exact, because the verify pass corrects it; better proposals are accepted
more often. The protocol (:class:`Drafter`):

* ``propose(DraftRequest)``: the drafts and their proposals;
* ``name``: how samplers name it (``assd-<name>``);
* ``first_draft_exact``: the first proposal is the exact conditional, so ASSD accepts it unverified;
* ``single_pass``: single-pass (fused) rounds can draft as it does: from the verify call's own draft rows
  (the model's query states), with no drafter call. True for ``self`` and ``head`` only;
* ``head_for(model)``: the chained draft head it drafts with (None: none); MissingDraftHeadError when it
  needs one that the model lacks.

An object with only ``propose()`` (and optionally ``name`` and ``first_draft_exact``) is a drafter too:
:func:`make_drafter` gives it the defaults (its class name, False, False, no head). Model calls are
counted by the sampler (every ``session.logits`` call a drafter makes), not declared.

* ``SelfDrafter``: one model pass with the draft mask; the K tokens are drawn independently from
  ``p(x_{n+i} | x_{<n})``. Its first proposal is the exact conditional, so it is always accepted.
* ``HeadDrafter``: the self drafter's call, with every draft after the first drawn from the model's
  chained draft head (asarm.draft_head) instead: each draft then depends on the ones before it. Its
  first proposal is still the exact conditional.
* ``NGramDrafter``: no model call; a per-row bigram table over the committed adjacent pairs, drafting
  each token from its left neighbour (backing off to the row's unigram counts, then to uniform).

``DRAFTERS`` maps names to classes; :func:`register_drafter` adds one, and the CLI, the evaluations and
the benchmarks list drafters from it. torch is imported inside the functions that use it, so that the
command line reads this registry (through asarm.sampling.spec) without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["DraftRequest", "Drafter", "SelfDrafter", "HeadDrafter", "NGramDrafter", "chain_drafts", "DRAFTERS",
           "register_drafter", "make_drafter", "MissingDraftHeadError", "PROPOSAL_DTYPES", "proposal_dtype"]

# The dtypes a draft head may run in, its readout included (``proposal_dtype``): its proposals are exact at any.
PROPOSAL_DTYPES = ("float32", "bfloat16", "float16", "float64")


def proposal_dtype(model) -> str:
    """The default dtype of the draft head (its weights and its LM-head readout) for ``model``: float16 for a
    float32 model on an x86 CPU with AVX2 or AVX-512 (whose float16 matrix-vector kernels convert in registers),
    else the model's own. At batch 1 a CPU draft slot costs about what reading its weights from memory costs,
    so half the bytes take about half the time; float16 moves a proposal by a total variation of about 3e-4,
    and proposals are exact at any precision. On CPUs without native float16 matrix products (oneDNN), float16
    products of 16 or more rows run several times slower than float32 (``--proposal-dtype bfloat16`` or
    ``float32`` suit large batches there). On CUDA a small model's slot is bound by kernel launches."""
    import torch

    own = str(model.dtype).removeprefix("torch.")
    if model.dtype == torch.float32 and model.device.type == "cpu" and \
            torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return "float16"
    return own


@dataclass
class DraftRequest:
    """What a drafter gets for one round of the active rows."""

    session: object  # the engine session (SelfDrafter calls it)
    rows: torch.Tensor  # (b,) batch indices
    tokens: torch.Tensor  # (b, L) current tokens; ranks >= n_fixed are placeholders
    sigma: torch.Tensor  # (b, L)
    n_fixed: torch.Tensor  # (b,)
    query_ranks: torch.Tensor  # (b, K); -1 marks an unused slot
    query_positions: torch.Tensor  # (b, K); -1 marks an unused slot
    uniforms: torch.Tensor  # (b, K) float64, one per draft
    to_probs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits (b,K,V), temperature (K,)) -> probs
    draft_temperatures: torch.Tensor  # (K,) temperature of each draft index
    mask_token_id: int
    vocab_size: int
    model: object = None  # the ASARM (HeadDrafter reads its draft head)
    proposal_dtype: object = None  # the draft head's dtype, its readout included (None: its own; see proposal_dtype)


class MissingDraftHeadError(ValueError):
    """A drafter needs the model's draft head, and the model has none."""


@runtime_checkable
class Drafter(Protocol):
    """What ASSD needs of a drafter (see the module docstring): ``propose`` returns ``(drafts (b, K) long,
    probs (b, K, V) float64)``, each draft drawn from its row of ``probs`` with the matching uniform of
    ``req.uniforms``."""

    name: str
    first_draft_exact: bool
    single_pass: bool

    def head_for(self, model): ...

    def propose(self, req: DraftRequest) -> tuple[torch.Tensor, torch.Tensor]: ...


class _ProposeOnly:
    """A drafter given as an object with ``propose()``: the protocol's defaults for what it leaves out."""

    single_pass = False

    def __init__(self, drafter):
        self.propose = drafter.propose
        self.name = getattr(drafter, "name", type(drafter).__name__)
        self.first_draft_exact = bool(getattr(drafter, "first_draft_exact", False))

    def head_for(self, model):
        return None


class SelfDrafter:
    """The model drafts for itself with the draft (parallel) mask: 1 NFE per round."""

    name = "self"
    first_draft_exact = True
    single_pass = True

    def head_for(self, model):
        return None

    def propose(self, req: DraftRequest) -> tuple[torch.Tensor, torch.Tensor]:
        from .random import sample_categorical

        logits = req.session.logits(req.rows, req.tokens, req.n_fixed, req.query_ranks, draft=True)
        probs = req.to_probs(logits, req.draft_temperatures)
        return sample_categorical(probs, req.uniforms), probs


class HeadDrafter:
    """The model's draft call; drafts after the first come from a chained draft head (1 NFE per round).

    ``head``: a :class:`~asarm.draft_head.DraftHead`; by default the model's own (``model.draft_head``,
    loaded with the model when it ships one)."""

    name = "head"
    first_draft_exact = True
    single_pass = True

    def __init__(self, head=None):
        self.head = head

    def head_for(self, model):
        head = self.head if self.head is not None else model.draft_head
        if head is None:
            raise MissingDraftHeadError("drafter 'head' needs a draft head, and this model has none: train one with "
                             "`asarm train-draft-head`, or use drafter 'self'")
        return head

    def propose(self, req: DraftRequest) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        from .random import sample_categorical

        head = self.head_for(req.model)
        states = req.session.states(req.rows, req.tokens, req.n_fixed, req.query_ranks, draft=True)
        # the first draft is the exact conditional, from the model's own LM head
        probs = req.to_probs(req.model.backbone.lm_head(states[:, :1]), req.draft_temperatures[:1])
        drafts = sample_categorical(probs, req.uniforms[:, :1])
        if req.query_ranks.shape[1] == 1:
            return drafts, probs
        chained, chained_probs = chain_drafts(head, req.model, states[:, 1:], drafts[:, 0], req.query_positions[:, 1:],
                                              req.query_positions[:, 0], req.uniforms[:, 1:], req.to_probs,
                                              float(req.draft_temperatures[1]), req.proposal_dtype)
        return torch.cat([drafts, chained], 1), torch.cat([probs, chained_probs], 1)


def chain_drafts(head, model, states, prev_token, positions, prev_position, uniforms, to_probs, temperature: float,
                 dtype=None):
    """Drafts from a draft head for query rows ``states (b, K, d)`` at ``positions (b, K)`` (consecutive
    ranks), the first following the known ``prev_token (b,)`` at ``prev_position (b,)``; slot i drawn from
    ``to_probs(logits_i, temperature)`` with ``uniforms[:, i]``; ``dtype``: the torch dtype the head runs in, its
    readout included (None: its own). Returns ``(drafts (b, K), probs (b, K, V))``."""
    import torch

    from .random import sample_categorical

    drafts, probs = [], []

    def pick(i, logits):
        probs.append(to_probs(logits, temperature))
        drafts.append(sample_categorical(probs[-1], uniforms[:, i]))
        return drafts[-1]

    with torch.no_grad():
        head = head.in_dtype(dtype)
        head(model.backbone, states.to(head.dtype), prev_token, positions, prev_position, pick, keep_logits=False)
    return torch.stack(drafts, 1), torch.stack(probs, 1)


class NGramDrafter:
    """Context n-gram drafts from each row's own committed tokens: no model call."""

    name = "ngram"
    first_draft_exact = False
    single_pass = False

    def head_for(self, model):
        return None

    def propose(self, req: DraftRequest) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        from .random import sample_categorical

        tokens = req.tokens.clone()
        b, num_drafts = req.query_ranks.shape
        committed = req.sigma < req.n_fixed[:, None]
        pair_committed = committed[:, :-1] & committed[:, 1:]
        unigram = torch.zeros(b, req.vocab_size, dtype=torch.float64, device=tokens.device)
        unigram.scatter_add_(1, tokens, committed.double())
        unigram[:, req.mask_token_id] = 0.0
        uniform = torch.ones(req.vocab_size, dtype=torch.float64, device=tokens.device)
        uniform[req.mask_token_id] = 0.0
        fallback = torch.where(unigram.sum(1, keepdim=True) > 0, unigram, uniform.expand(b, -1))
        drafts = torch.empty(b, num_drafts, dtype=torch.long, device=tokens.device)
        probs = torch.empty(b, num_drafts, req.vocab_size, dtype=torch.float64, device=tokens.device)
        row_idx = torch.arange(b, device=tokens.device)
        for i in range(num_drafts):
            used = req.query_positions[:, i] >= 0
            pos = req.query_positions[:, i].clamp(min=0)
            left = (pos - 1).clamp(min=0)
            # The left neighbour is known if it precedes this draft in the order (committed or drafted).
            left_known = (pos > 0) & (req.sigma[row_idx, left] < req.query_ranks[:, i])
            left_token = tokens[row_idx, left]
            follows = (tokens[:, :-1] == left_token[:, None]) & pair_committed
            bigram = torch.zeros(b, req.vocab_size, dtype=torch.float64, device=tokens.device)
            bigram.scatter_add_(1, tokens[:, 1:], follows.double())
            bigram[:, req.mask_token_id] = 0.0
            use_bigram = left_known[:, None] & (bigram.sum(1, keepdim=True) > 0)
            counts = torch.where(use_bigram, bigram, fallback)
            probs[:, i] = counts / counts.sum(1, keepdim=True)
            drafts[:, i] = sample_categorical(probs[:, i], req.uniforms[:, i])
            tokens[row_idx, pos] = torch.where(used, drafts[:, i], tokens[row_idx, pos])
        return drafts, probs


DRAFTERS: dict[str, type] = {"self": SelfDrafter, "head": HeadDrafter, "ngram": NGramDrafter}


def register_drafter(name: str, cls: type) -> None:
    """Make ``cls`` (constructed without arguments) available as ``drafter=name`` everywhere."""
    if not hasattr(cls, "propose"):
        raise TypeError(f"a drafter needs a propose(DraftRequest) method; {cls.__name__} has none")
    DRAFTERS[name] = cls


def make_drafter(drafter) -> Drafter:
    """A drafter from a name in ``DRAFTERS`` or an object with ``propose()`` (given the protocol's defaults for
    what it leaves out)."""
    if isinstance(drafter, str):
        if drafter not in DRAFTERS:
            raise ValueError(f"unknown drafter {drafter!r}; choose one of {', '.join(DRAFTERS)} or pass an object "
                             f"with propose()")
        drafter = DRAFTERS[drafter]()
    if isinstance(drafter, Drafter):
        return drafter
    if not callable(getattr(drafter, "propose", None)):
        raise ValueError(f"a drafter must be a name ({', '.join(DRAFTERS)}) or an object with propose(), "
                         f"got {type(drafter).__name__}")
    return _ProposeOnly(drafter)
