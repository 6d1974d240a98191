"""Where asarm finds public data files (WikiText, ROCStories, HumanEval-infilling, tokenizers, ...) and its
embedded models.

The data directory is, in order: the ``ASARM_DATA_DIR`` environment variable, else ``../shared/data``
next to the repository checkout (this project's development layout), else ``~/.cache/asarm/data``.
Callers that can also load from the Hugging Face Hub do so when a file is missing here.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["data_dir", "data_file", "DataFileNotFoundError", "EMBEDDED_MODELS", "DEFAULT_MODEL"]

_REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODELS = {"asarm-tiny": Path(__file__).parent / "models" / "asarm-tiny"}
DEFAULT_MODEL = "asarm-tiny"


class DataFileNotFoundError(FileNotFoundError):
    """A data file is neither in the data directory nor at the given path."""


def data_dir() -> Path:
    env = os.environ.get("ASARM_DATA_DIR")
    if env:
        return Path(env).expanduser()
    shared = _REPO_ROOT.parent / "shared" / "data"
    if shared.is_dir():
        return shared
    return Path.home() / ".cache" / "asarm" / "data"


def data_file(relative: str | os.PathLike, required: bool = True) -> Path | None:
    """``data_dir() / relative`` if it exists (or ``relative`` itself if that is an existing path).

    With ``required=False`` a missing file gives None (the caller falls back to the Hub);
    otherwise DataFileNotFoundError says where it looked and how to point asarm at the data.
    """
    direct = Path(relative).expanduser()
    if direct.is_absolute() and direct.exists():
        return direct
    candidate = data_dir() / relative
    if candidate.exists():
        return candidate
    if direct.exists():
        return direct
    if required:
        raise DataFileNotFoundError(
            f"data file {str(relative)!r} not found (looked in {data_dir()}); set ASARM_DATA_DIR to the folder "
            f"that holds it or pass the file's path")
    return None
