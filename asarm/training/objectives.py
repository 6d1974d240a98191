"""Training objectives of the masking-distribution trainer (spec section 5): masks, targets, loss.

Every sequence of a micro-batch draws its own masking rate ``r`` and its own order (or, with
``per_sequence=False``, one rate and one order are shared by the micro-batch like the reference).
``num_predict = floor(L * r)``, clamped to ``[1, L - min_prompt]``.

``joint`` (every released model)
    ``n_prompt = L - num_predict``; the order is ``asarm.orders.any_subset`` (2^N: a random prompt
    subset, the rest left to right) or ``any_permutation`` (N!); the oracle mask
    ``asarm.masks.perm_mask(sigma, n_prompt)``; every non-prompt position is a target (teacher
    forcing). With ``reduction="sum"`` the loss of a sequence is exactly
    ``-log p(x_{sigma >= m} | x_{sigma < m})`` = ``-ASARM.score(tokens, sigma, n_prompt)``.

``parallel``
    ``num_visible = L - num_predict``; a prompt of ``n_prompt ~ Uniform{min_prompt .. num_visible}``
    positions, ranks ``n_prompt .. num_visible - 1`` are "already decoded" context, and the last
    ``num_predict`` ranks are all predicted at once, each seeing only ranks ``< num_visible`` (the draft
    mask). ``prompt_attn`` sets how the visible part attends:

    * ``"prompt_only"`` (default): only the prompt is bidirectional; decoded-context tokens see the
      lower ranks (prompt + earlier decoded), i.e. exactly
      ``asarm.masks.draft_perm_mask(sigma, n_prompt, num_visible)`` = the draft pass of ASSD at step
      ``n = num_visible``. This is the variant that matches inference (spec section 5). Note the
      name: it is the *bidirectional block* that is "prompt only"; decoded tokens are not restricted
      to seeing the prompt.
    * ``"prompt_and_decoded"`` (the reference's default): prompt and decoded context form one
      bidirectional block (``perm_mask(sigma, num_visible, num_visible)``). At inference decoded
      tokens are causal, so this trains on a context encoding that sampling never produces.
    * ``"causal"``: no bidirectional block (``perm_mask(sigma, 0, num_visible)``).

Mixture (``mixture``, e.g. ``{"joint": 0.7, "parallel": 0.3}``): each sequence draws its objective
with these probabilities (weights are normalised), from the same generator as its rate and order, so a
resumed run draws the same. Both objectives predict the ranks ``L - num_predict .. L - 1``; a joint row
is the parallel mask with no draft limit (``n_visible = L``, the oracle mask). A mixture with a single
non-zero weight draws nothing and is exactly that objective. With ``per_sequence=False`` the micro-batch
shares one drawn objective, like its rate and order.

Slot weights (``slot_weights``, parallel rows only): the target at draft slot ``i`` (the ``i``-th
predicted rank after the visible part, from 0) has loss weight ``slot_weights[i]``; slots past the list
take its last entry. They multiply the loss scale below; the ``"mean"`` reduction still divides by the
number of targets, so the weights set the slots' relative importance and their overall level.

Loss: cross-entropy on the target rows, with the ``<mask>`` logit removed (``exclude_mask_logit``,
as in ``ASARM.log_probs``: the samplers never draw it). Per-sequence scale ``loss_scale``: ``"none"``,
``"masking_rate"`` (times ``r``) or ``"snr"`` (divided by the signal-to-noise ratio ``(1 - r) / r``,
i.e. times ``r / (1 - r)``, as in the reference). ``reduction="sum"``: the weighted sum over a
sequence's targets averaged over sequences (the joint negative log-likelihood per sequence, the
paper's objective); ``"mean"``: the weighted sum divided by the number of targets in the micro-batch
(per-token mean, the reference's default, a reweighting of the former).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .. import masks, orders
from ..model import ASARM

__all__ = ["OBJECTIVES", "ORDERS", "PROMPT_ATTN", "LOSS_SCALES", "REDUCTIONS", "ObjectiveConfig", "ObjectiveBatch",
           "mixture_probabilities", "check_slot_weights", "num_predict_for_rates", "build_objective_batch",
           "loss_from_logits", "compute_loss"]

OBJECTIVES = ("joint", "parallel")
ORDERS = ("any_subset", "any_permutation")
PROMPT_ATTN = ("prompt_only", "prompt_and_decoded", "causal")
LOSS_SCALES = ("none", "masking_rate", "snr")
REDUCTIONS = ("sum", "mean")


@dataclass
class ObjectiveConfig:
    """What :func:`build_objective_batch` and :func:`compute_loss` do (module doc).

    ``min_masking_rate`` / ``max_masking_rate`` are used only when no ``rates`` are passed
    (normally the trainer passes rates from ``MaskingRateSchedule.sample``).
    """

    objective: str = "joint"
    order: str = "any_subset"
    prompt_attn: str = "prompt_only"
    loss_scale: str = "none"
    reduction: str = "sum"
    per_sequence: bool = True
    min_masking_rate: float = 0.90
    max_masking_rate: float = 0.99
    min_prompt: int = 1
    exclude_mask_logit: bool = True
    mask_token_id: int = 6  # used when the model does not say (ASARM.mask_token_id wins)
    mixture: dict[str, float] | None = None  # objective -> weight; when given it replaces `objective`
    slot_weights: tuple[float, ...] = ()  # parallel loss weight per draft slot (module doc); () = all 1

    def __post_init__(self):
        for name, allowed in (("objective", OBJECTIVES), ("order", ORDERS), ("prompt_attn", PROMPT_ATTN),
                              ("loss_scale", LOSS_SCALES), ("reduction", REDUCTIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0.0 < self.min_masking_rate <= self.max_masking_rate < 1.0:
            raise ValueError(f"need 0 < min_masking_rate <= max_masking_rate < 1, got {self.min_masking_rate}, "
                             f"{self.max_masking_rate}")
        if self.min_prompt < 1:
            raise ValueError(f"min_prompt must be >= 1 (XLNet's query stream needs a visible token), "
                             f"got {self.min_prompt}")
        self.slot_weights = check_slot_weights(self.slot_weights, "slot_weights", self.probabilities())

    def probabilities(self) -> dict[str, float]:
        """``{objective: probability}`` of each sequence's objective, in ``OBJECTIVES`` order."""
        if self.mixture is None:
            return {self.objective: 1.0}
        return mixture_probabilities(self.mixture, "mixture")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ObjectiveBatch:
    """Inputs of one training forward pass and what the loss needs.

    ``perm_mask (B, L, L)`` and ``target_mapping (B, K, L)`` in the HF convention; ``targets (B, K)``
    the token ids to predict; ``valid (B, K)`` which rows are real targets (rows past a sequence's
    ``num_predict`` are unused: all-zero ``target_mapping`` rows, position -1, target 0);
    ``weights (B, K)`` = ``valid`` times the sequence's loss scale. ``query_positions (B, K)``: target
    positions in rank order.
    ``n_visible (B,)``: ranks every target sees at most (parallel rows; ``L`` on joint rows of a
    mixture, which the masks read as the oracle mask), or ``None`` when every row is joint.
    ``parallel (B,)``: which rows drew the parallel objective.
    """

    perm_mask: torch.Tensor
    target_mapping: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    valid: torch.Tensor
    query_positions: torch.Tensor
    sigma: torch.Tensor
    n_prompt: torch.Tensor
    n_visible: torch.Tensor | None
    num_predict: torch.Tensor
    rates: torch.Tensor
    scale: torch.Tensor
    parallel: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


