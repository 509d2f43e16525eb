"""Fairness under a flood (issue 23): do well-behaved robots keep their round trip when another robot floods?

One `vigil serve` (fresh per round, `--deadline-ms 10`) serves a `gaussian` bundle: a small MLP (11-256-256-3,
random weights: a tick costs the same whatever the weights) exported at 100 Hz by `export_gaussian`. N
well-behaved robots (default 4), each its own process, tick at 100 Hz with `RobotLink.step` and a deadline of
one period, for a fixed duration. The same run is repeated with and without one **flooder**: a process that
sends observations as fast as its socket takes them, never waiting for a reply (hundreds in flight: its
DEALER's queue, the kernel's buffers and the runtime's receive queue of 1000), reading replies only to keep its
socket drained. Conditions, interleaved round by round (A/B/A/B..., the order reversed every other repeat, a
fresh runtime every round):

    none        no flooder
    flood       one flooder that declares no `pipeline` in hello (the runtime's default depth, 8)
    flood256    one flooder that declares `pipeline` 256, the maximum: its queue is never trimmed below that
    flood-tmpfs the flooder, with the runtime's alert store on tmpfs (/dev/shm): the flood makes the runtime file
                alerts (the flooder's and, once they miss, the robots' verdicts), each an fsync in its loop; here free
    flood-nice  the flooder at nice 19: the same flood, but its own CPU use no longer competes with the runtime
                and the robots (as when the flooding robot runs on a computer of its own)
    hog         no flooder, but a process that burns a core: CPU contention alone, without the flood
    old-none    the runtime as it was before fair serving (the parent of the commit that added runtime/inbox.py,
    old-flood   unchanged, from `git archive`), without and with the flooder: the old behaviour's cost

in realtime mode (what a robot fleet runs: the runtime acts on the newest observation of each robot, so a
flooder's queue never holds more than one observation and its pipeline depth never binds: flood256 is left out)
and in lockstep mode (every observation answered: where a pipeline fills up). The robots and the flooder stay
alive across rounds (each round they connect to the new runtime and say hello), so a round costs a runtime
start, not process starts. The first `--warmup-s` of each round are not counted (the runtime's start-up: its
first telemetry message, 1 s after it starts, stalls it once for 10-40 ms on this machine); misses in them are
reported apart.

Measured per well-behaved robot: round trip (send to receipt of the observation's answer, `perf_counter`; late
answers at their latency) percentiles, ticks without a usable action by the deadline (`Reply.fallback`),
`deadline` verdicts from the runtime, the `queue_us` and `decide_us` of its answers, its CPU and its time waiting
for one (schedstat); for the flooder: observations sent, acts and errors (`overflow`) received, its CPU; the
runtime's counters (`served.stop()`: stale and overflow drops), CPU and time waiting for a CPU; the machine's
CPU (steal and iowait included), and the alerts the runtime filed (each a synchronous commit in its loop).

Measurement and report are separate: raw results go to bench/out/fairness.json; the section between the
`fairness` markers of BENCHMARKS.md and docs/figures/fairness.png are rendered from that file alone
(`render`, `--report-only`).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.fairness                    # make bench-fairness (~5 min)
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.fairness --duration-s 2 --repeats 1 --no-write   # smoke
    .venv/bin/python -m bench.fairness --report-only                         # the section again, from bench/out
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    FIGURES,
    OUT,
    ROOT,
    markers,
    pyplot,
    raw_copy,
    read_raw,
    run_info,
    save_figure,
    write_benchmarks,
    write_raw,
    written_by,
)

NAME = "fairness"
RAW = OUT / "fairness.json"
FIGURE = FIGURES / "fairness.png"
BEGIN, END = markers(NAME)
OBS_DIM, ACT_DIM, HIDDEN = 11, 3, 256

# extra: the process that runs beside the well-behaved robots (None, "flooder", "flooder-nice", "hog")
CONDITIONS: dict[str, dict[str, Any]] = {
    "none": {"extra": None, "old": False, "label": "without flooder"},
    "flood": {"extra": "flooder", "old": False, "pipeline": None, "label": "flooder, default pipeline"},
    "flood256": {"extra": "flooder", "old": False, "pipeline": 256, "label": "flooder, pipeline 256"},
    "flood-tmpfs": {"extra": "flooder", "old": False, "pipeline": None, "store": "tmpfs",
                    "label": "flooder, alert store on tmpfs"},
    "flood-nice": {"extra": "flooder-nice", "old": False, "pipeline": None, "label": "flooder at nice 19"},
    "hog": {"extra": "hog", "old": False, "label": "CPU hog, no flooder"},
    "old-none": {"extra": None, "old": True, "label": "old runtime, without flooder"},
    "old-flood": {"extra": "flooder", "old": True, "pipeline": None, "label": "old runtime, flooder"},
}
EXTRAS = ("flooder", "flooder-nice", "hog")
DEFAULT_REALTIME = "none,flood,flood-tmpfs,flood-nice,hog,old-none,old-flood"  # no flood256: see the docstring
DEFAULT_LOCKSTEP = "none,flood,flood256,flood-tmpfs,flood-nice,old-none,old-flood"
TMPFS = Path("/dev/shm")


def baseline(condition: str, present: Sequence[str]) -> str:
    """What a condition is compared with: the same runtime without the flooder."""
    return "old-none" if CONDITIONS[condition]["old"] and "old-none" in present else "none"

MISS, DEADLINE, NEVER = 1, 2, 4  # per-tick flags of a well-behaved robot


# -- processes ---------------------------------------------------------------------------------------------

def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    vals = machine_jiffies()
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return float(sum(vals) - idle), float(sum(vals))


def machine_jiffies() -> list[int]:
    """user, nice, system, idle, iowait, irq, softirq, steal, ... of the whole machine (/proc/stat)."""
    return [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


def machine_shares(j0: list[int], j1: list[int]) -> dict[str, float]:
    """What the machine's CPU time went to between two samples, in % of all of it (both cores)."""
    d = [b - a for a, b in zip(j0, j1)]
    total = max(1, sum(d))
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return {n: 100 * d[i] / total for i, n in enumerate(names) if i < len(d)}


