"""From verdicts to alerts: deduplicate, store durably, then publish.

A monitor that stays in the same state would otherwise file an alert every tick (100 per second at
100 Hz, each an fsync).  An alert is filed when a (robot, monitor) pair rises to a higher level than it
last reported, or when it is still at warn or above `repeat_s` after its last alert; occurrences in
between are counted and reported in the next alert's `count`.  Returning to ok re-arms the pair; occurrences
suppressed since the last alert of a condition that has ended are not filed again (that alert already told
the operator, and the `suppressed` counter keeps the total).

Filing goes through the runtime's `Outbox` (runtime/outbox.py): store first, then publish; if the store
cannot take an alert (locked, disk full, read-only), it waits in the outbox's bounded queue and is filed
by a later `retry`, so nothing is published that is not stored and the control loop never waits on the disk.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from vigil.monitors.base import Level, Verdict
from vigil.runtime.hooks import Hook
from vigil.runtime.outbox import Entry, Outbox
from vigil.runtime.store import AlertRecord, AlertStore
from vigil.runtime.stream import OperatorStream
from vigil.wire.protocol import Message

if TYPE_CHECKING:
    from vigil.runtime.session import Decision, Session

log = logging.getLogger("vigil.alerts")


@dataclass
class _State:
    level: Level = Level.OK
    last_t: float = 0.0
    suppressed: int = 0


class Alerter:
    def __init__(self, store: AlertStore, stream: OperatorStream | None, repeat_s: float = 5.0,
                 outbox: Outbox | None = None):
        self.store, self.stream, self.repeat_s = store, stream, repeat_s
        self.outbox = outbox or Outbox()
        self._state: dict[tuple[str, str], _State] = {}
        self._raised: set[tuple[str, str]] = set()  # pairs above ok: only these need an ok to re-arm
        self.filed = 0
        self.suppressed = 0
        self.last_id = 0  # the newest alert published: telemetry carries it, so a subscriber sees a gap at the tail

    @property
    def raised(self) -> bool:
        """Some (robot, monitor) pair is above ok: only then can an ok verdict change anything."""
        return bool(self._raised)

    def forget(self, robot: str) -> None:
        """A robot left: its conditions are no longer raised, and a robot of that name starts afresh."""
        for key in [k for k in self._state if k[0] == robot]:
            del self._state[key]
            self._raised.discard(key)

    def observe(self, robot: str, verdict: Verdict, now: float | None = None) -> AlertRecord | None:
        """Feed one verdict; returns the alert record if this verdict filed one."""
        key = (robot, verdict.monitor)
        if verdict.level == Level.OK:
            if key in self._raised:
                self._raised.discard(key)
                self._state[key] = _State()
            return None
        now = time.monotonic() if now is None else now
        state = self._state.setdefault(key, _State())
        self._raised.add(key)
        if verdict.level <= state.level and now - state.last_t < self.repeat_s:
            state.suppressed += 1
            self.suppressed += 1
            return None
        count = state.suppressed + 1
        state.level, state.last_t, state.suppressed = verdict.level, now, 0
        return self.file(robot, verdict, count)

    def file(self, robot: str, verdict: Verdict, count: int = 1) -> AlertRecord | None:
        """Store first (durable), then publish on `alert.<severity>`. Returns the record, or None if the
        store failed and the alert is queued in the outbox (filed by its `retry`)."""
        t_ns = time.time_ns()
        values = {k: _plain(v) for k, v in verdict.values.items()}
        write = partial(self.store.append, robot, verdict.level.label, verdict.monitor, verdict.reason, values,
                        count, t_ns)
        filed = self.outbox.put(Entry(write, self._publish, "alert"))
        return filed[-1] if filed and not self.outbox.pending else None

    def _publish(self, record: AlertRecord) -> None:
        self.filed += 1
        self.last_id = record.id
        if self.stream is not None:
            self.stream.publish(f"alert.{record.severity}",
                                Message("alert", record.robot, record.id, record.t_ns, {}, record.to_meta()))


def _plain(v):
    return v.item() if hasattr(v, "item") else v


POLICY_OK = Verdict("policy", Level.OK)


class AlertHook(Hook):
    """Every verdict becomes an alert (deduplicated by the `Alerter`): the monitors' verdicts of each tick, a
    rejected message, a robot's own error report, link loss; an `ok` re-arms a raised condition. It also
    tells the operator when the store fails or recovers: the store cannot hold that news, so it goes out
    unstored (an `alert` with id 0) with a telemetry event."""

    name = "alerts"

    def __init__(self, alerter: Alerter, stream: OperatorStream, store_path: str, counters: Counter):
        self.alerter, self.stream, self.store_path, self.counters = alerter, stream, store_path, counters

    def observe(self, robot: str, verdict: Verdict) -> None:
        try:
            self.alerter.observe(robot, verdict)
        except Exception:  # the store failing must not stop the control loop (issue: disk full)
            self.counters["alert_store_failed"] += 1
            log.exception("could not file alert %s", verdict)

    def file(self, robot: str, verdict: Verdict) -> None:
        """File `verdict` as an alert now, whatever was filed before (swaps, learner fallbacks)."""
        try:
            self.alerter.file(robot, verdict)
        except Exception:
            self.counters["alert_store_failed"] += 1
            log.exception("could not file alert %s", verdict)

    def on_decision(self, session: Session, obs: Message, decision: Decision) -> None:
        if decision.verdicts or self.alerter.raised:  # ok verdicts matter only to re-arm a raised alert
            robot = session.robot
            for v in decision.judged:
                self.observe(robot, v)
            if not decision.failed:
                self.observe(robot, POLICY_OK)  # the policy answered: re-arms a `policy` stop

    def on_verdict(self, robot: str, verdict: Verdict) -> None:
        self.observe(robot, verdict)

    def on_link_lost(self, session: Session, verdict: Verdict) -> None:
        self.observe(session.robot, verdict)

    def on_link_restored(self, session: Session, outage_s: float) -> None:
        self.observe(session.robot, Verdict("link", Level.OK))

    def on_forget(self, session: Session, reason: str) -> None:
        self.alerter.forget(session.robot)

    def on_timer(self, now: float) -> None:
        self.alerter.outbox.retry()  # file what waits, or publish what the writer thread has stored

    def on_store_change(self, error: str | None) -> None:
        """The store refuses records (disk full, read-only, locked) or takes them again. Held records are filed,
        in order, as soon as the store takes them (runtime/outbox.py)."""
        outbox = self.alerter.outbox
        pending = len(outbox.pending)
        if error is not None:
            self.counters["store_failures"] += 1
            severity, reason = "alert", (f"the alert store {self.store_path} cannot be written ({error}); "
                                         f"{pending} record(s) held in memory until it can; the control loop goes on")
        else:
            severity, reason = "warn", f"the alert store {self.store_path} is writable again; held records filed"
        values = {"store": self.store_path, "error": error or "", "pending": pending, "dropped": outbox.dropped}
        self.stream.publish(f"alert.{severity}", Message("alert", "", 0, 0, {}, {
            "id": 0, "severity": severity, "monitor": "store", "reason": reason, "values": values, "count": 1,
            "stored": False}))
        self.stream.event("", "store_failing" if error is not None else "store_ok", values)

    def stats(self) -> Mapping[str, Any]:
        a, outbox = self.alerter, self.alerter.outbox
        return {"alerts": {"filed": a.filed, "suppressed": a.suppressed, "last_id": a.last_id,
                           "pending": len(outbox.pending), "dropped": outbox.dropped}}
