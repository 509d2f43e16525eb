"""Observation-to-action round trip of vigil, side by side with its floors and an openpi-style peer.

For a `linear_gain` bundle (aircraft-pitch LQR, 3 floats in, 1 out) and a 256x256 MLP `gaussian` bundle
(39 floats in, 4 out), every row times one round trip per tick, `--ticks` ticks after a warm-up:

    vigil          `vigil serve` in its own process; a robot process times `RobotLink.act({"state": obs})`,
                   over tcp and ipc (one row per entry of VIGIL_VARIANTS, e.g. with --busy-poll-us)
    (a) onnxruntime   the bare `session.run` of the same policy.onnx at batch 1, one intra-op thread
    (b) zmq echo      a ROUTER process echoing the very frames vigil exchanges to a DEALER, tcp and ipc
    (c) openpi        an openpi-style websocket + msgpack server hosting the same ONNX model, driven by
                      the real `openpi-client` WebsocketClientPolicy (bench/openpi_peer.py, run in the
                      environment of --openpi-python because openpi-client pins numpy < 2)

Every server and every timing client is a process of its own; this script only orchestrates, so it
never competes with them for the two cores while they are timing.  Results: a table on stdout, the
section between the `latency` markers of BENCHMARKS.md, docs/figures/latency.png and
bench/out/latency.json (raw latencies) -- the last three unless --no-write.

    .venv/bin/python -m bench.latency --openpi-python .venv-openpi/bin/python    # make bench
    .venv/bin/python -m bench.latency --quick --no-openpi --no-write              # smoke check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import BENCHMARKS, command_line, git_state, machine, write_benchmarks

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FIGURE = ROOT / "docs" / "figures" / "latency.png"
RAW = HERE / "out" / "latency.json"
BEGIN, END = "<!-- latency:begin -->", "<!-- latency:end -->"

POLICIES = ("linear_gain", "gaussian")
TRANSPORTS = ("tcp", "ipc")
# vigil rows: (system label, extra `vigil serve` arguments, the `vigil serve --help` flag it needs or None).
# Add a line here to measure another server configuration; rows whose flag is missing are skipped.
VIGIL_VARIANTS: list[tuple[str, list[str], str | None]] = [
    ("vigil", [], None),
    ("vigil busy-poll 2000us", ["--busy-poll-us", "2000"], "--busy-poll-us"),
]
ORT, ECHO, OPENPI, FLOOR = "(a) onnxruntime", "(b) zmq echo", "(c) openpi ws+msgpack", "(a)+(b)"
TARGET_FLOOR_RATIO = 1.3
N_OBSERVATIONS = 1024  # distinct observations each client cycles through (the echo sends the first one)


# ------------------------------------------------------------------------------------------------------
# Roles: each runs in a child process (`latency.py _role NAME ...`), imports only what it needs, and
# writes its result as JSON.
# ------------------------------------------------------------------------------------------------------

def role_make_bundles(out: str) -> None:
    """Write the two bundles under `out` and print what the clients need to know about them."""
    import torch

    from vigil.training.export import export_gaussian
    from vigil.training.lqr import export_lqr

    out_dir = Path(out)
    export_lqr("aircraft-pitch", out_dir / "linear_gain")
    torch.manual_seed(0)
    actor = torch.nn.Sequential(torch.nn.Linear(39, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 4))
    export_gaussian(out_dir / "gaussian", "bench-mlp-256x256", actor, 39, [-1.0] * 4, [1.0] * 4,
                    control_rate_hz=100)
    info = {}
    for name in POLICIES:
        manifest = json.loads((out_dir / name / "manifest.json").read_text())
        (graph_input,) = manifest["onnx"]["inputs"]
        info[name] = {"bundle": str(out_dir / name), "onnx": str(out_dir / name / manifest["onnx"]["file"]),
                      "input": graph_input, "output": manifest["onnx"]["action"],
                      "policy_id": manifest.get("policy_id", name),
                      "obs_dim": manifest["observation"][0]["shape"][0], "act_dim": manifest["action"]["shape"][0]}
    print(json.dumps(info), flush=True)


def _timed(step: Callable[[np.ndarray], Any], observations: np.ndarray, ticks: int, warmup: int) -> np.ndarray:
    """Latency in ns of `step(obs)` for `ticks` ticks after `warmup` untimed ones."""
    n = len(observations)
    rows = [observations[i] for i in range(n)]
    for i in range(warmup):
        step(rows[i % n])
    lat = np.empty(ticks, np.int64)
    clock = time.perf_counter_ns
    for i in range(ticks):
        obs = rows[i % n]
        t0 = clock()
        step(obs)
        lat[i] = clock() - t0
    return lat


def _write(out: str, lat: np.ndarray, **extra: Any) -> None:
    Path(out).write_text(json.dumps({"latencies_ns": lat.tolist(), **extra}))


def role_ort_client(a: argparse.Namespace) -> None:
    """(a): the bare onnxruntime call, with the session options vigil's runtime uses."""
    import onnxruntime as ort

    from vigil.policies.bundle import session_options

    session = ort.InferenceSession(a.model, session_options(1), providers=["CPUExecutionProvider"])
    fetch, name = [a.output_name], a.input_name
    observations = np.load(a.obs)
    lat = _timed(lambda obs: session.run(fetch, {name: obs[None]}), observations, a.ticks, a.warmup)
    _write(a.out, lat)