def mixture_probabilities(mixture, key: str = "mixture") -> dict[str, float]:
    """The normalised ``{objective: probability}`` of a mixture of weights, in ``OBJECTIVES`` order (so the
    draws do not depend on how the mapping was written). Raises a one-line ValueError naming ``key``."""
    example = "e.g. {joint: 0.7, parallel: 0.3}"
    if not isinstance(mixture, dict) or not mixture:
        raise ValueError(f"{key} must map objective names to weights ({example}), got {mixture!r}")
    unknown = sorted(str(name) for name in mixture if name not in OBJECTIVES)
    if unknown:
        raise ValueError(f"{key}: unknown objective(s) {unknown}; known: {list(OBJECTIVES)}")
    weights = {}
    for name, weight in mixture.items():
        try:
            weights[name] = float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"{key}.{name} must be a number, got {weight!r}") from None
        if not math.isfinite(weights[name]) or weights[name] < 0:
            raise ValueError(f"{key}.{name} must be a finite weight >= 0, got {weight!r}")
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"{key}: the weights are all zero; give at least one objective a positive weight")
    return {name: weights[name] / total for name in OBJECTIVES if name in weights}


def check_slot_weights(slot_weights, key: str = "slot_weights", probabilities: dict | None = None) -> tuple:
    """``slot_weights`` as a tuple of floats, validated (one-line ValueError naming ``key``). With
    ``probabilities`` (of the objectives), weights without any parallel row are refused: they would do nothing."""
    try:
        weights = tuple(float(w) for w in (slot_weights or ()))
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a list of numbers, got {slot_weights!r}") from None
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"{key} must be finite weights >= 0, got {list(weights)}")
    if weights and not any(weights):
        raise ValueError(f"{key}: the weights are all zero, which would switch the parallel loss off")
    if weights and probabilities is not None and probabilities.get("parallel", 0.0) == 0.0:
        raise ValueError(f"{key} weighs the parallel objective's draft slots, but no sequence uses that objective")
    return weights


