"""Executing action chunks while the next one is planned: a pure, per-robot state machine over ticks.

No threads, no clock: the runtime (runtime/planner.py) and the bench drive it tick by tick, so every merge
strategy can be compared on the same episodes and every rule is testable in process. Symbols (policies/rtc.py):
chunk length H, execution horizon s (ticks between the starts of two plans), inference delay d in ticks,
d <= s <= H - d. A plan started at tick t0 uses the observation of tick t0 and its index 0 is the action for
tick t0; the actions of the executing chunk for ticks t0 .. t0 + d - 1 are committed (the robot executes them
while the plan is computed).

Per tick the driver calls, in order: `deliver` for each plan that became available at this tick, `request`
(a plan to start now, or None), then `action` (the action for this tick, or None when no chunk covers it:
the runtime then sends the safe action). Merge strategies (`MERGES`):

- "rtc": real-time chunking; the request carries the prefix Y and weights W for the graph; a plan is adopted
  at started + d (or, late, at its arrival from the index of the elapsed ticks).
- "naive": switch to a plan when it arrives, no prefix.
- "blend": switch on arrival; over the overlap 0.3 old + 0.7 new (LeRobot's async inference).
- "temporal": ACT's temporal ensembling: a plan every tick (s = 1), each tick's action the average of every
  chunk's prediction for it, weights exp(-0.01 i), i = 0 the oldest.
- "sync": today's behaviour: the observation waits for the plan (`PlanRequest.blocking`); s = the manifest's
  execute; a delivered plan's arrival minus its start is counted as ticks waited.

The first plan of an episode is always blocking: there is nothing to execute while it is computed.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vigil.policies.rtc import prefix_weights

MERGES = ("rtc", "naive", "blend", "temporal", "sync")
BLEND_OLD = 0.3  # LeRobot's async inference: the old chunk's share over the overlap
TEMPORAL_DECAY = 0.01  # ACT: w_i = exp(-0.01 i), i = 0 the oldest prediction


@dataclass(frozen=True)
class PlanRequest:
    """A plan to start at `tick` with that tick's observation. `prefix` (H, m) and `weights` (H,) are the RTC
    graph inputs (None unless merge is "rtc" and a chunk is executing); `blocking`: the observation waits for
    it (the first plan of an episode, and every plan in "sync")."""

    tick: int
    delay: int  # d assumed: the plan is adopted at tick + delay
    execute: int  # s: ticks since the executing chunk started (its index of Y[0])
    prefix: np.ndarray | None = None
    weights: np.ndarray | None = None
    blocking: bool = False


@dataclass(frozen=True)
class ActionInfo:
    """What `action` did this tick: the executing chunk's tag (who made it) and scores, its index for this
    tick (plan age in ticks), and whether a plan was adopted at this tick."""

    tag: Any = None
    scores: Mapping[str, float] = field(default_factory=dict)
    age: int = -1
    adopted: bool = False
    exhausted: bool = False


@dataclass
class _Chunk:
    actions: np.ndarray  # (H, m)
    start: int  # tick of index 0
    scores: Mapping[str, float]
    tag: Any
    delay: int  # d the plan was requested with
    arrived: int = 0


class DelayEstimator:
    """d = ceil of the q-quantile of the recent measured plan delays in ticks (the quantile, not the mean: a
    plan later than d costs committed actions, so the tail is what matters). Before any measurement: `initial`."""

    def __init__(self, quantile: float = 0.9, window: int = 64, initial: int = 1):
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        self.quantile = quantile
        self.initial = max(0, int(initial))
        self._ticks: deque[int] = deque(maxlen=window)
        self._estimate: int | None = None  # cached: asked every tick, changed only by `add`

    def add(self, ticks: int) -> None:
        self._ticks.append(int(ticks))
        self._estimate = None

    @property
    def samples(self) -> list[int]:
        return list(self._ticks)

    def estimate(self) -> int:
        if not self._ticks:
            return self.initial
        if self._estimate is None:
            q = float(np.quantile(np.asarray(self._ticks, np.float64), self.quantile))
            self._estimate = int(math.ceil(q - 1e-9))
        return self._estimate


class ChunkExecutor:
    """One robot's chunk execution under a merge strategy (module docstring). `execute` is s (the manifest's
    chunk.execute by default); `adaptive_vfd`: when the executing chunk's `vfd` score is above it, the next plan
    starts at s = max(d, 1). `rtc_schedule`: "exp" for guided RTC, "zeros" (a hard mask) for training-time RTC;
    `max_delay`: the largest d a training-time-RTC policy was trained for (d is capped there, as at H // 2)."""

    def __init__(self, horizon: int, execute: int, merge: str = "rtc", *, quantile: float = 0.9,
                 initial_delay: int = 1, window: int = 64, rtc_schedule: str = "exp",
                 adaptive_vfd: float | None = None, max_in_flight: int | None = None, max_delay: int | None = None):
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        if horizon < 1 or not 1 <= execute <= horizon:
            raise ValueError(f"need 1 <= execute <= horizon, got H={horizon}, s={execute}")
        self.horizon, self.execute, self.merge = horizon, execute, merge
        self.rtc_schedule = rtc_schedule
        self.adaptive_vfd = adaptive_vfd
        self.delays = DelayEstimator(quantile, window, initial_delay)
        self.max_in_flight = max_in_flight or (horizon if merge == "temporal" else 1)
        # d is capped at H // 2, and at the delay a training-time-RTC policy was trained for
        self.max_delay = horizon // 2 if max_delay is None else max(1, min(horizon // 2, max_delay))
        self.counts: dict[str, int] = {"requested": 0, "adopted": 0, "late": 0, "stale": 0, "exhausted": 0,
                                       "delay_capped": 0, "waited_ticks": 0, "adaptive": 0}
        self.reset()

    def reset(self) -> None:
        """A new episode: nothing executing, nothing in flight (a plan still computing is dropped by its caller)."""
        self._current: _Chunk | None = None
        self._previous: _Chunk | None = None  # blend: the chunk the current one replaced
        self._chunks: list[_Chunk] = []  # temporal: every chunk that may still cover a tick
        self._pending: list[_Chunk] = []  # delivered, not adopted yet
        self._in_flight: dict[int, int] = {}  # plans requested and not delivered: start tick -> the d assumed
        self._started = False  # some chunk was adopted this episode
        self._adopted_at = -1  # the last tick a plan was adopted at (by `request` or `action`)

    # -- the delay and the horizon -----------------------------------------------------------------------

    def schedule(self) -> tuple[int, int]:
        """(d, s) for the next plan: d the delay estimate, capped at H // 2, s raised to d and kept <= H - d;
        s = max(d, 1) when the executing chunk's VFD is above `adaptive_vfd`."""
        d, s, _, _ = self._schedule()
        return d, s

    def _schedule(self) -> tuple[int, int, bool, bool]:
        """(d, s, whether d was capped, whether the adaptive horizon applied)."""
        if self.merge == "sync":
            return 0, self.execute, False, False
        if self.merge == "temporal":
            return min(self.delays.estimate(), self.horizon - 1), 1, False, False
        d = self.delays.estimate()
        capped = d > self.max_delay
        if capped:
            d = self.max_delay
        s = self.execute
        cur = self._current
        adaptive = (self.adaptive_vfd is not None and cur is not None
                    and float(cur.scores.get("vfd", -math.inf)) > self.adaptive_vfd)
        if adaptive:
            s = max(d, 1)
        s = min(max(s, d), self.horizon - d)
        return d, max(s, 1), capped, adaptive

    # -- the tick ------------------------------------------------------------------------------------------

    def request(self, tick: int) -> PlanRequest | None:
        """Whether a plan should start at `tick` (with this tick's observation); counts it as in flight."""
        self._adopt(tick)
        if len(self._in_flight) >= self.max_in_flight or self._pending:
            return None
        if not self._started:
            return self._start(tick, 0, 0, blocking=True)
        d, s, capped, adaptive = self._schedule()
        if self.merge == "temporal":
            return self._start(tick, d, 1)
        cur = self._current
        if cur is None:  # exhausted and nothing coming: start one now (not blocking: no observation waits)
            return self._start(tick, d, s)
        age = tick - cur.start
        if self.merge == "sync":
            return self._start(tick, 0, s, blocking=True) if age >= self.execute else None
        if age < s:
            return None
        self.counts["delay_capped"] += capped  # counted per plan, not per tick
        self.counts["adaptive"] += adaptive
        prefix = weights = None
        if self.merge == "rtc":
            prefix = np.zeros_like(cur.actions)
            rest = cur.actions[age:]
            prefix[:len(rest)] = rest
            weights = prefix_weights(self.horizon, min(age, self.horizon), d, self.rtc_schedule)
        return self._start(tick, d, age, prefix, weights)

    def _start(self, tick: int, d: int, s: int, prefix: np.ndarray | None = None, weights: np.ndarray | None = None,
               blocking: bool = False) -> PlanRequest:
        self._in_flight[tick] = d
        self.counts["requested"] += 1
        return PlanRequest(tick, d, s, prefix, weights, blocking)

    def deliver(self, actions: np.ndarray, started: int, arrived: int, scores: Mapping[str, float] | None = None,
                tag: Any = None) -> None:
        """The plan requested at tick `started` is available from tick `arrived` on (its measured delay is
        arrived - started ticks). `tag` is returned with its actions (who made it)."""
        actions = np.asarray(actions)
        if actions.ndim != 2 or len(actions) != self.horizon:
            raise ValueError(f"a plan must be (H={self.horizon}, m), got {actions.shape}")
        if started not in self._in_flight:
            raise ValueError(f"no plan requested at tick {started} is in flight")
        d = self._in_flight.pop(started)
        waited = arrived - started
        if self.merge == "sync" or not self._started:
            self.counts["waited_ticks"] += max(0, waited)
            arrived = started  # the observation waited for it: it is this tick's plan
        else:
            self.delays.add(waited)
        self._pending.append(_Chunk(actions, started, dict(scores or {}), tag, d, arrived))

    def drop(self, started: int) -> None:
        """A plan in flight will never be delivered (its worker failed, or it was discarded)."""
        self._in_flight.pop(started, None)

    def action(self, tick: int) -> tuple[np.ndarray | None, ActionInfo]:
        """The action for `tick`, or None when no chunk covers it (never an action past a chunk's end)."""
        adopted = self._adopt(tick)
        if self.merge == "temporal":
            return self._temporal(tick, adopted)
        cur = self._covering(tick)
        if cur is None:
            self.counts["exhausted"] += 1
            return None, ActionInfo(exhausted=True)
        age = tick - cur.start
        row = cur.actions[age]
        prev = self._previous
        if self.merge == "blend" and prev is not None and 0 <= tick - prev.start < len(prev.actions):
            row = BLEND_OLD * prev.actions[tick - prev.start] + (1.0 - BLEND_OLD) * row
        return row, ActionInfo(cur.tag, cur.scores, age, adopted)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def delay(self) -> int:
        """The d the next plan would assume."""
        return self.schedule()[0]

    # -- adoption ------------------------------------------------------------------------------------------

    def _due(self, chunk: _Chunk) -> int:
        """The tick a delivered chunk is adopted at."""
        if self.merge in ("rtc",) and self._started:
            return max(chunk.start + chunk.delay, chunk.arrived)
        return chunk.arrived

    def _adopt(self, tick: int) -> bool:
        """Adopt the delivered plans due at `tick`; whether a plan was adopted at this tick."""
        for chunk in sorted(self._pending, key=lambda c: c.start):
            due = self._due(chunk)
            if due > tick:
                continue
            self._pending.remove(chunk)
            if tick - chunk.start >= self.horizon:  # arrived after its whole horizon: useless
                self.counts["stale"] += 1
                continue
            if self._started and self.merge != "sync" and tick > chunk.start + chunk.delay:
                self.counts["late"] += 1
            if self.merge == "temporal":
                self._chunks.append(chunk)
            else:
                self._previous, self._current = self._current, chunk
            self._started = True
            self.counts["adopted"] += 1
            self._adopted_at = tick
        if self.merge == "temporal":
            self._chunks = [c for c in self._chunks if tick - c.start < self.horizon]
        return self._adopted_at == tick

    def _covering(self, tick: int) -> _Chunk | None:
        cur = self._current
        if cur is None:
            return None
        age = tick - cur.start
        limit = self.execute if self.merge == "sync" else self.horizon
        if not 0 <= age < limit:
            return None
        return cur

    def _temporal(self, tick: int, adopted: bool) -> tuple[np.ndarray | None, ActionInfo]:
        rows = [(c.start, c.actions[tick - c.start], c) for c in self._chunks if 0 <= tick - c.start < self.horizon]
        if not rows:
            self.counts["exhausted"] += 1
            return None, ActionInfo(exhausted=True)
        rows.sort(key=lambda r: r[0])  # oldest first: i = 0
        w = np.exp(-TEMPORAL_DECAY * np.arange(len(rows)))
        action = (w[:, None] * np.stack([r[1] for r in rows])).sum(0) / w.sum()
        newest = rows[-1][2]
        return action.astype(rows[0][1].dtype, copy=False), ActionInfo(newest.tag, newest.scores,
                                                                       tick - newest.start, adopted)

    def stats(self) -> dict[str, Any]:
        d, s = self.schedule()
        return {"merge": self.merge, "delay": d, "execute": s, **self.counts}
