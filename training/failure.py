"""Fitting the failure monitor (monitors/failure.py) from calibration rollouts: per-task bands and a logistic model.

docs/failure.md has the method. Shared by `vigil calibrate` (which writes the manifest's `monitor.failure`) and
the failure-prediction benchmark (bench/failure.py), so the benchmark measures exactly what the robot runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vigil.monitors.bands import Band, conformal_quantile, episode_statistic, fit_shape, running_mean, split_halves
from vigil.monitors.failure import POOLED, Z_CLIP, base_name

# the monitor's configuration, chosen by the failure benchmark (docs/failure.md §4): the graph's VFD and RND and the
# state's stillness, each against the band of all calibration tasks pooled, and the logit judged against its
# pooled band
FEATURES = ("vfd@pooled", "rnd@pooled", "stillness@pooled")
WINDOW = 3
ALPHA = 0.10
LOGIT_BAND = "pooled"


def fit_task_bands(good: Mapping[str, Sequence[np.ndarray]], alpha: float = ALPHA) -> dict[str, Band]:
    """Per task a band from its successful episodes' (windowed) per-plan scores: centre and scale from one half,
    the exceedance quantile q from the other halves pooled over tasks (per-episode false-alarm rate alpha);
    plus POOLED, fitted the same way on every task's episodes together, for tasks without calibration."""
    tasks = [t for t, eps in good.items() if len(eps)]
    if not tasks:
        raise ValueError("no successful calibration episodes to fit bands on")
    shapes, held = {}, []
    for task in tasks:
        a, b = split_halves(len(good[task]))
        shapes[task] = fit_shape([good[task][j] for j in a])
        held += [(task, good[task][j]) for j in b]
    q = conformal_quantile([episode_statistic(shapes[t], s) for t, s in held], alpha)
    every = [s for t in tasks for s in good[t]]
    a, b = split_halves(len(every))
    pooled = fit_shape([every[j] for j in a])
    bands = {t: s.with_q(q) for t, s in shapes.items()}
    bands[POOLED] = pooled.with_q(conformal_quantile([episode_statistic(pooled, every[j]) for j in b], alpha))
    return bands


def fit_logistic(X: np.ndarray, y: np.ndarray, w: np.ndarray | None = None, l2: float = 1e-2) -> np.ndarray:
    """Weighted, L2-regularised logistic regression (Newton's method); returns [bias, weights...]."""
    X, y = np.asarray(X, float), np.asarray(y, float)
    w = np.ones(len(X)) if w is None else np.asarray(w, float)
    A = np.hstack([np.ones((len(X), 1)), X])
    beta = np.zeros(A.shape[1])
    reg = l2 * np.eye(A.shape[1])
    reg[0, 0] = 0.0
    for _ in range(100):
        p = 1 / (1 + np.exp(-np.clip(A @ beta, -30, 30)))
        g = A.T @ (w * (p - y)) + reg @ beta
        H = (A * (w * p * (1 - p))[:, None]).T @ A + reg + 1e-9 * np.eye(A.shape[1])
        step = np.linalg.solve(H, g)
        beta -= step
        if np.abs(step).max() < 1e-8:
            break
    return beta


def design(z: Mapping[str, np.ndarray], features: Sequence[str]) -> np.ndarray:
    """(T, F) clipped exceedances of one episode."""
    return np.clip(np.stack([np.asarray(z[f], float) for f in features], 1), *Z_CLIP)


def fit_weights(episodes: Sequence[tuple[Mapping[str, np.ndarray], bool, int | None]], features: Sequence[str]
                ) -> np.ndarray:
    """Logistic model of "this episode fails" on every plan's clipped exceedances, each plan weighted 1/length
    so every episode counts once. episodes: (z per feature, failed, plans before success or None); a successful
    episode counts only up to its success (after that the hold at the goal would teach "still means success").
    Without a failure among them there is nothing to fit: equal weights, bias 0 (the mean exceedance)."""
    if not any(failed for _, failed, _ in episodes):
        return np.array([0.0, *([1.0 / len(features)] * len(features))])
    X = [design(z, features)[:None if failed or k is None else max(1, k)] for z, failed, k in episodes]
    y = np.concatenate([np.full(len(x), float(failed)) for x, (_, failed, _) in zip(X, episodes)])
    w = np.concatenate([np.full(len(x), 1.0 / len(x)) for x in X])
    return fit_logistic(np.concatenate(X), y, w)


