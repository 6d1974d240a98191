"""Batched exact samplers: sequential any-order decoding and Any-Subset Speculative Decoding (ASSD).

Both take ``tokens (B, L)``, ``sigma (B, L)`` (rank of each position), ``n_prompt (B,)`` and
optionally ``lengths (B,)`` or ``padding_mask (B, L)``; every row keeps its own order, prompt size,
acceptance count and random stream. Tokens on ranks ``>= n_prompt`` are ignored (they are replaced
by ``<mask>`` placeholders) and returned filled in.

Exactness (tested against brute-force joints in tests/sampling): the sequential sampler draws from
``prod_r p_T(x_r | x_{<r})``; ASSD draws from the same joint (``temperature_mode="target"``) or from
the T=1 joint (``"no_temp_oracle"``) for every drafter, unless ``r_atol > 0``, which is lossy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..model import ASARM
from ..orders import positions_of_ranks, validate_order
from .drafters import DraftRequest, make_drafter
from .engine import DEFAULT_ENGINE, make_engine
from .random import RowStreams, sample_categorical

__all__ = ["DecodeOutput", "LossySamplingWarning", "sequential_decode", "assd_decode", "TEMPERATURE_MODES"]

TEMPERATURE_MODES = ("target", "no_temp_oracle")
# Below this residual mass p and q are equal up to rounding: a rejection there is numerical noise,
# and the residual is taken to be p itself.
_RESIDUAL_EPS = 1e-9


class LossySamplingWarning(UserWarning):
    """A sampler runs in a mode that does not sample the exact target distribution."""


@dataclass
class DecodeOutput:
    """Decoded tokens and per-row cost statistics (all tensors on the CPU except ``tokens``)."""

    tokens: torch.Tensor  # (B, L)
    nfe: torch.Tensor  # (B,) model forward passes the row took part in
    rounds: torch.Tensor  # (B,) decoding rounds (= NFE for sequential)
    accepted: torch.Tensor  # (B,) draft tokens accepted (ASSD; includes the first self-draft token)
    ngram_calls: torch.Tensor  # (B,) n-gram drafter calls
    drafted_by_index: torch.Tensor | None = None  # (B, k) drafts that reached verification, per draft index
    accepted_by_index: torch.Tensor | None = None  # (B, k) drafts accepted, per draft index
    sampler: str = "sequential"
    exact: bool = True  # False when a lossy option (r_atol > 0) was used
    settings: dict = field(default_factory=dict)

    @property
    def tokens_per_round(self) -> torch.Tensor:
        generated = self.settings["stop"] - self.settings["n_prompt"]
        return generated.double() / self.rounds.clamp(min=1).double()


class _Batch:
    """Validated inputs moved to the model's device, plus the bookkeeping every sampler needs."""

    def __init__(self, model: ASARM, tokens, sigma, n_prompt, lengths, padding_mask, max_new_tokens):
        device = model.device
        tokens = torch.as_tensor(tokens).to(device=device, dtype=torch.long)
        sigma = torch.as_tensor(sigma).to(device=device, dtype=torch.long)
        if padding_mask is not None:
            padding_mask = torch.as_tensor(padding_mask, device=device)
        n_prompt, lengths = validate_order(tokens, sigma, torch.as_tensor(n_prompt, device=device), lengths,
                                           padding_mask, model.mask_token_id)
        self.sigma = sigma
        self.n_prompt = n_prompt
        self.lengths = lengths
        to_decode = (sigma >= n_prompt[:, None]) & (sigma < lengths[:, None])
        self.tokens = tokens.masked_fill(to_decode, model.mask_token_id)
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
        self.ngram_calls = torch.zeros_like(self.nfe)

    def active_rows(self) -> torch.Tensor:
        return (self.n_fixed < self.stop).nonzero().flatten()

    def output(self, **kwargs) -> DecodeOutput:
        settings = kwargs.pop("settings", {})
        settings.update(n_prompt=self.n_prompt.cpu(), lengths=self.lengths.cpu(), stop=self.stop.cpu())
        return DecodeOutput(tokens=self.tokens, nfe=self.nfe.cpu(), rounds=self.rounds.cpu(),
                            accepted=self.accepted.cpu(), ngram_calls=self.ngram_calls.cpu(), settings=settings,
                            **kwargs)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _progress(batch: _Batch, enabled: bool, desc: str):
    total = int((batch.stop - batch.n_prompt).sum())
    return tqdm(total=total, desc=desc, unit="tok", disable=not enabled, leave=False)


