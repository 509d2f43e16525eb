"""runtime/alerts.py: the alerter deduplicates per (robot, monitor), stores before it publishes (real SQLite,
a real ZeroMQ stream), and forgets a robot's raised pairs."""

from __future__ import annotations

import numpy as np
import zmq

from vigil.monitors.base import Level, Verdict
from vigil.runtime.alerts import Alerter
from vigil.runtime.store import AlertStore
from vigil.runtime.stream import OperatorStream, receive, subscribe
from vigil.wire.protocol import Message


def test_alerter_dedup_stores_then_publishes(tmp_path):
    ctx = zmq.Context.instance()
    store = AlertStore(tmp_path / "alerts.db")
    stream = OperatorStream(ctx, "inproc://alerter-test")
    sub = subscribe(ctx, "inproc://alerter-test", ["alert.", "sync"])
    try:
        for _ in range(100):  # wait until the subscription is in place
            stream.publish("sync", Message("telemetry"))
            if list(receive(sub, timeout_ms=20)):
                break
        alerter = Alerter(store, stream, repeat_s=10.0)
        warn, alert, ok = (Verdict("saturation", lvl, "saturated", {"fraction": np.float64(0.5)})
                           for lvl in (Level.WARN, Level.ALERT, Level.OK))
        observed = [(t, r, alerter.observe("r1", v, now=t)) for t, r, v in [
            (0.0, "r1", warn),     # rises from ok: filed
            (1.0, "r1", warn),     # same level within repeat_s: counted
            (2.0, "r1", warn),     # counted
            (3.0, "r1", alert),    # rises: filed, carrying the 2 suppressed occurrences
            (4.0, "r1", warn),     # lower level within repeat_s: counted
            (13.5, "r1", warn),    # still above ok repeat_s after the last alert: repeated
            (14.0, "r1", ok),      # back to ok: re-armed
            (14.5, "r1", warn),    # rises again at once
        ]]
        filed = [rec for _, _, rec in observed if rec is not None]
        assert [rec is not None for *_, rec in observed] == [True, False, False, True, False, True, False, True]
        assert [(r.severity, r.count) for r in filed] == [("warn", 1), ("alert", 3), ("warn", 2), ("warn", 1)]
        # pairs are independent: another robot, and another monitor of the same robot
        other = alerter.observe("r2", warn, now=14.6)
        deadline = alerter.observe("r1", Verdict("deadline", Level.STOP, "late"), now=14.7)
        assert other is not None and deadline is not None
        assert alerter.observe("r3", ok, now=15.0) is None  # ok for a pair never raised: nothing
        assert alerter.filed == 6 and alerter.suppressed == 3
        stored_ = store.since(0)
        assert [r.id for r in stored_] == [r.id for r in filed] + [other.id, deadline.id]
        assert stored_[0].values == {"fraction": 0.5}
        published = [(t, m) for t, m in receive(sub, timeout_ms=500) if m.kind == "alert"]
        assert [(t, m.seq, m.robot) for t, m in published] == [
            (f"alert.{r.severity}", r.id, r.robot) for r in stored_]
        assert [m.meta for _, m in published] == [r.to_meta() for r in stored_]
    finally:
        sub.close(0)
        stream.close()
        store.close()


def test_alerter_forget_clears_a_robots_raised_pairs(tmp_path):
    store = AlertStore(tmp_path / "alerts.db")
    try:
        alerter = Alerter(store, None, repeat_s=10.0)
        warn = Verdict("saturation", Level.WARN, "saturated")
        assert alerter.observe("gone", warn, now=0.0) is not None
        assert alerter.observe("stays", warn, now=0.0) is not None
        alerter.forget("gone")
        assert alerter.raised  # "stays" is still raised
        assert alerter.observe("gone", warn, now=1.0) is not None  # a robot of that name starts afresh
        alerter.forget("gone")
        alerter.forget("stays")
        assert not alerter.raised  # nothing raised any more: the tick path skips the alerter again
    finally:
        store.close()
