"""SAVE end to end in simulation, with vigil's own commands as separate processes (issue 5's second target):

    deployment -> VFD alerts -> data requests -> expert demonstrations -> fine-tuning round
               -> hot-swapped bundle -> success again, on the same held-out variants

1. `vigil demos record` two demonstrations per MT10 task (variants 0, 1); `vigil train flow` a small
   ensemble (configs/flow-save.toml); `vigil calibrate` its VFD thresholds (variants 10..19).
2. `vigil serve` the bundle with a store, an operator stream, a control endpoint and one request per task
   per `--request-interval` seconds; `vigil alerts --json` records the operator stream.
3. Deployment: `vigil sim` plays every task on variants 20..29. VFD alerts file data requests.
4. `vigil expert --once` answers the requests open after the deployment (the scripted expert from each
   request's reset) into a dataset.
5. Before: `vigil sim` on variants 30..49 of every task (no demonstration and no request uses them).
6. `vigil train save-round` on the answered requests (half old, half acquired; re-calibrated).
7. `vigil swap` the new bundle into the running runtime while a realtime robot is being served, then
   After: `vigil sim` on variants 30..49 again. Same runtime process, same episodes, same noise draws.

Raw results: WORK/result.json (work folder bench-runs/save-loop, removed first unless --keep); the section
between the `save-loop` markers of BENCHMARKS.md is rendered from it (`--report-only` renders it again
without running anything). About 15 min on 2 cores.

    .venv/bin/python -m bench.save_loop
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    BENCH_RUNS,
    ROOT,
    markers,
    read_raw,
    run_info,
    section,
    write_benchmarks,
    write_raw,
    written_by,
)

NAME = "save-loop"
VIGIL = [sys.executable, "-m", "vigil.runtime.cli"]


def vigil(*args: str, log: Path, **kw) -> None:
    """Run one vigil command to completion, its output appended to `log`; fail loudly."""
    with open(log, "a") as fh:
        fh.write(f"\n$ vigil {' '.join(args)}\n")
        fh.flush()
        rc = subprocess.run([*VIGIL, *args], stdout=fh, stderr=subprocess.STDOUT, **kw).returncode
    if rc != 0:
        raise SystemExit(f"vigil {' '.join(args)} failed with exit {rc}; see {log}")


def play(tasks: list[str], endpoint: str, seed: int, episodes: int, steps: int, tag: str, work: Path,
         log: Path) -> dict[str, list[dict]]:
    """Every task's episodes (lockstep, one `vigil sim` per task); -> {task: per-episode summaries}."""
    from tqdm import tqdm

    out = {}
    for task in tqdm(tasks, desc=tag):
        summary = work / f"{tag}-{task}.json"
        vigil("sim", "--env", task, "--connect", endpoint, "--robot", f"{tag}-{task}", "--episodes", str(episodes),
              "--seed", str(seed), "--steps", str(steps), "--act-timeout", "10", "--summary", str(summary), log=log)
        out[task] = json.loads(summary.read_text())
    return out


def live_robot(task: str, endpoint: str, episodes: int, trace: list) -> None:
    """A simulated robot under realtime control at 80 Hz, in a thread; each step appends (time, episode, the
    episode's missed actions so far) to `trace`."""
    from vigil.sim.envs import make_env
    from vigil.sim.robot import SimConfig, run_episodes

    env = make_env(task, horizon=200)
    try:
        run_episodes(env, SimConfig(endpoint, "live", episodes, 200, 0, "realtime", 80.0, 1.0),
                     on_step=lambda s: trace.append((time.time(), s.episode, s.robot_safe)))
    finally:
        env.close()


def success(eps: list[dict]) -> np.ndarray:
    return np.array([bool(e["success"]) for e in eps])


def sign_test(gained: int, lost: int) -> float:
    """One-sided exact sign test on the discordant pairs (McNemar): P(at least `gained` of gained + lost
    under a fair coin)."""
    n = gained + lost
    return float(sum(math.comb(n, k) for k in range(gained, n + 1)) / 2 ** n) if n else 1.0


