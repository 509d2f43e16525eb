"""Nominal success of a flow-ensemble bundle with the runtime in the loop, and VFD against success per task.

Starts `vigil serve --bundle B` (lockstep) as a process, and plays each task's episodes against it from this
process as the robot (`vigil.sim.robot.run_episodes`: the instruction and the seed go out with every reset).
Seeds default to 20.. so that, with demonstrations recorded from seeds 0..19, the episodes run on task
variants the policy never saw. Per task: success rate, mean episode length, and the mean VFD over a fixed
early window of plans (the first `--early-plans`; never a whole-episode statistic, since failed episodes
run longer). Across tasks: Spearman and Pearson correlation of that VFD with success (PAPERS.md §1: negative
is good). Writes the section between the `flow-success` markers of BENCHMARKS.md and
docs/figures/flow_success.png, unless --no-write.

    .venv/bin/python bench/flow_success.py --bundle runs/mt10/bundle --demos data/mt10 --episodes 10
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vigil.sim.demo import free_port

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import git_state, machine, write_benchmarks  # noqa: E402  (bench/ is not a package)

ROOT = Path(__file__).resolve().parents[1]
FIGURE = ROOT / "docs" / "figures" / "flow_success.png"
BEGIN, END = "<!-- flow-success:begin -->", "<!-- flow-success:end -->"


def evaluate(bundle: Path, tasks: list[str], episodes: int, seed: int, max_steps: int,
             early_plans: int) -> dict[str, dict]:
    from vigil.sim.envs import make_env
    from vigil.sim.robot import SimConfig, run_episodes

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        serve = subprocess.Popen([sys.executable, "-m", "vigil.runtime.cli", "serve", "--bundle", str(bundle),
                                  "--robot-endpoint", endpoint, "--operator-endpoint",
                                  f"tcp://127.0.0.1:{free_port()}", "--store", f"{tmp}/alerts.db",
                                  "--deadline-ms", "1000", "--log-level", "WARNING"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            time.sleep(1.0)
            bar = tqdm(total=len(tasks) * episodes, desc="episodes")
            for task in tasks:
                env = make_env(task, horizon=max_steps)
                cfg = SimConfig(endpoint, f"eval-{task}", episodes, max_steps, seed, "lockstep", 0.0, 10.0)
                stats = run_episodes(env, cfg)
                env.close()
                bar.update(episodes)
                early = [float(np.mean(s.scores.get("vfd", [np.nan])[:early_plans])) for s in stats]
                results[task] = {"success": [bool(s.success) for s in stats], "steps": [s.steps for s in stats],
                                 "vfd_early": early}
                bar.set_postfix(task=task, success=f"{np.mean(results[task]['success']):.0%}")
            bar.close()
        finally:
            serve.terminate()
            serve.wait(10)
    return results


def expert_success(demos: Path | None) -> dict[str, float]:
    if demos is None:
        return {}
    from vigil.training.demos import DemoSet

    ds = DemoSet(demos)
    return {t: float(np.mean([e.success for e in ds.episodes(task=t)])) for t in ds.tasks()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", required=True, help="flow_ensemble bundle folder")
    ap.add_argument("--demos", help="the demonstrations it was trained on (for the expert's success)")
    ap.add_argument("--tasks", help="comma-separated tasks (default: MT10)")
    ap.add_argument("--episodes", type=int, default=10, help="episodes per task")
    ap.add_argument("--seed", type=int, default=20, help="seed of the first episode of each task")
    ap.add_argument("--max-steps", type=int, default=500)
    ap.add_argument("--early-plans", type=int, default=5, help="plans in the early VFD window")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()
    from scipy.stats import pearsonr, spearmanr

    from vigil.sim.metaworld_env import MT10_TASKS

    tasks = args.tasks.split(",") if args.tasks else list(MT10_TASKS)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.time()
    res = evaluate(Path(args.bundle), tasks, args.episodes, args.seed, args.max_steps, args.early_plans)
    expert = expert_success(Path(args.demos) if args.demos else None)
    manifest = json.loads((Path(args.bundle) / "manifest.json").read_text())
    rows = ["| task | policy success | expert success (demos) | mean steps | mean VFD, first "
            f"{args.early_plans} plans |", "|---|---:|---:|---:|---:|"]
    rates, vfds = [], []
    for t in tasks:
        r = res[t]
        rate, vfd = float(np.mean(r["success"])), float(np.nanmean(r["vfd_early"]))
        rates.append(rate)
        vfds.append(vfd)
        rows.append(f"| {t} | {rate:.0%} | {expert.get(t, float('nan')):.0%} | {np.mean(r['steps']):.0f} | {vfd:.3g} |")
    mean_rate = float(np.mean(rates))
    rows.append(f"| **mean** | **{mean_rate:.0%}** | {np.mean(list(expert.values())) if expert else float('nan'):.0%} "
                "| | |")
    rho = spearmanr(vfds, rates).statistic if np.ptp(rates) > 0 else float("nan")
    r_p = pearsonr(vfds, rates).statistic if np.ptp(rates) > 0 else float("nan")
    info = machine(None)
    prov = manifest.get("provenance", {})
    text = "\n".join([
        BEGIN,
        "## Flow ensemble: nominal success with the runtime in the loop, and VFD against success",
        "",
        f"Written by `bench/flow_success.py` on {started} in {time.time() - t0:.0f} s; commit {git_state()}; "
        f"{info.get('CPU', '?')}, {info.get('cores', '?')} cores.",
        f"- Command: `{' '.join(['.venv/bin/python', 'bench/flow_success.py', *sys.argv[1:]])}`",
        f"- Bundle: `{manifest['name']}` ({manifest['kind']}, {prov.get('members', '?')} members, "
        f"pairs {prov.get('vfd_pairs', '?')}, chunk {manifest['chunk']['length']} executing "
        f"{manifest['chunk']['execute']}); trained on {prov.get('demos', '?')}.",
        f"- {args.episodes} lockstep episodes per task over the wire (`vigil serve` process, robot = "
        f"`vigil.sim.robot`), seeds {args.seed}..{args.seed + args.episodes - 1} (variants not in the "
        f"demonstrations when those used seeds 0..19), at most {args.max_steps} steps.",
        "",
        *rows,
        "",
        f"Task-level correlation of early VFD with success: Spearman {rho:.2f}, Pearson {r_p:.2f} "
        "(target: at most -0.6). Nominal success target: at least 90% "
        f"({'met' if mean_rate >= 0.9 else 'not met'}).",
        "",
        f"![success and VFD per task]({FIGURE.relative_to(ROOT)})",
        END,
    ])
    print(text)
    if args.no_write:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    x = np.arange(len(tasks))
    a.bar(x - 0.2, rates, 0.4, label="policy (runtime in the loop)")
    if expert:
        a.bar(x + 0.2, [expert.get(t, np.nan) for t in tasks], 0.4, label="scripted expert (demos)")
    a.set_xticks(x, [t.replace("-v3", "") for t in tasks], rotation=40, ha="right", fontsize=8)
    a.set_ylabel("success rate")
    a.set_ylim(0, 1.05)
    a.legend(fontsize=8)
    b.scatter(vfds, rates)
    for t, v, r in zip(tasks, vfds, rates):
        b.annotate(t.replace("-v3", ""), (v, r), fontsize=7)
    b.set_xscale("log")
    b.set_xlabel(f"mean VFD over the first {args.early_plans} plans (log)")
    b.set_ylabel("success rate")
    b.set_title(f"Spearman {rho:.2f}, Pearson {r_p:.2f}")
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110)
    write_benchmarks(text, BEGIN, END)


if __name__ == "__main__":
    main()
