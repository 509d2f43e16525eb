"""Transitions from the robot, off the control loop, into a durable log a learner reads (`vigil learn`).

A robot that says `transitions: true` in its hello (docs/protocol.md §7.1) reports, with each observation,
the outcome of the action it applied before: `reward` (a finite number) and whether this observation ends the
episode, `terminated` or `truncated` (bools). A robot that does not ask (every v1 driver) is unchanged. The
runtime accepts the capability only when it has a log (`vigil serve --transitions FILE`) and says so in its
reply.

The runtime pairs each outcome with the observation and the action that led to it (the action it sent, the
safe one included). It hands the transition to a writer thread through a bounded queue; the tick only
appends to the queue and never waits. The writer commits batches to SQLite (WAL), one row per transition,
numbered in order. `vigil learn` reads rows after its last one (`read_after`); the row id is its cursor, so
across restarts of either side nothing is read twice or skipped. When the queue is full (a writer stuck on a
failing disk), the transition is dropped and counted (`transitions_dropped` in telemetry): the control loop
never waits for the learner's data.

Arrays are stored as raw little-endian float32 bytes with their length; never pickle.
"""

from __future__ import annotations

import logging
import math
import queue
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vigil.runtime.hooks import Hook
from vigil.runtime.store import open_db
from vigil.wire.protocol import Message, ProtocolError

if TYPE_CHECKING:
    from vigil.runtime.session import Decision, Session

log = logging.getLogger("vigil.transitions")

SCHEMA = """
CREATE TABLE IF NOT EXISTS transitions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    t_ns        INTEGER NOT NULL,
    robot       TEXT    NOT NULL,
    episode     INTEGER NOT NULL,
    step        INTEGER NOT NULL,
    policy      TEXT    NOT NULL,
    obs         BLOB    NOT NULL,
    action      BLOB    NOT NULL,
    reward      REAL    NOT NULL,
    next_obs    BLOB    NOT NULL,
    terminated  INTEGER NOT NULL,
    truncated   INTEGER NOT NULL,
    logp        REAL
);
CREATE INDEX IF NOT EXISTS transitions_episode ON transitions (robot, episode);
"""


@dataclass(frozen=True)
class Outcome:
    reward: float
    terminated: bool
    truncated: bool


def outcome_of(meta: Mapping[str, Any]) -> Outcome | None:
    """The outcome an `obs` reports (None if it reports none); bad_header for keys of the wrong type."""
    if "reward" not in meta and "terminated" not in meta and "truncated" not in meta:
        return None
    reward = meta.get("reward")
    if type(reward) not in (int, float) or not math.isfinite(reward):
        raise ProtocolError("bad_header", "obs key 'reward' must be a finite number")
    flags = [meta.get(k, False) for k in ("terminated", "truncated")]
    if any(type(f) is not bool for f in flags):
        raise ProtocolError("bad_header", "obs keys 'terminated' and 'truncated' must be bools")
    return Outcome(float(reward), *flags)


@dataclass(frozen=True)
class Transition:
    robot: str
    episode: int
    step: int
    policy: str  # the policy that chose `action`
    obs: np.ndarray
    action: np.ndarray
    reward: float
    next_obs: np.ndarray
    terminated: bool
    truncated: bool
    logp: float | None = None  # the log-probability of `action` under an exploring policy (None: not sampled)


def _migrate(db: sqlite3.Connection) -> None:
    """A log written before the `logp` column (v0.x): add it, NULL in every old row."""
    if "logp" not in {row[1] for row in db.execute("PRAGMA table_info(transitions)")}:
        db.execute("ALTER TABLE transitions ADD COLUMN logp REAL")


