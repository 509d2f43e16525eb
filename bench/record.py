"""What a recording costs (`vigil serve --record DIR`): on the loop's thread, in total, and on disk.

Two measurements per bundle, each against the same runtime without `--record`, measured in the same run:

1. In one process (the real `Runtime` on inproc sockets, as bench/wakeup.py): the recording hook's
   `on_decision` alone, called with the decisions of real ticks (its whole cost on the loop's thread), and the
   hot tick (`serve_ready`) with and without the recorder (which adds whatever the writer thread takes from the
   loop through the GIL).
2. A `vigil serve` process and one robot at 100 Hz (lockstep, paced; an episode every 10 s), `--record` and not,
   in alternating windows: CPU per tick of the runtime process (all threads, and the loop's thread alone, from
   /proc/PID/task/TID/schedstat), the robot's reply latency, and the bytes written per tick, as MB per hour of
   robot time.

Bundles: the aircraft-pitch LQR (linear_gain, 3 floats in, 1 out; the robot is the simulated system) and, when
one is found, a flow ensemble (39 floats in, a chunk of 8 actions of 4, VFD scores; fed random states, since
the cost of recording does not depend on what the states mean).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.record          # make bench-record; about 3 minutes
    .venv/bin/python -m bench.record --report-only             # rewrite the section from bench/out/record.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from bench.common import (
    BENCH_RUNS,
    OUT,
    markers,
    raw_copy,
    read_raw,
    run_info,
    section,
    write_benchmarks,
    write_raw,
    written_by,
)

NAME = "record"
RAW = OUT / "record.json"
BEGIN, END = markers(NAME)
RATE_HZ = 100.0
EPISODE_S = 10.0
FLOW_CANDIDATES = (BENCH_RUNS / "rtc" / "h8-base" / "bundle", BENCH_RUNS / "record" / "run0" / "bundle")
INSTRUCTION = "reach the goal position with the gripper"


# -- where the CPU went -------------------------------------------------------------------------------------


def task_cpu_ns(pid: int) -> dict[int, int]:
    """Nanoseconds on a CPU so far of every thread of `pid` (/proc/PID/task/TID/schedstat)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out[int(task.name)] = int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError):
            continue
    return out


# -- the robot ----------------------------------------------------------------------------------------------


class Feed:
    """Observations for a bundle: the simulated system for the LQR, random states for the ensemble."""

    def __init__(self, kind: str, seed: int = 0):
        from vigil.sim.envs import LinearEnv
        from vigil.sim.linear import aircraft_pitch

        self.kind, self.rng = kind, np.random.default_rng(seed)
        self.env = LinearEnv(aircraft_pitch(), horizon=10**7) if kind == "lqr" else None
        self.episode = 0

    def reset(self) -> dict[str, np.ndarray]:
        self.episode += 1
        if self.env is not None:
            return dict(self.env.reset(seed=self.episode))
        return self.obs()

    def obs(self) -> dict[str, np.ndarray]:
        return {"state": (self.rng.standard_normal(39) * 0.1).astype(np.float32)}

    def step(self, action: np.ndarray) -> dict[str, np.ndarray]:
        return dict(self.env.step(action).obs) if self.env is not None else self.obs()

    def reset_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"task": self.kind, "seed": self.episode, "episode": self.episode}
        if self.kind == "flow":
            info["instruction"] = INSTRUCTION
        return info


def hello(link, manifest) -> None:
    from vigil.wire.protocol import ArraySpec

    link.hello(tuple(manifest.observation), ArraySpec("action", "float32", manifest.action.shape))


# -- 1. in one process --------------------------------------------------------------------------------------


def in_process(bundle: Path, kind: str, workdir: Path, ticks: int, calls: int) -> dict[str, Any]:
    """The hook's on_decision per call, and the hot tick with and without a recorder: two runs each,
    alternating (the machine's load drifts)."""
    runs: dict[str, dict[str, list[float]]] = {}
    for i, mode in enumerate(("baseline", "record", "baseline", "record")):
        lat, per_call = one_process_run(bundle, kind, workdir / f"inproc-{kind}-{i}", mode, ticks, calls)
        row = runs.setdefault(mode, {"tick_us": [], "on_decision_ns": []})
        row["tick_us"] += lat
        if per_call is not None:
            row["on_decision_ns"].append(per_call)
    return {mode: {"tick_p50_us": float(np.median(r["tick_us"])), "tick_p99_us": float(np.percentile(r["tick_us"], 99)),
                   **({"on_decision_ns": float(np.median(r["on_decision_ns"]))} if r["on_decision_ns"] else {})}
            for mode, r in runs.items()}


