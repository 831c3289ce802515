"""Paired comparisons over seeds, with the words a study may print about them.

One rule for every study (pretraining in tools/experiments, fine-tuning in megamoe/finetune), so a
table's "better" means the same thing everywhere:

- The unit is the per-seed difference ``d_s = metric(a, s) - metric(b, s)`` of two arms run with
  the same seed ``s`` (same data order, same init of the shared parameters). Pairing cancels the
  seed-to-seed spread, which is usually far larger than the gap between arms.
- :func:`paired_interval`: mean of the differences, its Student-t interval (n - 1 degrees of
  freedom) and the two-sided p-value of "mean difference = 0".
- :func:`holm`: Holm's step-down adjustment over a study's m comparisons (controls the chance of
  any false "better"/"worse" in the family at alpha, uniformly more powerful than Bonferroni).
- :func:`tost`: two one-sided tests of equivalence within ``±margin``; its p-value is below alpha
  exactly when the (1 - 2 alpha) interval lies inside ``(-margin, +margin)``.
- :func:`verdict` / :func:`verdicts`: the only place a verdict word is made. Lower is better
  (a loss): "better" / "worse" only when the Holm-adjusted difference test is significant; "tie"
  only when the Holm-adjusted TOST passes at the stated margin; anything else is
  "not resolved" — a gap inside noise is not a tie. For a higher-is-better metric (accuracy)
  pass the differences negated (b - a), and negate ``mean``, ``lo`` and ``hi`` back to report.

Traps:
- The old "within 2 SE is a tie, outside is a win" rule is t = 2 whatever the degrees of freedom:
  on 3 seeds (df 2) that is p ~ 0.18, not 0.05, and "inside 2 SE" says nothing about equivalence.
- Fewer than 2 paired seeds give no interval: the verdict is "not resolved", never a guess.
- Zero spread (identical differences, e.g. a deterministic toy) is handled exactly: a nonzero mean
  is significant, a zero mean is equivalent at any positive margin.
- TOST p-values are Holm-adjusted over the family too, so a table of "tie" words is as corrected
  as its "better"/"worse" words (conservative; with m = 1 it is the textbook TOST).

No scipy (not a dependency): the Student-t CDF is the regularized incomplete beta function by
its continued fraction (Numerical Recipes' ``betacf``, Lentz's method), and the quantile inverts
it by bisection; tests hold both to published table values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

WORDS = ("better", "worse", "tie", "not resolved")


@dataclass(frozen=True)
class Interval:
    """Mean of the paired differences, its two-sided ``level`` interval [lo, hi], the number of
    pairs and the two-sided p-value of mean = 0 (nan for all four when n < 2)."""

    mean: float
    lo: float
    hi: float
    n: int
    p: float


@dataclass(frozen=True)
class Verdict:
    """``word`` is one of :data:`WORDS`; [lo, hi] is the plain 95 % (1 - alpha) paired interval of
    the mean difference; ``p_adj`` the Holm-adjusted p of the difference test, ``p_tost_adj`` that
    of the equivalence test at ``margin``."""

    word: str
    mean: float
    lo: float
    hi: float
    n: int
    p_adj: float
    p_tost_adj: float
    margin: float


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 3e-16
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln_front) * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """Upper tail P(T > t) of Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t >= 0 else 1.0 - tail


