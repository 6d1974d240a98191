"""A record of what a decode did, round by round, and two ways to look at it.

``sequential_decode(..., trace=True)`` and ``assd_decode(..., trace=True)`` return a :class:`DecodeTrace`
in ``DecodeOutput.trace``: for every batch row, the rounds it went through, each with the model calls it
took, the positions it queried, how many drafts it had, the drafts it verified (token, proposal
probability q and target probability p), how many were accepted, and the tokens it committed with their
origin:

* ``prompt``: given;
* ``sequential``: an exact draw from the oracle with no draft involved (sequential decoding, or a
  single-pass call that had no drafts to verify);
* ``draft``: an accepted draft (including an exact first self-draft, accepted by construction);
* ``residual``: drawn from ``normalize(max(0, p - q))`` where a draft was rejected;
* ``bonus``: drawn from the bonus row after every draft of the round was accepted.

Recording reads the sampler's tensors after the fact and draws no random numbers, so a traced decode
returns the same tokens as an untraced one with the same seed (tested). :func:`render_html` writes one
self-contained page (the sampler and its settings, the text coloured by origin, the decode order with each
rejected draft struck through beside its q and p, a chart of accepted out of drafted per round);
:func:`render_text` is the plain-terminal version (``asarm sample --show-rounds``).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any, Mapping

import torch

__all__ = ["ORIGINS", "Round", "DecodeTrace", "TraceRecorder", "render_html", "render_text"]

ORIGINS = ("prompt", "sequential", "draft", "residual", "bonus")
_COLOURS = {"prompt": "#e0e0e0", "sequential": "#cfe3ff", "draft": "#b8f0c0", "residual": "#ffd0c8",
            "bonus": "#ffe9a8"}
_ACCEPTED, _REJECTED = "#4a8", "#f28b82"  # chart and struck-through drafts; the rejected colour is no origin's


@dataclass
class Round:
    """One round of one row: a sequential step, or a (draft and) verify step of ASSD."""

    calls: int  # model calls since the row's previous round (a drafter call and a verify call: 2)
    queried: list[int]  # positions of the query rows of those calls
    drafts: list[tuple[int, int, float, float]]  # verified drafts: (position, token, proposal q, target p)
    accepted: int  # how many of them were accepted
    committed: list[tuple[int, int, str]]  # (position, token, origin) in decode order
    drafted: int = 0  # drafts the round had; those after a rejection are never verified

    @property
    def rejected(self) -> tuple[int, int, float, float] | None:
        """The draft the round rejected, if any (the first rejection ends the verification)."""
        return self.drafts[self.accepted] if self.accepted < len(self.drafts) else None


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
              p_x: torch.Tensor | None = None, drafted: torch.Tensor | None = None,
              verified: torch.Tensor | None = None, accepted: torch.Tensor | None = None) -> None:
        """A round of ``rows`` that committed ``values[:, :fixed]`` at ranks ``n..`` with those origins,
        after verifying ``drafts[:, :verified]`` of its ``drafted`` (proposal probabilities ``q_x``, target
        probabilities ``p_x``), ``accepted`` of them."""
        nfe = self.nfe.tolist()
        for i, b in enumerate(rows.tolist()):
            count, start = int(fixed[i]), int(n[i])
            committed = [(int(self.positions[b, start + t]), int(values[i, t]), origins[i][t]) for t in range(count)]
            checked = [] if drafts is None else [(int(self.positions[b, start + t]), int(drafts[i, t]),
                                                   float(q_x[i, t]), float(p_x[i, t])) for t in range(int(verified[i]))]
            self.trace.rows[b].append(Round(calls=nfe[b] - self.calls_seen[b], queried=self.queried[b],
                                            drafts=checked, accepted=0 if accepted is None else int(accepted[i]),
                                            committed=committed, drafted=0 if drafted is None else int(drafted[i])))
            self.calls_seen[b], self.queried[b] = nfe[b], []


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    """Readable text of each token id (SentencePiece's word marker shown as a space)."""
    if tokenizer is None:
        return [f"[{i}]" for i in ids]
    return [piece.replace("\u2581", " ") for piece in tokenizer.convert_ids_to_tokens(ids)]


def _qp(q: float, p: float) -> str:
    return f"q={q:.2g}, p={p:.2g}"


def _draft_list(round_: Round, tokenizer) -> str:
    """``+'tok'(q=0.31, p=0.4) -'tok'(q=0.02, p=0.001)``: each verified draft, accepted (+) or not (-), with its
    proposal and target probabilities (the draft's own token: a rejected one differs from what was committed
    there)."""
    pieces = _pieces(tokenizer, [token for _, token, _, _ in round_.drafts])
    return " ".join(f"{'+' if t < round_.accepted else '-'}{piece!r}({_qp(q, p)})"
                    for t, (piece, (_, _, q, p)) in enumerate(zip(pieces, round_.drafts)))


def _accepted_of(round_: Round) -> str:
    return f"{round_.accepted} of {round_.drafted} drafts accepted" if round_.drafted else "no drafts"


def _span(piece: str, origin: str | None, title: str) -> str:
    css = origin or "none"
    return f'<span class="tok {css}" title="{html.escape(title)}">{html.escape(piece) or "&nbsp;"}</span>'


def _struck(piece: str, note: str) -> str:
    """Struck through, with ``note`` beside it unstruck (an inline block is outside its parent's line)."""
    return f'<del class="rejected">{html.escape(piece) or "&nbsp;"}<span class="qp">{html.escape(note)}</span></del>'


def _round_line(r: int, round_: Round, pieces: list[str], tokenizer) -> str:
    """One round of the decode order: what it committed, with its rejected draft struck through where it was
    drafted (just before the residual drawn in its place)."""
    spans = [_span(pieces[p], o, f"position {p}, {o}") for p, _, o in round_.committed]
    if round_.rejected is not None:
        _, token, q, p = round_.rejected
        spans.insert(round_.accepted, _struck(_pieces(tokenizer, [token])[0], _qp(q, p)))
    return (f'<div class="round"><span class="label" title="{html.escape(_draft_list(round_, tokenizer))}">'
            f'round {r + 1} &middot; {round_.calls} call(s) &middot; {_accepted_of(round_)}</span>'
            f'{"".join(spans)}</div>')


# The chart's geometry in pixels: a bar and its pitch, the plot's height and its margins.
_BAR, _PITCH, _PLOT, _LEFT, _TOP, _BOTTOM = 10, 13, 90, 36, 8, 34


def _step(span: int, most: int) -> int:
    """The smallest of 1, 2, 5, 10, 20, 50, ... that marks ``0..span`` with at most ``most`` ticks."""
    step = 1
    while span / step > most:
        step = step * 5 // 2 if str(step)[0] == "2" else step * 2
    return step


def _chart(rounds: list[Round]) -> str:
    """An SVG bar per round on an axis counting drafts: an outline as tall as the drafts it had, filled with
    the accepted ones and the rejected one, so "1 of 2 accepted" and "1 of 1" differ at a glance."""
    top = max([round_.drafted for round_ in rounds] + [1])
    unit, base, right = _PLOT / top, _TOP + _PLOT, _LEFT + 4 + len(rounds) * _PITCH
    parts = [f'<line class="grid" x1="{_LEFT}" y1="{base - n * unit:.1f}" x2="{right}" y2="{base - n * unit:.1f}"/>'
             f'<text x="{_LEFT - 5}" y="{base - n * unit + 3.5:.1f}" text-anchor="end">{n}</text>'
             for n in range(0, top + 1, _step(top, 6))]
    every = _step(len(rounds), max(1, len(rounds) * _PITCH // 26))  # round labels at least 26 px apart
    for r, round_ in enumerate(rounds):
        x, rejected = _LEFT + 4 + r * _PITCH, len(round_.drafts) - round_.accepted
        stack = [("drafted", round_.drafted, 0), ("accepted", round_.accepted, 0), ("rejected", rejected,
                                                                                     round_.accepted)]
        rects = "".join(f'<rect class="{name}" x="{x}" y="{base - (below + count) * unit:.1f}" width="{_BAR}" '
                        f'height="{count * unit:.1f}"/>' for name, count, below in stack if count)
        label = "" if (r + 1) % every and r else \
            f'<text x="{x + _BAR / 2:g}" y="{base + 13}" text-anchor="middle">{r + 1}</text>'
        parts.append(f'<g class="bar"><title>round {r + 1}: {_accepted_of(round_)}'
                     f'{", 1 rejected" if rejected else ""}</title>{rects}{label}</g>')
    axes = (f'<line class="axis" x1="{_LEFT}" y1="{_TOP}" x2="{_LEFT}" y2="{base}"/>'
            f'<line class="axis" x1="{_LEFT}" y1="{base}" x2="{right}" y2="{base}"/>'
            f'<text x="{_LEFT}" y="{base + 28}">round</text>'
            f'<text transform="translate(11 {_TOP + _PLOT / 2:g}) rotate(-90)" text-anchor="middle">drafts</text>')
    key = "".join(f'<span class="swatch {name}"></span>{text}' for name, text in
                  (("accepted", "accepted"), ("rejected", "rejected"), ("drafted", "not verified (after a rejection)")))
    return (f'<div class="timeline"><svg class="chart" width="{right + 4}" height="{base + _BOTTOM}" role="img" '
            f'aria-label="accepted out of drafted, per round">{"".join(parts)}{axes}</svg></div>'
            f'<p class="key">{key}</p>')


def _setting(value: Any) -> str:
    if value is None:
        return "-"  # does not apply to this sampler
    if isinstance(value, Mapping):
        return ", ".join(f"{name}: {_setting(inner)}" for name, inner in value.items()) or "-"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _settings_table(sampler: str, settings: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(name))}</th><td>{html.escape(_setting(value))}</td></tr>"
                   for name, value in [("sampler", sampler), *settings.items()])
    return f'<table class="settings">{rows}</table>'


_STYLE = (
    "body { font-family: sans-serif; margin: 2em; print-color-adjust: exact; -webkit-print-color-adjust: exact; }"
    " .tok { white-space: pre; border-radius: 3px; } .round { margin: 2px 0; }"
    " .label { color: #666; font-size: small; margin-right: 1em; }"
    f" del.rejected {{ background: {_REJECTED}; white-space: pre; border-radius: 3px; margin: 0 3px; }}"
    " del.rejected .qp { display: inline-block; font-size: x-small; margin-left: 3px; }"
    " table.settings { border-collapse: collapse; font-size: small; margin-bottom: 1em; }"
    " table.settings th { text-align: left; padding-right: 1.5em; font-weight: normal; color: #666; }"
    " .timeline { overflow-x: auto; } .chart text { font-size: 10px; fill: #333; }"
    " .chart .axis { stroke: #333; } .chart .grid { stroke: #e4e4e4; }"
    f" rect.drafted {{ fill: #fff; stroke: #999; }} rect.accepted {{ fill: {_ACCEPTED}; }}"
    f" rect.rejected {{ fill: {_REJECTED}; }}"
    " .key { font-size: small; } .swatch { display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 1em;"
    " border: 1px solid #999; vertical-align: middle; }"
    f" .swatch.accepted {{ background: {_ACCEPTED}; }} .swatch.rejected {{ background: {_REJECTED}; }}"
    " .swatch.drafted { background: #fff; }")


def render_html(trace: DecodeTrace, tokens: torch.Tensor, tokenizer=None, *, sampler: str,
                settings: Mapping[str, Any] | None = None) -> str:
    """One self-contained HTML page: the sampler (``DecodeOutput.sampler``) and its ``settings`` (e.g. the
    seed and ``SamplerSpec.settings()``), then per row the text coloured by origin, the tokens in decode order
    with round boundaries and each rejected draft struck through beside its q and p, and a chart of accepted
    out of drafted per round."""
    title = f"asarm decode trace: {sampler}"
    css = "\n".join(f".{name} {{ background: {colour}; }}" for name, colour in _COLOURS.items())
    legend = " ".join(_span(name, name, name) for name in ORIGINS) + " " + _struck(
        "rejected draft", "q: its draft probability, p: the target's")
    sections = []
    for b, rounds in enumerate(trace.rows):
        ids = tokens[b].tolist()
        pieces = _pieces(tokenizer, ids)
        origin = trace.origin(b, len(ids))
        where = {position: r for r, round_ in enumerate(rounds) for position, _, _ in round_.committed}
        text = "".join(_span(pieces[p], origin[p], f"position {p}, {origin[p] or 'not decoded'}"
                             + (f", round {where[p] + 1}" if p in where else "")) for p in range(len(ids)))
        order = "".join(_round_line(r, round_, pieces, tokenizer) for r, round_ in enumerate(rounds))
        calls = sum(round_.calls for round_ in rounds)
        accepted, drafted = sum(round_.accepted for round_ in rounds), sum(round_.drafted for round_ in rounds)
        sections.append(
            f'<section class="row" id="row-{b}"><h2>Row {b}: {len(rounds)} rounds, {calls} model calls, '
            f'{accepted} of {drafted} drafts accepted</h2><h3>Text</h3><p class="text">{text}</p>'
            f'<h3>Decode order</h3><div class="order">{order}</div>'
            f'<h3>Drafts per round: accepted of drafted</h3>{_chart(rounds)}</section>')
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}\n{css}</style></head><body><h1>{html.escape(title)}</h1>"
            f'{_settings_table(sampler, settings or {})}<p class="legend">{legend}</p>{"".join(sections)}'
            "</body></html>\n")


def render_text(trace: DecodeTrace, tokens: torch.Tensor, tokenizer=None) -> str:
    """Plain text, one line per round: the calls, the drafts (+ accepted, - rejected, with q and p) and what it
    committed."""
    lines = []
    for b, rounds in enumerate(trace.rows):
        pieces = _pieces(tokenizer, tokens[b].tolist())
        lines.append(f"row {b}: {len(rounds)} rounds, {sum(r.calls for r in rounds)} model calls")
        for r, round_ in enumerate(rounds):
            drafts = _draft_list(round_, tokenizer)
            committed = " ".join(f"{pieces[p]!r}[{o}]" for p, _, o in round_.committed)
            lines.append(f"  round {r + 1} ({round_.calls} call(s)): "
                         + (f"{_accepted_of(round_)}: {drafts} -> " if drafts else "") + committed)
    return "\n".join(lines)
