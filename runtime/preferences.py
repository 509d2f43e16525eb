"""Preference queries: "of these two attempts at the same task, which was better?", asked of an operator.

A query is a pair of recorded episodes of one task from a pool: a dataset folder in the demonstration format
(training/demos.py) holding the policy's attempts. A selection rule (training/pairs.py) chooses the pairs; each
is stored as an open query in the `preferences` table of the runtime's SQLite store file, next to the alerts
and the data requests (created if missing). The operator answers in the console's Preferences panel or with
`vigil prefs answer`; a reward model is fitted on the answers (training/reward_model.py).

Lifecycle (column `status`), one transition, a single conditional UPDATE:

    open --answer--> answered      (answer, by, answered_ns)

The UPDATE holds `WHERE id = ? AND status = 'open'`, so of two operators who answer the same query (two pages,
a page and the command line, two processes at once) exactly one wins; the other is told who answered and
what. An answer is final. The answers:

    a       attempt A was better
    b       attempt B was better
    tie     both were equally good (or equally bad)
    unsure  the operator cannot tell (cannot judge from what is shown)

Every answer is kept. Ties and unsure answers say nothing about which attempt was better, so fitting uses
only `a` and `b` unless it is told otherwise.

The store keeps names, not episodes: `pool` is the pool folder (resolved to an absolute path when the query is
added, so that the console and the command line read the same folder from any working directory) and
`episode_a`, `episode_b` are episode ids in its index. The store never reads the pool. `predicted` is the
reward model's P(A better than B) when the pair was chosen (None without a model), kept to judge the model
against the answers later. Only sqlite3 and the standard library here.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vigil.runtime.store import open_db

STATUSES = ("open", "answered")
ANSWERS = ("a", "b", "tie", "unsure")
MEANINGS = {"a": "A better", "b": "B better", "tie": "equally good", "unsure": "cannot tell"}

SCHEMA = """
CREATE TABLE IF NOT EXISTS preferences (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    t_ns        INTEGER NOT NULL,
    task        TEXT    NOT NULL,
    pool        TEXT    NOT NULL,
    episode_a   TEXT    NOT NULL,
    episode_b   TEXT    NOT NULL,
    rule        TEXT    NOT NULL,
    batch       INTEGER NOT NULL DEFAULT 0,
    predicted   REAL,
    status      TEXT    NOT NULL DEFAULT 'open',
    answer      TEXT,
    "by"        TEXT,
    answered_ns INTEGER
);
CREATE INDEX IF NOT EXISTS preferences_status ON preferences (status, id);
"""
_COLUMNS = 'id, t_ns, task, pool, episode_a, episode_b, rule, batch, predicted, status, answer, "by", answered_ns'
# the one transition: it changes an open query only, so the first answer stands
_ANSWER = ("""UPDATE preferences SET status = 'answered', answer = ?, "by" = ?, answered_ns = ? """
           f"""WHERE id = ? AND status = 'open' RETURNING {_COLUMNS}""")


class PreferenceError(ValueError):
    """A query that cannot be stored (an empty field, A = B), or an answer that is not allowed (unknown id, an
    answer not in ANSWERS, a query already answered)."""


@dataclass(frozen=True)
class PreferenceRecord:
    """One preference query as stored."""

    id: int
    t_ns: int
    task: str
    pool: str  # the pool folder, absolute
    episode_a: str
    episode_b: str
    rule: str  # the selection rule that chose the pair
    batch: int = 0
    predicted: float | None = None  # the reward model's P(A better than B) at selection time
    status: str = "open"
    answer: str | None = None  # one of ANSWERS once answered
    by: str | None = None
    answered_ns: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _row(r: tuple) -> PreferenceRecord:
    return PreferenceRecord(*r)


def answered_text(r: PreferenceRecord) -> str:
    """'answered by bob: b (B better)', in the words both the command line and the console use."""
    return f"answered by {r.by!r}: {r.answer} ({MEANINGS.get(r.answer or '', '?')})"


class PreferenceStore:
    """The `preferences` table of a store file. Its writers are offline (a selection script, the command line,
    the console), never the control loop, so they wait up to `timeout` seconds for a locked file."""

    def __init__(self, path: str | os.PathLike, readonly: bool = False, timeout: float = 5.0):
        self.path = Path(path)
        self.db = open_db(self.path, SCHEMA, readonly, timeout)
        if readonly and not self.db.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='preferences'").fetchone():
            self.db.close()
            raise FileNotFoundError(f"store {self.path} has no preferences table (no preference query was added)")

    def add(self, task: str, pool: str | os.PathLike, episode_a: str, episode_b: str, rule: str, batch: int = 0,
            predicted: float | None = None, t_ns: int | None = None) -> PreferenceRecord:
        """Store one open query and commit (fsync) before returning it with its id."""
        for name, value in (("task", task), ("pool", pool), ("episode_a", episode_a), ("episode_b", episode_b),
                            ("rule", rule)):
            text = os.fspath(value) if name == "pool" and isinstance(value, os.PathLike) else value
            if not isinstance(text, str) or not text.strip():
                raise PreferenceError(f"a preference query needs a non-empty {name}, got {value!r}")
        if episode_a == episode_b:
            raise PreferenceError(f"episode_b must differ from episode_a: a query compares two attempts, got "
                                  f"{episode_a!r} twice")
        if type(batch) is not int or batch < 0:
            raise PreferenceError(f"batch must be an integer >= 0, got {batch!r}")
        if predicted is not None:
            predicted = float(predicted)
            if not (math.isfinite(predicted) and 0.0 <= predicted <= 1.0):
                raise PreferenceError(f"predicted must be a probability in [0, 1] or None, got {predicted!r}")
        t_ns = t_ns or time.time_ns()
        pool = str(Path(pool).expanduser().resolve())
        cur = self.db.execute(
            "INSERT INTO preferences (t_ns, task, pool, episode_a, episode_b, rule, batch, predicted) "
            "VALUES (?,?,?,?,?,?,?,?)", (t_ns, task, pool, episode_a, episode_b, rule, batch, predicted))
        return PreferenceRecord(int(cur.lastrowid), t_ns, task, pool, episode_a, episode_b, rule, batch, predicted)

    def get(self, query_id: int) -> PreferenceRecord:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM preferences WHERE id = ?", (query_id,)).fetchone()
        if row is None:
            raise PreferenceError(f"no preference query #{query_id} in {self.path} ({self._ids()})")
        return _row(row)

    def _ids(self) -> str:
        lo, hi = self.db.execute("SELECT MIN(id), MAX(id) FROM preferences").fetchone()
        return "it holds none" if lo is None else f"its ids run from {lo} to {hi}"

    def list(self, status: str | None = None, task: str | None = None, since: int = 0,
             limit: int = 10_000) -> list[PreferenceRecord]:
        """Queries with id > since, oldest first."""
        where, args = ["id > ?"], [since]
        if status is not None:
            if status not in STATUSES:
                raise PreferenceError(f"status must be one of {STATUSES}, got {status!r}")
            where.append("status = ?")
            args.append(status)
        if task is not None:
            where.append("task = ?")
            args.append(task)
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM preferences WHERE {' AND '.join(where)} ORDER BY id "
                               "LIMIT ?", (*args, limit)).fetchall()
        return [_row(r) for r in rows]

    def answer(self, query_id: int, answer: str, by: str) -> PreferenceRecord:
        """`by` answers query `query_id`, exactly once: the first answer stands, any later one is refused with
        who answered and what."""
        if answer not in ANSWERS:
            raise PreferenceError(f"answer must be one of {ANSWERS} ("
                                  + ", ".join(f"{k}: {v}" for k, v in MEANINGS.items()) + f"), got {answer!r}")
        if not isinstance(by, str) or not by.strip():
            raise PreferenceError(f"an answer needs the name of who gives it (by), got {by!r}")
        row = self.db.execute(_ANSWER, (answer, by, time.time_ns(), query_id)).fetchone()
        if row is None:
            current = self.get(query_id)  # unknown id: PreferenceError from get
            raise PreferenceError(f"preference query #{query_id} is already {answered_text(current)}; an answer "
                                  "is final")
        return _row(row)

    def counts(self) -> dict[str, int]:
        """Queries per status and answered queries per answer: {"open": n, "answered": n, "a": n, ...}."""
        out = dict.fromkeys((*STATUSES, *ANSWERS), 0)
        for status, answer, n in self.db.execute(
                "SELECT status, answer, COUNT(*) FROM preferences GROUP BY status, answer"):
            out[status] = out.get(status, 0) + n
            if answer is not None:
                out[answer] = out.get(answer, 0) + n
        return out

    def close(self) -> None:
        self.db.close()
