"""Throughput: how many robots at 100 Hz one `vigil serve` serves with zero runtime-side deadline verdicts, and what
planning the ready observations of several robots in one onnxruntime call (`--batch-plans`) changes.

One `vigil serve` (realtime mode, `--deadline-ms 10`, a fresh one per step, its alert store on disk as shipped)
serves one of two bundles, both written for the run as bench/latency.py writes them: `linear_gain`, the
aircraft-pitch LQR (3 floats in, 1 out; `export_lqr`), and `gaussian`, a 39-256-256-4 ReLU MLP (random weights,
100 Hz; `export_gaussian`). A configuration is a bundle and the runtime's `--batch-plans` (1: every robot's
tick plans alone; 16: the waiting observations of up to 16 robots are planned in one call), and for diagnosis
other `vigil serve` options: `gaussian-telemetry3600` runs the gaussian bundle with its periodic telemetry message
(every second by default: two `np.percentile` per robot, in the loop) once an hour instead.

The load generator plays N robots at 100 Hz each from one process (`--generators`, default 1: on a 2-core
machine the runtime keeps the other core). `RobotLink.step` blocks per robot, so the generator is asynchronous:
one DEALER per robot (each says hello and reset), observations sent on a fixed schedule (robot i at phase i/N of
the period: evenly staggered), every reply read as it comes and decoded with `vigil.wire.protocol.decode`.
It waits on an epoll of the sockets' ZMQ_FDs (`zmq_poll` over 160 sockets costs ~200 µs a call here): a socket
is drained until `Again` when its FD is readable, and its events are checked after every send, since a send
may take in a waiting message's signal. The epoll is itself waited on with `select`, whose timeout has
microsecond resolution, so the generator neither spins nor reads a reply a millisecond late.

Measured per observation (after `--warmup-s`; the runtime's start-up and first telemetry message are left out):
the round trip (`perf_counter` before the send to the receipt of its `act`; a late act counts at its latency,
an observation never answered as ∞), a robot-side miss (no `act` before the robot's next period: later than
its scheduled send + 10 ms, or none, or an `error`), whether the act carries a `deadline` verdict (the runtime's
own judgement: arrival, dated from the robot's send, to decision over 10 ms), and the act's `queue_us` +
`decide_us` (the time the deadline is on). Per step: the runtime's CPU and its loop thread's wait for a CPU
(/proc), its counters at exit (`served.stop()`: ticks, `stale_dropped`, `planned_together`), the generator's
own lateness (actual send against schedule) and CPU, so that a saturated generator is not blamed on the
runtime, and the machine's CPU (steal included).

N goes up in steps (`--steps`), each configuration run `--repeats` times at each N (a fresh runtime each time,
pooled), the configurations interleaved (so a drift of the machine's load falls on all of them alike); a
configuration stops going up after a step where more than `--stop-miss-pct` of the observations missed. Raw
results go to bench/out/throughput.json; the section between the `throughput` markers of BENCHMARKS.md and
docs/figures/throughput.png are rendered from that file alone (`render`, `--report-only`).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.throughput                  # make bench-throughput (~6 min)
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.throughput --steps 5,20 --duration-s 2 --no-write   # smoke
    .venv/bin/python -m bench.throughput --report-only                      # the section again, from bench/out
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import multiprocessing as mp
import os
import select
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    BENCHMARKS,
    BENCHMARKS_INTRO,
    FIGURES,
    OUT,
    ROOT,
    markers,
    pyplot,
    raw_copy,
    read_raw,
    run_info,
    save_figure,
    write_raw,
    write_section,
    written_by,
)
from bench.fairness import (
    filed_alerts,
    loadavg,
    machine_jiffies,
    machine_shares,
    other_processes,
    proc_cpu_s,
    process_schedstat,
    schedstat,
)

NAME = "throughput"
RAW = OUT / "throughput.json"
FIGURE = FIGURES / "throughput.png"
BEGIN, END = markers(NAME)

BUNDLES = {"linear_gain": {"obs_dim": 3, "act_dim": 1, "about": "aircraft-pitch LQR, 3 floats in, 1 out"},
           "gaussian": {"obs_dim": 39, "act_dim": 4, "about": "MLP 39→256→256→4, random weights"}}
CONFIGS: dict[str, dict[str, Any]] = {
    "linear_gain": {"bundle": "linear_gain", "batch_plans": 1, "label": "linear_gain"},
    "gaussian": {"bundle": "gaussian", "batch_plans": 1, "label": "gaussian"},
    "gaussian-batch16": {"bundle": "gaussian", "batch_plans": 16, "label": "gaussian, --batch-plans 16"},
    "linear_gain-batch16": {"bundle": "linear_gain", "batch_plans": 16, "label": "linear_gain, --batch-plans 16"},
    # a diagnostic: the runtime's periodic telemetry message (1 s) computes two np.percentile per robot in its loop
    "gaussian-telemetry3600": {"bundle": "gaussian", "batch_plans": 1, "serve": {"telemetry_s": 3600},
                               "label": "gaussian, --telemetry-s 3600 (diagnostic)"},
}
DEFAULT_CONFIGS = "linear_gain,gaussian,gaussian-batch16,gaussian-telemetry3600"
DEFAULT_STEPS = "5,10,15,20,25,30,40,50"
MISS, DEADLINE, NEVER, ERROR, SAFE = 1, 2, 4, 8, 16  # per-observation flags
SEQ0 = 3  # a robot's observation seqs start here (1: hello, 2: reset)
SEND_STALL_US = 500  # an encode + send that took longer than this: the generator was descheduled in between
KEPT_SCHEDULE_US = 1000.0  # the generator kept its schedule: p99 of its send lateness at most a tenth of a period
SNAPSHOT_LEAD_S = 0.3  # the CPU snapshots: this long before the first measured observation
TICK_BEFORE_S, TICK_AFTER_S = 0.1, 0.2  # a burst "at a telemetry tick": this close to a whole second of runtime age
BURST_GAP_MS = 50.0  # deadline verdicts closer than this (by scheduled send) are one burst
OBS_POOL = 1024  # distinct observations the robots cycle through


# -- the load generator (a child process, alive across steps) -------------------------------------------------

def generator(conn, index: int, cpus: list[int] | None) -> None:
    """Plays the robots it is given, step after step. ("play", endpoint, spec) -> connects, hello and reset for
    every robot, ("ready", pid); heartbeats until ("go", t0); the schedule; ("done", result). ("quit",) ends it.
    `cpus`: the cores it (and its ZeroMQ I/O thread, started after) may run on."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    import zmq

    ctx = zmq.Context(io_threads=1)
    try:
        while True:
            cmd = conn.recv()
            if cmd[0] == "quit":
                return
            _, endpoint, spec = cmd
            try:
                conn.send(("done", play(ctx, conn, endpoint, spec)))
            except Exception:
                conn.send(("error", f"generator {index}: {traceback.format_exc()}"))
    finally:
        ctx.term()


