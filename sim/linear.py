"""Linear systems x' = A x + B u + w of the IR-LQR study, with the optimal controller of the true system
(docs/algorithms.md#ir-lqr-optimistic-online-lqr-by-intrinsic-rewards).

The oracle here uses scipy's DARE directly: it is the independent reference against which the exported
LQR bundle (computed with python-control in `vigil.training.lqr`) is judged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg


@dataclass(frozen=True)
class LinearSystem:
    name: str
    A: np.ndarray
    B: np.ndarray
    Q: np.ndarray
    R: np.ndarray
    x0: np.ndarray
    noise_std: float
    dt: float

    @property
    def n(self) -> int:
        return self.A.shape[0]

    @property
    def m(self) -> int:
        return self.B.shape[1]


def zero_order_hold(Ac: np.ndarray, Bc: np.ndarray, dt: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact discretisation: expm([[Ac, Bc], [0, 0]] dt) = [[A, B], [0, I]]."""
    n, m = Bc.shape
    M = np.zeros((n + m, n + m))
    M[:n, :n], M[:n, n:] = Ac, Bc
    E = scipy.linalg.expm(M * dt)
    return E[:n, :n], E[:n, n:]


def aircraft_pitch() -> LinearSystem:
    Ac = np.array([[-0.313, 56.7, 0.0], [-0.0139, -0.426, 0.0], [0.0, 56.7, 0.0]])
    Bc = np.array([[0.232], [0.0203], [0.0]])
    A, B = zero_order_hold(Ac, Bc, 0.05)
    return LinearSystem("aircraft-pitch", A, B, np.diag([1.0, 1.0, 10.0]), np.array([[0.1]]),
                        np.array([0.035, 0.0, 0.087]), 0.01, 0.05)


def uav_2d() -> LinearSystem:
    A = np.array([[1, .5, 0, 0], [0, 1, 0, 0], [0, 0, 1, .5], [0, 0, 0, 1]], dtype=float)
    B = np.array([[.125, 0], [.5, 0], [0, .125], [0, .5]])
    return LinearSystem("uav-2d", A, B, np.diag([1.0, 0.1, 2.0, 0.2]), np.eye(2), np.zeros(4), 0.2, 0.1)


SYSTEMS = {"aircraft-pitch": aircraft_pitch, "uav-2d": uav_2d}


def oracle(system: LinearSystem) -> tuple[np.ndarray, float]:
    """Optimal gain K (u = -K x) and optimal average cost J* = sigma^2 trace(P) of the true system."""
    A, B, Q, R = system.A, system.B, system.Q, system.R
    P = scipy.linalg.solve_discrete_are(A, B, Q, R)
    K = np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A)
    return K, float(system.noise_std**2 * np.trace(P))


def stage_cost(system: LinearSystem, x: np.ndarray, u: np.ndarray) -> float:
    return float(x @ system.Q @ x + u @ system.R @ u)


def rollout_cost(system: LinearSystem, K: np.ndarray, noise: np.ndarray) -> float:
    """Cost of u = -K x over a given noise sequence (T, n): the same-noise reference for a closed loop."""
    x, total = system.x0.copy(), 0.0
    for w in noise:
        u = -K @ x
        total += stage_cost(system, x, u)
        x = system.A @ x + system.B @ u + w
    return total
