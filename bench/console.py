"""How soon an operator sees an alert: stored by the runtime -> a row on the console page, against the operator
stream's own subscriber, measured in the same run.

N alerts, one at a time: a robot connects to `vigil serve` (the aircraft-pitch LQR bundle, link timeout 0.3 s),
gets one action and goes silent; the runtime stores a `link` alert and then publishes it. Two observers:

    stream   a ZeroMQ SUB on the operator stream in this process (what `vigil alerts` does): arrival - stored t_ns
    page     `vigil console` in headless Chromium: a MutationObserver in the page notes the wall-clock time
             (performance.timeOrigin + now) at which the alert's row is added, minus the stored t_ns

Both clocks are this machine's wall clock. The page's figure includes the console's stream thread, its push over
the websocket and the page's coalesced render (30 ms); the stream's is the floor every view sits on.

    .venv/bin/python -m bench.console               # make bench-console; about a minute
    .venv/bin/python -m bench.console --report-only  # rewrite the section from bench/out/console.json
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from bench.common import OUT, markers, raw_copy, read_raw, run_info, section, write_benchmarks, write_raw, written_by

NAME = "console"
RAW = OUT / "console.json"
BEGIN, END = markers(NAME)
LINK_TIMEOUT_S = 0.3

# notes when each alert row appears, by its id, in the page's own clock (ms since the epoch, sub-ms resolution)
OBSERVE = """
window.__seen = {};
const body = document.querySelector('#alerts tbody') || document.querySelector('#alerts');
new MutationObserver(() => {
  const t = performance.timeOrigin + performance.now();
  for (const r of document.querySelectorAll('#alerts tr[data-alert-id]')) {
    const id = r.dataset.alertId;
    if (!(id in window.__seen)) window.__seen[id] = t;
  }
}).observe(body, {childList: true, subtree: true});
return true;
"""


class StreamWatch:
    """Arrival times (ns, wall clock) of `alert` messages on the operator stream, by alert id."""

    def __init__(self, endpoint: str):
        from vigil.runtime.stream import receive, subscribe

        self.seen: dict[int, int] = {}
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        sock = subscribe(self._ctx, endpoint, topics=("alert",))

        def run() -> None:
            while not self._stop.is_set():
                for _, msg in receive(sock, timeout_ms=100):
                    self.seen.setdefault(int(msg.meta.get("id", 0)), time.time_ns())
            sock.close(0)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._ctx.term()


def wait(pred, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.005)
    raise SystemExit(f"bench.console: {what} did not happen within {timeout_s:g} s")


def measure(n: int) -> dict[str, Any]:
    from vigil.console.screenshot import browser
    from vigil.runtime.client import RobotLink
    from vigil.runtime.launch import LOCAL_TCP, start_serve
    from vigil.runtime.store import AlertStore
    from vigil.sim.demo import start_console
    from vigil.training.lqr import export_lqr
    from vigil.wire.protocol import ArraySpec

    data: dict[str, Any] = {"run": run_info(), "alerts": n, "link_timeout_s": LINK_TIMEOUT_S}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vigil-bench-console-") as tmp:
        work = Path(tmp)
        manifest = export_lqr("aircraft-pitch", work / "lqr")
        served = start_serve(work / "lqr", work / "serve", control_endpoint=LOCAL_TCP,
                             link_timeout_s=LINK_TIMEOUT_S, log_level="WARNING")
        console, url = start_console(served, served.store, 0, work)
        if console is None:
            served.stop()
            raise SystemExit(f"bench.console: the console {url}")
        watch = StreamWatch(served.operator_endpoint)
        driver = browser()
        rows: list[dict[str, Any]] = []
        try:
            driver.get(url)
            wait(lambda: driver.execute_script("return !!document.querySelector('#alerts')"), 30, "the page")
            driver.execute_script(OBSERVE)
            time.sleep(1.0)  # the websocket is up and the snapshot drawn
            store = AlertStore(served.store, readonly=True)
            for i in range(n):
                robot = f"probe-{i}"
                link = RobotLink(served.robot_endpoint, robot)
                link.hello(tuple(manifest.observation), ArraySpec("action", "float32", manifest.action.shape))
                link.act({"state": np.zeros(3, np.float32)}, timeout_s=10)
                alert = wait(lambda robot=robot: next((a for a in store.since(0) if a.robot == robot
                                                       and a.monitor == "link"), None), 10, f"{robot}'s link alert")
                page_ms = wait(lambda a=alert: driver.execute_script(f"return window.__seen['{a.id}']"), 10,
                               f"alert {alert.id} on the page")
                stream_ns = wait(lambda a=alert: watch.seen.get(a.id), 10, f"alert {alert.id} on the stream")
                rows.append({"id": alert.id, "stream_ms": (stream_ns - alert.t_ns) / 1e6,
                             "page_ms": page_ms - alert.t_ns / 1e6})
                link.close()
                print(f"alert {alert.id}: stream {rows[-1]['stream_ms']:.1f} ms, page {rows[-1]['page_ms']:.1f} ms",
                      flush=True)
            store.close()
        finally:
            driver.quit()
            watch.close()
            console.terminate()
            console.wait(10)
            served.stop()
    data["rows"] = rows
    data["seconds"] = time.monotonic() - t0
    return data


def render(data: dict[str, Any]) -> str:
    rows = data["rows"]
    stats = {}
    for key in ("stream_ms", "page_ms"):
        x = np.array([r[key] for r in rows], float)
        stats[key] = {"p50": float(np.median(x)), "p90": float(np.percentile(x, 90)), "max": float(x.max())}
    s, p = stats["stream_ms"], stats["page_ms"]
    lines = ["## Console: an alert from the store to the operator's page", "",
             written_by(data["run"], seconds=data.get("seconds")), "",
             f"{len(rows)} `link` alerts, one at a time (a robot goes silent; link timeout "
             f"{data['link_timeout_s']:g} s), each timed from the runtime's stored `t_ns` (stored, then published) "
             "to its arrival on a ZeroMQ subscriber of the operator stream (what `vigil alerts` sees) and to its row "
             "appearing in `vigil console` in headless Chromium (a MutationObserver in the page).", "",
             "| observer | p50 | p90 | max |", "|---|---:|---:|---:|",
             f"| operator stream (ZeroMQ SUB) | {s['p50']:.1f} ms | {s['p90']:.1f} ms | {s['max']:.1f} ms |",
             f"| console page (Chromium) | {p['p50']:.1f} ms | {p['p90']:.1f} ms | {p['max']:.1f} ms |", "",
             f"The page adds {p['p50'] - s['p50']:.1f} ms at the median over the stream it listens to (the console's "
             "stream thread, the websocket push, the page's 30 ms render coalescing). The issue's bar is one second "
             f"from publication to the page; the slowest of these took {p['max'] / 1000:.3f} s."]
    return section(NAME, lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--alerts", type=int, default=20, help="alerts to time")
    p.add_argument("--report-only", action="store_true", help="rewrite the section from the raw results")
    a = p.parse_args()
    data = read_raw(RAW) if a.report_only else raw_copy(measure(a.alerts))
    if not a.report_only:
        write_raw(RAW, data)
    text = render(data)
    write_benchmarks(text, BEGIN, END)
    print(text)


if __name__ == "__main__":
    main()
