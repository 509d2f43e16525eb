"""Real-time chunking against its baselines on MT10 (issue 16): `make bench-rtc` (bench/rtc.sh trains first).

Every episode runs through a real `vigil serve --execution async` process in lockstep with a constant planner
delay of d control ticks (`--plan-delay constant:<d / 80 Hz>`): the runtime computes each plan on its worker
and makes it available exactly d ticks after the observation it was planned from, so a 2-core machine
reproduces the latency of a big model tick for tick. Methods, all on the same tasks and episode seeds:

- sync      the robot waits for every plan (`--merge sync`). In simulation the world waits with it (the
            environment is not stepped while the robot waits), so its success is the same at every d; what d
            costs is time: (steps + plans x d) control periods per episode. It is the reference, run at d = 0.
- naive     switch to a new chunk as soon as it arrives (`--merge naive`).
- blend     LeRobot's async aggregation: over the overlap 0.3 old + 0.7 new (`--merge blend`).
- temporal  ACT's temporal ensembling: a plan every tick, each tick's action the exp(-0.01 i)-weighted average
            of every chunk's prediction for it (`--merge temporal`).
- rtc-guided   RTC with inference-time guidance (the plain bundle exported with `--rtc guided`).
- rtc-trained  RTC trained with a random committed prefix (`--rtc trained`), no guidance at inference.

Per episode: success (Meta-World's flag at any step), steps, the executed actions' mean squared jerk (third
difference per tick, summed over the 4 action dimensions), the jump ||a_t - a_{t-1}|| at every seam (a tick
whose action comes from another plan than the previous tick's) and between seams, the VFD of every plan.
A second experiment (`--shift`) runs nominal and position-shifted episodes for sync, RTC guided at a fixed
horizon and RTC guided with the uncertainty-adaptive horizon: VFD's shift AUROC with and without RTC, and
success and alarms of the adaptive horizon. A third (`latency`) measures the robot's round trip in realtime
mode while a 50 ms planner runs, async against sync.

Cells are cached in RUNS/cells/*.json, so an interrupted run resumes; the section is rendered from
bench/out/rtc.json alone (`--report-only`).
"""

from __future__ import annotations

import argparse
import json
import math
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
    pyplot,
    raw_copy,
    read_raw,
    run_info,
    save_figure,
    section,
    write_benchmarks,
    write_raw,
    written_by,
)

NAME = "rtc"
RAW = OUT / "rtc.json"
FIG_SUCCESS = FIGURES / "rtc_success.png"
FIG_SMOOTH = FIGURES / "rtc_smoothness.png"
CONTROL_HZ = 80.0
MT10 = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
        "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3")
METHODS = ("naive", "blend", "temporal", "rtc-guided", "rtc-trained")
DELAYS = {8: (1, 2, 4), 16: (1, 2, 4, 8)}  # {1, 2, 4, ..., H/2}; d = 0 is the sync reference


