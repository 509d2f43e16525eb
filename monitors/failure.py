"""Failure monitor: will this episode fail? Signals from the plan graph, per-task time-varying bands, one logit.

The method and its evaluation: docs/failure.md. Every plan the bundle's graph reports `vfd` and, for bundles
exported with density heads, `rnd` and `logpzo` (training/density.py); the monitor adds `stillness`, minus the log of
how far the observed state moved since the previous plan (`stillness()`). For each feature the monitor keeps a
running mean over `window` plans and turns it into an exceedance z = (mean - centre(t)) / scale(t) of the
task's band at the episode's plan index t (monitors/bands.py). A logistic model combines them,

    logit(t) = bias + sum_f weight_f * clip(z_f(t)),

and the logit is judged against its own band: an `alert` when its exceedance passes q, the level calibrated for
a per-episode false-alarm rate (`alpha`, 10% by default), a `warn` at the looser q_warn if present. Everything
comes from the manifest's `monitor.failure`, written by `vigil calibrate` (training/calibrate.py):

    {"features": ["vfd", "rnd", "logpzo", "stillness"], "window": 3, "bias": b, "weights": [...],
     "bands": {"<task>": {"vfd": band, "rnd": band, "logpzo": band, "logit": band}, "*": {...}},
     "instructions": {"<instruction>": "<task>"}, "alpha": 0.1, "q_warn": ... (optional)}

with band = {"centre": [...], "scale": [...], "q": ...}. The task comes from the episode's reset (`task`, or
the instruction looked up in `instructions`); an unknown task uses the "*" band of all calibration tasks pooled.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from vigil.monitors.bands import Band
from vigil.monitors.base import Level, Monitor, Tick, Verdict

POOLED = "*"
Z_CLIP = (-5.0, 20.0)
STILL = "stillness"  # the one feature computed from the observations, not reported by the graph


def stillness(previous: np.ndarray | None, state: np.ndarray) -> float:
    """Minus the log of how far the state moved since the previous plan (0.0 at an episode's first plan): high when
    the robot has stalled, or pushes against something, while the task is not done."""
    if previous is None:
        return 0.0
    return -float(np.log(np.linalg.norm(np.asarray(state, np.float64) - previous) + 1e-6))


def base_name(feature: str) -> tuple[str, bool]:
    """("vfd", False) for "vfd" (judged against the episode's task band), ("vfd", True) for "vfd@pooled" (against
    the band of all calibration tasks pooled, which keeps what tells tasks apart)."""
    name, _, where = feature.partition("@")
    if where not in ("", "pooled"):
        raise ValueError(f"monitor.failure.features: {feature!r} must be a score name, optionally with '@pooled'")
    return name, where == "pooled"


class FailureMonitor(Monitor):
    name = "failure"

    def __init__(self, features: tuple[str, ...], bias: float, weights: tuple[float, ...],
                 bands: Mapping[str, Mapping[str, Band]], window: int = 3,
                 instructions: Mapping[str, str] | None = None, q_warn: float | None = None,
                 logit_band: str = "task"):
        if len(weights) != len(features) or not features:
            raise ValueError(f"monitor.failure: {len(features)} features but {len(weights)} weights")
        if window < 1:
            raise ValueError(f"monitor.failure.window must be >= 1, got {window}")
        if logit_band not in ("task", "pooled"):
            raise ValueError(f"monitor.failure.logit_band must be 'task' or 'pooled', got {logit_band!r}")
        if POOLED not in bands:
            raise ValueError(f"monitor.failure.bands must hold the pooled band {POOLED!r}")
        self._parts = [base_name(f) for f in features]
        self.bases = tuple(dict.fromkeys(name for name, _ in self._parts))
        for task, b in bands.items():
            missing = [k for k in (*self.bases, "logit") if k not in b]
            if missing:
                raise ValueError(f"monitor.failure.bands.{task} lacks {missing}")
        self.features, self.bias, self.weights = tuple(features), float(bias), tuple(float(w) for w in weights)
        self.bands, self.window, self.logit_band = dict(bands), int(window), logit_band
        self.instructions = dict(instructions or {})
        self.q_warn = q_warn
        self._band = self.bands[POOLED]
        self._task = POOLED
        self._recent = {f: deque(maxlen=self.window) for f in self.bases}
        self._t = 0
        self._plans = -1
        self._state: np.ndarray | None = None
        self._last = self.ok()

    @classmethod
    def from_manifest(cls, config: Mapping[str, Any]) -> FailureMonitor:
        try:
            features = tuple(str(f) for f in config["features"])
            bands = {str(task): {k: Band.from_dict(v, f"monitor.failure.bands.{task}.{k}") for k, v in b.items()}
                     for task, b in config["bands"].items()}
            return cls(features, float(config["bias"]), tuple(float(w) for w in config["weights"]), bands,
                       int(config.get("window", 3)), config.get("instructions"), config.get("q_warn"),
                       str(config.get("logit_band", "task")))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"monitor.failure must hold features, bias, weights and bands ({exc!r})") from None

    def start_episode(self, info: Mapping[str, Any]) -> None:
        task = info.get("task")
        if task not in self.bands:
            task = self.instructions.get(str(info.get("instruction")), POOLED)
        self._task = task if task in self.bands else POOLED
        self._band = self.bands[self._task]

    def update(self, tick: Tick) -> Verdict:
        if tick.plan == self._plans or any(f not in tick.scores for f in self.bases if f != STILL):
            return self._last  # no new plan this tick (or a bundle without these outputs): the last verdict stands
        self._plans = tick.plan
        t = self._t
        self._t += 1
        means = {}
        for f, recent in self._recent.items():
            if f == STILL:
                state = np.asarray(tick.obs.get("state", ()), np.float64)
                recent.append(stillness(self._state, state) if state.shape == getattr(self._state, "shape", None)
                              else 0.0)
                self._state = state
            else:
                recent.append(float(tick.scores[f]))
            means[f] = sum(recent) / len(recent)
        logit = self.bias
        for (f, pooled), w in zip(self._parts, self.weights):
            z = (self.bands[POOLED] if pooled else self._band)[f].z(t, means[f])
            logit += w * min(max(z, Z_CLIP[0]), Z_CLIP[1])
        band = (self.bands[POOLED] if self.logit_band == "pooled" else self._band)["logit"]
        z = band.z(t, logit)
        self._last = self.ok()
        if not math.isfinite(z):
            return self._last
        where = "pooled" if self.logit_band == "pooled" else self._task
        for level, q in ((Level.ALERT, band.q), (Level.WARN, self.q_warn)):
            if q is not None and z > q:
                self._last = Verdict(self.name, level, f"failure logit {logit:.3g} above the {where} band "
                                     f"({level.label}, plan {t}, task {self._task})",
                                     {"logit": logit, "z": z, "threshold": band.threshold(t), "plan": float(t)})
                break
        return self._last

    def reset(self) -> None:
        for d in self._recent.values():
            d.clear()
        self._t = 0
        self._plans = -1
        self._state = None
        self._last = self.ok()
        self._band, self._task = self.bands[POOLED], POOLED
