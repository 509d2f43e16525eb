"""The writer thread: everything a recording costs beyond a queue append happens here.

The loop's hook (hook.py) appends one tuple per event to a deque; this thread takes them in order, builds the
Foxglove messages (topics.py), opens, rotates and closes the robots' files (files.py), and closes the open chunks
every `flush_s`. It never blocks the loop: the deque is the only thing they share, and a deque's append and
popleft are atomic.

A file that cannot be opened, flushed or closed (disk full, folder gone, read-only) ends the recording: the
writer closes what it can, keeps the reason in `failure`, calls `on_failure` (the hook reports it on the loop's
thread) and from then on drops what it is given, counted. The live websocket, if any, goes on. The control
loop never learns of it except through the report.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foxglove import Context
from foxglove.messages import LogLevel

from vigil.monitors.base import Verdict
from vigil.record.files import EpisodeFile, Layout
from vigil.record.topics import SEVERITY, RobotTopics

log = logging.getLogger("vigil.record")

# what the hook queues: (kind, ...), see RecordHook
TICK, HELLO, RESET, POLICY, VERDICT, STREAM, FORGET = range(7)
IDLE_S = 0.05  # the writer's nap when the queue is empty: it takes ticks in batches (a wake-up costs)
PENDING_MAX = 1000  # events kept for a robot whose next file is not open yet


@dataclass
class _Robot:
    """A robot as the writer sees it: its channels, its episode and open file, what waits for that file."""

    topics: RobotTopics
    episode: int = 0
    part: int = 1
    file: EpisodeFile | None = None
    info: dict[str, Any] = field(default_factory=dict)
    policy: str = ""
    plans_span: bool = False  # the policy's plans cover several ticks: a new plan is worth a log line
    last_plan: int = -1
    pending: list[tuple[Callable[..., None], tuple]] = field(default_factory=list)


class RecordWriter:
    """Takes the hook's queue; writes files under `layout` (None: nothing on disk) and, when `live`, logs every
    message to the context's websocket server too."""

    def __init__(self, queue: deque, context: Context, layout: Layout | None, flush_s: float, rotate_bytes: int,
                 wall_offset_ns: int, live: bool = False, on_failure: Callable[[], None] = lambda: None):
        self.queue, self.context, self.layout, self.live = queue, context, layout, live
        self.flush_s, self.rotate_bytes, self.wall_offset_ns = flush_s, rotate_bytes, wall_offset_ns
        self.on_failure = on_failure
        self.robots: dict[str, _Robot] = {}
        self.connections: dict[str, int] = {}  # new sessions per robot id so far (kept after a robot is forgotten):
        # the current one's files go under connection-<k>/ (files.py)
        self.failure: str | None = None  # why the recording stopped, once it has
        self.ticks = 0  # ticks written
        self.dropped = 0  # events given after a failure
        self.errors = 0  # events that could not be turned into messages (a bug: logged)
        self.files: list[str] = []  # every file opened, in order
        self.bytes = 0  # size of the closed files plus, at the last flush, of the open ones
        self._closed_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vigil-record-writer", daemon=True)
        self._handlers: dict[int, Callable[..., None]] = {
            TICK: self._tick, HELLO: self._hello, RESET: self._reset, POLICY: self._policy, VERDICT: self._verdict,
            STREAM: self._stream, FORGET: self._forget}

    @property
    def recording(self) -> bool:
        return self.layout is not None and self.failure is None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, close every file, end the thread."""
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.error("recording writer still busy after %.0f s; files left open", timeout_s)

    # -- the thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        queue, handlers = self.queue, self._handlers
        next_flush = time.monotonic() + self.flush_s
        while True:
            n = 0
            while queue and n < 1000:  # a bounded batch, so flushing stays on time under load
                item = queue.popleft()
                n += 1
                try:
                    handlers[item[0]](*item[1:])
                except Exception:  # a malformed event must not end the recording
                    self.errors += 1
                    log.exception("recording: could not write event %s", item[0])
            now = time.monotonic()
            if now >= next_flush:
                self._flush_all()
                next_flush = now + self.flush_s
            if not n:
                if self._stop.is_set():
                    break
                self._stop.wait(min(IDLE_S, max(0.0, next_flush - now)))
        for robot in list(self.robots.values()):
            self._close(robot)

    def _wall(self, t_perf: float) -> int:
        return int(t_perf * 1e9) + self.wall_offset_ns

    # -- events -----------------------------------------------------------------------------------------

    def _robot(self, robot: str) -> _Robot:
        r = self.robots.get(robot)
        if r is None:
            r = self.robots[robot] = _Robot(RobotTopics(self.context, robot))
        return r

    def _tick(self, robot: str, episode: int, step: int, seq: int, arrays: Mapping[str, Any], decision: Any) -> None:
        r = self._robot(robot)
        if episode != r.episode:  # a reset this writer did not see (never expected: resets are queued too)
            self._new_episode(r, episode)
        writes = self.live
        if self.recording and (r.file is not None or self._open(r)):
            r.file.dirty = writes = True
        if not writes:  # the recording has stopped and nobody watches live
            self.dropped += 1
            return
        t_ns = self._wall(decision.t_arrival)
        numbers: dict[str, float] = {"seq": seq, "step": step, "plan": decision.plan, "safe": decision.safe,
                                     "failed": decision.failed, "queue_us": decision.queue_s * 1e6,
                                     "decide_us": decision.decide_s * 1e6}
        if decision.infer_s is not None:
            numbers["infer_us"] = decision.infer_s * 1e6
        if decision.execution:
            numbers.update({k: v for k, v in decision.execution.items() if isinstance(v, int | float)})
        r.topics.tick(t_ns, arrays, decision, {k: float(v) for k, v in numbers.items()})
        if decision.plan != r.last_plan:
            r.last_plan = decision.plan
            if r.plans_span and decision.plan:
                scores = ", ".join(f"{k} {float(v):.4g}" for k, v in decision.scores.items())
                r.topics.log("plan", t_ns, LogLevel.Info, "plan",
                             f"plan {decision.plan} by {decision.policy}" + (f": {scores}" if scores else ""))
        self.ticks += 1

    def _hello(self, robot: str, t_ns: int, resumed: bool, info: dict[str, Any]) -> None:
        r = self._robot(robot)
        r.info.update(info)
        if not resumed:  # a new session: its episode numbers start again, so a robot seen before writes elsewhere
            if robot in self.connections:
                self._new_episode(r, 0)
            self.connections[robot] = self.connections.get(robot, 0) + 1
        self._event(r, r.topics.event, t_ns, "hello", "reconnected" if resumed else
                    "connected" + (f" ({info['env']})" if info.get("env") else ""))

    def _reset(self, robot: str, t_ns: int, episode: int, info: dict[str, Any]) -> None:
        r = self._robot(robot)
        r.info = {**r.info, **info}
        if episode != r.episode:
            self._new_episode(r, episode)
        what = ", ".join(f"{k} {v}" for k, v in info.items() if k in ("task", "instruction", "episode"))
        self._event(r, r.topics.event, t_ns, "reset", f"episode {episode}" + (f": {what}" if what else ""))

    def _policy(self, robot: str, t_ns: int, policy: str, plans_span: bool) -> None:
        r = self._robot(robot)
        previous, r.policy, r.plans_span, r.last_plan = r.policy, policy, plans_span, -1
        text = f"plans with {policy}" + (f" (was {previous})" if previous else "")
        self._event(r, r.topics.event, t_ns, "policy", text)

    def _verdict(self, robot: str, t_ns: int, verdict: Verdict) -> None:
        for r in self._addressed(robot):
            self._event(r, r.topics.verdict, t_ns, verdict)

    def _stream(self, topic: str, t_ns: int, robot: str, meta: Mapping[str, Any]) -> None:
        """What the operator stream carried: alerts (with their store ids), data requests, telemetry events."""
        for r in self._addressed(robot):
            if topic.startswith("alert."):
                self._event(r, r.topics.alert, t_ns, meta)
            elif topic == "request":
                self._event(r, r.topics.event, t_ns, "request",
                            f"data request #{meta.get('id', 0)} for task {meta.get('task', '')}")
            else:
                event = str(meta.get("event", ""))
                values = meta.get("values") or {}
                text = event + (": " + ", ".join(f"{k} {v}" for k, v in values.items()) if values else "")
                level = SEVERITY["warn"] if event.endswith(("failing", "failed", "refused", "lost")) else LogLevel.Info
                self._event(r, r.topics.event, t_ns, event, text, level)

    def _forget(self, robot: str, t_ns: int, reason: str) -> None:
        r = self.robots.get(robot)
        if r is not None:
            self._event(r, r.topics.event, t_ns, "forget", f"session ends: {reason}")
            self._close(r)
            del self.robots[robot]

    def _addressed(self, robot: str) -> list[_Robot]:
        """The robots an event is about: one, or every robot for a runtime-wide event (robot "")."""
        if robot:
            return [self._robot(robot)]
        return list(self.robots.values())

    def _event(self, r: _Robot, write: Callable[..., None], *args: Any) -> None:
        """Write now if the robot's file is open (or nothing goes to disk); else keep it for the next file."""
        if r.file is not None:
            write(*args)
            r.file.dirty = True
        elif self.recording:
            if len(r.pending) < PENDING_MAX:
                r.pending.append((write, args))
        elif self.live:
            write(*args)
        else:
            self.dropped += 1

    # -- files ------------------------------------------------------------------------------------------

    def _new_episode(self, r: _Robot, episode: int) -> None:
        self._close(r)
        r.episode, r.part, r.last_plan = episode, 1, -1

    def _open(self, r: _Robot) -> bool:
        path = self.layout.path(r.topics.robot, r.episode, r.part, self.connections.get(r.topics.robot, 1))
        meta = {"robot": r.topics.robot, "episode": r.episode, "part": r.part, "policy": r.policy,
                "run": self.layout.run, "started_ns": time.time_ns(),
                **{k: v for k, v in r.info.items() if k in ("task", "instruction", "env")}}
        if "episode" in r.info:  # the robot's own count, beside the runtime's
            meta["robot_episode"] = r.info["episode"]
        try:
            r.file = EpisodeFile(self.context, path, r.topics.robot, meta)
        except Exception as exc:  # noqa: BLE001 - OSError, or foxglove's RuntimeError around one
            self._fail(f"cannot open {path}: {exc}", path)
            return False
        self.files.append(str(path))
        pending, r.pending = r.pending, []
        for write, args in pending:
            write(*args)
        return True

    def _flush_all(self) -> None:
        open_bytes = 0
        for r in list(self.robots.values()):
            f = r.file
            if f is None:
                continue
            if f.dirty:
                try:
                    size = f.flush()
                except Exception as exc:  # noqa: BLE001
                    self._fail(f"cannot write {f.path}: {exc}", f.path)
                    return
                if size >= self.rotate_bytes:  # the episode goes on in its next part
                    self._close(r)
                    r.part += 1
                    continue
            open_bytes += f.path.stat().st_size if f.path.exists() else 0
        self.bytes = self._closed_bytes + open_bytes

    def _close(self, r: _Robot) -> None:
        f, r.file = r.file, None
        if f is None:
            return
        try:
            f.close()
            self._closed_bytes += f.path.stat().st_size
        except Exception as exc:  # noqa: BLE001
            self._fail(f"cannot finish {f.path}: {exc}", f.path)

    def _fail(self, reason: str, path: Path) -> None:
        """The recording ends here: say why (with what the disk says), let go of every file, report."""
        if self.failure is not None:
            return
        try:
            free = shutil.disk_usage(self.layout.root).free
            reason += f"; {free} bytes free on the disk of {self.layout.root}" + (" (full)" if free < 1 << 20 else "")
        except OSError as exc:
            reason += f"; {self.layout.root} is not reachable ({exc.strerror})"
        self.failure = reason  # the hook logs it and tells the operator, from the loop's thread
        for r in self.robots.values():
            f, r.file = r.file, None
            r.pending.clear()
            if f is not None:
                try:
                    f.close()
                except Exception:  # noqa: BLE001 - the file is already lost past its last complete chunk
                    pass
        self.on_failure()
