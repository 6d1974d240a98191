"""Fixtures shared by the training tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from asarm.paths import data_file


@pytest.fixture(scope="module")
def small_text(tmp_path_factory) -> Path:
    """The first 300 lines of WikiText-2 valid (the training text of asarm-tiny), as a file."""
    lines = data_file("wikitext-2/valid.txt").read_text(encoding="utf-8").splitlines(keepends=True)[:300]
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path
