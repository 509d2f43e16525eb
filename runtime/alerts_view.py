"""`vigil alerts`: print the operator stream, and fill any gap in alert ids from the store."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import zmq

from vigil.runtime.auth import ClientKeys
from vigil.runtime.store import AlertRecord, AlertStore
from vigil.runtime.stream import receive, subscribe

COLOURS = {"warn": "33", "alert": "31", "stop": "1;41"}


class AlertView:
    def __init__(self, store_path: str, as_json: bool = False, telemetry: bool = False, out: TextIO = sys.stdout,
                 keys: ClientKeys | None = None, hwm: int | None = None):
        self.store_path, self.as_json, self.telemetry, self.out, self.keys = store_path, as_json, telemetry, out, keys
        self.hwm = hwm  # messages the subscription queues (None: ZeroMQ's default)
        self.last_id = 0
        self.missed = 0   # alerts the stream dropped on the way to us (gaps in ids)
        self.filled = 0   # of those, read back from the store
        self.colour = out.isatty()

    def replay(self, since: int) -> int:
        """Print stored alerts with id > since; returns how many."""
        store = AlertStore(self.store_path, readonly=True)
        try:
            records = store.since(since)
        finally:
            store.close()
        for r in records:
            self.show(r)
        return len(records)

    def follow(self, endpoint: str, timeout_s: float | None = None, should_stop: Callable[[], bool] = lambda: False,
               ctx: zmq.Context | None = None) -> None:
        ctx = ctx or zmq.Context.instance()
        # telemetry always: it carries the newest alert id, which reveals a gap even after the last alert
        sock = subscribe(ctx, endpoint, ["alert.", "request", "telemetry"], self.keys, self.hwm)
        idle_since = time.monotonic()
        try:
            while not should_stop():
                for topic, msg in receive(sock, timeout_ms=100):
                    idle_since = time.monotonic()
                    if msg.kind == "alert":
                        record = AlertRecord(int(msg.meta["id"]), msg.t_ns, msg.robot, str(msg.meta["severity"]),
                                             str(msg.meta["monitor"]), str(msg.meta["reason"]),
                                             msg.meta.get("values", {}), int(msg.meta.get("count", 1)))
                        if record.id == 0:  # not stored (the store itself is failing): shown, never a gap
                            self.show(record)
                            continue
                        if record.id <= self.last_id:
                            continue  # already shown (replayed from the store before following)
                        if self.last_id and record.id > self.last_id + 1:
                            self._fill_gap(record.id)
                        self.show(record)
                    else:
                        newest = msg.meta.get("alerts", {}).get("last_id", 0) if msg.kind == "telemetry" else 0
                        if self.last_id and isinstance(newest, int) and newest > self.last_id:
                            self._fill_gap(newest + 1)  # the stream dropped the latest alerts
                        if msg.kind != "telemetry" or self.telemetry:
                            self._print(topic, {"robot": msg.robot, **msg.meta})
                    if should_stop():
                        return
                if timeout_s is not None and time.monotonic() - idle_since > timeout_s:
                    return
        finally:
            sock.close()

    def _fill_gap(self, next_id: int) -> None:
        """Messages were dropped on the way (PUB does that to slow subscribers): count them, and read them from
        the store when we can; otherwise say how to get them (`vigil alerts --since`)."""
        first = self.last_id
        self.missed += next_id - first - 1
        try:
            store = AlertStore(self.store_path, readonly=True)
        except FileNotFoundError:
            store = None
        if store is not None:
            try:
                for r in store.since(first):
                    if r.id >= next_id:
                        break
                    self.show(r)
                    self.filled += 1
            finally:
                store.close()
        if self.last_id < next_id - 1:
            self._print("gap", {"missed": f"alerts {self.last_id + 1}..{next_id - 1} were dropped on the stream "
                                          f"and are not in {self.store_path}; replay them where the store is with "
                                          f"`vigil alerts --store STORE --since {self.last_id}`"})

    def show(self, r: AlertRecord) -> None:
        self.last_id = max(self.last_id, r.id)
        if self.as_json:
            self._print(f"alert.{r.severity}", {"robot": r.robot, "t_ns": r.t_ns, **r.to_meta()})
            return
        stamp = time.strftime("%H:%M:%S", time.localtime(r.t_ns / 1e9))
        sev = r.severity.upper()
        if self.colour:
            sev = f"\033[{COLOURS.get(r.severity, '0')}m{sev}\033[0m"
        times = f" (x{r.count})" if r.count > 1 else ""
        print(f"#{r.id:<5} {stamp} {sev:<5} {r.robot:<10} {r.monitor:<11} {r.reason}{times}", file=self.out, flush=True)

    def _print(self, topic: str, payload: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps({"topic": topic, **payload}, default=str), file=self.out, flush=True)
        else:
            print(f"[{topic}] {json.dumps(payload, default=str)}", file=self.out, flush=True)