def role_echo_server(a: argparse.Namespace) -> None:
    """(b) server: a ROUTER that sends every message straight back (identity frame included)."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    if a.endpoint.startswith("tcp://") and a.endpoint.endswith(":0"):
        sock.bind_to_random_port(a.endpoint.rsplit(":", 1)[0])
    else:
        sock.bind(a.endpoint)
    print("READY", sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    while True:
        sock.send_multipart(sock.recv_multipart())


def role_echo_client(a: argparse.Namespace) -> None:
    """(b) client: a DEALER sending the `obs` frames vigil's robot link sends, built once."""
    import zmq

    from vigil.wire.protocol import Message, encode

    observations = np.load(a.obs)
    frames = [bytes(f) for f in encode(Message("obs", "bench-0", 1, 0, {"state": observations[0]}))]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(a.endpoint)

    def step(_obs: np.ndarray) -> None:
        sock.send_multipart(frames)
        sock.recv_multipart()

    lat = _timed(step, observations, a.ticks, a.warmup)
    sock.close()
    ctx.term()
    _write(a.out, lat, request_bytes=sum(len(f) for f in frames))


def role_vigil_client(a: argparse.Namespace) -> None:
    """vigil: the reference robot driver, `RobotLink.act`, against a `vigil serve` process."""
    import zmq

    from vigil.runtime.client import RobotLink
    from vigil.wire.protocol import STREAM_KINDS, ArraySpec, decode

    observations = np.load(a.obs)
    # The runtime's own receipt-to-reply time: p50 over each telemetry interval, read after the timed loop.
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"telemetry")
    sub.connect(a.operator)
    link = RobotLink(a.endpoint, "bench-0")
    hello = link.hello((ArraySpec("state", "float32", (observations.shape[1],)),),
                       ArraySpec("action", "float32", (a.act_dim,)), timeout_s=30.0)
    bad = {"not_act": 0, "safe": 0}
    infer_us: list[float] = []  # the runtime's own agent.act time, reported in every act reply
    queue_us: list[float] = []  # arrival (the robot's send: same computer) to the start of the runtime's tick
    decide_us: list[float] = []  # the start of the tick to the decision

    def step(obs: np.ndarray) -> None:
        reply = link.act({"state": obs})
        if reply.kind != "act":
            bad["not_act"] += 1
        elif reply.meta.get("safe"):
            bad["safe"] += 1
        meta = reply.meta
        infer_us.append(meta.get("infer_us", float("nan")))
        queue_us.append(meta.get("queue_us", float("nan")))
        decide_us.append(meta.get("decide_us", float("nan")))

    lat = _timed(step, observations, a.ticks, a.warmup)
    link.bye()
    server_p50s = []
    while sub.poll(0):
        try:
            msg = decode(sub.recv_multipart()[1:], kinds=STREAM_KINDS)
        except Exception:  # noqa: BLE001 - a diagnostic only
            continue
        robot = msg.meta.get("robots", {}).get("bench-0") if isinstance(msg.meta.get("robots"), dict) else None
        if robot and robot.get("ticks"):
            server_p50s.append(float(robot["p50_us"]))
    sub.close()
    # One value per telemetry interval (1 s by default) that ended during the run; the first includes the
    # warm-up. A run shorter than an interval has none.
    def p50(values: list[float]) -> float | None:
        timed = np.asarray(values[a.warmup:], float)
        return float(np.nanmedian(timed)) if timed.size and not np.isnan(timed).all() else None

    _write(a.out, lat, policy=hello.policy, mode=hello.mode,
           server_tick_us_p50=float(np.median(server_p50s)) if server_p50s else None,
           server_infer_us_p50=p50(infer_us), server_queue_us_p50=p50(queue_us),
           server_decide_us_p50=p50(decide_us), **bad)


