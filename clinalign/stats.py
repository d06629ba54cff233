"""Intervals, paired tests and verdicts for the numbers eval reports: thin wrappers over scipy.stats.

No statistics are written by hand here; every number comes from scipy:

- `wilson(k, n)` / `proportion(flags)`: the Wilson score 95% interval of a proportion,
  `scipy.stats.binomtest(k, n).proportion_ci(method="wilson")`.
- `bootstrap_mean(values)`: a 95% interval of a mean, `scipy.stats.bootstrap` with method "BCa"
  (bias-corrected and accelerated), 9999 resamples, a fixed seed (`rng=numpy.random.default_rng(0)`):
  the same data give the same interval. Where BCa is undefined (scipy returns NaN, e.g. nearly
  constant data) the percentile interval of the same resamples is used; `method` says which.
- `bootstrap_statistic(n, statistic)`: the percentile 95% interval of any statistic of n items
  (the items' indices are resampled; used for corpus BLEU, which is not a mean of per-item scores).
- `mcnemar(b, c)`: McNemar's exact test on paired correct/incorrect outcomes, the two-sided binomial
  test of the discordant counts, `scipy.stats.binomtest(b, b + c, 0.5)`.
- `paired_permutation_p(x, y)`: the p-value of the mean paired difference under random swaps within
  pairs, `scipy.stats.permutation_test(permutation_type="samples")` (exact when 2**n <= 9999).
- `compare_flags` / `compare_scores`: a model against a baseline on the same items: the difference
  of means (model - baseline) with a bootstrap interval of the per-item differences, and McNemar's p
  (flags) or the paired permutation p (scores); `verdict` turns that into better / worse / no
  detectable change, with the direction of "better" per metric (`LOWER_IS_BETTER`).

Small samples: n == 0 gives value None; n == 1 gives the value with low = high = None (no interval);
constant data give low = high = value (every resample is the same). Intervals are never NaN.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
ALPHA = 0.05
N_RESAMPLES = 9999
SEED = 0
# Metrics where a smaller number is the better one (everything else: larger is better).
LOWER_IS_BETTER = frozenset({"over_refusal_rate", "no_answer", "final_missing", "kl", "kl_k1", "kl_k3", "nll"})
VERDICTS = ("better", "worse", "no detectable change")


@dataclasses.dataclass(frozen=True)
class Interval:
    """A point estimate with its 95% interval over `n` items; low/high None where there is no interval."""

    value: float | None
    low: float | None
    high: float | None
    n: int
    method: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return fmt(self.value, self.low, self.high, self.n)


def fmt(value: float | None, low: float | None, high: float | None, n: int | None = None, digits: int = 2) -> str:
    """`0.62 [0.55, 0.69] n=120`; "-" for no value, the bare value (and n) where there is no interval."""
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    if low is not None and high is not None:
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text + (f" n={n}" if n is not None else "")


def _finite(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def wilson(k: int, n: int) -> Interval:
    """Wilson score interval of k successes in n trials (n == 0: value None)."""
    if n == 0:
        return Interval(None, None, None, 0, "wilson")
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return Interval(k / n, float(ci.low), float(ci.high), n, "wilson")


def proportion(flags: Sequence[bool | None]) -> Interval:
    """Wilson interval of the share of True among the flags that are not None."""
    known = [bool(f) for f in flags if f is not None]
    return wilson(sum(known), len(known))


def _degenerate(values: np.ndarray, method: str) -> Interval | None:
    """The small-sample cases of the module docstring, or None when a bootstrap is needed."""
    n = len(values)
    if n == 0:
        return Interval(None, None, None, 0, method)
    value = float(values.mean())
    if n == 1:
        return Interval(value, None, None, 1, method)
    if np.all(values == values[0]):
        return Interval(value, value, value, n, method)
    return None


def bootstrap_mean(values: Sequence[float | None], *, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> Interval:
    """Mean of the non-None values with its BCa bootstrap 95% interval (percentile where BCa is undefined)."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    small = _degenerate(x, "bootstrap-bca")
    if small is not None:
        return small
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DegenerateDataWarning: handled below
        result = stats.bootstrap(
            (x,),
            np.mean,
            n_resamples=n_resamples,
            confidence_level=CONFIDENCE,
            method="BCa",
            rng=np.random.default_rng(seed),
        )
    low, high, method = (
        _finite(result.confidence_interval.low),
        _finite(result.confidence_interval.high),
        "bootstrap-bca",
    )
    if low is None or high is None:
        distribution = result.bootstrap_distribution
        low, high = (float(q) for q in np.percentile(distribution, [2.5, 97.5]))
        method = "bootstrap-percentile"
    return Interval(float(x.mean()), low, high, len(x), method)


