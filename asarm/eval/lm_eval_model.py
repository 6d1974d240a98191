"""An lm-evaluation-harness model for AS-ARMs: ``lm_eval --model asarm --model_args pretrained=asarm-tiny,...``.

Importing this module registers the model as ``"asarm"`` in lm-eval's model registry (lm-eval 0.4.13 has no
plugin discovery for models, so something must import it first). From the command line, run lm-eval's own
CLI through this module, which registers the model and then hands every argument to lm-eval::

    python -m asarm.eval.lm_eval_model --model asarm --model_args pretrained=asarm-tiny,sampler=assd-self,k=5 \\
        --tasks lambada_openai,hellaswag --include_path my_tasks/

From Python: ``import asarm.eval.lm_eval_model`` and then ``lm_eval.simple_evaluate(model="asarm", ...)``, or
pass an instance: ``simple_evaluate(model=ASARMLM(model=my_asarm), ...)``.

The three request types:

- ``loglikelihood``: exact ``log p(continuation | context)`` with the context visible and the continuation's
  tokens decoded left to right (``order=left_to_right``, what lm-eval's tasks assume; ``order=any_permutation``
  draws one seeded random order of the continuation per request). One teacher-forced oracle pass per request
  scores every token, and also decides ``is_greedy`` (greedy decoding in that order reproduces the
  continuation iff every teacher-forced argmax is the true token). Requests are batched, longest first.
- ``loglikelihood_rolling``: the exact left-to-right log-likelihood of the whole text after a ``</s>`` (the
  document separator the trainer packs with). Texts longer than ``max_length`` (default: the model's trained
  length, else 512) are scored in windows of at most ``max_length`` tokens, each keeping at least
  ``rolling_context`` (default ``max_length // 2``) earlier tokens as visible context.
- ``generate_until``: the project's samplers (``asarm.sampling.decode``): ``sampler`` (``sequential``,
  ``assd-self``, ``assd-fused``, ``assd-auto``, ... or ``greedy``), ``k``, ``temperature``, ``seed``, ``max_gen_toks``,
  ``engine``, set in ``--model_args`` and overridable per task by its ``generation_kwargs``
  (``do_sample: false`` or ``temperature: 0`` mean greedy). The output stops at ``</s>`` and is cut at the
  first stop sequence (``until``). Each row's seed depends only on ``seed`` and its context text, so a
  request's output does not depend on the batch it lands in (except with ``assd-auto``, whose schedule is
  chosen for the batch: its samples follow the same distribution in any batch, but not the same draws).

Contexts longer than the window keep their last tokens. Token ids come from ``asarm.tokenization.encode_text``
(the context and the continuation tokenised apart; trailing spaces of the context move to the continuation).
"""

from __future__ import annotations

import logging
import sys
import zlib
from typing import Any, Iterable, Sequence

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("asarm.eval.lm_eval_model needs lm-eval: pip install 'lm-eval>=0.4.13,<0.5'") from err

from ..model import ASARM, DEFAULT_MODEL
from ..resources import pick_device, set_threads
from ..orders import positions_by_rank, positions_of_ranks
from ..sampling.engine import DEFAULT_ENGINE
from ..tokenization import decode_text, encode_text
from .likelihood import ORDER_FAMILIES, order_for
from ..sampling import SAMPLERS, decode
from ..seeds import row_seeds

__all__ = ["ASARMLM", "DEFAULT_MAX_LENGTH", "main"]

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 512  # window for a model whose trained length is unknown
Row = tuple[list[int], list[int]]  # (visible context ids, target ids), at most max_length in all


