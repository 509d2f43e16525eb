"""The robot's end of the link: a DEALER socket that says hello, sends observations and receives actions.

This is the reference robot driver (docs/protocol.md describes the same exchange for other languages).
It knows the bundle's safe action from the hello reply, so it can fall back on it by itself when the
runtime does not answer in time.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import zmq

from vigil.runtime.transport import send_frames
from vigil.runtime.protocol import ROBOT_KINDS, ArraySpec, Message, ProtocolError, decode, encode


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
    def __init__(self, endpoint: str, robot: str, ctx: zmq.Context | None = None):
        self.endpoint, self.robot = endpoint, robot
        self.ctx = ctx or zmq.Context.instance()
        self.sock: zmq.Socket | None = None
        self.poller = zmq.Poller()
        self._seq = itertools.count(1)
        self.hello_reply: Hello | None = None
        self._spec: dict[str, Any] = {}

    def connect(self) -> None:
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None

    def next_seq(self) -> int:
        return next(self._seq)

    def send(self, msg: Message) -> None:
        assert self.sock is not None, "connect() first"
        send_frames(self.sock, encode(msg))

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
        self.send(msg)
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
        reply = self.request(Message("hello", self.robot, self.next_seq(), 0, {}, {"spec": self._spec}), timeout_s)
        if reply.kind == "error":
            raise LinkError(f"runtime refused reconnect: {reply.meta.get('message')}")
        return self.hello_reply  # type: ignore[return-value]

    def act(self, obs: Mapping[str, np.ndarray], timeout_s: float = 1.0) -> Message:
        """Lockstep: one observation, its action (or an error reply)."""
        return self.request(Message("obs", self.robot, self.next_seq(), 0, obs), timeout_s)

    def reset(self, timeout_s: float = 2.0, **info: Any) -> Message:
        return self.request(Message("reset", self.robot, self.next_seq(), 0, {}, info), timeout_s)

    def heartbeat(self, timeout_s: float = 1.0) -> Message:
        return self.request(Message("heartbeat", self.robot, self.next_seq()), timeout_s)

    def bye(self, timeout_s: float = 1.0) -> None:
        try:
            self.request(Message("bye", self.robot, self.next_seq()), timeout_s)
        except (LinkError, ProtocolError):
            pass
        self.close()
