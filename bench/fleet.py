"""The fleet on Ray against one process (issue 20 item 4): wall time of a fixed evaluation serially, on a local Ray
with 2 workers, and on a two-node Ray cluster started on this machine (a head and a second raylet,
ray.cluster_utils.Cluster), the same episodes in every run (their results are checked equal).

    PYTHONPATH=. .venv/bin/python -m bench.fleet          # make bench-fleet
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, markers, run_info, write_benchmarks, written_by
from vigil.sim import fleet

NAME = "fleet"
BEGIN, END = markers(NAME)
TASKS = ("button-press-topdown-v3", "door-open-v3", "drawer-close-v3", "drawer-open-v3", "peg-insert-side-v3",
         "pick-place-v3", "push-v3", "reach-v3", "window-close-v3", "window-open-v3")


def bundle(folder: Path) -> Path:
    """The demo's shipped ensemble with the packaged encoder exported beside it."""
    from vigil.training.encoder_export import export_encoder

    out = folder / "bundle"
    shutil.copytree(ROOT / "sim" / "assets" / "mt10" / "run" / "bundle", out)
    export_encoder(out / "encoder")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=16, help="episodes per task")
    ap.add_argument("--max-steps", type=int, default=500)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    run = run_info()
    specs = fleet.specs_for(TASKS, ["nominal"], args.episodes, max_steps=args.max_steps)
    with tempfile.TemporaryDirectory() as tmp:
        b = bundle(Path(tmp))
        t0 = time.perf_counter()
        serial = fleet.run_serial(b, specs)
        t_serial = time.perf_counter() - t0

        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        t_init = time.perf_counter() - t0
        t1 = time.perf_counter()
        local = fleet.run_ray(b, specs, workers=2)
        t_local = time.perf_counter() - t1
        ray.shutdown()

        from ray.cluster_utils import Cluster

        t0 = time.perf_counter()
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        t1 = time.perf_counter()
        two = fleet.run_ray(b, specs, address=cluster.address)
        t_two = time.perf_counter() - t1
        t_cluster = t1 - t0
        nodes = len({r.worker for r in two})
        cluster.shutdown()
    key = [(r.index, r.success, r.ret, r.scores) for r in serial]
    equal = key == [(r.index, r.success, r.ret, r.scores) for r in local] == \
        [(r.index, r.success, r.ret, r.scores) for r in two]
    n = len(specs)
    lines = [BEGIN, "## Fleets on Ray: one evaluation serially, on a local Ray, on a two-node cluster (issue 20)", "",
             written_by(run),
             f"- The same {n} episodes ({len(TASKS)} MT10 tasks x {args.episodes} seeds, nominal, up to "
             f"{args.max_steps} steps, the demo's shipped 3-member ensemble) in every run; results identical in all "
             f"three: **{equal}**. Worker processes that played episodes on the cluster: {nodes}.", "",
             "| run | wall s (episodes) | speed-up vs serial | Ray start s | per-episode overhead ms |",
             "|---|---:|---:|---:|---:|",
             f"| serial, one process | {t_serial:.1f} | 1.00x | – | – |",
             f"| local Ray, 2 workers | {t_local:.1f} | {t_serial / t_local:.2f}x (with start: "
             f"{t_serial / (t_local + t_init):.2f}x) | {t_init:.1f} | {1000 * (2 * t_local - t_serial) / n:.0f} |",
             f"| two-node cluster on this machine (head + raylet, 1 CPU each) | {t_two:.1f} | {t_serial / t_two:.2f}x "
             f"| {t_cluster:.1f} | {1000 * (2 * t_two - t_serial) / n:.0f} |",
             "", "Per-episode overhead: (2 x Ray wall time - serial wall time) / episodes, the cost of shipping, "
             "scheduling, and loading the bundle once per actor. Target (issue 20): at least 1.8x with 2 "
             "workers.", END]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        write_benchmarks(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
