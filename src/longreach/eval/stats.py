"""Interval estimates and tests for comparing a method with dense on the same prompts (standard library only).

Every function is plain arithmetic on counts or score lists, so ``docs/headline.py`` and ``longreach report``
compute the same numbers from the same rows:

- :func:`wilson` — score interval of one proportion (Wilson 1927).
- :func:`newcombe_paired` — interval of a difference of two proportions measured on the *same* prompts
  (Newcombe 1998, method 10).
- :func:`mcnemar_exact` — exact two-sided McNemar p-value: a binomial test on the discordant pairs.
- :func:`paired_bootstrap` — seeded percentile-bootstrap interval of a mean paired difference, for scores that
  are not right/wrong (recall, perplexity).
- :func:`mean_ci` — mean with a 95% interval (Wilson for 0/1 scores, Student t otherwise).
- :func:`effective_length` — RULER's effective context length for one method.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Mapping, Sequence
from statistics import NormalDist

Z95 = NormalDist().inv_cdf(0.975)  # 1.959963..., the two-sided 95% normal quantile

T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23, 15: 2.13,
       20: 2.09, 30: 2.04}


def t_quantile(df: int) -> float:
    """Two-sided 95% Student t quantile (table lookup, rounded up to the next tabulated df's value — i.e.
    conservative — and the normal 1.96 beyond 30 degrees of freedom)."""
    if df <= 0:
        return math.inf
    for k in sorted(T95):
        if df <= k:
            return T95[k]
    return 1.96


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``successes / n`` (95% by default).

    Source: E. B. Wilson (1927), "Probable inference, the law of succession, and statistical inference",
    JASA 22:209-212; method 3 of R. G. Newcombe (1998), "Two-sided confidence intervals for the single
    proportion: comparison of seven methods", Statistics in Medicine 17:857-872. With p = k/n:

        (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)

    Unlike mean ± 1.96 sd it stays inside [0, 1] and is not empty at 0/n or n/n. ``n = 0`` gives (0, 1).
    """
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


def newcombe_paired(a: int, b: int, c: int, d: int, z: float = Z95) -> tuple[float, float, float]:
    """Difference p1 - p2 of two proportions measured on the same n = a + b + c + d subjects, with its
    95% interval by Newcombe's method 10.

    The 2x2 table of paired outcomes: a = both right, b = only the first right, c = only the second right,
    d = both wrong; p1 = (a + b)/n, p2 = (a + c)/n.

    Source: R. G. Newcombe (1998), "Improved confidence intervals for the difference between binomial
    proportions based on paired data", Statistics in Medicine 17:2635-2650, method 10 (section 2; worked
    examples in Table II). With (l1, u1), (l2, u2) the Wilson intervals of p1 and p2:

        lower = (p1 - p2) - sqrt((p1 - l1)² - 2·phi·(p1 - l1)(u2 - p2) + (u2 - p2)²)
        upper = (p1 - p2) + sqrt((p2 - l2)² - 2·phi·(p2 - l2)(u1 - p1) + (u1 - p1)²)

    where phi is the correlation of the table, (ad - bc) / sqrt((a+b)(c+d)(a+c)(b+d)), with its numerator
    shrunk towards 0 by n/2 when positive (ad - bc - n/2, floored at 0) and phi = 0 when a margin is empty.
    Returns (difference, lower, upper), the bounds clipped to [-1, 1].
    """
    n = a + b + c + d
    if n == 0:
        return (0.0, -1.0, 1.0)
    p1, p2 = (a + b) / n, (a + c) / n
    l1, u1 = wilson(a + b, n, z)
    l2, u2 = wilson(a + c, n, z)
    margins = (a + b) * (c + d) * (a + c) * (b + d)
    num = a * d - b * c
    if margins == 0:
        phi = 0.0
    elif num > n / 2:
        phi = (num - n / 2) / math.sqrt(margins)
    elif num >= 0:
        phi = 0.0
    else:
        phi = num / math.sqrt(margins)
    diff = p1 - p2
    lo = diff - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = diff + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return diff, max(-1.0, lo), min(1.0, hi)


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for the discordant pairs b (only the first right) and c (only the
    second right).

    Under "no difference" each of the m = b + c discordant pairs goes either way with probability 1/2, so
    min(b, c) ~ Binomial(m, 1/2) and p = min(1, 2 · P(X <= min(b, c))) = min(1, 2 · sum_{k<=min(b,c)} C(m, k) / 2^m)
    (McNemar 1947, Psychometrika 12:153-157; the exact form is the two-sided sign test, e.g. Agresti,
    Categorical Data Analysis, 3rd ed., section 11.1). The concordant pairs carry no information about the
    difference. No discordant pairs gives p = 1. Computed with exact integers (no scipy).
    """
    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0, got b={b}, c={c}")
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2**m)


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Quantile q of sorted values, interpolating linearly between order statistics (numpy's default)."""
    h = (len(ordered) - 1) * q
    i = math.floor(h)
    j = min(i + 1, len(ordered) - 1)
    return ordered[i] + (h - i) * (ordered[j] - ordered[i])


