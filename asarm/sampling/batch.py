"""What every sampler shares: the validated batch and its bookkeeping (:class:`DecodeBatch`), the output
(:class:`DecodeOutput`), a tokens-decoded progress bar, and the model's probabilities as a function."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..model import ASARM
from ..orders import validate_order
from .trace import DecodeTrace

__all__ = ["DecodeOutput", "LossySamplingWarning", "DecodeBatch", "TokenProgress", "probabilities_fn", "add_rows",
           "check_temperature"]


class LossySamplingWarning(UserWarning):
    """A sampler runs in a mode that does not sample the exact target distribution."""


@dataclass
class DecodeOutput:
    """Decoded tokens and per-row cost statistics (all tensors on the CPU except ``tokens``)."""

    tokens: torch.Tensor  # (B, L)
    nfe: torch.Tensor  # (B,) model forward passes the row took part in
    rounds: torch.Tensor  # (B,) decoding rounds (= NFE for sequential)
    accepted: torch.Tensor  # (B,) draft tokens accepted (ASSD; includes the first self-draft token)
    model_free_draft_calls: torch.Tensor  # (B,) drafter calls that made no model call (n-gram drafts)
    drafted_by_index: torch.Tensor | None = None  # (B, k) drafts that reached verification, per draft index
    accepted_by_index: torch.Tensor | None = None  # (B, k) drafts accepted, per draft index
    bonus_tokens: torch.Tensor | None = None  # (B,) tokens committed from bonus rows (ASSD)
    draft_calls: torch.Tensor | None = None  # (B,) drafter calls (ASSD; single-pass rounds need fewer)
    trace: DecodeTrace | None = None  # what each round did (samplers' trace=True; see asarm.sampling.trace)
    schedule: list[dict] | None = None  # assd-auto: per call, its rows, query rows, predicted seconds, each row's
    # drafts for the next call and outcomes covered
    sampler: str = "sequential"
    exact: bool = True  # False when a lossy option (r_atol > 0) was used
    settings: dict = field(default_factory=dict)

    @property
    def tokens_per_round(self) -> torch.Tensor:
        generated = self.settings["stop"] - self.settings["n_prompt"]
        return generated.double() / self.rounds.clamp(min=1).double()

    @property
    def tokens_per_call(self) -> torch.Tensor:
        """Generated tokens per model call (NFE), per row."""
        generated = self.settings["stop"] - self.settings["n_prompt"]
        return generated.double() / self.nfe.clamp(min=1).double()


class DecodeBatch:
    """Validated inputs moved to the model's device, plus the bookkeeping every sampler needs."""

    def __init__(self, model: ASARM, tokens, sigma, n_prompt, lengths, padding_mask, max_new_tokens):
        device = model.device
        tokens = torch.as_tensor(tokens).to(device=device, dtype=torch.long)
        sigma = torch.as_tensor(sigma).to(device=device, dtype=torch.long)
        if padding_mask is not None:
            padding_mask = torch.as_tensor(padding_mask, device=device)
        n_prompt, lengths = validate_order(tokens, sigma, torch.as_tensor(n_prompt, device=device), lengths,
                                           padding_mask, model.mask_token_id, vocab_size=model.vocab_size)
        self.sigma = sigma
        self.n_prompt = n_prompt
        self.lengths = lengths
        to_decode = (sigma >= n_prompt[:, None]) & (sigma < lengths[:, None])
        # column L is a scratch slot that writes of unused slots (rank -1) go to; tokens is a view without it
        self._padded = torch.nn.functional.pad(tokens.masked_fill(to_decode, model.mask_token_id), (0, 1))
        self.tokens = self._padded[:, :-1]
        self.positions = torch.argsort(sigma, dim=1)  # position holding each rank
        self.n_fixed = n_prompt.clone()
        if max_new_tokens is not None and (not isinstance(max_new_tokens, int) or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be None or an integer >= 1, got {max_new_tokens!r}")
        # Ranks >= stop stay placeholders (partial decoding); stop = length unless max_new_tokens says less.
        self.stop = lengths if max_new_tokens is None else torch.minimum(lengths, n_prompt + max_new_tokens)
        batch_size = tokens.shape[0]
        self.nfe = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.rounds = torch.zeros_like(self.nfe)
        self.accepted = torch.zeros_like(self.nfe)
        self.model_free_draft_calls = torch.zeros_like(self.nfe)

    def active_rows(self) -> torch.Tensor:
        return (self.n_fixed < self.stop).nonzero().flatten()

    def _slots(self, sel, ranks: torch.Tensor) -> torch.Tensor:
        """Positions of ``ranks`` in the rows ``sel``, with the scratch column for rank -1."""
        return torch.where(ranks >= 0, self.positions[sel].gather(1, ranks.clamp(min=0)), self.tokens.shape[1])

    def write(self, sel, ranks: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values`` at ``ranks`` of the rows ``sel`` (a row index tensor, or ``slice(None)`` for every
        row); slots of rank -1 are skipped."""
        slot = self._slots(sel, ranks)
        if isinstance(sel, slice):
            self._padded.scatter_(1, slot, values)
        else:
            self._padded.index_put_((sel[:, None].expand_as(slot), slot), values)

    def with_values(self, sel, ranks: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """The tokens of the rows ``sel`` with ``values`` written at ``ranks`` (-1: skipped), as a copy."""
        return self._padded[sel].scatter(1, self._slots(sel, ranks), values)[:, :-1]

    def output(self, **kwargs) -> DecodeOutput:
        settings = kwargs.pop("settings", {})
        settings.update(n_prompt=self.n_prompt.cpu(), lengths=self.lengths.cpu(), stop=self.stop.cpu())
        return DecodeOutput(tokens=self.tokens.contiguous(), nfe=self.nfe.cpu(), rounds=self.rounds.cpu(),
                            accepted=self.accepted.cpu(), model_free_draft_calls=self.model_free_draft_calls.cpu(),
                            settings=settings, **kwargs)


def check_temperature(temperature: float) -> None:
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")


class TokenProgress:
    """A tokens-decoded progress bar; costs nothing per step when disabled."""

    def __init__(self, batch: DecodeBatch, enabled: bool, desc: str):
        self.batch, self.enabled = batch, enabled
        self.done = int(batch.n_prompt.sum())
        self.bar = tqdm(total=int(batch.stop.sum()) - self.done, desc=desc, unit="tok", disable=not enabled,
                        leave=False)

    def advance(self) -> None:
        if self.enabled:
            done = int(self.batch.n_fixed.sum())
            self.bar.update(done - self.done)
            self.done = done

    def close(self) -> None:
        self.bar.close()


def probabilities_fn(model: ASARM):
    """``to_probs(logits (b, k, V), temperature)``: one number for every query, or ``(k,)``, one per query."""
    def to_probs(logits: torch.Tensor, temperatures: float | torch.Tensor) -> torch.Tensor:
        if isinstance(temperatures, torch.Tensor):
            temperatures = temperatures.reshape(1, -1, 1)
        return model.probabilities(logits, temperatures)
    return to_probs


def add_rows(target: torch.Tensor, sel, values: torch.Tensor | int) -> None:
    """``target[sel] += values`` in one in-place op (``sel``: row indices, or ``slice(None)`` for every row)."""
    if isinstance(sel, slice):
        target.add_(values)
    elif isinstance(values, int):
        target[sel] += values
    else:
        target.index_add_(0, sel, values.to(target.dtype))
