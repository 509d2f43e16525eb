"""The onboard event loop: robot link in, policy, monitors, action out, operator stream.

Single-threaded on a zmq.Poller with monotonic timers.  Reading order of one tick (`_on_obs`):

    (at a plan boundary: switch to a newly swapped-in policy)  ->  validate the observation
    ->  agent.act (onnxruntime)  ->  monitors  ->  reply `act`
    ->  file alerts, and a data request on a VFD alert (durable store, then PUB)

Alerts and requests are filed after the reply, so a robot never waits for an fsync.  Anything a robot sends
that is malformed gets an `error` reply and bumps a counter; no exception from a handler ends the loop.
A control channel (optional) takes `swap` requests: the new bundle loads on a background thread
(runtime/swap.py) and the loop swaps the policy between ticks.

A `linear_gain` bundle with a `learner` block learns on board (runtime/learning.py): each robot's session
feeds its transitions to its own IR-LQR learner, gains are computed on a worker thread, and a finished one
is adopted between ticks (`_on_obs` before acting, and the timers); swaps go out as telemetry, fallbacks as
stored warn alerts, and the stability monitor (monitors/stability.py) stops a robot whose state blows up.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq

from vigil.monitors.base import Level, Monitor, Tick, Verdict
from vigil.monitors.safety import ActionMonitor, DeadlineMonitor, LinkMonitor, ObservationMonitor, SaturationMonitor
from vigil.monitors.stability import StabilityMonitor
from vigil.monitors.vfd import VFDMonitor
from vigil.policies.agent import Agent
from vigil.policies.bundle import Policy, load_policy
from vigil.runtime.alerts import Alerter
from vigil.runtime.auth import ServerAuth
from vigil.runtime.config import ConfigError, ServeConfig
from vigil.runtime.learning import Adopted, GainWorker, SessionLearner, describe
from vigil.runtime.outbox import Outbox
from vigil.runtime.requests import Requester, RequestStore
from vigil.runtime.store import AlertStore
from vigil.runtime.stream import OperatorStream
from vigil.runtime.swap import BundleLoader, Loaded
from vigil.wire.protocol import (
    CONTROL_KINDS,
    DEFAULT_LIMITS,
    ArraySpec,
    Message,
    ProtocolError,
    check_arrays,
    decode,
    encode,
    error,
)
from vigil.wire.transport import bound_endpoint, readable, send_frames

log = logging.getLogger("vigil.serve")
POLICY_OK = Verdict("policy", Level.OK)
MAX_BATCH = 256  # messages drained per poll wake-up, so timers still run under a flood


@dataclass
class Session:
    """One connected robot: where to reply, how to act for it, and what watches it."""

    robot: str
    identity: bytes
    agent: Agent
    monitors: list[Monitor]
    link: LinkMonitor
    info: dict[str, Any]
    last_seq: int = 0
    episode: int = 0
    step: int = 0  # observations acted on since the last reset (the step index in lockstep)
    counters: Counter = field(default_factory=Counter)
    latency_us: list[float] = field(default_factory=list)  # since the last telemetry message
    learner: SessionLearner | None = None  # this robot's online learner (bundles with a `learner` block)


class Runtime:
    def __init__(self, config: ServeConfig, policy: Policy | None = None, ctx: zmq.Context | None = None):
        self.config = config
        self.policy = policy or load_policy(config.bundle, threads=config.threads)
        self.manifest = self.policy.manifest
        self.deadline_s = config.deadline_s(self.manifest.control_rate_hz)
        self.ctx = ctx or zmq.Context()
        # CURVE on every endpoint when configured (runtime/auth.py): only allow-listed client keys get in
        self.auth = ServerAuth(self.ctx, config.curve_secret, config.curve_allow) if config.authenticated else None
        self.link = self.ctx.socket(zmq.ROUTER)
        if self.auth is not None:
            self.auth.apply(self.link)
        self.link.setsockopt(zmq.LINGER, 0)
        self.link.setsockopt(zmq.IPV6, 1)  # accept tcp://[::1]:port as well as IPv4
        # Frames far beyond the protocol limits never reach Python: libzmq drops such a peer. Messages
        # between the protocol limit and this cap still get a proper `too_large` error reply.
        self.link.setsockopt(zmq.MAXMSGSIZE, 4 * DEFAULT_LIMITS.max_total_bytes)
        self.link.bind(config.robot_endpoint)
        self.robot_endpoint = bound_endpoint(self.link)
        self.stream = OperatorStream(self.ctx, config.operator_endpoint, self.auth, config.stream_hwm)
        try:
            self.store = AlertStore(config.store)
        except (OSError, sqlite3.Error) as exc:  # nothing could be stored, so nothing could be acknowledged: no start
            raise ConfigError(f"config key 'store' must be a writable SQLite file, got {config.store!r}: {exc}") from None
        # alerts and data requests reach the store in the order they happened; a failing store is announced
        self.outbox = Outbox(on_change=self._on_store_change)
        self.alerter = Alerter(self.store, self.stream, config.alert_repeat_s, self.outbox)
        self.requests = RequestStore(config.store)
        self.requester = Requester(self.requests, self.stream, self.outbox, config.request_interval_s)
        self.control: zmq.Socket | None = None
        if config.control_endpoint:
            self.control = self.ctx.socket(zmq.ROUTER)
            self.control.setsockopt(zmq.LINGER, 0)
            self.control.setsockopt(zmq.IPV6, 1)
            if self.auth is not None:
                self.auth.apply(self.control)
            self.control.bind(config.control_endpoint)
        self.loader = BundleLoader()
        self.worker = GainWorker()  # computes the online learners' gains off the loop thread
        self._swap_waiting: tuple[bytes, int] | None = None  # who asked for the swap in progress (identity, seq)
        self.sessions: dict[str, Session] = {}
        self.by_identity: dict[bytes, Session] = {}
        self.counters: Counter = Counter()
        self._handlers: dict[str, Callable[[bytes, Message, float], None]] = {
            "hello": self._on_hello, "obs": self._on_obs, "reset": self._on_reset,
            "heartbeat": self._on_heartbeat, "bye": self._on_bye, "error": self._on_robot_error,
        }
        self._next_telemetry = time.monotonic() + config.telemetry_s

    def endpoints(self) -> dict[str, str]:
        """The endpoints as bound (a port 0 in the configuration is the real port here)."""
        return {"robot_endpoint": self.robot_endpoint, "operator_endpoint": self.stream.endpoint,
                "control_endpoint": bound_endpoint(self.control) if self.control else ""}

    # -- the loop -------------------------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> Counter:
        """Serve until `should_stop()` is true (checked at least every 50 ms). Returns the counters."""
        poller = zmq.Poller()
        poller.register(self.link, zmq.POLLIN)
        if self.control is not None:
            poller.register(self.control, zmq.POLLIN)
        spin_s = self.config.busy_poll_us / 1e6
        last_msg = time.monotonic()
        log.info("serving %s on %s (%s mode), operator stream on %s", self.manifest.policy_id,
                 self.robot_endpoint, self.config.mode, self.stream.endpoint)
        try:
            while not should_stop():
                # Busy polling (opt-in) keeps the core and its caches hot between ticks: a robot computer
                # with a core to spare trades it for latency. Otherwise block until a message or a timer.
                spinning = spin_s > 0 and time.monotonic() - last_msg < spin_s
                if events := poller.poll(0 if spinning else self._poll_timeout_ms()):
                    if self.control is not None and any(sock is self.control for sock, _ in events):
                        self._on_control()
                    self._drain()
                    last_msg = time.monotonic()
                self._on_timers(time.monotonic())
        finally:
            self.close()
        return self.counters

    def _poll_timeout_ms(self) -> int:
        return 50 if not self.sessions else max(1, min(50, int(self.config.link_timeout_s * 250)))

    def _drain(self) -> None:
        """Read what is waiting (the caller's poll saw at least one message), then handle it."""
        batch = []
        link = self.link
        for i in range(MAX_BATCH):  # bounded even when every message is malformed, so timers still run
            if i and not readable(link):  # the poller already said the first one is there
                break
            try:
                frames = link.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:  # it was not (a spurious wake-up)
                break
            item = self._decode(frames, time.perf_counter())
            if item is not None:
                batch.append(item)
        if self.config.mode == "realtime":
            batch = self._freshest(batch)
        for identity, msg, t_recv in batch:
            self._dispatch(identity, msg, t_recv)

    def _freshest(self, batch: list[tuple[bytes, Message, float]]) -> list[tuple[bytes, Message, float]]:
        """Realtime mode: of several observations queued from one robot, only the newest is acted on."""
        newest = {identity: i for i, (identity, msg, _) in enumerate(batch) if msg.kind == "obs"}
        keep = [item for i, item in enumerate(batch) if item[1].kind != "obs" or newest[item[0]] == i]
        self.counters["stale_dropped"] += len(batch) - len(keep)
        return keep

    def _decode(self, frames: list[bytes], t_recv: float) -> tuple[bytes, Message, float] | None:
        identity, body = frames[0], frames[1:]
        self.counters["received"] += 1
        try:
            return identity, decode(body), t_recv
        except ProtocolError as exc:
            self._reject(identity, exc.code, exc.message, body)
            return None

    def _dispatch(self, identity: bytes, msg: Message, t_recv: float) -> None:
        try:
            handler = self._handlers.get(msg.kind)
            if handler is None:
                raise ProtocolError("bad_kind", f"kind {msg.kind!r} is not accepted from a robot")
            handler(identity, msg, t_recv)
        except ProtocolError as exc:
            self._reject(identity, exc.code, exc.message, seq=msg.seq)
        except Exception as exc:  # a bug must not take the robot's controller down
            log.exception("handler for %s failed", msg.kind)
            self._reject(identity, "internal", f"{type(exc).__name__}: {exc}", seq=msg.seq)

    def _reject(self, identity: bytes, code: str, message: str, body: list[bytes] = (), seq: int | None = None) -> None:
        self.counters["errors"] += 1
        self.counters[f"error.{code}"] += 1
        session = self.by_identity.get(identity)
        robot = session.robot if session else ""
        self._send(identity, error(code, message, robot, _peek_seq(body) if seq is None else seq))
        if session is not None:
            session.counters["errors"] += 1
            self._touch(session)
            self._alert(robot, Verdict("protocol", Level.WARN, f"rejected message: {code}", {"code": code}))

    def _send(self, identity: bytes, msg: Message) -> None:
        try:
            send_frames(self.link, [identity, *encode(msg)])
        except zmq.ZMQError as exc:  # peer vanished; nothing else to do for it
            self.counters["send_failed"] += 1
            log.debug("send to %r failed: %s", identity, exc)

    # -- handlers -------------------------------------------------------------------------------------

    def _touch(self, session: Session) -> None:
        """Traffic from a robot: it is alive. Ending an outage is announced and re-arms the link alert."""
        outage = session.link.seen(time.monotonic())
        if outage is not None:
            self._telemetry_event(session.robot, "link_restored", {"outage_s": outage})
            self._alert(session.robot, Verdict("link", Level.OK))

    def _on_hello(self, identity: bytes, msg: Message, t_recv: float) -> None:
        """Check the robot's declared spec against the bundle; answer with the manifest or a refusal."""
        robot = msg.robot
        if not robot:
            raise ProtocolError("bad_header", "hello must name the robot (header key 'robot')")
        self._check_spec(msg.meta.get("spec"))
        now = time.monotonic()
        session = self.sessions.get(robot)
        if session is not None:  # the robot reconnected: same policy state, new socket
            self.by_identity.pop(session.identity, None)
            session.identity = identity
            self._touch(session)
            if session.learner is not None:
                session.learner.break_chain()
            self.counters["reconnects"] += 1
        else:
            session = Session(robot, identity, Agent(self.policy), self._make_monitors(),
                              LinkMonitor(self.config.link_timeout_s, now), dict(msg.meta))
            self._start_learner(session)
            self.sessions[robot] = session
            self._telemetry_event(robot, "connected", {"env": str(msg.meta.get("env", ""))})
        self.by_identity[identity] = session
        self._send(identity, Message("hello", robot, msg.seq, 0, {}, {
            "policy": self.manifest.policy_id, "manifest": self.manifest.to_dict(), "mode": self.config.mode,
            "deadline_ms": self.deadline_s * 1e3, "heartbeat_s": self.config.heartbeat_s,
            "link_timeout_s": self.config.link_timeout_s}))

    def _check_spec(self, spec: Any) -> None:
        if not isinstance(spec, dict):
            raise ProtocolError("bad_spec", "hello must carry spec: {observation: [array specs], action: array spec}")
        obs = spec.get("observation")
        if not isinstance(obs, list):
            raise ProtocolError("bad_spec", "spec.observation must be a list of array specs")
        declared = {s.name: s for s in (ArraySpec.from_dict(d, f"spec.observation[{i}]") for i, d in enumerate(obs))}
        for want in self.manifest.observation:
            got = declared.get(want.name)
            if got is None or got.dtype != want.dtype or got.shape != want.shape:
                raise ProtocolError("refused", f"policy {self.manifest.policy_id} needs observation {want.name!r} "
                                    f"{want.dtype}{list(want.shape)}, robot declares "
                                    f"{f'{got.dtype}{list(got.shape)}' if got else 'nothing'}")
        if set(declared) != {s.name for s in self.manifest.observation}:
            raise ProtocolError("refused", f"robot declares observations {sorted(declared)}, policy uses "
                                f"{sorted(s.name for s in self.manifest.observation)}")
        act = ArraySpec.from_dict(spec.get("action"), "spec.action")
        if act.shape != self.manifest.action.shape:
            raise ProtocolError("refused", f"policy acts in {list(self.manifest.action.shape)}, robot declares "
                                f"{list(act.shape)}")

    def _make_monitors(self) -> list[Monitor]:
        monitors: list[Monitor] = [ObservationMonitor(self.manifest.observation), ActionMonitor(),
                                   SaturationMonitor(self.config.saturation_window), DeadlineMonitor(self.deadline_s)]
        if "vfd" in self.manifest.monitor:
            monitors.append(VFDMonitor.from_manifest(self.manifest.monitor["vfd"]))
        if "stability" in self.manifest.monitor or self.manifest.learner:
            monitors.append(StabilityMonitor.from_manifest(self.manifest.monitor.get("stability")))
        return monitors

    def _start_learner(self, session: Session) -> None:
        """A fresh learner for this robot when the serving bundle has one (from its prior), else none; the
        robot's gain input follows it."""
        spec = getattr(self.policy, "learner_spec", None)
        session.learner = SessionLearner(spec, self.worker) if spec is not None else None
        session.agent.inputs.pop("gain", None)
        if session.learner is not None:
            session.agent.inputs["gain"] = session.learner.gain32

    def _session(self, identity: bytes, msg: Message) -> Session:
        session = self.by_identity.get(identity)
        if session is None:
            raise ProtocolError("no_session", f"send hello before {msg.kind}")
        return session

    def _on_obs(self, identity: bytes, msg: Message, t_recv: float) -> None:
        session = self._session(identity, msg)
        check_arrays(msg, self.manifest.observation)
        self._touch(session)
        if session.agent.policy is not self.policy and session.agent.at_plan_boundary:
            self._switch(session)
        learner, adopted = session.learner, None
        if learner is not None:  # a gain finished in the background is adopted between ticks, never waited for
            if (adopted := learner.poll()) is not None:
                session.agent.inputs["gain"] = adopted.gain
            learner.transition(msg.arrays[self.manifest.observation[0].name], msg.seq)
        try:
            step = session.agent.act(msg.arrays)
        except ProtocolError:  # the robot's mistake (e.g. no instruction sent yet): an error reply, as before
            raise
        except Exception as exc:  # onnxruntime refused this input, a custom op raised...: never the robot's problem
            self._policy_failed(identity, session, msg, t_recv, exc)
            return
        tick = Tick(session.robot, msg.seq, msg.arrays, step.action, step.raw, step.scores,
                    time.perf_counter() - t_recv, step.plan)
        judged = [m.update(tick) for m in session.monitors]
        verdicts = [v for v in judged if v.level != Level.OK]
        stop = any(v.level == Level.STOP for v in verdicts)
        action = session.agent.safe_action if stop else step.action
        meta = {"policy": session.agent.policy.manifest.policy_id, "safe": stop,
                "verdicts": [[v.monitor, v.level.label, v.reason] for v in verdicts],
                "infer_us": round(step.infer_s * 1e6, 1)}
        if step.scores:  # e.g. the VFD of the plan this action came from, and which plan that was
            meta["scores"], meta["plan"] = step.scores, step.plan
        self._send(identity, Message("act", session.robot, msg.seq, 0, {"action": action}, meta))
        if learner is not None:
            learner.acted(msg.arrays[self.manifest.observation[0].name], action, msg.seq)
        self._ticked(session, msg.seq, t_recv, stop)
        if verdicts or self.alerter.raised:  # ok verdicts matter only to re-arm a raised alert
            for v in judged:
                self._alert(session.robot, v)
            self._alert(session.robot, POLICY_OK)  # the policy answered: re-arms a `policy` stop
            for v in verdicts:
                if v.monitor == "vfd" and v.level >= Level.ALERT:
                    self._request(session, msg, v)
        if adopted is not None:  # after the reply: a fallback alert is an fsync
            self._announce_gain(session, adopted)

    def _ticked(self, session: Session, seq: int, t_recv: float, safe: bool) -> None:
        """Bookkeeping of one observation answered with an action (the policy's or the safe one)."""
        session.last_seq = seq
        session.step += 1
        session.counters["ticks"] += 1
        session.counters["safe"] += safe
        session.latency_us.append((time.perf_counter() - t_recv) * 1e6)
        self.counters["ticks"] += 1

    def _policy_failed(self, identity: bytes, session: Session, msg: Message, t_recv: float, exc: Exception) -> None:
        """The policy raised on this observation: the robot gets the safe action at once, the operator a stop
        alert (repeated at most every alert_repeat_s while it lasts), and the next observation is tried
        afresh."""
        log.warning("policy %s raised for %s: %s", session.agent.policy.manifest.policy_id, session.robot, exc)
        verdict = Verdict("policy", Level.STOP, f"policy raised {type(exc).__name__}: {exc}"[:500],
                          {"error": type(exc).__name__})
        self._send(identity, Message("act", session.robot, msg.seq, 0, {"action": session.agent.safe_action}, {
            "policy": session.agent.policy.manifest.policy_id, "safe": True,
            "verdicts": [[verdict.monitor, verdict.level.label, verdict.reason]]}))
        self._ticked(session, msg.seq, t_recv, safe=True)
        session.counters["policy_failed"] += 1
        self.counters["policy_failed"] += 1
        if session.learner is not None:
            session.learner.break_chain()
        self._alert(session.robot, verdict)

    def _announce_gain(self, session: Session, adopted: Adopted) -> None:
        """A new epoch's gain is in use: a telemetry event for every swap, a stored warn alert for every
        fallback (the published rule kept the previous gain, the guard replaced an unstable one, or the
        Riccati equation had no solution)."""
        u = adopted.update
        session.counters["gain_swaps"] += 1
        session.counters["fallbacks"] += u.fallback
        session.counters["guarded"] += u.guarded
        session.counters["learner_failures"] += u.failed
        self.counters["gain_swaps"] += 1
        values = describe(session.robot, adopted)
        self._telemetry_event(session.robot, "gain", values)
        reason = None
        if u.guarded:
            reason = (f"IR-LQR epoch {adopted.epoch}: the previous gain is unstable under the current estimate; "
                      "switched to the certainty-equivalent gain (guarded fallback)")
        elif u.fallback:
            reason = (f"IR-LQR epoch {adopted.epoch}: fallback, optimism too large (lambda_max(O) >= "
                      f"{session.learner.spec.config.fallback_ratio:g} lambda_min(H)); kept the previous gain")
        elif u.failed:
            reason = f"IR-LQR epoch {adopted.epoch}: no stabilising Riccati solution; kept the previous gain"
        if reason is not None:
            try:
                self.alerter.file(session.robot, Verdict("learner", Level.WARN, reason, {
                    "epoch": adopted.epoch, "steps": adopted.steps, "fallback": u.fallback, "guarded": u.guarded,
                    "failed": u.failed}))
            except Exception:  # as for every alert: the store must not stop the control loop
                self.counters["alert_store_failed"] += 1
                log.exception("could not file the learner's fallback alert for %s", session.robot)

    def _request(self, session: Session, msg: Message, verdict: Verdict) -> None:
        """The policy is out of its depth here: ask for a demonstration (rate-limited per task)."""
        try:
            self.requester.request(session.robot, session.info, session.agent.policy.manifest.policy_id,
                                   session.episode, session.step - 1, msg.arrays, verdict)
        except Exception:  # as for alerts: the store must not stop the control loop
            self.counters["request_store_failed"] += 1
            log.exception("could not file a data request for %s", session.robot)

    def _switch(self, session: Session) -> None:
        """This robot's chunk is used up: it plans with the swapped-in policy from now on. Its monitors start
        afresh with the new manifest (e.g. recalibrated VFD thresholds)."""
        session.agent.switch(self.policy)
        session.monitors = self._make_monitors()
        self._start_learner(session)  # the new bundle's learner (its prior) or none: statistics start afresh
        session.counters["swaps"] += 1

    def _on_reset(self, identity: bytes, msg: Message, t_recv: float) -> None:
        session = self._session(identity, msg)
        self._touch(session)
        instruction, seed, sim = msg.meta.get("instruction"), msg.meta.get("seed"), msg.meta.get("sim")
        if instruction is not None and type(instruction) is not str:
            raise ProtocolError("bad_header", "reset key 'instruction' must be a string")
        if seed is not None and (type(seed) is not int or not 0 <= seed < 2**63):
            raise ProtocolError("bad_header", "reset key 'seed' must be a non-negative integer")
        if sim is not None and not (type(sim) is dict and type(sim.get("env")) is str):
            raise ProtocolError("bad_header", "reset key 'sim' must be a map with at least 'env' (a string)")
        if session.agent.policy is not self.policy:  # a new episode is a plan boundary too
            self._switch(session)
        if session.learner is not None:  # the learner keeps what it learnt; the new episode is a new chain
            session.learner.break_chain()
        session.agent.reset(instruction, seed)
        for m in session.monitors:
            m.reset()
        session.episode += 1
        session.step = 0
        for key in ("task", "instruction", "sim"):  # what this episode is: requests are filed with it
            session.info.pop(key, None)
        session.info.update({k: v for k, v in msg.meta.items() if k in ("task", "instruction", "episode", "sim")})
        self._send(identity, Message("reset", session.robot, msg.seq, 0, {}, {"episode": session.episode}))

    def _on_heartbeat(self, identity: bytes, msg: Message, t_recv: float) -> None:
        session = self.by_identity.get(identity)
        if session is not None:
            self._touch(session)
            if session.learner is not None:  # a heartbeat between two observations does not break the chain
                session.learner.bridge(msg.seq)
        self._send(identity, Message("heartbeat", msg.robot, msg.seq))

    def _on_bye(self, identity: bytes, msg: Message, t_recv: float) -> None:
        session = self.by_identity.get(identity)
        if session is not None:
            self._forget(session, "disconnected")
        self._send(identity, Message("bye", msg.robot, msg.seq))

    def _forget(self, session: Session, event: str) -> None:
        """Drop a robot's session and its alert state, and say so on the stream."""
        del self.sessions[session.robot]
        self.by_identity.pop(session.identity, None)
        self.alerter.forget(session.robot)
        self._telemetry_event(session.robot, event, dict(session.counters))

    def _on_robot_error(self, identity: bytes, msg: Message, t_recv: float) -> None:
        """A robot reports a problem of its own: it becomes an operator alert."""
        session = self._session(identity, msg)
        self._touch(session)
        code, text = str(msg.meta.get("code", "")), str(msg.meta.get("message", ""))
        self._alert(session.robot, Verdict("robot", Level.WARN, f"robot reported {code}: {text}"[:500]))

    # -- timers, alerts, telemetry --------------------------------------------------------------------

    def _on_timers(self, now: float) -> None:
        if self.outbox.pending:
            self.outbox.retry()
        if self.loader.busy and (loaded := self.loader.result()) is not None:
            self._finish_swap(loaded)
        for session in list(self.sessions.values()):
            if session.learner is not None and (adopted := session.learner.poll()) is not None:
                session.agent.inputs["gain"] = adopted.gain
                self._announce_gain(session, adopted)
            if now - session.link.last_seen > self.config.session_expiry_s:  # gone for good
                self.counters["sessions_expired"] += 1
                self._forget(session, "expired")
                continue
            verdict = session.link.check(now)
            if verdict is not None:  # best effort: if only the robot->runtime direction broke, this lands
                session.counters["link_lost"] += 1
                if session.learner is not None:
                    session.learner.break_chain()
                self._send(session.identity, Message("act", session.robot, session.last_seq, 0,
                                                     {"action": session.agent.safe_action},
                                                     {"policy": session.agent.policy.manifest.policy_id, "safe": True,
                                                      "verdicts": [[verdict.monitor, verdict.level.label, verdict.reason]]}))
                self._alert(session.robot, verdict)
        if now >= self._next_telemetry:
            self._next_telemetry = now + self.config.telemetry_s
            self._publish_telemetry()

    def _on_store_change(self, error: str | None) -> None:
        """The store refuses records (disk full, read-only, locked) or takes them again. It cannot hold this
        news, so it goes out unstored: an `alert` with id 0 (no store id), and a telemetry event. Held
        records are filed, in order, as soon as the store takes them (runtime/outbox.py)."""
        pending = len(self.outbox.pending)
        if error is not None:
            self.counters["store_failures"] += 1
            severity, reason = "alert", (f"the alert store {self.config.store} cannot be written ({error}); "
                                         f"{pending} record(s) held in memory until it can; the control loop goes on")
        else:
            severity, reason = "warn", f"the alert store {self.config.store} is writable again; held records filed"
        values = {"store": self.config.store, "error": error or "", "pending": pending,
                  "dropped": self.outbox.dropped}
        self.stream.publish(f"alert.{severity}", Message("alert", "", 0, 0, {}, {
            "id": 0, "severity": severity, "monitor": "store", "reason": reason, "values": values, "count": 1,
            "stored": False}))
        self._telemetry_event("", "store_failing" if error is not None else "store_ok", values)

    def _alert(self, robot: str, verdict: Verdict) -> None:
        try:
            self.alerter.observe(robot, verdict)
        except Exception:  # the store failing must not stop the control loop (issue: disk full)
            self.counters["alert_store_failed"] += 1
            log.exception("could not file alert %s", verdict)

    def _publish_telemetry(self) -> None:
        robots = {}
        for s in self.sessions.values():
            lat = np.asarray(s.latency_us) if s.latency_us else np.zeros(1)
            robots[s.robot] = {**s.counters, "episode": s.episode, "link_lost_now": s.link.lost,
                               "p50_us": float(np.percentile(lat, 50)), "p99_us": float(np.percentile(lat, 99))}
            if s.learner is not None:
                robots[s.robot]["learner"] = dict(s.learner.stats())
            s.latency_us.clear()
        self.stream.publish("telemetry", Message("telemetry", "", 0, 0, {}, {
            "policy": self.manifest.policy_id, "counters": dict(self.counters), "robots": robots,
            "alerts": {"filed": self.alerter.filed, "suppressed": self.alerter.suppressed,
                       "last_id": self.alerter.last_id,
                       "pending": len(self.outbox.pending), "dropped": self.outbox.dropped},
            "requests": {"filed": self.requester.filed, "limited": self.requester.limited}}))

    def _telemetry_event(self, robot: str, event: str, values: dict) -> None:
        self.stream.publish("telemetry", Message("telemetry", robot, 0, 0, {}, {"event": event, "values": values}))

    # -- control channel: hot swap ---------------------------------------------------------------------

    def _on_control(self) -> None:
        """Requests on the control channel (`vigil swap`); answered when the swap is done or refused."""
        assert self.control is not None
        for _ in range(MAX_BATCH):
            try:
                frames = self.control.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            identity = frames[0]
            try:
                msg = decode(frames[1:], kinds=CONTROL_KINDS)
                if msg.kind != "swap":
                    raise ProtocolError("bad_kind", f"the control channel takes 'swap', not {msg.kind!r}")
                bundle = msg.meta.get("bundle")
                if type(bundle) is not str or not bundle:
                    raise ProtocolError("bad_header", "swap needs 'bundle': the bundle folder on this computer")
            except ProtocolError as exc:
                self._control_reply(identity, error(exc.code, exc.message, "", _peek_seq(frames[1:])))
                continue
            if self.loader.busy:
                self._control_reply(identity, Message("swap", "", msg.seq, 0, {}, {
                    "ok": False, "bundle": bundle, "reason": "another swap is in progress; try again when it is done"}))
                continue
            instructions = sorted({i for s in self.sessions.values() if isinstance(i := s.info.get("instruction"), str)})
            self.loader.start(bundle, self.policy, self.config.threads, instructions)
            self._swap_waiting = (identity, msg.seq)
            log.info("swap requested: loading %s in the background", bundle)

    def _finish_swap(self, loaded: Loaded) -> None:
        """The background load finished: serve the new policy from every robot's next plan, or refuse it.
        Either way the operator is told (an alert, stored first, and a telemetry event)."""
        previous = self.manifest.policy_id
        if loaded.policy is None:
            self.counters["swaps_refused"] += 1
            self.alerter.file("", Verdict("swap", Level.ALERT, f"bundle {loaded.bundle} refused, still serving "
                                          f"{previous}: {loaded.reason}"[:1000], {"bundle": loaded.bundle}))
            self._telemetry_event("", "swap_refused", {"bundle": loaded.bundle, "policy": previous,
                                                       "reason": loaded.reason})
            reply = {"ok": False, "bundle": loaded.bundle, "policy": previous, "reason": loaded.reason}
        else:
            self.policy, self.manifest = loaded.policy, loaded.policy.manifest
            self.counters["swaps"] += 1
            now = self.manifest.policy_id
            log.info("swapped %s -> %s (%s)", previous, now, loaded.bundle)
            self.alerter.file("", Verdict("swap", Level.WARN, f"policy swapped: {previous} -> {now}",
                                          {"bundle": loaded.bundle, "previous": previous, "policy": now}))
            self._telemetry_event("", "swapped", {"bundle": loaded.bundle, "previous": previous, "policy": now})
            reply = {"ok": True, "bundle": loaded.bundle, "previous": previous, "policy": now}
        if self._swap_waiting is not None:
            identity, seq = self._swap_waiting
            self._swap_waiting = None
            self._control_reply(identity, Message("swap", "", seq, 0, {}, reply))

    def _control_reply(self, identity: bytes, msg: Message) -> None:
        assert self.control is not None
        try:
            send_frames(self.control, [identity, *encode(msg)])
        except zmq.ZMQError as exc:  # the asker is gone; the swap happened (or not) all the same
            log.debug("control reply to %r failed: %s", identity, exc)

    def close(self) -> None:
        for session in self.sessions.values():  # robots learn at once that they are on their own
            self._send(session.identity, Message("bye", session.robot, session.last_seq, 0, {},
                                                 {"reason": "runtime stopping"}))
        self._publish_telemetry()
        self.worker.close()
        self.link.close()
        if self.control is not None:
            self.control.close()
        self.stream.close()
        self.store.close()
        self.requests.close()
        if self.auth is not None:
            self.auth.close()


def _peek_seq(body: list[bytes]) -> int:
    """Best-effort seq of a rejected message, so the robot can match the error to what it sent."""
    try:
        header = msgpack.unpackb(body[0], raw=False)
        seq = header.get("seq", 0) if isinstance(header, dict) else 0
        return seq if type(seq) is int and 0 <= seq < 2**63 else 0
    except Exception:
        return 0
