"""Failure and shift detection of the flow ensemble: VFD against Action-L2, GU, sample variance and random.

For each trained run (a `vigil train flow` output folder: ensemble.pt and encoder/), episodes are played in
process with the torch ensemble, acting exactly as its bundle does in the runtime (member 0's chunk from
the first noise sample, 4 of 8 actions per chunk, noise drawn per plan from a generator seeded by the
episode seed; tests/test_flow_export.py checks the graph against this torch code). At each of the first
`--detect-plans` plans every detector scores the same observation:

    vfd          one-way VFD of the bundle (docs/algorithms.md, VFD; the run's pair convention)
    action_l2    mean L2 distance between members' final chunks, each from its own noise
    gu           sum over action elements of log variance across members from shared noise
    sample_var   trace of member 0's sample covariance over N noise draws (a single model's own spread)
    random       uniform noise (the floor)
plus, for choosing M, the pair convention and the number of noise samples N (the plan's cost is about
proportional to integrators x members x N), VFD of the sub-ensembles of the first 2, 3, 4 members (member
seeds do not depend on M, so they are M = 2, 3, 4 ensembles), with "anchor" pairs at N = 5, 2, 1, and the
M = 3 ensemble with anchor pairs at N = 1 (the cheapest plan measured under 1 ms).

Conditions (sim/ fault injection; seeds 20.. are task variants not in demonstrations recorded from 0..19):
    nominal         the training tasks, unseen variants
    calibration     other unseen variants (seeds 40..): each detector's conformal thresholds come from its
                    successful episodes, exactly as `vigil calibrate` sets the VFD monitor's
    positions       objects and goal moved 0.5 x their range beyond the training range (sim/shifts.py)
    physics         sliding friction x0.3 and task-body mass x4
    noise           Gaussian noise, std 0.01, on the state dimensions that vary in the task's demonstrations
    noise-constant  the same noise on the dimensions that (almost) never vary (std < 0.01): any detector
                    sees that, so it is reported apart
    heldout         Meta-World tasks outside the training set, with their own instructions

Scores per episode: the mean over a fixed early window of plans (`--early-plans`), never a whole-episode
statistic (failed episodes run longer). Reported per run (training seed), then mean and spread over runs:
shift detection AUROC (each shift vs nominal), failure prediction AUROC (failed vs successful, pooled and
per condition), TPR at the calibrated alert threshold within the detection window and the nominal
episodes' false-alarm rate, detection time, and task-level Spearman/Pearson of early VFD with success.
Raw results: the episodes, cached in OUT/episodes-<run>.jsonl (and OUT/runs.jsonl, one line per collecting
invocation); the section between the `flow-detect` markers of BENCHMARKS.md and the figures are rendered from
them (`--report-only` renders them again without playing an episode).

    .venv/bin/python -m bench.flow_detect --runs runs/mt10-s0,runs/mt10-s1,runs/mt10-s2 --out bench-runs/detect
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import (
    FIGURES,
    ROOT,
    add_fleet_args,
    command_line,
    fleet_backend,
    markers,
    pyplot,
    run_info,
    save_figure,
    utc_now,
    write_benchmarks,
    written_by,
)
from vigil.sim.shard import shard

NAME = "flow-detect"
BEGIN, END = markers(NAME)
DETECTORS = ("vfd", "action_l2", "gu", "sample_var", "random")
ABLATION = ("vfd_M2", "vfd_M3", "vfd_M4", "vfd_anchor", "vfd_anchor_N2", "vfd_anchor_N1", "vfd_M3_anchor_N1")
SHIFTS = ("positions", "physics", "noise", "heldout")  # the shifts the targets are about
CONDITIONS = ("nominal", "calibration", "positions", "physics", "noise", "noise-constant", "heldout")
NOISE_STD = 0.01


@dataclass(frozen=True)
class Job:
    run: str
    condition: str
    task: str
    seeds: tuple[int, ...]
    max_steps: int
    detect_plans: int
    ablation_plans: int
    noise_dims: tuple[int, ...] | None = None


# ------------------------------------------------------------------------------------------ rollouts

_MODELS: dict[str, object] = {}


def _model(run: str):
    """(ensemble, sub-ensembles by name, encoder) of a run, loaded once per worker process."""
    if run not in _MODELS:
        import torch

        from vigil.policies.instructions import InstructionEncoder
        from vigil.training.train_flow import load_checkpoint

        torch.set_num_threads(1)
        ens, cfg, _ = load_checkpoint(Path(run) / "ensemble.pt")
        subs = {f"vfd_M{m}": ens.subset(m) for m in range(2, cfg.members)}
        # the encoder shipped in the run's bundle: the one the runtime embeds with
        encoder = Path(run) / "bundle" / "encoder"
        _MODELS[run] = (ens, subs, InstructionEncoder.load(encoder if encoder.is_dir() else Path(run) / "encoder"))
    return _MODELS[run]


def _obs_tensor(obs: dict, image: bool):
    import torch

    state = torch.as_tensor(obs["state"], dtype=torch.float32)[None]
    if not image:
        return state
    return {"state": state, "image": torch.as_tensor(obs["image"])[None]}


def run_job(job: Job) -> list[dict]:
    import torch

    from vigil.sim.envs import make_env
    from vigil.sim.faults import Faults
    from vigil.sim.shifts import Shift
    from vigil.training import flow

    ens, subs, encoder = _model(job.run)
    cfg = ens.cfg
    image = getattr(cfg, "image_size", 0) > 0
    shift = {"positions": Shift(positions=0.5), "physics": Shift(friction=0.3, mass=4.0)}.get(job.condition, Shift())
    faults = Faults(NOISE_STD, noise_dims=job.noise_dims) if job.condition.startswith("noise") else Faults()
    env = make_env(job.task, horizon=job.max_steps, camera=image, shift=shift)
    instr = torch.as_tensor(encoder.embed([env.instruction]), dtype=torch.float32)
    N, H, m = cfg.vfd_samples, cfg.horizon, cfg.action_dim
    NB = max(N, 5)
    execute = max(1, H // 2)
    out = []
    try:
        for seed in job.seeds:
            rng = np.random.default_rng(seed)  # the runtime's Agent: same generator, same draws
            brng = np.random.default_rng([seed, zlib.crc32(f"{job.condition}/{job.task}".encode())])  # baselines
            nrng = np.random.default_rng([seed, 2])  # observation noise
            obs = env.reset(seed=seed)
            scores: dict[str, list[float]] = {k: [] for k in (*DETECTORS, *subs, *ABLATION[3:6])}
            if "vfd_M3" in subs:
                scores["vfd_M3_anchor_N1"] = []
            success, steps, plans, queue = False, 0, 0, []
            while steps < job.max_steps:
                if not queue:
                    seen = faults.corrupt(obs, steps, nrng)
                    o = _obs_tensor(seen, image)
                    noise = torch.from_numpy(rng.standard_normal((1, N, H, m), dtype=np.float32)).transpose(0, 1)
                    if plans < job.detect_plans:
                        chunk, vfd = flow.plan(ens, o, instr, noise)
                        scores["vfd"].append(float(vfd[0]))
                        # the baselines' own noise, at least 5 samples (a variance over one draw is nothing)
                        own = torch.from_numpy(brng.standard_normal((cfg.members, NB, 1, H, m), dtype=np.float32))
                        shared = torch.from_numpy(brng.standard_normal((NB, 1, H, m), dtype=np.float32))
                        abl = noise if N >= NB else shared  # ablations: the plan's noise when it has enough
                        if plans < job.ablation_plans:  # the ablation scores only enter the AUROCs
                            for name, n in (("vfd_anchor", NB), ("vfd_anchor_N2", 2), ("vfd_anchor_N1", 1)):
                                scores[name].append(float(flow.plan(ens, o, instr, abl[:n], pairs="anchor")[1][0]))
                            if "vfd_M3" in subs:  # the cheapest configuration that stays under 1 ms a plan
                                scores["vfd_M3_anchor_N1"].append(
                                    float(flow.plan(subs["vfd_M3"], o, instr, abl[:1], pairs="anchor")[1][0]))
                            for name, sub in subs.items():
                                scores[name].append(float(flow.plan(sub, o, instr, noise)[1][0]))
                        scores["action_l2"].append(float(flow.action_l2(ens, o, instr, own)[0]))
                        scores["gu"].append(float(flow.gu(ens, o, instr, shared)[0]))
                        scores["sample_var"].append(float(flow.sample_variance(ens, o, instr, shared)[0]))
                        scores["random"].append(float(brng.random()))
                    else:
                        chunk = flow.sample(ens, o, instr, noise[:1])[0]
                    queue = list(np.clip(chunk[0].numpy(), -1.0, 1.0)[:execute])
                    plans += 1
                result = env.step(queue.pop(0))
                steps += 1
                success = success or float(result.info.get("success", 0.0)) >= 1.0
                obs = result.obs
                if result.terminated or result.truncated:
                    break
            out.append({"run": job.run, "condition": job.condition, "task": job.task, "seed": seed,
                        "success": bool(success), "steps": steps, "scores": scores})
    finally:
        env.close()
    return out


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def varying_dims(demos: Path, task: str, floor: float = 0.01) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(dims whose std over the task's demonstration states is >= floor, the others)."""
    from vigil.training.demos import DemoSet

    ds = DemoSet(demos)
    states = np.concatenate([ds.load(e.id).observations["state"] for e in ds.episodes(task=task)])
    std = states.std(0)
    return tuple(int(i) for i in np.flatnonzero(std >= floor)), tuple(int(i) for i in np.flatnonzero(std < floor))


