"""Failure prediction for the flow ensemble (issue 18): signals, time-varying conformal bands, combiners, and one
ranking by accuracy and calibration, over training seeds. `make bench-failure`; the method is docs/failure.md.

Input: the episodes of bench/failure_rollouts.py (every signal at every plan of whole episodes) for each run.
Per run (training seed) and detector:
  1. smooth the per-plan score with a running mean of 3 plans (the VFD paper's row: 1);
  2. per training task, a time-varying band (monitors/bands.py) from that task's successful calibration episodes:
     centre and scale over time from one half, the exceedance quantile q from the other half pooled over tasks,
     asked per-episode false-alarm rate alpha = 0.10; held-out tasks (no calibration of their own) get the band
     of all tasks' calibration episodes pooled;
  3. z(t) = exceedance of the band; an alarm at the first plan with z(t) > q.
Detectors: each signal alone; FIPER (RND and ACE must both exceed: min of their z, banded again); the mean z of
all signals; a logistic model on the signals' z fitted on calibration episodes of the other tasks (tasks held
out); the same on the graph's own outputs (vfd, rnd, logpzo: the onboard monitor); and the VFD paper's protocol
(raw VFD, window 1, threshold the 0.90 quantile of the per-episode max over the task's successful calibration
episodes, constant over time).

Metrics on the test episodes (all conditions but calibration):
  - failure AUROC, time-matched: failed episodes run to the time limit and successful ones stop early, so any
    whole-episode maximum rewards length (a clock would score 1.0). Each (failed, successful) pair is compared
    at every plan t the successful episode lived, on the running max of z up to t; the AUROC is the mean of
    those comparisons. A clock or a random score gets 0.5. Pooled and per condition.
  - failure AUROC early: running max of z over the first 12 plans (48 steps, 0.6 s) only.
  - at the alarm: per-episode false alarms on successful nominal episodes (asked: alpha), TPR on failed
    episodes, lead time (steps from the alarm to the episode's end at the time limit), detection step.
  - calibration: the early statistic mapped to a failure probability by logistic (Platt) scaling fitted on the
    calibration episodes; Brier score and ECE (10 bins) on the test episodes.
  - shift detection: time-matched AUROC of each shifted condition against nominal.
Ranking: accuracy rank by time-matched AUROC, calibration rank by Brier score, joint = their mean (RewardUQ).

    PYTHONPATH=. .venv/bin/python -m bench.failure --runs R1,R2,R3 --episodes bench-runs/failure/episodes
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.common import FIGURES, ROOT, markers, pyplot, run_info, save_figure, write_benchmarks, written_by
from vigil.monitors.bands import Band, running_mean
from vigil.monitors.failure import POOLED, base_name
from vigil.training.failure import FEATURES, LOGIT_BAND, design, fit_logistic, fit_task_bands, fit_weights

NAME = "failure"
BEGIN, END = markers(NAME)
SIGNALS = ("vfd", "rnd", "logpzo", "stillness", "tinc", "gu", "ace", "stac", "random")
LEARNED = ("vfd", "rnd", "logpzo", "stillness", "tinc", "gu", "ace", "stac")  # the combiners' inputs (not random)
POOLED_ROWS = ("vfd", "rnd", "logpzo", "stillness", "gu", "ace")  # also shown against the pooled band
AT = "@pooled"
LEARNED_ALL = (*LEARNED, *(f + AT for f in LEARNED))  # every signal against its task's band and the pooled one
ONBOARD = FEATURES  # the monitor's: the graph's VFD and RND and the state's stillness, against pooled bands
COMBINED = ("fiper", "mean_z", "logistic", "logistic" + AT, "logistic_onboard", "logistic_seen")
DETECTORS = (*SIGNALS, *(f + AT for f in POOLED_ROWS), *COMBINED, "vfd_paper")
TEST = ("nominal", "positions", "physics", "noise", "heldout")
SHIFTS = ("positions", "physics", "noise", "heldout")
ALPHA, WINDOW, EARLY = 0.10, 3, 12
Z_CLIP = (-5.0, 20.0)


# ------------------------------------------------------------------------------------------------ bands


def fit_bands(eps: list[dict], series: dict[int, np.ndarray], alpha: float, tasks: list[str]) -> dict[str, Band]:
    """training/failure.py's bands (what `vigil calibrate` writes) from the successful calibration episodes."""
    good = {t: [series[i] for i, e in enumerate(eps) if e["condition"] == "calibration" and e["success"]
                and e["task"] == t] for t in tasks}
    return fit_task_bands(good, alpha)


