"""Store first, then publish: the one path by which the runtime files operator records (alerts, data
requests).

A record is published on the operator stream only after the store has committed it, so a subscriber never
sees anything that a restart could lose.  When the store cannot take a record (file locked by another
process, disk full, read-only), the record waits in a bounded in-memory queue, in order, and is filed later.
Alerts and requests share one outbox, so they reach the store in the order they happened.

In the runtime the commits run on a writer thread of their own (`wake` given): a commit is an fsync, which
can take tens of milliseconds on a busy disk, and the control loop must not wait for it. The writer commits,
then wakes the loop, which publishes what was stored (`deliver`, from its timers), in order: publishing stays
on the loop's thread, which owns the stream's socket. Without `wake` (tools, tests) `put` commits and
publishes on the caller's thread.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("vigil.outbox")
RETRY_S = 0.05  # the writer's pause after the store refused a record, before it tries again


@dataclass(frozen=True)
class Entry:
    """One record to file: `write()` commits it and returns what was stored (it raises if the store
    refuses); `publish(stored)` announces it."""

    write: Callable[[], Any]
    publish: Callable[[Any], None]
    what: str = "record"


class Outbox:
    """`on_change(error)` is called when the store starts failing (error: what the store said) and when it
    takes records again (error None): the runtime tells the operator, since the store cannot. It is always
    called on the thread that publishes (the loop's)."""

    def __init__(self, maxlen: int = 10_000, on_change: Callable[[str | None], None] | None = None,
                 wake: Callable[[], None] | None = None):
        self.pending: deque[Entry] = deque()  # not yet stored, in order
        self.maxlen = maxlen
        self.dropped = 0  # entries pushed out of a full queue (the oldest go first)
        self.failing: str | None = None  # the store's last error while it refuses records
        self.on_change = on_change
        self._wake = wake
        self._lock = threading.Condition()
        self._out: deque[tuple[str, Any, Any]] = deque()  # writer -> loop: ("stored", entry, record) / changes
        self._closed = False
        self._thread: threading.Thread | None = None
        if wake is not None:
            self._thread = threading.Thread(target=self._write_all, name="vigil-store-writer", daemon=True)
            self._thread.start()

    def put(self, entry: Entry) -> list[Any]:
        """Queue `entry` behind anything still waiting. Synchronous: try to file everything now and return
        what was filed. With a writer thread: return at once ([]); the record is published once stored."""
        with self._lock:
            if len(self.pending) >= self.maxlen:
                self.pending.popleft()
                self.dropped += 1
            self.pending.append(entry)
            self._lock.notify()
        return self.retry() if self._thread is None else []

    def retry(self) -> list[Any]:
        """File (synchronous) or publish what the writer filed (threaded); returns the records published."""
        if self._thread is not None:
            return self.deliver()
        filed = []
        while self.pending:
            entry = self.pending[0]
            try:
                stored = entry.write()
            except Exception as exc:  # sqlite3.OperationalError: locked, disk full, read-only
                if self.failing is None:
                    self._failing(f"{type(exc).__name__}: {exc}", entry)
                break
            self.pending.popleft()
            entry.publish(stored)
            filed.append(stored)
        if self.failing is not None and not self.pending:
            self._recovered(len(filed))
        return filed

    def deliver(self) -> list[Any]:
        """On the loop's thread: publish, in order, what the writer stored, and tell of store failures and
        recoveries in the order they happened."""
        published = []
        while self._out:
            what, entry, stored = self._out.popleft()
            if what == "stored":
                entry.publish(stored)
                published.append(stored)
            elif what == "failing":
                self._failing(stored, entry)
            else:
                self._recovered(stored)
        return published

    def close(self, timeout_s: float = 2.0) -> None:
        """Let the writer file what is waiting (at most `timeout_s`), publish it, and stop the writer."""
        if self._thread is None:
            return
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout_s)
        self.deliver()
        self._thread = None

    # -- the writer thread ------------------------------------------------------------------------------

    def _write_all(self) -> None:
        failing = False
        while True:
            with self._lock:
                while not self.pending and not self._closed:
                    self._lock.wait()
                if not self.pending:
                    return
                entry = self.pending[0]
            try:
                stored = entry.write()
            except Exception as exc:  # the store refuses: say so once, keep the entry, try again later
                if not failing:
                    failing = True
                    self._out.append(("failing", entry, f"{type(exc).__name__}: {exc}"))
                    self._wake()
                with self._lock:
                    if self._closed:
                        return  # stopping with the store refusing: what is left is reported as pending
                    self._lock.wait(RETRY_S)
                continue
            with self._lock:
                if self.pending and self.pending[0] is entry:
                    self.pending.popleft()
                self._out.append(("stored", entry, stored))
                if failing and not self.pending:
                    failing = False
                    self._out.append(("ok", None, 1))
            self._wake()

    # -- telling the operator ---------------------------------------------------------------------------

    def _failing(self, error: str, entry: Entry) -> None:
        log.warning("store failed (%s); %d record(s) waiting, first a %s", error, len(self.pending), entry.what)
        self._change(error)

    def _recovered(self, filed: int) -> None:
        log.warning("store takes records again; %d filed", filed)
        self._change(None)

    def _change(self, error: str | None) -> None:
        self.failing = error
        if self.on_change is not None:
            self.on_change(error)
