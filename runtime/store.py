"""Embedded durable store for operator records: SQLite in WAL mode with synchronous writes, so a record
that `append` returned an id for survives a crash or a kill -9.  Alerts live here; data requests share the
file and the discipline (`open_db`) in runtime/requests.py."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    t_ns     INTEGER NOT NULL,
    robot    TEXT    NOT NULL,
    severity TEXT    NOT NULL,
    monitor  TEXT    NOT NULL,
    reason   TEXT    NOT NULL,
    vals     TEXT    NOT NULL,
    count    INTEGER NOT NULL DEFAULT 1
);
"""


@dataclass(frozen=True)
class AlertRecord:
    id: int
    t_ns: int
    robot: str
    severity: str
    monitor: str
    reason: str
    values: Mapping[str, Any]
    count: int = 1

    def to_meta(self) -> dict[str, Any]:
        return {"id": self.id, "severity": self.severity, "monitor": self.monitor, "reason": self.reason,
                "values": dict(self.values), "count": self.count}


def open_db(path: Path, schema: str, readonly: bool = False, timeout: float = 0.05) -> sqlite3.Connection:
    """A connection to the store file: read-only (the file must exist), or writable in WAL mode with
    synchronous=FULL, autocommit (every statement commits), and `schema` created if missing.

    The default busy timeout is short because the usual writer is the control loop, which must not wait on
    a locked file (runtime/outbox.py queues and retries instead); offline writers (the expert) pass more."""
    if readonly:
        if not path.exists():
            raise FileNotFoundError(f"store {path} does not exist")
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One owner at a time, but it may be built in another thread.
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=timeout)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db


class AlertStore:
    """Append-only alert log. Readers (`vigil alerts --since`) may open it while the runtime writes."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        try:
            self.db = open_db(self.path, SCHEMA, readonly)
        except FileNotFoundError:
            raise FileNotFoundError(f"alert store {self.path} does not exist") from None

    def append(self, robot: str, severity: str, monitor: str, reason: str,
               values: Mapping[str, Any] | None = None, count: int = 1, t_ns: int | None = None) -> AlertRecord:
        """Write one alert and commit (fsync) before returning it with its id."""
        t_ns = t_ns or time.time_ns()
        vals = dict(values or {})
        cur = self.db.execute(
            "INSERT INTO alerts (t_ns, robot, severity, monitor, reason, vals, count) VALUES (?,?,?,?,?,?,?)",
            (t_ns, robot, severity, monitor, reason, json.dumps(vals), count))
        return AlertRecord(int(cur.lastrowid), t_ns, robot, severity, monitor, reason, vals, count)

    def since(self, after_id: int = 0, limit: int = 10_000) -> list[AlertRecord]:
        """Alerts with id > after_id, oldest first."""
        rows = self.db.execute(
            "SELECT id, t_ns, robot, severity, monitor, reason, vals, count FROM alerts WHERE id > ? "
            "ORDER BY id LIMIT ?",
            (after_id, limit)).fetchall()
        return [AlertRecord(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7]) for r in rows]

    def close(self) -> None:
        self.db.close()
