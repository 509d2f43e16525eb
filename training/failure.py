"""Fitting the failure monitor (monitors/failure.py) from calibration rollouts: per-task bands and a logistic model.

docs/failure.md has the method. Shared by `vigil calibrate` (which writes the manifest's `monitor.failure`) and
the failure-prediction benchmark (bench/failure.py), so the benchmark measures exactly what the robot runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vigil.monitors.bands import Band, conformal_quantile, episode_statistic, fit_shape, running_mean, split_halves
from vigil.monitors.failure import POOLED, Z_CLIP

FEATURES = ("vfd", "rnd", "logpzo", "stillness")  # the plan graph's outputs and the state's stillness: free
WINDOW = 3
ALPHA = 0.10


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


def fit_weights(episodes: Sequence[tuple[Mapping[str, np.ndarray], bool]], features: Sequence[str]) -> np.ndarray:
    """Logistic model of "this episode fails" on every plan's clipped exceedances, each plan weighted 1/length
    so every episode counts once. episodes: (z per feature, failed). Without a failure among them there is
    nothing to fit: equal weights, bias 0 (the mean exceedance, a sensible no-data combiner)."""
    if not any(failed for _, failed in episodes):
        return np.array([0.0, *([1.0 / len(features)] * len(features))])
    X = np.concatenate([design(z, features) for z, _ in episodes])
    T = [len(z[features[0]]) for z, _ in episodes]
    y = np.concatenate([np.full(t, float(failed)) for t, (_, failed) in zip(T, episodes)])
    w = np.concatenate([np.full(t, 1.0 / t) for t in T])
    return fit_logistic(X, y, w)


def failure_block(episodes: Sequence[Mapping[str, Any]], features: Sequence[str] = FEATURES, window: int = WINDOW,
                  alpha: float = ALPHA, alpha_warn: float | None = 0.25,
                  instructions: Mapping[str, str] | None = None, successful_only: bool = True) -> dict[str, Any]:
    """The manifest's `monitor.failure` from calibration episodes, each {"task", "success", "scores": {feature:
    per-plan list}}: per task and feature a band of the windowed score, logistic weights on the exceedances,
    and per task a band of the logit (q at alpha, q_warn at alpha_warn). successful_only=False (tasks that report
    no success): every episode counts as a successful one, so the bands come from all and the weights are equal."""
    features = tuple(features)
    eps = [e for e in episodes if all(e["scores"].get(f) for f in features)]
    if not successful_only:
        eps = [{**e, "success": True} for e in eps]
    if not any(e["success"] for e in eps):
        raise ValueError(f"no successful calibration episode reports {list(features)}: the bundle needs the density "
                         "heads (flow.density_steps > 0) and some successful episodes")
    smoothed = [{f: running_mean(e["scores"][f], window) for f in features} for e in eps]
    tasks = sorted({e["task"] for e in eps if e["success"]})
    bands = {f: fit_task_bands({t: [s[f] for s, e in zip(smoothed, eps) if e["task"] == t and e["success"]]
                                for t in tasks}, alpha) for f in features}
    z = [{f: bands[f].get(e["task"], bands[f][POOLED]).exceedance(s[f]) for f in features}
         for s, e in zip(smoothed, eps)]
    beta = fit_weights([(zz, not e["success"]) for zz, e in zip(z, eps)], features)
    logits = [beta[0] + design(zz, features) @ beta[1:] for zz in z]
    good = {t: [lg for lg, e in zip(logits, eps) if e["task"] == t and e["success"]] for t in tasks}
    logit_bands = fit_task_bands(good, alpha)
    q_warn = None
    if alpha_warn is not None:
        warn = fit_task_bands(good, alpha_warn)
        q_warn = warn[POOLED].q if np.isfinite(warn[POOLED].q) else None
    out_bands = {t: {**{f: bands[f][t].to_dict() for f in features}, "logit": logit_bands[t].to_dict()}
                 for t in [*tasks, POOLED]}
    return {"features": list(features), "window": window, "bias": float(beta[0]),
            "weights": [float(b) for b in beta[1:]], "bands": out_bands, "alpha": alpha, "alpha_warn": alpha_warn,
            "q_warn": q_warn, "instructions": dict(instructions or {}), "episodes": len(eps),
            "failures": int(sum(not e["success"] for e in eps))}