def _serve_flags(method: str, delay: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    merge = {"sync": "sync", "naive": "naive", "blend": "blend", "temporal": "temporal", "rtc-guided": "rtc",
             "rtc-trained": "rtc"}[method]
    flags: dict[str, Any] = {"mode": "lockstep", "deadline_ms": 5000, "execution": "async", "merge": merge,
                             "log_level": "WARNING"}
    if delay > 0:
        flags["plan_delay"] = f"constant:{delay * 1000.0 / CONTROL_HZ:g}ms"
    flags.update(extra or {})
    return flags


def _episode_metrics(actions: np.ndarray, plans: list[int]) -> dict[str, float]:
    """Smoothness of one executed action sequence (T, m): mean squared jerk, seam and in-chunk jumps."""
    out = {"jerk": float("nan"), "seam_mean": float("nan"), "seam_max": float("nan"), "step_mean": float("nan"),
           "seams": 0}
    if len(actions) >= 4:
        jerk = actions[3:] - 3 * actions[2:-1] + 3 * actions[1:-2] - actions[:-3]
        out["jerk"] = float(np.mean(np.sum(jerk ** 2, axis=1)))
    if len(actions) >= 2:
        jumps = np.linalg.norm(np.diff(actions, axis=0), axis=1)
        seam = np.array([plans[t] != plans[t - 1] for t in range(1, len(plans))])
        if seam.any():
            out["seam_mean"], out["seam_max"] = float(jumps[seam].mean()), float(jumps[seam].max())
            out["seams"] = int(seam.sum())
        if (~seam).any():
            out["step_mean"] = float(jumps[~seam].mean())
    return out


def run_cell(bundle: Path, flags: dict[str, Any], tasks: Sequence[str], seeds: Sequence[int], max_steps: int,
             positions: float = 0.0, label: str = "") -> list[dict[str, Any]]:
    """Episodes of every task and seed against one `vigil serve` with `flags`; one record per episode."""
    from tqdm import tqdm

    from vigil.runtime.client import RobotLink
    from vigil.runtime.launch import serving
    from vigil.sim.envs import make_env
    from vigil.sim.shifts import Shift

    episodes = []
    with serving(bundle, **flags) as served, tqdm(total=len(tasks) * len(seeds), desc=label, leave=False) as bar:
        for task in tasks:
            env = make_env(task, horizon=max_steps, shift=Shift(positions=positions))
            link = RobotLink(served.robot_endpoint, f"rtc-{task}")
            link.hello(env.observation_spec, env.action_spec, env=env.name)
            try:
                for seed in seeds:
                    obs = env.reset(seed=seed)
                    link.reset(episode=seed, task=task, seed=seed, instruction=env.instruction)
                    actions, plans, vfd, safe, exhausted = [], [], {}, 0, 0
                    success, done, steps = False, False, 0
                    while not done and steps < max_steps:
                        reply = link.step(obs, 30.0)
                        meta = reply.meta
                        plan = int(meta.get("plan", reply.plan or 0))
                        if "vfd" in reply.scores and plan not in vfd:
                            vfd[plan] = float(reply.scores["vfd"])
                        safe += bool(reply.safe)
                        exhausted += any(v[0] == "chunk_exhausted" for v in reply.verdicts)
                        actions.append(np.asarray(reply.action, np.float64))
                        plans.append(plan)
                        result = env.step(reply.action)
                        success = success or bool(result.info.get("success", 0.0) >= 1.0)
                        done = result.terminated or result.truncated
                        obs = result.obs
                        steps += 1
                    episodes.append({"task": task, "seed": seed, "success": success, "steps": steps,
                                     "plans": len(vfd), "safe": safe, "exhausted": exhausted,
                                     "vfd": [vfd[k] for k in sorted(vfd)],
                                     **_episode_metrics(np.array(actions), plans)})
                    bar.update(1)
            finally:
                link.bye()
                env.close()
    return episodes


def _cell(path: Path, bundle: Path, flags: dict[str, Any], args: argparse.Namespace, label: str,
          positions: float = 0.0) -> list[dict[str, Any]]:
    """`run_cell`, cached in `path` (an interrupted bench resumes where it stopped)."""
    tasks = args.tasks.split(",") if args.tasks else list(MT10)
    seeds = list(range(args.seed, args.seed + args.episodes))
    path = path.with_name(f"{path.stem}-{len(tasks)}t-{args.episodes}e-{args.seed}s-{args.max_steps}.json")
    if path.exists():
        return json.loads(path.read_text())
    records = run_cell(bundle, flags, tasks, seeds, args.max_steps, positions, label)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return records


def measure_latency(bundle: Path, ticks: int, delay_ms: float) -> dict[str, Any]:
    """Realtime: one robot at 80 Hz while a `delay_ms` planner runs, async (RTC) against sync: the round trip
    of every tick as the robot sees it."""
    from vigil.runtime.client import RobotLink
    from vigil.runtime.launch import serving
    from vigil.sim.envs import make_env

    out = {}
    for method in ("sync", "rtc-guided"):
        flags = _serve_flags(method, 0, {"mode": "realtime", "deadline_ms": 1000,
                                         "plan_delay": f"constant:{delay_ms:g}ms"})
        env = make_env("reach-v3", horizon=ticks + 10)
        with serving(bundle, **flags) as served:
            link = RobotLink(served.robot_endpoint, "rtc-latency")
            link.hello(env.observation_spec, env.action_spec, env=env.name)
            obs = env.reset(seed=0)
            link.reset(episode=0, task="reach-v3", seed=0, instruction=env.instruction)
            rtts, safe, period = [], 0, 1.0 / CONTROL_HZ
            t_next = time.perf_counter()
            for _ in range(ticks):
                reply = link.step(obs, 1.0)
                rtts.append(reply.latency_s if reply.latency_s is not None else float("inf"))
                safe += bool(reply.safe)
                obs = env.step(reply.action).obs
                t_next += period
                if (left := t_next - time.perf_counter()) > 0:
                    time.sleep(left)
            link.bye()
        env.close()
        r = np.array(rtts[20:]) * 1e6  # the first plan of the episode waits by design
        out[method] = {"ticks": len(r), "p50_us": float(np.percentile(r, 50)), "p99_us": float(np.percentile(r, 99)),
                       "max_us": float(r.max()), "over_1ms": int((r > 1000).sum()), "safe": safe}
    return out


def measure_plan_cost(calls: int = 400) -> dict[str, Any]:
    """onnxruntime at batch 1, one thread, the default MT10 shape (FlowConfig(): M = 5, hidden 256, H = 8, anchor
    pairs, N = 1), untrained weights: the plain graph against the guided one (one backward pass of the anchor's
    head per Euler step) and the trained one. Calls interleaved, so a busy machine slows all alike."""
    import dataclasses

    import onnxruntime as ort

    from vigil.policies.bundle import session_options
    from vigil.policies.rtc import prefix_weights
    from vigil.training.flow import Ensemble, FlowConfig
    from vigil.training.flow_export import export_onnx

    base = FlowConfig()
    H, m = base.horizon, base.action_dim
    rng = np.random.default_rng(0)
    feed = {"state": rng.standard_normal((1, base.obs_dim), dtype=np.float32),
            "instruction": rng.standard_normal((1, base.instr_dim), dtype=np.float32),
            "noise": rng.standard_normal((1, base.vfd_samples, H, m), dtype=np.float32)}
    rtc_feed = {"prefix": rng.uniform(-1, 1, (1, H, m)).astype(np.float32)}
    sessions, feeds = {}, {}
    for mode in ("plain", "guided", "trained"):
        cfg = dataclasses.replace(base, rtc_max_delay=H // 2) if mode == "trained" else base
        graph = export_onnx(Ensemble(cfg).eval(), cfg, rtc=None if mode == "plain" else mode)
        sessions[mode] = ort.InferenceSession(graph, session_options(1), providers=["CPUExecutionProvider"])
        schedule = "exp" if mode == "guided" else "zeros"
        feeds[mode] = feed if mode == "plain" else {
            **feed, **rtc_feed, "prefix_weight": prefix_weights(H, H // 2, 2, schedule)[None]}
    samples: dict[str, list[float]] = {k: [] for k in sessions}
    for i in range(calls + 20):
        for mode, session in sessions.items():
            t0 = time.perf_counter()
            session.run(None, feeds[mode])
            if i >= 20:  # warm-up
                samples[mode].append(time.perf_counter() - t0)
    return {"calls": calls, **{k: {"median_us": float(np.median(v)) * 1e6, "min_us": float(np.min(v)) * 1e6}
                               for k, v in samples.items()}}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    runs = Path(args.runs).resolve()  # `vigil serve` runs in a folder of its own
    cells_dir = runs / "cells"
    tasks = args.tasks.split(",") if args.tasks else list(MT10)
    seeds = list(range(args.seed, args.seed + args.episodes))
    t0 = time.time()
    raw: dict[str, Any] = {"run": run_info(), "tasks": tasks, "seeds": seeds, "max_steps": args.max_steps,
                           "control_hz": CONTROL_HZ, "horizons": {}, "bundles": {}}
    for H in args.horizons:
        base, trained = runs / f"h{H}-base" / "bundle", runs / f"h{H}-trained" / "bundle"
        man = json.loads((base / "manifest.json").read_text())
        trained_extra = json.loads((trained / "manifest.json").read_text())["extra"]
        raw["bundles"][str(H)] = {"members": man["extra"]["members"], "chunk": man["chunk"],
                                  "rtc_base": man["extra"].get("rtc"), "rtc_trained": trained_extra.get("rtc")}
        cells: dict[str, list] = {"sync/0": _cell(cells_dir / f"h{H}-sync-0.json", base, _serve_flags("sync", 0),
                                                  args, f"H={H} sync d=0"),
                                 # the trained bundle is another policy: its own synchronous reference
                                 "sync-trained/0": _cell(cells_dir / f"h{H}-sync-trained-0.json", trained,
                                                         _serve_flags("sync", 0), args, f"H={H} sync (trained) d=0")}
        for d in DELAYS[H]:
            for method in METHODS:
                bundle = trained if method == "rtc-trained" else base
                cells[f"{method}/{d}"] = _cell(cells_dir / f"h{H}-{method}-{d}.json", bundle, _serve_flags(method, d),
                                               args, f"H={H} {method} d={d}")
        raw["horizons"][str(H)] = cells
    if args.shift:
        H, d = 8, 2
        base = runs / f"h{H}-base" / "bundle"
        nominal = raw["horizons"][str(H)]
        warn = float(np.quantile([v for e in nominal[f"rtc-guided/{d}"] for v in e["vfd"]], 0.9))
        shift: dict[str, Any] = {"positions": args.positions, "delay": d, "adaptive_warn": warn, "cells": {}}
        variants = {"sync": ("sync", 0, {}), "rtc-guided": ("rtc-guided", d, {}),
                    "rtc-guided adaptive": ("rtc-guided", d, {"adaptive_horizon_vfd": warn})}
        for name, (method, dd, extra) in variants.items():
            for cond, pos in (("nominal", 0.0), ("shifted", args.positions)):
                key = f"{name}/{cond}"
                if cond == "nominal" and not extra:  # the same episodes as the main table's cell
                    shift["cells"][key] = nominal["sync/0" if method == "sync" else f"{method}/{dd}"]
                    continue
                path = cells_dir / f"shift-{name.replace(' ', '-')}-{cond}.json"
                shift["cells"][key] = _cell(path, base, _serve_flags(method, dd, extra), args, key, pos)
        raw["shift"] = shift
    if args.latency_ticks:
        H = args.latency_horizon
        rows = measure_latency(runs / f"h{H}-base" / "bundle", args.latency_ticks, 50.0)
        raw["latency"] = {"delay_ms": 50.0, "horizon": H, "rows": rows}
    if args.plan_cost:
        raw["plan_cost"] = measure_plan_cost()
    raw["seconds"] = time.time() - t0
    return raw


# ------------------------------------------------------------------------------------------------------ report


def _rate(eps: list[dict]) -> tuple[float, float]:
    """Success rate and its standard error (binomial, over episodes)."""
    s = np.array([e["success"] for e in eps], float)
    p = float(s.mean()) if len(s) else float("nan")
    return p, math.sqrt(p * (1 - p) / max(len(s), 1))


def _mean(eps: list[dict], key: str) -> float:
    v = np.array([e[key] for e in eps if e[key] is not None], float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else float("nan")


def _auroc(neg: Sequence[float], pos: Sequence[float]) -> float:
    """P(score of a shifted episode > score of a nominal one), ties half."""
    neg, pos = np.asarray(neg, float), np.asarray(pos, float)
    if not len(neg) or not len(pos):
        return float("nan")
    return float(((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg)))


def _early(e: dict, k: int = 5) -> float:
    return float(np.mean(e["vfd"][:k])) if e["vfd"] else float("nan")


def render(raw: dict[str, Any]) -> str:
    lines = ["## Real-time chunking: MT10 success and smoothness against the inference delay (issue 16)", "",
             written_by(raw["run"], seconds=raw.get("seconds")),
             f"- {len(raw['tasks'])} tasks x {len(raw['seeds'])} episode seeds "
             f"({raw['seeds'][0]}..{raw['seeds'][-1]}) per cell, the same episodes in every cell, at most "
             f"{raw['max_steps']} steps at {raw['control_hz']:g} Hz; lockstep through "
             "`vigil serve --execution async` with `--plan-delay constant:<d ticks>`.",
             "- success ± its standard error over the episodes; *jerk*: mean squared third difference of the "
             "executed actions per tick; *seam*: mean ||a_t - a_{t-1}|| at ticks whose action comes from another "
             "plan than the previous tick's (max: the mean over episodes of each episode's largest); *between*: the "
             "same off the seams.",
             ""]
    verdicts = []
    for H, cells in raw["horizons"].items():
        b = raw["bundles"][H]
        ref, ref_se = _rate(cells["sync/0"])
        lines += [f"### Chunk length H = {H} (execution horizon s = {b['chunk']['execute']}; "
                  f"{b['members']} members)", "",
                  "| method | d (ticks) | success | jerk | seam mean / max | between seams | safe actions |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        sync = cells["sync/0"]
        lines.append(f"| sync (reference; the world waits d ticks per plan) | 0 | {ref:.1%} ± {ref_se:.1%} | "
                     f"{_mean(sync, 'jerk'):.4f} | {_mean(sync, 'seam_mean'):.3f} / {_mean(sync, 'seam_max'):.3f} | "
                     f"{_mean(sync, 'step_mean'):.3f} | {sum(e['safe'] for e in sync)} |")
        if "sync-trained/0" in cells:
            st = cells["sync-trained/0"]
            p_t, se_t = _rate(st)
            lines.append(f"| sync, the RTC-trained bundle (its reference) | 0 | {p_t:.1%} ± {se_t:.1%} | "
                         f"{_mean(st, 'jerk'):.4f} | {_mean(st, 'seam_mean'):.3f} / {_mean(st, 'seam_max'):.3f} | "
                         f"{_mean(st, 'step_mean'):.3f} | {sum(e['safe'] for e in st)} |")
        delays = sorted({int(k.split('/')[1]) for k in cells if not k.startswith("sync")})
        for d in delays:
            for m in METHODS:
                eps = cells.get(f"{m}/{d}")
                if eps is None:
                    continue
                p, se = _rate(eps)
                lines.append(f"| {m} | {d} | {p:.1%} ± {se:.1%} | {_mean(eps, 'jerk'):.4f} | "
                             f"{_mean(eps, 'seam_mean'):.3f} / {_mean(eps, 'seam_max'):.3f} | "
                             f"{_mean(eps, 'step_mean'):.3f} | {sum(e['safe'] for e in eps)} |")
        lines.append("")
        # targets
        half = max(d for d in delays if d <= int(H) // 2)
        refs = {"rtc-guided": ("sync/0", ref), "rtc-trained": ("sync-trained/0", _rate(cells.get("sync-trained/0",
                                                                                              cells["sync/0"]))[0])}
        for m in ("rtc-guided", "rtc-trained"):
            p, _ = _rate(cells[f"{m}/{half}"])
            own = refs[m][1]
            met = "met" if p >= own - 0.03 else "not met"
            verdicts.append(f"- H = {H}, {m} at d = H/2 = {half}: {p:.1%} against its bundle's sync at d = 0 {own:.1%} "
                            f"({(p - own) * 100:+.1f} points; target within 3): **{met}**")
        naive_loss = [d for d in delays if _rate(cells[f"naive/{d}"])[0] <= ref - 0.10]
        if naive_loss:
            d = max(naive_loss)
            pn = _rate(cells[f"naive/{d}"])[0]
            for m in ("rtc-guided", "rtc-trained"):
                p = _rate(cells[f"{m}/{d}"])[0]
                verdicts.append(f"- H = {H}, d = {d} (the largest delay where naive async loses 10+ points: {pn:.1%}): "
                                f"{m} {p:.1%}, {(p - pn) * 100:+.1f} points over naive (target +10): "
                                f"**{'met' if p >= pn + 0.10 else 'not met'}**")
        else:
            verdicts.append(f"- H = {H}: naive async never lost 10 points against sync at these delays; the second "
                            "target has no delay to be read at")
        seam_ref = _mean(sync, "seam_mean")
        for m in ("rtc-guided", "rtc-trained"):
            worst = max(_mean(cells[f"{m}/{d}"], "seam_mean") for d in delays)
            verdicts.append(f"- H = {H}, {m}: largest mean seam jump over the delays {worst:.3f} against sync's "
                            f"{seam_ref:.3f}: **{'met' if worst <= seam_ref else 'not met'}**")
    lines += ["**Against the targets**", "", *verdicts, ""]
    if "shift" in raw:
        sh = raw["shift"]
        lines += [f"### Under a position shift ({sh['positions']:g} x the range), H = 8, d = {sh['delay']}", "",
                  f"VFD warn level for the adaptive horizon: {sh['adaptive_warn']:.4g} (the 90th percentile of the "
                  "per-plan VFD of the nominal RTC episodes above). AUROC: nominal against shifted episodes by the "
                  "mean VFD of their first 5 plans.", "",
                  "| execution | nominal success | shifted success | shift AUROC (VFD, first 5 plans) "
                  "| plans per episode, shifted |",
                  "|---|---:|---:|---:|---:|"]
        names = sorted({k.split("/")[0] for k in sh["cells"]}, key=["sync", "rtc-guided", "rtc-guided adaptive"].index)
        for n in names:
            nom, sft = sh["cells"][f"{n}/nominal"], sh["cells"][f"{n}/shifted"]
            auc = _auroc([_early(e) for e in nom], [_early(e) for e in sft])
            lines.append(f"| {n} | {_rate(nom)[0]:.1%} | {_rate(sft)[0]:.1%} | {auc:.2f} | {_mean(sft, 'plans'):.1f} |")
        q = {n: np.quantile([v for e in sh["cells"][f"{n}/nominal"] for v in e["vfd"]], [0.5, 0.9, 0.99])
             for n in ("sync", "rtc-guided")}
        sync_q, rtc_q = (" / ".join(f"{x:.3g}" for x in q[n]) for n in ("sync", "rtc-guided"))
        lines += ["", f"Per-plan VFD of the nominal episodes, p50 / p90 / p99: sync {sync_q}, RTC guided {rtc_q} (a "
                  "monitor calibrated on synchronous rollouts, as `vigil calibrate` does, is off by their ratio under "
                  "RTC).", ""]
    if "latency" in raw:
        lat = raw["latency"]
        lines += [f"### Robot-side round trip in realtime mode while a {lat['delay_ms']:g} ms planner runs "
                  f"(H = {lat.get('horizon', 8)}, 80 Hz)", "",
                  "| execution | ticks | p50 µs | p99 µs | max µs | ticks over 1 ms | safe actions |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for m, r in lat["rows"].items():
            lines.append(f"| {m} | {r['ticks']} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | {r['max_us']:.0f} | "
                         f"{r['over_1ms']} | {r['safe']} |")
        p99 = lat["rows"]["rtc-guided"]["p99_us"]
        lines += ["", f"Target: async p99 under 1 ms while the planner runs: **{'met' if p99 < 1000 else 'not met'}** "
                  f"({p99:.0f} µs).", ""]
    if "plan_cost" in raw:
        pc = raw["plan_cost"]
        lines += ["### Cost of a plan with RTC (default MT10 shape: 5 members, hidden 256, H = 8; onnxruntime, "
                  f"batch 1, 1 thread, {pc['calls']} interleaved calls each, untrained weights)", "",
                  "| graph | median µs | min µs | median / plain |", "|---|---:|---:|---:|"]
        for mode in ("plain", "guided", "trained"):
            r = pc[mode]
            lines.append(f"| {mode} | {r['median_us']:.0f} | {r['min_us']:.0f} | "
                         f"{r['median_us'] / pc['plain']['median_us']:.2f}x |")
        lines.append("")
    lines += [f"![success against delay]({FIG_SUCCESS.relative_to(ROOT)})",
              f"![smoothness against delay]({FIG_SMOOTH.relative_to(ROOT)})", "",
              "Raw results: `bench/out/rtc.json`; `--report-only` renders this section and the figures again from it."]
    return section(NAME, lines)


def plot(raw: dict[str, Any]) -> None:
    plt = pyplot()
    for fig_path, key, ylabel in ((FIG_SUCCESS, "success", "MT10 success rate"),
                                  (FIG_SMOOTH, "seam_mean", "mean action jump at seams")):
        horizons = list(raw["horizons"])
        fig, axes = plt.subplots(1, len(horizons), figsize=(6 * len(horizons), 4.2), squeeze=False)
        for ax, H in zip(axes[0], horizons):
            cells = raw["horizons"][H]
            ref = _rate(cells["sync/0"])[0] if key == "success" else _mean(cells["sync/0"], key)
            ax.axhline(ref, color="k", ls="--", lw=1, label="sync, d = 0 (reference)")
            delays = sorted({int(k.split('/')[1]) for k in cells if not k.startswith("sync")})
            for m in METHODS:
                ys, es = [], []
                for d in delays:
                    eps = cells[f"{m}/{d}"]
                    if key == "success":
                        p, se = _rate(eps)
                        ys.append(p)
                        es.append(se)
                    else:
                        ys.append(_mean(eps, key))
                        es.append(0.0)
                ax.errorbar(delays, ys, yerr=es if key == "success" else None, marker="o", capsize=3, label=m)
            ax.set_xlabel("inference delay d (control ticks)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"H = {H}")
            ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, fig_path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="bench-runs/rtc", help="folder with h8-base, h8-trained, h16-... (bench/rtc.sh)")
    ap.add_argument("--horizons", default="8,16", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--tasks", help="comma-separated tasks (default: MT10)")
    ap.add_argument("--episodes", type=int, default=10, help="episode seeds per task")
    ap.add_argument("--seed", type=int, default=100, help="first episode seed")
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--no-shift", dest="shift", action="store_false", help="skip the position-shift experiment")
    ap.add_argument("--positions", type=float, default=0.5, help="the position shift (x the range)")
    ap.add_argument("--latency-ticks", type=int, default=2000, help="realtime ticks per latency row; 0 skips it")
    ap.add_argument("--latency-horizon", type=int, default=16,
                    help="the chunk length of the latency rows' bundle (16: s = 8 ticks leaves room for a 50 ms "
                         "plan, 4 ticks at 80 Hz, plus its jitter)")
    ap.add_argument("--no-plan-cost", dest="plan_cost", action="store_false",
                    help="skip timing the plain, guided and trained graphs at the default shape")
    ap.add_argument("--report-only", action="store_true", help=f"render {RAW.name} again; measure nothing")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md, figures, raw alone")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raw = read_raw(RAW) if args.report_only else raw_copy(measure(args))  # rendered as --report-only will
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
