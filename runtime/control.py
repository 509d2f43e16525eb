"""The control channel: hot-swapping the served bundle (`vigil swap`, `ControlLink.swap`).

An optional ROUTER socket (`control_endpoint`). A `swap` request names a bundle folder on this computer;
the bundle loads and is verified on a background thread (runtime/swap.py) while the loop keeps serving, and
the asker is answered once the swap is done or refused (docs/protocol.md §12.1). When it is done, every
session is offered the new policy and takes it at its next plan boundary (runtime/session.py). Either way
the operator is told: an alert, stored first (`warn` for a swap, `alert` for a refusal), and a telemetry
event (`swapped`, `swap_refused`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable

import zmq

from vigil.monitors.base import Level, Verdict
from vigil.policies.bundle import Policy
from vigil.runtime.alerts import AlertHook
from vigil.runtime.auth import ServerAuth
from vigil.runtime.stream import OperatorStream
from vigil.runtime.swap import BundleLoader
from vigil.wire.protocol import CONTROL_KINDS, Message, ProtocolError, decode, encode, error, peek_seq
from vigil.wire.transport import bound_endpoint, send_frames

log = logging.getLogger("vigil.control")
MAX_BATCH = 256


class ControlChannel:
    """`serve(policy)` is the runtime's: it makes `policy` the one every session is offered."""

    def __init__(self, ctx: zmq.Context, endpoint: str, auth: ServerAuth | None, alerts: AlertHook,
                 stream: OperatorStream, counters: Counter, threads: int, wake: Callable[[], None]):
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IPV6, 1)
        if auth is not None:
            auth.apply(self.sock)
        self.sock.bind(endpoint)
        self.endpoint = bound_endpoint(self.sock)
        self.alerts, self.stream, self.counters, self.threads = alerts, stream, counters, threads
        self.loader = BundleLoader(on_done=wake)
        self._waiting: tuple[bytes, int] | None = None  # who asked for the swap in progress (identity, seq)

    def on_readable(self, serving: Policy, instructions: Iterable[str]) -> None:
        """Read the requests waiting: start a load, or answer at once (malformed, or a swap in progress).
        `instructions`: those the connected robots use, embedded by the new bundle's encoder while it loads."""
        for _ in range(MAX_BATCH):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
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
                self._reply(identity, error(exc.code, exc.message, "", peek_seq(frames[1:])))
                continue
            if self.loader.busy:
                self._reply(identity, Message("swap", "", msg.seq, 0, {}, {
                    "ok": False, "bundle": bundle, "reason": "another swap is in progress; try again when it is done"}))
                continue
            self.loader.start(bundle, serving, self.threads, sorted(set(instructions)))
            self._waiting = (identity, msg.seq)
            log.info("swap requested: loading %s in the background", bundle)

    def poll(self, serving: Policy, serve: Callable[[Policy], None]) -> None:
        """If a load has finished: serve the new policy (`serve`), or refuse it; tell the operator and the asker."""
        if not self.loader.busy or (loaded := self.loader.result()) is None:
            return
        previous = serving.manifest.policy_id
        if loaded.policy is None:
            self.counters["swaps_refused"] += 1
            self.alerts.file("", Verdict("swap", Level.ALERT, f"bundle {loaded.bundle} refused, still serving "
                                         f"{previous}: {loaded.reason}"[:1000], {"bundle": loaded.bundle}))
            self.stream.event("", "swap_refused", {"bundle": loaded.bundle, "policy": previous,
                                                   "reason": loaded.reason})
            reply = {"ok": False, "bundle": loaded.bundle, "policy": previous, "reason": loaded.reason}
        else:
            serve(loaded.policy)
            self.counters["swaps"] += 1
            now = loaded.policy.manifest.policy_id
            log.info("swapped %s -> %s (%s)", previous, now, loaded.bundle)
            self.alerts.file("", Verdict("swap", Level.WARN, f"policy swapped: {previous} -> {now}",
                                         {"bundle": loaded.bundle, "previous": previous, "policy": now}))
            self.stream.event("", "swapped", {"bundle": loaded.bundle, "previous": previous, "policy": now})
            reply = {"ok": True, "bundle": loaded.bundle, "previous": previous, "policy": now}
        if self._waiting is not None:
            identity, seq = self._waiting
            self._waiting = None
            self._reply(identity, Message("swap", "", seq, 0, {}, reply))

    def _reply(self, identity: bytes, msg: Message) -> None:
        try:
            send_frames(self.sock, [identity, *encode(msg)])
        except zmq.ZMQError as exc:  # the asker is gone; the swap happened (or not) all the same
            log.debug("control reply to %r failed: %s", identity, exc)

    def close(self) -> None:
        self.sock.close()