def num_predict_for_rates(rates: torch.Tensor, seq_len: int, min_prompt: int = 1) -> torch.Tensor:
    """``floor(seq_len * rate)`` per row (with the same 1e-9 guard as ``orders.num_prompt_for_rate``),
    clamped to ``[1, seq_len - min_prompt]``."""
    if seq_len < min_prompt + 1:
        raise ValueError(f"sequences of length {seq_len} leave nothing to predict with min_prompt={min_prompt}")
    n = torch.floor(rates.to(torch.float64) * seq_len + 1e-9).long()
    return n.clamp(1, seq_len - min_prompt)


def _rates_for(cfg: ObjectiveConfig, batch_size: int, rates, generator) -> torch.Tensor:
    if rates is None:
        count = batch_size if cfg.per_sequence else 1
        u = torch.rand(count, generator=generator, dtype=torch.float64)
        rates = cfg.min_masking_rate + (cfg.max_masking_rate - cfg.min_masking_rate) * u
    else:
        rates = torch.as_tensor(rates, dtype=torch.float64).detach().cpu().reshape(-1)
        if rates.numel() == 1:
            rates = rates.expand(batch_size if cfg.per_sequence else 1).clone()
        elif rates.numel() != batch_size:
            raise ValueError(f"rates must be a scalar or have {batch_size} entries, got {rates.numel()}")
        elif not cfg.per_sequence:
            rates = rates[:1].clone()  # shared mode: the micro-batch uses the first row's rate
    if ((rates <= 0) | (rates >= 1)).any():
        raise ValueError(f"masking rates must lie in (0, 1), got {rates.tolist()}")
    return rates


def _draw_objectives(probabilities: dict[str, float], draws: int, generator) -> torch.Tensor:
    """``(draws,)`` bool: which rows use the parallel objective. A single objective draws nothing, so
    that a mixture of weights 1 and 0 reproduces that objective's batches (and random stream) exactly."""
    if len(probabilities) == 1 or max(probabilities.values()) == 1.0:
        return torch.full((draws,), probabilities.get("parallel", 0.0) == 1.0)
    names = list(probabilities)
    cumulative = torch.tensor(list(probabilities.values()), dtype=torch.float64).cumsum(0)
    u = torch.rand(draws, generator=generator, dtype=torch.float64)
    # right=True: u at a boundary goes to the next objective, so a zero-weight objective is never drawn;
    # the clamp covers a cumulative sum that rounds to just below 1
    choice = torch.searchsorted(cumulative, u, right=True).clamp(max=len(names) - 1)
    return choice == names.index("parallel") if "parallel" in names else torch.zeros(draws, dtype=torch.bool)


def _slot_weights(cfg: ObjectiveConfig, k: int, parallel: torch.Tensor) -> torch.Tensor | None:
    """``(B, k)`` float32 weights of the draft slots on parallel rows (1 on joint rows), or None."""
    if not cfg.slot_weights:
        return None
    weights = list(cfg.slot_weights[:k]) + [cfg.slot_weights[-1]] * max(0, k - len(cfg.slot_weights))
    per_slot = torch.tensor(weights, dtype=torch.float32, device=parallel.device)
    return torch.where(parallel[:, None], per_slot[None, :], torch.ones((), device=parallel.device))