def loadavg() -> list[str]:
    return Path("/proc/loadavg").read_text().split()[:3]


def other_processes() -> list[str]:
    """Other processes using CPU right now (not this bench's), for the honesty note: `ps` by CPU share."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,ppid,pcpu,args", "--sort=-pcpu"], capture_output=True, text=True,
                             timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    mine = {os.getpid()}
    rows = []
    for line in out.splitlines()[1:]:
        parts = line.split(None, 3)
        if len(parts) < 4:
            continue
        pid, ppid, pcpu, args = int(parts[0]), int(parts[1]), float(parts[2]), parts[3]
        if pid in mine or ppid in mine or pcpu < 5.0 or args.startswith("ps "):
            continue
        rows.append(f"{pcpu:.0f}% {args[:100]}")
    return rows[:8]


def schedstat(path: str = "/proc/self/schedstat") -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of a thread, from its schedstat."""
    try:
        on, wait = Path(path).read_text().split()[:2]
    except (OSError, ValueError):
        return math.nan, math.nan
    return int(on) / 1e9, int(wait) / 1e9


def process_schedstat(pid: int) -> dict[str, float]:
    """schedstat of a process's main thread and of all its threads together (the runtime's loop is the main
    thread; libzmq's I/O thread and onnxruntime's are the others)."""
    main = schedstat(f"/proc/{pid}/schedstat")
    total = [0.0, 0.0]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            on, wait = schedstat(str(task / "schedstat"))
            if math.isfinite(on):
                total[0] += on
                total[1] += wait
    except OSError:
        pass
    return {"main_on_s": main[0], "main_wait_s": main[1], "all_on_s": total[0], "all_wait_s": total[1]}


def involuntary_switches() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


def obs_specs():
    from vigil.wire.protocol import ArraySpec

    return (ArraySpec("state", "float32", (OBS_DIM,)),), ArraySpec("action", "float32", (ACT_DIM,))


def worker(role: str, index: int, conn) -> None:
    """A robot (`role` "robot"), a flooder ("flooder", or "flooder-nice" at nice 19) or a CPU hog ("hog"), alive
    across rounds. Each round: ("connect", endpoint, spec) -> hello, ("ready", pid); heartbeats until ("go",
    t0); run; bye; ("done", result). ("quit",) ends it."""
    from vigil.runtime.client import RobotLink

    obs_spec, act_spec = obs_specs()
    name = f"robot-{index}" if role == "robot" else role
    if role == "flooder-nice":
        os.nice(19)
    while True:
        cmd = conn.recv()
        if cmd[0] == "quit":
            return
        _, endpoint, spec = cmd
        link = None
        try:
            if role == "hog":
                conn.send(("ready", os.getpid()))
                conn.send(("done", run_hog(go_time(conn), spec)))
                continue
            link = RobotLink(endpoint, name)
            info = {} if spec.get("pipeline") is None else {"pipeline": int(spec["pipeline"])}
            link.hello(obs_spec, act_spec, timeout_s=30, env=f"fairness-{role}", **info)
            conn.send(("ready", os.getpid()))
            while not conn.poll(0.02):  # keep the session alive while the others connect
                link.heartbeat_if_idle()
            t0 = go_time(conn)
            result = run_robot(link, t0, spec) if role == "robot" else run_flooder(link, t0, spec)
            if role == "robot":
                link.bye()
            conn.send(("done", result))
        except Exception:
            conn.send(("error", f"{name}: {traceback.format_exc()}"))
        finally:
            if link is not None:
                link.close()


def go_time(conn) -> float:
    go = conn.recv()
    if go[0] != "go":
        raise RuntimeError(f"expected go, got {go[0]}")
    return float(go[1])


def run_hog(t0: float, spec: dict[str, Any]) -> dict[str, Any]:
    """Burn one core (a Python loop, no system calls) for the length of the round: CPU contention alone,
    without any traffic to the runtime."""
    end = t0 + spec["warmup_s"] + spec["duration_s"] + 0.2
    mono = time.monotonic
    while mono() < t0:
        time.sleep(0.001)
    cpu0, n = time.process_time(), 0
    while mono() < end:
        n += 1
    return {"cpu_s": time.process_time() - cpu0, "wall_s": mono() - t0, "loops": n}


