"""Intervals, paired tests and verdicts (clinalign.stats) on hand-worked numbers."""

from __future__ import annotations

import math

import pytest

from clinalign.stats import (
    Interval,
    bootstrap_mean,
    bootstrap_statistic,
    compare,
    compare_flags,
    compare_scores,
    fmt,
    intervals_overlap,
    mcnemar,
    paired_permutation_p,
    proportion,
    verdict,
    wilson,
)


def test_wilson_interval_of_41_of_50():
    # p = 0.82, z = 1.95996: centre (p + z^2/2n) / (1 + z^2/n) = 0.858415 / 1.076829 = 0.79717;
    # half-width z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2) = 1.82013 * 0.057758 = 0.10513.
    iv = wilson(41, 50)
    assert iv.value == pytest.approx(0.82)
    assert iv.low == pytest.approx(0.79717 - 0.10513, abs=2e-4)
    assert iv.high == pytest.approx(0.79717 + 0.10513, abs=2e-4)
    assert (iv.n, iv.method) == (50, "wilson")
    assert str(iv) == "0.82 [0.69, 0.90] n=50"


def test_wilson_at_the_edges_stays_inside_zero_one():
    # 0 of 10: Wilson's upper bound is z^2 / (n + z^2) = 3.8415 / 13.8415 = 0.27753.
    iv = wilson(0, 10)
    assert (iv.value, iv.low) == (0.0, 0.0)
    assert iv.high == pytest.approx(3.841459 / 13.841459, abs=1e-6)
    assert wilson(0, 0) == Interval(None, None, None, 0, "wilson")


def test_proportion_ignores_items_that_do_not_apply():
    assert proportion([True, None, False, True, None]) == wilson(2, 3)


def test_mcnemar_exact_on_discordant_counts():
    # b = 1, c = 8: two-sided binomial p = 2 * (C(9,0) + C(9,1)) / 2^9 = 20 / 512.
    assert mcnemar(1, 8) == pytest.approx(20 / 512)
    assert mcnemar(8, 1) == pytest.approx(20 / 512)
    # b = 0, c = 6: 2 / 64.
    assert mcnemar(0, 6) == pytest.approx(2 / 64)
    assert mcnemar(3, 3) == 1.0
    assert mcnemar(0, 0) == 1.0  # no discordant pair: nothing to detect


def test_paired_permutation_is_exact_for_few_pairs():
    # Differences (1, 2, 3): of the 2^3 sign flips only (+,+,+) and (-,-,-) reach |mean| >= 2, p = 2/8.
    assert paired_permutation_p([2, 4, 6], [1, 2, 3]) == pytest.approx(0.25)
    # Differences (1, -1): every flip has |mean| >= 0, p = 1.
    assert paired_permutation_p([1, 0], [0, 1]) == pytest.approx(1.0)
    assert paired_permutation_p([0.5, 0.5], [0.5, 0.5]) == 1.0


def test_bootstrap_mean_small_samples_and_determinism():
    assert bootstrap_mean([]).value is None
    one = bootstrap_mean([0.7])
    assert (one.value, one.low, one.high, one.n) == (0.7, None, None, 1)
    constant = bootstrap_mean([0.5, 0.5, 0.5, None])
    assert (constant.value, constant.low, constant.high, constant.n) == (0.5, 0.5, 0.5, 3)
    values = [0.1, 0.9, 0.4, 0.6, 0.3, 0.8, 0.2, 0.7]
    iv = bootstrap_mean(values)
    assert iv.value == pytest.approx(0.5)
    assert iv.low < 0.5 < iv.high
    assert 0.1 <= iv.low and iv.high <= 0.9  # a mean of resamples never leaves the data's range
    assert bootstrap_mean(values) == iv  # fixed seed: the same data give the same interval
    assert not any(math.isnan(x) for x in (iv.low, iv.high))


def test_bootstrap_of_a_statistic_over_items():
    data = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    iv = bootstrap_statistic(len(data), lambda idx: max(data[i] for i in idx))
    assert iv.value == 5.0
    assert iv.high == 5.0 and iv.low < 5.0  # the max of a resample can only be smaller


def test_paired_flags_verdicts():
    baseline = {f"q{i}": False for i in range(10)}
    model = {f"q{i}": True for i in range(10)}
    up = compare_flags("mc/pubmedqa/acc", model, baseline)
    # b = 10, c = 0: p = 2 / 2^10; every item moved by +1, so the interval is [1, 1].
    assert (up.difference, up.low, up.high, up.n) == (1.0, 1.0, 1.0, 10)
    assert up.p == pytest.approx(2 / 1024)
    assert up.verdict == "better"
    # The same movement in a metric where lower is better.
    assert compare_flags("safety/over_refusal_rate", model, baseline).verdict == "worse"
    # One item of ten moved: p = 1, no detectable change.
    few = dict(baseline, q0=True)
    small = compare_flags("mc/pubmedqa/acc", few, baseline)
    assert small.p == 1.0 and small.verdict == "no detectable change"
    # Items only one side has are not paired.
    assert compare_flags("acc", {**model, "extra": True}, baseline).n == 10


def test_paired_scores_and_dispatch():
    baseline = {f"p{i}": 0.2 for i in range(12)}
    model = {f"p{i}": 0.2 + 0.1 * (1 + i % 3) for i in range(12)}
    result = compare_scores("safety/score", model, baseline)
    assert result.difference == pytest.approx(0.2)
    assert result.low > 0 and result.p < 0.05 and result.verdict == "better"
    assert compare("safety/score", model, baseline).test == "paired-permutation"
    assert compare("acc", {"a": True}, {"a": False}).test == "mcnemar-exact"


def test_verdict_needs_both_interval_and_p():
    assert verdict("acc", 0.1, 0.3, 0.01) == "better"
    assert verdict("acc", -0.3, -0.1, 0.01) == "worse"
    assert verdict("acc", -0.1, 0.3, 0.01) == "no detectable change"  # interval spans 0
    assert verdict("acc", 0.1, 0.3, 0.2) == "no detectable change"  # p too large
    assert verdict("kl", 0.1, 0.3, 0.01) == "worse"
    assert verdict("acc", None, None, None) == "no detectable change"


def test_format_and_overlap():
    assert fmt(0.6234, 0.551, 0.689, 120) == "0.62 [0.55, 0.69] n=120"
    assert fmt(None, None, None, 0) == "-"
    assert fmt(0.5, None, None, 1) == "0.50 n=1"
    assert intervals_overlap({"value": 0.5, "low": 0.4, "high": 0.6}, {"value": 0.65, "low": 0.55, "high": 0.7})
    assert not intervals_overlap(wilson(10, 10), wilson(0, 10))


def test_a_single_pair_has_permutation_p_one():
    # Exact: the only two sign assignments give +d and -d, both |d|: p = 2/2. (DPO's tiny eval has one record.)
    from clinalign.stats import compare, paired_permutation_p

    assert paired_permutation_p([1.2], [0.7]) == 1.0
    c = compare("nll", {"q": 1.2}, {"q": 0.7})
    assert c.n == 1 and c.p == 1.0 and c.verdict == "no detectable change"
