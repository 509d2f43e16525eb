"""Where the gap between vigil's round trip and its floor comes from on this machine: waking up.

Two measurements, both written between the `wakeup` markers of BENCHMARKS.md:

1. The same ~100-byte echo between two processes over loopback, as a plain TCP socket and as ZeroMQ
   DEALER/ROUTER. ZeroMQ hands every message to an I/O thread on each side, so a round trip wakes four
   threads instead of two; on a guest whose idle vCPUs halt at once, each wake-up is expensive.
2. The runtime's own tick, the real code (`Runtime._drain` on an inproc socket, so no I/O thread and no
   network: decode, validate, agent.act with onnxruntime, monitors, encode, send), run back to back
   ("hot") and after the process slept 0.2 ms and 5 ms, as it does between the ticks of a robot.

    .venv/bin/python -m bench.wakeup            # part of `make bench`
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq
from tqdm import tqdm

from bench.common import free_port, git_state, machine, write_benchmarks

BEGIN, END = "<!-- wakeup:begin -->", "<!-- wakeup:end -->"
PAYLOAD = b"x" * 100


def _tcp_server(port: int) -> None:
    srv = socket.create_server(("127.0.0.1", port))
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while (data := conn.recv(4096)) and data != b"q":
        conn.sendall(data)


def _zmq_server(endpoint: str) -> None:
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(endpoint)
    while True:
        frames = sock.recv_multipart()
        sock.send_multipart(frames)
        if frames[-1] == b"q":
            return


def markdown_table(rows: list[list[str]]) -> str:
    """First row is the header; numeric columns (all but the first) right-aligned."""
    head, *body = rows
    return "\n".join(["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1),
                      *("| " + " | ".join(r) + " |" for r in body)])


def echo_tcp(n: int) -> np.ndarray:
    port = free_port()
    proc = mp.Process(target=_tcp_server, args=(port,), daemon=True)
    proc.start()
    for _ in range(100):
        try:
            conn = socket.create_connection(("127.0.0.1", port))
            break
        except ConnectionRefusedError:
            time.sleep(0.02)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lat = []
    for _ in tqdm(range(n), desc="echo, plain tcp", leave=False):
        t = time.perf_counter()
        conn.sendall(PAYLOAD)
        conn.recv(4096)
        lat.append(time.perf_counter() - t)
    conn.sendall(b"q")
    proc.join(5)
    return np.asarray(lat) * 1e6


def echo_zmq(n: int) -> np.ndarray:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    proc = mp.Process(target=_zmq_server, args=(endpoint,), daemon=True)
    proc.start()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    lat = []
    for _ in tqdm(range(n), desc="echo, zeromq tcp", leave=False):
        t = time.perf_counter()
        sock.send(PAYLOAD)
        sock.recv()
        lat.append(time.perf_counter() - t)
    sock.send(b"q")
    sock.recv()
    proc.join(5)
    sock.close(0)
    return np.asarray(lat) * 1e6


def tick_times(bundle: Path, workdir: Path, n: int, gaps_s: list[float]) -> dict[float, np.ndarray]:
    """The runtime's real tick on an inproc socket, after each idle gap."""
    from vigil.runtime.client import RobotLink
    from vigil.runtime.config import ServeConfig
    from vigil.runtime.server import Runtime
    from vigil.wire.protocol import Message, encode

    ctx = zmq.Context()
    runtime = Runtime(ServeConfig(bundle=str(bundle), robot_endpoint="inproc://tick",
                                  operator_endpoint="inproc://ops", store=str(workdir / "alerts.db"),
                                  deadline_ms=1000.0, link_timeout_s=3600.0), ctx=ctx)
    link = RobotLink("inproc://tick", "bench", ctx)
    link.connect()
    spec = runtime.manifest.observation[0]
    link.send(Message("hello", "bench", 1, 0, {}, {"spec": {"observation": [spec.to_dict()],
                                                          "action": runtime.manifest.action.to_dict()}}))
    runtime.serve_ready()
    assert link.recv(1.0).kind == "hello"
    frames = encode(Message("obs", "bench", 2, 0, {spec.name: np.full(spec.shape, 0.1, np.float32)}))
    out = {}
    for gap in gaps_s:
        lat = []
        for _ in tqdm(range(n), desc=f"runtime tick after {gap * 1e3:g} ms idle", leave=False):
            if gap:
                time.sleep(gap)
            link.sock.send_multipart(frames)
            t = time.perf_counter()
            runtime.serve_ready()
            lat.append(time.perf_counter() - t)
            link.sock.recv_multipart()
        out[gap] = np.asarray(lat) * 1e6
    runtime.close()
    link.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ticks", type=int, default=3000, help="round trips / ticks per row")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    from vigil.training.lqr import export_lqr

    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "lqr"
        export_lqr("aircraft-pitch", bundle)
        gaps = [0.0, 0.0002, 0.005]
        ticks = tick_times(bundle, Path(tmp), args.ticks, gaps)
    tcp, zq = echo_tcp(args.ticks), echo_zmq(args.ticks)

    def pct(x: np.ndarray) -> list[str]:
        return [f"{np.percentile(x, 50):.1f}", f"{np.percentile(x, 90):.1f}", f"{np.percentile(x, 99):.1f}"]

    echo_rows = [["plain TCP socket", *pct(tcp), "1.00"],
                 ["ZeroMQ DEALER/ROUTER", *pct(zq), f"{np.median(zq) / np.median(tcp):.2f}"]]
    hot = np.median(ticks[0.0])
    tick_rows = [[("back to back (hot)" if g == 0 else f"after {g * 1e3:g} ms idle"), *pct(x),
                  f"{np.median(x) / hot:.2f}"] for g, x in ticks.items()]
    head = ["p50 µs", "p90 µs", "p99 µs"]
    info = machine(None)
    text = "\n".join([
        BEGIN,
        "## Wake-ups: why the round trip sits above its floor here",
        "",
        f"Written by `bench/wakeup.py` (`make bench`) on {started}; commit {git_state()}; {args.ticks} samples "
        f"per row. Machine: {info.get('CPU', '?')}, {info.get('cores', '?')} cores; "
        f"{info.get('OS', '')}.",
        "",
        "Echo of 100 bytes between two processes over loopback tcp:",
        "",
        markdown_table([["transport", *head, "p50 / plain TCP"], *echo_rows]),
        "",
        "The runtime's tick in one process (real `Runtime` code on an inproc socket: decode, validate, "
        "`agent.act` with onnxruntime, monitors, encode, send; the aircraft-pitch LQR bundle):",
        "",
        markdown_table([["when", *head, "p50 / hot"], *tick_rows]),
        "",
        "Reading: every ZeroMQ message crosses an I/O thread on each side, so a round trip wakes four threads "
        "where a plain socket wakes two; and code that ran moments ago runs several times slower after the "
        "process slept, since this guest halts an idle vCPU at once. A robot ticking at 100 Hz always pays "
        "the second cost; `--busy-poll-us` buys it back for the runtime at the price of a core.",
        END,
    ])
    print(text)
    if not args.no_write:
        write_benchmarks(text, BEGIN, END)


if __name__ == "__main__":
    main()
