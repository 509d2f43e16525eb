"""Nominal success of a flow-ensemble bundle with the runtime in the loop, and VFD against success per task.

`vigil serve --bundle B` runs as a child process (vigil.runtime.launch); this process plays each task's
episodes against it as the robot (`vigil.sim.robot.run_episodes`). Per task: success rate, mean episode
length and the mean VFD over the first `--early-plans` plans; across tasks: Spearman and Pearson correlation
of that VFD with success.

Raw results: bench/out/flow_success.json; the section between the `flow-success` markers of BENCHMARKS.md and
docs/figures/flow_success.png are rendered from them (`--report-only` renders them again without measuring).

    .venv/bin/python -m bench.flow_success --bundle runs/mt10/bundle --demos data/mt10 --episodes 10
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    FIGURES,
    OUT,
    ROOT,
    markers,
    nan,
    pyplot,
    read_raw,
    run_info,
    save_figure,
    section,
    write_benchmarks,
    write_raw,
    written_by,
)

NAME = "flow-success"
RAW = OUT / "flow_success.json"
FIGURE = FIGURES / "flow_success.png"


def evaluate(bundle: Path, tasks: list[str], episodes: int, seed: int, max_steps: int,
             early_plans: int) -> dict[str, dict[str, list]]:
    """Every task's lockstep episodes against one `vigil serve` process: success, steps, early VFD."""
    from tqdm import tqdm

    from vigil.runtime.launch import serving
    from vigil.sim.envs import make_env
    from vigil.sim.robot import SimConfig, run_episodes

    results: dict[str, dict[str, list]] = {}
    with serving(bundle, deadline_ms=1000, log_level="WARNING") as served, \
            tqdm(total=len(tasks) * episodes, desc="episodes") as bar:
        for task in tasks:
            env = make_env(task, horizon=max_steps)
            cfg = SimConfig(served.robot_endpoint, f"eval-{task}", episodes, max_steps, seed, "lockstep", 0.0, 10.0)
            stats = run_episodes(env, cfg)
            env.close()
            bar.update(episodes)
            early = [float(np.mean(s.scores.get("vfd", [np.nan])[:early_plans])) for s in stats]
            results[task] = {"success": [bool(s.success) for s in stats], "steps": [s.steps for s in stats],
                             "vfd_early": early}
            bar.set_postfix(task=task, success=f"{np.mean(results[task]['success']):.0%}")
    return results


def expert_success(demos: Path | None) -> dict[str, float]:
    """The scripted expert's success per task in the demonstrations the policy learned from."""
    if demos is None:
        return {}
    from vigil.training.demos import DemoSet

    ds = DemoSet(demos)
    return {t: float(np.mean([e.success for e in ds.episodes(task=t)])) for t in ds.tasks()}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from vigil.sim.metaworld_env import MT10_TASKS

    run = run_info()
    tasks = args.tasks.split(",") if args.tasks else list(MT10_TASKS)
    t0 = time.monotonic()
    results = evaluate(Path(args.bundle), tasks, args.episodes, args.seed, args.max_steps, args.early_plans)
    manifest = json.loads((Path(args.bundle) / "manifest.json").read_text())
    prov = manifest.get("provenance", {})
    return {"run": run, "seconds": time.monotonic() - t0, "tasks": tasks, "episodes": args.episodes,
            "seed": args.seed, "max_steps": args.max_steps, "early_plans": args.early_plans, "results": results,
            "expert": expert_success(Path(args.demos) if args.demos else None),
            "bundle": {"name": manifest["name"], "kind": manifest["kind"], "chunk": manifest["chunk"],
                       "members": prov.get("members", "?"), "vfd_pairs": prov.get("vfd_pairs", "?"),
                       "demos": prov.get("demos", "?")}}


def per_task(raw: dict[str, Any]) -> tuple[list[float], list[float]]:
    """(success rate, mean early VFD) per task, in the order of raw["tasks"]."""
    res = raw["results"]
    rates = [float(np.mean(res[t]["success"])) for t in raw["tasks"]]
    vfds = [float(np.nanmean([nan(v) for v in res[t]["vfd_early"]])) for t in raw["tasks"]]
    return rates, vfds


