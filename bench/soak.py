"""Soak test (issue 8, deliverable 4): 10 simulated robots at 100 Hz against one `vigil serve` for 10^6 ticks.

One `vigil serve` child process (realtime mode, deadline 10 ms = one control period) serves a `gaussian`
bundle: the 256x256 MLP actor of training/rl.py for Hopper-v5's shapes (11-dim state, 3-dim action),
freshly initialised -- the weights are random, which does not change the cost of a tick (the same graph,
the same number of multiply-adds). Ten robots, each its own process with its own clock (100 Hz give or take
up to 100 ppm, a random phase), send a Hopper-shaped random-walk observation every period, wait for the
action up to the deadline, and record each round trip. Meanwhile this process watches the operator stream
(telemetry) and samples the runtime's RSS (/proc/PID/status VmRSS) and CPU time (/proc/PID/stat).

Then the cost of CURVE encryption on the round trip: a lockstep ping-pong (one robot, no pacing) against a
runtime without authentication and one with it (`vigil keys`, `--curve-secret/--curve-allow`), interleaved
in blocks, side by side.

The robots drive the runtime through the reference driver, `RobotLink.step`, and record every tick on which
they had no usable action by the deadline (or got the runtime's safe action for a `deadline` verdict) with its
times; each such miss is put down to a cause (`classify_miss`: late_send, queueing, runtime, lost, shutdown).

Measurement and report are separate: the raw results go to bench/out/soak.json and, one JSON object per miss,
bench/out/soak_misses.jsonl; the section between the `soak` markers of RELIABILITY.md, and
docs/figures/soak_latency.png and docs/figures/soak_rss.png, are rendered from them (`render_file`,
`--report-only`, which measures nothing).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.soak                          # make bench-soak (~17 min)
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.soak --ticks 3000 --curve-trips 2000 --no-write   # smoke
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.soak --report-only           # the report again, from bench/out
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"
RAW = ROOT / "bench" / "out" / "soak.json"
MISSES = RAW.with_name("soak_misses.jsonl")  # every robot-side miss, one JSON object per line
RELIABILITY = ROOT / "RELIABILITY.md"
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
INTRO = ("# Reliability\n\nHow vigil holds up over long runs, under load and under faults. Measured, not estimated: "
         "each section below is written by the script it names and rewritten whenever that script runs; the raw "
         "data is in bench/out/ and the figures in docs/figures/.\n\n")
VIGIL = [sys.executable, "-m", "vigil.runtime.cli"]
OBS_DIM, ACT_DIM, ENV_ID = 11, 3, "Hopper-v5"

# per-tick flags recorded by the robots
MISS = 1       # no action within the deadline (late or never)
DEADLINE = 2   # the runtime's deadline monitor said stop (safe action, verdict "deadline")
SAFE = 4       # the runtime sent its safe action (any monitor)
NEVER = 8      # no reply to this observation at all while the robot waited


# -- helpers -----------------------------------------------------------------------------------------

def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB), Threads and context switches of a process, from /proc/PID/status."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads", "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def system_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return float(sum(vals) - idle), float(sum(vals))


def other_heavy() -> list[str]:
    """Command lines of other bench/training processes on this machine (for the honesty note)."""
    try:
        out = subprocess.run(["pgrep", "-af", r"bench/|vigil train|pytest"], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    me = str(os.getpid())
    return sorted({" ".join(line.split()[1:])[:120] for line in out.splitlines()
                   if line and line.split()[0] != me and "soak.py" not in line and "pgrep" not in line})


def percentiles(x: np.ndarray) -> dict[str, float]:
    if len(x) == 0:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "p999": float("nan"), "max": float("nan")}
    p50, p99, p999 = np.percentile(x, [50, 99, 99.9])
    return {"n": int(len(x)), "p50": float(p50), "p99": float(p99), "p999": float(p999), "max": float(x.max()),
            "mean": float(x.mean())}


def export_bundle(folder: Path, seed: int, rate_hz: float) -> dict[str, Any]:
    """A `gaussian` bundle from a freshly initialised actor of training/rl.py (RLConfig's 256x256 MLP) with
    Hopper-v5's shapes and action bounds, exported as training/rl.py's export_actor does."""
    import torch

    from vigil.training.export import export_gaussian, provenance
    from vigil.training.rl import Actor, RLConfig

    cfg = RLConfig(env=ENV_ID, seed=seed)
    obs_dim, low, high = OBS_DIM, [-1.0] * ACT_DIM, [1.0] * ACT_DIM
    try:
        import gymnasium as gym

        env = gym.make(ENV_ID)
        obs_dim = int(np.prod(env.observation_space.shape))
        low, high = env.action_space.low.tolist(), env.action_space.high.tolist()
        env.close()
    except Exception:  # no MuJoCo: Hopper-v5's shapes are known
        pass
    torch.manual_seed(seed)
    actor = Actor(obs_dim, len(low), cfg.hidden)
    params = sum(p.numel() for p in actor.net.parameters())
    export_gaussian(folder, f"soak-random-{ENV_ID}-s{seed}", actor, obs_dim, low, high, rate_hz,
                    obs_mean=np.zeros(obs_dim), obs_std=np.ones(obs_dim),
                    prov=provenance(bench="soak", weights=f"random initialisation (torch seed {seed}), not trained"))
    return {"obs_dim": obs_dim, "act_dim": len(low), "hidden": cfg.hidden, "parameters": int(params)}


def start_serve(bundle: Path, workdir: Path, name: str, extra: Sequence[str]) -> tuple[Any, str, str]:
    """`vigil serve` with `extra` flags (runtime/launch.py: free ports, waits for the ready line); returns the
    Served handle and its robot and operator endpoints."""
    from vigil.runtime.launch import start_serve as launch

    flags = dict(zip([a.lstrip("-").replace("-", "_") for a in extra[::2]], extra[1::2]))
    served = launch(bundle, workdir / name, store=str(workdir / f"{name}.db"), log_level="WARNING",
                    env={"OMP_NUM_THREADS": "1"}, **flags)
    return served, served.robot_endpoint, served.operator_endpoint


def stop_serve(served: Any, workdir: Path, name: str) -> dict[str, Any]:
    """SIGINT and the runtime's counters (its `stopped` line); {} if it had to be killed."""
    from vigil.runtime.launch import LaunchError

    try:
        return served.stop(timeout_s=30)
    except LaunchError as exc:
        served.kill()
        return {"unparsed": str(exc)[-500:]}


# -- the robot (one process each) ----------------------------------------------------------------------

def robot_main(i: int, endpoint: str, ticks: int, rate_hz: float, ppm: float, phase_s: float, deadline_s: float,
               stop_after_s: float, seed: int, out: str, ready, go, start, progress) -> None:
    """A realtime robot with its own clock: an observation every period (scheduled on absolute times, so
    it does not drift), its action awaited up to the deadline by `RobotLink.step` (the driver's contract:
    seq matching, safe fallback), every round trip recorded, and every miss with the numbers that explain it."""
    from vigil.runtime.client import RobotLink
    from vigil.wire.protocol import ArraySpec

    robot = f"soak-{i}"
    link = RobotLink(endpoint, robot)
    link.hello((ArraySpec("state", "float32", (OBS_DIM,)),), ArraySpec("action", "float32", (ACT_DIM,)),
               timeout_s=30, env="soak-random-walk")
    rng = np.random.default_rng(seed)
    x = np.zeros(OBS_DIM)
    t_send = np.full(ticks, np.nan)        # seconds since the common start, on CLOCK_MONOTONIC
    lat_us = np.full(ticks, np.nan, np.float32)
    infer_us = np.full(ticks, np.nan, np.float32)
    late_us = np.zeros(ticks, np.float32)  # how late the robot itself sent, against its schedule
    flags = np.zeros(ticks, np.uint8)
    counts = {"errors": 0, "slips": 0}
    verdicts: dict[str, int] = {}
    deadline_reasons: list[str] = []
    misses: list[dict[str, Any]] = []      # every tick without a usable action in time (see classify_miss)
    awaiting: dict[int, dict[str, Any]] = {}  # misses by seq, until their late answer (if any) comes
    ready.set()
    while not go.wait(0.02):  # heartbeats while the others connect, so the runtime does not declare the link lost
        link.heartbeat_if_idle()
    t0 = start.value
    period = 1.0 / (rate_hz * (1 + ppm * 1e-6))
    next_t = t0 + phase_s
    stop_at = t0 + stop_after_s if stop_after_s > 0 else math.inf
    mono, perf, sleep = time.monotonic, time.perf_counter, time.sleep
    deadline_us = deadline_s * 1e6
    k = 0
    try:
        while k < ticks:
            now = mono()
            if now >= stop_at:
                break
            if next_t > now:
                sleep(next_t - now)
            elif now - next_t > period:  # stalled for more than a period: skip the missed slots
                counts["slips"] += 1
                next_t = now
            x = 0.99 * x + 0.1 * rng.standard_normal(OBS_DIM)
            sent_at, wall, w0 = mono(), time.time(), perf()
            reply = link.step({"state": x.astype(np.float32)}, deadline_s)
            wait_us = (perf() - w0) * 1e6
            t_send[k] = sent_at - t0
            late_us[k] = (sent_at - next_t) * 1e6
            for late in reply.late:  # a missed tick's answer, after its deadline: now we know how late
                if (miss := awaiting.pop(late.seq, None)) is not None:
                    miss.update(answer_numbers(late.message.meta, late.latency_s), answer="late")
            deadline_reason = None
            if reply.fallback is None:
                lat_us[k] = reply.latency_s * 1e6
                infer_us[k] = float(reply.meta.get("infer_us", np.nan))
                if reply.safe:
                    flags[k] |= SAFE
                for monitor, level, reason in reply.verdicts:
                    key = f"{monitor}.{level}"
                    verdicts[key] = verdicts.get(key, 0) + 1
                    if monitor == "deadline":
                        flags[k] |= DEADLINE
                        deadline_reason = reason
                        if len(deadline_reasons) < 50:
                            deadline_reasons.append(f"t={t_send[k]:.1f}s: {reason}")
            else:
                flags[k] |= MISS | (NEVER if reply.message is None else 0)
                counts["errors"] += reply.message is not None and reply.message.kind == "error"
            if reply.fallback is not None or deadline_reason is not None:
                miss = {"robot": robot, "tick": k, "seq": reply.seq, "t": float(t_send[k]), "wall": wall,
                        "late_send_us": float(late_us[k]), "wait_us": wait_us, "overshoot_us": wait_us - deadline_us,
                        "fallback": reply.fallback, "deadline_verdict": deadline_reason,
                        "answer": "in time" if reply.message is not None else "never",
                        **answer_numbers(reply.meta, reply.latency_s)}
                misses.append(miss)
                if reply.message is None:
                    awaiting[reply.seq] = miss
            k += 1
            next_t += period
            if k % 20 == 0:
                progress[i] = k
    finally:
        progress[i] = k
        t_end = mono() - t0
        link.bye()
        np.savez(out, t_send=t_send[:k], lat_us=lat_us[:k], infer_us=infer_us[:k], late_us=late_us[:k],
                 flags=flags[:k])
        Path(out + ".json").write_text(json.dumps({
            "robot": robot, "ticks": k, "rate_hz": rate_hz * (1 + ppm * 1e-6), "ppm": ppm, "phase_ms": phase_s * 1e3,
            "t_end": t_end, **counts, "late_arrivals": link.late, "link_lost": link.link_lost, "unsent": link.unsent,
            "runtime_bye": link.runtime_bye, "verdicts": verdicts, "deadline_reasons": deadline_reasons,
            "misses": misses}))


def answer_numbers(meta: Any, latency_s: float | None) -> dict[str, Any]:
    """What an answer says about its own lateness: the round trip as the robot saw it, and the runtime's own
    times when it reports them (`queue_us`: waiting before the runtime read it; `decide_us`, `infer_us`)."""
    out: dict[str, Any] = {"rtt_us": None if latency_s is None else latency_s * 1e6}
    for key in ("queue_us", "decide_us", "infer_us"):
        out[key] = float(meta[key]) if key in meta else None
    for monitor, _, reason in meta.get("verdicts", ()):
        if monitor == "deadline":
            out["deadline_verdict"] = reason
    return out


# -- why a robot missed: the classification of every miss ---------------------------------------------

CAUSES = {
    "late_send": "the load generator itself was late: the robot process sent more than a quarter of the deadline "
                 "after its schedule, or woke that much after its deadline (it was descheduled)",
    "queueing": "the answer came, late, and the time went before the runtime's decision: the runtime's `queue_us` "
                "(time before it read the observation) when it reports it, else the round trip minus the "
                "decision (`decide_us` or `infer_us`), marked *inferred*",
    "runtime": "the runtime's decision took the time (`decide_us`/`infer_us` the larger part), or it said so "
               "itself (a `deadline` verdict), or it answered with an error",
    "lost": "no answer at all while the robot waited and none later (dropped as stale, or lost)",
    "shutdown": "the last ticks while the run stops: in flight when the first robot finished, or after the "
                "runtime's `bye`",
}
LATE_FRACTION = 0.25  # of the deadline: a robot that loses this much itself is "late_send"


def classify_miss(miss: dict[str, Any], deadline_us: float, t_stop: float) -> tuple[str, str]:
    """(cause, basis): which of CAUSES explains a miss, and the numbers that say so. First match wins."""
    slack = LATE_FRACTION * deadline_us
    if miss.get("fallback") == "bye":
        return "shutdown", "the runtime had said bye"
    if miss["t"] + deadline_us / 1e6 >= t_stop:
        return "shutdown", f"in flight at {t_stop:.2f} s, when the first robot finished"
    if miss["late_send_us"] > slack:
        return "late_send", f"sent {miss['late_send_us'] / 1e3:.1f} ms after its schedule"
    if miss.get("fallback") is not None and miss["overshoot_us"] > slack:
        return "late_send", f"woke {miss['overshoot_us'] / 1e3:.1f} ms after its deadline"
    if miss.get("deadline_verdict"):
        return "runtime", f"`deadline` verdict: {miss['deadline_verdict']}"
    if str(miss.get("fallback")).startswith("error:"):
        return "runtime", f"error answer ({miss['fallback'][6:]})"
    rtt = miss.get("rtt_us")
    if rtt is None:
        return "lost", "no answer" + (" (never sent: no connection)" if miss.get("fallback") == "unsent" else "")
    decide = miss.get("decide_us") if miss.get("decide_us") is not None else miss.get("infer_us") or 0.0
    queue = miss.get("queue_us")
    if queue is not None:
        if queue >= decide:
            return "queueing", f"queue_us {queue:.0f} ≥ decision {decide:.0f} of a {rtt:.0f} µs round trip"
        return "runtime", f"decision {decide:.0f} > queue_us {queue:.0f} of a {rtt:.0f} µs round trip"
    if decide >= rtt - decide:
        return "runtime", f"decision {decide:.0f} of a {rtt:.0f} µs round trip"
    return "queueing", f"inferred: {rtt - decide:.0f} of a {rtt:.0f} µs round trip outside the decision (no queue_us)"


def classified_misses(robots: list[dict[str, Any]], deadline_ms: float) -> list[dict[str, Any]]:
    """Every robot's misses, in time order, each with its cause and basis."""
    t_stop = min((r["t_end"] for r in robots), default=math.inf)
    out = []
    for r in robots:
        for miss in r["misses"]:
            cause, basis = classify_miss(miss, deadline_ms * 1e3, t_stop)
            out.append({**miss, "cause": cause, "basis": basis})
    return sorted(out, key=lambda m: m["t"])


# -- the soak -----------------------------------------------------------------------------------------

def soak(args: argparse.Namespace, bundle: Path, workdir: Path) -> dict[str, Any]:
    import zmq
    from tqdm import tqdm

    from vigil.runtime.stream import subscribe
    from vigil.wire.protocol import STREAM_KINDS, decode

    proc, robot_ep, op_ep = start_serve(bundle, workdir, "soak", [
        "--mode", "realtime", "--deadline-ms", f"{args.deadline_ms:g}", "--telemetry-s", f"{args.telemetry_s:g}"])
    sub = subscribe(zmq.Context.instance(), op_ep)
    telemetry: list[dict] = []
    events: list[dict] = []
    alerts: list[dict] = []

    def pump(timeout_ms: int) -> bool:
        if not sub.poll(timeout_ms):
            return False
        frames = sub.recv_multipart()
        msg = decode(frames[1:], kinds=STREAM_KINDS)
        topic, meta = frames[0].decode(), dict(msg.meta)
        t = time.monotonic()  # absolute here; made relative to the start below
        if topic == "telemetry" and "event" in meta:
            events.append({"t": t, "robot": msg.robot, **meta})
        elif topic == "telemetry":
            robots = meta.get("robots", {})
            p99 = [r["p99_us"] for r in robots.values() if r.get("ticks")]
            p50 = [r["p50_us"] for r in robots.values() if r.get("ticks")]
            telemetry.append({"t": t, "counters": meta.get("counters", {}),
                              "safe": int(sum(r.get("safe", 0) for r in robots.values())),
                              "robot_ticks": int(sum(r.get("ticks", 0) for r in robots.values())),
                              "p99_us_max": max(p99) if p99 else None,
                              "p50_us_median": float(np.median(p50)) if p50 else None})
        elif topic.startswith("alert."):
            alerts.append({"t": t, "robot": msg.robot, "monitor": meta.get("monitor"), "level": meta.get("level"),
                           "reason": str(meta.get("reason", ""))[:200]})
        return True

    n = args.robots
    per_robot = math.ceil(args.ticks / n)
    rng = np.random.default_rng(args.seed)
    ppms = rng.uniform(-args.clock_ppm, args.clock_ppm, n)
    phases = rng.uniform(0, 1.0 / args.rate, n)
    ctx = mp.get_context("spawn")
    ready = [ctx.Event() for _ in range(n)]
    go = ctx.Event()
    start = ctx.Value("d", 0.0, lock=False)
    progress = ctx.RawArray("q", n)
    robots = []
    rss: list[dict] = []
    busy0 = system_busy()
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    try:
        deadline = time.monotonic() + 60
        while not telemetry:  # the runtime is up and we are subscribed
            if not proc.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"vigil serve did not start: {proc.log()[-2000:]}")
            pump(200)
        for i in range(n):
            p = ctx.Process(target=robot_main, name=f"soak-robot-{i}", args=(
                i, robot_ep, per_robot, args.rate, float(ppms[i]), float(phases[i]), args.deadline_ms / 1e3,
                args.duration_s, args.seed * 1000 + i, str(workdir / f"robot{i}"), ready[i], go, start, progress))
            p.start()
            robots.append(p)
        deadline = time.monotonic() + 120
        for i, e in enumerate(ready):
            while not e.wait(0.2):
                pump(0)
                if not robots[i].is_alive() or time.monotonic() > deadline:
                    raise RuntimeError(f"robot {i} did not connect")
        while pump(0):
            pass
        t0 = time.monotonic() + 0.2  # well within the link timeout after the robots' last heartbeat
        start.value = t0
        go.set()
        pid, cpu0 = proc.proc.pid, proc_cpu_s(proc.proc.pid)
        rss.append({"t": 0.0, "ticks": 0, "cpu_s": 0.0, **proc_status(pid)})
        next_sample = t0 + args.rss_every_s
        bar = tqdm(total=per_robot * n, unit="tick", unit_scale=True, smoothing=0.05, disable=args.no_progress,
                   desc=f"soak {n}x{args.rate:g} Hz")
        done = 0
        while any(p.is_alive() for p in robots):
            pump(100)
            now = time.monotonic()
            total = int(sum(progress))
            if total > done:
                bar.update(total - done)
                done = total
            if now >= next_sample:
                next_sample += args.rss_every_s
                rss.append({"t": now - t0, "ticks": total, "cpu_s": proc_cpu_s(pid) - cpu0, **proc_status(pid)})
                if telemetry:
                    bar.set_postfix_str(f"RSS {rss[-1].get('VmRSS', 0) / 1024:.1f} MB, runtime p99 "
                                        f"{(telemetry[-1]['p99_us_max'] or 0):.0f} us", refresh=False)
        bar.close()
        wall = time.monotonic() - t0
        total = int(sum(progress))
        rss.append({"t": wall, "ticks": total, "cpu_s": proc_cpu_s(pid) - cpu0, **proc_status(pid)})
        end = time.monotonic() + 5
        while sum(e.get("event") == "disconnected" for e in events) < n and time.monotonic() < end:
            pump(200)
        while pump(100):
            pass
    finally:
        go.set()  # robots that are still waiting must not hang
        for p in robots:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
        counters = stop_serve(proc, workdir, "soak")
        sub.close(linger=0)
    busy1 = system_busy()
    for series in (telemetry, events, alerts):
        for e in series:
            e["t"] -= t0
    exitcodes = [p.exitcode for p in robots]
    if any(c != 0 for c in exitcodes):
        raise RuntimeError(f"robot processes failed: exit codes {exitcodes}")
    per = [json.loads(Path(str(workdir / f"robot{i}") + ".json").read_text()) for i in range(n)]
    arrays = [dict(np.load(workdir / f"robot{i}.npz")) for i in range(n)]
    return {"robots": per, "arrays": arrays, "telemetry": telemetry, "events": events, "alerts": alerts, "rss": rss,
            "counters": counters, "wall_s": wall, "per_robot": per_robot,
            "system_busy": (busy1[0] - busy0[0]) / max(1.0, busy1[1] - busy0[1]),
            "load_start": load_start, "load_end": Path("/proc/loadavg").read_text().split()[:3],
            "serve_stderr": proc.err.read_text()[-3000:]}


