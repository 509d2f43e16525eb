"""Stability monitor: is the closed loop blowing up?

A linear controller that learns on board (IR-LQR, runtime/learning.py) may, for a while, act with a gain
that destabilises the real system: its prior was wrong, or its estimate is. The learner's own guard replaces
a gain its estimate says is unstable, but the estimate can be wrong too; this monitor judges the state
itself, every tick, and stops the robot (the bundle's safe action) while

    ||x|| > bound                                            (the state left the region the model is for), or
    ||x|| > min_norm  and  ||x|| > growth * ||x, window ticks ago||        (fast growth: instability)
                      where the earlier norm is at least min_norm / growth (a ratio to a state at rest,
                      e.g. a reset to x0 = 0, is meaningless: noise alone makes it huge)

Both are `stop` verdicts, so the runtime sends the safe action and files a `stop` alert (deduplicated like
every alert). The verdict is judged afresh every tick: once the state no longer grows that fast (the safe
action, or a new gain, took over) the policy acts again. The window restarts with each episode.

Settings come from the manifest's `monitor.stability` block (docs/bundles.md):

    {"array": "state", "window": 20, "growth": 100.0, "min_norm": 1.0, "bound": 100.0}

`vigil bundle lqr --learner irlqr` writes one; a bundle with a `learner` and no block gets these defaults.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from vigil.monitors.base import Level, Monitor, Tick, Verdict

DEFAULTS: dict[str, Any] = {"array": "state", "window": 20, "growth": 100.0, "min_norm": 1.0, "bound": 100.0}


def _positive(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def check_block(block: Any, arrays: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Validate a `monitor.stability` block against the observation arrays (name -> shape); returns it with
    defaults filled in. Raises ValueError naming the key."""
    if not isinstance(block, Mapping):
        raise ValueError(f"manifest key 'monitor.stability' must be a map {{array, window, growth, min_norm, "
                         f"bound}}, got {block!r}")
    unknown = sorted(set(block) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"manifest key 'monitor.stability.{unknown[0]}' is not a setting (known: "
                         f"{', '.join(DEFAULTS)})")
    out = {**DEFAULTS, **block}
    if out["array"] not in arrays:
        raise ValueError(f"manifest key 'monitor.stability.array' must name an observation array "
                         f"({sorted(arrays)}), got {out['array']!r}")
    if type(out["window"]) is not int or out["window"] < 1:
        raise ValueError(f"manifest key 'monitor.stability.window' must be an integer >= 1 (ticks), "
                         f"got {out['window']!r}")
    for key in ("growth", "min_norm", "bound"):
        if not _positive(out[key]):
            raise ValueError(f"manifest key 'monitor.stability.{key}' must be a finite number > 0, got {out[key]!r}")
    if out["growth"] <= 1:
        raise ValueError(f"manifest key 'monitor.stability.growth' must be > 1 (a factor), got {out['growth']!r}")
    return out


class StabilityMonitor(Monitor):
    name = "stability"

    def __init__(self, array: str = "state", window: int = 20, growth: float = 100.0, min_norm: float = 1.0,
                 bound: float = 100.0):
        self.array, self.window, self.growth = array, int(window), float(growth)
        self.min_norm, self.bound = float(min_norm), float(bound)
        self._norms: deque[float] = deque(maxlen=self.window + 1)

    @classmethod
    def from_manifest(cls, block: Mapping[str, Any] | None) -> StabilityMonitor:
        """From a block already checked by `check_block` (None: the defaults)."""
        b = {**DEFAULTS, **(block or {})}
        return cls(str(b["array"]), int(b["window"]), float(b["growth"]), float(b["min_norm"]), float(b["bound"]))

    def update(self, tick: Tick) -> Verdict:
        x = np.asarray(tick.obs[self.array], np.float64)
        r = float(np.sqrt(np.dot(x.ravel(), x.ravel())))
        self._norms.append(r)
        if not math.isfinite(r):
            return Verdict(self.name, Level.STOP, f"{self.array} is not finite")
        if r > self.bound:
            return Verdict(self.name, Level.STOP, f"state norm {r:.4g} beyond the bound {self.bound:.4g}",
                           {"norm": r, "bound": self.bound})
        if len(self._norms) > self.window and r > self.min_norm:
            before = self._norms[0]
            if before >= self.min_norm / self.growth and r > self.growth * before:
                return Verdict(self.name, Level.STOP,
                               f"state norm grew x{r / max(before, 1e-300):.3g} in {self.window} ticks "
                               f"({before:.3g} -> {r:.3g}): unstable", {"norm": r, "before": before,
                                                                         "window": self.window, "growth": self.growth})
        return self.ok()

    def reset(self) -> None:
        self._norms.clear()