def play(ctx, conn, endpoint: str, spec: dict[str, Any]) -> dict[str, Any]:
    import zmq

    from vigil.wire.protocol import ROBOT_KINDS, ArraySpec, Layout, Message, ProtocolError, decode, encode
    from vigil.wire.transport import readable, recv_frames, send_frames

    robots = sorted(spec["robots"], key=lambda r: r[1])  # [index, phase_s], by phase: the schedule is monotone
    n, rate = len(robots), float(spec["rate"])
    period = 1.0 / rate
    rounds = int(math.ceil((spec["warmup_s"] + spec["duration_s"]) * rate))
    total = n * rounds
    names = [f"robot-{i:03d}" for i, _ in robots]
    obs_spec = ArraySpec("state", "float32", (spec["obs_dim"],))
    act_spec = ArraySpec("action", "float32", (spec["act_dim"],))
    layout = Layout((act_spec,))
    rng = np.random.default_rng(spec["seed"])
    pool = list((spec["obs_scale"] * rng.standard_normal((OBS_POOL, spec["obs_dim"]))).astype(np.float32))
    offsets = [int(o) for o in rng.integers(0, OBS_POOL, n)]

    socks = []
    for _ in range(n):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        socks.append(s)
    try:
        hello = {"spec": {"observation": [obs_spec.to_dict()], "action": act_spec.to_dict()}, "env": NAME}
        handshake(socks, [Message("hello", name, 1, 0, {}, hello) for name in names])
        handshake(socks, [Message("reset", name, 2, 0, {}, {"episode": 0}) for name in names])
        conn.send(("ready", os.getpid()))
        hb = 10
        while not conn.poll(0.05):  # keep the sessions alive while the other generators get ready
            for j, s in enumerate(socks):
                send_frames(s, encode(Message("heartbeat", names[j], hb)))
                while readable(s):
                    recv_frames(s)
            hb += 1
        go = conn.recv()
        if go[0] != "go":
            raise RuntimeError(f"expected go, got {go[0]}")
        t0 = float(go[1])

        clock = time.perf_counter
        phases = np.asarray([p for _, p in robots])
        base = t0 - time.monotonic() + clock()  # t0 is on the monotonic clock; the schedule runs on perf_counter
        sched = (base + np.add.outer(np.arange(rounds) * period, phases).ravel()).tolist()
        t_first = base + spec["warmup_s"]  # the first measured send
        end = sched[-1] + 2 * period  # answers after this count as never
        sent = [0.0] * total
        recv = [0.0] * total
        runtime_us = [-1.0] * total
        flags = bytearray(total)
        verdicts: dict[str, int] = {}
        errors: dict[str, int] = {}
        counts = {"acts": 0, "extra_acts": 0, "other": 0, "bad": 0}
        send_s = [0.0] * total
        fd_index = {}
        ep = select.epoll()
        for j, s in enumerate(socks):
            fd = s.getsockopt(zmq.FD)
            fd_index[fd] = j
            ep.register(fd, select.EPOLLIN)
        epfd = ep.fileno()
        again = zmq.Again

        def drain(j: int) -> None:
            s = socks[j]
            while True:
                try:
                    frames = recv_frames(s, zmq.NOBLOCK)
                except again:
                    return
                t = clock()
                try:
                    msg = decode(frames, kinds=ROBOT_KINDS, layout=layout)
                except ProtocolError:
                    counts["bad"] += 1
                    continue
                kind = msg.kind
                m = (msg.seq - SEQ0) * n + j
                if kind == "act":
                    meta = msg.meta
                    for v in meta.get("verdicts", ()):
                        verdicts[v[0]] = verdicts.get(v[0], 0) + 1
                    if 0 <= m < total and not recv[m]:
                        counts["acts"] += 1
                        recv[m] = t
                        f = SAFE if meta.get("safe") else 0
                        if any(v[0] == "deadline" for v in meta.get("verdicts", ())):
                            f |= DEADLINE
                        flags[m] |= f
                        if "queue_us" in meta:
                            runtime_us[m] = meta["queue_us"] + meta["decide_us"]
                    else:  # a link-loss act for an earlier observation
                        counts["extra_acts"] += 1
                elif kind == "error":
                    code = str(msg.meta.get("code", "?"))
                    errors[code] = errors.get(code, 0) + 1
                    if 0 <= m < total:
                        flags[m] |= ERROR
                else:
                    counts["other"] += 1

        gc.collect()
        gc.disable()  # no collector pauses in the schedule
        m, cpu0, sched0, lag_wait = 0, None, None, 0
        try:
            while True:
                now = clock()
                while m < total and sched[m] <= now:
                    j = m % n
                    r = m // n
                    if cpu0 is None and sched[m] >= t_first:
                        cpu0, sched0 = time.process_time(), schedstat()
                    obs = pool[(offsets[j] + r) % OBS_POOL]
                    t = sent[m] = clock()  # t_ns, from which the runtime dates the arrival, is taken in encode
                    send_frames(socks[j], encode(Message("obs", names[j], SEQ0 + r, 0, {"state": obs})))
                    send_s[m] = clock() - t  # long: descheduled between dating and sending
                    m += 1
                    if readable(socks[j]):  # the send may have taken in the signal of a waiting reply
                        drain(j)
                    now = clock()
                for fd, _ in ep.poll(0):
                    drain(fd_index[fd])
                wait = (sched[m] if m < total else end) - clock()
                if wait > 0:
                    select.select([epfd], [], [], wait)
                elif m >= total:
                    break
                else:
                    lag_wait += 1
        finally:
            gc.enable()
            ep.close()
        cpu = time.process_time() - cpu0 if cpu0 is not None else 0.0
        sched_wait = np.subtract(schedstat(), sched0).tolist() if sched0 is not None else [0.0, 0.0]
        window = sched[-1] - t_first
    finally:
        for s in socks:
            s.close(linger=0)

    sched_a, sent_a, recv_a = np.asarray(sched), np.asarray(sent), np.asarray(recv)
    fl = np.frombuffer(bytes(flags), np.uint8).copy()
    answered = recv_a > 0
    fl[~answered] |= NEVER
    fl[~answered | (recv_a > sched_a + period) | ((fl & ERROR) > 0)] |= MISS
    rtt = np.where(answered, (recv_a - sent_a) * 1e6, -1.0)
    keep = sched_a >= t_first
    return {"robots": [int(i) for i, _ in robots], "n": n, "rounds": rounds,
            "robot_of": np.tile(np.arange(n, dtype=np.int32), rounds)[keep],
            "rtt_us": np.round(rtt[keep]).astype(np.int64), "runtime_us": np.round(np.asarray(runtime_us)[keep]),
            "flags": fl[keep], "t_ms": np.round((sched_a[keep] - t_first) * 1e3, 1),
            "late_us": np.round((sent_a - sched_a)[keep] * 1e6).astype(np.int64),
            "warmup": {"obs": int((~keep).sum()), "misses": int(((fl[~keep] & MISS) > 0).sum()),
                       "deadline": int(((fl[~keep] & DEADLINE) > 0).sum())},
            "verdicts": verdicts, "errors": errors, **counts, "cpu_s": cpu, "window_s": window,
            "send_us": np.round(np.asarray(send_s)[keep] * 1e6).astype(np.int64), "on_cpu_s": sched_wait[0],
            "runqueue_wait_s": sched_wait[1], "behind": lag_wait}


