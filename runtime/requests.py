"""SAVE data requests: "the policy was unsure here; an expert, please show it how".

When the VFD monitor of a robot reaches `alert`, the runtime files a request (`Requester`, below) into the
`requests` table of its SQLite store, before it is published on the operator stream's `request` topic.  An
expert (`vigil expert` in simulation, a teleoperation tool on a real robot) claims it, records a
demonstration into a dataset (training/demos.py format) and marks it fulfilled, or rejects it with a reason.

Lifecycle (column `status`), every transition a single conditional UPDATE, so two experts never both win:

    open --claim--> claimed --fulfil--> fulfilled      (dataset + episode id of the demonstration)
                       |  \\---reject--> rejected       (reason)
                       |   \\--release-> open           (the claimer gives it back)
                       \\-- lease over: claimable again (by anyone; the row says `claimed` until then)

A claim is a lease (`lease_until_ns`, wall clock): an expert that crashes holds nothing for longer than its
lease, and whoever claims an expired claim takes it over (`attempts` counts the claims).  Only the current
claimer may fulfil, reject or release.  Everything lives in the store file, so it survives restarts of the
runtime and of the experts.

Arrays (the observation that triggered the request) are stored as uncompressed `.npz` bytes, read back with
`allow_pickle=False`: no pickle anywhere.  The simulator state is the optional reset recipe a simulated
robot sends with `reset` (`sim`, docs/protocol.md §7.4) plus the step index; it is JSON.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vigil.monitors.base import Level, Verdict
from vigil.monitors.dynamics import MAINTENANCE
from vigil.runtime.hooks import Hook
from vigil.runtime.outbox import Entry, Outbox
from vigil.runtime.store import open_db
from vigil.runtime.stream import OperatorStream
from vigil.wire.protocol import Message

if TYPE_CHECKING:
    from vigil.runtime.session import Decision, Session

log = logging.getLogger("vigil.requests")

STATUSES = ("open", "claimed", "fulfilled", "rejected")

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    t_ns           INTEGER NOT NULL,
    robot          TEXT    NOT NULL,
    task           TEXT    NOT NULL,
    instruction    TEXT,
    policy         TEXT    NOT NULL,
    episode        INTEGER NOT NULL,
    step           INTEGER NOT NULL,
    score          REAL    NOT NULL,
    threshold      REAL    NOT NULL,
    observation    BLOB    NOT NULL,
    sim            TEXT,
    status         TEXT    NOT NULL DEFAULT 'open',
    claimed_by     TEXT,
    claimed_t_ns   INTEGER,
    lease_until_ns INTEGER,
    attempts       INTEGER NOT NULL DEFAULT 0,
    resolved_by    TEXT,
    resolved_t_ns  INTEGER,
    dataset        TEXT,
    demo           TEXT,
    reason         TEXT
);
CREATE INDEX IF NOT EXISTS requests_status ON requests (status, id);
"""
_COLUMNS = ("id, t_ns, robot, task, instruction, policy, episode, step, score, threshold, observation, sim, "
            "status, claimed_by, claimed_t_ns, lease_until_ns, attempts, resolved_by, resolved_t_ns, dataset, "
            "demo, reason")


class RequestError(ValueError):
    """A lifecycle step that is not allowed now (unknown id, not the claimer, already resolved)."""