class TransitionLog:
    """The durable log: a bounded queue in front of a writer thread that commits batches to SQLite."""

    def __init__(self, path: str | Path, capacity: int = 100_000, batch: int = 512, flush_s: float = 0.05):
        self.path = Path(path)
        db = open_db(self.path, SCHEMA)  # created (and checked) before the runtime says it is ready
        _migrate(db)
        db.close()
        self.queue: queue.Queue[Transition | None] = queue.Queue(capacity)
        self.batch, self.flush_s = batch, flush_s
        self.counters: Counter = Counter()
        self._thread = threading.Thread(target=self._write, name="vigil-transitions", daemon=True)
        self._thread.start()

    def offer(self, t: Transition) -> bool:
        """From the tick: queue it, never wait. False (and counted) when the queue is full."""
        try:
            self.queue.put_nowait(t)
            self.counters["transitions_queued"] += 1
            return True
        except queue.Full:
            self.counters["transitions_dropped"] += 1
            return False

    def _write(self) -> None:
        db = open_db(self.path, SCHEMA, timeout=5.0)
        pending: list[Transition] = []
        stop = False
        while not stop:
            try:
                item = self.queue.get(timeout=self.flush_s)
                if item is None:
                    stop = True
                else:
                    pending.append(item)
                while len(pending) < self.batch and not stop:
                    item = self.queue.get_nowait()
                    if item is None:
                        stop = True
                    else:
                        pending.append(item)
            except queue.Empty:
                pass
            while pending:  # a failing disk: keep the batch, retry; the bounded queue protects the loop
                try:
                    with db:
                        db.executemany(
                            "INSERT INTO transitions (t_ns, robot, episode, step, policy, obs, action, reward, "
                            "next_obs, terminated, truncated, logp) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            [(time.time_ns(), t.robot, t.episode, t.step, t.policy, _blob(t.obs), _blob(t.action),
                              t.reward, _blob(t.next_obs), int(t.terminated), int(t.truncated), t.logp)
                             for t in pending])
                    self.counters["transitions_written"] += len(pending)
                    pending = []
                except sqlite3.Error as exc:
                    self.counters["transitions_write_failed"] += 1
                    log.warning("transition log %s: %s; retrying", self.path, exc)
                    time.sleep(0.2)
                    if stop:
                        break
        db.close()

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, then stop the writer."""
        self.queue.put(None)
        self._thread.join(timeout_s)


def _blob(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x, "<f4").ravel().tobytes()


def read_after(path: str | Path, after_id: int = 0, limit: int = 100_000) -> dict[str, np.ndarray]:
    """Rows with id > after_id, in order, as arrays: id, robot, episode, step, obs, action, reward, next_obs,
    terminated, truncated, policy, logp (NaN where the action was not sampled by an exploring policy; what a
    learner needs; `vigil learn` keeps `id[-1]` as its cursor)."""
    db = open_db(Path(path), SCHEMA, readonly=True, timeout=5.0)
    try:
        has_logp = "logp" in {row[1] for row in db.execute("PRAGMA table_info(transitions)")}
        rows = db.execute("SELECT id, robot, episode, step, obs, action, reward, next_obs, terminated, truncated, "
                          f"policy, {'logp' if has_logp else 'NULL'} FROM transitions WHERE id > ? ORDER BY id "
                          "LIMIT ?", (after_id, limit)).fetchall()
    finally:
        db.close()

    def arr(k: int) -> np.ndarray:
        return np.stack([np.frombuffer(r[k], "<f4") for r in rows]) if rows else np.zeros((0, 0), np.float32)

    return {"id": np.array([r[0] for r in rows], np.int64), "robot": np.array([r[1] for r in rows]),
            "episode": np.array([r[2] for r in rows], np.int64), "step": np.array([r[3] for r in rows], np.int64),
            "obs": arr(4), "action": arr(5), "reward": np.array([r[6] for r in rows], np.float32),
            "next_obs": arr(7), "terminated": np.array([bool(r[8]) for r in rows]),
            "truncated": np.array([bool(r[9]) for r in rows]), "policy": np.array([r[10] for r in rows]),
            "logp": np.array([np.nan if r[11] is None else r[11] for r in rows], np.float64)}


def _logp(decision: Decision) -> float | None:
    """The exploring policy's log-probability of the action sent, when the action is the policy's own draw for
    this observation: not a safe action, and not under asynchronous execution (whose action was planned for an
    older observation)."""
    logp = decision.scores.get("logp")
    if logp is None or decision.safe or decision.execution is not None:
        return None
    return float(logp)


class TransitionHook(Hook):
    """Pairs each reported outcome with the observation and action before it, and offers it to the log."""

    name = "transitions"

    def __init__(self, log_: TransitionLog, counters: Counter, state: str = "state"):
        self.log, self.counters, self.key = log_, counters, state

    def on_reset(self, session: Session) -> None:
        session.state[self.name] = None  # a new episode: nothing before its first observation

    def on_decision(self, session: Session, obs: Message, decision: Decision) -> None:
        if not session.info.get("transitions"):
            return
        x = obs.arrays.get(self.key)
        if x is None:
            return
        prev = session.state.get(self.name)
        outcome = outcome_of(obs.meta)  # validated before the tick (server._on_obs)
        if prev is not None and outcome is not None:
            p_obs, p_action, p_step, p_policy, p_logp = prev
            if self.log.offer(Transition(session.robot, session.episode, p_step, p_policy, p_obs, p_action,
                                         outcome.reward, np.array(x, np.float32), outcome.terminated,
                                         outcome.truncated, p_logp)):
                self.counters["transitions"] += 1
        done = outcome is not None and (outcome.terminated or outcome.truncated)
        here = session.step - 1  # this observation's index in the episode (the session has counted it)
        session.state[self.name] = None if done else (np.array(x, np.float32), np.array(decision.action, np.float32),
                                                      here, decision.policy, _logp(decision))

    def stats(self) -> Mapping[str, Any]:
        return dict(self.log.counters)
