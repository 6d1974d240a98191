"""ROCStories infilling on the Story Cloze 2016 validation set, scored with ROUGE-1/2/L.

A story is the 4 input sentences plus the right ending. Settings (sentence indices 1..5):
"1/5": prompt s1 s2, blank s3, suffix s4 s5; "3/5": prompt s1, blank s2-s4, suffix s5.
Sentences inside a part are joined by single spaces; parts carry no leading or trailing space, so
the whole story is ``" ".join([prompt, reference, suffix])``.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from typing import Sequence

from ..inputs import content_suffix, read_text
from ..paths import data_file

__all__ = ["DEFAULT_FILE", "SETTINGS", "ROUGE_TYPES", "Story", "InfillingItem", "load_stories", "make_items",
           "load_infilling", "RougeReport", "rouge_scores"]

DEFAULT_FILE = "rocstories/cloze_test_val__spring2016.csv"
SETTINGS = {"1/5": (2, 3), "3/5": (1, 4)}  # setting -> (first blank sentence, end of blank), 0-based
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_COLUMNS = ["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
            "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding"]


@dataclass(frozen=True)
class Story:
    story_id: str
    sentences: tuple[str, ...]  # the 5 sentences, the right ending last


@dataclass(frozen=True)
class InfillingItem:
    prompt: str
    reference: str  # the blank's true text
    suffix: str
    story_id: str


def load_stories(path: str | os.PathLike | None = None, limit: int | None = None) -> list[Story]:
    """Stories from the Story Cloze CSV (or a .tsv with the same columns), in file order."""
    file = data_file(path if path is not None else DEFAULT_FILE)
    with io.StringIO(read_text(file).removeprefix("\ufeff"), newline="") as f:  # spreadsheets write a BOM
        reader = csv.DictReader(f, delimiter="\t" if content_suffix(file) == ".tsv" else ",")
        missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{file} lacks the Story Cloze column(s) {missing}")
        stories = []
        for row in reader:
            answer = row["AnswerRightEnding"].strip()
            if answer not in ("1", "2"):
                raise ValueError(f"story {row['InputStoryid']}: AnswerRightEnding must be 1 or 2, got {answer!r}")
            sentences = [row[f"InputSentence{i}"] for i in range(1, 5)] + [row[f"RandomFifthSentenceQuiz{answer}"]]
            stories.append(Story(row["InputStoryid"], tuple(s.strip() for s in sentences)))
    return stories[:limit]


def make_items(stories: Sequence[Story], setting: str) -> list[InfillingItem]:
    """One infilling item per story for a setting ("1/5" or "3/5")."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown ROCStories setting {setting!r}; choose one of {sorted(SETTINGS)}")
    start, end = SETTINGS[setting]
    return [InfillingItem(" ".join(s.sentences[:start]), " ".join(s.sentences[start:end]),
                          " ".join(s.sentences[end:]), s.story_id) for s in stories]


def load_infilling(setting: str, path: str | os.PathLike | None = None,
                   limit: int | None = None) -> list[InfillingItem]:
    """``make_items(load_stories(path, limit), setting)``."""
    return make_items(load_stories(path, limit), setting)


@dataclass
class RougeReport:
    per_item: list[dict[str, float]]  # {"rouge1", "rouge2", "rougeL"}: F-measure x 100
    mean: dict[str, float]


def rouge_scores(predictions: Sequence[str], references: Sequence[str]) -> RougeReport:
    """ROUGE-1/2/L F-measure x 100 (rouge-score, Porter stemmer) per pair and their means.

    To pool several trials, pass every trial's predictions with the references repeated.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    from rouge_score import rouge_scorer  # lazy: imports nltk and scipy (seconds); the CLI imports this module

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    per_item = []
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(reference, prediction)  # (target, prediction)
        per_item.append({t: 100.0 * scores[t].fmeasure for t in ROUGE_TYPES})
    mean = {t: sum(s[t] for s in per_item) / len(per_item) for t in ROUGE_TYPES}
    return RougeReport(per_item, mean)