def handshake(socks: list, msgs: list, timeout_s: float = 30.0) -> None:
    """Send one message on every socket at once and wait for each one's answer (same seq); an `error` answer
    raises."""
    import zmq

    from vigil.wire.protocol import ROBOT_KINDS, decode, encode
    from vigil.wire.transport import recv_frames, send_frames

    for s, msg in zip(socks, msgs):
        send_frames(s, encode(msg))
    waiting = dict(enumerate(socks))
    deadline = time.monotonic() + timeout_s
    while waiting:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(waiting)} of {len(socks)} robots got no answer to {msgs[0].kind} "
                               f"within {timeout_s} s")
        for s, _ in zmq.zmq_poll([(s, zmq.POLLIN) for s in waiting.values()], 100):
            j = next(k for k, v in waiting.items() if v is s)
            reply = decode(recv_frames(s), kinds=ROBOT_KINDS)
            if reply.kind == "error":
                raise RuntimeError(f"{msgs[j].robot}: {msgs[j].kind} refused: {dict(reply.meta)}")
            if reply.seq == msgs[j].seq:
                del waiting[j]


class Generators:
    """The generator processes, alive across steps (each step's robots are dealt to them in turn)."""

    def __init__(self, count: int, pin: bool):
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        cores = sorted(os.sched_getaffinity(0))
        # pinned: generator i on the i-th core from the end, so the runtime always has the others to itself
        self.cpus = [[cores[-1 - i]] if pin and len(cores) > count else None for i in range(count)]
        for i in range(count):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=generator, args=(child, i, self.cpus[i]), name=f"throughput-generator-{i}",
                            daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)

    def close(self) -> None:
        for conn, p in zip(self.conns, self.procs):
            try:
                conn.send(("quit",))
            except (OSError, BrokenPipeError):
                pass
            p.join(timeout=10)
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


# -- bundles and steps -----------------------------------------------------------------------------------------