def paired_bootstrap(x: Sequence[float], y: Sequence[float], resamples: int = 2000, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean paired difference mean(x - y) and its percentile-bootstrap interval.

    x[i] and y[i] are two scores on the same prompt (the pairing is kept: whole pairs are resampled, with
    replacement, n at a time). The interval is the (1-level)/2 and (1+level)/2 quantiles of the ``resamples``
    resampled means (B. Efron and R. J. Tibshirani (1993), An Introduction to the Bootstrap, chapter 13).
    Deterministic: the resampling indices come from ``random.Random(seed)``, drawn as ``int(random() * n)``.
    Fewer than 2 pairs give an unbounded interval (one pair says nothing about the spread).

    The percentile interval is too narrow at small n, and has zero width when every paired difference is
    the same; read it with n.
    """
    if len(x) != len(y):
        raise ValueError(f"paired samples differ in length: {len(x)} and {len(y)}")
    diffs = [float(a) - float(b) for a, b in zip(x, y, strict=True)]
    n = len(diffs)
    if n == 0:
        return (math.nan, -math.inf, math.inf)
    mean = sum(diffs) / n
    if n < 2:
        return (mean, -math.inf, math.inf)
    rng = random.Random(seed)
    means = sorted(sum(diffs[int(rng.random() * n)] for _ in range(n)) / n for _ in range(resamples))
    alpha = 1 - level
    return (mean, _percentile(means, alpha / 2), _percentile(means, 1 - alpha / 2))


def mean_ci(values: list[float], binary: bool) -> tuple[float, float, float]:
    """(mean, low, high) at 95%: Wilson for 0/1 scores, mean ± t·sd/sqrt(n) otherwise (unbounded for n < 2)."""
    n = len(values)
    mean = sum(values) / n
    if binary:
        return (mean, *wilson(sum(values), n))
    if n < 2:
        return (mean, -math.inf, math.inf)
    half = t_quantile(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return (mean, mean - half, mean + half)


def effective_length(scores: Mapping[int, float], threshold: float = 0.85) -> int | None:
    """RULER's effective context length of one method: the longest evaluated length L such that the mean
    score at L *and at every shorter evaluated length* is >= ``threshold``.

    ``scores`` maps each length the method was evaluated at to its mean score (in [0, 1]). Walking the lengths
    upwards, the first one below the threshold ends the run; a length that passes after a failing shorter one
    does not count. None when the shortest evaluated length already fails (or nothing was evaluated).

    Source: C.-P. Hsieh et al. (2024), "RULER: What's the real context size of your long-context language
    models?" (COLM 2024), the "effective length" of its main results table: the maximum length at which
    performance stays above a threshold, RULER's being Llama-2-7B's 85.6% at 4K. Ours is a parameter
    (default 0.85) and a score equal to it passes.
    """
    best = None
    for length in sorted(scores):
        if not scores[length] >= threshold:  # also stops at NaN
            break
        best = length
    return best