def correlations(rates: list[float], vfds: list[float]) -> tuple[float, float]:
    """Spearman and Pearson correlation of early VFD with success across tasks (nan if success is constant)."""
    from scipy.stats import pearsonr, spearmanr

    if np.ptp(rates) == 0:
        return float("nan"), float("nan")
    return float(spearmanr(vfds, rates).statistic), float(pearsonr(vfds, rates).statistic)


def render(raw: dict[str, Any]) -> str:
    """The section, from the raw results alone."""
    tasks, expert, b, k = raw["tasks"], raw["expert"], raw["bundle"], raw["early_plans"]
    rates, vfds = per_task(raw)
    rho, r_p = correlations(rates, vfds)
    rows = [f"| task | policy success | expert success (demos) | mean steps | mean VFD, first {k} plans |",
            "|---|---:|---:|---:|---:|"]
    for t, rate, vfd in zip(tasks, rates, vfds):
        rows.append(f"| {t} | {rate:.0%} | {expert.get(t, float('nan')):.0%} | "
                    f"{np.mean(raw['results'][t]['steps']):.0f} | {vfd:.3g} |")
    mean_rate = float(np.mean(rates))
    mean_expert = np.mean(list(expert.values())) if expert else float("nan")
    rows.append(f"| **mean** | **{mean_rate:.0%}** | {mean_expert:.0%} | | |")
    first, last = raw["seed"], raw["seed"] + raw["episodes"] - 1
    return section(NAME, [
        "## Flow ensemble: nominal success with the runtime in the loop, and VFD against success",
        "",
        written_by(raw["run"], seconds=raw["seconds"]),
        f"- Bundle: `{b['name']}` ({b['kind']}, {b['members']} members, pairs {b['vfd_pairs']}, chunk "
        f"{b['chunk']['length']} executing {b['chunk']['execute']}); trained on {b['demos']}.",
        f"- {raw['episodes']} lockstep episodes per task against a `vigil serve` process, seeds {first}..{last}, "
        f"at most {raw['max_steps']} steps.",
        "",
        *rows,
        "",
        f"Task-level correlation of early VFD with success: Spearman {rho:.2f}, Pearson {r_p:.2f} "
        f"(target: at most -0.6). Nominal success target: at least 90% ({'met' if mean_rate >= 0.9 else 'not met'}).",
        "",
        f"![success and VFD per task]({FIGURE.relative_to(ROOT)})",
    ])


def plot(raw: dict[str, Any]) -> None:
    """Success per task (policy and expert), and success against early VFD."""
    plt = pyplot()
    tasks, expert, k = raw["tasks"], raw["expert"], raw["early_plans"]
    rates, vfds = per_task(raw)
    rho, r_p = correlations(rates, vfds)
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
    b.set_xlabel(f"mean VFD over the first {k} plans (log)")
    b.set_ylabel("success rate")
    b.set_title(f"Spearman {rho:.2f}, Pearson {r_p:.2f}")
    fig.tight_layout()
    save_figure(fig, FIGURE)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="flow_ensemble bundle folder (required unless --report-only)")
    ap.add_argument("--demos", help="the demonstrations it was trained on (for the expert's success)")
    ap.add_argument("--tasks", help="comma-separated tasks (default: MT10)")
    ap.add_argument("--episodes", type=int, default=10, help="episodes per task")
    ap.add_argument("--seed", type=int, default=20, help="seed of the first episode of each task")
    ap.add_argument("--max-steps", type=int, default=500)
    ap.add_argument("--early-plans", type=int, default=5, help="plans in the early VFD window")
    ap.add_argument("--report-only", action="store_true", help=f"render {RAW.name} again; measure nothing")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md, figure, raw alone")
    args = ap.parse_args(argv)
    if not args.report_only and not args.bundle:
        ap.error("--bundle is required (or --report-only)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raw = read_raw(RAW) if args.report_only else measure(args)
    text = render(raw)
    print(text)
    if not args.no_write:
        if not args.report_only:
            write_raw(RAW, raw)
        plot(raw)
        write_benchmarks(text, *markers(NAME))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
