"""Sending and receiving frame lists on the hot path.

pyzmq's convenience layer (`zmq.Socket`) wraps every call of the compiled socket: it converts flags and
socket options to Python enums and checks for draft-API arguments, which costs a few microseconds per frame.
These functions call the compiled socket's methods (the `zmq.backend` class `zmq.Socket` derives from)
with plain integers; they behave exactly as `send_multipart` / `recv_multipart` with copying.
"""

from __future__ import annotations

from collections.abc import Sequence

import zmq

_SNDMORE = int(zmq.SNDMORE)
_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_BACKEND = next((c for c in zmq.Socket.__mro__ if c.__module__.startswith("zmq.backend")), zmq.Socket)
_send, _recv, _get = _BACKEND.send, _BACKEND.recv, _BACKEND.get


def send_frames(sock: zmq.Socket, frames: Sequence, flags: int = 0) -> None:
    """Send a multipart message (frames are copied: cheaper than zero-copy for small buffers). With
    flags=zmq.NOBLOCK, zmq.Again from the first frame means nothing was sent (the rest follow atomically)."""
    last = len(frames) - 1
    flags = int(flags)
    more = _SNDMORE | flags
    for i, frame in enumerate(frames):
        _send(sock, frame, more if i < last else flags)


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list[bytes]:
    """Receive a whole multipart message as bytes (zmq.Again with NOBLOCK when none is waiting)."""
    parts = [_recv(sock, flags)]
    while _get(sock, _RCVMORE):
        parts.append(_recv(sock, flags))
    return parts


def readable(sock: zmq.Socket) -> bool:
    """A whole message is waiting (never blocks)."""
    return bool(_get(sock, _EVENTS) & _POLLIN)


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
