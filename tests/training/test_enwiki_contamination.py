"""The enwiki-2015-sample training text (issue 24) is not contaminated with the benchmark text.

WikiText-2 raw test (``wikitext-2-raw/wiki.test.raw``) scores asarm-tiny; the new asarm-tiny trains on the
50 MB Wikipedia sample ``enwiki-2015-sample/part-0*.txt``. The two must share no 12-word passage and no
article title may equal a test heading. Words are compared spelling-blind: a word is a maximal run of
letters and digits, lower-cased, so WikiText's ``guest @-@ starring``, ``1 @,@ 000`` and ``Boulter 's``
match the plain ``guest-starring``, ``1,000`` and ``Boulter's``; passages run across line ends (the
trainer packs consecutive lines into one chunk). The model trains on the WikiText re-spelling of the
sample (scripts/wikitext_format.py), which adds spaces and ``@x@`` marks only: the last test checks that
it keeps every line's words, so the check on the sample covers the re-spelt copy too.

Skipped, with the reason, when the data directory does not hold the files (asarm.paths.data_dir).
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from asarm.paths import data_file

N = 12  # passage length in words
_WORD = re.compile(r"[^\W_]+")
_HEADING = re.compile(r"^ = ([^=].*?) = $", re.MULTILINE)  # a top-level (article) heading only
PARTS = [f"enwiki-2015-sample/part-0{i}.txt" for i in range(5)]
# The one 12-word run the sample shares with the test text: a court's name, twelve words long
# ("... ruled"), once in part-01 and once in part-03, in sentences otherwise unlike the test's. It is a
# name, not a copied passage (the data README's check, on words with their punctuation, did not count
# it). Every other shared run fails the test.
KNOWN_NAMES = {tuple("the united states district court for the southern district of new york".split())}
TEST = "wikitext-2-raw/wiki.test.raw"


def _need(relative: str) -> Path:
    path = data_file(relative, required=False)
    if path is None:
        pytest.skip(f"{relative} is not in the data directory (set ASARM_DATA_DIR to the folder that holds it)")
    return path


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def shingles(ws: list[str], n: int = N) -> set[tuple[str, ...]]:
    return set(zip(*(ws[k:] for k in range(n))))


def shared_passages(wikitext_shingles: set, text: str, n: int = N) -> list[tuple[str, ...]]:
    """The n-word passages of ``text`` that are in ``wikitext_shingles``."""
    ws = words(text)
    return sorted(wikitext_shingles.intersection(zip(*(ws[k:] for k in range(n)))))


def titles(text: str) -> set[tuple[str, ...]]:
    return {tuple(words(t)) for t in _HEADING.findall(text)}


@pytest.fixture(scope="module")
def wikitext_test() -> str:
    return _need(TEST).read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def wikitext_shingles(wikitext_test) -> set:
    return shingles(words(wikitext_test))


def test_detector_flags_a_planted_passage_and_title(wikitext_shingles, wikitext_test):
    """Negative control: the check fails on text that does hold a test passage or a test title."""
    train = _need(PARTS[0]).read_text(encoding="utf-8")[:200_000]
    assert shared_passages(wikitext_shingles, train) == []
    # a 12-word test passage, re-spelt as plain text (WikiText's "@-@" and split punctuation undone)
    line = next(ln for ln in wikitext_test.splitlines() if "@-@" in ln and len(words(ln)) > 40)
    plain = re.sub(r" @(.)@ ", r"\1", line).replace(" ,", ",").replace(" .", ".").replace(" 's", "'s")
    ws = words(plain)
    planted = " ".join(ws[10:10 + N])
    contaminated = train[:100_000] + "\n" + planted + " and more.\n" + train[100_000:]
    hits = shared_passages(wikitext_shingles, contaminated)
    assert hits and tuple(ws[10:10 + N]) in hits
    # one word fewer is not a 12-word passage (the planted words sit between unrelated text)
    shorter = train[:100_000] + "\nzzqx " + " ".join(ws[10:10 + N - 1]) + " zzqy\n"
    assert shared_passages(wikitext_shingles, shorter) == []
    test_titles = titles(wikitext_test)
    assert len(test_titles) > 50  # about 60 articles (and a few formula lines that look like headings)
    heading = sorted(test_titles)[0]
    assert titles(contaminated + "\n = " + " ".join(heading).title() + " = \n") & test_titles


def test_training_text_shares_no_passage_and_no_title_with_wikitext2_test(wikitext_shingles, wikitext_test):
    paths = [_need(p) for p in PARTS]
    test_titles = titles(wikitext_test)
    n_titles = 0
    for path in paths:
        text = path.read_text(encoding="utf-8")
        hits = [h for h in shared_passages(wikitext_shingles, text) if h not in KNOWN_NAMES]
        assert not hits, f"{path.name} shares 12-word passages with {TEST}: {[' '.join(h) for h in hits]}"
        part_titles = titles(text)
        n_titles += len(part_titles)
        same = part_titles & test_titles
        assert not same, f"{path.name} has articles titled as test headings: {sorted(same)}"
    assert n_titles >= 2800  # about 2,809 articles: the headings were found


def test_wikitext_respelling_keeps_the_words():
    """scripts/wikitext_format.py (the training copy) adds spaces and @x@ marks, nothing else."""
    script = Path(__file__).resolve().parents[2] / "scripts" / "wikitext_format.py"
    spec = importlib.util.spec_from_file_location("wikitext_format", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.wikitext_line("A self-governed, free (1,000.5) state's plan.") == \
        " A self @-@ governed , free ( 1 @,@ 000 @.@ 5 ) state 's plan . "
    assert module.wikitext_line(" = Storm Ana (2003) = ") == " = Storm Ana ( 2003 ) = "
    lines = _need(PARTS[0]).read_text(encoding="utf-8").splitlines()[:3000]
    for line in lines:
        assert words(module.wikitext_line(line)) == words(line), line
