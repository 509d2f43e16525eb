"""What the console knows: the operator stream as it arrives, the store as it is, and the state both build.

Two sources. The operator stream (a SUB socket on its own thread; ZeroMQ reconnects it by itself when the
runtime restarts) brings telemetry, trace points, alerts, request filings and events as they happen. The
store (SQLite, read every `poll_s` on a worker thread) is the truth for alerts, requests and preference
queries: it fills gaps in alert ids (PUB drops messages for slow subscribers), gives the history on start-up,
and shows lifecycle steps that are never published (claims, answers by an expert, preference queries added
by a selection rule and answered from the command line or another page). Either may be missing: the page says
which, and the console keeps trying.

Everything the page sees is a JSON message (`type`: snapshot, telemetry, trace, alerts, requests, preferences,
event, swap, gain, status); `Feed` mutates its state on the asyncio loop only and hands each update to
`publish`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from vigil.runtime.auth import ClientKeys
from vigil.runtime.preferences import PreferenceError, PreferenceStore
from vigil.runtime.requests import RequestError, RequestRecord, RequestStore
from vigil.runtime.store import AlertRecord, AlertStore
from vigil.runtime.stream import subscribe
from vigil.wire.protocol import STREAM_KINDS, Message, ProtocolError, decode

log = logging.getLogger("vigil.console")

LEVELS = ("ok", "warn", "alert", "stop")
FINAL = ("fulfilled", "rejected")
HISTORY = 200      # alerts, requests and preference queries read from the store on start-up
KEEP_ALERTS = 500  # alerts the page is given at most
KEEP_REQUESTS = 500
KEEP_PREFERENCES = 500
TRACE_POINTS = 3000  # per robot: at 50 plans a second, one minute
BUSY_MS = 500  # a read waits this long for a locked store, then the page says "locked" and the next poll retries
TRACE_BATCH = 400    # per robot and flush: beyond it the oldest points of the batch are dropped (counted)


def alert_json(r: AlertRecord, source: str) -> dict[str, Any]:
    return {"id": r.id, "t_ns": r.t_ns, "robot": r.robot, "severity": r.severity, "monitor": r.monitor,
            "reason": r.reason, "values": dict(r.values), "count": r.count, "source": source}


def request_json(r: RequestRecord) -> dict[str, Any]:
    return r.to_json()


def read_manifest(bundle: str) -> dict[str, Any]:
    """The provenance of a bundle the runtime serves, read from its manifest.json (the console runs on the
    runtime's computer, so the path in a `swapped` event is readable here). Errors are returned, not raised."""
    try:
        m = json.loads((Path(bundle) / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"cannot read {bundle}/manifest.json: {exc}"}
    if not isinstance(m, dict):
        return {"error": f"{bundle}/manifest.json is not a JSON object"}
    vfd = (m.get("monitor") or {}).get("vfd") or {}
    sha = (m.get("onnx") or {}).get("sha256", "") if isinstance(m.get("onnx"), dict) else ""
    return {"name": m.get("name"), "kind": m.get("kind"), "sha256": str(sha)[:12],
            "control_rate_hz": m.get("control_rate_hz"), "provenance": m.get("provenance") or {},
            "vfd_thresholds": vfd.get("thresholds") or {}}


@dataclass(frozen=True)
class StoreRead:
    """One poll of the store: its state and what is new since the previous poll."""

    status: str  # ok, missing, locked, error
    detail: str = ""
    alerts: tuple[dict[str, Any], ...] = ()
    requests: tuple[dict[str, Any], ...] = ()
    preferences: tuple[dict[str, Any], ...] = ()
    after_alert: int = 0  # what was read started after these ids
    after_request: int = 0
    after_preference: int = 0


def _max_id(db: sqlite3.Connection, table: str) -> int:
    # the tables' schema is public (docs/protocol.md §12); the stores' APIs read oldest first
    return int(db.execute(f"SELECT COALESCE(MAX(id), 0) FROM {table}").fetchone()[0])


def read_store(path: Path, after_alert: int | None, after_request: int | None, pending: tuple[int, ...],
               after_preference: int | None = None, pending_preferences: tuple[int, ...] = ()) -> StoreRead:
    """Alerts with id > after_alert, requests with id > after_request and the requests `pending` (not final:
    their state may have changed) again, preference queries likewise (`pending_preferences`: the open ones);
    None: the newest HISTORY. Blocking: run on a worker thread."""
    if not path.exists():
        return StoreRead("missing", f"store {path} does not exist (yet): the runtime creates it when it starts")
    alerts: list[dict[str, Any]] = []
    try:
        try:
            store = AlertStore(path, readonly=True)
        except FileNotFoundError as exc:
            return StoreRead("missing", str(exc))
        store.db.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
        try:
            if after_alert is None:
                after_alert = max(0, _max_id(store.db, "alerts") - HISTORY)
            alerts = [alert_json(r, "store") for r in store.since(after_alert, limit=KEEP_ALERTS)]
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
        finally:
            store.close()
        requests, after_request = _read_requests(path, after_request, pending)
        preferences, after_preference = _read_preferences(path, after_preference, pending_preferences)
        return StoreRead("ok", "", tuple(alerts), tuple(requests), tuple(preferences), after_alert or 0,
                         after_request, after_preference)
    except sqlite3.OperationalError as exc:
        status = "locked" if "locked" in str(exc) or "busy" in str(exc) else "error"
        return StoreRead(status, f"store {path}: {exc}; retrying")
    except sqlite3.DatabaseError as exc:
        return StoreRead("error", f"store {path}: {exc}; retrying")


def _read_requests(path: Path, after: int | None, pending: tuple[int, ...]) -> tuple[list[dict[str, Any]], int]:
    """(requests with id > after and the `pending` ones, where the read started); none without the table."""
    try:
        rstore = RequestStore(path, readonly=True)
    except FileNotFoundError:  # no requests table: no runtime has filed one yet
        return [], after or 0
    rstore.db.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
    try:
        if after is None:
            after = max(0, _max_id(rstore.db, "requests") - HISTORY)
        requests = [request_json(r) for r in rstore.list(since=after, limit=KEEP_REQUESTS)]
        seen = {r["id"] for r in requests}
        for i in pending:
            if i not in seen:
                try:
                    requests.append(request_json(rstore.get(i)))
                except RequestError:  # gone (another store file under the same name): forget it
                    continue
        return requests, after
    finally:
        rstore.close()


def _read_preferences(path: Path, after: int | None, pending: tuple[int, ...]
                      ) -> tuple[list[dict[str, Any]], int]:
    """(preference queries with id > after and the `pending` ones, where the read started); none without the
    table (no query was added yet)."""
    try:
        pstore = PreferenceStore(path, readonly=True)
    except FileNotFoundError:
        return [], after or 0
    pstore.db.execute(f"PRAGMA busy_timeout = {BUSY_MS}")
    try:
        if after is None:
            after = max(0, _max_id(pstore.db, "preferences") - HISTORY)
        queries = [r.to_json() for r in pstore.list(since=after, limit=KEEP_PREFERENCES)]
        seen = {r["id"] for r in queries}
        for i in pending:
            if i not in seen:
                try:
                    queries.append(pstore.get(i).to_json())
                except PreferenceError:  # gone (another store file under the same name): forget it
                    continue
        return queries, after
    finally:
        pstore.close()


@dataclass
class RobotView:
    robot: str
    state: str = "connected"  # connected, link lost, disconnected, expired, gone
    env: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    rate_hz: float | None = None
    _ticks: tuple[float, int] | None = None  # (monotonic, ticks) of the previous telemetry

    def to_json(self) -> dict[str, Any]:
        return {"robot": self.robot, "state": self.state, "env": self.env, "rate_hz": self.rate_hz,
                "ticks": self.stats.get("ticks", 0), "safe": self.stats.get("safe", 0),
                "errors": self.stats.get("errors", 0), "episode": self.stats.get("episode", 0),
                "p50_us": self.stats.get("p50_us"), "p99_us": self.stats.get("p99_us"),
                "link_lost": self.stats.get("link_lost", 0)}


class Feed:
    """The console's state. `publish(msg)` sends an update to every page; all methods but the stream thread's
    run on the asyncio loop."""

    def __init__(self, connect: str, store: str, keys: ClientKeys | None = None, poll_s: float = 1.0,
                 silence_s: float = 3.0):
        self.connect, self.store_path, self.keys = connect, Path(store), keys
        self.poll_s, self.silence_s = poll_s, silence_s
        self.publish: Callable[[dict[str, Any]], None] = lambda msg: None
        self.robots: dict[str, RobotView] = {}
        self.trace: dict[str, deque] = {}
        self.thresholds: dict[str, dict[str, Any]] = {}
        self._batch: dict[str, list[dict[str, Any]]] = {}
        self.alerts: deque[dict[str, Any]] = deque(maxlen=KEEP_ALERTS)
        self.alert_ids: set[int] = set()
        self.contiguous: int | None = None  # every alert up to this id is known (None: the store not read yet)
        self._history_done = False
        self.requests: dict[int, dict[str, Any]] = {}
        self.last_request_id: int | None = None
        self.preferences: dict[int, dict[str, Any]] = {}
        self.last_preference_id: int | None = None
        self.swaps: deque[dict[str, Any]] = deque(maxlen=50)
        self.gains: deque[dict[str, Any]] = deque(maxlen=100)
        self.events: deque[dict[str, Any]] = deque(maxlen=100)
        self.policy = ""
        self.started = time.monotonic()
        self.heard: float | None = None
        self.store_status: dict[str, Any] = {"status": "unknown", "detail": "not read yet"}
        self.counters: Counter[str] = Counter()
        self._poke: asyncio.Event | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._manifests: dict[str, dict[str, Any]] = {}

    # -- life cycle -------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Start the stream thread, then poll the store, flush trace points and tell pages the status until
        cancelled."""
        self._loop = asyncio.get_running_loop()
        self._poke = asyncio.Event()
        self._thread = threading.Thread(target=self._listen, name="console-stream", daemon=True)
        self._thread.start()
        tasks = [asyncio.create_task(self._poll_store()), asyncio.create_task(self._tick())]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            self._stop.set()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _listen(self) -> None:
        """The stream thread: receive, decode (counting what does not decode), hand over to the loop."""
        ctx = zmq.Context.instance()
        sock = subscribe(ctx, self.connect, ("",), self.keys, hwm=100_000)
        sock.setsockopt(zmq.RECONNECT_IVL, 200)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        try:
            while not self._stop.is_set():
                if not sock.poll(200):
                    continue
                frames = sock.recv_multipart()
                try:
                    msg = decode(frames[1:], kinds=STREAM_KINDS)
                    topic = frames[0].decode()
                except (ProtocolError, UnicodeDecodeError, IndexError):
                    self._loop.call_soon_threadsafe(self.counters.update, ["stream_malformed"])
                    continue
                self._loop.call_soon_threadsafe(self.on_message, topic, msg)
        except Exception:  # the loop may be closing at shutdown
            if not self._stop.is_set():
                log.exception("operator stream thread failed")
        finally:
            sock.close()

    # -- the stream ---------------------------------------------------------------------------------------

    def on_message(self, topic: str, msg: Message) -> None:
        self.heard = time.monotonic()
        self.counters["stream_messages"] += 1
        try:
            if msg.kind == "trace":
                self._on_trace(msg)
            elif msg.kind == "telemetry":
                self._on_telemetry(msg)
            elif msg.kind == "alert":
                self._on_alert(msg)
            elif msg.kind == "request":
                self._on_request(msg)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # a message of a newer runtime, say
            self.counters["stream_unreadable"] += 1
            log.warning("unreadable %s message: %s", topic, exc)

    def _on_trace(self, msg: Message) -> None:
        m = msg.meta
        scores = {str(k): float(v) for k, v in (m.get("scores") or {}).items()}
        levels = {str(k): str(v) for k, v in (m.get("levels") or {}).items()}
        worst = max((LEVELS.index(v) for v in levels.values() if v in LEVELS), default=0)
        score = scores.get("vfd", next(iter(scores.values()), None))
        point = {"t": msg.t_ns / 1e9, "plan": int(m.get("plan", msg.seq)), "episode": int(m.get("episode", 0)),
                 "step": int(m.get("step", 0)), "score": score, "scores": scores, "levels": levels,
                 "level": LEVELS[worst], "safe": bool(m.get("safe", False))}
        robot = msg.robot
        self.trace.setdefault(robot, deque(maxlen=TRACE_POINTS)).append(point)
        self._batch.setdefault(robot, []).append(point)
        thresholds = dict((m.get("thresholds") or {}).get("vfd") or {})
        if self.thresholds.get(robot) != thresholds:
            self.thresholds[robot] = thresholds
        if robot not in self.robots:
            self.robots[robot] = RobotView(robot)

    def _on_telemetry(self, msg: Message) -> None:
        m = msg.meta
        if "event" in m:
            self._on_event(msg.robot, str(m["event"]), dict(m.get("values") or {}))
            return
        now = time.monotonic()
        self.policy = str(m.get("policy", self.policy))
        present = m.get("robots") or {}
        for robot, stats in present.items():
            view = self.robots.setdefault(robot, RobotView(robot))
            ticks = int(stats.get("ticks", 0))
            if view._ticks is not None and ticks >= view._ticks[1] and now > view._ticks[0]:
                view.rate_hz = (ticks - view._ticks[1]) / (now - view._ticks[0])
            view._ticks = (now, ticks)
            view.stats = dict(stats)
            view.state = "link lost" if stats.get("link_lost_now") else "connected"
        for robot, view in self.robots.items():
            if robot not in present and view.state in ("connected", "link lost"):
                view.state, view.rate_hz, view._ticks = "gone", None, None
        last_id = (m.get("alerts") or {}).get("last_id")
        if isinstance(last_id, int) and self.contiguous is not None and last_id > max(self.alert_ids, default=0):
            self.counters["alert_gaps"] += 1  # the stream dropped the newest alerts: read them now
            self.poke()
        self.publish({"type": "telemetry", "policy": self.policy, "robots": self.robots_json(),
                      "runtime": {"counters": m.get("counters") or {}, "alerts": m.get("alerts") or {},
                                  "requests": m.get("requests") or {}}})

    def _on_event(self, robot: str, event: str, values: dict[str, Any]) -> None:
        entry = {"t": time.time(), "robot": robot, "event": event, "values": values}
        self.events.append(entry)
        if event == "connected":
            view = self.robots.setdefault(robot, RobotView(robot))
            view.state, view.env = "connected", str(values.get("env", ""))
        elif event in ("disconnected", "expired"):
            if robot in self.robots:
                self.robots[robot].state, self.robots[robot].rate_hz = event, None
        elif event == "link_restored" and robot in self.robots:
            self.robots[robot].state = "connected"
        elif event == "gain":
            gain = {"t": time.time(), "robot": robot, **values}
            self.gains.append(gain)
            self.publish({"type": "gain", "gain": gain})
        elif event == "swapped":
            self.policy = str(values.get("policy", self.policy))  # the swap's alert carries the rest
        self.publish({"type": "event", "event": entry, "robots": self.robots_json(), "policy": self.policy})

    def _add_swap(self, swap: dict[str, Any]) -> None:
        bundle = str(swap.get("bundle", ""))
        if swap.get("ok") and bundle:
            if bundle not in self._manifests:
                self._manifests[bundle] = read_manifest(bundle)  # a small local file, once per bundle
            swap["manifest"] = self._manifests[bundle]
        self.swaps.append(swap)
        self.publish({"type": "swap", "swap": swap})

    def _on_alert(self, msg: Message) -> None:
        m = msg.meta
        record = AlertRecord(int(m["id"]), msg.t_ns, msg.robot, str(m["severity"]), str(m["monitor"]),
                             str(m["reason"]), dict(m.get("values") or {}), int(m.get("count", 1)))
        if record.id and self.contiguous is not None and record.id > max(self.alert_ids, default=0) + 1:
            self.counters["alert_gaps"] += 1  # the store has the ones in between: read them now
            self.poke()
        self.add_alerts([alert_json(record, "stream")])

    def add_alerts(self, alerts: list[dict[str, Any]]) -> None:
        """Show alerts not shown yet (by id; id 0: not stored, always shown), keep the list in id order, note
        swaps (every swap files one), and tell the pages."""
        fresh = [a for a in alerts if not a["id"] or a["id"] not in self.alert_ids]
        if not fresh:
            return
        newest = max(self.alert_ids, default=0)
        self.alert_ids.update(a["id"] for a in fresh if a["id"])
        if any(a["id"] and a["id"] < newest for a in fresh):  # a gap filled: put it in its place
            merged = sorted([*self.alerts, *fresh], key=lambda a: a["id"] or newest)
            self.alerts.clear()
            self.alerts.extend(merged)
        else:
            self.alerts.extend(fresh)
        if self.contiguous is not None:
            while self.contiguous + 1 in self.alert_ids:
                self.contiguous += 1
        for a in fresh:
            if a["monitor"] == "swap":
                self._add_swap(a)
        self.publish({"type": "alerts", "alerts": fresh})

    def _add_swap(self, alert: dict[str, Any]) -> None:
        """A swap, from its alert (`warn`: done, `alert`: refused; values: bundle, previous, policy), with the
        provenance of the bundle now serving, read from its manifest.json on this computer."""
        v = alert["values"]
        bundle = str(v.get("bundle", ""))
        swap = {"id": alert["id"], "t": alert["t_ns"] / 1e9, "ok": alert["severity"] == "warn", "bundle": bundle,
                "previous": v.get("previous"), "policy": v.get("policy"), "reason": alert["reason"]}
        if swap["ok"] and bundle:
            if bundle not in self._manifests:
                self._manifests[bundle] = read_manifest(bundle)  # a small local file, once per bundle
            swap["manifest"] = self._manifests[bundle]
        self.swaps.append(swap)
        self.publish({"type": "swap", "swap": swap})

    def _on_request(self, msg: Message) -> None:
        self.counters["requests_published"] += 1
        self.poke()  # the store has it (stored before published), with its lifecycle

    # -- the store ---------------------------------------------------------------------------------------

    def poke(self) -> None:
        """Read the store now instead of at the next poll."""
        if self._poke is not None:
            self._poke.set()

    async def _poll_store(self) -> None:
        while True:
            try:
                await self.refresh_store()
            except Exception:  # a bug must not end the polling: count it, log it, try again
                self.counters["store_poll_failed"] += 1
                log.exception("reading the store failed")
            try:
                await asyncio.wait_for(self._poke.wait(), self.poll_s)
            except TimeoutError:
                pass
            self._poke.clear()

    async def refresh_store(self) -> None:
        pending = tuple(i for i, r in self.requests.items() if r["status"] not in FINAL)
        open_queries = tuple(i for i, r in self.preferences.items() if r["status"] == "open")
        read = await asyncio.to_thread(read_store, self.store_path, self.contiguous, self.last_request_id,
                                       pending, self.last_preference_id, open_queries)
        status = {"status": read.status, "detail": read.detail}
        if status != self.store_status:
            self.store_status = status
            self.publish(self.status())
        if read.status != "ok":
            self.counters[f"store_{read.status}"] += 1
            return
        if self.contiguous is None:  # the first read: the history starts after the oldest alert read
            self.contiguous = read.after_alert
        before = len(self.alert_ids)
        self.add_alerts(list(read.alerts))
        if self._history_done:
            self.counters["alerts_from_store"] += len(self.alert_ids) - before
        self._history_done = True
        changed = []
        for r in read.requests:
            if self.requests.get(r["id"]) != r:
                self.requests[r["id"]] = r
                changed.append(r)
            self.last_request_id = max(self.last_request_id or 0, r["id"])
        if self.last_request_id is None:
            self.last_request_id = read.after_request
        for old in sorted(self.requests)[:-KEEP_REQUESTS]:
            del self.requests[old]
        if changed:
            self.publish({"type": "requests", "requests": changed})
        self._add_preferences(read)

    def _add_preferences(self, read: StoreRead) -> None:
        changed = []
        for r in read.preferences:
            if self.preferences.get(r["id"]) != r:
                self.preferences[r["id"]] = r
                changed.append(r)
            self.last_preference_id = max(self.last_preference_id or 0, r["id"])
        if self.last_preference_id is None:
            self.last_preference_id = read.after_preference
        for old in sorted(self.preferences)[:-KEEP_PREFERENCES]:
            del self.preferences[old]
        if changed:
            self.publish({"type": "preferences", "preferences": changed})

    def upsert_request(self, r: dict[str, Any]) -> None:
        """A request an action of this console just changed: every page sees it now."""
        self.requests[r["id"]] = r
        self.publish({"type": "requests", "requests": [r]})

    def upsert_preference(self, r: dict[str, Any]) -> None:
        """A preference query an answer from this console just changed (or found answered): every page sees it
        now."""
        self.preferences[r["id"]] = r
        self.publish({"type": "preferences", "preferences": [r]})

    # -- what pages get ----------------------------------------------------------------------------------

    async def _tick(self) -> None:
        """Every 100 ms: trace points gathered since the last flush; every second: the status."""
        n = 0
        while True:
            await asyncio.sleep(0.1)
            self.flush_trace()
            n += 1
            if n % 10 == 0:
                self.publish(self.status())

    def flush_trace(self) -> None:
        if not self._batch:
            return
        points = {}
        for robot, batch in self._batch.items():
            if len(batch) > TRACE_BATCH:
                self.counters["trace_thinned"] += len(batch) - TRACE_BATCH
                batch = batch[-TRACE_BATCH:]
            points[robot] = batch
        self._batch = {}
        self.publish({"type": "trace", "points": points, "thresholds": dict(self.thresholds)})

    def robots_json(self) -> list[dict[str, Any]]:
        return [v.to_json() for _, v in sorted(self.robots.items())]

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        heard = None if self.heard is None else round(now - self.heard, 1)
        return {"type": "status", "connect": self.connect, "store_path": str(self.store_path),
                "heard_ago_s": heard, "silent": heard is None or heard > self.silence_s,
                "up_s": round(now - self.started, 1), "store": self.store_status, "counters": dict(self.counters),
                "policy": self.policy}

    def snapshot(self) -> dict[str, Any]:
        return {"type": "snapshot", "status": self.status(), "robots": self.robots_json(),
                "trace": {r: list(d) for r, d in self.trace.items()}, "thresholds": dict(self.thresholds),
                "alerts": list(self.alerts), "requests": [self.requests[i] for i in sorted(self.requests)],
                "preferences": [self.preferences[i] for i in sorted(self.preferences)],
                "swaps": list(self.swaps), "gains": list(self.gains), "events": list(self.events)}