def run_robot(link, t0: float, spec: dict[str, Any]) -> dict[str, Any]:
    """A realtime robot: an observation every period on an absolute schedule, its action awaited up to one
    period by `RobotLink.step`. Everything recorded per tick; the caller keeps the ticks after the warm-up."""
    rate, deadline_s = spec["rate"], spec["deadline_s"]
    period = 1.0 / rate
    end = t0 + spec["warmup_s"] + spec["duration_s"]
    n = int(math.ceil((end - t0) * rate)) + 2
    t_send, rtt, answer, queue, decide, late = (np.full(n, np.nan) for _ in range(6))
    index: dict[int, int] = {}  # seq -> tick, to date answers that come after their deadline
    flags = np.zeros(n, np.uint8)
    rng = np.random.default_rng(spec["seed"])
    x = np.zeros(OBS_DIM)
    mono, sleep = time.monotonic, time.sleep
    next_t = t0 + spec["phase_s"]
    slips = errors = k = 0
    while True:
        now = mono()
        if next_t > now:
            if next_t >= end:
                break
            sleep(next_t - now)
        elif now - next_t > period:  # descheduled for more than a period: skip the missed slots
            slips += 1
            next_t = now
        if next_t >= end or k >= n:
            break
        if k == 0:
            cpu0, sched0, nivcsw0 = time.process_time(), schedstat(), involuntary_switches()
        x = 0.99 * x + 0.1 * rng.standard_normal(OBS_DIM)
        sent = mono()
        reply = link.step({"state": x.astype(np.float32)}, deadline_s)
        t_send[k], late[k] = sent - t0, sent - next_t
        index[reply.seq] = k
        for lr in reply.late:  # an earlier tick's answer, after its deadline: how late it was, and why
            if lr.latency_s is not None and (j := index.get(lr.seq)) is not None and np.isnan(answer[j]):
                answer[j] = lr.latency_s * 1e6
                queue[j] = lr.message.meta.get("queue_us", np.nan)
                decide[j] = lr.message.meta.get("decide_us", np.nan)
        if reply.latency_s is not None:
            answer[k] = reply.latency_s * 1e6
        meta = reply.meta
        queue[k] = meta.get("queue_us", np.nan)
        decide[k] = meta.get("decide_us", np.nan)
        if reply.fallback is None:
            rtt[k] = reply.latency_s * 1e6
            if any(v[0] == "deadline" for v in reply.verdicts):
                flags[k] |= DEADLINE
        else:
            flags[k] |= MISS | (NEVER if reply.message is None else 0)
            errors += reply.fallback.startswith("error:")
        k += 1
        next_t += period
    cpu, sched, nivcsw = ((time.process_time() - cpu0, np.subtract(schedstat(), sched0).tolist(),
                           involuntary_switches() - nivcsw0) if k else (0.0, [0.0, 0.0], 0))
    return {"t_send": t_send[:k], "rtt_us": rtt[:k], "answer_us": answer[:k], "queue_us": queue[:k],
            "decide_us": decide[:k], "on_cpu_s": sched[0], "runqueue_wait_s": sched[1], "nivcsw": nivcsw,
            "late_send_us": late[:k] * 1e6, "flags": flags[:k], "slips": slips, "errors": errors,
            "late_arrivals": link.late, "link_lost": link.link_lost, "unsent": link.unsent, "cpu_s": cpu,
            "wall_s": mono() - t0}


def run_flooder(link, t0: float, spec: dict[str, Any]) -> dict[str, Any]:
    """Observations as fast as the socket takes them (poll for POLLOUT, then send until it refuses), never
    waiting for a reply; replies are read whenever there are some, only to count them."""
    import zmq

    obs = {"state": np.zeros(OBS_DIM, np.float32)}
    end = t0 + spec["warmup_s"] + spec["duration_s"] + 0.2  # flooding until after the robots' last tick
    pollset = [(link.sock, zmq.POLLIN | zmq.POLLOUT)]
    counts = {"attempted": 0, "acts": 0, "deadline_verdicts": 0, "other": 0}
    errors: dict[str, int] = {}
    queue: list[float] = []
    mono = time.monotonic
    unsent0 = link.unsent
    while mono() < t0:
        link.heartbeat_if_idle()
        time.sleep(0.001)
    cpu0, sched0 = time.process_time(), schedstat()

    def take(msg) -> None:
        if msg.kind == "act":
            counts["acts"] += 1
            if "queue_us" in msg.meta and len(queue) < 200_000:
                queue.append(float(msg.meta["queue_us"]))
            counts["deadline_verdicts"] += any(v[0] == "deadline" for v in msg.meta.get("verdicts", ()))
        elif msg.kind == "error":
            code = str(msg.meta.get("code", "?"))
            errors[code] = errors.get(code, 0) + 1
        else:
            counts["other"] += 1

    while mono() < end:
        events = zmq.zmq_poll(pollset, 10)
        if not events:
            continue
        ev = events[0][1]
        if ev & zmq.POLLIN:
            for _ in range(256):
                msg = link.recv(0)
                if msg is None:
                    break
                take(msg)
        if ev & zmq.POLLOUT:
            for _ in range(64):
                before = link.unsent
                link.send_obs(obs)
                counts["attempted"] += 1
                if link.unsent != before:
                    break
    cpu, sched = time.process_time() - cpu0, np.subtract(schedstat(), sched0).tolist()
    flood_wall = mono() - t0
    drain_until = mono() + 0.3
    while mono() < drain_until:  # what the runtime still sends back (its backlog is not ours to wait for)
        msg = link.recv(0.05)
        if msg is not None:
            take(msg)
    unsent = link.unsent - unsent0
    q = np.asarray(queue)
    return {**counts, "sent": counts["attempted"] - unsent, "unsent": unsent, "errors": errors, "cpu_s": cpu,
            "runqueue_wait_s": sched[1], "wall_s": flood_wall, "queue_us": pct(q), "pipeline": spec.get("pipeline")}


# -- the runtime -----------------------------------------------------------------------------------------------

def export_bundle(folder: Path, rate_hz: float, seed: int) -> dict[str, Any]:
    import torch

    from vigil.training.export import export_gaussian, provenance

    torch.manual_seed(seed)
    actor = torch.nn.Sequential(torch.nn.Linear(OBS_DIM, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
                                torch.nn.ReLU(), torch.nn.Linear(HIDDEN, ACT_DIM))
    export_gaussian(folder, f"fairness-mlp-{HIDDEN}x{HIDDEN}", actor, OBS_DIM, [-1.0] * ACT_DIM, [1.0] * ACT_DIM,
                    rate_hz, prov=provenance(bench=NAME, weights=f"random initialisation (torch seed {seed})"))
    return {"obs_dim": OBS_DIM, "act_dim": ACT_DIM, "hidden": HIDDEN,
            "parameters": int(sum(p.numel() for p in actor.parameters()))}


def old_commit() -> str:
    """The parent of the commit that added runtime/inbox.py: the runtime before fair serving."""
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--", "runtime/inbox.py"],
                           capture_output=True, text=True, cwd=ROOT, timeout=30, check=True).stdout.split()
    if not added:
        raise RuntimeError("no commit adds runtime/inbox.py")
    return subprocess.run(["git", "rev-parse", f"{added[-1]}^"], capture_output=True, text=True, cwd=ROOT,
                          timeout=30, check=True).stdout.strip()


