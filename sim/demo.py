"""`vigil demo`: the main job, end to end, with vigil's own commands as separate processes.

    a flow-matching ensemble served on board -> robots run nominal, then shifted episodes -> VFD rises,
    alerts and data requests are filed -> the scripted expert answers -> a SAVE round fine-tunes ->
    `vigil swap` hot-swaps the new bundle -> success on the requesting tasks, before and after

1. Set up (`prepare`): the shipped ensemble (sim/assets/mt10: two expert demonstrations per MT10 task,
   `configs/demo-mt10.toml`, VFD calibrated; `make demo-assets` rebuilds it) is unpacked into the work
   folder, with the onboard instruction encoder exported from its PyPI package (once; reused after).
2. `vigil serve` the bundle (VFD monitor, store, operator stream, control endpoint), `vigil console` next to
   it when the console extra is installed (its address is printed), `vigil serve --record` when the record
   extra is.
3. Deployment: one simulated robot per task (`vigil sim`, all at once; lockstep, or paced at the bundle's
   80 Hz with --realtime) plays nominal episodes, then episodes whose objects are moved out of the range the
   demonstrations covered.
4. `vigil expert --once` answers the open data requests from each request's reset.
5. Evaluation before: `vigil sim` (lockstep) on held-out variants of every task that filed a request.
6. `vigil train save-round` on the answered requests, re-calibrated; `vigil swap` into the running runtime.
7. Evaluation after: the same episodes, the same runtime process.

The summary says what happened at each step; the demo exits 0 when every step worked (a round that does not
raise success is reported as such, not hidden), 1 when a step failed.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vigil.runtime.launch import LOCAL_TCP, LaunchError, Served, start_serve
from vigil.runtime.requests import RequestStore
from vigil.runtime.store import AlertStore

ASSETS = Path(__file__).resolve().parent / "assets" / "mt10"
WORN = "worn-arm"  # the robot whose actions take effect at half strength
VIGIL = [sys.executable, "-m", "vigil.runtime.cli"]


@dataclass(frozen=True)
class MainDemo:
    """What the demo does; `vigil demo`'s flags (sim/cli.py DemoConfig) fill it in."""

    workdir: Path
    tasks: tuple[str, ...]
    nominal_episodes: int = 3
    shifted_episodes: int = 6
    shift: float = 0.3
    eval_episodes: int = 20
    max_steps: int = 200
    request_interval_s: float = 1.0
    save_steps: int = 0  # 0: the asset config's [save] steps
    calibration_episodes: int = -1  # -1: the asset config's
    console_port: int = 8765
    record: bool = True
    realtime: bool = False  # deployment robots paced at 80 Hz (lockstep: as fast as the computer allows)
    worn_episodes: int = 2  # one more robot, its arm worn (actions halved): the dynamics monitor's maintenance alert
    screenshots: Path | None = None  # console screenshots go here (docs/figures/console-*.png come from this)


class Screenshot(threading.Thread):
    """A picture of the console `delay_s` after it is started, taken on a thread while a stage runs. A missing
    browser or selenium is said, not fatal: the pictures are for the docs, the demo is the point."""

    def __init__(self, url: str, path: Path, delay_s: float):
        super().__init__(daemon=True)
        self.url, self.path, self.delay_s, self.note = url, path, delay_s, ""

    def run(self) -> None:
        time.sleep(self.delay_s)
        try:
            from vigil.console.screenshot import capture

            capture(self.url, self.path, wait_s=4.0, width=1400, height=1500)
            self.note = f"screenshot {self.path}"
        except Exception as exc:  # noqa: BLE001 - selenium, chromium or the page: say which, go on
            self.note = f"no screenshot {self.path.name}: {type(exc).__name__}: {exc}"[:300]

    @classmethod
    def later(cls, cfg: MainDemo, url: str, name: str, delay_s: float) -> Screenshot | None:
        if cfg.screenshots is None or not url:
            return None
        shot = cls(url, cfg.screenshots / name, delay_s)
        shot.start()
        return shot

    @staticmethod
    def finish(shot: Screenshot | None) -> None:
        if shot is not None:
            shot.join(60)
            print(f"[demo] {shot.note or 'screenshot still being taken'}", flush=True)