ROLES = {"ort-client": role_ort_client, "echo-server": role_echo_server, "echo-client": role_echo_client,
         "vigil-client": role_vigil_client}


def run_role(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="latency.py _role")
    p.add_argument("role", choices=[*ROLES, "make-bundles"])
    p.add_argument("--out", default="")
    p.add_argument("--obs", default="")
    p.add_argument("--endpoint", default="")
    p.add_argument("--operator", default="")
    p.add_argument("--model", default="")
    p.add_argument("--input-name", default="")
    p.add_argument("--output-name", default="action")
    p.add_argument("--act-dim", type=int, default=0)
    p.add_argument("--ticks", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=200)
    a = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if a.role == "make-bundles":
        role_make_bundles(a.out)
    else:
        ROLES[a.role](a)
    return 0


# ------------------------------------------------------------------------------------------------------
# Orchestration
# ------------------------------------------------------------------------------------------------------

class BenchError(RuntimeError):
    pass


class Children:
    """Every process the benchmark starts; all are terminated (then killed) on exit, errors included."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: Any) -> None:
        for proc, _ in reversed(self.procs):
            self.stop(proc)

    def start(self, cmd: Sequence[str], name: str) -> subprocess.Popen:
        log = self.logs / f"{name}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                    cwd=ROOT)
        self.procs.append((proc, log))
        return proc

    def log_tail(self, proc: subprocess.Popen, n: int = 2000) -> str:
        for p, log in self.procs:
            if p is proc and log.exists():
                return log.read_text(errors="replace")[-n:]
        return ""

    def stop(self, proc: subprocess.Popen, timeout: float = 5.0) -> str:
        """Terminate, wait, kill if needed; returns what it printed on stdout."""
        if proc.poll() is None:
            proc.terminate()
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        return (out or b"").decode(errors="replace")

    def wait_ready(self, proc: subprocess.Popen, timeout: float = 60.0) -> str:
        """The rest of the server's `READY ...` line."""
        assert proc.stdout is not None
        buf = b""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0 or proc.poll() is not None and not sel.select(0):
                    raise BenchError(f"server {proc.args!r} did not become ready:\n{self.log_tail(proc)}")
                if sel.select(min(left, 0.5)):
                    chunk = os.read(proc.stdout.fileno(), 4096)
                    if not chunk:
                        raise BenchError(f"server {proc.args!r} exited before it was ready:\n{self.log_tail(proc)}")
                    buf += chunk
        line = buf.split(b"\n", 1)[0].decode()
        if not line.startswith("READY "):
            raise BenchError(f"server {proc.args!r} printed {line!r} instead of READY")
        return line[len("READY "):].strip()


