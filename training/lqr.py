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
