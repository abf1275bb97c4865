"""Small statistics in numpy for the evaluation reports: the area under a curve, seeded
bootstrap intervals, and paired comparisons of two methods scored on the same items.

* :func:`auc`: trapezoid rule over x in [0, 1] (the curve's x values, or equally spaced);
* :func:`bootstrap_ci`: percentile interval of the mean, resampling the items;
* :func:`paired_bootstrap`: interval and two-sided p of the mean of the paired differences;
* :func:`wilcoxon`: Wilcoxon signed-rank test (zero differences dropped, ties averaged,
  normal approximation with tie and continuity corrections; exact for n <= 50 without ties);
* :func:`holm`: Holm's step-down adjustment of several p-values.

Everything is deterministic for a given ``seed``.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import numpy as np


def auc(y: Sequence[float], x: Optional[Sequence[float]] = None) -> float:
    """Trapezoid area under ``y`` over ``x`` (default: equally spaced over [0, 1]); ``x`` is
    rescaled to [0, 1] by its range, so the area of a curve within [0, 1] is within [0, 1]."""
    y = np.asarray(y, np.float64)
    if y.ndim != 1 or y.size < 2:
        raise ValueError("a curve needs at least two points")
    if x is None:
        x = np.linspace(0.0, 1.0, y.size)
    else:
        x = np.asarray(x, np.float64)
        if x.shape != y.shape:
            raise ValueError("x and y differ in length")
        span = x[-1] - x[0]
        if not span > 0:
            raise ValueError("x must increase")
        x = (x - x[0]) / span
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def _resample_means(values: np.ndarray, n_boot: int, rng: np.random.Generator, chunk: int = 256) -> np.ndarray:
    n = values.shape[0]
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        k = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(k, n))
        out[start:start + k] = values[idx].mean(axis=1)
    return out


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple:
    """``(mean, low, high)``: the mean and its percentile bootstrap interval (``None`` bounds for
    fewer than two values; ``(None, None, None)`` for none)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return None, None, None
    mean = float(v.mean())
    if v.size < 2:
        return mean, None, None
    means = _resample_means(v, int(n_boot), np.random.default_rng(seed))
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return mean, float(lo), float(hi)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0) -> dict:
    """The mean of ``a - b`` (items paired by position), its bootstrap interval and a two-sided
    p-value: twice the smaller share of resampled means on either side of 0 (at least 1 / n_boot)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    if d.size == 0:
        return {"mean_diff": None, "low": None, "high": None, "p": None, "n": 0}
    mean = float(d.mean())
    if d.size < 2 or np.all(d == d[0]):
        p = 1.0 if mean == 0 else None
        return {"mean_diff": mean, "low": mean if d.size > 1 else None, "high": mean if d.size > 1 else None,
                "p": p, "n": int(d.size)}
    means = _resample_means(d, int(n_boot), np.random.default_rng(seed))
    al = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [al, 1.0 - al])
    side = min(np.mean(means <= 0), np.mean(means >= 0))
    p = float(min(1.0, max(2.0 * side, 1.0 / n_boot)))
    return {"mean_diff": mean, "low": float(lo), "high": float(hi), "p": p, "n": int(d.size)}


def _rank_average(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, tied values sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size)
    sx = x[order]
    i = 0
    while i < x.size:
        j = i
        while j + 1 < x.size and sx[j + 1] == sx[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _norm_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def wilcoxon(a: Sequence[float], b: Sequence[float]) -> dict:
    """Wilcoxon signed-rank test of ``a - b`` (two-sided). ``W+`` is the rank sum of the positive
    differences; ``p`` is exact (enumerated) for up to 50 non-zero differences without ties, else
    the normal approximation with tie and continuity corrections. ``p`` is None with no non-zero
    difference."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    d = d[d != 0]
    n = int(d.size)
    if n == 0:
        return {"w_plus": 0.0, "n": 0, "p": None, "method": "none"}
    ranks = _rank_average(np.abs(d))
    w_plus = float(ranks[d > 0].sum())
    ties = len(np.unique(np.abs(d))) != n
    if n <= 50 and not ties:
        # exact null distribution of W+ over the 2^n sign patterns (counts by rank sum)
        total = n * (n + 1) // 2
        counts = np.zeros(total + 1)
        counts[0] = 1
        for r in range(1, n + 1):
            counts[r:] = counts[r:] + counts[:-r].copy()
        cdf = np.cumsum(counts) / counts.sum()
        w = int(round(w_plus))
        low = cdf[w]
        high = 1.0 - (cdf[w - 1] if w >= 1 else 0.0)
        return {"w_plus": w_plus, "n": n, "p": float(min(1.0, 2.0 * min(low, high))), "method": "exact"}
    mean = n * (n + 1) / 4.0
    _, tie_counts = np.unique(np.abs(d), return_counts=True)
    var = n * (n + 1) * (2 * n + 1) / 24.0 - float(np.sum(tie_counts ** 3 - tie_counts)) / 48.0
    if var <= 0:
        return {"w_plus": w_plus, "n": n, "p": 1.0, "method": "normal"}
    z = (abs(w_plus - mean) - 0.5) / math.sqrt(var)
    return {"w_plus": w_plus, "n": n, "p": float(min(1.0, 2.0 * _norm_sf(max(z, 0.0)))), "method": "normal"}


def holm(pvalues: Sequence[Optional[float]]) -> list:
    """Holm-adjusted p-values (None stays None), in the order given."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    m = len(idx)
    out: list = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def pairs(labels: Sequence[str]) -> list:
    """Every unordered pair of ``labels``, in order."""
    return list(itertools.combinations(labels, 2))