@dataclass
class Result:
    policy: str
    transport: str
    system: str
    latencies_us: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    def stats(self) -> dict[str, float]:
        x = self.latencies_us
        return {"p50": float(np.percentile(x, 50)), "p99": float(np.percentile(x, 99)), "max": float(x.max()),
                "mean": float(x.mean()), "n": int(x.size)}


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    kids: Children
    bundles: dict[str, dict[str, Any]]
    obs_files: dict[str, Path]
    ticks: int
    warmup: int
    vigil_cmd: list[str]

    def client(self, cmd: Sequence[str], name: str) -> dict[str, Any]:
        """Run a timing client to completion and read its JSON."""
        out = self.tmp / f"{name}.json"
        log = self.tmp / "logs" / f"{name}.log"
        limit = 120 + self.ticks * 0.02  # generous: a tick is well under a millisecond
        with open(log, "wb") as err:
            rc = subprocess.run([*cmd, "--out", str(out)], stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                cwd=ROOT, timeout=limit).returncode
        if rc != 0 or not out.exists():
            raise BenchError(f"client {name} failed (exit {rc}):\n{log.read_text(errors='replace')[-3000:]}")
        return json.loads(out.read_text())

    def role(self, role: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "bench.latency", "_role", role,
                "--ticks", str(self.ticks), "--warmup", str(self.warmup), *extra]

    def endpoint(self, transport: str, name: str) -> str:
        return "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{self.tmp}/{name}.ipc"

    def result(self, policy: str, transport: str, system: str, data: dict[str, Any]) -> Result:
        lat = np.asarray(data.pop("latencies_ns"), np.float64) / 1e3
        return Result(policy, transport, system, lat, data)

    # -- one function per kind of row --------------------------------------------------------------

    def ort(self, policy: str) -> Result:
        b = self.bundles[policy]
        data = self.client(self.role("ort-client", "--model", b["onnx"], "--input-name", b["input"],
                                     "--output-name", b["output"], "--obs", str(self.obs_files[policy])),
                           f"ort-{policy}")
        return self.result(policy, "in-process", ORT, data)

    def echo(self, policy: str, transport: str) -> Result:
        name = f"echo-{policy}-{transport}"
        ep = "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{self.tmp}/{name}.ipc"
        server = self.kids.start(self.role("echo-server", "--endpoint", ep), name + "-server")
        try:
            bound = self.kids.wait_ready(server)
            data = self.client(self.role("echo-client", "--endpoint", bound, "--obs", str(self.obs_files[policy])),
                               name)
        finally:
            self.kids.stop(server)
        return self.result(policy, transport, ECHO, data)

    def vigil(self, policy: str, transport: str, system: str, extra_args: Sequence[str]) -> Result:
        from vigil.runtime.launch import LaunchError, start_serve

        b = self.bundles[policy]
        name = f"{re.sub(r'[^A-Za-z0-9]+', '-', system)}-{policy}-{transport}"
        robot_ep, operator_ep = self.endpoint(transport, name + "-robot"), self.endpoint(transport, name + "-op")
        flags = dict(zip([a.lstrip("-").replace("-", "_") for a in extra_args[::2]], extra_args[1::2]))
        served = start_serve(b["bundle"], self.tmp / name, robot_endpoint=robot_ep, operator_endpoint=operator_ep,
                             log_level="WARNING", **flags)
        try:
            data = self.client(self.role("vigil-client", "--endpoint", served.robot_endpoint,
                                         "--operator", served.operator_endpoint, "--act-dim", str(b["act_dim"]),
                                         "--obs", str(self.obs_files[policy])), name)
            if not served.alive():
                raise BenchError(f"vigil serve exited during the run:\n{served.log()}")
        finally:
            try:
                data_counters = served.stop()
            except LaunchError:
                served.kill()
                data_counters = {}
        data["server_counters"] = data_counters
        if data.get("not_act") or data.get("safe"):
            print(f"warning: {system} {policy} {transport}: {data['not_act']} replies were not actions, "
                  f"{data['safe']} were the safe action", file=sys.stderr)
        return self.result(policy, transport, system, data)

    def openpi(self, policy: str) -> Result:
        b = self.bundles[policy]
        peer = [self.args.openpi_python, str(HERE / "openpi_peer.py")]
        name = f"openpi-{policy}"
        server = self.kids.start([*peer, "serve", "--model", b["onnx"], "--input-name", b["input"],
                                  "--output-name", b["output"], "--port", "0"], name + "-server")
        try:
            port = self.kids.wait_ready(server)
            data = self.client([*peer, "client", "--port", port, "--obs", str(self.obs_files[policy]),
                                "--ticks", str(self.ticks), "--warmup", str(self.warmup)], name)
        finally:
            self.kids.stop(server)
        return self.result(policy, "tcp", OPENPI, data)