def old_runtime(folder: Path, commit: str) -> dict[str, Any]:
    """The onboard packages (wire, runtime, policies, monitors) of `commit` as the package `vigil` under
    `folder`; a `vigil serve` with `PYTHONPATH=folder` runs them unchanged (the path comes before the editable
    install's finder). Returns what it checked."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", "--prefix=vigil/", commit, "wire", "runtime", "policies",
                              "monitors"], capture_output=True, cwd=ROOT, timeout=60, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True, timeout=60)
    (folder / "vigil" / "__init__.py").write_text("")
    probe = subprocess.run([sys.executable, "-c", "import vigil.runtime.server as s; "
                            "print(s.__file__); print(not hasattr(s, 'Inbox'))"],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(folder)},
                           cwd=folder)
    lines = probe.stdout.split()
    if probe.returncode != 0 or len(lines) != 2 or not lines[0].startswith(str(folder)) or lines[1] != "True":
        raise RuntimeError(f"the old runtime does not load from {folder}: {probe.stdout} {probe.stderr[-1000:]}")
    short = subprocess.run(["git", "log", "-1", "--format=%h %s", commit], capture_output=True, text=True, cwd=ROOT,
                           timeout=30).stdout.strip()
    return {"commit": commit, "describe": short[:100], "server_file": os.path.relpath(lines[0], folder)}


# -- a round ---------------------------------------------------------------------------------------------------

class Fleet:
    """The robot processes and the flooder, alive across rounds."""

    def __init__(self, robots: int):
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for role, i in [("robot", i) for i in range(robots)] + [(x, 0) for x in EXTRAS]:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker, args=(role, i, child), name=f"fairness-{role}-{i}", daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

        self.n = robots

    @property
    def robots(self):
        return list(zip(self.conns[:self.n], self.procs[:self.n]))

    def extra(self, role: str):
        k = self.n + EXTRAS.index(role)
        return self.conns[k], self.procs[k]

    def close(self) -> None:
        for conn, p in zip(self.conns, self.procs):
            try:
                conn.send(("quit",))
            except (OSError, BrokenPipeError):
                pass
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join()


def expect(conn, proc, what: str, timeout_s: float):
    if not conn.poll(timeout_s):
        raise RuntimeError(f"{proc.name}: no {what} within {timeout_s} s (alive: {proc.is_alive()})")
    msg = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(msg[1])
    if msg[0] != what:
        raise RuntimeError(f"{proc.name}: expected {what}, got {msg[0]}")
    return msg[1]


def one_round(fleet: Fleet, args: argparse.Namespace, bundle: Path, workdir: Path, mode: str, condition: str,
              rng: np.random.Generator, old_path: Path | None) -> dict[str, Any]:
    """A fresh runtime, the robots (and the condition's extra process) on it for warm-up + duration, its counters."""
    cond = CONDITIONS[condition]
    workdir.mkdir(parents=True, exist_ok=True)
    tmpfs = cond.get("store") == "tmpfs"
    store_dir = Path(tempfile.mkdtemp(prefix="fairness-store-", dir=TMPFS)) if tmpfs else workdir
    try:
        return {**drive(fleet, args, bundle, workdir, store_dir, mode, condition, rng, old_path),
                "store_on": "tmpfs" if tmpfs else "disk"}
    finally:
        if tmpfs:
            shutil.rmtree(store_dir, ignore_errors=True)


def drive(fleet: Fleet, args: argparse.Namespace, bundle: Path, workdir: Path, store_dir: Path, mode: str,
          condition: str, rng: np.random.Generator, old_path: Path | None) -> dict[str, Any]:
    from vigil.runtime.launch import start_serve

    cond = CONDITIONS[condition]
    env = {"OMP_NUM_THREADS": "1", **({"PYTHONPATH": str(old_path)} if cond["old"] else {})}
    served = start_serve(bundle, workdir, env=env, mode=mode, deadline_ms=f"{args.deadline_ms:g}",
                         log_level="WARNING", store=str(store_dir / "alerts.db"))
    ep = served.robot_endpoint
    extra = cond["extra"]
    members = list(fleet.robots) + ([fleet.extra(extra)] if extra else [])
    base = {"rate": args.rate, "deadline_s": args.deadline_ms / 1e3, "warmup_s": args.warmup_s,
            "duration_s": args.duration_s}
    try:
        for conn, _ in fleet.robots:
            conn.send(("connect", ep, {**base, "phase_s": float(rng.uniform(0, 1 / args.rate)),
                                       "seed": int(rng.integers(2**31))}))
        if extra:
            fleet.extra(extra)[0].send(("connect", ep, {**base, "pipeline": cond.get("pipeline")}))
        pids = [expect(conn, p, "ready", 60) for conn, p in members]
        t0 = time.monotonic() + 0.2
        for conn, _ in members:
            conn.send(("go", t0))
        time.sleep(max(0.0, t0 - time.monotonic()))
        pid = served.proc.pid
        cpu0, busy0, sched0, jif0 = proc_cpu_s(pid), system_busy(), process_schedstat(pid), machine_jiffies()
        time.sleep(max(0.0, t0 + args.warmup_s + args.duration_s - time.monotonic()))
        cpu1, busy1, sched1, jif1 = proc_cpu_s(pid), system_busy(), process_schedstat(pid), machine_jiffies()
        window = time.monotonic() - t0
        results = [expect(conn, p, "done", 30 + args.duration_s) for conn, p in members]
    except BaseException:
        served.kill()
        raise
    counters = served.stop()
    alerts = filed_alerts(store_dir / "alerts.db")
    robots = []
    for i, r in enumerate(results[:len(fleet.robots)]):
        keep = r["t_send"] >= args.warmup_s
        robots.append({"robot": f"robot-{i}", "pid": pids[i], "ticks": int(keep.sum()), "ticks_all": len(keep),
                       "warmup_misses": int((r["flags"][~keep] > 0).sum()),
                       "rtt_us": np.round(r["rtt_us"][keep], 1), "answer_us": np.round(r["answer_us"][keep], 1),
                       "queue_us": np.round(r["queue_us"][keep], 1),
                       "decide_us": np.round(r["decide_us"][keep], 1), "flags": r["flags"][keep],
                       "late_send_us": pct(r["late_send_us"][keep]),
                       **{k: r[k] for k in ("slips", "errors", "late_arrivals", "link_lost", "unsent", "cpu_s",
                                            "wall_s", "on_cpu_s", "runqueue_wait_s", "nivcsw")}})
    other = results[-1] if extra else None
    return {"mode": mode, "condition": condition, "robots": robots,
            "flooder": other if extra in ("flooder", "flooder-nice") else None,
            "hog": other if extra == "hog" else None, "counters": counters,
            "runtime_cpu_s": cpu1 - cpu0, "window_s": window,
            "runtime_sched": {k: sched1[k] - sched0[k] for k in sched0},
            "machine_busy_pct": 100 * (busy1[0] - busy0[0]) / max(1.0, busy1[1] - busy0[1]),
            "machine_shares": machine_shares(jif0, jif1), "alerts": alerts, "loadavg": loadavg()}


def filed_alerts(db: Path) -> dict[str, int]:
    """Alerts the runtime filed in its store, by "robot/monitor": each was one synchronous commit (fsync) in
    its loop (runtime/alerts.py, runtime/store.py)."""
    import sqlite3

    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = con.execute("SELECT robot, monitor, COUNT(*) FROM alerts GROUP BY robot, monitor").fetchall()
        finally:
            con.close()
    except sqlite3.Error as exc:
        return {"error": str(exc)}  # type: ignore[dict-item]
    return {f"{robot}/{monitor}": int(n) for robot, monitor, n in rows}


def schedule(args: argparse.Namespace) -> list[tuple[int, str, str]]:
    """(repeat, mode, condition) in run order: the conditions of a mode alternate, in reverse every other
    repeat, so that slow drifts of the machine's load fall on both sides alike."""
    plan = {m: [c for c in getattr(args, m).split(",") if c] for m in ("realtime", "lockstep")}
    out = []
    for rep in range(args.repeats):
        for mode, conds in plan.items():
            out += [(rep, mode, c) for c in (conds if rep % 2 == 0 else conds[::-1])]
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    info = run_info(env="OMP_NUM_THREADS=1")
    rounds_plan = schedule(args)
    t_start = time.monotonic()
    result: dict[str, Any] = {"run": info, "args": vars(args), "other_processes": other_processes(),
                              "loadavg_start": loadavg(), "rounds": []}
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="fairness-") as tmp:
        tmp_path = Path(tmp)
        fleet = Fleet(args.robots)  # the processes start while the bundle is exported
        try:
            result["bundle"] = export_bundle(tmp_path / "bundle", args.rate, args.seed)
            old_path = None
            if any(CONDITIONS[c]["old"] for _, _, c in rounds_plan):
                result["old_runtime"] = old_runtime(tmp_path / "old", old_commit())
                old_path = tmp_path / "old"
            bar = tqdm(rounds_plan, unit="round", disable=args.no_progress, desc=f"fairness {args.robots} robots")
            for k, (rep, mode, condition) in enumerate(bar):
                bar.set_postfix_str(f"{mode} {condition}", refresh=True)
                r = one_round(fleet, args, tmp_path / "bundle", tmp_path / f"round{k}", mode, condition, rng,
                              old_path)
                r = raw_copy({**r, "repeat": rep, "index": k})
                result["rounds"].append(r)
                p99 = pct(np.concatenate([round_trips(x) for x in r["robots"]]))["p99"]
                misses = sum(int((np.asarray(x["flags"]) > 0).sum()) for x in r["robots"])
                bar.write(f"{mode:8s} {condition:10s} p99 {num(p99):>7s} us, misses {misses}, "
                          f"runtime {100 * r['runtime_cpu_s'] / r['window_s']:.0f}% CPU, machine "
                          f"{r['machine_busy_pct']:.0f}% busy")
        finally:
            fleet.close()
    result["seconds"] = time.monotonic() - t_start
    result["loadavg_end"] = loadavg()
    return result


