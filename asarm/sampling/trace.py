"""A record of what a decode did, round by round, and two ways to look at it.

``sequential_decode(..., trace=True)`` and ``assd_decode(..., trace=True)`` return a :class:`DecodeTrace`
in ``DecodeOutput.trace``: for every batch row, the rounds it went through, each with the model calls it
took, the positions it queried, the drafts it verified (token and proposal probability), how many were
accepted, and the tokens it committed with their origin:

* ``prompt``: given;
* ``sequential``: an exact draw from the oracle with no draft involved (sequential decoding, or a
  single-pass call that had no drafts to verify);
* ``draft``: an accepted draft (including an exact first self-draft, accepted by construction);
* ``residual``: drawn from ``normalize(max(0, p - q))`` where a draft was rejected;
* ``bonus``: drawn from the bonus row after every draft of the round was accepted.

Recording reads the sampler's tensors after the fact and draws no random numbers, so a traced decode
returns the same tokens as an untraced one with the same seed (tested). :func:`render_html` writes one
self-contained page (the text coloured by origin, the decode order, a timeline of accepted lengths per
round); :func:`render_text` is the plain-terminal version (``asarm sample --show-rounds``).
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import torch

__all__ = ["ORIGINS", "Round", "DecodeTrace", "TraceRecorder", "render_html", "render_text"]

ORIGINS = ("prompt", "sequential", "draft", "residual", "bonus")
_COLOURS = {"prompt": "#e0e0e0", "sequential": "#cfe3ff", "draft": "#b8f0c0", "residual": "#ffd0c8",
            "bonus": "#ffe9a8"}


@dataclass
class Round:
    """One round of one row: a sequential step, or a (draft and) verify step of ASSD."""

    calls: int  # model calls since the row's previous round (a drafter call and a verify call: 2)
    queried: list[int]  # positions of the query rows of those calls
    drafts: list[tuple[int, int, float]]  # verified drafts: (position, token, proposal probability)
    accepted: int  # how many of them were accepted
    committed: list[tuple[int, int, str]]  # (position, token, origin) in decode order


@dataclass
class DecodeTrace:
    """Per batch row, its rounds in order; ``origin(b)`` gives each position's origin."""

    rows: list[list[Round]]
    prompt: list[list[int]]  # per row, the prompt positions

    def origin(self, b: int, length: int) -> list[str | None]:
        """Origin of each position of row ``b`` (None: not decoded, e.g. padding or past max_new_tokens)."""
        out: list[str | None] = [None] * length
        for position in self.prompt[b]:
            out[position] = "prompt"
        for round_ in self.rows[b]:
            for position, _, origin in round_.committed:
                out[position] = origin
        return out


class TraceRecorder:
    """Builds a :class:`DecodeTrace` from the samplers' tensors (only when tracing: it syncs the host)."""

    def __init__(self, positions: torch.Tensor, n_prompt: torch.Tensor, nfe: torch.Tensor):
        self.positions, self.nfe = positions, nfe
        B = positions.shape[0]
        self.trace = DecodeTrace(rows=[[] for _ in range(B)],
                                 prompt=[positions[b, :int(n_prompt[b])].tolist() for b in range(B)])
        self.calls_seen = [0] * B
        self.queried: list[list[int]] = [[] for _ in range(B)]

    def query(self, rows: torch.Tensor, ranks: torch.Tensor) -> None:
        """The query ranks of a model call for ``rows`` (-1: unused slot)."""
        for b, row_ranks in zip(rows.tolist(), ranks.tolist()):
            self.queried[b] += [int(self.positions[b, r]) for r in row_ranks if r >= 0]

    def round(self, rows: torch.Tensor, n: torch.Tensor, values: torch.Tensor, fixed: torch.Tensor,
              origins: list[list[str]], drafts: torch.Tensor | None = None, q_x: torch.Tensor | None = None,
              verified: torch.Tensor | None = None, accepted: torch.Tensor | None = None) -> None:
        """A round of ``rows`` that committed ``values[:, :fixed]`` at ranks ``n..`` with those origins,
        after verifying ``drafts[:, :verified]`` (proposal probabilities ``q_x``), ``accepted`` of them."""
        nfe = self.nfe.tolist()
        for i, b in enumerate(rows.tolist()):
            count, start = int(fixed[i]), int(n[i])
            committed = [(int(self.positions[b, start + t]), int(values[i, t]), origins[i][t]) for t in range(count)]
            checked = [] if drafts is None else [(int(self.positions[b, start + t]), int(drafts[i, t]),
                                                   float(q_x[i, t])) for t in range(int(verified[i]))]
            self.trace.rows[b].append(Round(calls=nfe[b] - self.calls_seen[b], queried=self.queried[b],
                                            drafts=checked, accepted=0 if accepted is None else int(accepted[i]),
                                            committed=committed))
            self.calls_seen[b], self.queried[b] = nfe[b], []


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    """Readable text of each token id (SentencePiece's word marker shown as a space)."""
    if tokenizer is None:
        return [f"[{i}]" for i in ids]
    return [piece.replace("\u2581", " ") for piece in tokenizer.convert_ids_to_tokens(ids)]