def stream_subscribed(stream_file: Path, timeout_s: float = 30.0) -> None:
    """Wait until `vigil alerts --telemetry` printed its first line: it is subscribed, nothing is missed."""
    deadline = time.monotonic() + timeout_s
    while not (stream_file.exists() and stream_file.read_text().strip()):
        if time.monotonic() > deadline:
            raise SystemExit(f"`vigil alerts` printed nothing within {timeout_s:.0f} s")
        time.sleep(0.05)


def measure(args: argparse.Namespace, tasks: list[str], work: Path) -> dict[str, Any]:
    """The whole loop with vigil's own commands; returns what the section is rendered from."""
    from vigil.runtime.launch import LOCAL_TCP, serving
    from vigil.runtime.requests import RequestStore

    run, t0 = run_info(), time.time()
    log = work / "log.txt"
    stage: dict[str, float] = {}

    def mark(name: str, since: float) -> float:
        stage[name] = time.time() - since
        print(f"[{name}] {stage[name]:.0f} s", flush=True)
        return time.time()

    t = time.time()
    demos, run0, run1 = work / "demos", work / "run0", work / "run1"
    if not (run0 / "bundle" / "manifest.json").exists():
        vigil("demos", "record", "--tasks", ",".join(tasks), "--episodes", "2", "--seed", "0", "--out", str(demos),
              "--max-steps", str(args.steps), log=log)
        vigil("train", "flow", "--config", args.config, "--demos", str(demos), "--out", str(run0),
              "--encoder", str(work / "encoder"), "--no-progress", log=log)
        vigil("calibrate", "--bundle", str(run0 / "bundle"), "--episodes", "10", "--seed", "10",
              "--max-steps", str(args.steps), "--no-progress", log=log)
    t = mark("train + calibrate", t)

    store = work / "vigil.db"
    stream_file = work / "stream.jsonl"
    with serving(run0 / "bundle", work / "serve", store=str(store), control_endpoint=LOCAL_TCP,
                 request_interval_s=args.request_interval, deadline_ms=1000, log_level="WARNING") as served, \
            open(stream_file, "w") as fh:
        robot, control = served.robot_endpoint, served.control_endpoint
        stream = subprocess.Popen([*VIGIL, "alerts", "--connect", served.operator_endpoint, "--json",
                                   "--telemetry"], stdout=fh, stderr=subprocess.DEVNULL)
        try:
            stream_subscribed(stream_file)
            deploy = play(tasks, robot, 20, args.deploy_episodes, args.steps, "deploy", work, log)
            t = mark("deployment", t)
            vigil("expert", "--store", str(store), "--demos", str(work / "acquired"), "--once", log=log)
            t = mark("expert", t)
            before = play(tasks, robot, 30, args.eval_episodes, args.steps, "before", work, log)
            t = mark("evaluation before", t)
            vigil("train", "save-round", "--run", str(run0), "--old-demos", str(demos), "--acquired",
                  str(work / "acquired"), "--requests", str(store), "--out", str(run1), "--config", args.config,
                  "--no-progress", log=log)
            t = mark("save-round", t)
            # a robot under realtime control (80 Hz) while the runtime swaps; every step time-stamped
            trace: list[tuple[float, int, int]] = []  # (time, episode, the episode's missed actions so far)
            live = threading.Thread(target=live_robot, args=(tasks[0], robot, args.live_episodes, trace),
                                    daemon=True)
            live.start()
            while len(trace) < 200 and live.is_alive():  # 2.5 s of control before the swap
                time.sleep(0.05)
            t_swap = time.time()
            vigil("swap", "--bundle", str(run1 / "bundle"), "--connect", control, log=log)
            swap_window = (t_swap, time.time())
            live.join(300)
            if live.is_alive() or not trace or trace[-1][0] < swap_window[1]:
                raise SystemExit("the realtime robot did not run through the swap")
            t = mark("swap", t)
            after = play(tasks, robot, 30, args.eval_episodes, args.steps, "after", work, log)
            mark("evaluation after", t)
        finally:
            stream.terminate()
            stream.wait(10)

    rs = RequestStore(store, readonly=True)
    try:
        requests = [{"id": r.id, "robot": r.robot, "task": r.task, "status": r.status} for r in rs.list()]
    finally:
        rs.close()
    prov = json.loads((run1 / "provenance.json").read_text())
    messages = [json.loads(line) for line in stream_file.read_text().splitlines() if line.strip()]
    return {"run": run, "minutes": (time.time() - t0) / 60, "tasks": tasks, "stage_s": stage,
            "args": {k: getattr(args, k) for k in ("deploy_episodes", "eval_episodes", "steps", "request_interval",
                                                   "live_episodes")},
            "requests": requests, "used": sorted(prov["save"]["requests"]), "round_steps": prov["save"]["steps"],
            "swap_s": swap_window[1] - swap_window[0], "live": live_split(trace, swap_window),
            "swap_alerts": sum(m.get("topic") != "telemetry" and m.get("monitor") == "swap" for m in messages),
            "success": {tag: {task: [bool(e["success"]) for e in eps[task]] for task in tasks}
                        for tag, eps in (("deploy", deploy), ("before", before), ("after", after))}}


