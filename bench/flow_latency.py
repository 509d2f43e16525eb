"""onnxruntime cost of one `flow_ensemble` plan (training/flow_export.py) at batch 1, for M = 1, 2, 3, 5, 8
members, full members against a shared encoder, "lower" against "anchor" pairs, N = 5, 2 and 1 noise samples.
M = 1 at N = 1 is the plain policy every ratio is taken to. Untrained weights, the runtime's session options.

Raw results: bench/out/flow_latency.json; the section between the `flow-latency` markers of BENCHMARKS.md is
rendered from them (`--report-only` renders it again without measuring).

    .venv/bin/python -m bench.flow_latency [--threads 1] [--reps 300] [--no-write]    # make bench-flow-latency
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bench.common import OUT, ROOT, markers, read_raw, run_info, section, write_benchmarks, write_raw, written_by

NAME = "flow-latency"
RAW = OUT / "flow_latency.json"
TARGETS = "Targets (issue 4 item 7): full M=5 <= 4x M=1; shared M=5 <= 1.5x M=1; a plan at M=5 < 1 ms."


def plan_us(cfg, threads: int, reps: int, density: bool = False) -> float:
    """Median wall time of one session.run at batch 1, microseconds; density: with the RND head in the graph
    (training/density.py, docs/failure.md), fetching its output too."""
    import onnxruntime as ort

    from vigil.policies.bundle import session_options
    from vigil.training.flow import Ensemble
    from vigil.training.flow_export import DENSITY_SCORES, export_onnx

    heads = None
    if density:
        from vigil.training.density import DensityConfig, DensityHeads

        heads = DensityHeads(DensityConfig(dim=cfg.hidden))
    sess = ort.InferenceSession(export_onnx(Ensemble(cfg).eval(), cfg, density=heads), session_options(threads),
                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"state": rng.standard_normal((1, cfg.obs_dim), dtype=np.float32),
            "instruction": rng.standard_normal((1, cfg.instr_dim), dtype=np.float32),
            "noise": rng.standard_normal((1, cfg.vfd_samples, cfg.horizon, cfg.action_dim), dtype=np.float32)}
    fetch = ["action", "vfd", *(DENSITY_SCORES if density else ())]
    for _ in range(30):
        sess.run(fetch, feed)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(fetch, feed)
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every (variant, pairs, N) row at every M, and the plain policy, in one process."""
    import onnxruntime as ort

    from vigil.training.flow import FlowConfig

    run = run_info()
    base = FlowConfig()
    plain = plan_us(dataclasses.replace(base, members=1, vfd_samples=1), args.threads, args.reps)
    rows = []
    for shared in (False, True):
        for pairs, n in [("lower", args.samples[0])] + [("anchor", n) for n in args.samples]:
            us = {str(m): plan_us(dataclasses.replace(base, members=m, shared_encoder=shared, vfd_pairs=pairs,
                                                      vfd_samples=n), args.threads, args.reps) for m in args.members}
            rows.append({"variant": "shared encoder" if shared else "full members", "pairs": pairs, "N": n, "us": us})
    return {"run": run, "onnxruntime": ort.__version__, "threads": args.threads, "reps": args.reps,
            "members": list(args.members), "plain_us": plain, "rows": rows, "failure": measure_failure(args),
            "config": {"euler_steps": base.euler_steps, "hidden": base.hidden, "depth": base.depth,
                       "horizon": base.horizon}}