class Stage:
    """A step of the demo: announced, timed, and its failure named."""

    def __init__(self, name: str, times: dict[str, float]):
        self.name, self.times = name, times

    def __enter__(self) -> Stage:
        print(f"\n[demo] == {self.name} ==", flush=True)
        self.t0 = time.monotonic()
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.times[self.name] = time.monotonic() - self.t0
        if kind is None:
            print(f"[demo] {self.name}: {self.times[self.name]:.0f} s", flush=True)


class DemoFailed(RuntimeError):
    pass


def vigil(args: Sequence[str], log: Path, timeout_s: float = 600) -> str:
    """Run one vigil command to completion (its output appended to `log`); its stdout, or DemoFailed."""
    with open(log, "a") as fh:
        fh.write(f"\n$ vigil {' '.join(args)}\n")
    r = subprocess.run([*VIGIL, *args], capture_output=True, text=True, timeout=timeout_s,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    with open(log, "a") as fh:
        fh.write(r.stdout + r.stderr)
    if r.returncode != 0:
        raise DemoFailed(f"`vigil {' '.join(args[:2])} ...` failed with exit {r.returncode}:\n{r.stderr[-1500:]}")
    return r.stdout


def prepare(workdir: Path, log: Path) -> tuple[Path, Path, Path]:
    """The shipped base run unpacked into `workdir` (run0/ with bundle/, demos/) and the instruction encoder
    (encoder/, exported once). Returns (run0, demos, encoder)."""
    if not (ASSETS / "run" / "ensemble.pt").is_file():
        raise DemoFailed(f"the demo's ensemble is missing from {ASSETS}; rebuild it with `make demo-assets`")
    encoder = workdir / "encoder"
    if not (encoder / "encoder.json").is_file():
        print("[demo] exporting the onboard instruction encoder (all-MiniLM-L6-v2, from its PyPI package) once",
              flush=True)
        vigil(["bundle", "encoder", "--out", str(encoder)], log)
    run0, demos = workdir / "run0", workdir / "demos"
    for old in (run0, demos):
        shutil.rmtree(old, ignore_errors=True)
    shutil.copytree(ASSETS / "run", run0)
    shutil.copytree(ASSETS / "demos", demos)
    shutil.copytree(encoder, run0 / "bundle" / "encoder")  # a bundle carries its encoder (docs/bundles.md)
    return run0, demos, encoder


def play(robots: dict[str, str], endpoint: str, seed: int, episodes: int, steps: int, tag: str, work: Path,
         log: Path, realtime: bool, shift: float = 0.0, gain: float = 1.0) -> dict[str, list[dict]]:
    """Every robot plays its task at once (one `vigil sim` process each); -> {task: episode summaries}."""
    procs = {}
    for task, robot in robots.items():
        summary = work / f"{tag}-{task}.json"
        args = ["sim", "--env", task, "--connect", endpoint, "--robot", robot, "--episodes", str(episodes),
                "--seed", str(seed), "--steps", str(steps), "--summary", str(summary),
                *(["--mode", "realtime", "--rate", "80"] if realtime else ["--act-timeout", "10"]),
                *(["--shift-positions", str(shift)] if shift else []), *(["--gain", str(gain)] if gain != 1 else [])]
        with open(log, "a") as fh:
            fh.write(f"\n$ vigil {' '.join(args)}\n")
            procs[task] = (subprocess.Popen([*VIGIL, *args], stdout=fh, stderr=subprocess.STDOUT), summary)
    out = {}
    for task, (proc, summary) in procs.items():
        if proc.wait(timeout=900) != 0 or not summary.exists():
            raise DemoFailed(f"the simulated robot for {task} failed (exit {proc.returncode}); see {log}")
        out[task] = json.loads(summary.read_text())
    return out


def start_console(served: Served, store: Path, port: int, work: Path) -> tuple[subprocess.Popen | None, str]:
    """`vigil console` next to the runtime, when its extra is installed; -> (process, address to open, or why
    there is none)."""
    if not installed("vigil.console"):
        return None, "not installed (pip install 'vigil[console]')"
    out_file = work / "console.out"
    with open(out_file, "w") as out:
        proc = subprocess.Popen([*VIGIL, "console", "--connect", served.operator_endpoint, "--store", str(store),
                                 "--control", served.control_endpoint, "--bind", f"127.0.0.1:{port}"],
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        for line in out_file.read_text().splitlines():
            if line.startswith("{") and '"url"' in line:
                return proc, json.loads(line)["url"]
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    return None, f"did not start (exit {proc.returncode}; see {out_file})"


def installed(*modules: str) -> bool:
    """Whether an optional part can be used: each module imports (vigil.console, vigil.record: their extras;
    pyarrow and av: vigil[lerobot])."""
    try:
        for m in modules:
            importlib.import_module(m)
    except ImportError:
        return False
    return True


def success_rate(eps: list[dict]) -> float:
    return float(np.mean([bool(e["success"]) for e in eps])) if eps else float("nan")


def vfd_scores(eps: list[dict]) -> np.ndarray:
    return np.array([v for e in eps for v in e.get("scores", {}).get("vfd", [])], float)


class StreamTally:
    """Counts what the operator stream carries while the demo runs (a SUB socket in a thread): the live view
    a console would show, here summed for the summary."""

    def __init__(self, endpoint: str):
        import zmq

        from vigil.runtime.stream import receive, subscribe

        self.counts: dict[str, int] = {}
        self.swaps: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._sock = subscribe(self._ctx, endpoint)

        def run() -> None:
            while not self._stop.is_set():
                for topic, msg in receive(self._sock, timeout_ms=100):
                    event = msg.meta.get("event") if topic == "telemetry" else None
                    key = f"telemetry.{event}" if event else topic.split(".")[0]
                    self.counts[key] = self.counts.get(key, 0) + 1
                    if msg.meta.get("event") == "swapped":
                        self.swaps.append(dict(msg.meta.get("values", {})))
                    if self._stop.is_set():
                        break

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()
        self._ctx.term()


def run_main_demo(cfg: MainDemo) -> int:
    work = cfg.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    log.write_text("")
    for stale in ("vigil.db", "vigil.db-wal", "vigil.db-shm", "acquired", "acquired-lerobot", "run1", "sims",
                  "recording"):
        p = work / stale
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    sims = work / "sims"
    sims.mkdir()
    times: dict[str, float] = {}
    t_start = time.monotonic()
    print(f"[demo] vigil's main job on {len(cfg.tasks)} Meta-World tasks; work folder {work}; "
          f"every command's output in {log}", flush=True)
    try:
        with Stage("set up", times):
            run0, demos, encoder = prepare(work, log)
            manifest = json.loads((run0 / "bundle" / "manifest.json").read_text())
            vfd = manifest["monitor"]["vfd"]["thresholds"]
            print(f"[demo] policy {manifest['name']}: flow-matching ensemble of {manifest['extra']['members']}, "
                  f"VFD thresholds warn {vfd['warn']:.3g}, alert {vfd['alert']:.3g}", flush=True)
        store = work / "vigil.db"
        record = cfg.record and installed("vigil.record")
        # deadline 1 s: on a 2-core computer running five simulators beside the runtime a plan can miss 12.5 ms;
        # a realtime robot still applies its own safe action when its period passes, and the lockstep
        # evaluations measure the policy, not the machine's load
        served = start_serve(run0 / "bundle", work / "serve", store=str(store), control_endpoint=LOCAL_TCP,
                             request_interval_s=cfg.request_interval_s, deadline_ms=1000, log_level="WARNING",
                             **({"record": str(work / "recording")} if record else {}))
    except (DemoFailed, LaunchError) as exc:
        print(f"[demo] FAILED: {exc}", flush=True)
        return 1
    console, url = start_console(served, store, cfg.console_port, work)
    url, console_note = (url, "") if console is not None else ("", url)
    tally = StreamTally(served.operator_endpoint)
    print(f"[demo] vigil serve: robots on {served.robot_endpoint}, operator stream on {served.operator_endpoint}"
          + (f", recording to {work / 'recording'}" if record else ""), flush=True)
    print(f"[demo] console: {url}  <- open it to watch" if url else f"[demo] console: {console_note}", flush=True)
    robots = {task: f"robot-{i + 1}" for i, task in enumerate(cfg.tasks)}
    results: dict[str, Any] = {}
    try:
        with Stage("deployment, nominal", times):
            results["nominal"] = play(robots, served.robot_endpoint, 20, cfg.nominal_episodes, cfg.max_steps,
                                      "nominal", sims, log, realtime=cfg.realtime)
        if cfg.worn_episodes and "dynamics" in manifest["monitor"]:
            with Stage(f"a worn arm: {cfg.tasks[0]} with every action halved", times):
                results["worn"] = play({cfg.tasks[0]: WORN}, served.robot_endpoint, 20, cfg.worn_episodes,
                                       cfg.max_steps, "worn", sims, log, realtime=cfg.realtime, gain=0.5)
        with Stage(f"deployment, objects moved {cfg.shift:g} x their range out", times):
            shot = Screenshot.later(cfg, url, "console-shifted.png", 2.0)
            results["shifted"] = play(robots, served.robot_endpoint, 25, cfg.shifted_episodes, cfg.max_steps,
                                      "shifted", sims, log, realtime=cfg.realtime, shift=cfg.shift)
            Screenshot.finish(shot)
        requests = read_requests(store)
        results["deployment_requests"] = [r["id"] for r in requests]
        print(f"[demo] {len(requests)} data request(s) filed: "
              + ", ".join(f"{t} {n}" for t, n in sorted(count(r["task"] for r in requests).items())), flush=True)
        if not requests:
            raise DemoFailed("no data requests were filed: VFD never reached its alert threshold")
        with Stage("the expert answers", times):
            vigil(["expert", "--store", str(store), "--demos", str(work / "acquired"), "--once"], log)
            if installed("pyarrow", "av"):  # what was acquired, as a LeRobot v3 dataset (docs/datasets.md)
                vigil(["demos", "export-lerobot", str(work / "acquired"), "--out", str(work / "acquired-lerobot")],
                      log)
        requested = sorted({r["task"] for r in requests})
        req_robots = {t: f"eval-{t}" for t in requested}
        with Stage(f"evaluation before: {cfg.eval_episodes} episodes of each requesting task", times):
            results["before"] = play(req_robots, served.robot_endpoint, 30, cfg.eval_episodes, cfg.max_steps,
                                     "before", sims, log, realtime=False, shift=cfg.shift)
        with Stage("SAVE round", times):
            config = ASSETS / "demo-mt10.toml"
            out = vigil(["train", "save-round", "--run", str(run0), "--old-demos", str(demos), "--acquired",
                         str(work / "acquired"), "--requests", str(store), "--out", str(work / "run1"),
                         "--config", str(config), "--encoder", str(encoder), "--no-progress",
                         *(["--steps", str(cfg.save_steps)] if cfg.save_steps else []),
                         *(["--calibration-episodes", str(cfg.calibration_episodes)]
                           if cfg.calibration_episodes >= 0 else [])], log)
            summary = json.loads(out.strip().splitlines()[-1])
        with Stage("hot swap", times):
            vigil(["swap", "--bundle", str(work / "run1" / "bundle"), "--connect", served.control_endpoint], log)
        with Stage("evaluation after: the same episodes", times):
            shot = Screenshot.later(cfg, url, "console-after-swap.png", 5.0)
            results["after"] = play(req_robots, served.robot_endpoint, 30, cfg.eval_episodes, cfg.max_steps,
                                    "after", sims, log, realtime=False, shift=cfg.shift)
            Screenshot.finish(shot)
        ok = True
    except (DemoFailed, subprocess.TimeoutExpired) as exc:
        print(f"[demo] FAILED: {exc}", flush=True)
        ok, summary = False, {}
    finally:
        time.sleep(0.3)  # the last messages reach the tally
        tally.close()
        try:
            served.stop(timeout_s=15)
        except LaunchError as exc:
            print(f"[demo] {exc}", flush=True)
            ok = False
        if console is not None:
            console.terminate()
            console.wait(10)
    if not ok:
        return 1
    report(cfg, work, vfd, results, read_requests(store), summary, tally, times, time.monotonic() - t_start, url,
           record)
    return 0


def read_requests(store: Path) -> list[dict[str, Any]]:
    rs = RequestStore(store, readonly=True)
    try:
        return [r.to_json() for r in rs.list()]
    finally:
        rs.close()


def count(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return out


def report(cfg: MainDemo, work: Path, vfd: dict[str, float], results: dict[str, Any], requests: list[dict],
           summary: dict[str, Any], tally: StreamTally, times: dict[str, float], total_s: float, url: str,
           record: bool) -> None:
    alerts = AlertStore(work / "vigil.db", readonly=True).since(0)
    vfd_alerts = count(a.robot for a in alerts if a.monitor == "vfd" and a.severity in ("alert", "stop"))
    by_status = count(r["status"] for r in requests)
    print("\n=== vigil demo summary ===")
    deployment = [r for r in requests if r["id"] in set(results["deployment_requests"])]
    print("                                   deployment                                 | shifted, held out")
    print(f"{'task':<26}{'robot':<9}{'success':>9}{'VFD > alert':>13}{'median VFD':>12}{'VFD alerts':>11}"
          f"{'requests':>9} |{'before':>8}{'after':>8}")
    for task in cfg.tasks:
        robot = f"robot-{cfg.tasks.index(task) + 1}"
        nom, shi = results["nominal"][task], results["shifted"][task]
        vn, vs = vfd_scores(nom), vfd_scores(shi)
        before, after = results["before"].get(task), results["after"].get(task)
        print(f"{task:<26}{robot:<9}{success_rate(nom):>4.0%}/{success_rate(shi):<4.0%}"
              f"{np.mean(vn > vfd['alert']):>6.0%}/{np.mean(vs > vfd['alert']):<6.0%}"
              f"{np.median(vn):>5.3g}/{np.median(vs):<6.3g}{vfd_alerts.get(robot, 0):>11}"
              f"{sum(r['task'] == task for r in deployment):>9} |"
              + (f"{success_rate(before):>8.0%}{success_rate(after):>8.0%}" if before else f"{'-':>8}{'-':>8}"))
    print("(a/b: nominal/shifted episodes; VFD > alert: the share of plans whose VFD is above the alert threshold)")
    requested = sorted(results["before"])
    b = [e["success"] for t in requested for e in results["before"][t]]
    a = [e["success"] for t in requested for e in results["after"][t]]
    gained = sum(1 for x, y in zip(b, a) if y and not x)
    lost = sum(1 for x, y in zip(b, a) if x and not y)
    print(f"VFD thresholds    warn {vfd['warn']:.3g}, alert {vfd['alert']:.3g} (VFD alerts: the deployment robot's "
          f"alerts at level alert, which file data requests; shifted episodes move the objects {cfg.shift:g} x "
          f"their range outside it)")
    print(f"alerts stored     {len(alerts)}: " + ", ".join(f"{n} {m}" for m, n in sorted(count(
        f"{a.monitor} {a.severity}" for a in alerts).items())) + " (all robots, evaluations included)")
    dynamics = [a for a in alerts if a.monitor == "dynamics"]
    if dynamics or "worn" in results:
        worn = [a for a in dynamics if a.robot == WORN]
        print(f"dynamics alerts   {len(dynamics)}: " + ", ".join(f"{n} {d}" for d, n in sorted(count(
            str(a.values.get("diagnosis")) for a in dynamics).items())) + f"; the worn arm ({WORN}, actions halved): "
            + (", ".join(f"{n} {d}" for d, n in sorted(count(str(a.values.get("diagnosis")) for a in worn).items()))
               or "none") + " (robot = a maintenance alert: no data request; docs/dynamics.md)")
    print(f"data requests     {len(deployment)} filed in the deployment and answered by the expert ("
          + ", ".join(f"{n} {s}" for s, n in sorted(count(r["status"] for r in deployment).items()))
          + f"); {len(requests) - len(deployment)} more filed by the evaluation robots, left open "
          + f"(the store: {', '.join(f'{n} {s}' for s, n in sorted(by_status.items()))})")
    prov = json.loads((work / "run1" / "provenance.json").read_text())
    print(f"SAVE round        {prov['save']['steps']} steps on {len(summary.get('requests', []))} answered "
          f"request(s), half old and half acquired data, re-calibrated -> {work / 'run1' / 'bundle'}")
    swap = tally.swaps[-1] if tally.swaps else {}
    print(f"hot swap          {swap.get('previous', '?')} -> {swap.get('policy', '?')} (no restart; "
          f"{tally.counts.get('telemetry.swapped', 0)} swap announcement(s) on the operator stream)")
    print(f"success           requesting tasks, {cfg.eval_episodes} held-out shifted episodes each, same seeds: "
          f"before {np.mean(b):.0%}, after {np.mean(a):.0%} ({gained} gained, {lost} lost)"
          + ("" if np.mean(a) > np.mean(b) else "  -- not higher this time: one short round on few answers"))
    print("operator stream   " + ", ".join(f"{k} {v}" for k, v in sorted(tally.counts.items())))
    if url:
        print(f"console           {url} (was live during the run)")
    if record:
        print(f"recording         {work / 'recording'} (MCAP: open in Foxglove or Rerun)")
    if (work / "acquired-lerobot").is_dir():
        print(f"acquired data     {work / 'acquired'} (vigil), {work / 'acquired-lerobot'} (LeRobot v3)")
    print("stages            " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print(f"total             {total_s:.0f} s")