def t_ppf(q: float, df: float) -> float:
    """Quantile of Student's t: the t with P(T <= t) = q (e.g. t_ppf(0.975, 4) = 2.776)."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"t_ppf: q must be in (0, 1), got {q}")
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    lo, hi = 0.0, 1.0
    while t_sf(hi, df) > 1.0 - q:  # bracket: the tail falls as t grows
        hi *= 2.0
    for _ in range(200):  # bisection to float precision
        mid = 0.5 * (lo + hi)
        if t_sf(mid, df) > 1.0 - q:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def _mean_sd(diffs: Sequence[float]) -> tuple[int, float, float]:
    n = len(diffs)
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1)) if n > 1 else float("nan")
    return n, mean, sd


def paired_interval(diffs: Iterable[float], level: float = 0.95) -> Interval:
    """Student-t interval of the mean of paired differences and the two-sided p of mean = 0."""
    diffs = [float(d) for d in diffs]
    if not diffs:
        raise ValueError("paired_interval: no differences")
    n, mean, sd = _mean_sd(diffs)
    if n < 2:
        nan = float("nan")
        return Interval(mean, nan, nan, n, nan)
    se = sd / math.sqrt(n)
    if se == 0.0:
        return Interval(mean, mean, mean, n, 1.0 if mean == 0 else 0.0)
    half = t_ppf(0.5 + level / 2.0, n - 1) * se
    return Interval(mean, mean - half, mean + half, n, min(1.0, 2.0 * t_sf(abs(mean) / se, n - 1)))


def tost(diffs: Iterable[float], margin: float) -> float:
    """p-value of the two one-sided tests that the mean difference lies inside (-margin, margin):
    the larger of the two one-sided p's (nan when n < 2)."""
    if not margin > 0:
        raise ValueError(f"tost: the equivalence margin must be > 0, got {margin}")
    diffs = [float(d) for d in diffs]
    n, mean, sd = _mean_sd(diffs)
    if n < 2:
        return float("nan")
    se = sd / math.sqrt(n)
    if se == 0.0:
        return 0.0 if abs(mean) < margin else 1.0
    return max(t_sf((mean + margin) / se, n - 1), t_sf((margin - mean) / se, n - 1))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order: the k-th smallest p times (m - k + 1), made
    monotone, capped at 1. A nan p (an untestable comparison) stays nan and still counts in m."""
    m = len(pvalues)
    order = sorted((i for i in range(m) if not math.isnan(pvalues[i])), key=lambda i: pvalues[i])
    out = [float("nan")] * m
    running = 0.0
    for k, i in enumerate(order):
        running = max(running, min(1.0, (m - k) * pvalues[i]))
        out[i] = running
    return out


def _word(mean: float, p_adj: float, p_tost_adj: float, alpha: float) -> str:
    if p_adj < alpha:  # nan compares False: not significant
        return "better" if mean < 0 else "worse"
    if p_tost_adj < alpha:
        return "tie"
    return "not resolved"


def verdicts(named_diffs: Mapping[str, Sequence[float]], *, margin: float, alpha: float = 0.05) -> dict[str, Verdict]:
    """One verdict per comparison of a study (lower is better; each value is the per-seed
    differences a - b), with Holm's correction over all of them (difference tests and
    equivalence tests each adjusted over the m = len(named_diffs) comparisons)."""
    names = list(named_diffs)
    intervals = {k: paired_interval(named_diffs[k], 1.0 - alpha) for k in names}
    p_adj = holm([intervals[k].p for k in names])
    p_tost_adj = holm([tost(named_diffs[k], margin) for k in names])
    out = {}
    for k, pa, pt in zip(names, p_adj, p_tost_adj):
        iv = intervals[k]
        out[k] = Verdict(_word(iv.mean, pa, pt, alpha), iv.mean, iv.lo, iv.hi, iv.n, pa, pt, margin)
    return out


def verdict(diffs: Sequence[float], *, margin: float, alpha: float = 0.05, m: int = 1) -> Verdict:
    """The verdict of one comparison among ``m`` in its family, without the others' p-values:
    both p's are multiplied by m (Bonferroni, which is Holm's first and strictest step). Use
    :func:`verdicts` when the whole family is at hand (Holm proper)."""
    if m < 1:
        raise ValueError(f"verdict: m (comparisons in the family) must be >= 1, got {m}")
    v = verdicts({"": diffs}, margin=margin, alpha=alpha)[""]
    if m == 1:
        return v
    pa, pt = (p if math.isnan(p) else min(1.0, p * m) for p in (v.p_adj, v.p_tost_adj))
    return Verdict(_word(v.mean, pa, pt, alpha), v.mean, v.lo, v.hi, v.n, pa, pt, margin)