def jobs_for(run: Path, episodes: int, calib: int, heldout_tasks: list[str], max_steps: int,
             detect_plans: int, early_plans: int) -> list[Job]:
    prov = json.loads((run / "provenance.json").read_text())
    tasks = sorted(prov["tasks"])
    demos = Path(prov["demos"])
    jobs = []
    for task in tasks:
        vary, const = varying_dims(demos, task)
        seeds = tuple(range(20, 20 + episodes))
        plan = dict(max_steps=max_steps, detect_plans=detect_plans, ablation_plans=early_plans)
        jobs += [Job(str(run), "nominal", task, tuple(range(20, 20 + 2 * episodes)), **plan),
                 Job(str(run), "calibration", task, tuple(range(40, 40 + calib)), **plan),
                 Job(str(run), "positions", task, seeds, **plan),
                 Job(str(run), "physics", task, seeds, **plan),
                 Job(str(run), "noise", task, seeds, noise_dims=vary, **plan),
                 Job(str(run), "noise-constant", task, seeds, noise_dims=const, **plan)]
    for task in heldout_tasks:
        jobs.append(Job(str(run), "heldout", task, tuple(range(20, 20 + episodes)), **plan))
    return jobs


def collect(runs: list[Path], out: Path, args) -> None:
    """Play every run's missing episodes into OUT/episodes-<run>.jsonl; note the invocation in OUT/runs.jsonl."""
    from tqdm import tqdm

    from vigil.sim.metaworld_env import HELDOUT_INSTRUCTIONS

    heldout = list(HELDOUT_INSTRUCTIONS)[: args.heldout_tasks]
    jobs = [j for r in runs for j in jobs_for(r, args.episodes, args.calibration_episodes, heldout,
                                               args.max_steps, args.detect_plans, args.early_plans)
            if not (out / f"episodes-{Path(j.run).name}.jsonl").exists()]
    if not jobs:
        return
    # resumable: jobs whose episodes are already in a run's .part file (an interrupted collection) are done
    files = {Path(j.run).name: out / f"episodes-{Path(j.run).name}.jsonl.part" for j in jobs}
    done = {(name, e["condition"], e["task"]) for name, f in files.items() if f.exists()
            for e in map(json.loads, f.read_text().splitlines())}
    jobs = [j for j in jobs if (Path(j.run).name, j.condition, j.task) not in done]
    total = sum(len(j.seeds) for j in jobs)
    started, t0 = utc_now(), time.monotonic()
    failed = []
    with tqdm(total=total, desc="episodes") as bar:
        for done in shard(run_job, sorted(jobs, key=lambda j: -len(j.seeds)), fleet_backend(args),
                          initializer=_init_worker):
            job, eps = done.item, done.value
            if done.error is not None:  # one broken job must not throw away the others' hours of rollouts
                failed.append(f"{Path(job.run).name} {job.condition}/{job.task}: {done.error!r}")
                tqdm.write(f"FAILED {failed[-1]}")
                continue
            with open(files[Path(job.run).name], "a") as fh:
                for e in eps:
                    fh.write(json.dumps(e) + "\n")
            bar.update(len(eps))
            bar.set_postfix(last=f"{job.condition}/{job.task}", ok=f"{np.mean([e['success'] for e in eps]):.0%}")
    with open(out / "runs.jsonl", "a") as fh:
        fh.write(json.dumps({"started": started, "minutes": (time.monotonic() - t0) / 60, "episodes": total,
                             "execute": executed_per_plan(runs, []), "command": command_line()}) + "\n")
    if failed:
        raise SystemExit("some rollouts failed (the rest is kept; run again to retry them):\n" + "\n".join(failed))
    for f in files.values():
        f.rename(f.with_suffix(""))