def export_bundles(folder: Path, names: set[str]) -> dict[str, dict[str, Any]]:
    """The bundles of bench/latency.py that `names` asks for: the aircraft-pitch LQR (`linear_gain`) and the
    39-256-256-4 MLP at 100 Hz (`gaussian`, torch seed 0)."""
    import json

    if "linear_gain" in names:
        from vigil.training.lqr import export_lqr

        export_lqr("aircraft-pitch", folder / "linear_gain")
    if "gaussian" in names:
        import torch

        from vigil.training.export import export_gaussian

        torch.manual_seed(0)
        actor = torch.nn.Sequential(torch.nn.Linear(39, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                    torch.nn.ReLU(), torch.nn.Linear(256, 4))
        export_gaussian(folder / "gaussian", "bench-mlp-256x256", actor, 39, [-1.0] * 4, [1.0] * 4,
                        control_rate_hz=100)
    out = {}
    for name, b in BUNDLES.items():
        if name not in names:
            continue
        manifest = json.loads((folder / name / "manifest.json").read_text())
        out[name] = {**b, "policy_id": manifest.get("policy_id", name),
                     "control_rate_hz": manifest.get("control_rate_hz"),
                     "obs_shape": manifest["observation"][0]["shape"], "act_shape": manifest["action"]["shape"]}
    return out


def one_step(gens: Generators, args: argparse.Namespace, bundles: Path, workdir: Path, config: str, n: int,
             seed: int) -> dict[str, Any]:
    """A fresh runtime, N robots on it for warm-up + duration, its counters; the generators' results merged."""
    workdir.mkdir(parents=True, exist_ok=True)
    store_dir = Path(tempfile.mkdtemp(prefix="throughput-store-", dir=args.store_dir)) if args.store_dir else workdir
    try:
        return drive(gens, args, bundles, workdir, store_dir, config, n, seed)
    finally:
        if args.store_dir:
            shutil.rmtree(store_dir, ignore_errors=True)


def drive(gens: Generators, args: argparse.Namespace, bundles: Path, workdir: Path, store_dir: Path, config: str,
          n: int, seed: int) -> dict[str, Any]:
    from vigil.runtime.launch import start_serve

    cfg = CONFIGS[config]
    b = BUNDLES[cfg["bundle"]]
    served = start_serve(bundles / cfg["bundle"], workdir, env={"OMP_NUM_THREADS": "1"}, mode="realtime",
                         deadline_ms=f"{args.deadline_ms:g}", log_level="WARNING", store=str(store_dir / "alerts.db"),
                         batch_plans=cfg["batch_plans"] if cfg["batch_plans"] > 1 else None,
                         **{**cfg.get("serve", {}), **serve_flags(args.serve_args)})
    ready_at = time.monotonic()  # (the runtime printed its ready line just before: its timers count from about here)
    period = 1.0 / args.rate
    g = len(gens.conns)
    members = list(zip(gens.conns, gens.procs))
    try:
        for k, (conn, _) in enumerate(members):
            robots = [[i, i * period / n] for i in range(k, n, g)]
            conn.send(("play", served.robot_endpoint, {
                "robots": robots, "rate": args.rate, "warmup_s": args.warmup_s, "duration_s": args.duration_s,
                "obs_dim": b["obs_dim"], "act_dim": b["act_dim"], "obs_scale": 0.5, "seed": seed + k}))
        for conn, p in members:
            expect(conn, p, "ready", 60)
        t0 = time.monotonic() + 0.2
        age = t0 - ready_at
        for conn, _ in members:
            conn.send(("go", t0))
        pid = served.proc.pid
        # The CPU snapshots (a scan of /proc: milliseconds of CPU) are taken outside the measured observations, in
        # the warm-up and after the last answer is due, and on the generator's core: never in the runtime's way.
        cpus = gens.cpus[0]
        time.sleep(max(0.0, t0 + args.warmup_s - SNAPSHOT_LEAD_S - time.monotonic()))
        with on_cpus(cpus):
            cpu0, sched0, jif0, all0 = proc_cpu_s(pid), process_schedstat(pid), machine_jiffies(), all_cpu()
            w0 = time.monotonic()
        time.sleep(max(0.0, t0 + args.warmup_s + args.duration_s + 3 / args.rate - time.monotonic()))
        with on_cpus(cpus):
            cpu1, sched1, jif1, all1 = proc_cpu_s(pid), process_schedstat(pid), machine_jiffies(), all_cpu()
            window = time.monotonic() - w0
            ours = {pid, os.getpid(), *(p.pid for p in gens.procs)}
            others, others_cpu_s = busiest(all0, all1, window, ours), used_cpu(all0, all1, ours)
        parts = [expect(conn, p, "done", 60 + args.duration_s) for conn, p in members]
    except BaseException:
        served.kill()
        raise
    counters = served.stop()
    alerts = filed_alerts(store_dir / "alerts.db")
    merged: dict[str, Any] = {}
    for key in ("rtt_us", "runtime_us", "flags", "t_ms", "late_us", "send_us"):
        merged[key] = np.concatenate([p[key] for p in parts])
    merged["robot"] = np.concatenate([np.asarray(p["robots"], np.int32)[p["robot_of"]] for p in parts])
    gens_out = [{k: p[k] for k in ("n", "cpu_s", "window_s", "on_cpu_s", "runqueue_wait_s", "behind", "acts",
                                   "extra_acts", "other", "bad", "warmup")} for p in parts]
    return {"config": config, "n": n, **merged, "verdicts": add_counts(p["verdicts"] for p in parts),
            "errors": add_counts(p["errors"] for p in parts), "generators": gens_out, "counters": counters,
            "alerts": alerts, "runtime_cpu_s": cpu1 - cpu0, "window_s": window, "others": others,
            "others_cpu_s": others_cpu_s, "runtime_age_at_t0_s": age,
            "runtime_sched": {k: sched1[k] - sched0[k] for k in sched0}, "machine_shares": machine_shares(jif0, jif1),
            "cores": len(os.sched_getaffinity(0)), "loadavg": loadavg()}


@contextlib.contextmanager
def on_cpus(cpus: list[int] | None):
    """Run this process (this thread) on `cpus` for a while (None: leave it where it is)."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def all_cpu() -> dict[int, tuple[float, str]]:
    """CPU seconds so far and name of every process (from /proc/PID/stat)."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            head, _, rest = (d / "stat").read_text().rpartition(")")
            fields = rest.split()
            out[int(d.name)] = ((int(fields[11]) + int(fields[12])) / tick, head.partition("(")[2])
        except (OSError, ValueError, IndexError):
            continue
    return out


def used_cpu(before: dict[int, tuple[float, str]], after: dict[int, tuple[float, str]], ours: set[int]) -> float:
    """CPU seconds every other process (kernel threads included) used between the two snapshots; a process that
    started and ended between them is not seen. Per-process CPU is exact (the scheduler's runtime), unlike the
    machine-wide split of /proc/stat, which is sampled at the timer tick and aliases with a 100 Hz load."""
    return sum(cpu - before[pid][0] if pid in before else cpu for pid, (cpu, _) in after.items() if pid not in ours)


def busiest(before: dict[int, tuple[float, str]], after: dict[int, tuple[float, str]], window: float,
            ours: set[int], top: int = 4) -> list[list]:
    """The processes besides the runtime, the generators and this one that used the most CPU in the window:
    [% of a core, pid, name, command line (cut)]."""
    rows = []
    for pid, (cpu, name) in after.items():
        used = cpu - before.get(pid, (0.0, ""))[0] if pid in before else cpu
        if pid in ours or used <= 0.02 * window:
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = ""
        rows.append([100 * used / window, pid, name, (cmd or name)[:90]])
    return sorted(rows, reverse=True)[:top]


def serve_flags(text: str) -> dict[str, Any]:
    """`--serve-args "--telemetry-s 3600 --busy-poll-us 0"` as start_serve flags (a bare `--switch` is True)."""
    import shlex

    words, flags = shlex.split(text), {}
    for i, w in enumerate(words):
        if w.startswith("--"):
            nxt = words[i + 1] if i + 1 < len(words) else None
            flags[w[2:].replace("-", "_")] = nxt if nxt is not None and not nxt.startswith("--") else True
    return flags


def add_counts(counts) -> dict[str, int]:
    """Counters by name, summed over the generators."""
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + v
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    configs = [c for c in args.configs.split(",") if c]
    steps = [int(s) for s in args.steps.split(",") if s]
    info = run_info(env="OMP_NUM_THREADS=1")
    t_start = time.monotonic()
    result: dict[str, Any] = {"run": info, "args": vars(args), "other_processes": other_processes(),
                              "loadavg_start": loadavg(), "steps": [], "stopped": {}}
    rng = np.random.default_rng(args.seed)
    plan = [(n, rep, c) for n in steps for rep in range(args.repeats)
            for c in (configs if rep % 2 == 0 else configs[::-1])]  # the order reversed every other repeat
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        tmp_path = Path(tmp)
        gens = Generators(args.generators, not args.no_pin)  # they start while the bundles are exported
        result["generator_cpus"] = gens.cpus
        try:
            result["bundles"] = export_bundles(tmp_path / "bundles", {CONFIGS[c]["bundle"] for c in configs})
            bar = tqdm(plan, unit="step", disable=args.no_progress, desc=f"throughput {len(configs)} configurations")
            for k, (n, repeat, config) in enumerate(bar):
                if n > result["stopped"].get(config, n):
                    continue
                bar.set_postfix_str(f"{config} N={n} repeat {repeat}", refresh=True)
                step = one_step(gens, args, tmp_path / "bundles", tmp_path / f"step{k}", config, n,
                                int(rng.integers(2**31)))
                step = raw_copy({**step, "index": k, "repeat": repeat})
                result["steps"].append(step)
                s = summarise([step], args.rate)
                bar.write(f"{config:20s} N={n:4d} #{repeat}: deadline {s['deadline']:5d}, misses {s['misses']:5d} "
                          f"({s['miss_pct']:.2f}%), p50/p99 {num(s['rtt']['p50'])}/{num(s['rtt']['p99'])} us, runtime "
                          f"{s['runtime_cpu_pct']:.0f}% CPU, generator {s['gen_cpu_pct']:.0f}% CPU lateness p99 "
                          f"{num(s['late']['p99'])} us, machine {s['machine_busy_pct']:.0f}% busy")
                if s["miss_pct"] > args.stop_miss_pct:  # its other repeats at this N still run, no higher N
                    result["stopped"][config] = n
        finally:
            gens.close()
    result["seconds"] = time.monotonic() - t_start
    result["loadavg_end"] = loadavg()
    return result


