"""Sample diversity (unigram entropy) and paired comparisons between samplers.

Unigram entropy, as the paper reports it: for ONE decoded sequence, the entropy of the empirical
distribution of its GPT-2 token ids, ``-sum_t p_t log2 p_t`` in bits, then averaged over sequences.
The paper's ~7.65 is in bits: the reference code uses log2, and in nats a 512-token sequence could
not exceed ln 512 = 6.24. Hence ``unit="bits"`` by default; ``unit="nats"`` gives natural logs.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Hashable, Iterable, Sequence

import numpy as np

__all__ = ["unigram_entropy", "Summary", "summarize", "PairedComparison", "paired_comparison", "geometric_summary",
           "paired_ratio", "significance", "ALPHA"]

ALPHA = 0.05  # two-sided significance level of every verdict below (and of the 95% intervals)


def unigram_entropy(tokens: Iterable[Hashable], unit: str = "bits") -> float:
    """Entropy of the empirical unigram distribution of ``tokens`` in "bits" (log2) or "nats" (ln)."""
    if unit not in ("bits", "nats"):
        raise ValueError(f"unit must be 'bits' or 'nats', got {unit!r}")
    counts = Counter(tokens)
    n = sum(counts.values())
    if n == 0:
        raise ValueError("entropy of an empty token sequence is undefined")
    log = math.log2 if unit == "bits" else math.log
    return -sum(c / n * log(c / n) for c in counts.values()) + 0.0  # + 0.0 turns -0.0 into 0.0


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: float              # sample standard deviation (ddof=1); nan when n == 1
    sem: float              # std / sqrt(n)
    ci95: tuple[float, float]  # Student-t 95% interval for the mean


def _as_array(values: Iterable[float], name: str) -> np.ndarray:
    array = np.asarray(list(values), dtype=float)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains non-finite values")
    return array


def _summary(x: np.ndarray) -> Summary:
    n, mean = x.size, float(x.mean())
    if n == 1:
        return Summary(1, mean, math.nan, math.nan, (math.nan, math.nan))
    from scipy import stats as sps  # lazy: scipy belongs to the eval extra

    std = float(x.std(ddof=1))
    sem = std / math.sqrt(n)
    half = float(sps.t.ppf(1 - ALPHA / 2, n - 1)) * sem
    return Summary(n, mean, std, sem, (mean - half, mean + half))


def summarize(values: Iterable[float]) -> Summary:
    """Mean, sample std, standard error and t-based 95% CI of the mean."""
    return _summary(_as_array(values, "values"))


@dataclass(frozen=True)
class PairedComparison:
    n: int
    mean_a: float
    mean_b: float
    mean_diff: float               # mean of a - b
    ci95_diff: tuple[float, float]  # Student-t 95% interval for mean_diff
    t_statistic: float             # paired t-test (scipy.stats.ttest_rel)
    t_pvalue: float
    wilcoxon_statistic: float      # Wilcoxon signed-rank (scipy.stats.wilcoxon)
    wilcoxon_pvalue: float


def paired_comparison(a: Sequence[float], b: Sequence[float], zero_method: str = "zsplit") -> PairedComparison:
    """Compare two samplers' per-sample metrics on the same items (a[i] and b[i] from item i).

    Two-sided tests. ``zero_method`` goes to scipy's Wilcoxon test ("zsplit", the reference's
    choice, keeps zero differences). When all differences are equal, the t statistic is nan (all
    zero) or +-inf with p = 0, as scipy gives them.
    """
    x, y = _as_array(a, "a"), _as_array(b, "b")
    if x.size != y.size:
        raise ValueError(f"paired samples need equal lengths, got {x.size} and {y.size}")
    if x.size < 2:
        raise ValueError("paired tests need at least 2 pairs")
    from scipy import stats as sps

    diff = _summary(x - y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero-variance differences: nan, documented
        t = sps.ttest_rel(x, y)
        w = sps.wilcoxon(x, y, zero_method=zero_method)
    return PairedComparison(x.size, float(x.mean()), float(y.mean()), diff.mean, diff.ci95, float(t.statistic),
                            float(t.pvalue), float(w.statistic), float(w.pvalue))


def geometric_summary(values: Iterable[float], name: str = "values") -> dict:
    """Geometric mean of positive values (e.g. seconds, or paired ratios of seconds) with a Student-t 95%
    interval taken on the log scale and mapped back: the interval is always positive. ``ci95`` holds
    None for a single value. ``significant``: the interval excludes 1 (for ratios; a paired t-test of the
    log ratios at ``ALPHA``)."""
    x = _as_array(values, name)
    if (x <= 0).any():
        raise ValueError(f"{name} must be positive for a log-scale interval")
    s = _summary(np.log(x))
    lo, hi = (float(np.exp(v)) if np.isfinite(v) else None for v in s.ci95)
    return {"n": s.n, "mean": float(np.exp(s.mean)), "ci95": [lo, hi],
            "significant": None if lo is None else not lo <= 1.0 <= hi}


def paired_ratio(baseline: Sequence[float], other: Sequence[float]) -> dict:
    """Speed ratio ``baseline / other`` of paired positive measurements (e.g. seconds): the geometric mean
    of the per-pair ratios with its log-scale interval (:func:`geometric_summary`, key ``ratio``)."""
    a, b = _as_array(baseline, "baseline"), _as_array(other, "other")
    if len(a) != len(b) or (a <= 0).any() or (b <= 0).any():
        raise ValueError("paired_ratio needs two equally long sequences of positive values")
    summary = geometric_summary(a / b, "ratios")
    return {"n": summary["n"], "ratio": summary["mean"], "ci95": summary["ci95"],
            "significant": summary["significant"]}


def significance(*p_values: float | None, alpha: float = ALPHA) -> str:
    """The verdict of two-sided tests on the same pairs: "significant" when every available p-value is
    below ``alpha``, "not significant" when none is, "tests disagree" otherwise; "n/a" without a p-value
    (None or nan, e.g. a t-test of differences that are all zero)."""
    available = [p for p in p_values if p is not None and not math.isnan(p)]
    if not available:
        return "n/a"
    below = sum(p < alpha for p in available)
    if below == len(available):
        return "significant"
    return "not significant" if below == 0 else "tests disagree"