# -- CURVE: the cost of encryption on the round trip ---------------------------------------------------

def curve_available() -> str | None:
    """None when `vigil keys`, `--curve-secret/--curve-allow` and `RobotLink(..., keys=)` all exist; else why not."""
    import inspect

    try:
        from vigil.runtime.auth import ClientKeys  # noqa: F401
        from vigil.runtime.client import RobotLink
    except ImportError as exc:
        return f"vigil.runtime.auth is not importable ({exc})"
    if "keys" not in inspect.signature(RobotLink).parameters:
        return "RobotLink takes no keys= argument"
    for cmd in (["keys", "--help"], ["serve", "--help"]):
        r = subprocess.run([*VIGIL, *cmd], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            return f"`vigil {' '.join(cmd)}` failed: {r.stderr.strip()[-300:]}"
        if cmd[0] == "serve" and ("--curve-secret" not in r.stdout or "--curve-allow" not in r.stdout):
            return "`vigil serve` has no --curve-secret/--curve-allow"
    return None


def curve_cost(args: argparse.Namespace, bundle: Path, workdir: Path) -> dict[str, Any]:
    """Lockstep ping-pong, one robot, against a plain runtime and an authenticating one (both running), in
    interleaved blocks so that both see the same background load."""
    from tqdm import tqdm

    why = curve_available()
    if why is not None:
        return {"skipped": why}
    from vigil.runtime.auth import ClientKeys
    from vigil.runtime.client import RobotLink
    from vigil.wire.protocol import ArraySpec

    keys_dir = workdir / "keys"
    for name, folder in (("robot", keys_dir / "clients"), ("runtime", keys_dir / "server")):
        r = subprocess.run([*VIGIL, "keys", name, "--dir", str(folder)], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            return {"skipped": f"`vigil keys {name}` failed: {r.stderr.strip()[-300:]}"}
    common = ["--link-timeout-s", "60"]  # the idle one must not declare its robot lost between blocks
    plain, plain_ep, _ = start_serve(bundle, workdir, "plain", common)
    auth, auth_ep, _ = start_serve(bundle, workdir, "curve", [
        *common, "--curve-secret", str(keys_dir / "server" / "runtime.key_secret"),
        "--curve-allow", str(keys_dir / "clients")])
    obs_spec, act_spec = (ArraySpec("state", "float32", (OBS_DIM,)),), ArraySpec("action", "float32", (ACT_DIM,))
    links = {}
    try:
        keys = ClientKeys.load(keys_dir / "clients" / "robot.key_secret", keys_dir / "server" / "runtime.key")
        links["plain"] = RobotLink(plain_ep, "pingpong-plain")
        links["curve"] = RobotLink(auth_ep, "pingpong-curve", keys=keys)
        for link in links.values():
            link.hello(obs_spec, act_spec, timeout_s=30, env="soak-pingpong")
        rng = np.random.default_rng(args.seed)
        obs = {"state": rng.standard_normal(OBS_DIM).astype(np.float32)}
        for link in links.values():  # warm-up
            for _ in range(args.curve_warmup):
                link.act(obs)
        lat = {"plain": [], "curve": []}
        blocks = max(1, args.curve_trips // args.curve_block)
        skip = min(20, args.curve_block // 10)  # the first round trips after switching runtimes are not timed
        perf = time.perf_counter
        with tqdm(total=2 * blocks * args.curve_block, unit="trip", unit_scale=True, disable=args.no_progress,
                  desc="CURVE ping-pong") as bar:
            for b in range(blocks):
                for name in (("plain", "curve") if b % 2 == 0 else ("curve", "plain")):
                    link, out = links[name], lat[name]
                    for j in range(args.curve_block):
                        t = perf()
                        reply = link.act(obs)
                        dt = perf() - t
                        if reply.kind != "act":
                            raise RuntimeError(f"{name}: {reply.kind} {reply.meta}")
                        if j >= skip:
                            out.append(dt * 1e6)
                    bar.update(args.curve_block)
        for link in links.values():
            link.bye()
    finally:
        for link in links.values():
            link.close()
        counters = {"plain": stop_serve(plain, workdir, "plain"), "curve": stop_serve(auth, workdir, "curve")}
    res = {name: percentiles(np.asarray(v)) for name, v in lat.items()}
    res["ratio"] = {k: res["curve"][k] / res["plain"][k] for k in ("p50", "p99", "p999", "mean")}
    res["extra_us"] = {k: res["curve"][k] - res["plain"][k] for k in ("p50", "p99", "p999", "mean")}
    res["blocks"], res["block"], res["untimed_per_block"] = blocks, args.curve_block, skip
    res["counters"] = counters
    return res


def curve_refuses_unkeyed(bundle: Path, workdir: Path) -> bool | None:
    """True when a robot without keys gets no hello reply from an authenticating runtime."""
    from vigil.runtime.client import LinkError, RobotLink
    from vigil.wire.protocol import ArraySpec

    keys_dir = workdir / "keys"
    if not (keys_dir / "server" / "runtime.key_secret").exists():
        return None
    proc, ep, _ = start_serve(bundle, workdir, "curve-check", [
        "--curve-secret", str(keys_dir / "server" / "runtime.key_secret"), "--curve-allow", str(keys_dir / "clients")])
    try:
        link = RobotLink(ep, "no-keys")
        try:
            link.hello((ArraySpec("state", "float32", (OBS_DIM,)),), ArraySpec("action", "float32", (ACT_DIM,)),
                       timeout_s=1.5)
            return False
        except LinkError:
            return True
        finally:
            link.close()
    finally:
        stop_serve(proc, workdir, "curve-check")


# -- analysis ---------------------------------------------------------------------------------------------

def analyse(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    arrs = run["arrays"]
    t = np.concatenate([a["t_send"] for a in arrs])
    lat = np.concatenate([a["lat_us"] for a in arrs])
    flags = np.concatenate([a["flags"] for a in arrs])
    infer = np.concatenate([a["infer_us"] for a in arrs])
    late = np.concatenate([a["late_us"] for a in arrs])
    got = ~np.isnan(lat)
    ticks = int(len(t))
    minutes = []
    bin_s = args.bin_s
    for m in range(int(np.nanmax(t) // bin_s) + 1 if ticks else 0):
        sel = (t >= m * bin_s) & (t < (m + 1) * bin_s)
        row = percentiles(lat[sel & got])
        row.update({"minute": m, "ticks": int(sel.sum()), "robot_misses": int((flags[sel] & MISS > 0).sum()),
                    "no_reply": int((flags[sel] & NEVER > 0).sum()),
                    "runtime_deadline": int((flags[sel] & DEADLINE > 0).sum()),
                    "runtime_safe": int((flags[sel] & SAFE > 0).sum())})
        minutes.append(row)
    # RSS growth after warm-up, against ticks
    rs = [r for r in run["rss"] if "VmRSS" in r]
    warm = min(args.warmup_ticks, ticks // 10) if args.warmup_ticks > ticks // 2 else args.warmup_ticks
    post = [r for r in rs if r["ticks"] >= warm]
    growth = None
    if len(post) >= 3 and post[-1]["ticks"] > post[0]["ticks"]:
        x = np.array([r["ticks"] for r in post], float)
        y = np.array([r["VmRSS"] for r in post], float) / 1024
        slope = np.polyfit(x, y, 1)[0] * 1e6
        growth = {"warmup_ticks": warm, "from_ticks": int(x[0]), "to_ticks": int(x[-1]),
                  "rss_from_mb": float(y[0]), "rss_to_mb": float(y[-1]), "rss_max_mb": float(y.max()),
                  "delta_mb": float(y[-1] - y[0]), "per_1e6_endpoints_mb": float((y[-1] - y[0]) / (x[-1] - x[0]) * 1e6),
                  "per_1e6_fit_mb": float(slope), "samples": len(post)}
    cpu = None
    if len(rs) >= 2 and rs[-1]["t"] > 0:
        steady = [r for r in rs if r["ticks"] >= warm]
        if len(steady) < 2 or steady[-1]["t"] - steady[0]["t"] <= 0:  # too short a run for a steady window
            steady = rs
        dt = steady[-1]["t"] - steady[0]["t"]
        dcpu = steady[-1]["cpu_s"] - steady[0]["cpu_s"]
        dticks = steady[-1]["ticks"] - steady[0]["ticks"]
        cpu = {"mean_pct_of_core": 100 * rs[-1]["cpu_s"] / rs[-1]["t"],
               "steady_pct_of_core": 100 * dcpu / dt if dt > 0 else None,
               "us_per_tick": 1e6 * dcpu / dticks if dticks > 0 else None, "cpu_s": rs[-1]["cpu_s"],
               "threads": rs[-1].get("Threads"),
               "nonvoluntary_ctxt_switches": rs[-1].get("nonvoluntary_ctxt_switches", 0) - rs[0].get(
                   "nonvoluntary_ctxt_switches", 0)}
    verdicts: dict[str, int] = {}
    for r in run["robots"]:
        for k, v in r["verdicts"].items():
            verdicts[k] = verdicts.get(k, 0) + v
    disconnected = [e for e in run["events"] if e.get("event") == "disconnected"]
    runtime_safe = sum(int(e.get("values", {}).get("safe", 0)) for e in disconnected)
    runtime_ticks = sum(int(e.get("values", {}).get("ticks", 0)) for e in disconnected)
    tel = run["telemetry"]
    tel_p99 = np.array([x["p99_us_max"] for x in tel if x["p99_us_max"] is not None])
    hist_edges = np.logspace(1, 6, 201)
    hist, _ = np.histogram(lat[got], bins=hist_edges)
    return {
        "ticks": ticks, "wall_s": run["wall_s"], "rate_achieved_hz": ticks / run["wall_s"] if run["wall_s"] else None,
        "latency_us": percentiles(lat[got]), "infer_us": percentiles(infer[~np.isnan(infer)]),
        "send_lateness_us": percentiles(late), "minutes": minutes,
        "robot_misses": int((flags & MISS > 0).sum()), "no_reply": int((flags & NEVER > 0).sum()),
        "late_arrivals": int(sum(r["late_arrivals"] for r in run["robots"])),
        "errors": int(sum(r["errors"] for r in run["robots"])),
        "link_lost": int(sum(r["link_lost"] for r in run["robots"])),
        "slips": int(sum(r["slips"] for r in run["robots"])),
        "runtime_deadline_verdicts": int((flags & DEADLINE > 0).sum()),
        "runtime_safe_seen_by_robots": int((flags & SAFE > 0).sum()),
        "runtime_safe_counter": runtime_safe, "runtime_session_ticks": runtime_ticks,
        "runtime_counters": run["counters"], "verdicts": verdicts,
        "deadline_alerts": sum(a["monitor"] == "deadline" for a in run["alerts"]),
        "alerts": len(run["alerts"]), "alert_monitors": sorted({str(a["monitor"]) for a in run["alerts"]}),
        "telemetry_p99_us_max": float(tel_p99.max()) if len(tel_p99) else None,
        "telemetry_p99_us_median": float(np.median(tel_p99)) if len(tel_p99) else None,
        "rss_growth": growth, "cpu": cpu, "system_busy_pct": 100 * run["system_busy"],
        "latency_hist": {"edges_us": hist_edges.tolist(), "counts": hist.tolist()},
    }


def plot(results: dict[str, Any]) -> list[Path]:
    """The two figures, from the raw results (bench/out/soak.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s, args = results["summary"], argparse.Namespace(**results["args"])
    FIGURES.mkdir(parents=True, exist_ok=True)
    rows = s["minutes"]
    x = np.array([r["minute"] + 0.5 for r in rows]) * args.bin_s / 60
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for key, label, style in (("max", "max", ":"), ("p999", "p99.9", "-."), ("p99", "p99", "--"), ("p50", "p50", "-")):
        ax.plot(x, [np.nan if r[key] is None else r[key] for r in rows], style, marker="o", ms=3, lw=1.3,
                label=f"round trip {label}")
    tel = [(e["t"] / 60, e["p99_us_max"]) for e in results["telemetry"] if e["p99_us_max"] is not None and e["t"] >= 0]
    if tel:
        tx, ty = zip(*tel)
        ax.plot(tx, ty, color="0.6", lw=0.6, alpha=0.7, label=f"runtime receipt-to-reply p99 per {args.telemetry_s:g} s"
                                                              " (telemetry, worst robot)")
    ax.axhline(args.deadline_ms * 1e3, color="r", lw=1, label=f"deadline {args.deadline_ms:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("time since start (min)")
    ax.set_ylabel("µs")
    ax.set_title(f"Soak: {args.robots} robots × {args.rate:g} Hz, {s['ticks']:,} ticks; round trip per "
                 f"{args.bin_s:g} s bin", fontsize=9)
    ax.legend(fontsize=7, loc="best", ncol=2)
    ax.grid(alpha=0.3, which="both", lw=0.4)
    fig.tight_layout()
    p1 = FIGURES / "soak_latency.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)

    rs = [r for r in results["rss"] if "VmRSS" in r]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(7.5, 5.2), sharex=True)
    tk = np.array([r["ticks"] for r in rs]) / 1e3
    a1.plot(tk, [r["VmRSS"] / 1024 for r in rs], lw=1.2, label="VmRSS")
    g = s["rss_growth"]
    if g:
        a1.axvline(g["warmup_ticks"] / 1e3, color="0.5", lw=0.8, ls=":", label="end of warm-up")
        a1.set_title(f"runtime RSS: {g['per_1e6_fit_mb']:+.3f} MB per 10^6 ticks after warm-up (least squares), "
                     f"{g['rss_from_mb']:.1f} → {g['rss_to_mb']:.1f} MB", fontsize=9)
    a1.set_ylabel("RSS (MB)")
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3, lw=0.4)
    t_ = np.array([r["t"] for r in rs])
    c_ = np.array([r["cpu_s"] for r in rs])
    keep = np.concatenate([[True], np.diff(t_) > 0.25 * args.rss_every_s])  # not the final sample's sliver
    t_, c_, tk_ = t_[keep], c_[keep], tk[keep]
    if len(t_) > 1:
        pct = 100 * np.diff(c_) / np.maximum(np.diff(t_), 1e-9)
        a2.step(tk_[1:], pct, where="pre", lw=1)
    a2.set_ylabel("runtime CPU (% of a core)")
    a2.set_xlabel("ticks (thousands, all robots)")
    a2.grid(alpha=0.3, lw=0.4)
    fig.tight_layout()
    p2 = FIGURES / "soak_rss.png"
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [p1, p2]


def render_file(raw: Path = RAW) -> str:
    """The RELIABILITY.md section from a soak's raw results (soak.json and the misses' JSON lines next to it),
    without running anything: `bench/soak.py --report-only`."""
    results = json.loads(raw.read_text())
    return render(results, read_misses(raw.parent / results["misses_file"]))


def read_misses(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def render(results: dict[str, Any], misses: list[dict[str, Any]]) -> str:
    """The RELIABILITY.md section, from the raw results as written to bench/out (JSON types only)."""
    s, curve, info = results["summary"], results["curve"], results["info"]
    args = argparse.Namespace(**results["args"])
    started, seconds, command = results["started"], results["seconds"], results["command"]
    machine_info, commit = results["machine"], results["commit"]
    L, d, sl = s["latency_us"], args.deadline_ms, s["send_lateness_us"]
    g, c = s["rss_growth"], s["cpu"]
    met = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731
    all_misses = s["robot_misses"] + s["runtime_deadline_verdicts"]
    heavy = info["other_processes"]
    lines = [BEGIN, f"## Soak: {args.robots} robots × {args.rate:g} Hz against one runtime, {s['ticks']:,} ticks "
             "(issue 8)", "",
             f"Written by `bench/soak.py` (`make bench-soak`) on {started} in {seconds:.0f} s; commit {commit}. "
             f"Command: `{command}`. Machine: {machine_info.get('CPU', '?')}, {machine_info.get('cores', '?')} cores, "
             f"{machine_info.get('memory', '?')}; {machine_info.get('vigil environment', '')}. Load average at the "
             f"start {' '.join(info['load_start'])}, at the end {' '.join(info['load_end'])}; the whole machine was "
             f"{s['system_busy_pct']:.0f}% busy during the soak (all cores, everything on it). "
             + (f"Other benchmark processes running during the soak: {'; '.join(heavy)}." if heavy else
                "No other benchmark was running."), "",
             f"**Setup.** One `vigil serve` child process, `--mode realtime --deadline-ms {d:g}` (one control period), "
             f"serving a `gaussian` bundle: the actor of training/rl.py (RLConfig's {info['bundle']['hidden']}×"
             f"{info['bundle']['hidden']} ReLU MLP, {info['bundle']['parameters']:,} parameters) for {ENV_ID}'s "
             f"shapes ({info['bundle']['obs_dim']}-dim state, {info['bundle']['act_dim']}-dim action, with the "
             "observation normalisation a trained bundle carries), exported by `export_gaussian` from a **freshly "
             "initialised** network: a tick costs the same whatever the weights (same graph, same multiply-adds), so "
             "nothing was trained. "
             f"{args.robots} robots, each its own process (multiprocessing, spawn) with its own clock: "
             f"{args.rate:g} Hz off by a random ±{args.clock_ppm:g} ppm (so their phases slide past each other during "
             "the run) and a random phase; each sends an observation (a random walk of the state's shape) on an "
             f"absolute schedule, waits up to {d:g} ms for that observation's action, and records the round trip "
             "(send to receipt, `perf_counter`). The robots use the reference driver, `RobotLink.step` (DEALER), "
             "over tcp loopback: its contract (seq matching, the safe action when nothing usable came in time) is the "
             "one measured.", "",
             "| figure | value | target |", "|---|---:|---|",
             f"| ticks (round trips attempted), wall time | {s['ticks']:,} in {s['wall_s']:.0f} s "
             f"({num(s['rate_achieved_hz'])} ticks/s) | |",
             f"| round trip p50 / p99 / p99.9 / max | {num(L['p50'])} / {num(L['p99'])} / {num(L['p999'])} / "
             f"{num(L['max'])} µs | < {d * 1e3:.0f} µs |",
             f"| deadline misses seen by the robots (no action within {d:g} ms) | {s['robot_misses']:,} "
             f"({s['robot_misses'] / max(1, s['ticks']):.2e}); no reply at all while waiting: {s['no_reply']:,} | 0: "
             f"{met(s['robot_misses'] == 0)} |",
             f"| deadline misses counted by the runtime (safe action, verdict `deadline`) | "
             f"{s['runtime_deadline_verdicts']:,} | 0: {met(s['runtime_deadline_verdicts'] == 0)} |",
             f"| safe actions sent by the runtime, any monitor (its `safe` counters) | {s['runtime_safe_counter']:,} "
             f"(robots saw {s['runtime_safe_seen_by_robots']:,}) | |",
             f"| stale observations dropped by the runtime (realtime mode) | "
             f"{s['runtime_counters'].get('stale_dropped', 0):,} | |",
             ]
    if g:
        lines.append(f"| runtime RSS growth after warm-up ({g['from_ticks']:,} → {g['to_ticks']:,} ticks) | "
                     f"{g['per_1e6_fit_mb']:+.3f} MB per 10^6 ticks (least squares; end points "
                     f"{g['per_1e6_endpoints_mb']:+.3f}); {g['rss_from_mb']:.1f} → {g['rss_to_mb']:.1f} MB, max "
                     f"{g['rss_max_mb']:.1f} | < 1 MB per 10^6: {met(abs(g['per_1e6_fit_mb']) < 1)} |")
    if c:
        lines.append(f"| runtime CPU | {num(c['steady_pct_of_core'], '.1f')}% of one core after warm-up "
                     f"({num(c['us_per_tick'])} µs of CPU per tick, all threads; {c['threads']} threads) | |")
    lines.append(f"| onnxruntime inference alone (the reply's `infer_us`) p50 / p99 / max | "
                 f"{num(s['infer_us']['p50'])} / {num(s['infer_us']['p99'])} / {num(s['infer_us']['max'])} µs | |")
    lines += ["", f"Overall: zero deadline misses at {args.robots} × {args.rate:g} Hz "
              f"{met(all_misses == 0)}; memory growth under 1 MB per 10^6 ticks "
              f"{met(bool(g) and abs(g['per_1e6_fit_mb']) < 1) if g else 'not measured (run too short)'}.", ""]
    lines += [f"Per {args.bin_s:g} s (round trips in µs; misses as in the table):", "",
              "| minute | ticks | p50 | p99 | p99.9 | max | robot misses | runtime `deadline` |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in s["minutes"]:
        lines.append(f"| {r['minute']} | {r['ticks']:,} | {num(r['p50'])} | {num(r['p99'])} | {num(r['p999'])} | "
                     f"{num(r['max'])} | {r['robot_misses']} | {r['runtime_deadline']} |")
    lines += ["", "**How each figure was obtained.**",
              "- *Round trip*: `RobotLink.step` takes `perf_counter` just before sending an observation and just "
              "after decoding the `act` with the same sequence number; percentiles pool every robot's ticks "
              f"(overall) or those sent in each {args.bin_s:g} s bin (table, `docs/figures/soak_latency.png`). The "
              "grey line in the plot is the runtime's own receipt-to-reply p99 per telemetry interval (worst robot), "
              "from the operator stream.",
              f"- *Robot misses*: ticks whose action had not arrived {d:g} ms after the observation was sent (the "
              "robot stops waiting then and applies its safe action, as `RobotLink.step` does); an action that "
              f"arrives during a later tick is not applied, only reported ({s['late_arrivals']} such late arrivals). "
              "An observation that never got a reply was, as a rule, dropped by the runtime as stale (realtime mode "
              "acts on the newest observation of a robot when several are queued): "
              f"{s['runtime_counters'].get('stale_dropped', 0)} dropped, {s['no_reply']} unanswered.",
              "- *Runtime misses*: `act` replies whose `meta.verdicts` hold a `deadline` verdict (the deadline "
              "monitor: receipt-to-decision time over the deadline, so the safe action was sent), tallied by the "
              "robots. The monitor times from the moment the runtime read the message to its decision, so time in "
              "transit and in the socket queue is not in it: the robots' count is the stricter one. Cross-checked "
              "against the runtime's per-robot `safe` counters, which each robot's "
              "`disconnected` telemetry event reports at the end "
              f"({s['runtime_session_ticks']:,} ticks acted on in all by the runtime's count).",
              f"- *RSS*: VmRSS of the `vigil serve` process from /proc/PID/status every {args.rss_every_s:g} s, "
              "against the ticks done so far; growth is the least-squares slope over the samples after the warm-up "
              f"(the first {g['warmup_ticks'] if g else args.warmup_ticks:,} ticks), scaled to 10^6 ticks "
              "(`docs/figures/soak_rss.png`).",
              "- *CPU*: utime + stime of the `vigil serve` process (all its threads: the loop, libzmq's I/O thread, "
              "onnxruntime) from /proc/PID/stat, over the same window, per wall second and per tick.",
              "- *Load generator*: the robots sent on schedule with lateness p50 "
              f"{num(sl['p50'])} µs, p99 {num(sl['p99'])} µs, max {num(sl['max'])} µs; "
              f"{s['slips']} times a robot fell more than a period behind and skipped the missed slots; the robots "
              f"received {s['link_lost']} link-loss safe actions and {s['errors']} error replies.",
              f"- *Alerts*: {s['alerts']} alerts on the operator stream during the soak"
              + (f" (monitors: {', '.join(s['alert_monitors'])})" if s['alerts'] else "") + "."]
    lines += render_misses(misses, s["ticks"], d)
    lines += ["", "### The cost of CURVE encryption on the round trip", ""]
    if "skipped" in curve:
        lines.append(f"Not measured: {curve['skipped']}.")
    else:
        p, q, r = curve["plain"], curve["curve"], curve["ratio"]
        refused = curve.get("refuses_unkeyed")
        refusal = "refused" if refused else "NOT refused" if refused is False else "not tried"
        lines += [f"Lockstep ping-pong, one robot (`RobotLink.act`, no pacing), against two `vigil serve` processes "
                  f"running side by side, the same bundle: one without authentication, one with "
                  f"`--curve-secret/--curve-allow` (keys from `vigil keys`; the robot loads its pair and the runtime's "
                  f"public key with `ClientKeys.load`). {curve['blocks']} blocks of {curve['block']:,} round trips "
                  f"alternate between the two (the first {curve['untimed_per_block']} of each block untimed), so both "
                  f"see the same background load; {p['n']:,} timed round trips each. An unkeyed robot was "
                  f"{refusal} by the authenticating runtime (no hello reply).", "",
                  "| round trip (µs) | p50 | p99 | p99.9 | mean |", "|---|---:|---:|---:|---:|",
                  f"| no authentication | {p['p50']:.0f} | {p['p99']:.0f} | {p['p999']:.0f} | {p['mean']:.0f} |",
                  f"| CURVE (authenticated, encrypted) | {q['p50']:.0f} | {q['p99']:.0f} | {q['p999']:.0f} | "
                  f"{q['mean']:.0f} |",
                  f"| ratio CURVE / none | {r['p50']:.3f} | {r['p99']:.3f} | {r['p999']:.3f} | {r['mean']:.3f} |",
                  f"| difference | {curve['extra_us']['p50']:+.0f} | {curve['extra_us']['p99']:+.0f} | "
                  f"{curve['extra_us']['p999']:+.0f} | {curve['extra_us']['mean']:+.0f} |"]
    lines += ["", f"Raw data: `bench/out/soak.json`, every miss in `bench/out/{results['misses_file']}`; figures: "
              "`docs/figures/soak_latency.png`, `docs/figures/soak_rss.png`.", END]
    return "\n".join(lines)


MISS_ROWS = 40  # the section lists every miss when there are at most this many


def render_misses(misses: list[dict[str, Any]], ticks: int, deadline_ms: float) -> list[str]:
    """Misses per cause, and one row per miss when there are few."""
    by_cause = {cause: sum(m["cause"] == cause for m in misses) for cause in CAUSES}
    lines = ["", f"### Why the robots missed: {len(misses):,} misses in {ticks:,} ticks, by cause", "",
             "Every tick on which a robot had no usable action by its deadline (`RobotLink.step` fell back on the safe "
             "action), or got the runtime's safe action for a `deadline` verdict, is recorded by the robot with its "
             "times: when it sent (wall clock and seconds since the start), how late that send was against its own "
             "schedule, how long it waited, the round trip (of the answer, if one came, even after the deadline) and "
             "the runtime's own times when its answer reports them. Each is then put down to one cause, the first "
             f"that applies (a robot that lost more than {LATE_FRACTION:.0%} of the {deadline_ms:g} ms deadline itself "
             "counts as late):", "",
             "| cause | misses | meaning |", "|---|---:|---|"]
    lines += [f"| `{cause}` | {n:,} | {CAUSES[cause]} |" for cause, n in by_cause.items()]
    if not misses:
        return lines
    if len(misses) > MISS_ROWS:
        return lines + ["", f"{len(misses):,} misses are too many to list here; each is one line of the misses file."]
    lines += ["", "| t (s) | wall clock (UTC) | robot | seq | cause | send late (µs) | waited (µs) | round trip (µs) | "
              "`queue_us` | `decide_us` / `infer_us` | robot's fallback | basis |",
              "|---:|---|---|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for m in misses:
        decide = m.get("decide_us") if m.get("decide_us") is not None else m.get("infer_us")
        wall = datetime.datetime.fromtimestamp(m["wall"], datetime.UTC).strftime("%H:%M:%S.%f")[:-3]
        lines.append(f"| {m['t']:.3f} | {wall} | {m['robot']} | {m['seq']} | `{m['cause']}` | "
                     f"{num(m['late_send_us'])} | {num(m['wait_us'])} | {num(m.get('rtt_us'))} | "
                     f"{num(m.get('queue_us'))} | {num(decide)} | {m.get('fallback') or '(runtime safe action)'} | "
                     f"{m['basis'].replace('|', '/')} |")
    return lines


def num(x: float | None, spec: str = ".0f") -> str:
    """A number for a table; a dash where there is none (JSON null, as NaN is written)."""
    return "–" if x is None or not math.isfinite(x) else format(x, spec)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ticks", type=int, default=1_000_000, help="round trips in all, over every robot")
    p.add_argument("--duration-s", type=float, default=1500.0,
                   help="cap on the soak's length in seconds (0: none); the nominal length is ticks / (robots x rate)")
    p.add_argument("--robots", type=int, default=10, help="simulated robots, one process each")
    p.add_argument("--rate", type=float, default=100.0, help="control rate of each robot in Hz")
    p.add_argument("--deadline-ms", type=float, default=10.0, help="the runtime's deadline and the robots' wait")
    p.add_argument("--clock-ppm", type=float, default=100.0, help="each robot's clock is off by up to this much")
    p.add_argument("--warmup-ticks", type=int, default=100_000,
                   help="RSS growth and steady CPU are measured from here on (a tenth of --ticks when that is less "
                        "than twice this)")
    p.add_argument("--rss-every-s", type=float, default=2.0, help="RSS and CPU sampling interval")
    p.add_argument("--telemetry-s", type=float, default=1.0, help="the runtime's telemetry interval")
    p.add_argument("--bin-s", type=float, default=60.0, help="bin of the per-minute table and plot")
    p.add_argument("--curve-trips", type=int, default=20_000, help="CURVE ping-pong round trips per runtime (0: skip)")
    p.add_argument("--curve-block", type=int, default=1000, help="round trips per block before switching runtimes")
    p.add_argument("--curve-warmup", type=int, default=500, help="untimed round trips per runtime first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-write", action="store_true", help="print only: no RELIABILITY.md, figures or raw JSON")
    p.add_argument("--raw-only", action="store_true",
                   help="write the raw results (soak.json, soak_misses.jsonl) to --out, not RELIABILITY.md or figures")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: rewrite the RELIABILITY.md section and figures from the raw results in --out")
    p.add_argument("--out", default=str(RAW.parent), help="folder of the raw results")
    args = p.parse_args(argv)
    args.curve_block = max(1, min(args.curve_block, args.curve_trips or 1))
    return args


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


def measure(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the soak (and the CURVE comparison): the raw results, as JSON types, and every miss, classified."""
    from bench.common import command_line, git_state, machine

    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = command_line(env="OMP_NUM_THREADS=1")
    t_start = time.monotonic()
    info: dict[str, Any] = {"other_processes": other_heavy()}
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        workdir = Path(tmp)
        bundle = workdir / "bundle"
        info["bundle"] = export_bundle(bundle, args.seed, args.rate)
        run = soak(args, bundle, workdir)
        info["load_start"], info["load_end"] = run["load_start"], run["load_end"]
        s = analyse(run, args)
        misses = classified_misses(run["robots"], args.deadline_ms)
        causes = {c: n for c in CAUSES if (n := sum(m["cause"] == c for m in misses))}
        print(f"soak: {s['ticks']:,} ticks in {s['wall_s']:.0f} s; round trip p50 {s['latency_us']['p50']:.0f} "
              f"p99 {s['latency_us']['p99']:.0f} p99.9 {s['latency_us']['p999']:.0f} max "
              f"{s['latency_us']['max']:.0f} us; robot misses {s['robot_misses']}, runtime deadline verdicts "
              f"{s['runtime_deadline_verdicts']}, misses by cause {causes}; RSS growth {s['rss_growth']}", flush=True)
        curve: dict[str, Any] = {"skipped": "--curve-trips 0"}
        if args.curve_trips > 0:
            try:
                curve = curve_cost(args, bundle, workdir)
                if "skipped" not in curve:
                    curve["refuses_unkeyed"] = curve_refuses_unkeyed(bundle, workdir)
            except Exception as exc:  # the soak's results stand without it
                curve = {"skipped": f"the CURVE measurement failed: {type(exc).__name__}: {exc}"}
            print(f"CURVE: {json.dumps({k: v for k, v in curve.items() if k not in ('hist', 'counters')})}", flush=True)
    results = {"summary": s, "curve": {k: v for k, v in curve.items() if k != "hist"}, "info": info,
               "args": vars(args), "started": started, "seconds": time.monotonic() - t_start, "command": command,
               "machine": machine(None), "commit": git_state(), "misses_file": MISSES.name,
               "rss": run["rss"], "telemetry": run["telemetry"],
               "robots": [{k: v for k, v in r.items() if k != "misses"} | {"misses": len(r["misses"])}
                          for r in run["robots"]],
               "alerts": run["alerts"], "events": [e for e in run["events"] if e.get("event") != "connected"],
               "serve_stderr": run["serve_stderr"]}
    # what the report reads is what was written: the same JSON types whether or not it is written
    return json.loads(json.dumps(_jsonable(results))), json.loads(json.dumps(_jsonable(misses)))


def write_raw(results: dict[str, Any], misses: list[dict[str, Any]], folder: Path) -> Path:
    """soak.json (everything but the misses) and the misses, one JSON object per line."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / RAW.name
    raw.write_text(json.dumps(results, indent=1))
    (folder / results["misses_file"]).write_text("".join(json.dumps(m) + "\n" for m in misses))
    return raw


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.common import write_section

    raw = Path(args.out) / RAW.name
    if args.report_only:  # the section and figures again, from the raw results; nothing is measured
        if not raw.exists():
            print(f"soak: no raw results at {raw}; run the soak first", file=sys.stderr)
            return 2
        text = render_file(raw)
        figures = plot(json.loads(raw.read_text()))
    else:
        results, misses = measure(args)
        if not args.no_write:  # first: a measurement outlives a failing report
            raw = write_raw(results, misses, Path(args.out))
            print(f"wrote {raw} and {raw.parent / results['misses_file']}")
        text = render(results, misses)
        if args.no_write or args.raw_only:
            print(text)
            return 0
        figures = plot(results)
    print(text)
    write_section(RELIABILITY, text, BEGIN, END, INTRO)
    print(f"wrote {RELIABILITY.relative_to(ROOT)}, " + ", ".join(str(f.relative_to(ROOT)) for f in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