def pack_arrays(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def unpack_arrays(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@dataclass(frozen=True, eq=False)
class RequestRecord:
    """One data request as stored. `sim` is the robot's reset recipe (None for a real robot)."""

    id: int
    t_ns: int
    robot: str
    task: str
    instruction: str | None
    policy: str
    episode: int
    step: int
    score: float
    threshold: float
    observation: Mapping[str, np.ndarray]
    sim: Mapping[str, Any] | None = None
    status: str = "open"
    claimed_by: str | None = None
    claimed_t_ns: int | None = None
    lease_until_ns: int | None = None
    attempts: int = 0
    resolved_by: str | None = None
    resolved_t_ns: int | None = None
    dataset: str | None = None
    demo: str | None = None  # the demonstration's episode id in `dataset`
    reason: str | None = None

    def state(self, now_ns: int | None = None) -> str:
        """The status, with `expired` for a claim whose lease is over (claimable again)."""
        if self.status == "claimed" and (self.lease_until_ns or 0) <= (now_ns or time.time_ns()):
            return "expired"
        return self.status

    def to_meta(self) -> dict[str, Any]:
        """The header keys of the `request` message on the operator stream (the observation goes as arrays)."""
        return {"id": self.id, "task": self.task, "instruction": self.instruction, "policy": self.policy,
                "episode": self.episode, "step": self.step, "score": self.score, "threshold": self.threshold,
                "sim": dict(self.sim) if self.sim is not None else None, "status": self.status}

    def to_json(self) -> dict[str, Any]:
        """Everything but the arrays (their names, dtypes and shapes instead), for `vigil requests --json`."""
        return {**self.to_meta(), "robot": self.robot, "t_ns": self.t_ns, "state": self.state(),
                "observation": {k: {"dtype": str(v.dtype), "shape": list(v.shape)}
                                for k, v in self.observation.items()},
                "claimed_by": self.claimed_by, "claimed_t_ns": self.claimed_t_ns,
                "lease_until_ns": self.lease_until_ns, "attempts": self.attempts, "resolved_by": self.resolved_by,
                "resolved_t_ns": self.resolved_t_ns, "dataset": self.dataset, "demo": self.demo,
                "reason": self.reason}


def demo_meta(request: RequestRecord, expert: str) -> dict[str, Any]:
    """What a demonstration answering `request` carries in its dataset `meta` (with source "request"), so a
    fine-tuning round can trace each acquired demonstration to its request, and each request to its
    demonstration (the request row names dataset and episode)."""
    return {"request": request.id, "request_robot": request.robot, "request_policy": request.policy,
            "request_step": request.step, "request_score": request.score, "expert": expert}


def _row(r: tuple) -> RequestRecord:
    return RequestRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], r[9], unpack_arrays(r[10]),
                         json.loads(r[11]) if r[11] is not None else None, *r[12:])


