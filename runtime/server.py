"""The onboard event loop: robot link in, policy, monitors, action out, operator stream.

One thread, one `zmq.Poller`. What a message from a robot goes through, top to bottom:

    receive (validate; a malformed message gets an `error` reply)  ->  the robot's session decides
    (runtime/session.py: policy, monitors)  ->  reply `act`  ->  hooks (runtime/hooks.py: alerts, data
    requests, the online learner, telemetry)

The robot has its action before anything else happens: alerts and requests are stored (an fsync) after the
reply. No exception from a handler or a hook ends the loop. Everything slow runs on workers that wake the
loop when done (a bundle loading for a hot swap, runtime/control.py; a gain computation, runtime/learning.py).
"""

from __future__ import annotations

import gc
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence

import zmq

from vigil.monitors.base import Level, Verdict
from vigil.monitors.safety import LinkMonitor
from vigil.policies.bundle import Policy, load_policy
from vigil.runtime.auth import ServerAuth
from vigil.runtime.config import ServeConfig, is_local
from vigil.runtime.control import ControlChannel
from vigil.runtime.extras import recorder, wants_recorder
from vigil.runtime.hooks import Hook, Hooks
from vigil.runtime.inbox import Inbox, Queued
from vigil.runtime.learning import GainWorker, LearnerHook
from vigil.runtime.link import LinkSocket
from vigil.runtime.planner import AsyncSettings, Planner, PlannerHook
from vigil.runtime.reporting import Reporting
from vigil.runtime.scoring import episode_scorer
from vigil.runtime.session import Session, act_reply, check_spec, hello_options, plan_together, standard_monitors
from vigil.runtime.telemetry import TelemetryHook
from vigil.runtime.trace import TraceHook
from vigil.runtime.transitions import TransitionHook, TransitionLog, outcome_of
from vigil.wire.protocol import (
    Layout,
    Message,
    ProtocolError,
    decode,
    encode,
    error,
    peek_seq,
)

log = logging.getLogger("vigil.serve")
MAX_BATCH = 256  # messages read per wake-up, so timers still run under a flood
TIMER_S = 0.05  # the loop's timers run at least this often
MAX_AGE_NS = 10**10  # a send time older than this is a clock that is not comparable after all: not used
_NOBLOCK = int(zmq.NOBLOCK)
_clock = time.perf_counter


