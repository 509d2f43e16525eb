"""The robot's end of the link: a DEALER socket that says hello, sends observations and receives actions.

This is the reference robot driver (docs/protocol.md describes the same exchange for other languages).
It knows the bundle's safe action from the hello reply, so it can fall back on it by itself when the
runtime does not answer in time.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from vigil.runtime.auth import ClientKeys
from vigil.wire.protocol import ROBOT_KINDS, ArraySpec, Message, ProtocolError, decode, encode
from vigil.wire.transport import send_frames

SEND_QUEUE = 32  # messages a DEALER holds while the runtime is unreachable; more are not sent (send() -> False)


class LinkError(RuntimeError):
    """The runtime refused us or did not answer."""


@dataclass
class Hello:
    """What the runtime told us when we connected."""

    policy: str
    manifest: Mapping[str, Any]
    mode: str
    deadline_ms: float
    heartbeat_s: float
    safe_action: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


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
        self.unsent = 0    # messages not sent: no connection to the runtime (it is down or restarting)
        self.resumed = 0   # sessions re-established after the runtime forgot us (restart, expiry)

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
            return True
        except zmq.Again:
            self.unsent += 1
            return False

    def send_raw(self, frames: list[bytes]) -> None:
        """Send arbitrary frames (tests and fuzzing use this to send malformed messages)."""
        assert self.sock is not None, "connect() first"
        self.sock.send_multipart(frames)

    def recv(self, timeout_s: float | None) -> Message | None:
        """Next message from the runtime, or None after `timeout_s`."""
        assert self.sock is not None, "connect() first"
        if not self.poller.poll(None if timeout_s is None else max(0, int(timeout_s * 1000))):
            return None
        return decode(self.sock.recv_multipart(copy=True), kinds=ROBOT_KINDS)

    def request(self, msg: Message, timeout_s: float = 2.0) -> Message:
        """Send and wait for the reply with the same seq (older replies are skipped)."""
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
        raise LinkError(f"no reply to {msg.kind} #{msg.seq} from {self.endpoint} within {timeout_s} s")

    def hello(self, observation: tuple[ArraySpec, ...], action: ArraySpec, timeout_s: float = 5.0,
              **info: Any) -> Hello:
        """Connect (if needed) and introduce the robot; raises LinkError if the runtime refuses."""
        if self.sock is None:
            self.connect()
        self._spec = {"observation": [s.to_dict() for s in observation], "action": action.to_dict()}
        self._info = dict(info)
        reply = self.request(Message("hello", self.robot, self.next_seq(), 0, {}, {"spec": self._spec, **info}),
                             timeout_s)
        if reply.kind == "error":
            raise LinkError(f"runtime refused hello: {reply.meta.get('code')}: {reply.meta.get('message')}")
        m = reply.meta
        self.hello_reply = Hello(str(m["policy"]), m["manifest"], str(m["mode"]), float(m["deadline_ms"]),
                                 float(m["heartbeat_s"]), np.asarray(m["manifest"]["safe_action"], np.float32))
        return self.hello_reply

    def reconnect(self, timeout_s: float = 5.0) -> Hello:
        """New socket, same robot: the runtime resumes the session."""
        self.close()
        self.connect()
        return self._hello_again(timeout_s, "reconnect")

    def resume(self, timeout_s: float = 1.0) -> Hello:
        """The runtime answered `no_session`: it restarted (or forgot us after a long silence). Introduce the
        robot again on the same socket and repeat the current episode's reset, so the policy knows the task."""
        hello = self._hello_again(timeout_s, "resume")
        if self._last_reset is not None:
            self.reset(timeout_s, **self._last_reset)
        self.resumed += 1
        return hello

    def _hello_again(self, timeout_s: float, why: str) -> Hello:
        """The hello we sent first, again (same spec and info); the runtime keeps or re-creates the session."""
        reply = self.request(Message("hello", self.robot, self.next_seq(), 0, {}, {"spec": self._spec, **self._info}),
                             timeout_s)
        if reply.kind == "error":
            raise LinkError(f"runtime refused {why}: {reply.meta.get('code')}: {reply.meta.get('message')}")
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
