#!/usr/bin/env python3
"""Re-spell plain Wikipedia text the way WikiText spells it, for training a model that is scored on WikiText.

WikiText (and so WikiText-2 test, the benchmark text) is tokenized: punctuation stands apart
(``film , television``, ``actor . He``, ``( 2003 )``, ``Boulter 's``, ``don 't``), a hyphen, comma or
point inside a word or number is written `` @-@ `` / `` @,@ `` / `` @.@ `` (``guest @-@ starring``,
``1 @,@ 000``, ``1 @.@ 5``), and a paragraph line starts and ends with a space. The enwiki-2015-sample
text has WikiText's headings but plain punctuation, so a model trained on it as it is meets
``▁`` ``,`` and ``@`` ``-`` ``@`` in the benchmark as strings it has never seen. This script writes a
copy in WikiText's spelling (an approximation of its tokenizer: regular expressions, no abbreviation
list), line for line, so that one document a line stays one document a line:

    python scripts/wikitext_format.py ../shared/data/enwiki-2015-sample runs/data/enwiki-2015-sample-wt

The words are unchanged; only spaces and the ``@x@`` marks are added.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

_HEADING = re.compile(r"^ (=+) (.*?) \1 $")
_NUM_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NUM_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_HYPHEN = re.compile(r"(?<=\w)-(?=\w)")
_CLITIC = re.compile(r"(?<=\w)'(s|re|ve|d|ll|m|t)\b", re.IGNORECASE)
_PUNCT = re.compile(r"""([,;:!?()\[\]{}"$%/–—…]|'|\.(?=\s|$|[,;:!?()\[\]{}"'$%/–—…]))""")
_SPACES = re.compile(r"\s+")
# placeholders (characters that never occur in the text) kept out of the punctuation split
_AT_COMMA, _AT_POINT, _AT_HYPHEN, _APOS = "\x01", "\x02", "\x03", "\x04"


def wikitext_words(text: str) -> str:
    """``text`` (one line, no newline) with WikiText's spacing and ``@x@`` marks, no outer spaces."""
    text = _NUM_COMMA.sub(_AT_COMMA, text)
    text = _NUM_POINT.sub(_AT_POINT, text)
    text = _HYPHEN.sub(_AT_HYPHEN, text)
    text = _CLITIC.sub(lambda m: " " + _APOS + m.group(1), text)
    text = _PUNCT.sub(r" \1 ", text)
    text = (text.replace(_AT_COMMA, " @,@ ").replace(_AT_POINT, " @.@ ").replace(_AT_HYPHEN, " @-@ ")
            .replace(_APOS, "'"))
    return _SPACES.sub(" ", text).strip()


def wikitext_line(line: str) -> str:
    """One line of text (no newline) in WikiText's layout: headings `` = T = `` keep their marks with the
    title re-spelt, blank lines stay blank, a paragraph becomes `` words `` (a space at each end)."""
    if not line.strip():
        return line.strip()
    m = _HEADING.match(line)
    if m:
        return f" {m.group(1)} {wikitext_words(m.group(2))} {m.group(1)} "
    return f" {wikitext_words(line)} "


def convert_file(src: Path, dst: Path) -> int:
    n = 0
    with open(src, encoding="utf-8", newline="") as f, open(dst, "w", encoding="utf-8", newline="") as g:
        for line in f:
            g.write(wikitext_line(line.rstrip("\n")) + "\n")
            n += 1
    return n


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="a folder of .txt files (or one file)")
    ap.add_argument("dst", help="the output folder (created)")
    args = ap.parse_args(argv)
    src = Path(args.src)
    files = sorted(src.glob("*.txt")) if src.is_dir() else [src]
    if not files:
        print(f"no .txt file in {src}", file=sys.stderr)
        return 2
    out = Path(args.dst)
    out.mkdir(parents=True, exist_ok=True)
    for path in files:
        n = convert_file(path, out / path.name)
        print(f"{path} -> {out / path.name}: {n} lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
