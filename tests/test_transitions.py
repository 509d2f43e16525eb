"""Transitions from the robot (issue 22, item 1): negotiated in hello, reported with each observation, paired
with what led to them, written off the loop to a durable log, read by a learner from its cursor exactly once
across runtime restarts; v1 robots unchanged; malformed outcomes refused; a stuck writer never stalls a tick."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
from conftest import pitch_specs, recv_raw_reply, run_vigil

from vigil.runtime.transitions import Transition, TransitionLog, read_after
from vigil.wire.protocol import Message


def sim(endpoint: str, episodes: int, steps: int, *extra: str):
    r = run_vigil("sim", "--connect", endpoint, "--system", "aircraft-pitch", "--episodes", str(episodes),
                  "--steps", str(steps), *extra, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r


def test_transitions_are_logged_in_order_once_across_a_runtime_restart(lqr_bundle, serve, tmp_path):
    log = tmp_path / "transitions.db"
    served = serve(lqr_bundle, transitions=str(log))
    sim(served.robot_endpoint, 2, 30, "--transitions")
    served.stop()  # the writer flushes on stop
    first = read_after(log)
    assert len(first["id"]) == 60 and np.all(np.diff(first["id"]) > 0)
    for ep in np.unique(first["episode"]):
        m = first["episode"] == ep
        assert first["step"][m].tolist() == list(range(30))  # every step once, in order
        np.testing.assert_array_equal(first["next_obs"][m][:-1], first["obs"][m][1:])  # consecutive
        assert first["truncated"][m].tolist() == [False] * 29 + [True] and not first["terminated"][m].any()
    assert np.all(first["reward"] <= 0) and first["obs"].shape == (60, 3) and first["action"].shape == (60, 1)
    cursor = int(first["id"][-1])

    again = serve(lqr_bundle, transitions=str(log))  # a restart: same file, the ids go on
    sim(again.robot_endpoint, 1, 10, "--transitions")
    sim(again.robot_endpoint, 1, 10)  # a v1 robot: nothing logged, nothing changes for it
    again.stop()
    new = read_after(log, cursor)
    assert len(new["id"]) == 10 and new["id"][0] > cursor  # only what came after the cursor
    assert len(read_after(log, int(new["id"][-1]))["id"]) == 0


def test_negotiation_and_malformed_outcomes(lqr_bundle, serve, links, tmp_path):
    with_log = serve(lqr_bundle, transitions=str(tmp_path / "t.db"))
    without = serve(lqr_bundle)
    obs, act = pitch_specs()
    assert links(with_log.robot_endpoint, "a", hello=False).hello(obs, act, transitions=True).transitions
    assert not links(without.robot_endpoint, "b", hello=False).hello(obs, act, transitions=True).transitions
    assert not links(with_log.robot_endpoint, "c", hello=False).hello(obs, act).transitions
    link = links(with_log.robot_endpoint, "d", hello=False)
    link.hello(obs, act, transitions=True)
    x = {"state": np.zeros(3, np.float32)}
    for bad in ({"reward": "high"}, {"reward": float("nan")}, {"reward": 1.0, "terminated": 1}):
        link.send(Message("obs", "d", link.next_seq(), 0, x, bad))
        reply = recv_raw_reply(link)
        assert reply.kind == "error" and reply.meta["code"] == "bad_header", reply.meta
    link.send(Message("obs", "d", link.next_seq(), 0, x, {"reward": 1.5, "terminated": False}))
    assert recv_raw_reply(link).kind == "act"  # a well-formed one is answered as usual
    raw = links(with_log.robot_endpoint, "e", hello=False)
    raw.send(Message("hello", "e", raw.next_seq(), 0, {}, {"spec": {"observation": [o.to_dict() for o in obs],
                                                                      "action": act.to_dict()}, "transitions": "yes"}))
    assert recv_raw_reply(raw).meta["code"] == "bad_header"


def transition(i: int) -> Transition:
    return Transition("r", 1, i, "p", np.full(3, i, np.float32), np.zeros(1, np.float32), float(i),
                      np.full(3, i + 1, np.float32), False, False)


def test_a_stuck_writer_drops_and_counts_never_waits_and_loses_nothing_it_queued(tmp_path):
    path = tmp_path / "t.db"
    tlog = TransitionLog(path, capacity=50, batch=10, flush_s=0.01)
    blocker = sqlite3.connect(path, timeout=5, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the file: the log's writer cannot commit
    offered = [tlog.offer(transition(i)) for i in range(500)]  # every call returns at once
    assert offered.count(False) == tlog.counters["transitions_dropped"] > 0
    blocker.execute("ROLLBACK")
    blocker.close()
    tlog.close(timeout_s=10)
    rows = read_after(path)
    assert len(rows["id"]) == offered.count(True) == tlog.counters["transitions_written"]
    assert rows["step"].tolist() == sorted(rows["step"].tolist())  # in the order they were offered


@pytest.mark.parametrize("flags", [()])
def test_serve_flag_errors_name_the_key(flags, tmp_path):
    r = run_vigil("serve", "--bundle", "x", "--transitions-queue", "0")
    assert r.returncode == 2 and "transitions_queue" in r.stderr


def test_a_log_from_before_logp_is_migrated_and_reads_as_not_sampled(tmp_path):
    """A transition log written before the `logp` column: read as NaN (not sampled) and given the column when a
    runtime opens it again; new rows keep their log-probability."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""CREATE TABLE transitions (id INTEGER PRIMARY KEY AUTOINCREMENT, t_ns INTEGER NOT NULL,
        robot TEXT NOT NULL, episode INTEGER NOT NULL, step INTEGER NOT NULL, policy TEXT NOT NULL, obs BLOB NOT NULL,
        action BLOB NOT NULL, reward REAL NOT NULL, next_obs BLOB NOT NULL, terminated INTEGER NOT NULL,
        truncated INTEGER NOT NULL);""")
    x = np.ones(2, "<f4").tobytes()
    db.execute("INSERT INTO transitions (t_ns, robot, episode, step, policy, obs, action, reward, next_obs, "
               "terminated, truncated) VALUES (0, 'r', 0, 0, 'p', ?, ?, 1.0, ?, 0, 0)", (x, x, x))
    db.commit()
    db.close()
    rows = read_after(path)
    assert len(rows["id"]) == 1 and np.isnan(rows["logp"]).all()
    log = TransitionLog(path)
    ones = np.ones(2, np.float32)
    assert log.offer(Transition("r", 0, 1, "p", ones, ones, 0.5, ones, False, False, logp=-1.25))
    assert log.offer(Transition("r", 0, 2, "p", ones, ones, 0.5, ones, True, False))
    log.close()
    rows = read_after(path)
    assert np.isnan(rows["logp"][0]) and rows["logp"][1] == -1.25 and np.isnan(rows["logp"][2])