class RequestStore:
    """The `requests` table of a store file. The runtime appends (with the control loop's short busy
    timeout); experts and operators claim and resolve (pass a longer `timeout`: they can wait)."""

    def __init__(self, path: str | os.PathLike, readonly: bool = False, timeout: float = 0.05):
        self.path = Path(path)
        self.db = open_db(self.path, SCHEMA, readonly, timeout)
        if readonly and not self.db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='requests'").fetchone():
            self.db.close()
            raise FileNotFoundError(f"store {self.path} has no requests table (no runtime has written requests)")

    def append(self, robot: str, task: str, instruction: str | None, policy: str, episode: int, step: int,
               score: float, threshold: float, observation: Mapping[str, np.ndarray],
               sim: Mapping[str, Any] | None = None, t_ns: int | None = None) -> RequestRecord:
        """Write one open request and commit (fsync) before returning it with its id."""
        t_ns = t_ns or time.time_ns()
        cur = self.db.execute(
            "INSERT INTO requests (t_ns, robot, task, instruction, policy, episode, step, score, threshold, "
            "observation, sim) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (t_ns, robot, task, instruction, policy, episode, step, float(score), float(threshold),
             pack_arrays(observation), None if sim is None else json.dumps(sim)))
        return RequestRecord(int(cur.lastrowid), t_ns, robot, task, instruction, policy, episode, step,
                             float(score), float(threshold), dict(observation), None if sim is None else dict(sim))

    def get(self, request_id: int) -> RequestRecord:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM requests WHERE id = ?", (request_id,)).fetchone()
        if row is None:
            raise RequestError(f"no request #{request_id} in {self.path}")
        return _row(row)

    def list(self, status: str | None = None, task: str | None = None, since: int = 0,
             limit: int = 10_000) -> list[RequestRecord]:
        """Requests with id > since, oldest first; `status` may also be `expired` (claims whose lease is over)."""
        where, args = ["id > ?"], [since]
        if status == "expired":
            where.append("status = 'claimed' AND lease_until_ns <= ?")
            args.append(time.time_ns())
        elif status is not None:
            if status not in STATUSES:
                raise RequestError(f"status must be one of {STATUSES + ('expired',)}, got {status!r}")
            where.append("status = ?")
            args.append(status)
        if task is not None:
            where.append("task = ?")
            args.append(task)
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM requests WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
                               (*args, limit)).fetchall()
        return [_row(r) for r in rows]

    def claim(self, by: str, lease_s: float, sim_only: bool = False, tasks: tuple[str, ...] = (),
              request_id: int | None = None) -> RequestRecord | None:
        """Take the oldest claimable request (open, or claimed with its lease over) for `lease_s` seconds;
        None if there is none. `sim_only`: only requests with a simulator recipe (the simulated expert);
        `tasks`: only these tasks; `request_id`: only that one."""
        if not by or not 0 < lease_s < float("inf"):
            raise RequestError("a claim needs a claimer name and a lease > 0 seconds")
        now = time.time_ns()
        where, args = ["(status = 'open' OR (status = 'claimed' AND lease_until_ns <= ?))"], [now]
        if sim_only:
            where.append("sim IS NOT NULL")
        if tasks:
            where.append(f"task IN ({','.join('?' * len(tasks))})")
            args.extend(tasks)
        if request_id is not None:
            where.append("id = ?")
            args.append(request_id)
        row = self.db.execute(
            f"UPDATE requests SET status = 'claimed', claimed_by = ?, claimed_t_ns = ?, lease_until_ns = ?, "
            f"attempts = attempts + 1 WHERE id = (SELECT id FROM requests WHERE {' AND '.join(where)} "
            f"ORDER BY id LIMIT 1) RETURNING {_COLUMNS}", (by, now, now + int(lease_s * 1e9), *args)).fetchone()
        return _row(row) if row is not None else None

    def fulfil(self, request_id: int, by: str, dataset: str | os.PathLike, demo: str) -> RequestRecord:
        """`by` answered its claim with the demonstration `demo` (an episode id) in `dataset` (a folder)."""
        return self._resolve(request_id, by, "status = 'fulfilled', dataset = ?, demo = ?",
                             (str(Path(dataset).resolve()), demo))

    def reject(self, request_id: int, by: str, reason: str) -> RequestRecord:
        """`by` will not answer its claim, for `reason` (unknown task, the expert failed...); final."""
        return self._resolve(request_id, by, "status = 'rejected', reason = ?", (reason,))

    def release(self, request_id: int, by: str) -> RequestRecord:
        """`by` gives its claim back unanswered: open again at once."""
        cur = self.db.execute(
            f"UPDATE requests SET status = 'open', lease_until_ns = NULL WHERE id = ? AND status = 'claimed' "
            f"AND claimed_by = ? RETURNING {_COLUMNS}", (request_id, by)).fetchone()
        if cur is None:
            self._refuse(request_id, by)
        return _row(cur)

    def _resolve(self, request_id: int, by: str, assignments: str, args: tuple) -> RequestRecord:
        row = self.db.execute(
            f"UPDATE requests SET {assignments}, resolved_by = ?, resolved_t_ns = ? WHERE id = ? AND "
            f"status = 'claimed' AND claimed_by = ? RETURNING {_COLUMNS}",
            (*args, by, time.time_ns(), request_id, by)).fetchone()
        if row is None:
            self._refuse(request_id, by)
        return _row(row)

    def _refuse(self, request_id: int, by: str) -> None:
        current = self.get(request_id)
        raise RequestError(f"request #{request_id} is {current.status}"
                           + (f" by {current.claimed_by!r}" if current.status == "claimed" else "")
                           + f", not claimed by {by!r}")

    def close(self) -> None:
        self.db.close()


