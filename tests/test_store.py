"""The alert store: what `append` acknowledged survives a kill -9 of the writer, and every alert the runtime
published on the operator stream is in the store even if the runtime is killed right after."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import child_env, pitch_specs

from vigil.runtime.client import RobotLink
from vigil.runtime.store import AlertStore
from vigil.wire.protocol import Message

WRITER = Path(__file__).with_name("store_writer.py")


def expected_record(i: int) -> dict:
    """What store_writer.py writes for its i-th append."""
    return {"robot": f"robot-{i % 3}", "severity": ("warn", "alert", "stop")[i % 3], "monitor": "writer",
            "reason": f"reason {i}", "values": {"i": i, "pad": "x" * (i % 50)}, "count": i + 1, "t_ns": 1_000_000 + i}


def test_kill_9_of_writer_loses_no_acknowledged_alert(tmp_path):
    path = tmp_path / "alerts.db"
    proc = subprocess.Popen([sys.executable, str(WRITER), str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=child_env())
    acked: dict[int, int] = {}
    try:
        for line in proc.stdout:
            rid, i = map(int, line.split())
            acked[rid] = i
            if len(acked) == 10:
                # a reader may open the store while it is being written, and sees what was acknowledged
                reader = AlertStore(path, readonly=True)
                assert set(acked) <= {r.id for r in reader.since(0)}
                reader.close()
            if len(acked) >= 60:
                break
        assert proc.poll() is None, proc.stderr.read()
    finally:
        proc.send_signal(signal.SIGKILL)  # mid-stream: the writer is inside its loop
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    # lines it printed before dying but we had not read yet were acknowledged too
    for line in proc.stdout.read().splitlines():
        parts = line.split()
        if len(parts) == 2:
            acked[int(parts[0])] = int(parts[1])
    proc.stdout.close()
    proc.stderr.close()
    assert len(acked) >= 60

    store = AlertStore(path, readonly=True)
    try:
        records = {r.id: r for r in store.since(0)}
    finally:
        store.close()
    for rid, i in acked.items():
        assert rid in records, f"acknowledged alert #{rid} (append {i}) is missing after kill -9"
        r = records[rid]
        got = {"robot": r.robot, "severity": r.severity, "monitor": r.monitor, "reason": r.reason,
               "values": dict(r.values), "count": r.count, "t_ns": r.t_ns}
        assert got == expected_record(i)
    # the writer is sequential (append, then print): at most the one append in flight is stored unacknowledged
    assert max(records) <= max(acked) + 1
    assert sorted(records) == list(range(1, max(records) + 1))
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()


def test_since_limit_readonly_and_values(tmp_path):
    path = tmp_path / "alerts.db"
    with pytest.raises(FileNotFoundError):
        AlertStore(path, readonly=True)
    store = AlertStore(path)
    ids = [store.append("r", "warn", "m", f"n{k}", {"k": k, "nested": {"a": [1, 2.5, None]}}).id for k in range(5)]
    assert ids == [1, 2, 3, 4, 5]
    assert [r.reason for r in store.since(2)] == ["n2", "n3", "n4"]
    assert [r.id for r in store.since(0, limit=2)] == [1, 2]
    assert store.since(5) == []
    assert store.since(0)[3].values == {"k": 3, "nested": {"a": [1, 2.5, None]}}
    ro = AlertStore(path, readonly=True)
    with pytest.raises(sqlite3.OperationalError):
        ro.append("r", "warn", "m", "must not be written")
    assert len(ro.since(0)) == 5
    ro.close()
    store.close()
    # the meta an alert carries on the stream is the record's
    r = AlertStore(path, readonly=True).since(4)[0]
    assert r.to_meta() == {"id": 5, "severity": "warn", "monitor": "m", "reason": "n4",
                           "values": {"k": 4, "nested": {"a": [1, 2.5, None]}}, "count": 1}


def test_every_published_alert_is_stored_when_runtime_is_killed(serve, lqr_bundle, subscriber):
    """Alerts are written (synchronously) to the store before they are published, so whatever an operator saw on
    the stream is in the store, even after the runtime dies by kill -9 right after publishing."""
    # every tick misses the deadline (1 us) and, with a repeat interval of 100 ns, files its own alert
    served = serve(lqr_bundle, deadline_ms=0.001, alert_repeat_s=1e-7, telemetry_s=0.05)
    sub = subscriber(served.operator_endpoint)
    sub.ready()
    link = RobotLink(served.robot_endpoint, "doomed")
    link.hello(*pitch_specs())
    published = {}
    try:
        rng = np.random.default_rng(0)
        while len(published) < 30:
            link.act({"state": rng.uniform(-1, 1, 3).astype(np.float32)})
            while sub.pump(0):
                topic, msg = sub.seen[-1]
                if msg.kind == "alert":
                    published[msg.meta["id"]] = (topic, msg)
        # keep the runtime busy filing alerts, and kill it in the middle of that
        for _ in range(20):
            seq = link.next_seq()
            link.send(Message("obs", "doomed", seq, 0, {"state": np.full(3, 0.5, np.float32)}))
    finally:
        served.proc.send_signal(signal.SIGKILL)
        served.proc.wait(timeout=10)
        link.close()
    while sub.pump(200):
        topic, msg = sub.seen[-1]
        if msg.kind == "alert":
            published[msg.meta["id"]] = (topic, msg)

    records = {r.id: r for r in AlertStore(served.store, readonly=True).since(0)}
    assert len(published) >= 30
    for rid, (topic, msg) in published.items():
        assert rid in records, f"published alert #{rid} is not in the store"
        r = records[rid]
        assert topic == f"alert.{r.severity}" and msg.robot == r.robot and msg.t_ns == r.t_ns
        assert msg.meta == r.to_meta()


def test_alert_ids_continue_across_runtime_restarts(serve, lqr_bundle, tmp_path):
    """A restarted runtime appends to the same store: ids keep increasing, so `--since N` stays meaningful."""
    store = tmp_path / "shared.db"
    for robot in ("first-life", "second-life"):
        served = serve(lqr_bundle, store=store)
        link = RobotLink(served.robot_endpoint, robot)
        try:
            link.hello(*pitch_specs())
            link.send(Message("error", robot, link.next_seq(), 0, {}, {"code": "note", "message": robot}))
            assert link.heartbeat().kind == "heartbeat"  # handled in order: the error was filed before this reply
        finally:
            link.close()
        served.stop()
    records = AlertStore(store, readonly=True).since(0)
    assert [(r.id, r.robot, r.monitor) for r in records] == [(1, "first-life", "robot"), (2, "second-life", "robot")]


def test_locked_store_keeps_serving_and_files_the_alert_once_free(serve, lqr_bundle, subscriber, links):
    """Another process holds the store locked: the control loop keeps answering, the alert waits in the
    Alerter's queue (store first: no record is published unstored), and it is stored and published once the
    lock is released. What the operator hears meanwhile is the runtime's own notice that the store is failing:
    an alert with id 0 (not a record), and one when it takes records again."""
    served = serve(lqr_bundle, deadline_ms=5000, link_timeout_s=300, telemetry_s=0.05)
    sub = subscriber(served.operator_endpoint)
    sub.ready()
    link = links(served.robot_endpoint, "locked-out")
    x = np.array([0.1, 0.0, 0.0], np.float32)
    assert link.act({"state": x}).kind == "act"
    db = sqlite3.connect(served.store, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")
    try:
        link.send(Message("error", "locked-out", link.next_seq(), 0, {}, {"code": "driver", "message": "overheat"}))
        for _ in range(5):  # the loop still serves while the alert cannot be written
            reply = link.act({"state": x})
            assert reply.kind == "act" and reply.meta["safe"] is False
        sub.wait_for(lambda t, m: m.kind == "telemetry" and m.meta.get("alerts", {}).get("pending") == 1)
        sub.wait_for(lambda t, m: m.kind == "alert" and m.meta["monitor"] == "store")  # (the writer's busy timeout)
        notices = [(t, m) for t, m in sub.seen if m.kind == "alert"]
        assert [(t, m.meta["id"], m.meta["monitor"], m.meta["stored"]) for t, m in notices] == [
            ("alert.alert", 0, "store", False)]
        assert "cannot be written" in notices[0][1].meta["reason"] and notices[0][1].meta["values"]["pending"] == 1
    finally:
        db.execute("ROLLBACK")
        db.close()
    topic, alert = sub.wait_for(lambda t, m: m.kind == "alert" and m.meta["id"] > 0)
    sub.wait_for(lambda t, m: m.kind == "alert" and m.meta["monitor"] == "store" and t == "alert.warn")
    records = AlertStore(served.store, readonly=True).since(0)
    assert [r.id for r in records] == [alert.meta["id"]]
    assert records[0].monitor == "robot" and "overheat" in records[0].reason and topic == "alert.warn"
    counters = served.stop()
    assert "alert_store_failed" not in counters