def live_split(trace: list[tuple[float, int, int]], swap_window: tuple[float, float]) -> dict[str, list[int]]:
    """Missed actions and steps of the realtime robot inside the swap window (from `vigil swap` until it
    returned, plus 1 s for the switch at the next plan boundary) and outside it."""
    missed, last = [], (None, 0)
    for _, episode, so_far in trace:
        missed.append(so_far - (last[1] if episode == last[0] else 0))
        last = (episode, so_far)
    missed_a = np.array(missed)
    inside = np.array([swap_window[0] <= t <= swap_window[1] + 1.0 for t, _, _ in trace])
    return {"during": [int(missed_a[inside].sum()), int(inside.sum())],
            "outside": [int(missed_a[~inside].sum()), int((~inside).sum())]}


def render(raw: dict[str, Any]) -> str:
    """The section, from the raw results alone."""
    tasks, a, requests, live = raw["tasks"], raw["args"], raw["requests"], raw["live"]
    used = set(raw["used"])
    deploy_robots = {f"deploy-{task}" for task in tasks}
    leaked = [r["id"] for r in requests if r["id"] in used and r["robot"] not in deploy_robots]
    if leaked:
        raise SystemExit(f"requests {leaked} from evaluation robots were used for training")
    n_used = {task: sum(1 for r in requests if r["id"] in used and r["task"] == task) for task in tasks}
    filed = {task: sum(1 for r in requests if r["robot"] == f"deploy-{task}") for task in tasks}
    ok = {tag: {task: np.array(v, bool) for task, v in per_task.items()} for tag, per_task in raw["success"].items()}
    rows = ["| task | deployment success | requests filed (deployment) | demonstrations used | success before | "
            "success after | gained / lost episodes |", "|---|---:|---:|---:|---:|---:|---:|"]
    groups: dict[str, list[np.ndarray]] = {"requested": [], "not requested": []}
    for task in tasks:
        b, af = ok["before"][task], ok["after"][task]
        groups["requested" if n_used[task] else "not requested"].append(np.stack([b, af]))
        rows.append(f"| {task} | {ok['deploy'][task].mean():.0%} | {filed[task]} | {n_used[task]} | "
                    f"{b.mean():.0%} | {af.mean():.0%} | {int((af & ~b).sum())} / {int((b & ~af).sum())} |")
    summary_rows = ["| tasks | episodes | success before | success after | gained / lost | one-sided sign test p |",
                    "|---|---:|---:|---:|---:|---:|"]
    verdict = {}
    for name, parts in groups.items():
        if not parts:
            continue
        ba = np.concatenate(parts, axis=1)
        gained, lost = int((ba[1] & ~ba[0]).sum()), int((ba[0] & ~ba[1]).sum())
        p = sign_test(gained, lost)
        verdict[name] = (ba[0].mean(), ba[1].mean(), p)
        summary_rows.append(f"| {name} ({len(parts)}) | {ba.shape[1]} | {ba[0].mean():.1%} | {ba[1].mean():.1%} | "
                            f"{gained} / {lost} | {p:.3g} |")
    req = verdict.get("requested")
    met = req is not None and req[1] > req[0] and req[2] < 0.05
    fulfilled = sum(1 for r in requests if r["status"] == "fulfilled")
    return section(NAME, [
        "## SAVE end to end: deployment, requests, expert, fine-tuning, hot swap",
        "",
        written_by(raw["run"], seconds=60 * raw["minutes"]),
        f"- Base policy: `vigil train flow --config configs/flow-save.toml` on 2 expert demonstrations per task "
        f"(variants 0, 1), `vigil calibrate` on variants 10..19. Served by one `vigil serve` process "
        f"(request_interval_s {a['request_interval']:g}) for the whole run.",
        f"- Deployment: {a['deploy_episodes']} episodes per task on variants 20..{19 + a['deploy_episodes']}; "
        f"{sum(filed.values())} data requests filed; `vigil expert --once` answered {fulfilled}, and `vigil train "
        f"save-round` used {len(used)}, {raw['round_steps']} steps, re-calibrated.",
        f"- Before / after: {a['eval_episodes']} episodes per task on variants 30..{29 + a['eval_episodes']}, the "
        "same seeds and noise draws, before and after `vigil swap` in the same runtime process.",
        f"- Swap: `vigil swap` returned in {raw['swap_s']:.1f} s while a realtime robot ({tasks[0]}, 80 Hz, "
        f"{a['live_episodes']} episodes) was served. Actions it missed (no action within its 12.5 ms period): "
        f"{live['during'][0]} in the {live['during'][1]} steps from `vigil swap` until 1 s after it returned, "
        f"{live['outside'][0]} in {live['outside'][1]} steps outside it. {raw['swap_alerts']} swap announcement(s) "
        "on the operator stream.",
        "- Stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in raw["stage_s"].items()) + ".",
        "",
        *summary_rows,
        "",
        *rows,
        "",
        "Target (measurably higher success on the tasks that raised requests): "
        + (f"{req[0]:.1%} -> {req[1]:.1%}, p = {req[2]:.3g}: {'met' if met else 'not met'}." if req else
           "no task raised a request: not met."),
    ])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(BENCH_RUNS / "save-loop"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "flow-save.toml"))
    ap.add_argument("--tasks", help="comma-separated (default MT10)")
    ap.add_argument("--deploy-episodes", type=int, default=10, help="deployment episodes per task (variants 20..)")
    ap.add_argument("--eval-episodes", type=int, default=20, help="evaluation episodes per task (variants 30..)")
    ap.add_argument("--steps", type=int, default=300, help="steps per episode, at most")
    ap.add_argument("--request-interval", type=float, default=1.0, help="serve's request_interval_s")
    ap.add_argument("--live-episodes", type=int, default=20,
                    help="episodes of the realtime robot the swap happens under")
    ap.add_argument("--keep", action="store_true",
                    help="reuse the work folder's demos and base run (the rest is redone)")
    ap.add_argument("--report-only", action="store_true", help="render WORK/result.json again; run nothing")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args(argv)
    work = Path(args.work)
    result = work / "result.json"
    if args.report_only:
        raw = read_raw(result)
    else:
        from vigil.sim.metaworld_env import MT10_TASKS

        tasks = args.tasks.split(",") if args.tasks else list(MT10_TASKS)
        if work.exists() and not args.keep:
            shutil.rmtree(work)
        for stale in ("acquired", "run1", "serve", "vigil.db", "vigil.db-wal", "vigil.db-shm"):  # --keep: the base
            path = work / stale
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        raw = measure(args, tasks, work)
        write_raw(result, raw)
    text = render(raw)
    print(text)
    if not args.no_write:
        write_benchmarks(text, *markers(NAME))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