def _draft_list(round_: Round, tokenizer) -> str:
    """``+'tok'(q=0.31) -'tok'(q=0.02)``: each verified draft, accepted (+) or not (-), with its proposal
    probability (the draft's own token: a rejected one differs from what was committed there)."""
    pieces = _pieces(tokenizer, [token for _, token, _ in round_.drafts])
    return " ".join(f"{'+' if t < round_.accepted else '-'}{piece!r}(q={q:.2g})"
                    for t, (piece, (_, _, q)) in enumerate(zip(pieces, round_.drafts)))


def _span(piece: str, origin: str | None, title: str) -> str:
    css = origin or "none"
    return f'<span class="tok {css}" title="{html.escape(title)}">{html.escape(piece) or "&nbsp;"}</span>'


def render_html(trace: DecodeTrace, tokens: torch.Tensor, tokenizer=None, title: str = "asarm decode") -> str:
    """One self-contained HTML page: per row, the text coloured by origin, the tokens in decode order
    with round boundaries, and a timeline of accepted drafts per round."""
    css = "\n".join(f".{name} {{ background: {colour}; }}" for name, colour in _COLOURS.items())
    legend = " ".join(_span(name, name, name) for name in ORIGINS)
    sections = []
    for b, rounds in enumerate(trace.rows):
        ids = tokens[b].tolist()
        pieces = _pieces(tokenizer, ids)
        origin = trace.origin(b, len(ids))
        where = {position: r for r, round_ in enumerate(rounds) for position, _, _ in round_.committed}
        text = "".join(_span(pieces[p], origin[p], f"position {p}, {origin[p] or 'not decoded'}"
                             + (f", round {where[p] + 1}" if p in where else "")) for p in range(len(ids)))
        order = "".join(
            f'<div class="round"><span class="label" title="{html.escape(_draft_list(round_, tokenizer))}">'
            f'round {r + 1} &middot; {round_.calls} call(s), {round_.accepted}/{len(round_.drafts)} drafts</span>'
            + "".join(_span(pieces[p], o, f"position {p}, {o}") for p, _, o in round_.committed) + "</div>"
            for r, round_ in enumerate(rounds))
        longest = max([round_.accepted for round_ in rounds] + [1])
        bars = "".join(
            f'<div class="bar" style="height:{4 + 60 * round_.accepted / longest:.0f}px" '
            f'title="round {r + 1}: {round_.accepted} of {len(round_.drafts)} drafts accepted"></div>'
            for r, round_ in enumerate(rounds))
        calls = sum(round_.calls for round_ in rounds)
        sections.append(
            f'<section class="row" id="row-{b}"><h2>Row {b}: {len(rounds)} rounds, {calls} model calls</h2>'
            f'<h3>Text</h3><p class="text">{text}</p><h3>Decode order</h3><div class="order">{order}</div>'
            f'<h3>Accepted drafts per round</h3><div class="timeline">{bars}</div></section>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>body {{ font-family: sans-serif; margin: 2em; }} .tok {{ white-space: pre; border-radius: 3px; }}"
            f" .round {{ margin: 2px 0; }} .label {{ color: #666; font-size: small; margin-right: 1em; }}"
            f" .timeline {{ display: flex; align-items: flex-end; gap: 2px; height: 70px; }}"
            f" .bar {{ width: 8px; background: #4a8; }}\n{css}</style></head><body>"
            f'<h1>{html.escape(title)}</h1><p class="legend">{legend}</p>{"".join(sections)}</body></html>\n')


def render_text(trace: DecodeTrace, tokens: torch.Tensor, tokenizer=None) -> str:
    """Plain text, one line per round: the calls, the drafts (+ accepted, - rejected) and what it committed."""
    lines = []
    for b, rounds in enumerate(trace.rows):
        pieces = _pieces(tokenizer, tokens[b].tolist())
        lines.append(f"row {b}: {len(rounds)} rounds, {sum(r.calls for r in rounds)} model calls")
        for r, round_ in enumerate(rounds):
            drafts = _draft_list(round_, tokenizer)
            committed = " ".join(f"{pieces[p]!r}[{o}]" for p, _, o in round_.committed)
            lines.append(f"  round {r + 1} ({round_.calls} call(s)): " + (f"drafts {drafts} -> " if drafts else "")
                         + committed)
    return "\n".join(lines)

