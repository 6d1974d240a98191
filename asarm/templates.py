"""Infilling templates: text with blanks (``<mask>`` is one blank token, ``<mask:N>`` is N) as token ids, and
the text of those ids with the blanks shown or filled, spaced as the template is written.

A SentencePiece tokenizer marks a word start with ``▁`` on the word's first piece (a lone ``▁`` piece
where the word has no such piece), and it puts one in front of every stretch of text it is given. So

* text right after a blank is tokenised here without that mark on its first word: tokenised on its
  own, ``"un<mask>able"`` would read "un ... able" and ``"<mask>, he said"`` "... , he said";
* the space before a blank has no token of its own (it belongs to the blank's first piece), so each
  :class:`Blank` records whether the template starts a word there, and :func:`show_completion` decodes
  the filled sequence with the tokenizer keeping that boundary: ``"The cat <mask>"`` filled with the
  piece ``son`` is "The cat son", not "The catson"; ``"cat<mask>"`` filled with ``▁s`` is "cats";
* a lone ``▁`` before a word start or at the end (which the tokenizer never writes: a double or trailing
  space) is dropped from a fill.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Sequence

from .tokenization import WORD_START

__all__ = ["Blank", "Template", "blank_counts", "parse_template", "encode_template", "token_blanks", "show_prompt",
           "show_completion"]

# Anything that looks like a blank tag (``<mask``, then ``:``, a space or ``>``) is parsed, so a
# mistyped tag is an error instead of literal text sent to the model.
_BLANK_TAG = re.compile(r"<mask(?=[\s:>])[^<>]*>")
_BLANK = re.compile(r"<mask(?::(\d+))?>")
_FIRST_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Blank:
    """``length`` blank tokens from position ``start``. ``starts_word``: the template has a space (or the
    text's start) before the blank, so its first token begins a word; else it continues the word before."""

    start: int
    length: int
    starts_word: bool


@dataclass(frozen=True)
class Template:
    """A template's token ids (each blank token is the mask id) and its blanks, in order."""

    ids: list[int]
    blanks: tuple[Blank, ...]


def _blank_count(tag: str) -> int:
    match = _BLANK.fullmatch(tag)
    if match is None or int(match.group(1) or 1) < 1:
        raise ValueError(f"blank tag {tag!r} is not valid: write <mask> or <mask:N> with N >= 1 and no spaces")
    return int(match.group(1) or 1)


def blank_counts(text: str) -> list[int]:
    """The blank tokens of each tag in ``text``, in order, each tag checked (no tokenizer needed: the command line
    checks a template with it before the model loads)."""
    return [_blank_count(tag) for tag in _BLANK_TAG.findall(text)]


def parse_template(tokenizer, text: str, mask_token_id: int) -> Template:
    """The ids and blanks of ``text``; adjacent tags (``<mask><mask>``) are one blank, like ``<mask:2>``."""
    ids: list[int] = []
    blanks: list[Blank] = []
    cursor = 0
    for match in _BLANK_TAG.finditer(text):
        count = _blank_count(match.group(0))
        segment = text[cursor:match.start()]
        if blanks and not segment:
            blanks[-1] = replace(blanks[-1], length=blanks[-1].length + count)
        else:
            ids += _encode_segment(tokenizer, segment, after_blank=bool(blanks))
            blanks.append(Blank(len(ids), count, starts_word=not segment or segment[-1].isspace()))
        ids += [mask_token_id] * count
        cursor = match.end()
    ids += _encode_segment(tokenizer, text[cursor:], after_blank=bool(blanks))
    return Template(ids, tuple(blanks))


def encode_template(tokenizer, text: str, mask_token_id: int) -> list[int]:
    """Token ids of ``text`` where ``<mask>`` is one blank and ``<mask:N>`` is N blanks."""
    return parse_template(tokenizer, text, mask_token_id).ids


def _encode_segment(tokenizer, segment: str, after_blank: bool) -> list[int]:
    """Ids of the template text ``segment``; right after a blank (no space between) its first word
    continues the blank's word."""
    if not segment.strip():
        return []
    if after_blank and not segment[0].isspace():
        word = _FIRST_WORD.match(segment).group(0)
        return _continuation_ids(tokenizer, word) + _encode_segment(tokenizer, segment[len(word):], False)
    return tokenizer(segment, add_special_tokens=False)["input_ids"]


def _continuation_ids(tokenizer, word: str) -> list[int]:
    """Ids of ``word`` (no whitespace) continuing the word before it: the tokenizer's normaliser and model,
    without the word-start mark its pre-tokenizer puts in front of every word."""
    backend = tokenizer.backend_tokenizer
    if backend.normalizer is not None:
        word = backend.normalizer.normalize_str(word)
    return [token.id for token in backend.model.tokenize(word)]


def token_blanks(tokenizer, ids: Sequence[int], hidden: Sequence[bool]) -> tuple[Blank, ...]:
    """One blank per hidden token of a whole text (what ``--masking-rate`` hides), starting a word where
    the hidden token does."""
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    return tuple(Blank(i, 1, piece.startswith(WORD_START))
                 for i, (piece, is_hidden) in enumerate(zip(pieces, hidden)) if is_hidden)


def show_prompt(tokenizer, ids: Sequence[int], blanks: Sequence[Blank], mask_token_id: int) -> str:
    """The text of ``ids`` with each blank token shown as the mask token (``<mask>``), spaced as the blanks
    say: ``"The cat <mask>."``, ``"un<mask>able"``."""
    shown = list(ids)
    for blank in blanks:
        shown[blank.start:blank.start + blank.length] = [mask_token_id] * blank.length
    return show_completion(tokenizer, shown, blanks)


def show_completion(tokenizer, ids: Sequence[int], blanks: Sequence[Blank]) -> str:
    """``tokenizer.decode`` of the whole filled sequence ``ids``, with each blank's word boundary kept (see
    the module docstring); without blanks, exactly ``tokenizer.decode(ids)``."""
    ids = list(ids)
    out: list[int] = []
    cursor = 0
    for blank in blanks:
        end = blank.start + blank.length
        out += ids[cursor:blank.start] + _fill(tokenizer, ids[blank.start:end], blank.starts_word, ids[end:end + 1])
        cursor = end
    return tokenizer.decode(out + ids[cursor:])


def _fill(tokenizer, fill: list[int], starts_word: bool, after: list[int]) -> list[int]:
    """A blank's filled ids beginning (or continuing) a word as the template says, without lone marks that
    come before a word start or the end (``after``: the id after the blank, if any)."""
    mark = _mark_id(tokenizer)
    first = tokenizer.convert_ids_to_tokens(fill[0])
    if starts_word and not first.startswith(WORD_START):
        fill = [mark] + fill
    elif not starts_word and first.startswith(WORD_START):
        fill = _continuation_ids(tokenizer, first[len(WORD_START):]) + fill[1:]
    following = tokenizer.convert_ids_to_tokens(fill[1:] + after) + [WORD_START]  # the end counts as a start
    return [i for i, nxt in zip(fill, following) if not (i == mark and nxt.startswith(WORD_START))]


def _mark_id(tokenizer) -> int:
    mark = tokenizer.backend_tokenizer.token_to_id(WORD_START)
    if mark is None:
        raise ValueError(f"the tokenizer has no lone word-start piece {WORD_START!r}, which infilling templates "
                         "need; use a SentencePiece tokenizer laid out like XLNet's (asarm.tokenization)")
    return mark