def exceedances(smoothed: Mapping[str, np.ndarray], task: str, bands: Mapping[str, Mapping[str, Band]],
                features: Sequence[str]) -> dict[str, np.ndarray]:
    """z of each feature of one episode: against its task's band, or the pooled band for "name@pooled"."""
    out = {}
    for f in features:
        name, pooled = base_name(f)
        per_task = bands[name]
        out[f] = (per_task[POOLED] if pooled else per_task.get(task, per_task[POOLED])).exceedance(smoothed[name])
    return out


def failure_block(episodes: Sequence[Mapping[str, Any]], features: Sequence[str] = FEATURES, window: int = WINDOW,
                  alpha: float = ALPHA, alpha_warn: float | None = 0.25, logit_band: str = LOGIT_BAND,
                  instructions: Mapping[str, str] | None = None, successful_only: bool = True) -> dict[str, Any]:
    """The manifest's `monitor.failure` from calibration episodes, each {"task", "success", "scores": {score:
    per-plan list}} and optionally "success_plan" (plans made before the first success): per task and score a
    band of the windowed score, logistic weights on the features' exceedances ("name" against the task's band,
    "name@pooled" against the pooled one), and bands of the logit (q at alpha, q_warn at alpha_warn), judged per
    task or pooled (`logit_band`). successful_only=False (tasks that report no success): every episode counts as
    a successful one, so the bands come from all and the weights are equal."""
    features = tuple(features)
    names = tuple(dict.fromkeys(base_name(f)[0] for f in features))
    eps = [e for e in episodes if all(e["scores"].get(f) for f in names)]
    if not successful_only:
        eps = [{**e, "success": True} for e in eps]
    if not any(e["success"] for e in eps):
        raise ValueError(f"no successful calibration episode reports {list(names)}: the bundle needs the density "
                         "heads (flow.density_steps > 0) and some successful episodes")
    smoothed = [{f: running_mean(e["scores"][f], window) for f in names} for e in eps]
    tasks = sorted({e["task"] for e in eps if e["success"]})
    bands = {f: fit_task_bands({t: [s[f] for s, e in zip(smoothed, eps) if e["task"] == t and e["success"]]
                                for t in tasks}, alpha) for f in names}
    z = [exceedances(s, e["task"], bands, features) for s, e in zip(smoothed, eps)]
    beta = fit_weights([(zz, not e["success"], e.get("success_plan")) for zz, e in zip(z, eps)], features)
    logits = [beta[0] + design(zz, features) @ beta[1:] for zz in z]
    good = {t: [lg for lg, e in zip(logits, eps) if e["task"] == t and e["success"]] for t in tasks}
    logit_bands = fit_task_bands(good, alpha)
    key = POOLED if logit_band == "pooled" else tasks[0]  # the per-task bands share one q (pooled over tasks)
    q_warn = None
    if alpha_warn is not None:
        warn = fit_task_bands(good, alpha_warn)[key].q
        q_warn = float(warn) if np.isfinite(warn) else None
    out_bands = {t: {**{f: bands[f][t].to_dict() for f in names}, "logit": logit_bands[t].to_dict()}
                 for t in [*tasks, POOLED]}
    note = None
    if not np.isfinite(logit_bands[key].q):
        note = (f"too few successful calibration episodes for a {alpha:.0%} per-episode rate: the failure monitor "
                f"will not alarm (calibrate on at least {int(np.ceil(2 / alpha))} per task)")
    return {"features": list(features), "window": window, "bias": float(beta[0]), "note": note,
            "weights": [float(b) for b in beta[1:]], "logit_band": logit_band, "bands": out_bands, "alpha": alpha,
            "alpha_warn": alpha_warn, "q_warn": q_warn, "instructions": dict(instructions or {}),
            "episodes": len(eps), "failures": int(sum(not e["success"] for e in eps))}
