"""Telemetry: what the operator stream says about the runtime besides alerts and requests.

Events as they happen (`connected`, `link_restored`, `disconnected`, `expired`; other parts publish
`gain`, `swapped`, `swap_refused`, `store_failing`, `store_ok`), and every `telemetry_s` one message with the
runtime's counters, every hook's figures, and per robot its counters, episode, whether its link is lost now
the percentiles of its reply latency (arrival of the observation to the reply handed to ZeroMQ) and of its
queue time (arrival to the start of the tick) over the ticks since the previous message. docs/protocol.md
§12 lists the keys.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from vigil.runtime.hooks import Hook
from vigil.runtime.stream import OperatorStream
from vigil.wire.protocol import Message

if TYPE_CHECKING:
    from vigil.runtime.server import Runtime
    from vigil.runtime.session import Decision, Session

_clock = time.perf_counter


class TelemetryHook(Hook):
    name = "telemetry"

    def __init__(self, runtime: Runtime, stream: OperatorStream, interval_s: float):
        self.runtime, self.stream, self.interval_s = runtime, stream, interval_s
        self._next = time.monotonic() + interval_s

    def on_hello(self, session: Session, resumed: bool) -> None:
        session.state[self.name] = ([], [])  # reply latencies and queue times (us) since the last telemetry message
        if not resumed:
            self.stream.event(session.robot, "connected", {"env": str(session.info.get("env", ""))})

    def on_decision(self, session: Session, obs: Message, decision: Decision) -> None:
        state = session.state[self.name]
        state[0].append((_clock() - decision.t_arrival) * 1e6)
        state[1].append(decision.queue_s * 1e6)

    def on_link_restored(self, session: Session, outage_s: float) -> None:
        self.stream.event(session.robot, "link_restored", {"outage_s": outage_s})

    def on_forget(self, session: Session, reason: str) -> None:
        self.stream.event(session.robot, reason, dict(session.counters))

    def on_timer(self, now: float) -> None:
        if now >= self._next:
            self._next = now + self.interval_s
            self.publish()

    def publish(self) -> None:
        """One periodic telemetry message (also sent once when the runtime stops)."""
        runtime = self.runtime
        robots: dict[str, Any] = {}
        for s in runtime.sessions.values():
            latency, queue = s.state.get(self.name) or ([], [])
            p50, p99 = percentiles(latency)
            q50, q99 = percentiles(queue)
            robots[s.robot] = {**s.counters, "episode": s.episode, "link_lost_now": s.link.lost,
                               "p50_us": p50, "p99_us": p99, "queue_p50_us": q50, "queue_p99_us": q99,
                               **runtime.hooks.robot_stats(s)}
            s.state[self.name] = ([], [])
        self.stream.publish("telemetry", Message("telemetry", "", 0, 0, {}, {
            "policy": runtime.manifest.policy_id, "counters": dict(runtime.counters), "robots": robots,
            **runtime.hooks.stats()}))


def percentiles(values: list[float]) -> tuple[float, float]:
    """p50 and p99 of a second's worth of one robot's ticks (0, 0 for none), by sorting: the loop publishes
    telemetry between ticks, and numpy's percentile costs tens of microseconds a call (with a first call
    that imports numpy.ma), which with many robots is a missed deadline."""
    if not values:
        return 0.0, 0.0
    ordered = sorted(values)
    return _rank(ordered, 0.50), _rank(ordered, 0.99)


def _rank(ordered: list[float], q: float) -> float:
    """numpy's default (linear) percentile of sorted values."""
    x = q * (len(ordered) - 1)
    i = int(x)
    if i + 1 >= len(ordered):
        return ordered[-1]
    return ordered[i] + (ordered[i + 1] - ordered[i]) * (x - i)
