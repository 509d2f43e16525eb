"""Operator stream: a PUB socket carrying alerts, data requests and telemetry.

Each message is `[topic, header, *buffers]`: frame 0 is the topic (`alert.<severity>`, `request`,
`telemetry`) so that subscribers can filter with ZeroMQ prefix subscriptions; the rest is an ordinary
protocol message (see protocol.py).  PUB drops messages for slow subscribers: alerts and requests carry
their store id, so a gap in ids tells a subscriber to replay from the store (`vigil alerts --since N`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import zmq

from vigil.wire.protocol import STREAM_KINDS, Message, ProtocolError, decode, encode
from vigil.wire.transport import bound_endpoint

if TYPE_CHECKING:
    from vigil.runtime.auth import ClientKeys, ServerAuth


class OperatorStream:
    def __init__(self, ctx: zmq.Context, endpoint: str, auth: ServerAuth | None = None, hwm: int = 10_000):
        self.sock = ctx.socket(zmq.PUB)
        if auth is not None:
            auth.apply(self.sock)
        self.sock.setsockopt(zmq.LINGER, 200)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.IPV6, 1)
        self.sock.bind(endpoint)
        self.endpoint = bound_endpoint(self.sock)
        # in-process listeners called with every (topic, message) published, on the loop's thread (a recording
        # keeps the alerts it carries): each must be quick and must not raise
        self.taps: list[Callable[[str, Message], None]] = []

    def publish(self, topic: str, msg: Message) -> None:
        try:
            self.sock.send_multipart([topic.encode(), *encode(msg)], flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:  # PUB never blocks; a full queue means a subscriber is lost behind
            pass
        for tap in self.taps:
            tap(topic, msg)

    def event(self, robot: str, event: str, values: dict) -> None:
        """A telemetry event (`connected`, `link_restored`, `swapped`, ...): what happened, and its numbers."""
        self.publish("telemetry", Message("telemetry", robot, 0, 0, {}, {"event": event, "values": values}))

    def close(self) -> None:
        self.sock.close()


def subscribe(ctx: zmq.Context, endpoint: str, topics: Sequence[str] = ("",), keys: ClientKeys | None = None,
              hwm: int | None = None) -> zmq.Socket:
    """A SUB socket on the operator stream (a CURVE client when `keys` is given; `hwm`: messages it queues)."""
    sock = ctx.socket(zmq.SUB)
    if hwm is not None:
        sock.setsockopt(zmq.RCVHWM, hwm)
    if keys is not None:
        keys.apply(sock)
    sock.setsockopt(zmq.LINGER, 0)
    for t in topics:
        sock.setsockopt(zmq.SUBSCRIBE, t.encode())
    sock.connect(endpoint)
    return sock


def receive(sock: zmq.Socket, timeout_ms: int | None = None) -> Iterator[tuple[str, Message]]:
    """Yield (topic, message) as they arrive; stops after `timeout_ms` of silence (None: never)."""
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    while True:
        if not poller.poll(timeout_ms):
            return
        frames = sock.recv_multipart()
        try:
            yield frames[0].decode(), decode(frames[1:], kinds=STREAM_KINDS)
        except (ProtocolError, UnicodeDecodeError):
            continue
