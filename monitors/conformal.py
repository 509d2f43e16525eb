"""Split-conformal thresholds: pick the alarm level from scores of rollouts that went well.

Given n calibration scores from successful nominal rollouts and a target false-alarm rate alpha, the
threshold is the ceil((n + 1)(1 - alpha))-th smallest score.  If a new nominal score is exchangeable with
the calibration scores, it exceeds the threshold with probability at most alpha (and at least
alpha - 1/(n + 1)).  With too few scores for the requested rate the threshold is +inf: never alarm, rather
than alarm on a guess.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def conformal_threshold(scores: Sequence[float] | np.ndarray, alpha: float) -> float:
    """Smallest threshold whose conformal false-alarm guarantee is alpha."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if s.size == 0 or not np.isfinite(s).all():
        raise ValueError("calibration scores must be a non-empty set of finite numbers")
    rank = math.ceil((s.size + 1) * (1.0 - alpha))
    return float("inf") if rank > s.size else float(s[rank - 1])


def windowed(scores: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Running mean over the last `window` scores of one episode (shorter at the start): the statistic the
    monitor compares with its threshold, so calibration must use it too."""
    x = np.asarray(scores, dtype=np.float64).ravel()
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    c = np.cumsum(np.concatenate([[0.0], x]))
    idx = np.arange(1, x.size + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def calibrate(episodes: Sequence[Sequence[float]], window: int, alphas: dict[str, float]) -> dict[str, float]:
    """Thresholds per verdict level from the per-plan scores of successful nominal episodes.

    Every windowed score of every calibration episode is one calibration score, so the guarantee is per
    plan (the false-alarm rate a running robot sees per decision).
    """
    pooled = np.concatenate([windowed(e, window) for e in episodes if len(e)])
    return {level: conformal_threshold(pooled, a) for level, a in alphas.items()}