# -- analysis (from the raw results alone) ---------------------------------------------------------------------

def pct(x: Any) -> dict[str, float]:
    """Order-statistic percentiles (an ∞, an observation never answered, sorts last)."""
    x = np.asarray(x, float)
    x = x[~np.isnan(x)]
    if len(x) == 0:
        return {"n": 0, "p50": math.nan, "p99": math.nan, "p999": math.nan, "max": math.nan}
    p50, p99, p999 = np.percentile(x, [50, 99, 99.9], method="inverted_cdf")
    return {"n": int(len(x)), "p50": float(p50), "p99": float(p99), "p999": float(p999), "max": float(x.max())}


def summarise(steps: list[dict[str, Any]], rate: float) -> dict[str, Any]:
    """The figures of one configuration at one N: its repeats pooled (observations together, CPU over the summed
    windows)."""
    cat = lambda key: np.concatenate([np.asarray(s[key]) for s in steps])  # noqa: E731
    flags = cat("flags").astype(int)
    rtt = cat("rtt_us").astype(float)
    rtt[rtt < 0] = math.inf
    runtime = cat("runtime_us").astype(float)
    runtime[runtime < 0] = math.nan
    obs = len(flags)
    gens = [g for s in steps for g in s["generators"]]
    window = sum(s["window_s"] for s in steps)
    gen_window = sum(s["window_s"] for s in steps)  # the generators run side by side: their CPU adds up
    missed = (flags & MISS) > 0
    deadline = (flags & DEADLINE) > 0
    stalled = cat("send_us") > SEND_STALL_US
    bursts = [b for st in steps for b in verdict_bursts(st)]
    late = pct(cat("late_us"))
    runtime_cpu_s = sum(s["runtime_cpu_s"] for s in steps)
    runtime_cpu = 100 * runtime_cpu_s / window
    gen_cpu = 100 * sum(g["cpu_s"] for g in gens) / gen_window
    rest_cpu = 100 * sum(s["others_cpu_s"] for s in steps) / window
    machine_busy = (runtime_cpu + gen_cpu + rest_cpu) / steps[0]["cores"]  # % of all cores
    counters = lambda key: sum(int(s["counters"].get(key, 0) or 0) for s in steps)  # noqa: E731
    return {
        "n": steps[0]["n"], "repeats": len(steps), "obs": obs,
        "deadline": int(deadline.sum()), "deadline_per_repeat": [int(((np.asarray(s["flags"]) & DEADLINE) > 0).sum())
                                                                for s in steps],
        "misses": int(missed.sum()), "send_stalls": int(stalled.sum()), "bursts": bursts,
        "deadline_stalled": int((deadline & stalled).sum()),
        "runtime_cpu_per_act_us": 1e6 * runtime_cpu_s / max(1, int(np.isfinite(rtt).sum())),
        "miss_pct": 100 * missed.mean() if obs else math.nan,
        "deadline_pct": 100 * deadline.mean() if obs else math.nan,
        "never": int(((flags & NEVER) > 0).sum()), "errors": int(((flags & ERROR) > 0).sum()),
        "rtt": pct(rtt), "runtime": pct(runtime), "late": late,
        "warmup_deadline": sum(g["warmup"]["deadline"] for g in gens),
        "warmup_misses": sum(g["warmup"]["misses"] for g in gens),
        "kept_schedule": bool(late["p99"] <= KEPT_SCHEDULE_US),
        "gen_cpu_pct": gen_cpu,
        "gen_wait_pct": 100 * sum(g["runqueue_wait_s"] for g in gens) / gen_window,
        "runtime_cpu_pct": runtime_cpu,
        "runtime_wait_pct": 100 * sum(s["runtime_sched"]["main_wait_s"] for s in steps) / window,
        "machine_busy_pct": machine_busy,
        "rest_cpu_pct": rest_cpu,
        "steal_pct": float(np.average([s["machine_shares"].get("steal", 0.0) for s in steps],
                                      weights=[s["window_s"] for s in steps])),
        "alerts": sum(v for s in steps for v in s["alerts"].values() if isinstance(v, int)),
        "ticks": counters("ticks"), "stale_dropped": counters("stale_dropped"),
        "planned_together": counters("planned_together"),
    }


def verdict_bursts(step: dict[str, Any], gap_ms: float = BURST_GAP_MS) -> list[list[float]]:
    """The step's `deadline` verdicts in bursts (runs of verdicts less than `gap_ms` apart, by the observations'
    scheduled send): [start (ms into the window), length (ms), verdicts] each."""
    t = np.sort(np.asarray(step["t_ms"], float)[(np.asarray(step["flags"]) & DEADLINE) > 0])
    if not len(t):
        return []
    groups = np.split(t, np.nonzero(np.diff(t) > gap_ms)[0] + 1)
    return [[float(g[0]), float(g[-1] - g[0]), len(g)] for g in groups]


