"""VFD monitor: is the flow-matching ensemble out of its depth?

The policy graph returns a velocity-field-disagreement score with every plan
(docs/algorithms.md#vfd-velocity-field-disagreement).  The monitor
keeps a short running mean of the scores of the current episode and compares it with thresholds that were
calibrated conformally on successful nominal rollouts (monitors/conformal.py), stored in the bundle's
manifest under `monitor.vfd`:

    {"score": "vfd", "window": 3, "thresholds": {"warn": ..., "alert": ..., "stop": ...},
     "alphas": {"warn": 0.25, "alert": 0.1, "stop": 0.01}, "n_calibration": ...}

`alert` is the level calibrated at the paper's false-alarm rate (0.10 by default) and the one that files
data requests; `stop` (optional) sends the safe action.  Only plans are judged: between replans the last
verdict stands, so a chunk of k actions does not count one score k times.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

from vigil.monitors.base import Level, Monitor, Tick, Verdict

_LEVELS = (("stop", Level.STOP), ("alert", Level.ALERT), ("warn", Level.WARN))


class VFDMonitor(Monitor):
    name = "vfd"

    def __init__(self, thresholds: Mapping[str, float], window: int = 3, score: str = "vfd"):
        unknown = set(thresholds) - {name for name, _ in _LEVELS}
        if unknown:
            raise ValueError(f"monitor.vfd.thresholds has unknown levels {sorted(unknown)}; use warn, alert, stop")
        if window < 1:
            raise ValueError(f"monitor.vfd.window must be >= 1, got {window}")
        self.thresholds = [(level, float(thresholds[name])) for name, level in _LEVELS if name in thresholds]
        self.window, self.score = window, score
        self._recent: deque[float] = deque(maxlen=window)
        self._last = self.ok()
        self._plans = -1

    @classmethod
    def from_manifest(cls, config: Mapping[str, Any]) -> VFDMonitor:
        return cls(config["thresholds"], int(config.get("window", 3)), str(config.get("score", "vfd")))

    def update(self, tick: Tick) -> Verdict:
        value = tick.scores.get(self.score)
        if value is None or tick.plan == self._plans:  # no new plan this tick: the last verdict stands
            return self._last
        self._plans = tick.plan
        self._recent.append(value)
        mean = sum(self._recent) / len(self._recent)
        self._last = self.ok()
        for level, threshold in self.thresholds:
            if mean > threshold:
                self._last = Verdict(self.name, level, f"VFD {mean:.4g} above the {level.label} threshold "
                                     f"{threshold:.4g}", {"vfd": mean, "threshold": threshold, "score": value})
                break
        return self._last

    def reset(self) -> None:
        self._recent.clear()
        self._last = self.ok()
        self._plans = -1
