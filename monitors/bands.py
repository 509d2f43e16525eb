"""Time-varying (functional) conformal bands: a threshold over an episode's time with a per-episode false-alarm rate.

A score that grows as an episode goes on (a policy is least sure when it starts moving, or while it grasps)
cannot be judged by one threshold: a constant high enough for the hardest moment misses everything else.
A band follows the score of successful episodes over time instead (docs/failure.md):

    centre c(t), scale s(t)   mean and std of the score at plan t over successful calibration episodes still
                              running at t (carried forward once fewer than `min_alive` run; smoothed)
    exceedance   z(t) = (score(t) - c(t)) / s(t)
    episode statistic   max_t z(t)          (an alarm fires at the first t with z(t) > q)
    q            the conformal (1 - alpha) quantile of the episode statistic over other successful calibration
                 episodes (split: the centre and scale come from one half, q from the other)

so that a successful episode raises an alarm with probability about alpha over its whole length: a per-episode
false-alarm rate, not a per-plan one. Scores are smoothed by a running mean of `window` plans first.
numpy only: the runtime monitor (monitors/failure.py), `vigil calibrate` and the benchmark share this code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def running_mean(x: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Causal running mean over the last `window` values (fewer at the start)."""
    x = np.asarray(x, float)
    if window <= 1 or not len(x):
        return x
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def conformal_quantile(values: Sequence[float], alpha: float) -> float:
    """The ceil((n + 1)(1 - alpha))-th smallest value (inf when n is too small for that rank)."""
    v = np.sort(np.asarray(values, float))
    k = math.ceil((len(v) + 1) * (1 - alpha))
    return float(v[k - 1]) if 1 <= k <= len(v) else math.inf


@dataclass(frozen=True)
class Band:
    """centre and scale per plan index (the last entry holds for later plans) and the exceedance quantile q."""

    centre: tuple[float, ...]
    scale: tuple[float, ...]
    q: float = math.inf

    def _at(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = np.minimum(t, len(self.centre) - 1)
        return np.asarray(self.centre)[i], np.asarray(self.scale)[i]

    def exceedance(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        """z(t) for an episode's (already windowed) per-plan scores."""
        s = np.asarray(scores, float)
        c, sc = self._at(np.arange(len(s)))
        return (s - c) / sc

    def z(self, t: int, score: float) -> float:
        """z at one plan index (the monitor's per-plan path)."""
        i = min(t, len(self.centre) - 1)
        return (score - self.centre[i]) / self.scale[i]

    def threshold(self, t: int) -> float:
        """The band itself at plan t: the score above which an alarm fires."""
        i = min(t, len(self.centre) - 1)
        return self.centre[i] + self.q * self.scale[i]

    def with_q(self, q: float) -> Band:
        return Band(self.centre, self.scale, float(q))

    def to_dict(self) -> dict[str, Any]:
        return {"centre": [float(f"{x:.6g}") for x in self.centre], "scale": [float(f"{x:.6g}") for x in self.scale],
                "q": self.q if math.isfinite(self.q) else None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], key: str = "band") -> Band:
        try:
            centre = tuple(float(x) for x in d["centre"])
            scale = tuple(float(x) for x in d["scale"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{key} must be a map with numeric lists 'centre' and 'scale' ({exc})") from None
        if not centre or len(centre) != len(scale) or min(scale) <= 0:
            raise ValueError(f"{key}: 'centre' and 'scale' must be non-empty, of equal length, scales > 0")
        q = d.get("q")
        return cls(centre, scale, math.inf if q is None else float(q))


def fit_shape(episodes: Sequence[np.ndarray], min_alive: int = 3, smooth: int = 3, scale_floor: float = 0.05) -> Band:
    """Centre and scale over time from successful episodes' (windowed) scores; q left at inf.

    smooth: running mean over +-smooth plans of both curves; scale_floor: scales are at least this fraction of
    the median scale (a plan where every calibration episode agreed must not make z explode)."""
    eps = [np.asarray(e, float) for e in episodes if len(e)]
    if not eps:
        raise ValueError("no episodes to fit a band on")
    T = max(len(e) for e in eps)
    centre, scale = np.empty(T), np.empty(T)
    last = None
    for t in range(T):
        alive = np.array([e[t] for e in eps if len(e) > t])
        if len(alive) >= min(min_alive, len(eps)):
            last = (alive.mean(), alive.std())
        elif last is None:
            last = (alive.mean(), alive.std())
        centre[t], scale[t] = last
    if smooth > 0 and T > 1:
        k = np.ones(2 * smooth + 1)
        norm = np.convolve(np.ones(T), k, "same")
        centre = np.convolve(centre, k, "same") / norm
        scale = np.convolve(scale, k, "same") / norm
    floor = max(scale_floor * float(np.median(scale)), 1e-9)
    scale = np.maximum(scale, floor)
    return Band(tuple(centre.tolist()), tuple(scale.tolist()))


def episode_statistic(band: Band, scores: Sequence[float] | np.ndarray) -> float:
    z = band.exceedance(scores)
    return float(z.max()) if len(z) else -math.inf


def split_halves(n: int) -> tuple[list[int], list[int]]:
    """Alternate episodes between the shape half and the quantile half (deterministic)."""
    return list(range(0, n, 2)), list(range(1, n, 2))