# ------------------------------------------------------------------------------------------ analysis


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    neg, pos = np.asarray(neg, float), np.asarray(pos, float)
    if not len(neg) or not len(pos):
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([neg, pos]))
    return float((ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def early(ep: dict, name: str, k: int) -> float:
    s = ep["scores"].get(name, [])
    return float(np.mean(s[:k])) if s else float("nan")


def analyse_run(eps: list[dict], detectors: tuple[str, ...], early_plans: int, window: int, alpha: float) -> dict:
    from scipy.stats import pearsonr, spearmanr

    from vigil.monitors.conformal import calibrate, windowed

    by = {c: [e for e in eps if e["condition"] == c] for c in CONDITIONS}
    res: dict = {"success": {c: float(np.mean([e["success"] for e in v])) if v else float("nan")
                             for c, v in by.items()},
                 "n": {c: len(v) for c, v in by.items()}, "shift": {}, "fail": {}, "tpr": {}, "time": {},
                 "fpr": {}, "thr": {}, "task": {}}
    test = [e for c in CONDITIONS if c != "calibration" for e in by[c]]
    for d in detectors:
        good = [e["scores"][d] for e in by["calibration"] if e["success"] and e["scores"].get(d)]
        thr = calibrate(good, window, {"alert": alpha})["alert"]
        res["thr"][d] = thr
        nom = np.array([early(e, d, early_plans) for e in by["nominal"]])
        for c in CONDITIONS[2:]:
            res["shift"][(d, c)] = auroc(nom, [early(e, d, early_plans) for e in by[c]])
        for c in ("pooled", "nominal", *CONDITIONS[2:]):
            pool = test if c == "pooled" else by[c]
            ok = [early(e, d, early_plans) for e in pool if e["success"]]
            bad = [early(e, d, early_plans) for e in pool if not e["success"]]
            res["fail"][(d, c)] = auroc(ok, bad) if min(len(ok), len(bad)) >= 3 else float("nan")
        for c in ("nominal", *CONDITIONS[2:]):
            hits = [np.flatnonzero(windowed(e["scores"][d], window) > thr) for e in by[c]]
            rate = float(np.mean([len(h) > 0 for h in hits])) if hits else float("nan")
            (res["fpr"] if c == "nominal" else res["tpr"])[(d, c)] = rate
            first = [int(h[0]) for h in hits if len(h)]
            res["time"][(d, c)] = float(np.median(first)) if first else float("nan")
        tasks = sorted({e["task"] for e in by["nominal"]})
        rate = [np.mean([e["success"] for e in by["nominal"] if e["task"] == t]) for t in tasks]
        score = [np.mean([early(e, d, early_plans) for e in by["nominal"] if e["task"] == t]) for t in tasks]
        ok = np.ptp(rate) > 0
        res["task"][d] = (spearmanr(score, rate).statistic if ok else float("nan"),
                          pearsonr(score, rate).statistic if ok else float("nan"), tasks, score, rate)
    return res


def _ms(values: list[float], fmt: str = "{:.2f}") -> str:
    v = np.asarray([x for x in values if np.isfinite(x)], float)
    if not len(v):
        return "–"
    return fmt.format(v.mean()) if len(v) == 1 else f"{fmt.format(v.mean())} ± {fmt.format(v.std(ddof=1))}"


def report(results: dict[str, dict], groups: dict[str, list[str]], args, run: dict, seconds: float,
           rollouts: list[dict], execute: int, rate_hz: float) -> str:
    """The section, from the analysed episodes of every run."""
    episodes, minutes = sum(r["episodes"] for r in rollouts), sum(r["minutes"] for r in rollouts)
    played = f"- Rollouts: {episodes} episodes in {minutes:.0f} min, {len(rollouts)} invocation(s)." if rollouts else ""
    lines = [BEGIN, "## Flow ensemble: failure and shift detection (VFD against baselines)", "",
             written_by(run, seconds=seconds), *([played] if played else []),
             f"- Per run: {args.episodes * 2} nominal and {args.episodes} episodes of each other condition per "
             f"task, {args.calibration_episodes} calibration episodes per task, {args.heldout_tasks} held-out tasks; "
             f"scores over the first {args.early_plans} plans ({args.early_plans * execute} steps, "
             f"{args.early_plans * execute / rate_hz:.2f} s) for AUROC; alert threshold conformal at "
             f"{args.alpha:.0%} per plan on a running mean of {args.window} plans, detection within the first "
             f"{args.detect_plans} plans. Spread: mean ± std over the runs of a group (training seeds).", ""]
    for group, runs in groups.items():
        rs = [results[r] for r in runs]
        lines += [f"### {group} ({len(runs)} run{'s' if len(runs) > 1 else ''}: "
                  f"{', '.join(Path(r).name for r in runs)})", ""]
        lines += ["Success rate per condition (in process, the bundle's actions): " + ", ".join(
            f"{c} {_ms([r['success'][c] for r in rs], '{:.0%}')}" for c in CONDITIONS if rs[0]["n"][c]), ""]
        tasks = rs[0]["task"]["vfd"][2]
        lines += ["Nominal success and early VFD per task (mean ± std over runs):", "",
                  "| | " + " | ".join(t.replace("-v3", "") for t in tasks) + " |", "|---" + "|---:" * len(tasks) + "|",
                  "| success | " + " | ".join(_ms([r["task"]["vfd"][4][i] for r in rs], "{:.0%}")
                                             for i in range(len(tasks))) + " |",
                  "| VFD, first plans | " + " | ".join(_ms([r["task"]["vfd"][3][i] for r in rs], "{:.1f}")
                                                      for i in range(len(tasks))) + " |", ""]
        head = "| detector | " + " | ".join(f"shift AUROC {c}" for c in (*SHIFTS, "noise-constant")) + \
               " | failure AUROC pooled | failure AUROC nominal | task Spearman | task Pearson |"
        lines += ["Shift detection (shifted vs nominal episodes) and failure prediction (failed vs successful):", "",
                  head, "|---" + "|---:" * (len(SHIFTS) + 5) + "|"]
        dets = [d for d in (*DETECTORS, *ABLATION) if d in rs[0]["thr"]]
        for d in dets:
            cells = [_ms([r["shift"][(d, c)] for r in rs]) for c in (*SHIFTS, "noise-constant")]
            cells += [_ms([r["fail"][(d, c)] for r in rs]) for c in ("pooled", "nominal")]
            cells += [_ms([r["task"][d][0] for r in rs]), _ms([r["task"][d][1] for r in rs])]
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines += ["", "At the calibrated alert threshold: TPR per shift (episodes flagged within the detection "
                  "window), false-alarm rate on nominal episodes, and median detection time in steps "
                  f"(plan index x {execute}):", "",
                  "| detector | nominal false alarms | " + " | ".join(f"TPR {c}" for c in SHIFTS) + " | " +
                  " | ".join(f"time {c}" for c in SHIFTS) + " |",
                  "|---" + "|---:" * (1 + 2 * len(SHIFTS)) + "|"]
        for d in dets:
            cells = [_ms([r["fpr"][(d, "nominal")] for r in rs], "{:.0%}")]
            cells += [_ms([r["tpr"][(d, c)] for r in rs], "{:.0%}") for c in SHIFTS]
            cells += [_ms([r["time"][(d, c)] * execute for r in rs], "{:.0f}") for c in SHIFTS]
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
        lines += ["", "Failure prediction within each condition (AUROC, failed vs successful; – where fewer than 3 "
                  "of either):", "", "| detector | " + " | ".join(CONDITIONS[i] for i in (0, 2, 3, 4, 5, 6)) + " |",
                  "|---" + "|---:" * 6 + "|"]
        for d in DETECTORS:
            lines.append(f"| {d} | " + " | ".join(_ms([r["fail"][(d, c)] for r in rs])
                                                  for c in ("nominal", *CONDITIONS[2:])) + " |")
        slug = group.lower().replace(" ", "-").replace("=", "")
        lines += ["", f"![ROC curves]({(FIGURES / f'flow_detect_roc_{slug}.png').relative_to(ROOT)})",
                  f"![calibration]({(FIGURES / f'flow_detect_calibration_{slug}.png').relative_to(ROOT)})", ""]
    lines.append(END)
    return "\n".join(lines)


def roc_points(neg, pos):
    s = np.concatenate([neg, pos])
    y = np.concatenate([np.zeros(len(neg)), np.ones(len(pos))])
    order = np.argsort(-s, kind="stable")
    y = y[order]
    tpr = np.concatenate([[0], np.cumsum(y) / max(1, y.sum())])
    fpr = np.concatenate([[0], np.cumsum(1 - y) / max(1, (1 - y).sum())])
    return fpr, tpr


def plots(eps_by_run: dict[str, list[dict]], results: dict[str, dict], group: str, runs: list[str],
          early_plans: int) -> None:
    """The group's ROC curves and its task-level calibration, from the episodes."""
    plt = pyplot()
    slug = group.lower().replace(" ", "-").replace("=", "")
    eps = [e for r in runs for e in eps_by_run[r]]  # pooled over runs for the picture; tables keep runs apart
    panels = [(c, "shift") for c in (*SHIFTS, "noise-constant")] + [("pooled", "failure")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4))
    for ax, (c, kind) in zip(axes, panels):
        for d in DETECTORS:
            if kind == "shift":
                neg = [early(e, d, early_plans) for e in eps if e["condition"] == "nominal"]
                pos = [early(e, d, early_plans) for e in eps if e["condition"] == c]
            else:
                test = [e for e in eps if e["condition"] != "calibration"]
                neg = [early(e, d, early_plans) for e in test if e["success"]]
                pos = [early(e, d, early_plans) for e in test if not e["success"]]
            if not pos or not neg:
                continue
            fpr, tpr = roc_points(np.array(neg), np.array(pos))
            ax.plot(fpr, tpr, label=f"{d} {auroc(neg, pos):.2f}")
        ax.plot([0, 1], [0, 1], "k:", lw=0.8)
        ax.set_title(f"{kind}: {c}" if kind == "shift" else "failure prediction (pooled)", fontsize=10)
        ax.set_xlabel("false positive rate")
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("true positive rate")
    fig.suptitle(f"{group}: ROC of early-window scores (first {early_plans} plans), runs pooled", fontsize=11)
    fig.tight_layout()
    save_figure(fig, FIGURES / f"flow_detect_roc_{slug}.png", dpi=100)

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in runs:
        rho, pr, tasks, score, rate = results[r]["task"]["vfd"]
        a.scatter(score, rate, label=f"{Path(r).name}: Spearman {rho:.2f}, Pearson {pr:.2f}", s=18)
        if r == runs[0]:
            for t, s_, y in zip(tasks, score, rate):
                a.annotate(t.replace("-v3", ""), (s_, y), fontsize=7)
    a.set_xscale("log")
    a.set_xlabel(f"mean VFD over the first {early_plans} plans (nominal, per task)")
    a.set_ylabel("success rate")
    a.legend(fontsize=7)
    a.set_title("task-level calibration")
    test = [e for e in eps if e["condition"] != "calibration"]
    for d in ("vfd", "action_l2", "gu", "sample_var"):
        s = np.array([early(e, d, early_plans) for e in test])
        f = np.array([not e["success"] for e in test], float)
        q = np.quantile(s, np.linspace(0, 1, 11))
        idx = np.clip(np.searchsorted(q, s, side="right") - 1, 0, 9)
        b.plot(np.arange(10) + 0.5, [f[idx == i].mean() if (idx == i).any() else np.nan for i in range(10)],
               marker="o", label=d)
    b.set_xlabel("score decile (all test episodes)")
    b.set_ylabel("failure rate")
    b.set_title("failure rate by score decile")
    b.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, FIGURES / f"flow_detect_calibration_{slug}.png", dpi=100)