def build_objective_batch(tokens: torch.Tensor, cfg: ObjectiveConfig, generator: torch.Generator | None = None,
                          rates=None, dtype: torch.dtype = torch.float32) -> ObjectiveBatch:
    """Masks, targets and weights for ``tokens (B, L)`` (full-length packed chunks).

    Randomness (rates when not given, each row's objective in a mixture, prompt sizes, orders) comes
    from ``generator`` (a CPU generator; orders are drawn on the CPU and the masks built on
    ``tokens.device``).
    """
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (B, L), got {tuple(tokens.shape)}")
    batch_size, seq_len = tokens.shape
    device = tokens.device
    rates = _rates_for(cfg, batch_size, rates, generator)
    draws = rates.numel()  # B, or 1 when shared by the micro-batch
    num_predict = num_predict_for_rates(rates, seq_len, cfg.min_prompt)
    order_fn = orders.any_subset if cfg.order == "any_subset" else orders.any_permutation
    probabilities = cfg.probabilities()
    parallel = _draw_objectives(probabilities, draws, generator)

    # both objectives predict the last num_predict ranks: joint rows after a prompt of all the rest,
    # parallel rows after a random prompt plus already decoded context
    first_target = seq_len - num_predict
    n_prompt = first_target.clone()
    if probabilities.get("parallel", 0.0) > 0:  # drawn for every row, so the stream does not depend on the draw
        span = first_target - cfg.min_prompt + 1
        u = torch.rand(draws, generator=generator, dtype=torch.float64)
        drawn = cfg.min_prompt + torch.minimum(torch.floor(u * span).long(), span - 1)
        n_prompt = torch.where(parallel, drawn, n_prompt)
    sigma = order_fn(n_prompt, seq_len, batch_size=draws, generator=generator)

    if draws != batch_size:  # shared rate, objective and order
        expand = lambda t: t.expand(batch_size, *t.shape[1:]).clone()  # noqa: E731
        rates, num_predict, n_prompt, sigma, first_target, parallel = map(
            expand, (rates, num_predict, n_prompt, sigma, first_target, parallel))

    sigma = sigma.to(device)
    n_prompt_d, first_d, parallel_d = n_prompt.to(device), first_target.to(device), parallel.to(device)
    # a joint row is the draft mask without a limit (n_visible = L): the oracle mask
    n_visible = torch.where(parallel_d, first_d, seq_len)
    block = {"prompt_only": n_prompt_d, "prompt_and_decoded": first_d,
             "causal": torch.zeros_like(n_prompt_d)}[cfg.prompt_attn]
    block = torch.where(parallel_d, block, n_prompt_d)
    pm = masks.perm_mask(sigma, block, n_visible, dtype=dtype)

    k = int(num_predict.max())
    steps = torch.arange(k)
    valid = steps[None, :] < num_predict[:, None]
    ranks = first_target[:, None] + torch.minimum(steps[None, :], (num_predict - 1)[:, None])
    positions = orders.positions_by_rank(sigma).gather(1, ranks.to(device))
    # Unused slots get position -1 = an all-zero target_mapping row. They must not repeat a real
    # position: XLNet sums the query heads of rows that share a position, corrupting both.
    valid_d = valid.to(device)
    positions = torch.where(valid_d, positions, -1)
    tm = masks.target_mapping(positions, seq_len, dtype=dtype)
    targets = torch.where(valid_d, tokens.gather(1, positions.clamp(min=0)), 0)

    if cfg.loss_scale == "none":
        scale = torch.ones_like(rates)
    elif cfg.loss_scale == "masking_rate":
        scale = rates.clone()
    else:  # divide by the signal-to-noise ratio (1 - r) / r
        scale = rates / (1.0 - rates)
    weights = valid_d.to(torch.float32) * scale.to(device=device, dtype=torch.float32)[:, None]
    slot = _slot_weights(cfg, k, parallel_d)
    if slot is not None:
        weights = weights * slot
    return ObjectiveBatch(perm_mask=pm, target_mapping=tm, targets=targets, weights=weights, valid=valid_d,
                          query_positions=positions, sigma=sigma, n_prompt=n_prompt_d,
                          n_visible=n_visible if bool(parallel.any()) else None,
                          num_predict=num_predict.to(device), rates=rates.to(device), scale=scale.to(device),
                          parallel=parallel_d)


