"""onnxruntime cost of one `flow_ensemble` plan (training/flow_export.py) at batch 1: encode once, the 10
Euler steps plus the 0.95 VFD point for every integrating member, one-way VFD over N noise samples, in one
`session.run`. M = 1, 2, 3, 5, 8; full members versus a shared encoder; pair conventions "lower" versus
"anchor"; N = 5 (the default), 2 and 1; default width (FlowConfig: hidden 256, depth 3, H 8). M = 1 at
N = 1 is the plain policy (one member, 10 Euler steps, no score): the baseline every ratio is taken to. Untrained weights (the cost does
not depend on their values). Session options as the runtime uses them (policies/bundle.py).
Prints a table and rewrites the section between the `flow-latency` markers of BENCHMARKS.md.

    .venv/bin/python bench/flow_latency.py [--threads 1] [--reps 300] [--no-write]     # make bench-flow-latency
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vigil.policies.bundle import session_options
from vigil.training.flow import Ensemble, FlowConfig
from vigil.training.flow_export import export_onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import git_state, machine, write_benchmarks  # noqa: E402  (bench/ is not a package)

BEGIN, END = "<!-- flow-latency:begin -->", "<!-- flow-latency:end -->"

TARGETS = "targets (issue 4 item 7): full M=5 <= 4x M=1; shared M=5 <= 1.5x M=1; a plan at M=5 < 1 ms"


def plan_us(cfg: FlowConfig, threads: int, reps: int) -> float:
    """Median wall time of one session.run at batch 1, microseconds."""
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--members", type=int, nargs="+", default=[1, 2, 3, 5, 8])
    ap.add_argument("--samples", type=int, nargs="+", default=[5, 2, 1], help="VFD noise samples N per plan")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    base = FlowConfig()
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["| variant | pairs | N | " + " | ".join(f"M={m}" for m in args.members) + " |",
             "|---|---|---:|" + "---:|" * len(args.members)]
    plain = plan_us(dataclasses.replace(base, members=1, vfd_samples=1), args.threads, args.reps)
    for shared in (False, True):
        for pairs, n in [("lower", args.samples[0])] + [("anchor", n) for n in args.samples]:
            row = {m: plan_us(dataclasses.replace(base, members=m, shared_encoder=shared, vfd_pairs=pairs,
                                                  vfd_samples=n), args.threads, args.reps) for m in args.members}
            cells = [f"{row[m]:.0f} ({row[m] / plain:.2f}x)" for m in args.members]
            lines.append(f"| {'shared encoder' if shared else 'full members'} | {pairs} | {n} | " + " | ".join(cells) + " |")
    info = machine(None)
    text = "\n".join([
        BEGIN,
        "## Cost of knowing: one flow-ensemble plan in onnxruntime",
        "",
        f"Written by `bench/flow_latency.py` (`make bench-flow-latency`) on {started}; commit {git_state()}; "
        f"{info.get('CPU', '?')}, {info.get('cores', '?')} cores. onnxruntime {ort.__version__}, {args.threads} "
        f"intra-op thread(s), batch 1, median of {args.reps} plans. One plan = encode once, "
        f"{base.euler_steps} Euler steps + the 0.95 VFD point for every integrating member, one-way VFD over "
        f"N noise samples (column N), in one `session.run`; hidden {base.hidden}, depth {base.depth}, "
        f"H {base.horizon}; untrained weights (the cost does not depend on them).",
        "",
        f"Median µs per plan (in brackets: ratio to the plain policy, one member at N = 1, {plain:.0f} µs, "
        "measured in the same run):",
        "",
        *lines,
        "",
        f"{TARGETS[0].upper()}{TARGETS[1:]}. `lower` (each unordered pair once, lower index integrating) "
        "evaluates about M(M-1)/2 x N member-paths per step, `anchor` (member 0 integrates, every member is "
        "evaluated on its path) M x N. FACTS.md's reference: a naive 10-step 256-wide member 155 µs, five 717 µs.",
        END,
    ])
    print(text)
    if not args.no_write:
        write_benchmarks(text, BEGIN, END)


if __name__ == "__main__":
    main()