def bootstrap_statistic(
    n: int, statistic: Callable[[np.ndarray], float], *, n_resamples: int = 999, seed: int = SEED
) -> Interval:
    """`statistic(indices)` over all n items, with the percentile 95% interval of it over resampled indices."""
    if n == 0:
        return Interval(None, None, None, 0, "bootstrap-percentile")
    value = float(statistic(np.arange(n)))
    if n == 1:
        return Interval(value, None, None, 1, "bootstrap-percentile")
    result = stats.bootstrap(
        (np.arange(n),),
        lambda idx: statistic(idx.astype(int)),
        vectorized=False,
        n_resamples=n_resamples,
        confidence_level=CONFIDENCE,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return Interval(
        value,
        _finite(result.confidence_interval.low),
        _finite(result.confidence_interval.high),
        n,
        "bootstrap-percentile",
    )


def mcnemar(b: int, c: int) -> float:
    """McNemar's exact two-sided p: b and c are the discordant pairs (only one of the two was right)."""
    if b + c == 0:
        return 1.0
    return float(stats.binomtest(int(b), int(b + c), 0.5).pvalue)


def paired_permutation_p(
    x: Sequence[float], y: Sequence[float], *, n_resamples: int = N_RESAMPLES, seed: int = SEED
) -> float:
    """Two-sided p of mean(x - y) when x_i and y_i are swapped at random within each pair."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    # One pair has two sign assignments, +d and -d, both as extreme as the observed one: p is exactly 1
    # (scipy refuses a single observation).
    if len(x) < 2 or np.all(x == y):
        return 1.0

    def mean_difference(a, b, axis):
        return np.mean(a - b, axis=axis)

    result = stats.permutation_test(
        (x, y),
        mean_difference,
        permutation_type="samples",
        vectorized=True,
        n_resamples=n_resamples,
        rng=np.random.default_rng(seed),
    )
    return float(min(result.pvalue, 1.0))


def lower_is_better(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER


def verdict(metric: str, low: float | None, high: float | None, p: float | None, alpha: float = ALPHA) -> str:
    """better / worse when the difference interval excludes 0 and p < alpha; else no detectable change."""
    if low is None or high is None or p is None or p >= alpha or low <= 0 <= high:
        return "no detectable change"
    up = low > 0
    return "better" if up != lower_is_better(metric) else "worse"


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Model minus baseline on the `n` items both were measured on."""

    metric: str
    difference: float | None
    low: float | None
    high: float | None
    n: int
    p: float | None
    test: str
    verdict: str

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _paired(model: Mapping[str, object], baseline: Mapping[str, object]) -> list[str]:
    return [key for key in model if key in baseline and model[key] is not None and baseline[key] is not None]


def compare_flags(metric: str, model: Mapping[str, bool | None], baseline: Mapping[str, bool | None]) -> Comparison:
    """Paired 0/1 outcomes keyed by item id: difference of shares, bootstrap interval, McNemar's exact p."""
    keys = _paired(model, baseline)
    x = np.asarray([bool(model[k]) for k in keys], dtype=float)
    y = np.asarray([bool(baseline[k]) for k in keys], dtype=float)
    b, c = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    diff = bootstrap_mean(x - y)
    p = mcnemar(b, c) if keys else None
    return Comparison(
        metric, diff.value, diff.low, diff.high, len(keys), p, "mcnemar-exact", verdict(metric, diff.low, diff.high, p)
    )


def compare_scores(metric: str, model: Mapping[str, float | None], baseline: Mapping[str, float | None]) -> Comparison:
    """Paired scores keyed by item id: mean difference, bootstrap interval, paired permutation p."""
    keys = _paired(model, baseline)
    x = np.asarray([model[k] for k in keys], dtype=float)
    y = np.asarray([baseline[k] for k in keys], dtype=float)
    diff = bootstrap_mean(x - y)
    p = paired_permutation_p(x, y) if keys else None
    return Comparison(
        metric,
        diff.value,
        diff.low,
        diff.high,
        len(keys),
        p,
        "paired-permutation",
        verdict(metric, diff.low, diff.high, p),
    )


def compare(metric: str, model: Mapping[str, object], baseline: Mapping[str, object]) -> Comparison:
    """`compare_flags` when the per-item values are booleans, else `compare_scores`."""
    values = [v for v in list(model.values()) + list(baseline.values()) if v is not None]
    if values and all(isinstance(v, bool) for v in values):
        return compare_flags(metric, model, baseline)
    return compare_scores(metric, model, baseline)


def intervals_overlap(a: Interval | Mapping, b: Interval | Mapping) -> bool:
    """Whether two intervals share a point (an interval missing its bounds is its value)."""

    def bounds(iv):
        iv = iv.as_dict() if isinstance(iv, Interval) else iv
        low = iv["low"] if iv.get("low") is not None else iv["value"]
        high = iv["high"] if iv.get("high") is not None else iv["value"]
        return low, high

    (a_low, a_high), (b_low, b_high) = bounds(a), bounds(b)
    return a_low <= b_high and b_low <= a_high
