"""Sending and receiving frame lists on the hot path.

pyzmq's convenience layer converts flags and socket options to Python enums on every call, which
costs a few microseconds per message; these two functions talk to the socket with plain integers.
"""

from __future__ import annotations

from collections.abc import Sequence

import zmq

_SNDMORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def send_frames(sock: zmq.Socket, frames: Sequence, flags: int = 0) -> None:
    """Send a multipart message (frames are copied: cheaper than zero-copy for small buffers). With
    flags=zmq.NOBLOCK, zmq.Again from the first frame means nothing was sent (the rest follow atomically)."""
    send = sock.send
    last = len(frames) - 1
    flags = int(flags)
    for i, frame in enumerate(frames):
        send(frame, (_SNDMORE | flags) if i < last else flags)


def readable(sock: zmq.Socket) -> bool:
    """A whole message is waiting (never blocks)."""
    return bool(sock.get(_EVENTS) & _POLLIN)


def bound_endpoint(sock: zmq.Socket) -> str:
    """The endpoint `sock` was last bound to, with the real port of a `:0` or `:*` bind. An IPv4 address
    reached through an IPv6-enabled socket is given back as IPv4 (`[::ffff:127.0.0.1]` -> `127.0.0.1`), so
    that the endpoint reads as it was configured and works for IPv4-only peers."""
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    scheme, _, rest = endpoint.partition("://")
    if scheme == "tcp" and rest.startswith("[::ffff:") and "]:" in rest:
        host, port = rest[len("[::ffff:"):].split("]:", 1)
        if host.count(".") == 3:
            return f"tcp://{host}:{port}"
    return endpoint
