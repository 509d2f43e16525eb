"""`vigil demo-lqr`: the onboard path on a linear system, as three processes: an optimal LQR, a link outage.

1. export the optimal LQR of aircraft pitch as a `linear_gain` bundle (python-control);
2. start `vigil serve` (runtime + monitors + alert store + operator stream) and `vigil alerts` (alert view);
3. run `vigil sim` in realtime against it, with a link outage half way through the episode;
4. stop everything with SIGINT and print a summary: cost against the optimal cost, latency percentiles,
   alerts raised.  Exits non-zero if any part failed or the outage was not detected.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from vigil.runtime.launch import LaunchError, start_serve
from vigil.runtime.store import AlertStore
from vigil.training.lqr import export_lqr


def _pump(proc: subprocess.Popen, prefix: str) -> threading.Thread:
    def run() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            print(f"{prefix} {line.rstrip()}", flush=True)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def run_demo(workdir: Path, steps: int = 400, rate_hz: float = 100.0, outage_s: float = 0.5) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    bundle, store = workdir / "aircraft-pitch-lqr", workdir / "alerts.db"
    summary_path = workdir / "sim-summary.json"
    for stale in (store, Path(f"{store}-wal"), Path(f"{store}-shm"), summary_path):
        stale.unlink(missing_ok=True)
    manifest = export_lqr("aircraft-pitch", bundle)
    print(f"[demo] bundle {manifest.policy_id} -> {bundle}", flush=True)

    vigil = [sys.executable, "-m", "vigil.runtime.cli"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    served = start_serve(bundle, workdir / "serve", store=str(store), mode="realtime",
                         link_timeout_s=min(0.25, outage_s / 2), log_level="WARNING")
    robot_ep, op_ep = served.robot_endpoint, served.operator_endpoint
    print(f"[demo] vigil serve: robots on {robot_ep}, operator stream on {op_ep}", flush=True)
    alerts = subprocess.Popen([*vigil, "alerts", "--connect", op_ep, "--store", str(store)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    pumps = [_pump(alerts, "[alerts]")]
    time.sleep(0.5)  # let the alert view subscribe before anything happens
    sim = subprocess.run([*vigil, "sim", "--connect", robot_ep, "--system", "aircraft-pitch", "--steps", str(steps),
                          "--mode", "realtime", "--rate", str(rate_hz), "--disconnect-at", str(steps // 2),
                          "--disconnect-s", str(outage_s), "--summary", str(summary_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, timeout=300)
    for line in sim.stdout.splitlines():
        print(f"[sim]    {line}", flush=True)
    time.sleep(0.3)  # last alerts reach the view
    try:
        served.stop(timeout_s=10)
        codes = [0]
    except LaunchError as exc:
        print(f"[demo] {exc}", flush=True)
        codes = [1]
    alerts.send_signal(signal.SIGINT)
    codes.append(alerts.wait(timeout=10))
    for t in pumps:
        t.join(timeout=2)

    if sim.returncode != 0 or not summary_path.exists():
        print(f"[demo] simulator failed (exit {sim.returncode})", flush=True)
        return 1
    ep = json.loads(summary_path.read_text())[0]
    records = AlertStore(store, readonly=True).since(0)
    link_alerts = [r for r in records if r.monitor == "link"]
    lat = ep["latency_us"]
    print("\n=== vigil demo summary ===")
    print(f"policy            {manifest.policy_id} (optimal LQR, python-control)")
    print(f"episode           {ep['steps']} steps of aircraft pitch at {rate_hz:g} Hz, realtime, "
          f"link outage of {outage_s} s at step {steps // 2}")
    print(f"cost              {ep['cost']:.4f}")
    print(f"  optimal, same noise   {ep['oracle_cost']:.4f}  (ratio {ep['cost'] / ep['oracle_cost']:.3f}: "
          f"the excess is the outage on the safe action)")
    print(f"  T x J*                {ep['optimal_cost']:.4f}")
    print(f"latency (robot)   p50 {lat['p50']:.0f} us, p99 {lat['p99']:.0f} us, max {lat['max']:.0f} us "
          f"over {lat['n']} round trips")
    print(f"safe actions      {ep['robot_safe']} by the robot during the outage, {ep['runtime_safe']} by the runtime")
    print(f"alerts stored     {len(records)}" + "".join(f"\n  #{r.id} {r.severity:<5} {r.monitor:<10} {r.reason}"
                                                       for r in records))
    ok = codes == [0, 0] and bool(link_alerts)
    print(f"result            {'OK' if ok else 'FAILED'} (serve exit {codes[0]}, alerts exit {codes[1]}, "
          f"link-loss alert {'raised' if link_alerts else 'MISSING'})")
    return 0 if ok else 1