def monitor_us(monitor, reps: int) -> tuple[float, float]:
    """(median µs of a monitor's update on a tick that brings a new plan, on one that does not)."""
    from vigil.monitors.base import Tick

    rng = np.random.default_rng(0)
    a = np.zeros(4, np.float32)
    ticks = [Tick("r", k, {"state": rng.standard_normal(39).astype(np.float32)}, a, a,
                  {"vfd": float(rng.random()), "rnd": float(rng.random()), "logpzo": float(rng.random())}, 0.0,
                  k // 4 + 1) for k in range(4 * reps)]
    new, same = [], []
    monitor.reset()
    monitor.start_episode({"task": "reach-v3"})
    for k, tick in enumerate(ticks):
        if k % 500 == 0:
            monitor.reset()
            monitor.start_episode({"task": "reach-v3"})
        t0 = time.perf_counter()
        monitor.update(tick)
        (new if k % 4 == 0 else same).append(time.perf_counter() - t0)
    return 1e6 * statistics.median(new), 1e6 * statistics.median(same)


def measure_failure(args: argparse.Namespace) -> dict[str, Any]:
    """The failure monitor's cost (docs/failure.md): the plan with and without the density heads in the graph, for
    the deployment config (configs/flow-mt10.toml) and the study's (configs/flow-mt10-failure.toml), and the
    monitor's own update per tick beside the VFD monitor's."""
    from vigil.monitors.failure import FailureMonitor
    from vigil.monitors.vfd import VFDMonitor
    from vigil.training.failure import failure_block
    from vigil.training.train_flow import load_flow_config

    rows = []
    for name in ("flow-mt10", "flow-mt10-failure"):
        cfg = load_flow_config(ROOT / "configs" / f"{name}.toml")
        rows.append({"config": name, "members": cfg.members, "hidden": cfg.hidden, "N": cfg.vfd_samples,
                     "pairs": cfg.vfd_pairs, "plain_us": plan_us(cfg, args.threads, args.reps),
                     "density_us": plan_us(cfg, args.threads, args.reps, density=True)})
    rng = np.random.default_rng(1)  # a block of the real shape: 10 tasks, 125-plan bands, 4 features
    eps = [{"task": f"task-{k % 10}" if k % 10 else "reach-v3", "success": k % 7 != 0,
            "scores": {f: list(rng.random(n)) for f in ("vfd", "rnd", "logpzo", "stillness")}}
           for k in range(200) for n in [int(rng.integers(20, 125))]]
    failure = FailureMonitor.from_manifest(failure_block(eps))
    vfd = VFDMonitor({"warn": 0.5, "alert": 0.9})
    return {"rows": rows, "failure_monitor_us": monitor_us(failure, args.reps),
            "vfd_monitor_us": monitor_us(vfd, args.reps)}


def render(raw: dict[str, Any]) -> str:
    """The section, from the raw results alone."""
    members, plain, c = raw["members"], raw["plain_us"], raw["config"]
    table = ["| variant | pairs | N | " + " | ".join(f"M={m}" for m in members) + " |",
             "|---|---|---:|" + "---:|" * len(members)]
    for row in raw["rows"]:
        cells = [f"{row['us'][str(m)]:.0f} ({row['us'][str(m)] / plain:.2f}x)" for m in members]
        table.append(f"| {row['variant']} | {row['pairs']} | {row['N']} | " + " | ".join(cells) + " |")
    return section(NAME, [
        "## Cost of knowing: one flow-ensemble plan in onnxruntime",
        "",
        written_by(raw["run"]),
        f"- onnxruntime {raw['onnxruntime']}, {raw['threads']} intra-op thread(s), batch 1, median of {raw['reps']} "
        f"plans; {c['euler_steps']} Euler steps, hidden {c['hidden']}, depth {c['depth']}, H {c['horizon']}; "
        "untrained weights.",
        "",
        f"Median µs per plan (in brackets: ratio to the plain policy, one member at N = 1, {plain:.0f} µs, "
        "measured in the same run):",
        "",
        *table,
        "",
        TARGETS,
        *render_failure(raw.get("failure")),
    ])


def render_failure(f: dict[str, Any] | None) -> list[str]:
    if not f:
        return []
    lines = ["", "**The failure monitor's cost** (issue 18 item 4, docs/failure.md): the plan with the RND head in "
             "the graph against the same plan without it, measured in this run, and the monitor's own update "
             "(Python, per tick) beside the VFD monitor's:", "",
             "| config | members, hidden, N, pairs | plan µs | plan + RND head µs | added |",
             "|---|---|---:|---:|---:|"]
    for r in f["rows"]:
        lines.append(f"| {r['config']} | {r['members']}, {r['hidden']}, {r['N']}, {r['pairs']} | {r['plain_us']:.0f} | "
                     f"{r['density_us']:.0f} | {100 * (r['density_us'] / r['plain_us'] - 1):+.0f}% |")
    fm, vm = f["failure_monitor_us"], f["vfd_monitor_us"]
    lines += ["", f"Monitor update, median µs: failure monitor {fm[0]:.1f} on a tick with a new plan, {fm[1]:.2f} "
              f"between plans; VFD monitor {vm[0]:.1f} / {vm[1]:.2f}. Target: the monitor adds at most 20% to a "
              "plan's cost (heads in the graph + the update on a plan tick, against the plain plan)."]
    return lines


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--members", type=int, nargs="+", default=[1, 2, 3, 5, 8])
    ap.add_argument("--samples", type=int, nargs="+", default=[5, 2, 1], help="VFD noise samples N per plan")
    ap.add_argument("--report-only", action="store_true", help=f"render {RAW.name} again; measure nothing")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and bench/out alone")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raw = read_raw(RAW) if args.report_only else measure(args)
    text = render(raw)
    print(text)
    if not args.no_write:
        if not args.report_only:
            write_raw(RAW, raw)
        write_benchmarks(text, *markers(NAME))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
