"""What the operator is told, put together: the operator stream (PUB), the durable store (alerts and data
requests in one SQLite file), the outbox that commits before it publishes (on a writer thread), and the two
hooks that file alerts and data requests from the loop's events."""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from vigil.runtime.alerts import Alerter, AlertHook
from vigil.runtime.auth import ServerAuth
from vigil.runtime.config import ConfigError, ServeConfig
from vigil.runtime.outbox import Outbox
from vigil.runtime.requests import Requester, RequestHook, RequestStore
from vigil.runtime.store import AlertStore
from vigil.runtime.stream import OperatorStream


@dataclass
class Reporting:
    stream: OperatorStream
    store: AlertStore
    requests: RequestStore
    outbox: Outbox
    alerts: AlertHook
    request_hook: RequestHook

    @classmethod
    def open(cls, ctx: zmq.Context, config: ServeConfig, auth: ServerAuth | None, counters: Counter,
             wake: Callable[[], None]) -> Reporting:
        """Bind the stream and open the store; a store that cannot be written is a configuration error (nothing
        could be acknowledged, so the runtime does not start)."""
        stream = OperatorStream(ctx, config.operator_endpoint, auth, config.stream_hwm)
        try:
            store, requests = AlertStore(config.store), RequestStore(config.store)
        except (OSError, sqlite3.Error) as exc:
            stream.close()
            raise ConfigError(f"config key 'store' must be a writable SQLite file, got {config.store!r}: "
                              f"{exc}") from None
        # Alerts and data requests reach the store in the order they happened: one outbox for both.
        outbox = Outbox(wake=wake)
        alerts = AlertHook(Alerter(store, stream, config.alert_repeat_s, outbox), stream, config.store, counters)
        outbox.on_change = alerts.on_store_change
        requester = Requester(requests, stream, outbox, config.request_interval_s)
        return cls(stream, store, requests, outbox, alerts, RequestHook(requester, counters))

    def flush(self) -> None:
        """File (and publish) what is waiting, before the runtime's last words."""
        self.outbox.close()

    def close(self) -> None:
        self.stream.close()
        self.store.close()
        self.requests.close()
