"""The robot link's socket: the ROUTER robots connect their DEALERs to, read in bounded batches.

Reading stops after `limit` messages even when more are waiting, so that a flood cannot keep the loop from
serving what it read and from its timers (runtime/server.py reads again after each batch). libzmq's ROUTER
already takes messages from the connections in turn, so a bounded read is a fair sample of who is sending.
"""

from __future__ import annotations

import logging
from collections import Counter

import zmq

from vigil.runtime.auth import ServerAuth
from vigil.wire.protocol import DEFAULT_LIMITS
from vigil.wire.transport import bound_endpoint, readable, recv_frames, send_frames

log = logging.getLogger("vigil.link")
_NOBLOCK = int(zmq.NOBLOCK)


class LinkSocket:
    def __init__(self, ctx: zmq.Context, endpoint: str, auth: ServerAuth | None, counters: Counter):
        self.sock = ctx.socket(zmq.ROUTER)
        if auth is not None:  # CURVE: only allow-listed client keys get in (runtime/auth.py)
            auth.apply(self.sock)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IPV6, 1)  # accept tcp://[::1]:port as well as IPv4
        # Frames far beyond the protocol limits never reach Python: libzmq drops such a peer. Messages
        # between the protocol limit and this cap still get a proper `too_large` error reply.
        self.sock.setsockopt(zmq.MAXMSGSIZE, 4 * DEFAULT_LIMITS.max_total_bytes)
        self.sock.bind(endpoint)
        self.endpoint = bound_endpoint(self.sock)
        self.counters = counters

    def read(self, limit: int) -> list[list[bytes]]:
        """Up to `limit` whole messages that are waiting, each `[routing id, frame 0, frame 1, ...]`."""
        messages = []
        sock = self.sock
        for i in range(limit):
            if i and not readable(sock):  # cheaper than a read that fails; the poll vouched for the first
                break
            try:
                messages.append(recv_frames(sock, _NOBLOCK))
            except zmq.Again:  # a spurious wake-up
                break
        self.counters["received"] += len(messages)
        return messages

    def send(self, identity: bytes, frames: list) -> None:
        try:
            send_frames(self.sock, [identity, *frames])
        except zmq.ZMQError as exc:  # the peer vanished; nothing else to do for it
            self.counters["send_failed"] += 1
            log.debug("send to %r failed: %s", identity, exc)

    def close(self) -> None:
        self.sock.close()