# -- analysis (from the raw results alone) ---------------------------------------------------------------------

def pct(x: Any) -> dict[str, float]:
    """Percentiles of the sample (NaN left out; +inf, an observation never answered, kept: it sorts last).
    Order statistics, not interpolated, so that an infinite tail reads as such."""
    x = np.asarray(x, float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return {"n": 0, "p50": math.nan, "p99": math.nan, "p999": math.nan, "max": math.nan}
    p50, p99, p999 = np.percentile(x, [50, 99, 99.9], method="inverted_cdf")
    return {"n": int(len(x)), "p50": float(p50), "p99": float(p99), "p999": float(p999), "max": float(x.max())}


def arr(values: list, none: float = math.nan) -> np.ndarray:
    return np.array([none if v is None else v for v in values], float)


def round_trips(robot: dict[str, Any]) -> np.ndarray:
    """Every measured tick's round trip: its answer's latency, in time or late; +inf when none ever came."""
    return arr(robot["answer_us"], math.inf)


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of one (mode, condition): every round of it pooled."""
    robots = [r for rd in rounds for r in rd["robots"]]
    rtt = np.concatenate([round_trips(r) for r in robots])
    flags = np.concatenate([np.asarray(r["flags"], int) for r in robots])
    names = sorted({r["robot"] for r in robots})
    window = sum(rd["window_s"] for rd in rounds)
    ticks_all = sum(r["ticks_all"] for r in robots)
    sched = [rd["runtime_sched"] for rd in rounds]
    s: dict[str, Any] = {
        "rounds": len(rounds), "ticks": int(len(flags)), "rtt_us": pct(rtt),
        "queue_us": pct(np.concatenate([arr(r["queue_us"]) for r in robots])),
        "decide_us": pct(np.concatenate([arr(r["decide_us"]) for r in robots])),
        "p99_per_round": [pct(np.concatenate([round_trips(r) for r in rd["robots"]]))["p99"] for rd in rounds],
        "p99_per_robot": [pct(np.concatenate([round_trips(r) for r in robots if r["robot"] == name]))["p99"]
                          for name in names],
        "misses": int(((flags & MISS) > 0).sum()), "never": int((((flags & MISS) > 0) & (rtt == math.inf)).sum()),
        "deadline_verdicts": int(((flags & DEADLINE) > 0).sum()), "any_miss": int((flags > 0).sum()),
        "slips": sum(r["slips"] for r in robots), "warmup_misses": sum(r["warmup_misses"] for r in robots),
        "late_send_p99_max": max(arr([r["late_send_us"]["p99"] for r in robots], 0.0)),
        "runtime_cpu_pct": 100 * sum(rd["runtime_cpu_s"] for rd in rounds) / window,
        "runtime_wait_pct": 100 * sum(x["main_wait_s"] for x in sched) / window,
        "runtime_threads_wait_pct": 100 * sum(x["all_wait_s"] for x in sched) / window,
        "robots_cpu_pct": 100 * sum(r["cpu_s"] for r in robots) / window,
        "robots_wait_us_per_tick": 1e6 * sum(r["runqueue_wait_s"] for r in robots) / max(1, ticks_all),
        "robots_nivcsw_per_tick": sum(r["nivcsw"] for r in robots) / max(1, ticks_all),
        "machine_busy_pct": float(np.mean([rd["machine_busy_pct"] for rd in rounds])),
        "steal_pct": float(np.mean([rd["machine_shares"].get("steal", 0.0) for rd in rounds])),
        "steal_max_pct": float(max(rd["machine_shares"].get("steal", 0.0) for rd in rounds)),
        "alerts_flooder": sum(n for rd in rounds for k, n in rd["alerts"].items()
                              if isinstance(n, int) and k.startswith("flooder")) / len(rounds),
        "alerts_robots": sum(n for rd in rounds for k, n in rd["alerts"].items()
                             if isinstance(n, int) and k.startswith("robot-")) / len(rounds),
        "iowait_pct": float(np.mean([rd["machine_shares"].get("iowait", 0.0) for rd in rounds])),
        "counters": {k: sum(int(rd["counters"].get(k, 0) or 0) for rd in rounds)
                     for k in ("received", "ticks", "stale_dropped", "overflow_dropped", "errors")},
        "cdf": rtt,
    }
    floods = [rd["flooder"] for rd in rounds if rd.get("flooder")]
    if floods:
        wall = sum(f["wall_s"] for f in floods)
        s["flooder"] = {
            "sent": sum(f["sent"] for f in floods), "acts": sum(f["acts"] for f in floods),
            "overflow": sum(f["errors"].get("overflow", 0) for f in floods),
            "other_errors": sum(v for f in floods for k, v in f["errors"].items() if k != "overflow"),
            "deadline_verdicts": sum(f["deadline_verdicts"] for f in floods),
            "sent_per_s": sum(f["sent"] for f in floods) / wall,
            "cpu_pct": 100 * sum(f["cpu_s"] for f in floods) / wall,
            "wait_pct": 100 * sum(f["runqueue_wait_s"] for f in floods) / wall,
            "queue_p50_us": float(np.median(arr([f["queue_us"]["p50"] for f in floods]))),
            "queue_max_us": float(np.max(arr([f["queue_us"]["max"] for f in floods]))),
        }
    hogs = [rd["hog"] for rd in rounds if rd.get("hog")]
    if hogs:
        s["hog_cpu_pct"] = 100 * sum(h["cpu_s"] for h in hogs) / sum(h["wall_s"] for h in hogs)
    return s


def analyse(raw: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """{mode: {condition: summary}}; every condition but its baseline is judged against the target: its p99
    within the noise of the baseline (at most the baseline's worst round) and no missed tick."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for mode in ("realtime", "lockstep"):
        conds = [c for c in CONDITIONS if any(r["mode"] == mode and r["condition"] == c for r in raw["rounds"])]
        out[mode] = {c: summarise([r for r in raw["rounds"] if r["mode"] == mode and r["condition"] == c])
                     for c in conds}
        for c, s in out[mode].items():
            b = baseline(c, conds)
            base = out[mode].get(b)
            s["baseline"] = b
            if base is None or c == b:
                continue
            band = max(base["p99_per_round"])
            s["ratio_p99"] = s["rtt_us"]["p99"] / base["rtt_us"]["p99"]
            s["noise_band_us"] = band
            s["within_noise"] = bool(s["rtt_us"]["p99"] <= band)
            s["excess_us"] = s["rtt_us"]["p99"] - band
            s["met"] = s["within_noise"] and s["any_miss"] == 0
    return out


# -- the report ------------------------------------------------------------------------------------------------

def num(x: Any, spec: str = ".0f") -> str:
    if x is None:
        return "–"
    x = float(x)
    return "∞" if x == math.inf else "–" if not math.isfinite(x) else format(x, spec)


def verdict(mode: str, c: str, s: dict[str, Any], base: dict[str, Any]) -> str:
    ok = "**met**" if s["met"] else "**not met**"
    why = []
    if not s["within_noise"]:
        why.append(f"p99 unbounded: {s['never'] / s['ticks']:.1%} of the ticks were never answered"
                   if s["rtt_us"]["p99"] == math.inf else
                   f"p99 {num(s['excess_us'])} µs above the noise band, {num(s['ratio_p99'], '.2f')}x the p99 without")
    if s["any_miss"]:
        why.append(f"{s['any_miss']} missed ticks, {s['any_miss'] / s['ticks']:.2%}, against "
                   f"{base['any_miss'] / base['ticks']:.2%} without")
    return (f"- {mode}, {CONDITIONS[c]['label']}: well-behaved p99 {num(s['rtt_us']['p99'])} µs against "
            f"{num(base['rtt_us']['p99'])} µs without (noise band, the worst round without: "
            f"{num(s['noise_band_us'])} µs); missed ticks {s['any_miss']:,} of {s['ticks']:,} (without: "
            f"{base['any_miss']:,} of {base['ticks']:,}): target {ok}" + (f" ({'; '.join(why)})." if why else "."))


def table(summ: dict[str, dict[str, Any]]) -> list[str]:
    conds = list(summ)
    lines = ["| | " + " | ".join(CONDITIONS[c]["label"] for c in conds) + " |", "|---|" + "---:|" * len(conds)]

    def row(label: str, f, only: str | None = None) -> None:
        lines.append(f"| {label} | " + " | ".join(f(summ[c]) if only is None or only in summ[c] else ""
                                                  for c in conds) + " |")

    row("rounds, ticks measured (all well-behaved robots)", lambda s: f"{s['rounds']}, {s['ticks']:,}")
    row("**round trip p50 / p99 / p99.9 / max (µs)**", lambda s: " / ".join(
        num(s["rtt_us"][k]) for k in ("p50", "p99", "p999", "max")))
    row("p99 per round, min–max (µs)", lambda s: f"{num(min(s['p99_per_round']))}–{num(max(s['p99_per_round']))}")
    row("p99 per robot, min–max (µs)", lambda s: f"{num(min(s['p99_per_robot']))}–{num(max(s['p99_per_robot']))}")
    row("**p99 / p99 without** (same runtime)", lambda s: f"**{num(s['ratio_p99'], '.2f')}**"
        if "ratio_p99" in s else "1")
    row("no usable action by the deadline (robot) / of which never answered", lambda s: f"{s['misses']} / "
        f"{s['never']}")
    row("`deadline` verdicts (runtime)", lambda s: str(s["deadline_verdicts"]))
    row("missed ticks in the warm-up (not counted above)", lambda s: str(s["warmup_misses"]))
    row("`queue_us` p50 / p99 / max", lambda s: " / ".join(num(s["queue_us"][k]) for k in ("p50", "p99", "max")))
    row("`decide_us` p50 / p99", lambda s: " / ".join(num(s["decide_us"][k]) for k in ("p50", "p99")))
    row("robots' own send lateness, p99 of the worst robot (µs); slips", lambda s:
        f"{num(s['late_send_p99_max'])}; {s['slips']}")
    row("flooder: observations sent (per s)", lambda s: f"{s['flooder']['sent']:,} "
        f"({s['flooder']['sent_per_s']:,.0f})", "flooder")
    row("flooder: acts (of which `deadline`) / `overflow` errors / other errors", lambda s:
        f"{s['flooder']['acts']:,} ({s['flooder']['deadline_verdicts']:,}) / {s['flooder']['overflow']:,} / "
        f"{s['flooder']['other_errors']:,}", "flooder")
    row("flooder: its acts' `queue_us`, median p50 / max (ms)", lambda s:
        f"{num(s['flooder']['queue_p50_us'] / 1e3, '.1f')} / {num(s['flooder']['queue_max_us'] / 1e3, '.1f')}",
        "flooder")
    row("runtime: messages received / ticks", lambda s: f"{s['counters']['received']:,} / "
        f"{s['counters']['ticks']:,}")
    row("runtime: `stale_dropped` / `overflow_dropped`", lambda s: f"{s['counters']['stale_dropped']:,} / "
        f"{s['counters']['overflow_dropped']:,}")
    row("CPU, % of one core: runtime / flooder or hog / all robots", lambda s: f"{s['runtime_cpu_pct']:.0f} / "
        + (f"{s['flooder']['cpu_pct']:.0f}" if "flooder" in s else f"{s['hog_cpu_pct']:.0f}" if "hog_cpu_pct" in s
           else "–") + f" / {s['robots_cpu_pct']:.0f}")
    row("waiting for a CPU: runtime loop thread (% of the time); robots (µs per tick)", lambda s:
        f"{s['runtime_wait_pct']:.0f}%; {s['robots_wait_us_per_tick']:.0f}")
    row("robots: involuntary context switches per tick", lambda s: f"{s['robots_nivcsw_per_tick']:.2f}")
    row("runtime: alerts filed per round, each an fsync in its loop: flooder's / robots'", lambda s:
        f"{s['alerts_flooder']:.0f} / {s['alerts_robots']:.0f}")
    row("machine busy (both cores, all on it); steal, mean (worst round); iowait", lambda s:
        f"{s['machine_busy_pct']:.0f}%; {s['steal_pct']:.1f}% ({s['steal_max_pct']:.0f}%); {s['iowait_pct']:.1f}%")
    return lines


def render(raw: dict[str, Any]) -> str:
    """The BENCHMARKS.md section, from the raw results alone."""
    a = argparse.Namespace(**raw["args"])
    summ = analyse(raw)
    run, b = raw["run"], raw["bundle"]
    m = run["machine"]
    lines = [BEGIN, "## Fairness: well-behaved robots beside a flooding one (issue 23)", "",
             written_by(run, seconds=raw["seconds"]) + f" (`make bench-fairness`). Memory {m.get('memory', '?')}; "
             f"{m.get('vigil environment', '')}. Load average {' '.join(raw['loadavg_start'])} at the start, "
             f"{' '.join(raw['loadavg_end'])} at the end"
             + (f"; other processes busy at the start: {'; '.join(raw['other_processes'])}."
                if raw["other_processes"] else "; no other busy process at the start."), "",
             f"**Setup.** One `vigil serve` per round (a fresh one every round; `--deadline-ms {a.deadline_ms:g}`), "
             f"a `gaussian` bundle (MLP {b['obs_dim']}-{b['hidden']}-{b['hidden']}-{b['act_dim']}, "
             f"{b['parameters']:,} parameters, random weights) at {a.rate:g} Hz. {a.robots} well-behaved robots, "
             f"one process each, `RobotLink.step` every {1e3 / a.rate:g} ms with a deadline of one period, random "
             f"phases; {a.duration_s:g} s measured per round after {a.warmup_s:g} s of warm-up (the runtime's "
             f"start-up); {a.repeats} rounds per condition, the conditions interleaved (their order reversed every "
             "other repeat). The **flooder** "
             "is one more process that sends observations as fast as its socket takes them, never waits for a "
             "reply and reads replies only to drain its socket; *at nice 19*: the same at the lowest CPU priority. "
             "The **CPU hog** is a process that burns a core and sends nothing: CPU contention without a flood. "
             "*Round trip*: send to receipt of the observation's answer, pooled over robots and rounds; an answer "
             "after the deadline counts at its latency, an observation never answered as ∞.", ""]
    if "old_runtime" in raw:
        o = raw["old_runtime"]
        lines += [f"*Old runtime*: the onboard packages at `{o['describe']}` (the parent of the commit that added "
                  "fair serving), run unchanged: up to 256 messages read per wake-up and served in arrival order "
                  "(realtime: only the newest observation of each robot in that batch).", ""]
    order = [md for md in ("realtime", "lockstep") if summ.get(md)]
    for mode in order:
        why = ("what a robot fleet runs: the runtime acts on each robot's newest observation; the table the "
               "target is read on" if mode == "realtime" else "every observation answered, so a flooder's "
               "queue fills up to its pipeline depth: where the depth and the old runtime's order matter")
        lines += [f"### {mode.capitalize()} ({why})", "", *table(summ[mode]), ""]
    lines += ["**Verdict against the target** (the well-behaved robots' p99 within the noise of the run without "
              "the flooder, i.e. at most that run's worst round, and zero missed ticks: no usable action by the "
              "deadline, or a `deadline` verdict):", ""]
    for old in (False, True):
        for mode in order:
            for c, s in summ[mode].items():
                if "met" in s and CONDITIONS[c]["old"] == old:
                    lines.append(verdict(mode, c, s, summ[mode][s["baseline"]])
                                 + (" (the old behaviour, for comparison)" if old else ""))
    lines += ["", f"![round-trip CDF with and without the flooder]({FIGURE.relative_to(ROOT).as_posix()})", "",
              "Raw results: `bench/out/fairness.json` (every tick's round trip, `queue_us`, `decide_us` and flags, "
              "per robot and round); `--report-only` renders this section and the figure again from it.", END]
    return "\n".join(lines)


def plot(raw: dict[str, Any], path: Path = FIGURE) -> Path:
    """The CDF (and its tail) of the well-behaved robots' round trips, per mode and condition."""
    plt = pyplot()
    summ = analyse(raw)
    a = argparse.Namespace(**raw["args"])
    modes = [md for md in ("realtime", "lockstep") if summ.get(md)]
    fig, axes = plt.subplots(2, len(modes), figsize=(5.6 * len(modes), 6.6), squeeze=False)
    styles = {"none": ("k", "-"), "flood": ("C3", "-"), "flood256": ("C1", "--"), "flood-nice": ("C2", "--"),
              "flood-tmpfs": ("C5", "-."),
              "hog": ("C4", ":"), "old-none": ("0.6", ":"), "old-flood": ("C0", "-.")}
    for j, mode in enumerate(modes):
        top, bottom = axes[0][j], axes[1][j]
        for c, s in summ[mode].items():
            x = np.sort(np.asarray(s["cdf"], float))
            n = len(x)
            x = x[np.isfinite(x)]  # never answered: the curve stops short of 1 by their share
            if not len(x):
                continue
            y = np.arange(1, len(x) + 1) / n
            color, ls = styles.get(c, ("C5", "-"))
            label = f"{CONDITIONS[c]['label']} (p99 {num(s['rtt_us']['p99'])} µs)"
            top.plot(x, y, color=color, ls=ls, lw=1.3, label=label)
            bottom.plot(x, 1 - y + 1 / n, color=color, ls=ls, lw=1.3)
        for ax in (top, bottom):
            ax.axvline(a.deadline_ms * 1e3, color="r", lw=0.8)
            ax.set_xscale("log")
            ax.grid(alpha=0.3, which="both", lw=0.4)
        top.set_title(f"{mode}: {a.robots} well-behaved robots × {a.rate:g} Hz", fontsize=9)
        top.set_ylabel("CDF of the round trip")
        top.legend(fontsize=6.5, loc="lower right")
        bottom.set_yscale("log")
        bottom.set_ylabel("1 − CDF (the tail)")
        bottom.set_xlabel(f"round trip (µs), late answers included; red: the {a.deadline_ms:g} ms deadline")
    fig.tight_layout()
    return save_figure(fig, path)


# -- entry point -----------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--robots", type=int, default=4, help="well-behaved robots, one process each")
    p.add_argument("--rate", type=float, default=100.0, help="their control rate (Hz); also the bundle's")
    p.add_argument("--deadline-ms", type=float, default=10.0, help="the runtime's deadline and the robots' wait")
    p.add_argument("--duration-s", type=float, default=4.0, help="measured seconds per round")
    p.add_argument("--warmup-s", type=float, default=1.2,
                   help="seconds per round before measuring: past the runtime's first telemetry message, 1 s after "
                        "its start, whose first np.percentile imports numpy.ma (a one-off stall of 10-40 ms)")
    p.add_argument("--repeats", type=int, default=3, help="rounds per condition")
    p.add_argument("--realtime", default=DEFAULT_REALTIME,
                   help=f"conditions run in realtime mode (of {', '.join(CONDITIONS)}; empty: none)")
    p.add_argument("--lockstep", default=DEFAULT_LOCKSTEP, help="conditions run in lockstep mode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RAW), help="the raw results file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-write", action="store_true", help="print the section only: no raw file, figure or markdown")
    p.add_argument("--raw-only", action="store_true", help="write the raw file only (and print the section)")
    p.add_argument("--report-only", action="store_true", help="measure nothing: render from the raw file")
    args = p.parse_args(argv)
    for mode in ("realtime", "lockstep"):
        for c in filter(None, getattr(args, mode).split(",")):
            if c not in CONDITIONS:
                p.error(f"unknown condition {c!r} in --{mode}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raw_path = Path(args.out)
    if args.report_only:
        raw = read_raw(raw_path)
    else:
        raw = measure(args)
        if not args.no_write:
            write_raw(raw_path, raw)
            print(f"wrote {raw_path}")
    text = render(raw)
    print(text)
    if args.no_write or args.raw_only:
        return 0
    figure = plot(raw)
    write_benchmarks(text, BEGIN, END)
    print(f"wrote BENCHMARKS.md ({NAME} section), {figure.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
