"""The recorder's hook: on the loop's thread it only queues; the writer thread (writer.py) does the rest.

`on_decision` appends one tuple to a bounded deque: the robot, its episode and step, the observation's seq, its
arrays and the `Decision`. No copy is made: the arrays are read-only views of the message's frames and the
decision is a NamedTuple whose action and scores are never written after the tick. When the writer falls behind
by `QUEUE_MAX` events, new ones are dropped and counted (`record.dropped` in telemetry), never waited for. Alerts,
data requests and telemetry events are taken from the operator stream as it publishes them (`OperatorStream.taps`),
so the recording holds them with their store ids, exactly as an operator saw them.

When the writer gives up (a disk full, a folder gone), the hook reports it from the loop's timers through the
existing paths: a stored `record` alert (the alert store is another file, and goes on), a `record_failed`
telemetry event and an error in the log. The control loop is not otherwise affected.

`RecordHook.start(runtime)` is what runtime/extras.py calls for `--record DIR` or `--foxglove-ws PORT`.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import foxglove
from foxglove import Context

from vigil.monitors.base import Level, Verdict
from vigil.record.files import Layout, run_name
from vigil.record.writer import FORGET, HELLO, POLICY, RESET, STREAM, TICK, VERDICT, RecordWriter
from vigil.runtime.config import ConfigError
from vigil.runtime.hooks import Hook

if TYPE_CHECKING:
    from vigil.runtime.alerts import AlertHook
    from vigil.runtime.server import Runtime
    from vigil.runtime.session import Decision, Session
    from vigil.runtime.stream import OperatorStream
    from vigil.wire.protocol import Message

log = logging.getLogger("vigil.record")
QUEUE_MAX = 20_000  # events waiting for the writer (about 3 minutes of one 100 Hz robot's ticks and events)
_INFO_KEYS = ("env", "task", "instruction", "episode")


class RecordHook(Hook):
    name = "record"

    def __init__(self, writer: RecordWriter, queue: deque, alerts: AlertHook, stream: OperatorStream,
                 counters: Counter, server: Any = None):
        self.writer, self.queue, self.alerts, self.stream, self.counters = writer, queue, alerts, stream, counters
        self.server = server  # foxglove's websocket server, when serving live
        self.dropped = 0  # ticks and events not queued: the writer was QUEUE_MAX behind
        self._reported = False

    @classmethod
    def start(cls, runtime: Runtime) -> RecordHook:
        """The hook for `runtime`'s configuration: check the folder, start the live server if asked, start the
        writer, tap the operator stream. A folder that cannot be written or a port that cannot be bound is a
        ConfigError naming its key."""
        config = runtime.config
        layout = None
        if config.record:
            root = Path(config.record).resolve()
            try:
                root.mkdir(parents=True, exist_ok=True)
                probe = root / f".vigil-write-test-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                raise ConfigError(f"config key 'record' must be a folder vigil can write, got {config.record!r}: "
                                  f"{exc.strerror or exc}") from None
            layout = Layout(root, run_name())
        context = Context()
        server = None
        if config.foxglove_ws:
            try:
                server = foxglove.start_server(name="vigil", host="127.0.0.1", port=config.foxglove_ws, context=context)
            except Exception as exc:  # noqa: BLE001 - foxglove raises RuntimeError for a port in use
                raise ConfigError(f"config key 'foxglove_ws' must be a free tcp port, got {config.foxglove_ws}: "
                                  f"{exc}") from None
        queue: deque = deque()
        wall_offset_ns = time.time_ns() - int(time.perf_counter() * 1e9)  # perf_counter (arrival) -> wall clock
        writer = RecordWriter(queue, context, layout, config.record_flush_s, int(config.record_rotate_mb * 2**20),
                              wall_offset_ns, live=server is not None, on_failure=runtime.wake)
        hook = cls(writer, queue, runtime.reporting.alerts, runtime.stream, runtime.counters, server)
        runtime.stream.taps.append(hook.on_stream)
        writer.start()
        if layout is not None:
            log.info("recording into %s", layout.root / layout.run)
        if server is not None:
            log.info("serving live to Foxglove on ws://127.0.0.1:%d", server.port)
        return hook

    def _put(self, item: tuple) -> None:
        if len(self.queue) < QUEUE_MAX:
            self.queue.append(item)
        else:
            self.dropped += 1

    # -- the loop's events (the loop's thread) --------------------------------------------------------

    def on_decision(self, session: Session, obs: Message, decision: Decision) -> None:
        queue = self.queue
        if len(queue) < QUEUE_MAX:
            queue.append((TICK, session.robot, session.episode, session.step - 1, obs.seq, obs.arrays, decision))
        else:
            self.dropped += 1

    def on_hello(self, session: Session, resumed: bool) -> None:
        info = {k: session.info[k] for k in _INFO_KEYS if k in session.info}
        self._put((HELLO, session.robot, time.time_ns(), resumed, info))

    def on_reset(self, session: Session) -> None:
        info = {k: session.info[k] for k in _INFO_KEYS if k in session.info}
        self._put((RESET, session.robot, time.time_ns(), session.episode, info))

    def on_policy(self, session: Session) -> None:
        manifest = session.policy.manifest
        self._put((POLICY, session.robot, time.time_ns(), manifest.policy_id, manifest.chunk_execute > 1))

    def on_verdict(self, robot: str, verdict: Verdict) -> None:
        self._put((VERDICT, robot, time.time_ns(), verdict))

    def on_link_lost(self, session: Session, verdict: Verdict) -> None:
        self._put((VERDICT, session.robot, time.time_ns(), verdict))

    def on_forget(self, session: Session, reason: str) -> None:
        self._put((FORGET, session.robot, time.time_ns(), reason))

    def on_stream(self, topic: str, msg: Message) -> None:
        """Everything the operator stream publishes, but the periodic telemetry and the live trace."""
        if topic.startswith(("alert.", "request")) or (topic == "telemetry" and "event" in msg.meta):
            self._put((STREAM, topic, msg.t_ns or time.time_ns(), msg.robot, msg.meta))

    def on_timer(self, now: float) -> None:
        if self.writer.failure is not None and not self._reported:
            self._reported = True
            self._report(self.writer.failure)

    def _report(self, reason: str) -> None:
        """The recording stopped: a stored alert, a telemetry event, a log line. The loop goes on."""
        self.counters["record_failed"] += 1
        values = {"folder": str(self.writer.layout.root) if self.writer.layout else "", "error": reason,
                  "ticks": self.writer.ticks, "files": len(self.writer.files)}
        log.error("recording stopped (the control loop goes on): %s", reason)
        self.alerts.file("", Verdict("record", Level.ALERT, f"recording stopped: {reason}"[:500], values))
        self.stream.event("", "record_failed", values)

    # -- figures and the end ------------------------------------------------------------------------------

    def stats(self) -> Mapping[str, Any]:
        w = self.writer
        return {"record": {"ticks": w.ticks, "queued": len(self.queue), "dropped": self.dropped + w.dropped,
                           "files": len(w.files), "bytes": w.bytes, "failed": w.failure or ""}}

    def close(self) -> None:
        self.writer.stop()
        if self.server is not None:
            self.server.stop()
        w = self.writer
        self.counters["record_ticks"] = w.ticks
        self.counters["record_files"] = len(w.files)
        self.counters["record_dropped"] = self.dropped + w.dropped
        if w.failure is not None and not self._reported:  # failed while stopping: still said, in the log
            log.error("recording stopped: %s", w.failure)
