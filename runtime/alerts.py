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

import time
from dataclasses import dataclass
from functools import partial

from vigil.monitors.base import Level, Verdict
from vigil.runtime.outbox import Entry, Outbox
from vigil.runtime.store import AlertRecord, AlertStore
from vigil.runtime.stream import OperatorStream
from vigil.wire.protocol import Message


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