def _as_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class ASARMLM(LM):
    """lm-eval's ``LM`` interface over an :class:`~asarm.model.ASARM` (registered as ``"asarm"``).

    Args (all settable in ``--model_args``):
        pretrained: local directory, embedded model (``asarm-tiny``) or Hub name; ``revision`` for the Hub.
        model: an already loaded ASARM instead of ``pretrained`` (Python use).
        device, dtype (``float32``, ``bfloat16``, ...), threads: where and how to run.
        batch_size: rows per forward pass (``auto`` means 16). max_length: tokens per row.
        order: ``left_to_right`` (default) or ``any_permutation`` for the continuation in ``loglikelihood``.
        rolling_context: visible tokens kept from the previous window in ``loglikelihood_rolling``.
        sampler, k, temperature, seed, max_gen_toks, engine: ``generate_until`` defaults.
    """

    def __init__(self, pretrained: str = DEFAULT_MODEL, revision: str | None = None, device: str | None = None,
                 batch_size: int | str = 16, max_batch_size: int | None = None, max_length: int | None = None,
                 order: str = "left_to_right", rolling_context: int | None = None, sampler: str = "sequential",
                 k: int = 5, temperature: float = 1.0, seed: int = 0, max_gen_toks: int = 256,
                 engine: str = DEFAULT_ENGINE, dtype: str | None = None, threads: int | None = None,
                 model: ASARM | None = None, **unused: Any) -> None:
        super().__init__()
        if unused:
            log.warning("asarm: ignoring unknown model_args %s", sorted(unused))
        set_threads(None if threads is None else int(threads))
        if model is None:
            torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            model = ASARM.from_pretrained(str(pretrained), revision=revision, device=device, dtype=torch_dtype)
        elif device is not None:
            model = model.to(pick_device(device))
        if model.tokenizer is None:
            raise ValueError("the model has no tokenizer; save one next to its weights")
        self.model = model
        self.tokenizer = model.tokenizer
        self.batch_size = self._parse_batch_size(batch_size, max_batch_size)
        self.max_length = int(max_length or model.trained_length or DEFAULT_MAX_LENGTH)
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if order not in ORDER_FAMILIES:
            raise ValueError(f"order must be one of {ORDER_FAMILIES}, got {order!r}")
        self.order = order
        self.rolling_context = int(rolling_context) if rolling_context is not None else self.max_length // 2
        if not 1 <= self.rolling_context < self.max_length:
            raise ValueError(f"rolling_context must be in [1, max_length - 1 = {self.max_length - 1}], "
                             f"got {self.rolling_context}")
        self.gen_defaults = {"sampler": sampler, "k": int(k), "temperature": float(temperature), "seed": int(seed),
                             "max_gen_toks": int(max_gen_toks), "engine": engine}
        self._check_sampler(sampler)
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eot_token_id = int(eos) if eos is not None else 2  # XLNet's </s>

    # ------------------------------------------------------------------------------ helpers
    @staticmethod
    def _parse_batch_size(batch_size, max_batch_size) -> int:
        if isinstance(batch_size, str) and batch_size.strip().lower().startswith("auto"):
            size = int(max_batch_size) if max_batch_size else 16
        else:
            size = int(batch_size)
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        return size

    @staticmethod
    def _check_sampler(name: str) -> None:
        if name != "greedy" and name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; choose from greedy, {', '.join(SAMPLERS)}")

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "asarm")).replace("/", "__")

    def tok_encode(self, text: str) -> list[int]:
        return encode_text(text, self.tokenizer)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return decode_text(ids, self.tokenizer)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """``(context_ids, continuation_ids)``, tokenised apart, the context's trailing spaces moved to the
        continuation (as lm-eval's HF model does); an empty context becomes ``[</s>]``."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        return self.tok_encode(context) or [self.eot_token_id], self.tok_encode(continuation)

    def windows(self, context: Sequence[int], targets: Sequence[int]) -> list[Row]:
        """Rows of at most ``max_length`` tokens whose targets, in order, are ``targets``: each row sees the
        tokens just before its targets, as many as fit (at least ``rolling_context`` when there are that
        many), and the first row takes as many targets as the window allows after that context."""
        if not context:
            raise ValueError("the context needs at least one token (XLNet's query stream needs one)")
        full, pos, rows = list(context) + list(targets), len(context), []
        while pos < len(full):
            rest = len(full) - pos
            ctx_len = min(pos, max(self.rolling_context, self.max_length - rest), self.max_length - 1)
            n = min(rest, self.max_length - ctx_len)
            rows.append((full[pos - ctx_len:pos], full[pos:pos + n]))
            pos += n
        return rows

    @torch.no_grad()
    def score_rows(self, rows: Sequence[Row], seeds: Sequence[int] | None = None) -> list[tuple[float, bool]]:
        """``(log p(targets | context), greedy reproduces targets)`` per row, one oracle pass per batch; the
        targets in ``self.order`` (``seeds``: one per row, for ``any_permutation``)."""
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        by_length = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
        for start in range(0, len(by_length), self.batch_size):
            chunk = by_length[start:start + self.batch_size]
            n_context = torch.tensor([len(rows[i][0]) for i in chunk])
            lengths = torch.tensor([len(rows[i][0]) + len(rows[i][1]) for i in chunk])
            tokens = torch.full((len(chunk), int(lengths.max())), self.model.mask_token_id, dtype=torch.long)
            for r, i in enumerate(chunk):
                tokens[r, :lengths[r]] = torch.tensor(rows[i][0] + rows[i][1])
            visible = torch.arange(tokens.shape[1])[None, :] < n_context[:, None]
            if self.order == "left_to_right":
                sigma, n_prompt = order_for(visible, "left_to_right", lengths)
            else:  # one random order per row, from the row's own seed
                parts = [order_for(visible[r:r + 1], self.order, lengths[r:r + 1],
                                   torch.Generator().manual_seed(int(seeds[i]) if seeds is not None else i))
                         for r, i in enumerate(chunk)]
                sigma, n_prompt = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            num_targets = lengths - n_prompt
            slots = torch.arange(int(num_targets.max()))
            valid = slots[None, :] < num_targets[:, None]
            ranks = torch.where(valid, n_prompt[:, None] + slots, -1)
            positions = positions_of_ranks(positions_by_rank(sigma), ranks)  # -1: unused query slot
            logp = self.model.log_probs(tokens, sigma, n_prompt, positions).cpu()
            truth = tokens.gather(1, positions.clamp(min=0))
            picked = logp.gather(2, truth[..., None]).squeeze(-1)
            greedy = (logp.argmax(-1) == truth) | ~valid
            for r, i in enumerate(chunk):
                results[i] = (float(picked[r][valid[r]].sum()), bool(greedy[r].all()))
        return results  # type: ignore[return-value]

    def _score_requests(self, requests: list[tuple[list[int], list[int]]], disable_tqdm: bool
                        ) -> list[tuple[float, bool]]:
        """Sum over each request's windows; an empty continuation scores ``(0.0, True)``."""
        rows, owner = [], []
        for j, (context, targets) in enumerate(requests):
            for row in self.windows(context, targets):
                rows.append(row)
                owner.append(j)
        seeds = [zlib.crc32(repr(row).encode()) for row in rows]
        totals = [[0.0, True] for _ in requests]
        for j, (ll, greedy) in zip(owner, self.score_rows(rows, seeds)):
            totals[j][0] += ll
            totals[j][1] = totals[j][1] and greedy
        return [(float(ll), bool(greedy)) for ll, greedy in totals]

    # ---------------------------------------------------------------------------- lm-eval API
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._score_requests([self.encode_pair(*req.args) for req in requests], disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs = [([self.eot_token_id], self.tok_encode(req.args[0])) for req in requests]
        return [ll for ll, _ in self._score_requests(pairs, disable_tqdm)]

    def _gen_settings(self, kwargs: dict) -> dict:
        kwargs = dict(kwargs or {})
        until = kwargs.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        settings = dict(self.gen_defaults)
        for key in ("sampler", "engine"):
            if key in kwargs:
                settings[key] = str(kwargs.pop(key))
        for key in ("k", "seed", "max_gen_toks"):
            if key in kwargs:
                settings[key] = int(kwargs.pop(key))
        if "temperature" in kwargs:
            settings["temperature"] = float(kwargs.pop("temperature"))
        if "do_sample" in kwargs and not _as_bool(kwargs.pop("do_sample")):
            settings["sampler"] = "greedy"
        if settings["temperature"] <= 0:
            settings["sampler"] = "greedy"
        if kwargs:
            log.warning("asarm: ignoring generation kwargs %s", sorted(kwargs))
        self._check_sampler(settings["sampler"])
        if settings["max_gen_toks"] < 1:
            raise ValueError(f"max_gen_toks must be >= 1, got {settings['max_gen_toks']}")
        settings["max_gen_toks"] = min(settings["max_gen_toks"], self.max_length - 1)
        return {"until": [s for s in until if s], **settings}

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        items = [(req.args[0], self._gen_settings(req.args[1] if len(req.args) > 1 else {})) for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, settings) in enumerate(items):
            key = repr(sorted((k, v) for k, v in settings.items() if k != "until"))
            groups.setdefault(key, []).append(i)
        out: list[str] = [""] * len(items)
        for indices in groups.values():
            settings = items[indices[0]][1]
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                texts = self._generate([items[i][0] for i in chunk], settings)
                for i, text in zip(chunk, texts):
                    out[i] = _cut(text, items[i][1]["until"])
        return out

    @torch.no_grad()
    def _generate(self, contexts: Sequence[str], settings: dict) -> list[str]:
        """Left-to-right continuations of ``max_gen_toks`` tokens (cut at ``</s>``), one row per context."""
        new = settings["max_gen_toks"]
        prompts = [(self.tok_encode(c) or [self.eot_token_id])[-(self.max_length - new):] for c in contexts]
        n_prompt = torch.tensor([len(p) for p in prompts])
        lengths = n_prompt + new
        tokens = torch.full((len(prompts), int(lengths.max())), self.model.mask_token_id, dtype=torch.long)
        for r, p in enumerate(prompts):
            tokens[r, :len(p)] = torch.tensor(p)
        sigma = torch.arange(tokens.shape[1]).expand(len(prompts), -1).clone()
        if settings["sampler"] == "greedy":
            tokens = self._greedy(tokens, sigma, n_prompt, new)
        else:
            spec = SAMPLERS[settings["sampler"]].replace(k=settings["k"], temperature=settings["temperature"])
            seeds = row_seeds(settings["seed"], 0, [zlib.crc32(c.encode("utf-8")) for c in contexts])
            tokens = decode(self.model, spec, tokens, sigma, n_prompt, lengths, seed=seeds,
                            engine=settings["engine"]).tokens.cpu()
        texts = []
        for r in range(len(prompts)):
            ids = tokens[r, int(n_prompt[r]):int(lengths[r])].tolist()
            if self.eot_token_id in ids:
                ids = ids[:ids.index(self.eot_token_id)]
            texts.append(self.tok_decode(ids))
        return texts

    def _greedy(self, tokens: torch.Tensor, sigma: torch.Tensor, n_prompt: torch.Tensor, new: int) -> torch.Tensor:
        """Greedy left-to-right decoding (the argmax without ``<mask>``), one oracle pass per token."""
        rows = torch.arange(len(tokens))
        for step in range(new):
            query = (n_prompt + step)[:, None]
            logp = self.model.log_probs(tokens, sigma, n_prompt + step, query).cpu()
            tokens[rows, query[:, 0]] = logp[:, 0].argmax(-1)
        return tokens


def _cut(text: str, until: Iterable[str]) -> str:
    """``text`` up to the first occurrence of any stop sequence."""
    end = len(text)
    for stop in until:
        found = text.find(stop)
        if found != -1:
            end = min(end, found)
    return text[:end]


def main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's command line with the ``asarm`` model registered (``python -m asarm.eval.lm_eval_model ...``)."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    # Run the importable copy of this module, so the registered class is asarm.eval.lm_eval_model.ASARMLM.
    from asarm.eval.lm_eval_model import main as _main

    _main()
else:
    register_model("asarm")(ASARMLM)