class Runtime:
    """Serves one policy (hot-swappable) to any number of robots. `hooks` are added after the standard ones
    (alerts, data requests, the online learner, telemetry)."""

    def __init__(self, config: ServeConfig, policy: Policy | None = None, ctx: zmq.Context | None = None,
                 hooks: Sequence[Hook] = ()):
        self.config = config
        self.policy = policy or load_policy(config.bundle, threads=config.threads)
        self.deadline_s = config.deadline_s(self.manifest.control_rate_hz)
        self.ctx = ctx or zmq.Context()
        self.counters: Counter = Counter()
        self.sessions: dict[str, Session] = {}  # by robot id
        self.by_identity: dict[bytes, Session] = {}  # by the routing id of the connection it last spoke from
        self._monitors = standard_monitors(self.deadline_s, config.saturation_window)
        # CURVE on every endpoint when configured (runtime/auth.py): only allow-listed client keys get in
        self.auth = ServerAuth(self.ctx, config.curve_secret, config.curve_allow) if config.authenticated else None
        self.link = LinkSocket(self.ctx, config.robot_endpoint, self.auth, self.counters)
        self._wake_r, self._wake_w = os.pipe()  # workers write a byte here when they finish: the loop wakes
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._woken = False
        self.reporting = Reporting.open(self.ctx, config, self.auth, self.counters, self.wake)
        self.stream, alerts = self.reporting.stream, self.reporting.alerts
        # --execution async: one worker plans for every robot (runtime/planner.py); sessions drive it
        self.planner = Planner(on_done=self.wake) if config.execution == "async" else None
        self._async = AsyncSettings.from_config(config) if self.planner is not None else None
        # --transitions FILE: robots that ask report rewards; transitions go to a durable log off the loop
        self.transition_log = TransitionLog(config.transitions, config.transitions_queue) if config.transitions \
            else None
        self.hooks = Hooks([alerts, self.reporting.request_hook,
                            LearnerHook(GainWorker(on_done=self.wake), alerts, self.stream, self.counters),
                            TelemetryHook(self, self.stream, config.telemetry_s),
                            *([TraceHook(self.stream)] if config.trace else []),
                            *([PlannerHook(self.planner)] if self.planner is not None else []),
                            *([recorder(self)] if wants_recorder(self) else []),
                            *([episode_scorer(config.reward, self.stream, self.counters)] if config.reward else []),
                            *([TransitionHook(self.transition_log, self.counters)] if self.transition_log else []),
                            *hooks], self.counters)
        self.control = None
        if config.control_endpoint:
            self.control = ControlChannel(self.ctx, config.control_endpoint, self.auth, alerts, self.stream,
                                          self.counters, config.threads, self.wake)
        self.inbox = Inbox(config.pipeline, config.mode == "realtime", self.counters)
        self._local = is_local(config.robot_endpoint)  # robots on this computer: their clocks are ours
        self._handlers: dict[str, Callable[[bytes, Message, float], None]] = {
            "obs": self._on_obs, "hello": self._on_hello, "reset": self._on_reset,
            "heartbeat": self._on_heartbeat, "bye": self._on_bye, "error": self._on_robot_error,
        }

    @property
    def manifest(self):
        return self.policy.manifest

    def endpoints(self) -> dict[str, str]:
        """The endpoints as bound (a port 0 in the configuration is the real port here)."""
        return {"robot_endpoint": self.link.endpoint, "operator_endpoint": self.stream.endpoint,
                "control_endpoint": self.control.endpoint if self.control is not None else ""}

    def wake(self) -> None:
        """Wake the loop from another thread (a worker finished): it runs its timers before the next message."""
        self._woken = True
        try:
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # the pipe is full of wake-ups already
            pass

    # -- the loop ---------------------------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> Counter:
        """Serve until `should_stop()` is true (checked at least every 50 ms). Returns the counters."""
        poller = zmq.Poller()
        poller.register(self.link.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        if self.control is not None:
            poller.register(self.control.sock, zmq.POLLIN)
        spin_s = self.config.busy_poll_us / 1e6
        log.info("serving %s on %s (%s mode), operator stream on %s", self.manifest.policy_id,
                 self.link.endpoint, self.config.mode, self.stream.endpoint)
        gc.collect()
        gc.freeze()  # what start-up built lives as long as the runtime: the collector need not look at it again
        last_msg = next_timers = time.monotonic()
        try:
            while not should_stop():
                # Busy polling (opt-in) keeps the core and its caches hot between ticks: a robot computer
                # with a core to spare trades it for latency. Otherwise block until a message or a timer.
                now = time.monotonic()
                spinning = self.inbox or (spin_s > 0 and now - last_msg < spin_s)
                events = poller.poll(0 if spinning else max(0, int((next_timers - now) * 1000)) + 1)
                if self.inbox and not any(sock is self.link.sock for sock, _ in events):
                    self.serve_ready()  # another round for robots with messages still waiting
                for sock, _ in events:
                    if sock is self.link.sock:
                        self.serve_ready()
                        last_msg = time.monotonic()
                    elif sock == self._wake_r:
                        self._on_wake()
                    elif self.control is not None and sock is self.control.sock:
                        self.control.on_readable(self.policy, self._instructions())
                if (now := time.monotonic()) >= next_timers:
                    self._on_timers(now)
                    next_timers = now + self._timer_interval()
        finally:
            self.close()
        return self.counters

    def serve_ready(self) -> None:
        """Read what is waiting on the robot link, then serve in rounds, a message from every robot with one
        waiting per round (runtime/inbox.py), as many messages as were read (at least one round): the inbox
        does not grow while the runtime keeps up, and one robot's burst waits behind the others' next
        message, not ahead of it. The loop calls this when the link is readable or the inbox is not empty;
        benchmarks call it directly to time the tick in process."""
        budget = self._receive()
        while True:
            items = self.inbox.round()
            if self.config.batch_plans > 1 and len(items) > 1:
                self._plan_together(items)
            for item in items:
                if self._woken:  # a worker finished (a gain, a bundle): adopt it before the next tick
                    self._on_wake()
                self._handle(item)
            budget -= len(items)
            if budget <= 0 or not self.inbox:
                return

    def _plan_together(self, items: list[Queued]) -> None:
        """Several robots' observations in this round: plan them in one onnxruntime call (`--batch-plans`)."""
        ready = [(s, q.msg.arrays) for q in items
                 if q.msg.kind == "obs" and (s := self.by_identity.get(q.identity)) is not None]
        if len(ready) > 1:
            self.counters["planned_together"] += plan_together(ready, self.config.batch_plans)

    def _receive(self) -> int:
        """Decode what is waiting into the inbox (a malformed message is answered with an `error` at once)
        and date each message's arrival: the robot's send time when its clock is comparable with ours, else
        the moment this read began. Returns how many messages were read."""
        by_identity, inbox = self.by_identity, self.inbox
        t_read, wall_read = _clock(), time.time_ns()
        messages = self.link.read(min(MAX_BATCH, 8 + 2 * len(self.sessions)))  # bounded: a flood cannot starve us
        for frames in messages:
            identity = frames[0]
            session = by_identity.get(identity)
            try:
                msg = decode(frames[1:], layout=session.layout if session else None)
            except ProtocolError as exc:
                self._reject(identity, exc.code, exc.message, peek_seq(frames[1:]))
                continue
            t_arrival = t_read
            if (session.clock_synced if session else self._local) and 0 < wall_read - msg.t_ns < MAX_AGE_NS:
                t_arrival -= (wall_read - msg.t_ns) * 1e-9
            pushed = inbox.put(Queued(identity, msg, t_arrival))
            if pushed is not None:
                depth = session.pipeline if session else self.config.pipeline
                self._reject(pushed.identity, "overflow", f"{pushed.msg.kind} #{pushed.msg.seq} dropped: more than "
                             f"{depth} messages waiting from this robot (its pipeline depth)", pushed.msg.seq)
        return len(messages)

    def _handle(self, item: Queued) -> None:
        identity, msg, t_arrival = item
        try:
            handler = self._handlers.get(msg.kind)
            if handler is None:
                raise ProtocolError("bad_kind", f"kind {msg.kind!r} is not accepted from a robot")
            handler(identity, msg, t_arrival)
        except ProtocolError as exc:
            self._reject(identity, exc.code, exc.message, msg.seq)
        except Exception as exc:  # a bug must not take the robot's controller down
            log.exception("handler for %s failed", msg.kind)
            self._reject(identity, "internal", f"{type(exc).__name__}: {exc}", msg.seq)

    # -- what a robot sends -----------------------------------------------------------------------------

    def _on_obs(self, identity: bytes, msg: Message, t_recv: float) -> None:
        session = self._session(identity, msg)
        session.check(msg.arrays)
        if msg.meta and session.info.get("transitions"):
            outcome_of(msg.meta)  # a malformed outcome is refused before the tick, like a malformed array
        self._touch(session)
        decision = session.on_obs(msg.arrays, msg.seq, t_recv)
        self._send(identity, act_reply(session.robot, msg.seq, decision))
        session.after_reply()
        self.counters["ticks"] += 1
        if decision.failed:
            self.counters["policy_failed"] += 1
        self.hooks.decision(session, msg, decision)

    def _on_hello(self, identity: bytes, msg: Message, t_recv: float) -> None:
        """Check the robot's declared spec against the bundle; answer with the manifest or a refusal."""
        robot = msg.robot
        if not robot:
            raise ProtocolError("bad_header", "hello must name the robot (header key 'robot')")
        declared = check_spec(msg.meta.get("spec"), self.manifest)
        pipeline, synced = hello_options(msg.meta, self.config.pipeline, self._local)
        if type(msg.meta.get("transitions", False)) is not bool:
            raise ProtocolError("bad_header", "hello key 'transitions' must be a bool")
        transitions = bool(msg.meta.get("transitions")) and self.transition_log is not None
        previous = self.by_identity.get(identity)
        if previous is not None and previous.robot != robot:  # one connection, one robot: the first one leaves
            self._forget(previous, "disconnected")
        session = self.sessions.get(robot)
        resumed = session is not None
        if session is not None:  # the robot reconnected: same policy state, new socket
            self.by_identity.pop(session.identity, None)
            self.inbox.forget(session.identity)
            session.identity = identity
            session.layout = Layout(declared)
            session.resumed()
            self._touch(session)
            self.counters["reconnects"] += 1
        else:
            session = Session(robot, identity, self.policy, self._monitors,
                              LinkMonitor(self.config.link_timeout_s, time.monotonic()), msg.meta, declared,
                              on_policy=lambda s: self.hooks.emit("on_policy", s), planner=self.planner,
                              settings=self._async)
            self.sessions[robot] = session
        session.pipeline, session.clock_synced = pipeline, synced
        session.info["transitions"] = transitions  # negotiated: asked for, and this runtime has a log
        self.inbox.set_depth(identity, pipeline)
        self.by_identity[identity] = session
        self.hooks.emit("on_hello", session, resumed)
        self._send(identity, encode(Message("hello", robot, msg.seq, 0, {}, {
            "policy": self.manifest.policy_id, "manifest": self.manifest.for_wire(), "mode": self.config.mode,
            "deadline_ms": self.deadline_s * 1e3, "heartbeat_s": self.config.heartbeat_s,
            "link_timeout_s": self.config.link_timeout_s, "pipeline": pipeline, "clock_synced": synced,
            "session_expiry_s": self.config.session_expiry_s, "execution": session.execution_mode,
            "transitions": transitions})))

    def _on_reset(self, identity: bytes, msg: Message, t_recv: float) -> None:
        session = self._session(identity, msg)
        self._touch(session)
        episode = session.reset(msg.meta)
        self.hooks.emit("on_reset", session)
        self._send(identity, encode(Message("reset", session.robot, msg.seq, 0, {}, {"episode": episode})))

    def _on_heartbeat(self, identity: bytes, msg: Message, t_recv: float) -> None:
        session = self.by_identity.get(identity)
        if session is not None:
            self._touch(session)
            self.hooks.emit("on_heartbeat", session, msg.seq)
        self._send(identity, encode(Message("heartbeat", self._robot_for(session, msg), msg.seq)))

    def _on_bye(self, identity: bytes, msg: Message, t_recv: float) -> None:
        session = self.by_identity.get(identity)
        robot = self._robot_for(session, msg)
        if session is not None:
            self._forget(session, "disconnected")
        self._send(identity, encode(Message("bye", robot, msg.seq)))

    @staticmethod
    def _robot_for(session: Session | None, msg: Message) -> str:
        """The robot id a reply carries: the session's; none for a connection without one, which is never told a
        robot id (not even whether the one it sent is connected)."""
        return session.robot if session is not None else ""

    def _on_robot_error(self, identity: bytes, msg: Message, t_recv: float) -> None:
        """A robot reports a problem of its own: it becomes an operator alert."""
        session = self._session(identity, msg)
        self._touch(session)
        code, text = str(msg.meta.get("code", "")), str(msg.meta.get("message", ""))
        self.hooks.emit("on_verdict", session.robot,
                        Verdict("robot", Level.WARN, f"robot reported {code}: {text}"[:500]))

    def _session(self, identity: bytes, msg: Message) -> Session:
        session = self.by_identity.get(identity)
        if session is None:
            raise ProtocolError("no_session", f"send hello before {msg.kind}")
        return session

    def _touch(self, session: Session) -> None:
        """Traffic from a robot: it is alive. Ending an outage is announced."""
        outage = session.link.seen(time.monotonic())
        if outage is not None:
            self.hooks.emit("on_link_restored", session, outage)

    def _forget(self, session: Session, reason: str) -> None:
        del self.sessions[session.robot]
        self.by_identity.pop(session.identity, None)
        self.inbox.forget(session.identity)
        self.hooks.emit("on_forget", session, reason)

    def _reject(self, identity: bytes, code: str, message: str, seq: int) -> None:
        """A message that must not be used: an `error` reply, counters, and an alert for a known robot."""
        self.counters["errors"] += 1
        self.counters[f"error.{code}"] += 1
        session = self.by_identity.get(identity)
        self._send(identity, encode(error(code, message, session.robot if session else "", seq)))
        if session is not None:
            session.counters["errors"] += 1
            self._touch(session)
            self.hooks.emit("on_verdict", session.robot,
                            Verdict("protocol", Level.WARN, f"rejected message: {code}", {"code": code}))

    def _send(self, identity: bytes, frames: list) -> None:
        self.link.send(identity, frames)

    # -- between messages -------------------------------------------------------------------------------

    def _timer_interval(self) -> float:
        return TIMER_S if not self.sessions else max(0.001, min(TIMER_S, self.config.link_timeout_s / 4))

    def _on_wake(self) -> None:
        """A worker finished: drain its wake-up bytes, then run the timers (which adopt what it made)."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        self._woken = False
        self._on_timers(time.monotonic())

    def _on_timers(self, now: float) -> None:
        if self.control is not None:
            self.control.poll(self.policy, self._adopt)
        for session in list(self.sessions.values()):
            if now - session.link.last_seen > self.config.session_expiry_s:  # gone for good
                self.counters["sessions_expired"] += 1
                self._forget(session, "expired")
                continue
            verdict = session.link.check(now)
            if verdict is not None:  # best effort: if only the robot->runtime direction broke, this lands
                session.counters["link_lost"] += 1
                self._send(session.identity, act_reply(session.robot, session.last_seq, session.link_lost(verdict)))
                self.hooks.emit("on_link_lost", session, verdict)
        self.hooks.emit("on_timer", now)

    def _adopt(self, policy: Policy) -> None:
        """A swapped-in policy: every robot plans with it from its next plan boundary on."""
        self.policy = policy
        for session in self.sessions.values():
            session.offer(policy)

    def _instructions(self) -> list[str]:
        return [i for s in self.sessions.values() if isinstance(i := s.info.get("instruction"), str)]

    def close(self) -> None:
        for session in self.sessions.values():  # robots learn at once that they are on their own
            self._send(session.identity, encode(Message("bye", session.robot, session.last_seq, 0, {},
                                                        {"reason": "runtime stopping"})))
        self.reporting.flush()  # what is waiting is stored (and published) before the last telemetry
        for hook in self.hooks.hooks:
            if isinstance(hook, TelemetryHook):
                hook.publish()
        self.hooks.close()
        self.link.close()
        if self.control is not None:
            self.control.close()
        self.reporting.close()
        if self.transition_log is not None:
            self.transition_log.close()
        if self.auth is not None:
            self.auth.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
