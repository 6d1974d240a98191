import math

import numpy as np
import pytest
from scipy import stats as sps

from asarm.eval.stats import paired_comparison, summarize, unigram_entropy


def test_unigram_entropy_hand_values():
    assert unigram_entropy(["a", "a", "b", "b"], unit="nats") == pytest.approx(math.log(2))
    assert unigram_entropy(["a", "a", "b", "b"]) == pytest.approx(1.0)  # bits by default
    assert unigram_entropy([1, 2, 3, 4]) == pytest.approx(2.0)
    assert unigram_entropy([7, 7, 7]) == 0.0
    # p = (1/2, 1/4, 1/4): 1.5 bits
    assert unigram_entropy(np.array([5, 5, 6, 9])) == pytest.approx(1.5)


def test_unigram_entropy_errors():
    with pytest.raises(ValueError):
        unigram_entropy([])
    with pytest.raises(ValueError):
        unigram_entropy([1, 2], unit="bans")


def test_summarize():
    s = summarize([1, 2, 3, 4])
    std = math.sqrt(5 / 3)
    half = sps.t.ppf(0.975, 3) * std / 2
    assert (s.n, s.mean) == (4, 2.5)
    assert s.std == pytest.approx(std)
    assert s.sem == pytest.approx(std / 2)
    assert s.ci95 == pytest.approx((2.5 - half, 2.5 + half))
    one = summarize([3.0])
    assert (one.n, one.mean) == (1, 3.0) and math.isnan(one.std) and math.isnan(one.ci95[0])
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([1.0, float("nan")])


def test_paired_comparison_known_small_case():
    a, b = [2, 4, 6, 8, 10], [1, 2, 3, 4, 5]  # differences 1..5, all positive
    r = paired_comparison(a, b)
    assert (r.n, r.mean_a, r.mean_b, r.mean_diff) == (5, 6.0, 3.0, 3.0)
    t = 3.0 / (math.sqrt(2.5) / math.sqrt(5))
    assert r.t_statistic == pytest.approx(t)
    assert r.t_pvalue == pytest.approx(2 * sps.t.sf(t, 4))
    half = sps.t.ppf(0.975, 4) * math.sqrt(2.5) / math.sqrt(5)
    assert r.ci95_diff == pytest.approx((3 - half, 3 + half))
    # exact signed-rank test: W- = 0, and only 1 of the 2^5 sign patterns per tail is as extreme
    assert r.wilcoxon_statistic == 0.0
    assert r.wilcoxon_pvalue == pytest.approx(2 / 32)


def test_paired_comparison_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(10, 2, size=40)
    b = a + rng.normal(0.3, 1, size=40)
    r = paired_comparison(a, b)
    t = sps.ttest_rel(a, b)
    w = sps.wilcoxon(a, b, zero_method="zsplit")
    assert (r.t_statistic, r.t_pvalue) == pytest.approx((t.statistic, t.pvalue))
    assert (r.wilcoxon_statistic, r.wilcoxon_pvalue) == pytest.approx((w.statistic, w.pvalue))
    assert r.mean_diff == pytest.approx(np.mean(a - b))


def test_paired_comparison_identical_samples():
    r = paired_comparison([1, 2, 3], [1, 2, 3])
    assert r.mean_diff == 0.0 and math.isnan(r.t_pvalue)
    assert r.wilcoxon_pvalue == pytest.approx(1.0)


def test_paired_comparison_errors():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_comparison([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="at least 2"):
        paired_comparison([1], [2])
    with pytest.raises(ValueError, match="non-finite"):
        paired_comparison([1, float("inf")], [1, 2])


def test_paired_ratio_is_a_positive_interval_around_the_geometric_mean():
    from asarm.eval.stats import paired_ratio

    baseline = [2.0, 4.0, 3.0, 5.0]
    other = [1.0, 2.5, 1.0, 2.0]  # ratios 2, 1.6, 3, 2.5
    r = paired_ratio(baseline, other)
    assert r["ratio"] == pytest.approx((2 * 1.6 * 3 * 2.5) ** 0.25)
    lo, hi = r["ci95"]
    assert 0 < lo < r["ratio"] < hi
    # a very noisy pair set still gives a positive lower bound (a difference of means would go negative)
    noisy = paired_ratio([1.0, 10.0, 1.0], [10.0, 1.0, 1.0])
    assert noisy["ci95"][0] > 0
    with pytest.raises(ValueError, match="positive"):
        paired_ratio([1.0, -1.0], [1.0, 1.0])


def test_geometric_summary_interval_is_positive_and_on_the_log_scale():
    from asarm.eval.stats import geometric_summary

    seconds = [0.01, 2.0, 0.05, 1.0]  # spread so wide that a t interval of the mean goes below zero
    assert summarize(seconds).ci95[0] < 0
    g = geometric_summary(seconds)
    logs = np.log(seconds)
    half = sps.t.ppf(0.975, 3) * logs.std(ddof=1) / 2
    assert g["mean"] == pytest.approx(math.exp(logs.mean()))
    assert g["ci95"] == pytest.approx([math.exp(logs.mean() - half), math.exp(logs.mean() + half)])
    assert 0 < g["ci95"][0] < g["mean"] < g["ci95"][1]
    assert geometric_summary([3.0]) == {"n": 1, "mean": pytest.approx(3.0), "ci95": [None, None],
                                        "significant": None}
    with pytest.raises(ValueError, match="positive"):
        geometric_summary([1.0, 0.0])


def test_paired_ratio_says_whether_it_is_significant():
    from asarm.eval.stats import paired_ratio

    assert paired_ratio([2.0, 2.1, 1.9, 2.0], [1.0, 1.0, 1.0, 1.1])["significant"] is True
    assert paired_ratio([1.0, 2.0, 1.0, 2.0], [2.0, 1.0, 2.0, 1.0])["significant"] is False


def test_significance_verdicts():
    from asarm.eval.stats import significance

    assert significance(0.01, 0.03) == "significant"
    assert significance(0.2, 0.6) == "not significant"
    assert significance(0.01, 0.2) == "tests disagree"
    # differences all zero: the t-test has no p-value, the Wilcoxon test says nothing is there
    assert significance(float("nan"), 1.0) == "not significant"
    assert significance(None, float("nan")) == "n/a"
    # the verdict follows the tests of paired_comparison
    r = paired_comparison([1.0, 2.0, 3.0, 4.0, 5.0], [1.1, 1.9, 3.2, 3.9, 5.0])
    assert significance(r.t_pvalue, r.wilcoxon_pvalue) == "not significant"