def one_process_run(bundle: Path, kind: str, folder: Path, mode: str, ticks: int,
                    calls: int) -> tuple[list[float], float | None]:
    """`ticks` real ticks through `Runtime.serve_ready` on inproc sockets (their times, µs, the first tenth
    left out), then, with a recorder, `calls` calls of its on_decision with the last tick's arguments (ns each)."""
    from vigil.runtime.client import RobotLink
    from vigil.runtime.config import ServeConfig
    from vigil.runtime.hooks import Hook
    from vigil.runtime.server import Runtime
    from vigil.wire.protocol import Message, encode

    class Capture(Hook):
        name = "capture"
        last: tuple | None = None

        def on_decision(self, session, obs, decision) -> None:
            self.last = (session, obs, decision)

    folder.mkdir(parents=True, exist_ok=True)
    ctx = zmq.Context()
    config = ServeConfig(bundle=str(bundle), robot_endpoint=f"inproc://tick-{mode}",
                         operator_endpoint=f"inproc://ops-{mode}", store=str(folder / "alerts.db"),
                         deadline_ms=1000.0, link_timeout_s=3600.0,
                         record=str(folder / "rec") if mode == "record" else "")
    capture = Capture()
    runtime = Runtime(config, ctx=ctx, hooks=[capture])
    link = RobotLink(f"inproc://tick-{mode}", "bench", ctx)
    feed = Feed(kind)

    def roundtrip(frames: list) -> float:
        link.sock.send_multipart(frames)
        t = time.perf_counter()
        runtime.serve_ready()
        dt = time.perf_counter() - t
        link.sock.recv_multipart()
        return dt

    link.connect()
    manifest = runtime.manifest
    link.send(Message("hello", "bench", 1, 0, {}, {"spec": {
        "observation": [s.to_dict() for s in manifest.observation], "action": manifest.action.to_dict()}}))
    runtime.serve_ready()
    link.recv(1.0)
    roundtrip(encode(Message("reset", "bench", 2, 0, {}, feed.reset_info())))
    obs = feed.reset()
    lat = []
    for i in range(ticks):
        lat.append(roundtrip(encode(Message("obs", "bench", 3 + i, 0, obs))) * 1e6)
        obs = feed.obs() if kind == "flow" else feed.reset() if i % 500 == 499 else obs
    per_call = None
    if mode == "record":
        hook = next(h for h in runtime.hooks.hooks if h.name == "record")
        session, msg, decision = capture.last
        hook.writer.layout = None  # these calls measure the loop's side only: the writer drops what they queue
        batches = []
        for _ in range(20):  # the median of 20 batches: a batch the machine's other work interrupted is left out
            t = time.perf_counter()
            for _ in range(calls // 20):
                hook.on_decision(session, msg, decision)
            batches.append((time.perf_counter() - t) / (calls // 20) * 1e9)
        per_call = float(np.median(batches))
    runtime.close()
    link.close()
    ctx.term()
    return lat[ticks // 10:], per_call


# -- 2. a runtime process and a robot at 100 Hz --------------------------------------------------------------


def window(bundle: Path, kind: str, workdir: Path, record: bool, seconds: float) -> dict[str, Any]:
    from vigil.policies.manifest import read_manifest
    from vigil.runtime.client import RobotLink
    from vigil.runtime.launch import start_serve

    rec = workdir / "rec"
    flags: dict[str, Any] = {"deadline_ms": 1000.0, "telemetry_s": 1.0}
    if record:
        flags["record"] = str(rec)
    served = start_serve(bundle, workdir, env={"OMP_NUM_THREADS": "1"}, **flags)
    manifest = read_manifest(bundle)
    feed = Feed(kind)
    link = RobotLink(served.robot_endpoint, "robot-0")
    try:
        hello(link, manifest)
        period, warmup = 1.0 / RATE_HZ, 2.0
        link.reset(**feed.reset_info())
        obs = feed.reset()
        t0 = time.perf_counter()
        next_t, next_reset = t0, t0 + EPISODE_S
        measuring, ticks, lat, cpu0, start = False, 0, [], {}, 0.0
        while True:
            now = time.perf_counter()
            if not measuring and now - t0 >= warmup:
                measuring, cpu0, start = True, task_cpu_ns(served.proc.pid), now
            if measuring and now - start >= seconds:
                break
            if now >= next_reset:
                link.reset(**feed.reset_info())
                obs, next_reset = feed.reset(), now + EPISODE_S
            reply = link.step(obs, 1.0)
            obs = feed.step(reply.action)
            if measuring:
                ticks += 1
                if reply.latency_s is not None:
                    lat.append(reply.latency_s * 1e6)
            next_t += period
            if (sleep := next_t - time.perf_counter()) > 0:
                time.sleep(sleep)
        cpu1 = task_cpu_ns(served.proc.pid)
        elapsed = time.perf_counter() - start
        link.bye()
    finally:
        link.close()
    counters = served.stop()
    pid = served.proc.pid
    total = sum(cpu1.get(t, 0) - c for t, c in cpu0.items()) + sum(c for t, c in cpu1.items() if t not in cpu0)
    loop = cpu1.get(pid, 0) - cpu0.get(pid, 0)
    files = sorted(rec.rglob("*.mcap")) if record else []
    return {"record": record, "ticks": ticks, "window_s": elapsed, "cpu_us_per_tick": total / ticks / 1e3,
            "loop_cpu_us_per_tick": loop / ticks / 1e3, "latency_p50_us": float(np.median(lat)),
            "latency_p99_us": float(np.percentile(lat, 99)), "all_ticks": counters.get("ticks", 0),
            "record_ticks": counters.get("record_ticks", 0), "record_dropped": counters.get("record_dropped", 0),
            "files": len(files), "bytes": sum(f.stat().st_size for f in files)}


def flow_bundle(given: str | None) -> Path | None:
    """--flow-bundle, else bench-rtc's ensemble, else the demo's shipped one (sim/assets/mt10) with its encoder
    unpacked into bench-runs/record (needs vigil[train] to export the encoder once)."""
    if given:
        return Path(given).resolve()
    found = next((p for p in FLOW_CANDIDATES if (p / "manifest.json").exists()), None)
    if found is None:
        try:
            from vigil.sim.demo import prepare

            work = BENCH_RUNS / "record"
            work.mkdir(parents=True, exist_ok=True)
            run0, _, _ = prepare(work, work / "prepare.log")
            found = run0 / "bundle"
        except Exception as exc:  # noqa: BLE001 - the flow row is optional: say why it is missing
            print(f"no flow ensemble: {exc}", flush=True)
    return found


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from vigil.training.lqr import export_lqr

    data: dict[str, Any] = {"run": run_info(env="OMP_NUM_THREADS=1"), "rate_hz": RATE_HZ, "episode_s": EPISODE_S,
                            "window_s": args.seconds, "rounds": args.rounds, "bundles": {}}
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="vigil-bench-record-") as tmp:
        work = Path(tmp)
        bundles = {"lqr": work / "lqr"}
        export_lqr("aircraft-pitch", bundles["lqr"])
        flow = flow_bundle(args.flow_bundle)
        if flow is not None:
            bundles["flow"] = flow
        for kind, bundle in bundles.items():
            print(f"{kind}: in process", flush=True)
            entry: dict[str, Any] = {"bundle": str(bundle), "in_process": in_process(bundle, kind, work, args.ticks,
                                                                                       args.calls), "windows": []}
            for r in range(args.rounds):
                for record in (False, True):
                    print(f"{kind}: round {r + 1}, {'record' if record else 'baseline'}", flush=True)
                    entry["windows"].append(window(bundle, kind, work / f"{kind}-{r}-{int(record)}", record,
                                                   args.seconds))
            data["bundles"][kind] = entry
    data["seconds"] = time.monotonic() - t_start
    return data


# -- the section --------------------------------------------------------------------------------------------


def summarise(entry: dict[str, Any]) -> dict[str, Any]:
    base = [w for w in entry["windows"] if not w["record"]]
    rec = [w for w in entry["windows"] if w["record"]]

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return float(np.mean([w[key] for w in rows]))

    ticks = sum(w["ticks"] for w in rec)
    per_tick = sum(w["bytes"] for w in rec) / max(1, sum(w["record_ticks"] for w in rec))
    return {k: (mean(base, k), mean(rec, k)) for k in ("cpu_us_per_tick", "loop_cpu_us_per_tick", "latency_p50_us",
                                                       "latency_p99_us")} | {
        "bytes_per_tick": per_tick, "mb_per_hour": per_tick * RATE_HZ * 3600 / 2**20, "ticks": ticks,
        "dropped": sum(w["record_dropped"] for w in rec)}


def render(data: dict[str, Any]) -> str:
    run = data["run"]
    about = {"lqr": "aircraft-pitch LQR (linear_gain; 3 floats in, 1 out; the simulated system)",
             "flow": "flow ensemble (39 floats in, action chunks of 4-D actions, VFD per plan; random states)"}
    lines = ["## Recording cost (`vigil serve --record`)", "",
             written_by(run, seconds=data.get("seconds")) + " The machine is a shared 2-core KVM guest: "
             "absolute CPU figures are noisy; the ratios are of windows measured alternately in the same run.", "",
             f"One robot at {data['rate_hz']:g} Hz (lockstep, paced), a new episode (so a new file) every "
             f"{data['episode_s']:g} s; {data['rounds']} x {data['window_s']:g} s windows with `--record` and as "
             "many without, alternating. CPU is the runtime process's time on a CPU (schedstat), all threads "
             "(writer, ZeroMQ and store threads included) and the loop's thread alone.", "",
             "| bundle | hook `on_decision` (loop thread) | hot tick p50 without / with | CPU per tick, all threads "
             "without / with (ratio) | loop thread CPU per tick without / with (ratio) | reply p50 / p99 without | "
             "with | file size per tick | per hour of robot time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind, entry in data["bundles"].items():
        s, ip = summarise(entry), entry["in_process"]
        cpu, loop, p50, p99 = (s[k] for k in ("cpu_us_per_tick", "loop_cpu_us_per_tick", "latency_p50_us",
                                              "latency_p99_us"))
        lines.append(
            f"| {about.get(kind, kind)} | {ip['record']['on_decision_ns']:.0f} ns | "
            f"{ip['baseline']['tick_p50_us']:.0f} / {ip['record']['tick_p50_us']:.0f} µs | "
            f"{cpu[0]:.0f} / {cpu[1]:.0f} µs ({cpu[1] / cpu[0]:.2f}) | "
            f"{loop[0]:.0f} / {loop[1]:.0f} µs ({loop[1] / loop[0]:.2f}) | "
            f"{p50[0]:.0f} / {p99[0]:.0f} µs | {p50[1]:.0f} / {p99[1]:.0f} µs | "
            f"{s['bytes_per_tick']:.0f} B | {s['mb_per_hour']:.0f} MB |")
    drops = {k: summarise(e)["dropped"] for k, e in data["bundles"].items()}
    lines += ["", f"Events dropped by the recorder (queue full or a failed disk) during the windows: {drops}.", "",
              "Reading: the loop's thread pays for a recording only the queue append in `on_decision` (well under a "
              "microsecond); everything else -- building the Foxglove messages, protobuf encoding, zstd, the "
              "file -- is the writer thread's, and shows in the all-threads column. The loop-thread column also "
              "moves with the machine's load between windows and with the GIL the writer holds while it "
              "encodes; the file size is for these messages at a 1 s flush (smaller chunks compress less)."]
    if "flow" not in data["bundles"]:
        lines += ["", "No flow ensemble bundle was found (--flow-bundle, bench-runs/rtc, or the demo's shipped one), "
                  "so only the linear_gain row was measured."]
    return section(NAME, lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0, help="length of each measured window")
    ap.add_argument("--rounds", type=int, default=2, help="windows with and without --record, alternating")
    ap.add_argument("--ticks", type=int, default=2000, help="in-process ticks per run")
    ap.add_argument("--calls", type=int, default=20000, help="in-process on_decision calls")
    ap.add_argument("--flow-bundle", help="a flow_ensemble bundle (default: the RTC bench's h8-base, if present)")
    ap.add_argument("--report-only", action="store_true", help="rewrite the section from bench/out/record.json")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    data = read_raw(RAW) if args.report_only else raw_copy(measure(args))
    if not args.report_only:
        write_raw(RAW, data)
    text = render(data)
    print(text)
    if not args.no_write:
        write_benchmarks(text, BEGIN, END)


if __name__ == "__main__":
    main()