def burst_alignment(raw: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """{config: (bursts that began near a whole second of the runtime's age, bursts)}, over every step that
    recorded the runtime's age (`runtime_age_at_t0_s`: from its ready line to the schedule's start)."""
    out: dict[str, tuple[int, int]] = {}
    warmup = raw["args"]["warmup_s"]
    for config in [c for c in raw["args"]["configs"].split(",") if c]:
        k = n = 0
        for step in raw["steps"]:
            if step["config"] != config or "runtime_age_at_t0_s" not in step:
                continue
            for start_ms, _, _ in verdict_bursts(step):
                age = step["runtime_age_at_t0_s"] + warmup + start_ms / 1e3
                n += 1
                k += (age + TICK_BEFORE_S) % 1.0 < TICK_BEFORE_S + TICK_AFTER_S
        out[config] = (k, n)
    return out


def analyse(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """{config: {"steps": [summary by N], "best": largest N with zero deadline verdicts, "next": the first step above it
    that had some, "clean_below": every smaller N clean too}}."""
    rate = raw["args"]["rate"]
    out: dict[str, dict[str, Any]] = {}
    for config in [c for c in raw["args"]["configs"].split(",") if c]:
        ns = sorted({s["n"] for s in raw["steps"] if s["config"] == config})
        steps = [summarise([s for s in raw["steps"] if s["config"] == config and s["n"] == n], rate) for n in ns]
        clean = [s for s in steps if s["deadline"] == 0]
        best = clean[-1]["n"] if clean else None
        above = [s for s in steps if best is None or s["n"] > best]
        out[config] = {"steps": steps, "best": best, "next": above[0] if above else None,
                       "clean_below": all(s["deadline"] == 0 for s in steps if best is not None and s["n"] < best),
                       "dirty_below": [s["n"] for s in steps if best is not None and s["n"] < best and s["deadline"]],
                       "stopped": raw["stopped"].get(config)}
    return out


def limit(s: dict[str, Any]) -> str:
    """What limited a step that had deadline verdicts: a generator short of CPU itself, the runtime's core, the
    machine's two cores (the runtime's loop waiting for a CPU), or none of them (isolated stalls)."""
    gen = (f"the generator {'kept' if s['kept_schedule'] else 'did not keep'} its schedule (send lateness p99 "
           f"{num(s['late']['p99'])} µs, {s['gen_cpu_pct']:.0f}% CPU, waiting for a CPU {s['gen_wait_pct']:.0f}% of "
           "the time)")
    if not s["kept_schedule"] and s["gen_cpu_pct"] >= 85:
        return f"the generator, short of CPU: {gen}"
    if s["runtime_cpu_pct"] >= 85:
        return f"the runtime's CPU ({s['runtime_cpu_pct']:.0f}% of a core); {gen}"
    if s["machine_busy_pct"] >= 90:
        return (f"the machine: both cores {s['machine_busy_pct']:.0f}% busy (runtime {s['runtime_cpu_pct']:.0f}% of "
                f"a core, its loop waiting for a CPU {s['runtime_wait_pct']:.0f}% of the time; everything else on the "
                f"machine {s['rest_cpu_pct']:.0f}% of a core); {gen}")
    longest = max((b[1] for b in s["bursts"]), default=0.0)
    return (f"stalls, not saturation: the verdicts came in {len(s['bursts'])} burst(s), the longest {longest:.0f} ms, "
            f"while the runtime used {s['runtime_cpu_pct']:.0f}% of a core (its loop waiting for a CPU "
            f"{s['runtime_wait_pct']:.0f}% of the time) and the machine was {s['machine_busy_pct']:.0f}% busy; {gen}")


# -- the report ------------------------------------------------------------------------------------------------

def num(x: Any, spec: str = ".0f") -> str:
    if x is None:
        return "–"
    x = float(x)
    return "∞" if x == math.inf else "–" if not math.isfinite(x) else format(x, spec)


def table(summ: dict[str, dict[str, Any]]) -> list[str]:
    head = ["configuration", "N", "observations measured (repeats)", "**`deadline` verdicts (runtime)**",
            "robot-side misses (%)", "round trip p50 / p99 / max (µs)", "runtime: arrival to decision p99 (µs)",
            "runtime CPU % (its loop waiting for a CPU %); CPU µs per act", "runtime: ticks / `stale_dropped` / "
            "`planned_together`",
            "alerts filed", "generator: send lateness p50 / p99 (µs); CPU %, waiting %", "generator kept schedule",
            "machine: busy %, the rest of it (% of a core), steal %"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 3) + "---|---:|"]
    for config, a in summ.items():
        for s in a["steps"]:
            together = (f"{s['planned_together']:,} ({100 * s['planned_together'] / max(1, s['ticks']):.0f}%)"
                        if CONFIGS[config]["batch_plans"] > 1 else "–")
            lines.append("| " + " | ".join([
                CONFIGS[config]["label"], str(s["n"]), f"{s['obs']:,} ({s['repeats']})",
                f"**{s['deadline']:,}**" + (f" ({' + '.join(map(str, s['deadline_per_repeat']))}; "
                                            f"{s['deadline_pct']:.2f}%; {len(s['bursts'])} bursts, the longest "
                                            f"{max(b[1] for b in s['bursts']):.0f} ms; {s['deadline_stalled']:,} "
                                            "send-stalled)" if s["deadline"] else ""),
                f"{s['misses']:,} ({s['miss_pct']:.2f})", " / ".join(num(s["rtt"][k]) for k in ("p50", "p99", "max")),
                num(s["runtime"]["p99"]),
                f"{s['runtime_cpu_pct']:.0f} ({s['runtime_wait_pct']:.0f}); {num(s['runtime_cpu_per_act_us'])}",
                f"{s['ticks']:,} / {s['stale_dropped']:,} / {together}", str(s["alerts"]),
                f"{num(s['late']['p50'])} / {num(s['late']['p99'])}; {s['gen_cpu_pct']:.0f}, {s['gen_wait_pct']:.0f}",
                "yes" if s["kept_schedule"] else "**no**",
                f"{s['machine_busy_pct']:.0f}, {s['rest_cpu_pct']:.0f}, {s['steal_pct']:.1f}"]) + " |")
    return lines


def conclusion(config: str, a: dict[str, Any], rate: float) -> str:
    label = CONFIGS[config]["label"]
    if a["best"] is None:
        first = a["steps"][0] if a["steps"] else None
        return (f"- {label}: **no N tested ran without a runtime deadline verdict**"
                + (f" (N = {first['n']}: {first['deadline']:,}; limited by {limit(first)})." if first else "."))
    line = f"- {label}: **{a['best']} robots at {rate:g} Hz with zero runtime deadline verdicts**"
    nxt = a["next"]
    if nxt is None:
        line += " (the largest N tested)"
    else:
        line += (f"; at N = {nxt['n']}: {nxt['deadline']:,} verdicts ({nxt['deadline_pct']:.2f}% of the "
                 f"observations), {nxt['miss_pct']:.2f}% robot-side misses, p99 {num(nxt['rtt']['p99'])} µs; "
                 f"limited by {limit(nxt)}")
    if a["dirty_below"]:
        line += f" (but a smaller N had verdicts: N = {', '.join(map(str, a['dirty_below']))})"
    if a["stopped"] is not None:
        line += f"; not run above N = {a['stopped']} (more than the stop threshold of the observations missed)"
    return line + "."


def setup(raw: dict[str, Any]) -> str:
    """The setup paragraph of the section."""
    a = argparse.Namespace(**{"serve_args": "", "store_dir": "", **raw["args"]})
    cores = raw["run"]["machine"].get("cores", "?")
    served = []
    for name, b in raw["bundles"].items():
        rate = num(b["control_rate_hz"], "g")
        served.append(f"`{name}` ({b['about']}; " + (f"{rate} Hz" if rate == f"{a.rate:g}" else
                                                     f"the bundle says {rate} Hz, served at {a.rate:g} Hz all the same")
                      + ")")
    pins = raw.get("generator_cpus") or []
    pinned = (f", pinned to core {', '.join(str(c[0]) for c in pins)} so that the runtime keeps the other"
              if pins and all(pins) else "")
    return (f"**Setup.** One `vigil serve` per step (a fresh one every step; `--mode realtime --deadline-ms "
            f"{a.deadline_ms:g}{' ' + a.serve_args if a.serve_args else ''}`, its alert store "
            + (f"under {a.store_dir}" if a.store_dir else "on disk, as shipped")
            + f") serving {' or '.join(served)}, the bundles of the latency section; `--batch-plans 16` lets the "
            "runtime plan the waiting observations of up to 16 robots in one onnxruntime call. "
            f"**{a.generators} load-generator process{'es' if a.generators > 1 else ''}** (on {cores} cores{pinned}) "
            f"play{'s' if a.generators == 1 else ''} N robots at {a.rate:g} Hz: one DEALER per robot (hello, reset), "
            f"an observation per robot every {1e3 / a.rate:g} ms on a fixed schedule, the robots' phases evenly "
            "staggered over the period, replies read as they come (an epoll of the sockets' ZMQ_FDs, waited on with "
            "microsecond timeouts) and every one decoded. "
            f"{a.duration_s:g} s measured per step after {a.warmup_s:g} s of warm-up, {a.repeats} steps (repeats) per "
            "configuration and N, pooled; the configurations interleaved at each N (their order reversed every other "
            "repeat); a configuration goes no higher after a step in which more than "
            f"{a.stop_miss_pct:g}% of the observations missed. *Round trip*: send to receipt of the observation's "
            "`act`, late acts at their latency, an observation never answered as ∞. *Robot-side miss*: no `act` before "
            f"the robot's next period (its scheduled send + {1e3 / a.rate:g} ms). *`deadline` verdicts*: acts whose "
            f"`verdicts` carry the runtime's deadline monitor (arrival, dated from the robot's send, to decision over "
            f"{a.deadline_ms:g} ms: the runtime sent the safe action; in brackets: per repeat, their share, and how "
            f"many were send-stalled; *bursts*: runs of verdicts less than {BURST_GAP_MS:g} ms apart). *Arrival to "
            "decision*: the acts' `queue_us` + `decide_us`. "
            f"*Generator kept schedule*: its send lateness p99 at most {KEPT_SCHEDULE_US:g} µs. "
            f"*Send-stalled*: verdicts on observations whose encode + send took over {SEND_STALL_US} µs (the generator "
            "was descheduled after dating the observation, which the runtime counts as queueing). *CPU µs per act*: "
            "the runtime's CPU (all its threads) over the acts it sent in the window. *Machine*: the CPU of every "
            "process (the runtime, the generator and the rest: all other processes, kernel threads included; each "
            "process's own CPU time, exact, unlike /proc/stat's tick-sampled split) in % of all the cores; *the rest "
            "of it* in % of one core; *steal* from /proc/stat.")


def render(raw: dict[str, Any]) -> str:
    """The BENCHMARKS.md section, from the raw results alone."""
    a = argparse.Namespace(**raw["args"])
    summ = analyse(raw)
    run = raw["run"]
    m = run["machine"]
    lines = [BEGIN, "## Throughput: robots at 100 Hz one runtime serves", "",
             written_by(run, seconds=raw["seconds"]) + f" (`make bench-throughput`). Memory {m.get('memory', '?')}; "
             f"{m.get('OS', '?')}; {m.get('vigil environment', '')}. Load average {' '.join(raw['loadavg_start'])} "
             f"at the start, {' '.join(raw['loadavg_end'])} at the end"
             + (f"; other processes busy at the start: {'; '.join(raw['other_processes'])}."
                if raw["other_processes"] else "; no other busy process at the start."), "",
             setup(raw), "",
             *table(summ), "", f"Largest N with zero runtime `deadline` verdicts (of N = {a.steps}):", ""]
    lines += [conclusion(c, s, a.rate) for c, s in summ.items()]
    batched = [c for c in summ if CONFIGS[c]["batch_plans"] > 1]
    for c in batched:
        tot = sum(s["planned_together"] for s in summ[c]["steps"])
        ticks = sum(s["ticks"] for s in summ[c]["steps"])
        lines.append(f"- {CONFIGS[c]['label']}: {tot:,} of {ticks:,} ticks ({100 * tot / max(1, ticks):.1f}%) were "
                     "planned together with another robot's (the runtime's `planned_together` counter, all steps).")
    aligned = burst_alignment(raw)
    if any(n for _, n in aligned.values()):
        lines += ["", f"Bursts of `deadline` verdicts that began within {TICK_BEFORE_S * 1e3:.0f} ms before to "
                  f"{TICK_AFTER_S * 1e3:.0f} ms after a whole second of the runtime's age (when its periodic telemetry "
                  "message, every second by default, is due; by chance "
                  f"{100 * (TICK_BEFORE_S + TICK_AFTER_S):.0f}% would): "
                  + "; ".join(f"{CONFIGS[c]['label']}: {k} of {n}" for c, (k, n) in aligned.items()) + "."]
    worst: dict[str, float] = {}
    for step in raw["steps"]:
        for cpu, _, _, cmd in step.get("others", []):
            worst[cmd] = max(worst.get(cmd, 0.0), cpu)
    if worst:
        top = sorted(worst.items(), key=lambda kv: -kv[1])[:4]
        lines += ["", "Other processes busiest in the measured windows (the most each used in one step, % of a core): "
                  + "; ".join(f"{cpu:.0f}% `{cmd}`" for cmd, cpu in top) + "."]
    lines += ["", f"![p99 round trip, misses and runtime CPU against N]({FIGURE.relative_to(ROOT).as_posix()})", "",
              "Raw results: `bench/out/throughput.json` (every measured observation's round trip, arrival-to-decision "
              "time, send lateness and flags, per step); `--report-only` renders this section and the figure again "
              "from it.", END]
    return "\n".join(lines)


def plot(raw: dict[str, Any], path: Path = FIGURE) -> Path:
    """p99 round trip, misses and deadline verdicts, and the CPU of the runtime, the generator and the rest of the
    machine against N, per configuration."""
    plt = pyplot()
    summ = analyse(raw)
    a = argparse.Namespace(**raw["args"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    finite = [s["rtt"]["p99"] for an in summ.values() for s in an["steps"] if math.isfinite(s["rtt"]["p99"])]
    ceiling = 2 * max([a.deadline_ms * 1e3, *finite])  # where an unbounded p99 (observations never answered) is drawn
    rest: dict[int, list[float]] = {}
    for k, (config, an) in enumerate(summ.items()):
        steps = an["steps"]
        if not steps:
            continue
        n = [s["n"] for s in steps]
        color = f"C{k}"
        label = CONFIGS[config]["label"]
        p99 = [s["rtt"]["p99"] if math.isfinite(s["rtt"]["p99"]) else ceiling for s in steps]
        axes[0].plot(n, p99, "-", color=color, label=label)
        for x, y in zip(n, p99):
            axes[0].plot([x], [y], "^" if y == ceiling else "o", color=color)
        if an["best"] is not None:
            best = next(s for s in steps if s["n"] == an["best"])
            axes[0].plot([best["n"]], [best["rtt"]["p99"]], "*", ms=15, color=color, mec="k")
        axes[1].plot(n, [s["miss_pct"] for s in steps], "o-", color=color, label=f"{label}: robot-side misses")
        axes[1].plot(n, [s["deadline_pct"] for s in steps], "x--", color=color, label=f"{label}: `deadline` verdicts")
        axes[2].plot(n, [s["runtime_cpu_pct"] for s in steps], "o-", color=color, label=f"{label}: runtime")
        axes[2].plot(n, [s["gen_cpu_pct"] for s in steps], "x:", color=color, label=f"{label}: generator")
        for s in steps:
            rest.setdefault(s["n"], []).append(s["rest_cpu_pct"])
    if rest:
        ns = sorted(rest)
        axes[2].plot(ns, [float(np.mean(rest[x])) for x in ns], "s-", color="0.55", lw=1,
                     label="the rest of the machine (mean)")
    axes[0].axhline(a.deadline_ms * 1e3, color="r", lw=0.8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("round trip p99 (µs)")
    axes[0].set_title(f"p99 round trip (red: the {a.deadline_ms:g} ms deadline)\n▲: ∞ (observations never answered);"
                      " ★: largest N without a verdict", fontsize=8.5)
    axes[1].set_yscale("symlog", linthresh=0.01)
    axes[1].set_ylabel("% of the observations")
    axes[1].set_title("robot-side misses (o) and runtime `deadline` verdicts (x)", fontsize=8.5)
    axes[2].set_ylabel("% of one core")
    axes[2].set_title(f"CPU over the measured windows ({raw['run']['machine'].get('cores', '?')} cores in all)",
                      fontsize=8.5)
    for ax in axes:
        ax.set_xlabel(f"robots at {a.rate:g} Hz (N)")
        ax.grid(alpha=0.3, which="both", lw=0.4)
        ax.legend(fontsize=6.5)
    fig.tight_layout()
    return save_figure(fig, path)


def write_section_after_latency(text: str, path: Path = BENCHMARKS) -> None:
    """The section between its markers; the first time, right after the latency section's end marker."""
    doc = path.read_text() if path.exists() else ""
    after = markers("latency")[1]
    if BEGIN not in doc and after in doc:
        path.write_text(doc.replace(after, f"{after}\n\n{text}", 1))
    else:
        write_section(path, text, BEGIN, END, BENCHMARKS_INTRO)


# -- entry point -----------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", default=DEFAULT_STEPS, help="the numbers of robots N, in increasing order")
    p.add_argument("--configs", default=DEFAULT_CONFIGS, help=f"configurations (of {', '.join(CONFIGS)})")
    p.add_argument("--rate", type=float, default=100.0, help="each robot's control rate (Hz)")
    p.add_argument("--deadline-ms", type=float, default=10.0, help="the runtime's deadline (--deadline-ms)")
    p.add_argument("--duration-s", type=float, default=3.0, help="measured seconds per step")
    p.add_argument("--warmup-s", type=float, default=1.2,
                   help="seconds per step before measuring: past the runtime's first telemetry message, 1 s after "
                        "its start (a one-off stall of 10-40 ms)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs per configuration and N (a fresh runtime each, the configurations' order reversed "
                        "every other repeat), pooled")
    p.add_argument("--generators", type=int, default=1, help="load-generator processes")
    p.add_argument("--no-pin", action="store_true",
                   help="do not pin the generators to the last cores (pinned, the runtime keeps the other cores)")
    p.add_argument("--stop-miss-pct", type=float, default=20.0,
                   help="a configuration goes no higher after a step where more than this % of observations missed")
    p.add_argument("--store-dir", default="",
                   help="put the runtime's alert store in a folder of this directory (e.g. /dev/shm: no fsync "
                        "cost), a diagnostic; default: the step's work folder on disk, as shipped")
    p.add_argument("--serve-args", default="",
                   help='more `vigil serve` options for every step, a diagnostic (e.g. "--telemetry-s 3600")')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(RAW), help="the raw results file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-write", action="store_true", help="print the section only: no raw file, figure or markdown")
    p.add_argument("--raw-only", action="store_true", help="write the raw file only (and print the section)")
    p.add_argument("--report-only", action="store_true", help="measure nothing: render from the raw file")
    args = p.parse_args(argv)
    for c in filter(None, args.configs.split(",")):
        if c not in CONFIGS:
            p.error(f"unknown configuration {c!r}")
    steps = [int(s) for s in args.steps.split(",") if s]
    if not steps or steps != sorted(steps) or steps[0] < 1:
        p.error("--steps must be positive and increasing")
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.generators < 1:
        p.error("--generators must be at least 1")
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
    write_section_after_latency(text)
    print(f"wrote BENCHMARKS.md ({NAME} section), {figure.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
