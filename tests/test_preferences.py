"""Preference queries (runtime/preferences.py) and `vigil prefs`: a real SQLite store file, real processes.

The exactly-once rule is tested where it matters: several processes answer the same query at the same moment
(a barrier releases them together), and exactly one answer is stored.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import run_vigil

from vigil.runtime.preferences import ANSWERS, PreferenceError, PreferenceStore

RACERS = 6  # processes that answer each query at once
ROUNDS = 3  # queries they race for


def pool_of(folder: Path) -> list[str]:
    """A pool of three short attempts at reach-v3, as the policy's attempts are recorded (training/demos.py):
    state (T+1, 39), actions (T, 4); T = 5, 7, 9 steps with rewards 1, 2, 3 per step; only the last succeeds.
    Their episode ids."""
    from vigil.training.demos import DemoWriter, Episode

    writer = DemoWriter(folder)
    ids = []
    for k, T in enumerate((5, 7, 9)):
        state = np.zeros((T + 1, 39), np.float32)
        state[:, :3] = np.linspace(0.0, 0.1, T + 1)[:, None]
        ids.append(writer.add(Episode(task="reach-v3", instruction="reach the goal", seed=k,
                                      observations={"state": state}, actions=np.zeros((T, 4), np.float32),
                                      rewards=np.full(T, k + 1.0, np.float32), success=np.full(T, k == 2),
                                      source="policy")))
    return ids


def test_add_get_list_counts(tmp_path):
    store = PreferenceStore(tmp_path / "alerts.db")
    try:
        q1 = store.add("reach-v3", tmp_path / "pool", "e1", "e2", "uncertainty", batch=1, predicted=0.25)
        q2 = store.add("push-v3", str(tmp_path / "pool"), "e3", "e4", "random")
        assert (q1.id, q2.id) == (1, 2)
        assert q1.pool == str((tmp_path / "pool").resolve()) and q1.status == "open" and q1.answer is None
        assert store.get(1) == q1 and store.get(2).predicted is None
        assert q1.to_json()["episode_b"] == "e2" and q1.to_json()["predicted"] == 0.25
        assert [r.id for r in store.list()] == [1, 2]
        assert [r.id for r in store.list(task="push-v3")] == [2]
        assert [r.id for r in store.list(since=1)] == [2]
        answered = store.answer(2, "tie", "alice")
        assert (answered.status, answered.answer, answered.by) == ("answered", "tie", "alice")
        assert answered.answered_ns is not None and answered.answered_ns >= answered.t_ns
        assert [r.id for r in store.list(status="open")] == [1]
        assert [r.id for r in store.list(status="answered")] == [2]
        assert store.counts() == {"open": 1, "answered": 1, "a": 0, "b": 0, "tie": 1, "unsure": 0}
    finally:
        store.close()
    again = PreferenceStore(tmp_path / "alerts.db", readonly=True)  # durable: another connection reads it
    try:
        assert again.get(2).answer == "tie" and len(again.list()) == 2
    finally:
        again.close()


def test_refusals_name_the_field_and_the_expected_values(tmp_path):
    store = PreferenceStore(tmp_path / "alerts.db")
    try:
        for args, field in ((("", "pool", "e1", "e2", "random"), "task"),
                            (("reach-v3", "", "e1", "e2", "random"), "pool"),
                            (("reach-v3", "pool", " ", "e2", "random"), "episode_a"),
                            (("reach-v3", "pool", "e1", "", "random"), "episode_b"),
                            (("reach-v3", "pool", "e1", "e2", ""), "rule"),
                            (("reach-v3", "pool", "e1", "e1", "random"), "episode_b must differ")):
            with pytest.raises(PreferenceError, match=field):
                store.add(*args)
        with pytest.raises(PreferenceError, match="predicted must be a probability"):
            store.add("reach-v3", "pool", "e1", "e2", "random", predicted=1.5)
        with pytest.raises(PreferenceError, match="batch"):
            store.add("reach-v3", "pool", "e1", "e2", "random", batch=-1)
        assert store.list() == []  # nothing refused was stored
        store.add("reach-v3", "pool", "e1", "e2", "random")
        with pytest.raises(PreferenceError, match=r"\('a', 'b', 'tie', 'unsure'\).*got 'maybe'"):
            store.answer(1, "maybe", "alice")
        with pytest.raises(PreferenceError, match="by"):
            store.answer(1, "a", "")
        with pytest.raises(PreferenceError, match=r"no preference query #7 .*ids run from 1 to 1"):
            store.answer(7, "a", "alice")
        with pytest.raises(PreferenceError, match="status must be one of"):
            store.list(status="closed")
        store.answer(1, "b", "alice")
        with pytest.raises(PreferenceError, match=r"#1 is already answered by 'alice': b"):
            store.answer(1, "a", "bob")
        assert (store.get(1).answer, store.get(1).by) == ("b", "alice")
    finally:
        store.close()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PreferenceStore(tmp_path / "none.db", readonly=True)
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(FileNotFoundError, match="no preferences table"):
        PreferenceStore(tmp_path / "other.db", readonly=True)


def race(path: str, me: int, barrier, results) -> None:
    """One racer (a spawned process): for each query, wait for every racer, then answer it at once."""
    store = PreferenceStore(path)
    try:
        for query in range(1, ROUNDS + 1):
            barrier.wait(60)
            try:
                r = store.answer(query, ANSWERS[me % len(ANSWERS)], f"racer-{me}")
                results.put((query, me, "won", r.answer))
            except PreferenceError as exc:
                results.put((query, me, "refused", str(exc)))
            except Exception as exc:  # anything else is a failure of the rule: the test reports it
                results.put((query, me, "failed", repr(exc)))
    finally:
        store.close()


def test_exactly_one_of_many_processes_answering_at_once_wins(tmp_path):
    path = str(tmp_path / "alerts.db")
    store = PreferenceStore(path)
    for _ in range(ROUNDS):
        store.add("reach-v3", tmp_path / "pool", "e1", "e2", "random")
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(RACERS), ctx.Queue()
    procs = [ctx.Process(target=race, args=(path, me, barrier, results)) for me in range(RACERS)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=120) for _ in range(RACERS * ROUNDS)]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    assert not [o for o in outcomes if o[2] == "failed"], outcomes
    for query in range(1, ROUNDS + 1):
        mine = [o for o in outcomes if o[0] == query]
        winners = [o for o in mine if o[2] == "won"]
        assert len(mine) == RACERS and len(winners) == 1, mine
        _, winner, _, answer = winners[0]
        stored = store.get(query)
        assert (stored.answer, stored.by) == (answer, f"racer-{winner}")
        for _, _, _, message in (o for o in mine if o[2] == "refused"):
            assert f"already answered by 'racer-{winner}': {answer}" in message
    assert store.counts()["answered"] == ROUNDS
    store.close()


def test_vigil_prefs_list_show_answer_end_to_end(tmp_path):
    ids = pool_of(tmp_path / "pool")
    db = str(tmp_path / "alerts.db")
    store = PreferenceStore(db)
    store.add("reach-v3", tmp_path / "pool", ids[0], ids[2], "uncertainty", predicted=0.3)
    store.add("reach-v3", tmp_path / "pool", ids[1], ids[2], "random", batch=1)
    store.add("reach-v3", tmp_path / "elsewhere", "gone-1", "gone-2", "random")
    store.close()

    r = run_vigil("prefs", "list", "--store", db)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("#1") and "open" in lines[0] and ids[2] in lines[0]

    r = run_vigil("prefs", "show", "1", "--store", db)
    assert r.returncode == 0, r.stderr
    a, b = (line for line in r.stdout.splitlines() if line.startswith(("A ", "B ")))
    assert ids[0] in a and "steps 5" in a and "success no" in a and "return 5" in a
    assert ids[2] in b and "steps 9" in b and "success yes" in b and "return 27" in b
    r = run_vigil("prefs", "show", "3", "--store", db)  # a pool that is not there: said, not a traceback
    assert r.returncode == 0 and "no such dataset folder" in r.stdout, r.stdout + r.stderr

    r = run_vigil("prefs", "answer", "1", "a", "--by", "alice", "--store", db)
    assert r.returncode == 0 and "#1 answered by 'alice': a" in r.stdout, r.stderr
    for args, expected in ((["answer", "1", "b", "--by", "bob"], "#1 is already answered by 'alice': a"),
                           (["answer", "2", "maybe", "--by", "bob"], "a (A better), b (B better), tie"),
                           (["answer", "9", "a", "--by", "bob"], "no preference query #9"),
                           (["show", "9"], "no preference query #9")):
        r = run_vigil("prefs", *args, "--store", db)
        assert r.returncode == 2 and r.stderr.startswith("vigil prefs: ") and expected in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    r = run_vigil("prefs", "list", "--store", str(tmp_path / "none.db"))
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr

    r = run_vigil("prefs", "list", "--status", "answered", "--json", "--store", db)
    assert r.returncode == 0, r.stderr
    [answered] = [json.loads(line) for line in r.stdout.splitlines()]
    assert (answered["id"], answered["answer"], answered["by"]) == (1, "a", "alice")
    again = PreferenceStore(db, readonly=True)
    assert again.counts() == {"open": 2, "answered": 1, "a": 1, "b": 0, "tie": 0, "unsure": 0}
    again.close()