def z_series(eps: list[dict], series: dict[int, np.ndarray], bands: dict[str, Band]) -> dict[int, np.ndarray]:
    return {i: bands.get(e["task"], bands[POOLED]).exceedance(series[i]) for i, e in enumerate(eps)}


def paper_protocol(eps: list[dict], tasks: list[str]) -> tuple[dict[int, np.ndarray], dict[str, Band]]:
    """The VFD paper's rule: raw VFD, window 1, threshold per task = 0.90 quantile of the per-episode max over
    (up to) 20 successful calibration episodes; z = VFD / threshold, alarm at z > 1."""
    good = defaultdict(list)
    for e in eps:
        if e["condition"] == "calibration" and e["success"] and len(good[e["task"]]) < 20:
            good[e["task"]].append(max(e["signals"]["vfd"]))
    thr = {t: float(np.quantile(good[t], 0.9)) for t in tasks}
    thr["*"] = float(np.quantile([x for t in tasks for x in good[t]], 0.9))
    bands = {t: Band((0.0,), (v,), 1.0) for t, v in thr.items()}
    return {i: bands.get(e["task"], bands[POOLED]).exceedance(e["signals"]["vfd"]) for i, e in enumerate(eps)}, bands


# --------------------------------------------------------------------------------------------- logistic


def fit_rows(eps: list[dict], rows: list[int], zs: dict[str, dict[int, np.ndarray]], features: tuple[str, ...]
             ) -> np.ndarray:
    """Logistic weights from these episodes' plans, fitted as `vigil calibrate` fits the monitor's
    (training/failure.py `fit_weights`: successful episodes up to their success, each episode once)."""
    return fit_weights([(episode_z(zs, features, i), not eps[i]["success"], plans_before_success(eps[i]))
                        for i in rows], features)


def episode_z(zs: dict[str, dict[int, np.ndarray]], features: tuple[str, ...], i: int) -> dict[str, np.ndarray]:
    return {f: zs[f][i] for f in features}


def logistic_series(eps: list[dict], zs: dict[str, dict[int, np.ndarray]], features: tuple[str, ...],
                    tasks: list[str], seen: bool = False) -> tuple[dict[int, np.ndarray], dict[str, np.ndarray]]:
    """Per-plan logit of failure from the features' z, fitted on calibration episodes of the other tasks (every
    plan weighted 1/length, so each episode counts once); held-out tasks use the model of all training tasks.
    seen=True (SAFE's setting): fitted on every condition's episodes of the other training tasks instead."""
    cal = [i for i, e in enumerate(eps) if (e["task"] in tasks if seen else e["condition"] == "calibration")]
    models = {held: fit_rows(eps, [i for i in cal if eps[i]["task"] != held], zs, features)
              for held in [*tasks, "*"]}
    out = {}
    for i, e in enumerate(eps):
        beta = models[e["task"] if e["task"] in tasks else "*"]
        out[i] = beta[0] + design(episode_z(zs, features, i), features) @ beta[1:]
    return out, models


# -------------------------------------------------------------------------------------------- metrics