# -- filing: from VFD alerts to stored and published requests ---------------------------------------------
#
# A VFD verdict at `alert` or above means the ensemble disagrees about what to do here (docs/algorithms.md,
# VFD): the runtime asks for a demonstration of this task from this state.  One plan above threshold is one
# request's worth of information, and an alerting episode alerts on plan after plan, so requests are limited
# to one per task every `request_interval_s` (a request is what an expert spends minutes on; the alert stream
# already counts every occurrence).  A task the robot did not name (no `task` in its reset) is limited under
# the empty name.
#
# Filing shares the runtime's `Outbox` with the alerts (runtime/outbox.py): store first, then publish, and a
# locked store queues the request instead of blocking the control loop.  The slot of the rate limit is taken
# when the request is queued, so a store that is locked for a while does not turn into a burst later.



class Requester:
    def __init__(self, store: RequestStore, stream: OperatorStream | None, outbox: Outbox, interval_s: float):
        self.store, self.stream, self.outbox, self.interval_s = store, stream, outbox, interval_s
        self._last: dict[str, float] = {}  # task -> monotonic time its last request was queued
        self.filed = 0  # stored and published
        self.limited = 0  # VFD alerts that found their task's slot taken

    def due(self, task: str, now: float | None = None) -> bool:
        """Whether `task` may file a request now (cheap: the control loop asks on every alerting tick)."""
        last = self._last.get(task)
        return last is None or (time.monotonic() if now is None else now) - last >= self.interval_s

    def request(self, robot: str, info: Mapping[str, Any], policy: str, episode: int, step: int,
                obs: Mapping[str, np.ndarray], verdict: Verdict, now: float | None = None) -> bool:
        """File a request for `robot` if its task is due; returns whether one was queued. `info` is what the
        robot's last reset said (task, instruction, sim); `verdict` the VFD verdict (its values carry the
        windowed score and the threshold it crossed)."""
        task = str(info.get("task") or "")
        now = time.monotonic() if now is None else now
        if not self.due(task, now):
            self.limited += 1
            return False
        self._last[task] = now
        instruction = info.get("instruction")
        sim = info.get("sim")
        write = partial(self.store.append, robot, task, instruction if isinstance(instruction, str) else None,
                        policy, episode, step, float(verdict.values.get("vfd", np.nan)),
                        float(verdict.values.get("threshold", np.nan)), dict(obs),
                        dict(sim) if isinstance(sim, Mapping) else None, time.time_ns())
        self.outbox.put(Entry(write, self._publish, "request"))
        return True

    def _publish(self, record: RequestRecord) -> None:
        self.filed += 1
        log.info("data request #%d: %s on %s (score %.4g > %.4g)", record.id, record.task or "(no task)",
                 record.robot, record.score, record.threshold)
        if self.stream is not None:
            self.stream.publish("request", Message("request", record.robot, record.id, record.t_ns,
                                                   dict(record.observation), record.to_meta()))


class RequestHook(Hook):
    """A VFD verdict at `alert` or above files a data request (rate-limited per task by the `Requester`) with
    the observation that triggered it and what the robot's last reset said about the episode; except in an
    episode in which the dynamics monitor has diagnosed the robot (a maintenance alert): demonstrations do not fix
    a worn gearbox, so the request is held back and counted (`requests_held_maintenance`)."""

    name = "requests"

    def __init__(self, requester: Requester, counters: Counter):
        self.requester, self.counters = requester, counters

    def on_decision(self, session: Session, obs: Message, decision: Decision) -> None:
        for v in decision.verdicts:
            if v.monitor == "dynamics" and v.values.get("diagnosis") == MAINTENANCE:
                session.state["maintenance"] = session.episode  # the robot, not the policy, is the problem
            elif v.monitor == "vfd" and v.level >= Level.ALERT:
                if session.state.get("maintenance") == session.episode:  # demonstrations would not fix it
                    self.counters["requests_held_maintenance"] += 1
                    continue
                try:
                    self.requester.request(session.robot, session.info, decision.policy, session.episode,
                                           session.step - 1, obs.arrays, v)
                except Exception:  # as for alerts: the store must not stop the control loop
                    self.counters["request_store_failed"] += 1
                    log.exception("could not file a data request for %s", session.robot)

    def stats(self) -> Mapping[str, Any]:
        return {"requests": {"filed": self.requester.filed, "limited": self.requester.limited}}