def executed_per_plan(runs: list[Path], rollouts: list[dict]) -> int:
    """Actions executed per plan (half the chunk): from the first run's provenance, or as the collection noted it."""
    prov = runs[0] / "provenance.json"
    if prov.exists():
        return json.loads(prov.read_text()).get("config", {}).get("horizon", 8) // 2
    return next((r["execute"] for r in reversed(rollouts) if "execute" in r), 4)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="comma-separated `vigil train flow` output folders")
    ap.add_argument("--groups", help="label:run,run;label:run ... (default: one group of all runs)")
    ap.add_argument("--out", default="bench-runs/flow-detect", help="folder for the episode caches")
    ap.add_argument("--episodes", type=int, default=10, help="episodes per task per condition (nominal: twice)")
    ap.add_argument("--calibration-episodes", type=int, default=10, help="calibration episodes per task")
    ap.add_argument("--heldout-tasks", type=int, default=9, help="how many held-out tasks")
    ap.add_argument("--max-steps", type=int, default=500)
    ap.add_argument("--early-plans", type=int, default=8, help="plans in the early window of the AUROCs")
    ap.add_argument("--detect-plans", type=int, default=12, help="plans scored (detection window)")
    ap.add_argument("--window", type=int, default=3, help="the monitor's running mean, in plans")
    ap.add_argument("--alpha", type=float, default=0.10, help="alert false-alarm rate per plan")
    add_fleet_args(ap)
    ap.add_argument("--report-only", "--analyse-only", dest="report_only", action="store_true",
                    help="render from the cached episodes only; play none")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and figures alone")
    args = ap.parse_args(argv)
    runs = [Path(r) for r in args.runs.split(",")]
    out = Path(args.out)
    run, t0 = run_info(), time.monotonic()
    if not args.report_only:
        out.mkdir(parents=True, exist_ok=True)
        collect(runs, out, args)
    if missing := [str(out / f"episodes-{r.name}.jsonl") for r in runs
                   if not (out / f"episodes-{r.name}.jsonl").exists()]:
        raise SystemExit(f"no episodes at {', '.join(missing)}: run the benchmark without --report-only first")
    eps_by_run = {str(r): [json.loads(x) for x in (out / f"episodes-{r.name}.jsonl").read_text().splitlines()]
                  for r in runs}
    dets = (*DETECTORS, *ABLATION)
    results = {r: analyse_run(e, tuple(d for d in dets if e[0]["scores"].get(d) is not None),
                              args.early_plans, args.window, args.alpha) for r, e in eps_by_run.items()}
    if args.groups:
        groups = {g.split(":", 1)[0]: [str(Path(x)) for x in g.split(":", 1)[1].split(",")]
                  for g in args.groups.split(";")}
    else:
        groups = {"all runs": [str(r) for r in runs]}
    runs_file = out / "runs.jsonl"
    rollouts = [json.loads(x) for x in runs_file.read_text().splitlines()] if runs_file.exists() else []
    execute = executed_per_plan(runs, rollouts)
    text = report(results, groups, args, run, time.monotonic() - t0, rollouts, execute, 80.0)
    print(text)
    if args.no_write:
        return 0
    for g, rs in groups.items():
        plots(eps_by_run, results, g, rs, args.early_plans)
    write_benchmarks(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
