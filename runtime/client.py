"""The robot's end of the link, and the operator's end of the control channel.

`RobotLink` is the reference robot driver (docs/protocol.md describes the same exchange for other languages):
a DEALER socket that says hello, sends observations and receives actions. It owns the robot-side contract of
protocol.md §11, so that a control loop is one call per tick:

    link = RobotLink("tcp://127.0.0.1:5555", "arm-1")
    link.hello(observation_specs, action_spec)
    link.reset(episode=0)
    while running:
        reply = link.step({"state": x}, deadline_s=0.01)   # never blocks much past the deadline
        apply(reply.action)                                 # the policy's action, or the safe one

`step` matches the reply by seq, falls back on the manifest's safe action when nothing usable arrives in time
(and says why in `Reply.fallback`), says hello again when the runtime answers `no_session` (it restarted),
and takes in what the runtime sends unasked (its link-loss `act`, its `bye` when stopping).
`heartbeat_if_idle` keeps a session alive while the robot has nothing to send. `infer` is the lockstep,
openpi-client style call (`infer(obs)["actions"]`). `ControlLink` asks a runtime to hot-swap its bundle.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
import zmq

from vigil.runtime.auth import ClientKeys
from vigil.wire.protocol import CONTROL_KINDS, ROBOT_KINDS, ArraySpec, Layout, Message, ProtocolError, decode, encode
from vigil.wire.transport import recv_frames, send_frames

SEND_QUEUE = 32  # messages a DEALER holds while the runtime is unreachable; more are not sent (send() -> False)
RECENT_OBS = 256  # observations whose send time is kept, to time replies that arrive after their deadline
_EMPTY: Mapping[str, Any] = MappingProxyType({})
_POLLIN = int(zmq.POLLIN)
_zmq_poll = zmq.zmq_poll  # the compiled poll, without zmq.Poller's bookkeeping (one socket here)


class LinkError(RuntimeError):
    """The runtime refused us or did not answer."""


class ReplyError(LinkError):
    """The runtime answered with an `error` (docs/protocol.md §8): `code` is stable, `message` is for humans."""

    def __init__(self, code: str, message: str):
        super().__init__(f"runtime answered error {code}: {message}")
        self.code, self.message = code, message


@dataclass
class Hello:
    """What the runtime told us when we connected."""

    policy: str
    manifest: Mapping[str, Any]
    mode: str
    deadline_ms: float
    heartbeat_s: float
    safe_action: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    link_timeout_s: float = 0.0
    pipeline: int = 0  # messages we may have waiting at the runtime (0: a runtime that does not say)
    clock_synced: bool = False  # the runtime dates our observations from our t_ns
    session_expiry_s: float = 0.0
    transitions: bool = False  # the runtime records our transitions (we asked in hello, it has a log)


@dataclass(frozen=True)
class LateReply:
    """A reply to an earlier observation that came after `step` had stopped waiting for it: not applied,
    but reported, so that a robot can tell a late action from a lost one."""

    seq: int
    message: Message
    latency_s: float | None  # from its observation's send to its receipt; None if the send time is forgotten


@dataclass(frozen=True)
class Reply:
    """What the robot applies this tick, and why.

    `fallback` is None when the runtime's answer to this observation arrived in time; `action` is then the
    runtime's (its safe action when it said `safe`). Otherwise the robot applies the manifest's safe action
    itself and `fallback` says why: "timeout" (no answer by the deadline), "error:<code>" (the runtime
    rejected the observation), "no_session" (the runtime had forgotten us; the session was resumed for
    the next tick), "unsent" (no connection: the observation never left), "bye" (the runtime said it is
    stopping)."""

    seq: int
    action: np.ndarray
    safe: bool  # the runtime said safe, or the robot fell back
    fallback: str | None = None
    verdicts: tuple[tuple[str, str, str], ...] = ()  # (monitor, level, reason) of every verdict that is not ok
    scores: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    plan: int | None = None
    policy: str | None = None
    latency_s: float | None = None  # send to receipt of this observation's answer
    message: Message | None = None  # the runtime's answer to this observation, if one came in time
    late: tuple[LateReply, ...] = ()  # answers to earlier observations that came since the last step

    @property
    def meta(self) -> Mapping[str, Any]:
        """Every header key of the answer besides the envelope: `infer_us`, and any the runtime adds
        (e.g. `queue_us`, `decide_us`); empty when no answer came."""
        return MappingProxyType(self.message.meta) if self.message is not None else _EMPTY


class RobotLink:
    def __init__(self, endpoint: str, robot: str, ctx: zmq.Context | None = None, keys: ClientKeys | None = None):
        self.endpoint, self.robot, self.keys = endpoint, robot, keys
        self.ctx = ctx or zmq.Context.instance()
        self.sock: zmq.Socket | None = None
        self.poller = zmq.Poller()
        self._seq = itertools.count(1)
        self.hello_reply: Hello | None = None
        self._spec: dict[str, Any] = {}
        self._info: dict[str, Any] = {}        # what hello said besides the spec (resume repeats it)
        self._last_reset: dict[str, Any] | None = None  # the current episode's reset (resume repeats it)
        self._sent: dict[int, float | None] = {}  # recent observations: seq -> perf_counter at send (None: unsent)
        self._late: list[LateReply] = []        # answers to earlier observations, handed out by the next step
        self._last_send = time.monotonic()      # any message: heartbeat_if_idle sends when this is old
        self.unsent = 0      # messages not sent: no connection to the runtime (it is down or restarting)
        self.resumed = 0     # sessions re-established after the runtime forgot us (restart, expiry)
        self.late = 0        # answers that came after their observation's deadline (not applied)
        self.link_lost = 0   # the runtime's link-loss acts: it heard nothing from us for link_timeout_s
        self.heartbeats = 0  # heartbeats sent by heartbeat_if_idle
        self.runtime_bye: str | None = None  # the runtime said it is stopping (its reason); cleared by hello
        self._act_layout: Layout | None = None  # the `act` arrays of the policy we were introduced to
        self._pollset: list = []

    def connect(self) -> None:
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # Queue little while the runtime is unreachable (a stale observation is worse than none) and never
        # block the robot's control loop on a full queue: send() says whether the message left. (Not
        # ZMQ_IMMEDIATE: it would also discard what the runtime sent just before a disconnect, e.g. its bye.)
        self.sock.setsockopt(zmq.SNDHWM, SEND_QUEUE)
        if self.keys is not None:  # CURVE client of an authenticating runtime (runtime/auth.py)
            self.keys.apply(self.sock)
        self.sock.connect(self.endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self._pollset = [(self.sock, _POLLIN)]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def next_seq(self) -> int:
        return next(self._seq)

    def send(self, msg: Message) -> bool:
        """Send without blocking; False (and `unsent` + 1) when there is no connection to the runtime."""
        assert self.sock is not None, "connect() first"
        try:
            send_frames(self.sock, encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            self.unsent += 1
            return False
        self._last_send = time.monotonic()
        return True

    def send_raw(self, frames: list[bytes]) -> None:
        """Send arbitrary frames (tests and fuzzing use this to send malformed messages)."""
        assert self.sock is not None, "connect() first"
        self.sock.send_multipart(frames)

    def recv(self, timeout_s: float | None) -> Message | None:
        """Next message from the runtime, or None after `timeout_s`."""
        assert self.sock is not None, "connect() first"
        if not _zmq_poll(self._pollset, -1 if timeout_s is None else max(0, int(timeout_s * 1000))):
            return None
        return self._read()

    def _read(self) -> Message:
        """Decode the message waiting (an `act` of the expected shape takes the precompiled path)."""
        return decode(recv_frames(self.sock), kinds=ROBOT_KINDS, layout=self._act_layout)

    def request(self, msg: Message, timeout_s: float = 2.0) -> Message:
        """Send and wait for the reply with the same seq (anything else that arrives meanwhile is taken in
        as by `step`: late answers, link-loss acts, the runtime's bye)."""
        deadline = time.monotonic() + timeout_s
        while not self.send(msg):  # not connected yet (or any more): retry until the deadline
            if time.monotonic() > deadline:
                raise LinkError(f"no connection to {self.endpoint} within {timeout_s} s")
            time.sleep(0.002)
        while (left := deadline - time.monotonic()) > 0:
            reply = self.recv(left)
            if reply is None:
                break
            if reply.seq == msg.seq:
                return reply
            self._take_in(reply, time.perf_counter())
        raise LinkError(f"no reply to {msg.kind} #{msg.seq} from {self.endpoint} within {timeout_s} s")

    def hello(self, observation: tuple[ArraySpec, ...], action: ArraySpec, timeout_s: float = 5.0,
              **info: Any) -> Hello:
        """Connect (if needed) and introduce the robot; raises LinkError if the runtime refuses. `info` goes into
        the hello as it is: e.g. `env`, and the protocol's `pipeline` and `clock_synced` (docs/protocol.md §7.1)."""
        if self.sock is None:
            self.connect()
        self._spec = {"observation": [s.to_dict() for s in observation], "action": action.to_dict()}
        self._info = dict(info)
        reply = self.request(Message("hello", self.robot, self.next_seq(), 0, {}, {"spec": self._spec, **info}),
                             timeout_s)
        if reply.kind == "error":
            raise LinkError(f"runtime refused hello: {reply.meta.get('code')}: {reply.meta.get('message')}")
        m = reply.meta
        safe = np.asarray(m["manifest"]["safe_action"], np.float32)
        safe.setflags(write=False)  # handed to the robot as is, tick after tick
        self._act_layout = Layout((ArraySpec("action", "float32", tuple(m["manifest"]["action"]["shape"])),))
        self.hello_reply = Hello(str(m["policy"]), m["manifest"], str(m["mode"]), float(m["deadline_ms"]),
                                 float(m["heartbeat_s"]), safe, float(m.get("link_timeout_s", 0.0)),
                                 int(m.get("pipeline", 0)), bool(m.get("clock_synced", False)),
                                 float(m.get("session_expiry_s", 0.0)), bool(m.get("transitions", False)))
        self.runtime_bye = None
        return self.hello_reply

    def reconnect(self, timeout_s: float = 5.0) -> Hello:
        """New socket, same robot: the runtime resumes the session."""
        self.close()
        self.connect()
        return self._hello_again(timeout_s, "reconnect")

    def resume(self, timeout_s: float = 1.0) -> Hello:
        """The runtime answered `no_session`: it restarted (or forgot us after a long silence). Introduce the
        robot again on the same socket and repeat the current episode's reset, so the policy knows the task;
        both within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        hello = self._hello_again(timeout_s, "resume")
        if self._last_reset is not None:
            self.reset(max(0.0, deadline - time.monotonic()), **self._last_reset)
        self.resumed += 1
        return hello

    def _hello_again(self, timeout_s: float, why: str) -> Hello:
        """The hello we sent first, again (same spec and info); the runtime keeps or re-creates the session."""
        reply = self.request(Message("hello", self.robot, self.next_seq(), 0, {}, {"spec": self._spec, **self._info}),
                             timeout_s)
        if reply.kind == "error":
            raise LinkError(f"runtime refused {why}: {reply.meta.get('code')}: {reply.meta.get('message')}")
        self.runtime_bye = None
        return self.hello_reply  # type: ignore[return-value]

    def act(self, obs: Mapping[str, np.ndarray], timeout_s: float = 1.0) -> Message:
        """Lockstep: one observation, its action (or an error reply)."""
        return self.request(Message("obs", self.robot, self.next_seq(), 0, obs), timeout_s)

    def reset(self, timeout_s: float = 2.0, **info: Any) -> Message:
        self._last_reset = dict(info)
        return self.request(Message("reset", self.robot, self.next_seq(), 0, {}, info), timeout_s)

    def heartbeat(self, timeout_s: float = 1.0) -> Message:
        return self.request(Message("heartbeat", self.robot, self.next_seq()), timeout_s)

    def bye(self, timeout_s: float = 1.0) -> None:
        try:
            self.request(Message("bye", self.robot, self.next_seq()), timeout_s)
        except (LinkError, ProtocolError):
            pass
        self.close()

    # -- the robot contract (docs/protocol.md §9-§11) ---------------------------------------------------

    def step(self, obs: Mapping[str, np.ndarray], deadline_s: float, *, resume_s: float = 0.5,
             outcome: Mapping[str, Any] | None = None) -> Reply:
        """Send one observation and return what to apply within `deadline_s` of the call: the runtime's
        action if its answer to this observation came in time, else the safe action (see `Reply.fallback`).

        Answers to earlier observations are never applied (they are in `Reply.late`). Sends never block: an
        observation that cannot leave (no connection) is answered at the deadline with fallback "unsent", so
        the caller's pace does not depend on the failure. On `no_session` the session is resumed (hello and
        the episode's reset again, at most `resume_s` more) and this tick gets the safe action."""
        start = time.perf_counter()
        return self._await(self.send_obs(obs, outcome), start + deadline_s, resume_s)

    def send_obs(self, obs: Mapping[str, np.ndarray], outcome: Mapping[str, Any] | None = None) -> int:
        """The first half of `step`: send an observation without waiting; its seq (sent or not). `outcome`: the
        previous action's `reward`, and whether this observation is `terminated` or `truncated` (robots that
        negotiated `transitions` in hello, docs/protocol.md §7.2)."""
        seq, t_send = self.next_seq(), time.perf_counter()
        sent = self.sock is not None and self.send(Message("obs", self.robot, seq, 0, obs, dict(outcome or {})))
        if self.sock is None:
            self.unsent += 1
        self._sent[seq] = t_send if sent else None
        if len(self._sent) > RECENT_OBS:
            del self._sent[next(iter(self._sent))]
        return seq

    def await_reply(self, seq: int, deadline_s: float, *, resume_s: float = 0.5) -> Reply:
        """The second half of `step`: wait at most `deadline_s` for the answer to observation `seq`."""
        return self._await(seq, time.perf_counter() + deadline_s, resume_s)

    def heartbeat_if_idle(self) -> bool:
        """Send a heartbeat (without waiting for its answer) if nothing was sent for `heartbeat_s` (hello
        reply), so that a robot with nothing to send keeps its session; call it at least that often while
        idle. Also takes in what the runtime sent meanwhile. True if a heartbeat went out."""
        self._drain()
        if self.hello_reply is None or self.sock is None:
            return False
        if time.monotonic() - self._last_send < self.hello_reply.heartbeat_s:
            return False
        if not self.send(Message("heartbeat", self.robot, self.next_seq())):
            return False
        self.heartbeats += 1
        return True

    def infer(self, obs: Mapping[str, Any], timeout_s: float = 2.0) -> dict[str, Any]:
        """Lockstep, in the manner of openpi-client's `WebsocketClientPolicy.infer`: send the observation,
        wait for its answer, return `{"actions": ..., "safe", "verdicts", "scores", "plan", "policy",
        "policy_timing": {"infer_ms"}}`. `actions` is the one action to apply now (shape [m]; the runtime
        executes action chunks itself). Values that are not numpy arrays (lists, scalars) become arrays of
        the dtype declared in hello. Raises ReplyError on an error answer (after resuming once on
        `no_session`), LinkError when none comes within `timeout_s`."""
        declared = {s["name"]: s["dtype"] for s in self._spec.get("observation", ())}
        arrays = {name: value if isinstance(value, np.ndarray) else np.asarray(value, declared.get(name))
                  for name, value in obs.items()}
        reply = self.act(arrays, timeout_s)
        if reply.kind == "error" and reply.meta.get("code") == "no_session":
            self.resume(timeout_s)
            reply = self.act(arrays, timeout_s)
        if reply.kind == "error":
            raise ReplyError(str(reply.meta.get("code")), str(reply.meta.get("message")))
        m = reply.meta
        out = {"actions": reply.arrays["action"], "safe": bool(m.get("safe")),
               "verdicts": [tuple(v) for v in m.get("verdicts", [])], "scores": dict(m.get("scores", {})),
               "plan": m.get("plan"), "policy": m.get("policy")}
        if "infer_us" in m:
            out["policy_timing"] = {"infer_ms": float(m["infer_us"]) / 1e3}
        return out

    def _await(self, seq: int, until: float, resume_s: float) -> Reply:
        """Read what the runtime sends until the answer to `seq` or `until` (perf_counter)."""
        sent_at = self._sent.get(seq)
        answer, received = None, 0.0
        while answer is None and self.sock is not None:
            if not self._poll(until):
                break
            try:
                msg = self._read()
            except ProtocolError:  # a runtime would never send this; it cannot be ours
                continue
            received = time.perf_counter()
            if msg.seq == seq and msg.kind in ("act", "error"):
                answer = msg
            else:
                self._take_in(msg, received)
                if msg.kind == "bye":  # the runtime is stopping: nothing more will come for this observation
                    break
        if answer is None and self.sock is None and (left := until - time.perf_counter()) > 0:
            time.sleep(left)  # closed link: keep the caller's pace all the same
        late, self._late = tuple(self._late), []
        if answer is None:
            return self._fallback(seq, self._why_nothing(seq), late)
        latency = received - sent_at if sent_at is not None else None
        if answer.kind == "error":
            code = str(answer.meta.get("code", ""))
            if code == "no_session":
                try:
                    self.resume(resume_s)
                except LinkError:
                    pass  # still nobody who knows us: the next no_session tries again
                return self._fallback(seq, "no_session", late, answer, latency)
            return self._fallback(seq, f"error:{code}", late, answer, latency)
        m = answer.meta
        return Reply(seq, answer.arrays["action"], bool(m.get("safe")), None,
                     tuple(tuple(v) for v in m.get("verdicts", ())), m.get("scores", _EMPTY), m.get("plan"),
                     m.get("policy"), latency, answer, late)

    def _why_nothing(self, seq: int) -> str:
        if self.runtime_bye is not None:
            return "bye"  # it said it is stopping: nobody is there to answer
        if seq in self._sent and self._sent[seq] is None:
            return "unsent"
        return "timeout"

    def _fallback(self, seq: int, why: str, late: tuple[LateReply, ...], answer: Message | None = None,
                  latency: float | None = None) -> Reply:
        if self.hello_reply is None:
            raise LinkError("step before hello: the safe action is not known yet")
        return Reply(seq, self.hello_reply.safe_action, True, why, latency_s=latency, message=answer, late=late)

    def _poll(self, until: float) -> bool:
        """A message is waiting, or arrives before `until` (perf_counter; never later: zmq polls in whole
        milliseconds, so the last fraction of one is slept)."""
        assert self.sock is not None
        while (ms := int((left := until - time.perf_counter()) * 1000)) > 0:
            if _zmq_poll(self._pollset, ms):
                return True
        if left > 0:
            time.sleep(left)
        return bool(_zmq_poll(self._pollset, 0))

    def _drain(self) -> None:
        """Take in everything already waiting, without blocking."""
        while self.sock is not None and _zmq_poll(self._pollset, 0):
            try:
                msg = self._read()
            except ProtocolError:
                continue
            self._take_in(msg, time.perf_counter())

    def _take_in(self, msg: Message, received: float) -> None:
        """A message that answers nothing we are waiting for: count it, keep what a robot must know."""
        if msg.kind == "act" and any(v[0] == "link" for v in msg.meta.get("verdicts", ())):
            self.link_lost += 1  # the runtime heard nothing from us for link_timeout_s (protocol.md §10)
        elif msg.kind in ("act", "error") and msg.seq in self._sent:
            sent_at = self._sent[msg.seq]
            self.late += 1
            if len(self._late) < RECENT_OBS:
                self._late.append(LateReply(msg.seq, msg, received - sent_at if sent_at is not None else None))
        elif msg.kind == "bye":  # the runtime is stopping (protocol.md §7.7): safe action until it is back
            self.runtime_bye = str(msg.meta.get("reason", "runtime stopping"))


# -- the control channel and probing (docs/protocol.md §12.1) --------------------------------------------------


class ControlLink:
    """The operator's end of a runtime's control channel (`vigil serve --control-endpoint`): hot swap.

    Every call uses a DEALER of its own, closed afterwards, so that an answer that comes after we gave up
    waiting can never be taken for the answer to a later call."""

    def __init__(self, endpoint: str, keys: ClientKeys | None = None, ctx: zmq.Context | None = None):
        self.endpoint, self.keys = endpoint, keys
        self.ctx = ctx or zmq.Context.instance()
        self._seq = itertools.count(1)

    def swap(self, bundle: str | os.PathLike, timeout_s: float = 120.0) -> dict[str, Any]:
        """Ask the runtime to serve `bundle` (a folder on the runtime's computer) and wait for its answer,
        which comes once the swap is done or refused (seconds). Returns the answer's keys: `kind` ("swap", or
        "error" for a malformed request), `ok`, `bundle`, `policy`, and `previous` (ok) or `reason` (refused).
        Raises LinkError when no answer comes in time (no runtime, no control channel, keys not admitted)."""
        msg = Message("swap", "", next(self._seq), 0, {}, {"bundle": os.fspath(bundle)})
        reply = _ask(self.ctx, self.endpoint, self.keys, msg, timeout_s, CONTROL_KINDS)
        if reply is None:
            raise LinkError(f"no answer from {self.endpoint} within {timeout_s} s")
        answer = {"kind": reply.kind, **reply.meta}
        if reply.kind == "error":
            answer.setdefault("ok", False)
        return answer

    def probe(self, timeout_s: float = 1.0) -> bool:
        """Is a runtime answering on this control channel? (see `probe`)"""
        return probe(self.endpoint, timeout_s, self.keys, self.ctx)


def probe(endpoint: str, timeout_s: float = 1.0, keys: ClientKeys | None = None, ctx: zmq.Context | None = None
          ) -> bool:
    """Is a vigil runtime answering at `endpoint` (its robot link or its control channel)? A `heartbeat` from a
    throwaway DEALER: the robot link answers it without a session, the control channel with an `error`
    (bad_kind); neither touches a session, an alert or the control channel's state. False when nothing
    answers within `timeout_s`, which includes a runtime that does not admit `keys`."""
    msg = Message("heartbeat", "", 1)
    return _ask(ctx or zmq.Context.instance(), endpoint, keys, msg, timeout_s, ROBOT_KINDS | CONTROL_KINDS) is not None


def _ask(ctx: zmq.Context, endpoint: str, keys: ClientKeys | None, msg: Message, timeout_s: float,
         kinds: frozenset[str]) -> Message | None:
    """Send `msg` on a fresh DEALER and return the answer with its seq, or None after `timeout_s`."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if keys is not None:
            keys.apply(sock)
        sock.connect(endpoint)
        send_frames(sock, encode(msg))  # a fresh DEALER queues it until connected; nothing blocks
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(max(1, int(left * 1000))):
                break
            try:
                reply = decode(sock.recv_multipart(), kinds=kinds)
            except ProtocolError:
                continue
            if reply.seq == msg.seq:
                return reply
        return None
    finally:
        sock.close(linger=0)
