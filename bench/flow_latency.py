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

from bench.common import OUT, markers, read_raw, run_info, section, write_benchmarks, write_raw, written_by

NAME = "flow-latency"
RAW = OUT / "flow_latency.json"
TARGETS = "Targets (issue 4 item 7): full M=5 <= 4x M=1; shared M=5 <= 1.5x M=1; a plan at M=5 < 1 ms."


def plan_us(cfg, threads: int, reps: int) -> float:
    """Median wall time of one session.run at batch 1, microseconds."""
    import onnxruntime as ort

    from vigil.policies.bundle import session_options
    from vigil.training.flow import Ensemble
    from vigil.training.flow_export import export_onnx

    sess = ort.InferenceSession(export_onnx(Ensemble(cfg).eval(), cfg), session_options(threads),
                                providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"state": rng.standard_normal((1, cfg.obs_dim), dtype=np.float32),
            "instruction": rng.standard_normal((1, cfg.instr_dim), dtype=np.float32),
            "noise": rng.standard_normal((1, cfg.vfd_samples, cfg.horizon, cfg.action_dim), dtype=np.float32)}
    fetch = ["action", "vfd"]
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
            "members": list(args.members), "plain_us": plain, "rows": rows,
            "config": {"euler_steps": base.euler_steps, "hidden": base.hidden, "depth": base.depth,
                       "horizon": base.horizon}}


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
    ])


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