def auroc(neg, pos) -> float:
    neg, pos = np.asarray(neg, float), np.asarray(pos, float)
    if not len(neg) or not len(pos):
        return float("nan")
    from scipy.stats import rankdata

    r = rankdata(np.concatenate([neg, pos]))
    return float((r[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def time_matched_auroc(neg: list[np.ndarray], pos: list[np.ndarray]) -> float:
    """Mean over (pos, neg) pairs and over the plans t the negative episode lived of [M_pos(t) > M_neg(t)]
    (ties half), M the running max; a positive shorter than t keeps its last value."""
    if not neg or not pos:
        return float("nan")
    T = max(len(x) for x in (*neg, *pos))

    def pad(x):
        m = np.maximum.accumulate(np.asarray(x, float))
        return np.concatenate([m, np.full(T - len(m), m[-1])])

    P = np.stack([pad(x) for x in pos])  # (npos, T)
    total = 0.0
    for x in neg:
        m = np.maximum.accumulate(np.asarray(x, float))
        p = P[:, :len(m)]
        total += float(((p > m) + 0.5 * (p == m)).mean())
    return total / len(neg)


def platt(train_s: np.ndarray, train_y: np.ndarray):
    s = np.clip(train_s, *Z_CLIP)
    beta = fit_logistic(s[:, None], train_y, np.ones(len(s)), l2=1e-3)
    return lambda x: 1 / (1 + np.exp(-(beta[0] + beta[1] * np.clip(np.asarray(x, float), *Z_CLIP))))


def ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    idx = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum(abs(p[idx == b].mean() - y[idx == b].mean()) * (idx == b).mean()
                     for b in range(bins) if (idx == b).any()))


def plans_before_success(e: dict) -> int | None:
    """Plans made before the episode first succeeded (None: it never did)."""
    if not e["success"] or e.get("success_step") is None:
        return None
    return math.ceil(e["success_step"] / e["execute"])


def before_success(e: dict, z: np.ndarray) -> np.ndarray:
    """The plans made before the episode first succeeded: after that its outcome is known, and comparing it with
    a failing episode would reward whatever the hold at the goal looks like (a robot holding still)."""
    k = plans_before_success(e)
    return z if k is None else z[:max(1, k)]


def evaluate(eps: list[dict], z: dict[int, np.ndarray], q: dict[str, float], tasks: list[str]) -> dict:
    """Every metric of one detector on one run; q: the alarm level of each task's band (and "*")."""
    test = [i for i, e in enumerate(eps) if e["condition"] in TEST]
    res: dict = {}
    for c in ("pooled", *TEST):
        rows = [i for i in test if c == "pooled" or eps[i]["condition"] == c]
        ok = [before_success(eps[i], z[i]) for i in rows if eps[i]["success"]]
        bad = [z[i] for i in rows if not eps[i]["success"]]
        enough = min(len(ok), len(bad)) >= 3
        res[f"tm_{c}"] = time_matched_auroc(ok, bad) if enough else float("nan")
        res[f"early_{c}"] = auroc([x[:EARLY].max() for x in ok], [x[:EARLY].max() for x in bad]) if enough \
            else float("nan")
    nominal = [z[i] for i in test if eps[i]["condition"] == "nominal"]
    for c in SHIFTS:
        res[f"shift_{c}"] = time_matched_auroc(nominal, [z[i] for i in test if eps[i]["condition"] == c])

    def alarm(i):
        hit = np.flatnonzero(z[i] > q.get(eps[i]["task"], q[POOLED]))
        return int(hit[0]) if len(hit) else None

    ok_nom = [i for i in test if eps[i]["condition"] == "nominal" and eps[i]["success"]]
    res["fpr"] = float(np.mean([alarm(i) is not None for i in ok_nom]))
    failed = [i for i in test if not eps[i]["success"]]
    alarms = [(i, alarm(i)) for i in failed]
    res["tpr"] = float(np.mean([a is not None for _, a in alarms]))
    hits = [(i, a) for i, a in alarms if a is not None]
    res["detect_step"] = float(np.median([a * eps[i]["execute"] for i, a in hits])) if hits else float("nan")
    res["lead_steps"] = float(np.median([eps[i]["steps"] - a * eps[i]["execute"] for i, a in hits])) if hits \
        else float("nan")
    cal = [i for i, e in enumerate(eps) if e["condition"] == "calibration"]
    f = platt(np.array([z[i][:EARLY].max() for i in cal]), np.array([not eps[i]["success"] for i in cal], float))
    p = f(np.array([z[i][:EARLY].max() for i in test]))
    y = np.array([not eps[i]["success"] for i in test], float)
    res["brier"], res["ece"] = float(np.mean((p - y) ** 2)), ece(p, y)
    res["_p"], res["_y"] = p, y
    return res


def fpr_curve(eps: list[dict], series: dict[int, np.ndarray], tasks: list[str], alphas, pooled: bool = False
              ) -> list[float]:
    """Per-episode false alarms achieved on successful nominal episodes for each asked alpha (pooled: against the
    pooled band for every task)."""
    out = []
    for a in alphas:
        bands = fit_bands(eps, series, a, tasks)
        if pooled:
            bands = {POOLED: bands[POOLED]}
        z = z_series(eps, series, bands)
        ok = [i for i, e in enumerate(eps) if e["condition"] == "nominal" and e["success"]]
        out.append(float(np.mean([(z[i] > bands.get(eps[i]["task"], bands["*"]).q).any() for i in ok])))
    return out


# --------------------------------------------------------------------------------------------- a run


def analyse_run(eps: list[dict]) -> tuple[dict[str, dict], dict]:
    tasks = sorted({e["task"] for e in eps if e["condition"] == "calibration"})
    n = range(len(eps))
    smoothed = {s: {i: running_mean(e["signals"][s], WINDOW) for i, e in enumerate(eps)} for s in SIGNALS}
    bands = {s: fit_bands(eps, smoothed[s], ALPHA, tasks) for s in SIGNALS}
    zs = {s: z_series(eps, smoothed[s], bands[s]) for s in SIGNALS}
    for s in SIGNALS:  # against the band of every task's calibration pooled: what tells tasks apart stays
        zs[s + AT] = {i: bands[s][POOLED].exceedance(smoothed[s][i]) for i in n}
        bands[s + AT] = {POOLED: bands[s][POOLED]}
    combined = {
        "fiper": {i: np.minimum(zs["rnd"][i], zs["ace"][i]) for i in n},
        "mean_z": {i: np.mean([np.clip(zs[s][i], *Z_CLIP) for s in LEARNED], 0) for i in n},
    }
    models = {}
    for name, feats, seen in (("logistic", LEARNED_ALL, False), ("logistic_onboard", ONBOARD, False),
                              ("logistic_seen", LEARNED_ALL, True)):
        combined[name], models[name] = logistic_series(eps, zs, feats, tasks, seen=seen)
    for name, series in combined.items():  # a combined score is banded like any signal (its own per-episode q)
        bands[name] = fit_bands(eps, series, ALPHA, tasks)
        zs[name] = z_series(eps, series, bands[name])
        smoothed[name] = series
        zs[name + AT] = {i: bands[name][POOLED].exceedance(series[i]) for i in n}
        bands[name + AT] = {POOLED: bands[name][POOLED]}
    if LOGIT_BAND == "pooled":  # the monitor judges its logit against the pooled band
        zs["logistic_onboard"], bands["logistic_onboard"] = zs["logistic_onboard" + AT], bands["logistic_onboard" + AT]
    zs["vfd_paper"], bands["vfd_paper"] = paper_protocol(eps, tasks)
    results = {d: evaluate(eps, zs[d], {t: b.q for t, b in bands[d].items()}, tasks) for d in DETECTORS}
    # an upper bound, not a detector: the logistic fitted in sample on the test episodes themselves
    test = [i for i, e in enumerate(eps) if e["condition"] in TEST]
    beta = fit_rows(eps, test, zs, LEARNED_ALL)
    oracle = {i: beta[0] + design(episode_z(zs, LEARNED_ALL, i), LEARNED_ALL) @ beta[1:] for i in n}
    results["in-sample bound"] = evaluate(eps, oracle, {POOLED: math.inf}, tasks)
    extra = {"success": {c: float(np.mean([e["success"] for e in eps if e["condition"] == c]))
                         for c in ("calibration", *TEST) if any(e["condition"] == c for e in eps)},
             "n": {c: sum(e["condition"] == c for e in eps) for c in ("calibration", *TEST)},
             "weights": {k: dict(zip(("bias", *f), models[k][POOLED].round(2).tolist()))
                         for k, f in (("logistic", LEARNED_ALL), ("logistic_onboard", ONBOARD))},
             "fpr_curve": {d: fpr_curve(eps, smoothed[d], tasks, (0.05, 0.1, 0.2, 0.3),
                                        pooled=d == "logistic_onboard" and LOGIT_BAND == "pooled")
                           for d in ("vfd", "rnd", "logistic", "logistic_onboard", "logistic_seen")},
             "per_task_success": {t: float(np.mean([e["success"] for e in eps
                                                    if e["condition"] == "nominal" and e["task"] == t]))
                                  for t in tasks},
             "curve": {d: auroc_over_time(eps, zs[d]) for d in ("vfd", "rnd", "stillness" + AT, "logistic_onboard",
                                                                "logistic", "in-sample bound")
                       if d in zs} | {"in-sample bound": auroc_over_time(eps, oracle)},
             "example": _example(eps, smoothed["logistic_onboard"], bands["logistic_onboard"])}
    return results, extra


def auroc_over_time(eps: list[dict], z: dict[int, np.ndarray], plans: int = 60) -> list[float]:
    """AUROC at plan t: failed episodes against successful ones still running (before their success) at t, on the
    running max of z up to t. How much can be told at each moment."""
    test = [i for i, e in enumerate(eps) if e["condition"] in TEST]
    ok = [np.maximum.accumulate(before_success(eps[i], z[i])) for i in test if eps[i]["success"]]
    bad = [np.maximum.accumulate(z[i]) for i in test if not eps[i]["success"]]
    out = []
    for t in range(plans):
        neg = [x[t] for x in ok if len(x) > t]
        pos = [x[min(t, len(x) - 1)] for x in bad]
        out.append(auroc(neg, pos) if len(neg) >= 10 else float("nan"))
    return out


def _example(eps, series, bands) -> dict:
    """One task's band with a few successful and failed nominal/shifted traces, for the figure."""
    task = "pick-place-v3"
    band = bands.get(task, bands[POOLED])

    def pick(ok: bool, n: int) -> list:
        return [series[i].tolist() for i, e in enumerate(eps) if e["task"] == task and e["success"] == ok
                and e["condition"] in ("nominal", "positions")][:n]

    return {"task": task, "band": [band.threshold(t) for t in range(125)],
            "centre": [band.centre[min(t, len(band.centre) - 1)] for t in range(125)],
            "ok": pick(True, 6), "failed": pick(False, 6)}


# -------------------------------------------------------------------------------------------- report


def _ms(v, fmt="{:.2f}") -> str:
    v = np.asarray([x for x in v if x is not None and np.isfinite(x)], float)
    if not len(v):
        return "–"
    return fmt.format(v.mean()) if len(v) == 1 else f"{fmt.format(v.mean())} ± {fmt.format(v.std(ddof=1))}"


def ranking(results: dict[str, dict[str, dict]]) -> list[tuple[str, float, float, float]]:
    """(detector, accuracy rank, calibration rank, joint) sorted by joint rank; ranks of the means over runs."""
    runs = list(results)
    acc = {d: np.mean([results[r][d]["tm_pooled"] for r in runs]) for d in DETECTORS}
    cal = {d: np.mean([results[r][d]["brier"] for r in runs]) for d in DETECTORS}
    from scipy.stats import rankdata

    ra = dict(zip(DETECTORS, rankdata([-acc[d] for d in DETECTORS])))
    rc = dict(zip(DETECTORS, rankdata([cal[d] for d in DETECTORS])))
    rows = [(d, float(ra[d]), float(rc[d]), (ra[d] + rc[d]) / 2) for d in DETECTORS]
    return sorted(rows, key=lambda r: (r[3], r[1]))


def report(results: dict[str, dict[str, dict]], extras: dict[str, dict], hold10: dict | None, run: dict,
           seconds: float, rollouts: list[dict]) -> str:
    runs = list(results)
    R = lambda d, k, fmt="{:.2f}": _ms([results[r][d][k] for r in runs], fmt)  # noqa: E731
    ex0 = extras[runs[0]]
    lines = [BEGIN, "## Failure prediction: time-varying conformal bands, combined signals, one ranking (issue 18)", "",
             written_by(run, seconds=seconds)]
    if rollouts:
        lines.append(f"- Rollouts (bench/failure_rollouts.py): {sum(r['minutes'] for r in rollouts):.0f} min in "
                     f"{len(rollouts)} invocation(s), 2 workers.")
    lines += [f"- Runs: {', '.join(runs)} (configs/flow-mt10-failure.toml: 3 members, hidden 128, RND/logpZO heads; "
              "demonstrations that hold the goal 40 steps). Per run: "
              + ", ".join(f"{c} {ex0['n'][c]}" for c in ("calibration", *TEST)) + " episodes, the whole episode "
              "scored (up to 500 steps, a plan every 4). Spread: mean ± std over the training seeds.",
              "- Success per condition: " + ", ".join(
                  f"{c} {_ms([extras[r]['success'].get(c, math.nan) for r in runs], '{:.0%}')}"
                  for c in ("calibration", *TEST)),
              f"- Bands: per task, running mean of {WINDOW} plans, asked per-episode false-alarm rate {ALPHA:.0%} "
              "(docs/failure.md). Time-matched AUROC: each failed/successful pair compared at every plan the "
              "successful episode lived (length cannot help; a clock scores 0.5). Early: max over the first "
              f"{EARLY} plans ({EARLY * 4} steps). Brier/ECE: the early statistic mapped to a failure probability "
              "(Platt, fitted on calibration episodes), on all test episodes.", ""]
    rank = ranking(results)
    lines += ["### One ranking: accuracy and calibration together", "",
              "| rank | detector | failure AUROC (time-matched, pooled) | failure AUROC (early) | TPR at the alarm "
              "| per-episode false alarms (asked 10%) | median lead time (steps) | Brier | ECE | accuracy rank "
              "| calibration rank |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, (d, ra, rc, _) in enumerate(rank, 1):
        lines.append(f"| {k} | {d} | {R(d, 'tm_pooled')} | {R(d, 'early_pooled')} | {R(d, 'tpr', '{:.0%}')} | "
                     f"{R(d, 'fpr', '{:.1%}')} | {R(d, 'lead_steps', '{:.0f}')} | {R(d, 'brier', '{:.3f}')} | "
                     f"{R(d, 'ece', '{:.3f}')} | {ra:g} | {rc:g} |")
    b = "in-sample bound"
    lines += ["", f"Upper bound, not a detector: a logistic model on all {len(LEARNED_ALL)} features fitted *in "
              f"sample* on the test episodes themselves reaches failure AUROC {R(b, 'tm_pooled')} time-matched "
              f"({R(b, 'early_pooled')} early): what a linear read-out of these signals can tell at best.", ""]
    lines += ["### Failure AUROC per condition (time-matched) and shift detection (time-matched, shifted vs "
              "nominal episodes)", "",
              "| detector | " + " | ".join(f"failure {c}" for c in TEST) + " | " +
              " | ".join(f"shift {c}" for c in SHIFTS) + " |", "|---" + "|---:" * (len(TEST) + len(SHIFTS)) + "|"]
    for d in (*DETECTORS, b):
        lines.append(f"| {d} | " + " | ".join(R(d, f"tm_{c}") for c in TEST) + " | " +
                     " | ".join(R(d, f"shift_{c}") for c in SHIFTS) + " |")
    lines += ["", "### Per-episode false alarms: asked against achieved (successful nominal episodes)", "",
              "| detector | " + " | ".join(f"asked {a:.0%}" for a in (0.05, 0.1, 0.2, 0.3)) + " |",
              "|---|---:|---:|---:|---:|"]
    for d in ex0["fpr_curve"]:
        lines.append(f"| {d} | " + " | ".join(_ms([extras[r]["fpr_curve"][d][k] for r in runs], "{:.1%}")
                                              for k in range(4)) + " |")
    w = ex0["weights"]
    lines += ["", "Logistic weights on the signals' z (run " + runs[0] + ", all training tasks): " +
              ", ".join(f"{k} {v:+.2f}" for k, v in w["logistic"].items()) + "; onboard: " +
              ", ".join(f"{k} {v:+.2f}" for k, v in w["logistic_onboard"].items()) + ".", ""]
    tasks = list(ex0["per_task_success"])
    lines += ["### Demonstrations that hold the goal (item 5): nominal success per task", "",
              "| demonstrations | " + " | ".join(t.replace("-v3", "") for t in tasks) + " | all | failure AUROC "
              "nominal (logistic_onboard, time-matched) |", "|---" + "|---:" * (len(tasks) + 2) + "|"]
    lines.append("| hold 40 steps (3 seeds) | " + " | ".join(
        _ms([extras[r]["per_task_success"][t] for r in runs], "{:.0%}") for t in tasks) + f" | "
        f"{_ms([extras[r]['success']['nominal'] for r in runs], '{:.0%}')} | {R('logistic_onboard', 'tm_nominal')} |")
    if hold10:
        lines.append("| hold 10 steps (seed 0) | " + " | ".join(f"{hold10['per_task_success'][t]:.0%}" for t in tasks)
                     + f" | {hold10['success']:.0%} | {hold10['tm_nominal']:.2f} |")
    lines += ["", f"![ranking]({(FIGURES / 'failure_ranking.png').relative_to(ROOT)})",
              f"![bands]({(FIGURES / 'failure_bands.png').relative_to(ROOT)})",
              f"![over time]({(FIGURES / 'failure_time.png').relative_to(ROOT)})", "", END]
    return "\n".join(lines)


def plots(results: dict[str, dict[str, dict]], extras: dict[str, dict]) -> None:
    plt = pyplot()
    runs = list(results)
    order = [d for d, *_ in ranking(results)]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.5))
    y = np.arange(len(order))
    for ax, key, label in ((a, "tm_pooled", "failure AUROC (time-matched, pooled)"), (b, "brier", "Brier score")):
        vals = np.array([[results[r][d][key] for r in runs] for d in order])
        ax.barh(y, vals.mean(1), xerr=vals.std(1, ddof=1) if len(runs) > 1 else None, color="tab:blue", alpha=0.7)
        ax.set_yticks(y, order, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(label)
    a.axvline(0.5, color="k", lw=0.8, ls=":")
    a.axvline(0.85, color="tab:red", lw=0.8, ls="--", label="target 0.85")
    a.set_xlim(0.2, 1.0)
    a.legend(fontsize=8)
    for d in ("vfd", "gu", "logistic_onboard", "logistic_seen", "fiper"):
        p = np.concatenate([results[r][d]["_p"] for r in runs])
        yy = np.concatenate([results[r][d]["_y"] for r in runs])
        bins = np.quantile(p, np.linspace(0, 1, 9))
        idx = np.clip(np.searchsorted(bins, p, side="right") - 1, 0, 7)
        c.plot([p[idx == k].mean() for k in range(8) if (idx == k).any()],
               [yy[idx == k].mean() for k in range(8) if (idx == k).any()], marker="o", label=d)
    c.plot([0, 1], [0, 1], "k:", lw=0.8)
    c.set_xlabel("predicted failure probability (early statistic, Platt)")
    c.set_ylabel("observed failure rate")
    c.set_title("reliability (test episodes, runs pooled)", fontsize=10)
    c.legend(fontsize=8)
    fig.suptitle("Failure prediction: detectors ranked by accuracy and calibration together (best first)")
    fig.tight_layout()
    save_figure(fig, FIGURES / "failure_ranking.png", dpi=100)

    ex = extras[runs[0]]["example"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    for s in ex["ok"]:
        a.plot(s, color="tab:green", lw=0.8, alpha=0.7)
    for s in ex["failed"]:
        a.plot(s, color="tab:red", lw=0.8, alpha=0.7)
    a.plot(ex["centre"], "k--", lw=1, label="band centre")
    a.plot(ex["band"], "k", lw=1.5, label="alarm band (10% per episode)")
    a.set_xlabel("plan (4 steps each)")
    a.set_ylabel("logistic_onboard score (logit)")
    a.set_title(f"{ex['task']}: successful (green) and failed (red) episodes, nominal and shifted", fontsize=10)
    a.legend(fontsize=8)
    asked = (0.05, 0.1, 0.2, 0.3)
    for d in extras[runs[0]]["fpr_curve"]:
        v = np.array([extras[r]["fpr_curve"][d] for r in runs])
        b.errorbar(asked, v.mean(0), yerr=v.std(0, ddof=1) if len(runs) > 1 else None, marker="o", label=d, capsize=3)
    b.plot([0, 0.35], [0, 0.35], "k:", lw=0.8)
    b.set_xlabel("asked per-episode false-alarm rate")
    b.set_ylabel("achieved (successful nominal episodes)")
    b.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, FIGURES / "failure_bands.png", dpi=100)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for d in extras[runs[0]]["curve"]:
        v = np.array([extras[r]["curve"][d] for r in runs], float)
        ax.plot(np.arange(v.shape[1]) * 4, np.nanmean(v, 0), label=d, ls=":" if d == "in-sample bound" else "-")
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.axhline(0.85, color="tab:red", lw=0.8, ls="--")
    ax.set_xlabel("step of the episode (a plan every 4)")
    ax.set_ylabel("failure AUROC at that step")
    ax.set_title("What can be told when: failed episodes against successful ones still running (runs averaged)",
                 fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, FIGURES / "failure_time.png", dpi=100)


def hold10_summary(eps: list[dict]) -> dict:
    """Nominal success per task and the onboard detector's nominal AUROC for a run trained on hold-10 demos."""
    tasks = sorted({e["task"] for e in eps if e["condition"] == "calibration"})
    zs = {}
    for s in dict.fromkeys(base_name(f)[0] for f in FEATURES):
        sm = {i: running_mean(e["signals"][s], WINDOW) for i, e in enumerate(eps)}
        bands = fit_bands(eps, sm, ALPHA, tasks)
        zs[s] = z_series(eps, sm, bands)
        zs[s + AT] = {i: bands[POOLED].exceedance(sm[i]) for i in range(len(eps))}
    series, _ = logistic_series(eps, zs, ONBOARD, tasks)
    bands = fit_bands(eps, series, ALPHA, tasks)
    z = z_series(eps, series, {POOLED: bands[POOLED]} if LOGIT_BAND == "pooled" else bands)
    nom = [i for i, e in enumerate(eps) if e["condition"] == "nominal"]
    return {"per_task_success": {t: float(np.mean([eps[i]["success"] for i in nom if eps[i]["task"] == t]))
                                 for t in tasks},
            "success": float(np.mean([eps[i]["success"] for i in nom])),
            "tm_nominal": time_matched_auroc([before_success(eps[i], z[i]) for i in nom if eps[i]["success"]],
                                             [z[i] for i in nom if not eps[i]["success"]])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="comma-separated run names (episodes-<name>.jsonl)")
    ap.add_argument("--episodes", default="bench-runs/failure/episodes", help="folder of the episode files")
    ap.add_argument("--hold10", help="run name of the hold-10-demonstrations comparison (nominal + calibration)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    folder = Path(args.episodes)
    run, t0 = run_info(), time.monotonic()
    load = lambda n: [json.loads(x) for x in (folder / f"episodes-{n}.jsonl").read_text().splitlines()]  # noqa: E731
    results, extras = {}, {}
    for name in args.runs.split(","):
        results[name], extras[name] = analyse_run(load(name))
    hold10 = hold10_summary(load(args.hold10)) if args.hold10 else None
    rf = folder / "rollouts.jsonl"
    rollouts = [json.loads(x) for x in rf.read_text().splitlines()] if rf.exists() else []
    text = report(results, extras, hold10, run, time.monotonic() - t0, rollouts)
    print(text)
    raw = {r: {d: {k: v for k, v in m.items() if not k.startswith("_")} for d, m in res.items()}
           for r, res in results.items()}
    (folder / "results.json").write_text(json.dumps({"results": raw, "extras": {
        r: {k: v for k, v in x.items() if k != "example"} for r, x in extras.items()}, "hold10": hold10},
        indent=1, default=float))
    if not args.no_write:
        plots(results, extras)
        write_benchmarks(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
