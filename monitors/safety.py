"""Safety monitors that need no learning: observation sanity, action saturation, deadlines, link loss."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence

import numpy as np

from vigil.monitors.base import Level, Monitor, Tick, Verdict
from vigil.wire.protocol import ArraySpec

SMALL = 64  # arrays up to this many elements are checked as Python numbers (faster than numpy on so few)


class ObservationMonitor(Monitor):
    """Non-finite values stop the robot; values outside the declared [low, high] raise an alert.

    The wire already refuses NaN and infinity, so the non-finite branch is defence in depth for
    observations that reach the monitors by another path (in-process use, future transports).
    """

    name = "observation"

    def __init__(self, specs: Sequence[ArraySpec]):
        self._checks = []
        big = np.finfo(np.float64).max  # an open side is +-max, not +-inf, so that infinities still fail the check
        for s in specs:
            low = np.asarray(s.low if s.low is not None else np.full(s.shape, -big), np.float64).reshape(s.shape)
            high = np.asarray(s.high if s.high is not None else np.full(s.shape, big), np.float64).reshape(s.shape)
            bounded = s.low is not None or s.high is not None
            small = int(np.prod(s.shape)) <= SMALL
            self._checks.append((s.name, low, high, bounded, small, low.ravel().tolist(), high.ravel().tolist()))

    def update(self, tick: Tick) -> Verdict:
        for name, low, high, bounded, small, low_list, high_list in self._checks:
            x = tick.obs[name]
            if not bounded and x.dtype.kind != "f":
                continue  # integers are always finite; nothing else to check
            if small:  # Python floats: numpy's per-call overhead is most of the cost on a few elements
                values = x.ravel().tolist()
                # NaN fails both comparisons, so it lands in the slow path too
                inside = (all(lo <= v <= hi for v, lo, hi in zip(values, low_list, high_list)) if bounded
                          else all(map(math.isfinite, values)))
            else:
                inside = ((x >= low) & (x <= high)).all() if bounded else np.isfinite(x).all()
            if not inside:
                return self._diagnose(name, x, low, high)
        return self.ok()

    def _diagnose(self, name: str, x: np.ndarray, low: np.ndarray, high: np.ndarray) -> Verdict:
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            return Verdict(self.name, Level.STOP, f"{name} has non-finite values")
        if (x < low).any():
            i = int(np.argmax(low - x))
            return Verdict(self.name, Level.ALERT, f"{name}[{i}] below its range",
                           {"index": i, "value": float(x.flat[i]), "low": float(low.flat[i])})
        i = int(np.argmax(x - high))
        return Verdict(self.name, Level.ALERT, f"{name}[{i}] above its range",
                       {"index": i, "value": float(x.flat[i]), "high": float(high.flat[i])})


class ActionMonitor(Monitor):
    """A policy that outputs NaN or infinity must never move the robot: stop, send the safe action."""

    name = "action"

    def update(self, tick: Tick) -> Verdict:
        raw = tick.raw_action
        if all(map(math.isfinite, raw.tolist())) if raw.size <= SMALL else np.isfinite(raw).all():
            return self.ok()
        return Verdict(self.name, Level.STOP, "policy output is not finite",
                       {"nonfinite": int((~np.isfinite(tick.raw_action)).sum())})


class SaturationMonitor(Monitor):
    """The policy keeps asking for more than the actuators allow: warn at `warn_fraction` of the last
    `window` ticks saturated, alert when every tick of the window was.

    An exploring policy (docs/bundles.md, `gaussian`) samples around its mean, and its samples reach the bounds
    by design; it reports whether its *mean* was beyond them as the score `mean_clipped`, which is judged
    instead, so that exploration does not raise alerts the policy's intent would not."""

    name = "saturation"

    def __init__(self, window: int = 20, warn_fraction: float = 0.5):
        self.window, self.warn_fraction = window, warn_fraction
        self._hits: deque[bool] = deque(maxlen=window)
        self._count = 0

    def update(self, tick: Tick) -> Verdict:
        intent = tick.scores.get("mean_clipped")
        hit = tick.clipped if intent is None else intent >= 0.5  # the policy asked for too much
        if hit is None:
            hit = bool((tick.raw_action != tick.action).any())
        if len(self._hits) == self.window:
            self._count -= self._hits[0]
        self._hits.append(hit)
        self._count += hit
        if not self._count or len(self._hits) < self.window:
            return self.ok()
        fraction = self._count / self.window
        if fraction >= 1.0:
            return Verdict(self.name, Level.ALERT, f"action saturated for {self.window} ticks", {"fraction": fraction})
        if fraction >= self.warn_fraction:
            return Verdict(self.name, Level.WARN, f"action saturated in {fraction:.0%} of the last {self.window} ticks",
                           {"fraction": fraction})
        return self.ok()

    def reset(self) -> None:
        self._hits.clear()
        self._count = 0


class DeadlineMonitor(Monitor):
    """An action decided later than the deadline after its observation arrived (queueing included) is stale:
    send the safe action instead."""

    name = "deadline"

    def __init__(self, deadline_s: float):
        self.deadline_s = deadline_s

    def update(self, tick: Tick) -> Verdict:
        if tick.compute_s > self.deadline_s:
            return Verdict(self.name, Level.STOP,
                           f"decided in {tick.compute_s * 1e3:.2f} ms, deadline {self.deadline_s * 1e3:.2f} ms",
                           {"compute_ms": tick.compute_s * 1e3, "deadline_ms": self.deadline_s * 1e3})
        return self.ok()



class LinkMonitor:
    """Silence on the robot link longer than `timeout_s` is link loss. Driven by the loop's timer, not by
    ticks (no tick arrives when the link is down); `check` reports the loss once, `seen` re-arms it."""

    name = "link"

    def __init__(self, timeout_s: float, now: float):
        self.timeout_s = timeout_s
        self.last_seen = now
        self.lost = False

    def seen(self, now: float) -> float | None:
        """Record traffic; returns the length of the outage if this ends one."""
        outage = now - self.last_seen if self.lost else None
        self.last_seen, self.lost = now, False
        return outage

    def check(self, now: float) -> Verdict | None:
        silence = now - self.last_seen
        if self.lost or silence <= self.timeout_s:
            return None
        self.lost = True
        return Verdict(self.name, Level.STOP, f"no message for {silence:.2f} s (timeout {self.timeout_s:.2f} s)",
                       {"silence_s": silence, "timeout_s": self.timeout_s})
