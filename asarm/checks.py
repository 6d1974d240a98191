"""One-line checks of settings, run before anything is built or loaded: an error names the setting with its value
and what it must be (``model.n_layer=0 must be an integer >= 1``), as a ValueError the command line prints as one line.

``name`` is the setting as the user wrote it (``model.d_model`` in a training config, ``d_model`` in Python).
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable

__all__ = ["check_integer", "check_number", "check_choice"]


def check_integer(name: str, value, minimum: int, maximum: int | None = None, *, or_none: bool = False) -> None:
    """``value`` is an integer in ``minimum .. maximum`` (None: no upper bound); ``or_none``: None is allowed too."""
    if or_none and value is None:
        return
    if (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
            and (maximum is None or value <= maximum)):
        return
    bound = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
    raise ValueError(f"{name}={value!r} must be an integer {bound}{' or null' if or_none else ''}")


def check_number(name: str, value, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False, or_none: bool = False) -> None:
    """``value`` is a finite number between ``low`` and ``high`` (None: unbounded; ``*_open``: the bound itself is
    excluded); ``or_none``: None is allowed too."""
    if or_none and value is None:
        return
    if (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and (low is None or (value > low if low_open else value >= low))
            and (high is None or (value < high if high_open else value <= high))):
        return
    if low is not None and high is not None:
        what = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        what = f"a finite number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        what = f"a finite number {'<' if high_open else '<='} {high:g}"
    else:
        what = "a finite number"
    raise ValueError(f"{name}={value!r} must be {what}{' or null' if or_none else ''}")


def check_choice(name: str, value, choices: Iterable) -> None:
    """``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {', '.join(map(str, choices))}")
