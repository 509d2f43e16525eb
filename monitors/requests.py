"""From VFD alerts to SAVE data requests: rate-limit per task, store durably, then publish.

A VFD verdict at `alert` or above means the ensemble disagrees about what to do here (PAPERS.md §2): the
runtime asks for a demonstration of this task from this state.  One plan above threshold is one request's
worth of information, and an alerting episode alerts on plan after plan, so requests are limited to one
per task every `request_interval_s` (a request is what an expert spends minutes on; the alert stream
already counts every occurrence).  A task the robot did not name (no `task` in its reset) is limited
under the empty name.

Filing shares the runtime's `Outbox` with the alerts (runtime/outbox.py): store first, then publish, and a
locked store queues the request instead of blocking the control loop.  The slot of the rate limit is taken
when the request is queued, so a store that is locked for a while does not turn into a burst later.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any, Mapping

import numpy as np

from vigil.monitors.base import Verdict
from vigil.runtime.outbox import Entry, Outbox
from vigil.runtime.protocol import Message
from vigil.runtime.requests import RequestRecord, RequestStore
from vigil.runtime.stream import OperatorStream

log = logging.getLogger("vigil.requests")


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