def loss_from_logits(logits: torch.Tensor, batch: ObjectiveBatch, cfg: ObjectiveConfig,
                     mask_token_id: int | None = None) -> tuple[torch.Tensor, dict]:
    """The loss of ``logits (B, K, V)`` (the query rows of ``batch``) and detached statistics.

    Statistics are tensors (no device sync): ``nll_per_sequence (B,)`` (unscaled, summed over real
    targets), ``nll_per_token``, ``accuracy``, ``num_targets``, ``mean_masking_rate``.
    """
    if logits.shape[:2] != batch.targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match targets {tuple(batch.targets.shape)}")
    batch_size, k, vocab = logits.shape
    logits = logits.float()
    mask_id = cfg.mask_token_id if mask_token_id is None else mask_token_id
    if cfg.exclude_mask_logit:
        if bool((batch.valid & (batch.targets == mask_id)).any()):
            raise ValueError(f"a target is the <mask> token (id {mask_id}), which has probability 0 once its logit "
                             f"is excluded; the data must not contain it (escape literal '<mask>' text)")
        drop = torch.zeros(vocab, dtype=torch.bool, device=logits.device)
        drop[mask_id] = True
        logits = logits.masked_fill(drop, float("-inf"))
    nll = F.cross_entropy(logits.reshape(-1, vocab), batch.targets.reshape(-1), reduction="none").view(batch_size, k)
    nll = torch.where(batch.valid, nll, torch.zeros((), dtype=nll.dtype, device=nll.device))
    weighted = (nll * batch.weights).sum()
    num_targets = batch.valid.sum()
    if cfg.reduction == "sum":
        loss = weighted / batch_size
    else:
        loss = weighted / num_targets.clamp(min=1)
    with torch.no_grad():
        nll_seq = nll.detach().sum(dim=1)
        correct = ((logits.detach().argmax(dim=-1) == batch.targets) & batch.valid).sum()
        stats = {
            "loss": loss.detach(),
            "nll_per_sequence": nll_seq,
            "nll_per_token": nll_seq.sum() / num_targets.clamp(min=1),
            "accuracy": correct / num_targets.clamp(min=1),
            "num_targets": num_targets,
            "mean_masking_rate": batch.rates.float().mean(),
            "parallel_fraction": batch.parallel.float().mean() if batch.parallel is not None
            else torch.zeros((), device=logits.device),
        }
    return loss, stats


def _backbone(model):
    """The module to call with the backbone signature (asarm.backbones.base): ``ASARM.backbone``, or the module
    itself (a backbone, possibly wrapped in DDP or compiled); and the ``<mask>`` id when known."""
    if isinstance(model, ASARM):
        return model.backbone, int(model.mask_token_id)
    return model, None


def compute_loss(model, batch_tokens: torch.Tensor, objective_cfg: ObjectiveConfig,
                 generator: torch.Generator | None = None, rates=None) -> tuple[torch.Tensor, dict]:
    """Build the objective's masks for ``batch_tokens (B, L)``, run the backbone's two-stream forward with
    ``perm_mask`` and ``target_mapping``, return ``(loss, stats)``.

    ``model``: an ``asarm.model.ASARM`` or a backbone (DDP-wrapped or compiled is fine). The module's
    train/eval mode is left as it is. ``rates``: per-sequence masking rates (e.g. from
    ``MaskingRateSchedule.sample``), else drawn from the config's range. ``stats["batch"]`` is the
    :class:`ObjectiveBatch` used.
    """
    net, mask_id = _backbone(model)
    try:
        param = next(net.parameters())
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        tokens = batch_tokens.to(param.device)
    except StopIteration:  # pragma: no cover - a parameterless module
        dtype, tokens = torch.float32, batch_tokens
    batch = build_objective_batch(tokens, objective_cfg, generator=generator, rates=rates, dtype=dtype)
    logits = net(input_ids=tokens, perm_mask=batch.perm_mask, target_mapping=batch.target_mapping)
    loss, stats = loss_from_logits(logits, batch, objective_cfg, mask_id)
    stats["batch"] = batch
    return loss, stats