def _to_probs(model: ASARM):
    def to_probs(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
        return model.probabilities(logits, temperatures[None, :, None])
    return to_probs


def _write(tokens: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``tokens`` with ``values`` written at ``positions``; slots at position -1 are dropped."""
    extended = torch.nn.functional.pad(tokens, (0, 1))
    slot = torch.where(positions >= 0, positions, tokens.shape[1])
    return extended.scatter(1, slot, values)[:, :-1]


def _num_accepted(accept: torch.Tensor, valid: torch.Tensor, k_eff: torch.Tensor) -> torch.Tensor:
    """Length of the accepted prefix of each row's drafts."""
    rejected = valid & ~accept
    return torch.where(rejected.any(1), rejected.to(torch.int8).argmax(1), k_eff)


@torch.no_grad()
def sequential_decode(model: ASARM, tokens, sigma, n_prompt, lengths=None, *, padding_mask=None,
                      temperature: float = 1.0, seed=None, generator: torch.Generator | None = None,
                      engine=DEFAULT_ENGINE, max_new_tokens: int | None = None, progress: bool = False) -> DecodeOutput:
    """One oracle pass per token, in each row's order: NFE = length - n_prompt exactly.

    ``max_new_tokens`` stops each row after that many tokens (the rest stay ``<mask>``)."""
    _check_temperature(temperature)
    batch = _Batch(model, tokens, sigma, n_prompt, lengths, padding_mask, max_new_tokens)
    streams = RowStreams(batch.tokens.shape[0], seed, generator)
    session = make_engine(engine, model).start(batch.tokens, batch.sigma, batch.n_prompt)
    to_probs = _to_probs(model)
    temperatures = torch.tensor([temperature], dtype=torch.float64)
    bar = _progress(batch, progress, "sequential")
    while len(rows := batch.active_rows()):
        n = batch.n_fixed[rows]
        logits = session.logits(rows, batch.tokens[rows], n, n[:, None], draft=False)
        probs = to_probs(logits, temperatures)[:, 0]
        new = sample_categorical(probs, streams.uniform(rows, 1, probs.device)[:, 0])
        batch.tokens[rows, batch.positions[rows, n]] = new
        batch.n_fixed[rows] += 1
        batch.nfe[rows] += 1
        bar.update(len(rows))
    bar.close()
    batch.rounds.copy_(batch.nfe)
    return batch.output(sampler="sequential", settings={"temperature": temperature})


@torch.no_grad()
def assd_decode(model: ASARM, tokens, sigma, n_prompt, lengths=None, *, padding_mask=None, k: int = 5,
                drafter="self", temperature: float = 1.0, temperature_mode: str = "target", r_atol: float = 0.0,
                seed=None, generator: torch.Generator | None = None, engine=DEFAULT_ENGINE,
                max_new_tokens: int | None = None, progress: bool = False) -> DecodeOutput:
    """Any-Subset Speculative Decoding.

    Per round (n tokens fixed): the drafter proposes ``k_eff = min(k, length - n)`` tokens for ranks
    ``n..n+k_eff-1``; one oracle pass with the drafts written in gives their chained conditionals ``p_i``;
    draft i is accepted with probability ``min(1, p_i(x_i) / q_i(x_i))`` and the first rejected one is
    replaced by a draw from ``normalize(max(0, p_i - q_i))``. With the self drafter the first draft is
    the exact conditional and is accepted by construction (the verify pass queries drafts 2..k only),
    and a round with one token left needs no verify pass, so NFE <= length - n_prompt for k >= 2.

    Args:
        k: drafts per round (>= 1).
        drafter: ``"self"``, ``"ngram"`` or an object with ``propose(DraftRequest)``.
        temperature: > 0. ``temperature_mode="target"`` tempers drafts and oracle (target = tempered
            sequential joint); ``"no_temp_oracle"`` keeps the oracle and first draft at T=1 and tempers
            only drafts 2..k (target = the T=1 joint).
        r_atol: LOSSY when > 0: added to the acceptance ratio, so more drafts pass and the output no
            longer follows the target distribution (per-token TV error roughly 0.6-0.7 x r_atol).
            The output is marked ``exact=False`` and a LossySamplingWarning is emitted.
        seed: int, or ``(B,)`` per-row seeds (a row then decodes identically alone or in any batch);
            or pass ``generator``.
        engine: ``"cached"`` (default), ``"full"`` (a plain Hugging Face forward per NFE, the reference's
            cost model; same outputs up to floating-point tolerance), or an engine object.
        max_new_tokens: stop each row after that many tokens (the rest stay ``<mask>``).
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    _check_temperature(temperature)
    if temperature_mode not in TEMPERATURE_MODES:
        raise ValueError(f"temperature_mode must be one of {TEMPERATURE_MODES}, got {temperature_mode!r}")
    if r_atol < 0:
        raise ValueError(f"r_atol must be >= 0, got {r_atol}")
    if r_atol > 0:
        warnings.warn(f"r_atol={r_atol} > 0 makes ASSD lossy: samples no longer follow the model's distribution",
                      LossySamplingWarning, stacklevel=2)
    drafter = make_drafter(drafter)
    batch = _Batch(model, tokens, sigma, n_prompt, lengths, padding_mask, max_new_tokens)
    batch_size = batch.tokens.shape[0]
    device = batch.tokens.device
    streams = RowStreams(batch_size, seed, generator)
    session = make_engine(engine, model).start(batch.tokens, batch.sigma, batch.n_prompt)
    to_probs = _to_probs(model)

    tempered = torch.full((k,), float(temperature), dtype=torch.float64)
    if temperature_mode == "target":
        draft_temps, oracle_temps = tempered, tempered
    else:
        draft_temps, oracle_temps = tempered.clone(), torch.ones(k, dtype=torch.float64)
        draft_temps[0] = 1.0
    drafted_by_index = torch.zeros(batch_size, k, dtype=torch.long, device=device)
    accepted_by_index = torch.zeros_like(drafted_by_index)
    first_checked = int(drafter.first_draft_exact)  # first draft slot the verify pass checks
    bar = _progress(batch, progress, f"assd-{drafter.name}")

    while len(rows := batch.active_rows()):
        n = batch.n_fixed[rows]
        k_eff = torch.clamp(batch.stop[rows] - n, max=k)
        num = int(k_eff.max())
        idx = torch.arange(num, device=device)
        valid = idx[None, :] < k_eff[:, None]
        # Rows with fewer drafts than others leave their last slots unused (-1).
        query_ranks = torch.where(valid, n[:, None] + idx[None, :], -1)
        query_positions = positions_of_ranks(batch.positions[rows], query_ranks)
        uniforms = streams.uniform(rows, 2 * k + 1, device)  # fixed count per row and round
        u_draft, u_accept, u_residual = uniforms[:, :num], uniforms[:, k:k + num], uniforms[:, 2 * k]
        tokens = batch.tokens[rows]
        drafts, q = drafter.propose(DraftRequest(
            session=session, rows=rows, tokens=tokens, sigma=batch.sigma[rows], n_fixed=n,
            query_ranks=query_ranks, query_positions=query_positions, uniforms=u_draft, to_probs=to_probs,
            draft_temperatures=draft_temps[:num], mask_token_id=model.mask_token_id, vocab_size=model.vocab_size))
        batch.nfe[rows] += drafter.model_calls_per_round
        batch.ngram_calls[rows] += int(drafter.model_calls_per_round == 0)
        batch.rounds[rows] += 1

        accept = torch.zeros_like(valid)
        if drafter.first_draft_exact:
            accept[:, 0] = True
            verify = k_eff >= 2  # one exact draft left: nothing to verify
        else:
            verify = torch.ones_like(valid[:, 0])
        residual_token = torch.zeros_like(n)
        if verify.any():
            v = verify.nonzero().flatten()
            written = _write(tokens[v], query_positions[v], drafts[v])
            # the oracle's slot-0 conditional equals an exact first draft: not queried again
            checked = slice(first_checked, num)
            p = to_probs(session.logits(rows[v], written, n[v], query_ranks[v, checked], draft=False),
                         oracle_temps[checked])
            qv, dv = q[v, checked], drafts[v, checked, None]
            p_x, q_x = p.gather(2, dv).squeeze(-1), qv.gather(2, dv).squeeze(-1)
            accept[v, checked] |= u_accept[v, checked] < p_x / q_x + r_atol
            # the first rejected slot, as an index into p (which starts at slot first_checked)
            j = _num_accepted(accept[v], valid[v], k_eff[v]).clamp(max=num - 1) - first_checked
            arange_v = torch.arange(len(v), device=device)
            p_j = p[arange_v, j]
            residual = (p_j - qv[arange_v, j]).clamp(min=0)
            residual = torch.where(residual.sum(-1, keepdim=True) > _RESIDUAL_EPS, residual, p_j)
            residual_token[v] = sample_categorical(residual, u_residual[v])
            batch.nfe[rows[v]] += 1

        num_accepted = _num_accepted(accept, valid, k_eff)
        has_rejection = num_accepted < k_eff
        kept = idx[None, :] < num_accepted[:, None]
        new_tokens = torch.where(kept, drafts, model.mask_token_id)
        new_tokens = torch.where(has_rejection[:, None] & (idx[None, :] == num_accepted[:, None]),
                                 residual_token[:, None], new_tokens)
        batch.tokens[rows] = _write(tokens, query_positions, new_tokens)
        fixed_now = num_accepted + has_rejection.long()
        batch.n_fixed[rows] += fixed_now
        batch.accepted[rows] += num_accepted
        reached = idx[None, :] <= torch.minimum(num_accepted, k_eff - 1)[:, None]
        drafted_by_index[rows, :num] += reached.long()
        accepted_by_index[rows, :num] += kept.long()
        bar.update(int(fixed_now.sum()))
    bar.close()
    return batch.output(sampler=f"assd-{drafter.name}", exact=r_atol == 0, drafted_by_index=drafted_by_index.cpu(),
                        accepted_by_index=accepted_by_index.cpu(),
                        settings={"k": k, "temperature": temperature, "temperature_mode": temperature_mode,
                                  "r_atol": r_atol, "drafter": drafter.name})
