"""Optimal LQR of a known linear system (python-control), exported as a `linear_gain` bundle."""

from __future__ import annotations

from pathlib import Path

import control
import numpy as np

from vigil.policies.manifest import Manifest
from vigil.sim.linear import SYSTEMS, LinearSystem
from vigil.training.export import export_linear_gain, provenance


def lqr_gain(system: LinearSystem) -> tuple[np.ndarray, np.ndarray]:
    """(K, P) of the discrete-time LQR: u = -K x minimises sum x'Qx + u'Ru."""
    K, P, _ = control.dlqr(system.A, system.B, system.Q, system.R)
    return np.asarray(K), np.asarray(P)


def export_lqr(system_name: str, folder: str | Path, state_bound: float = 10.0) -> Manifest:
    """Compute the optimal gain for a named system and write its bundle. Observations outside
    +-state_bound raise an alert (the linearisation is not to be trusted there)."""
    system = SYSTEMS[system_name]()
    K, P = lqr_gain(system)
    n = system.n
    return export_linear_gain(
        folder, f"{system.name}-lqr", K, control_rate_hz=1.0 / system.dt,
        state_low=[-state_bound] * n, state_high=[state_bound] * n,
        prov=provenance(method="lqr", solver=f"python-control {control.__version__} dlqr", system=system.name,
                        Q=system.Q.tolist(), R=system.R.tolist(), dt=system.dt),
        extra={"optimal_average_cost": float(system.noise_std**2 * np.trace(P))})


def prior_of(system: LinearSystem, prior_std: float, relative: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The prior model (A0, B0) of trial 0 of `vigil train lqr --seed seed` (lqr_study.draw_prior on the
    same random stream): the truth perturbed by prior_std, absolutely or relative to each entry."""
    from vigil.training.lqr_study import draw_prior

    return draw_prior(system, prior_std, relative, np.random.default_rng([seed, 0]).spawn(4)[0])


def export_prior_lqr(system_name: str, folder: str | Path, prior_std: float | None = None,
                     relative: bool | None = None, seed: int = 0, learner: bool = True,
                     state_bound: float = 10.0, stability: dict | None = None, **settings) -> Manifest:
    """A bundle for a system known only through a prior model: the gain is the LQR of the prior (A0, B0);
    with `learner`, the manifest carries an IR-LQR block (the prior, Q, R and the settings: the system's
    published ones, `settings` overriding lam, g1, g2, fallback_ratio, epoch_factor, stability_guard) and a
    `monitor.stability` block, and the runtime improves the gain on board (runtime/learning.py); its initial
    gain is the learner's, the optimistic LQR of the prior. Without `learner`, a fixed gain: the prior
    controller that learning is measured against.

    prior_std / relative default to the study's choice per system (docs/decisions.md 73): aircraft pitch
    relative 1%, the UAV absolute 0.1."""
    from dataclasses import replace

    from vigil.monitors.stability import DEFAULTS
    from vigil.policies.irlqr import LearnerSpec, dlqr_cross
    from vigil.training.irlqr import PUBLISHED

    system = SYSTEMS[system_name]()
    config = replace(PUBLISHED[system_name], **settings)
    std = config.prior_std if prior_std is None else prior_std
    rel = (system_name == "aircraft-pitch") if relative is None else relative
    A0, B0 = prior_of(system, std, rel, seed)
    spec = LearnerSpec("irlqr", A0, B0, system.Q, system.R, config)
    K = spec.learner().gain() if learner else dlqr_cross(A0, B0, system.Q, system.R)
    n = system.n
    prior = {"prior_std": std, "prior": "relative" if rel else "absolute", "seed": seed}
    return export_linear_gain(
        folder, f"{system.name}-{'irlqr' if learner else 'prior-lqr'}", K, control_rate_hz=1.0 / system.dt,
        state_low=[-state_bound] * n, state_high=[state_bound] * n,
        prov=provenance(method="irlqr" if learner else "lqr of a prior model", solver="vigil.policies.irlqr",
                        system=system.name, Q=system.Q.tolist(), R=system.R.tolist(), dt=system.dt, **prior),
        extra={"A0": A0.tolist(), "B0": B0.tolist(), **prior},
        learner=spec.to_dict() if learner else None,
        monitor={"stability": {**DEFAULTS, **(stability or {})}} if learner else None)