def pool(parts: list[Result]) -> Result:
    """One row from several runs of it: all ticks together, and each run's p50 kept for the spread."""
    first = parts[0]
    extra = dict(first.extra)
    extra["runs"] = [{"p50": float(np.percentile(p.latencies_us, 50)), **{k: v for k, v in p.extra.items()
                      if not isinstance(v, (dict, list))}} for p in parts]
    for key in ("not_act", "safe"):
        if key in extra:
            extra[key] = sum(p.extra.get(key, 0) for p in parts)
    for key in ("server_infer_us_p50", "server_tick_us_p50", "server_queue_us_p50", "server_decide_us_p50"):
        values = [p.extra[key] for p in parts if p.extra.get(key) is not None]
        extra[key] = float(np.median(values)) if values else None
    return Result(first.policy, first.transport, first.system, np.concatenate([p.latencies_us for p in parts]), extra)


def cpu_times() -> list[int]:
    """The aggregate `cpu` line of /proc/stat (user nice system idle iowait irq softirq steal ...)."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return []


def vigil_command() -> list[str]:
    exe = Path(sys.executable).parent / "vigil"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vigil.runtime.cli"]


def vigil_variants(vigil_cmd: list[str]) -> list[tuple[str, list[str]]]:
    help_text = subprocess.run([*vigil_cmd, "serve", "--help"], capture_output=True, text=True, cwd=ROOT).stdout
    return [(label, args) for label, args, flag in VIGIL_VARIANTS if flag is None or flag in help_text]


def make_bundles(tmp: Path) -> dict[str, dict[str, Any]]:
    proc = subprocess.run([sys.executable, "-m", "bench.latency", "_role", "make-bundles", "--out",
                           str(tmp / "bundles")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    if proc.returncode != 0:
        raise BenchError(f"could not write the bundles:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------------

def fmt(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{x:,.{digits}f}"


def summarise(results: list[Result]) -> tuple[list[list[str]], list[dict[str, Any]]]:
    """Markdown table rows, and one verdict per vigil row."""
    by = {(r.policy, r.transport, r.system): r for r in results}
    stats = {key: r.stats() for key, r in by.items()}
    rows, verdicts = [], []

    def row(key: tuple[str, str, str], transport: str, digits: int = 0, ratios: tuple[str, str] = ("", "")) -> None:
        s, runs = stats[key], by[key].extra.get("runs", [])
        per_run = " / ".join(fmt(run["p50"], digits) for run in runs) if len(runs) > 1 else ""
        vigil = key[2].startswith("vigil")
        rows.append([key[0], transport, f"**{key[2]}**" if vigil else key[2],
                     f"**{fmt(s['p50'], digits)}**" if vigil else fmt(s["p50"], digits), per_run,
                     fmt(s["p99"], digits), fmt(s["max"], digits), *ratios])

    for policy in POLICIES:
        ort = stats.get((policy, "in-process", ORT))
        openpi = stats.get((policy, "tcp", OPENPI))
        if ort:
            row((policy, "in-process", ORT), "in-process", 1)
        for transport in TRANSPORTS:
            echo = stats.get((policy, transport, ECHO))
            floor = ort["p50"] + echo["p50"] if ort and echo else None
            if echo:
                row((policy, transport, ECHO), transport)
            if floor is not None:
                rows.append([policy, transport, FLOOR, fmt(floor), "", "—", "—", "", ""])
            for r in results:
                if r.policy != policy or r.transport != transport or not r.system.startswith("vigil"):
                    continue
                s = stats[(policy, transport, r.system)]
                r_floor = s["p50"] / floor if floor else None
                r_openpi = s["p50"] / openpi["p50"] if openpi else None
                row((policy, transport, r.system), transport, 0, (fmt(r_floor, 2), fmt(r_openpi, 2)))
                verdicts.append({"policy": policy, "transport": transport, "system": r.system, "p50": s["p50"],
                                 "floor_ratio": r_floor, "openpi_ratio": r_openpi,
                                 "floor_ok": None if r_floor is None else r_floor <= TARGET_FLOOR_RATIO,
                                 "openpi_ok": None if r_openpi is None else r_openpi < 1.0})
        if openpi:
            row((policy, "tcp", OPENPI), "tcp (websocket)")
    return rows, verdicts


HEADER = ["policy", "transport", "system", "p50 µs", "p50 of each run", "p99 µs", "max µs", "p50 / ((a)+(b))",
          "p50 / (c)"]


def breakdown_table(results: list[Result]) -> str:
    lines = ["| policy | transport | system | round trip µs | runtime: arrival to reply µs | queue µs | "
             "tick µs | of which agent.act µs | rest µs |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if not r.system.startswith("vigil"):
            continue
        trip, tick = r.stats()["p50"], r.extra.get("server_tick_us_p50")
        rest = None if tick is None else trip - tick
        lines.append(f"| {r.policy} | {r.transport} | {r.system} | {fmt(trip)} | {fmt(tick)} | "
                     f"{fmt(r.extra.get('server_queue_us_p50'), 1)} | {fmt(r.extra.get('server_decide_us_p50'), 1)} | "
                     f"{fmt(r.extra.get('server_infer_us_p50'), 1)} | {fmt(rest)} |")
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> str:
    right = [False, False, False, True, True, True, True, True, True]
    lines = ["| " + " | ".join(HEADER) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def verdict_lines(verdicts: list[dict[str, Any]]) -> list[str]:
    def yn(ok: bool | None) -> str:
        return "not measured" if ok is None else ("yes" if ok else "no")

    lines = []
    for v in verdicts:
        judged = v["floor_ok"] is not None and v["openpi_ok"] is not None
        met = ("yes" if v["floor_ok"] and v["openpi_ok"] else "no") if judged else "not judged"
        floor = (f"{v['floor_ratio']:.2f}x (a)+(b) (within {TARGET_FLOOR_RATIO}x: {yn(v['floor_ok'])})"
                 if v["floor_ratio"] is not None else "(a)+(b) not measured")
        openpi = (f"{v['openpi_ratio']:.2f}x (c) (below it: {yn(v['openpi_ok'])})"
                  if v["openpi_ratio"] is not None else "(c) not measured")
        lines.append(f"- {v['policy']}, {v['transport']}, {v['system']}: p50 {v['p50']:.0f} µs = {floor}, {openpi} "
                     f"— **target met: {met}**")
    return lines


def write_figure(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {ORT: "tab:green", ECHO: "tab:gray", OPENPI: "tab:red"}
    palette = iter(["tab:blue", "tab:purple", "tab:cyan", "tab:olive", "tab:brown"])
    fig, axes = plt.subplots(1, len(POLICIES), figsize=(13, 5), sharey=True)
    for ax, policy in zip(axes, POLICIES):
        for r in results:
            if r.policy != policy:
                continue
            if r.system not in colours:
                colours[r.system] = next(palette, "black")
            x = np.sort(r.latencies_us)
            y = np.arange(1, x.size + 1) / x.size
            style = "--" if r.transport == "ipc" else "-"
            width = 2.2 if r.system.startswith("vigil") else 1.4
            ax.plot(x, y, style, color=colours[r.system], lw=width,
                    label=f"{r.system}, {r.transport} (p50 {np.percentile(x, 50):.0f} µs)")
        ax.set_xscale("log")
        ax.set_title(f"{policy}: observation-to-action round trip")
        ax.set_xlabel("latency per tick, µs (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.axhline(0.5, color="k", lw=0.6, alpha=0.4)
        ax.axhline(0.99, color="k", lw=0.6, alpha=0.4)
        ax.legend(fontsize=7.5, loc="lower right")
    axes[0].set_ylabel("fraction of ticks at or below (CDF)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(args: argparse.Namespace, argv: Sequence[str], ticks: int, rounds: int, warmup: int, results: list[Result],
            rows: list[list[str]], verdicts: list[dict[str, Any]], info: dict[str, str], started: str,
            wall_s: float) -> str:
    fig = os.path.relpath(FIGURE, BENCHMARKS.parent)
    all_met = bool(verdicts) and all(v["floor_ok"] and v["openpi_ok"] for v in verdicts)
    breakdown = breakdown_table(results)
    lines = [
        BEGIN,
        "## Observation-to-action latency",
        "",
        f"Written by `bench/latency.py` (`make bench`) on {started}, in {wall_s:.0f} s; rewritten on every "
        "run, so edit outside the markers.",
        "",
        f"- Command: `{command_line(argv)}`",
        f"- vigil commit: {git_state()}",
        f"- Ticks: {rounds * ticks} timed round trips per row: {rounds} run(s) of {ticks}, each after {warmup} "
        "untimed warm-up ticks, the runs of all rows interleaved (round 1 of every row, then round 2, ...) and "
        "pooled for the percentiles; every run is a fresh server process and a fresh client process "
        "(loopback only: 127.0.0.1, ipc in a temporary folder).",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "Rows (the bundles are written for the run: `linear_gain` is the aircraft-pitch LQR, 3 floats in, 1 out; "
        "`gaussian` is a 39→256→256→4 ReLU MLP):",
        "",
        "- **vigil**: `vigil serve` (lockstep mode, the default) in one process; a robot process times "
        "`RobotLink.act({\"state\": obs})`, i.e. encode, send, the runtime's whole tick (decode, validate, "
        "onnxruntime, monitors, reply), receive, decode. `busy-poll 2000us` adds `--busy-poll-us 2000`.",
        "- **(a) onnxruntime**: `session.run` of the same `policy.onnx` at batch 1 in-process, one intra-op "
        "thread (the runtime's session options).",
        "- **(b) zmq echo**: a ROUTER process echoing the very frames of a vigil `obs` message (built once) to a "
        "DEALER; no encode, no decode.",
        "- **(a)+(b)**: the sum of the two p50s, the floor vigil is held to (p99/max of a sum are not meaningful).",
        "- **(c) openpi ws+msgpack**: an openpi-style asyncio `websockets` server (`bench/openpi_peer.py`: "
        "metadata on connect, then `unpackb` → onnxruntime → `packb({\"actions\": ...})`) hosting the same ONNX, "
        "driven by the real `openpi-client` `WebsocketClientPolicy.infer({\"state\": obs})`, in its own "
        "environment (openpi-client pins numpy < 2). tcp only.",
        "",
        markdown_table(rows),
        "",
        f"Target: vigil's p50 within {TARGET_FLOOR_RATIO}x of (a)+(b), and below (c). "
        f"**All rows meet it: {'yes' if all_met else 'no'}.**",
        "",
        *verdict_lines(verdicts),
        "",
        "Where vigil's round trip goes (p50s; the runtime's tick is from receipt of the observation to the reply "
        "handed to ZeroMQ, as its telemetry reports it per interval; `agent.act` is onnxruntime plus the action "
        "queue and clipping, the `infer_us` of every act reply; the rest is the robot side, both hops and the "
        "wake-ups; compare `agent.act` with (a), the same onnxruntime call in a hot loop):",
        "",
        breakdown,
        "",
        f"![latency CDF per system]({fig})",
        "",
        END,
    ]
    if args.no_openpi:
        lines.insert(-1, "(c) was not measured in this run (`--no-openpi`).\n")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ticks", type=int, default=5000, help="timed round trips per row")
    p.add_argument("--warmup", type=int, default=200, help="untimed ticks before timing")
    p.add_argument("--rounds", type=int, default=3,
                   help="run every row this many times, interleaved, and pool the ticks (each run has --ticks)")
    p.add_argument("--quick", action="store_true", help="smoke check: 500 ticks per row, one round")
    p.add_argument("--openpi-python", default=str(ROOT / ".venv-openpi" / "bin" / "python"),
                   help="Python of the environment holding openpi-client (make .venv-openpi/.installed)")
    p.add_argument("--no-openpi", action="store_true", help="skip (c), the openpi-style peer")
    p.add_argument("--no-write", action="store_true",
                   help="print the table only; leave BENCHMARKS.md, the figure and bench/out alone")
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES), help="bundles to measure")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_role"]:
        return run_role(argv[1:])
    args = parse_args(argv)
    ticks = 500 if args.quick else args.ticks
    rounds = 1 if args.quick else args.rounds
    warmup = args.warmup
    if ticks < 1 or warmup < 0 or rounds < 1:
        print("latency.py: --ticks and --rounds must be >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    if not args.no_openpi and not Path(args.openpi_python).exists():
        print(f"latency.py: {args.openpi_python} not found; create it with `make .venv-openpi/.installed` "
              "or pass --no-openpi", file=sys.stderr)
        return 2
    from tqdm import tqdm

    # SIGTERM unwinds like Ctrl-C, so the children are cleaned up either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    t_start = time.monotonic()
    load_start, cpu_start = os.getloadavg()[0], cpu_times()
    results: list[Result] = []
    try:
        with tempfile.TemporaryDirectory(prefix="vigil-bench-") as tmp_name, \
                Children(Path(tmp_name) / "logs") as kids:
            tmp = Path(tmp_name)
            (tmp / "logs").mkdir()
            print("writing the bundles (torch export) ...", file=sys.stderr, flush=True)
            bundles = make_bundles(tmp)
            rng = np.random.default_rng(0)
            obs_files = {}
            for policy in args.policies:
                obs = rng.normal(0.0, 0.5, (N_OBSERVATIONS, bundles[policy]["obs_dim"])).astype(np.float32)
                obs_files[policy] = tmp / f"obs-{policy}.npy"
                np.save(obs_files[policy], obs)
            vigil_cmd = vigil_command()
            variants = vigil_variants(vigil_cmd)
            bench = Bench(args, tmp, kids, bundles, obs_files, ticks, warmup, vigil_cmd)
            plan: list[tuple[str, Callable[[], Result]]] = []
            for policy in args.policies:
                plan.append((f"{policy} {ORT}", lambda p=policy: bench.ort(p)))
                for transport in TRANSPORTS:
                    plan.append((f"{policy} {transport} {ECHO}", lambda p=policy, t=transport: bench.echo(p, t)))
                    for label, extra in variants:
                        plan.append((f"{policy} {transport} {label}",
                                     lambda p=policy, t=transport, s=label, e=extra: bench.vigil(p, t, s, e)))
                if not args.no_openpi:
                    plan.append((f"{policy} {OPENPI}", lambda p=policy: bench.openpi(p)))
            # Rounds run the whole plan again, interleaved, so that a row's luck with where the scheduler puts
            # its two processes (or with a burst of other load) is shared out instead of landing on one row.
            runs = [(r, label, run) for r in range(rounds) for label, run in plan]
            per_row: dict[str, list[Result]] = {}
            with tqdm(runs, desc="latency", unit="run", file=sys.stderr, dynamic_ncols=True) as bar:
                for r, label, run in bar:
                    bar.set_postfix_str(f"round {r + 1}/{rounds}: {label}")
                    per_row.setdefault(label, []).append(run())
            results = [pool(parts) for parts in per_row.values()]
    except BenchError as exc:
        print(f"latency.py: {exc}", file=sys.stderr)
        return 1
    wall_s = time.monotonic() - t_start

    rows, verdicts = summarise(results)
    openpi_versions = next((r.extra.get("versions") for r in results if r.system == OPENPI), None)
    info = machine(openpi_versions)
    info["load average (1 min)"] = (f"{load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end "
                                    "(anything else running on the two cores shows up in the tails)")
    cpu_end = cpu_times()
    if len(cpu_start) > 7 and len(cpu_end) > 7:
        delta = [b - a for a, b in zip(cpu_start, cpu_end)]
        busy = sum(delta[:3]) + sum(delta[5:7])
        info["CPU during the run"] = (f"{100 * busy / max(1, sum(delta[:8])):.0f}% busy, "
                                      f"{100 * delta[7] / max(1, sum(delta[:8])):.1f}% stolen by the hypervisor")
    print()
    print(markdown_table(rows))
    print()
    print("\n".join(verdict_lines(verdicts)))
    print()
    print(breakdown_table(results))
    for r in results:
        if r.extra.get("not_act") or r.extra.get("safe"):
            print(f"note: {r.system} {r.policy} {r.transport}: {r.extra.get('not_act')} non-action replies, "
                  f"{r.extra.get('safe')} safe actions")
    if args.no_write:
        return 0
    write_figure(results, FIGURE)
    write_benchmarks(section(args, argv, ticks, rounds, warmup, results, rows, verdicts, info, started, wall_s),
                     BEGIN, END)
    RAW.parent.mkdir(parents=True, exist_ok=True)
    RAW.write_text(json.dumps({"started": started, "ticks": ticks, "rounds": rounds, "warmup": warmup, "machine": info,
                               "rows": [{"policy": r.policy, "transport": r.transport, "system": r.system,
                                         **r.stats(), "extra": r.extra,
                                         "latencies_us": np.round(r.latencies_us, 2).tolist()} for r in results]}))
    print(f"\nwrote {os.path.relpath(BENCHMARKS, Path.cwd())}, {os.path.relpath(FIGURE, Path.cwd())}, "
          f"{os.path.relpath(RAW, Path.cwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
