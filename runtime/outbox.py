"""Store first, then publish: the one path by which the runtime files operator records (alerts, data
requests).

A record is published on the operator stream only after the store has committed it, so a subscriber never
sees anything that a restart could lose.  When the store cannot take a record (file locked by another
process, disk full, read-only), the record waits in a bounded in-memory queue, in order, and `retry` (run by
the loop's timers) files it later; the control loop never waits on the disk longer than the store's short
busy timeout.  Alerts and requests share one outbox, so they reach the store in the order they happened.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("vigil.outbox")


@dataclass(frozen=True)
class Entry:
    """One record to file: `write()` commits it and returns what was stored (it raises if the store
    refuses); `publish(stored)` announces it."""

    write: Callable[[], Any]
    publish: Callable[[Any], None]
    what: str = "record"


class Outbox:
    """`on_change(error)` is called when the store starts failing (error: what the store said) and when it
    takes records again (error None): the runtime tells the operator, since the store cannot."""

    def __init__(self, maxlen: int = 10_000, on_change: Callable[[str | None], None] | None = None):
        self.pending: deque[Entry] = deque(maxlen=maxlen)
        self.dropped = 0  # entries pushed out of a full queue (the oldest go first)
        self.failing: str | None = None  # the store's last error while it refuses records
        self.on_change = on_change

    def put(self, entry: Entry) -> list[Any]:
        """Queue `entry` behind anything still waiting and try to file everything; returns what was filed."""
        if len(self.pending) == self.pending.maxlen:
            self.dropped += 1
        self.pending.append(entry)
        return self.retry()

    def retry(self) -> list[Any]:
        """File queued entries in order until the store fails; returns the stored records, in order."""
        filed = []
        while self.pending:
            entry = self.pending[0]
            try:
                stored = entry.write()
            except Exception as exc:  # sqlite3.OperationalError: locked, disk full, read-only
                if self.failing is None:
                    log.warning("store failed (%s); %d record(s) waiting, first a %s", exc, len(self.pending),
                                entry.what)
                    self._change(f"{type(exc).__name__}: {exc}")
                break
            self.pending.popleft()
            entry.publish(stored)
            filed.append(stored)
        if self.failing is not None and not self.pending:
            log.warning("store takes records again; %d filed", len(filed))
            self._change(None)
        return filed

    def _change(self, error: str | None) -> None:
        self.failing = error
        if self.on_change is not None:
            self.on_change(error)
