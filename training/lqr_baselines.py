"""Baselines for IR-LQR (docs/algorithms.md#ir-lqr-optimistic-online-lqr-by-intrinsic-rewards),
on IR-LQR's own machinery so that only the gain rule differs.

Every learner here is an `IRLQR` subclass: the same ridge estimate centred on the prior, the same log-det
doubling epochs, the same one-transition-at-a-time interface. What changes is `compute` (the gain of a new
epoch) and, for CEC+PE, `exploration_std` (noise added to the action):

    CEC        certainty equivalence: the LQR of the estimate (IR-LQR with g1 = g2 = 0)
    CEC+PE     CEC plus persistent excitation, u = -K x + s_t e_t, e_t ~ N(0, I),
               s_t = pe_std (1 + t)^(-1/4)  (the variance decays as 1/sqrt(t), the rate at which certainty
               equivalence with exploration has sqrt(T) regret; Simchowitz & Foster 2020)
    Thompson   at each epoch, the LQR of a sample theta = theta_hat + beta E V^{-1/2}, E ~ N(0, I)
               (Abeille & Lazaric's form, beta = 1e-3 published); up to 10 samples until one is
               stabilisable and its gain stabilises it, else CEC
    OSLO       Cohen, Koren & Mansour 2019: the SDP relaxation  min <H, S>  s.t.
               S_xx >= theta_hat S theta_hat^T + W - mu <S, V^{-1}> I,  S >= 0,  K = -S_ux S_xx^{-1}
               (cvxpy, Clarabel); mu = 0.01 sigma_w^2 by default (docs/decisions.md); no warm-up phase (the
               prior plays that role, as for every learner here); an infeasible or failed SDP falls back
               to CEC and counts a fallback
    Oracle     the LQR of the true system, never updated (the regret's reference)

Every one keeps the stability guard's promise for its own fallback: it never keeps a gain the estimate
says is unstable (CEC is the fallback, and CEC's gain stabilises the estimate by construction).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import replace

import numpy as np

from vigil.training.irlqr import IRLQR, GainUpdate, IRLQRConfig, dlqr_cross, is_stabilising, ridge_estimate


class CEC(IRLQR):
    """Certainty equivalence: the LQR of the current estimate, recomputed at every epoch."""

    def __init__(self, A0: np.ndarray, B0: np.ndarray, Q: np.ndarray, R: np.ndarray, config: IRLQRConfig):
        super().__init__(A0, B0, Q, R, replace(config, g1=0.0, g2=0.0))

    def ce_gain(self, V: np.ndarray, S: np.ndarray, K_prev: np.ndarray | None, t0: float,
                fallback: bool = False) -> GainUpdate:
        """The certainty-equivalent gain (the previous one when the estimate has no LQR solution)."""
        A_hat, B_hat = self._split(ridge_estimate(V, S, self.config.lam, self.theta0))
        failed = False
        try:
            K = dlqr_cross(A_hat, B_hat, self.Q, self.R)
        except (ValueError, np.linalg.LinAlgError):
            if K_prev is None:
                raise
            K, failed = K_prev, True
        return GainUpdate(np.asarray(K, float), A_hat, B_hat, fallback, False, failed,
                          time.perf_counter() - t0)

    def _split(self, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = self.Q.shape[0]
        return theta[:, :n], theta[:, n:]


class CECPE(CEC):
    """CEC with persistent excitation: Gaussian action noise of std pe_std (1 + t)^(-1/4)."""

    def __init__(self, A0: np.ndarray, B0: np.ndarray, Q: np.ndarray, R: np.ndarray, config: IRLQRConfig,
                 pe_std: float = 0.1):
        self.pe_std = pe_std
        super().__init__(A0, B0, Q, R, config)

    def exploration_std(self, t: int) -> float:
        return self.pe_std * (1.0 + t) ** -0.25


class Thompson(CEC):
    """Thompson sampling around the ridge estimate, one sample per epoch."""

    def __init__(self, A0: np.ndarray, B0: np.ndarray, Q: np.ndarray, R: np.ndarray, config: IRLQRConfig,
                 beta: float = 1e-3, rng: np.random.Generator | None = None, tries: int = 10):
        self.beta, self.tries = beta, tries
        self.rng = rng if rng is not None else np.random.default_rng(0)
        super().__init__(A0, B0, Q, R, config)

    def compute(self, V: np.ndarray, S: np.ndarray, K_prev: np.ndarray | None) -> GainUpdate:
        t0 = time.perf_counter()
        theta = ridge_estimate(V, S, self.config.lam, self.theta0)
        w, U = np.linalg.eigh(V)
        V_inv_half = (U / np.sqrt(w)) @ U.T
        for _ in range(self.tries):
            A_s, B_s = self._split(theta + self.beta * self.rng.standard_normal(theta.shape) @ V_inv_half)
            try:
                K = dlqr_cross(A_s, B_s, self.Q, self.R)
            except (ValueError, np.linalg.LinAlgError):
                continue
            if is_stabilising(A_s, B_s, K):
                A_hat, B_hat = self._split(theta)
                return GainUpdate(K, A_hat, B_hat, False, False, False, time.perf_counter() - t0)
        return self.ce_gain(V, S, K_prev, t0, fallback=K_prev is not None)


class OSLO(CEC):
    """OSLO's optimistic SDP (Cohen, Koren & Mansour 2019) on the ridge estimate, one solve per epoch."""

    def __init__(self, A0: np.ndarray, B0: np.ndarray, Q: np.ndarray, R: np.ndarray, config: IRLQRConfig,
                 noise_std: float, mu: float | None = None):
        n, m = np.shape(B0)
        self.noise_std = noise_std
        self.mu = mu if mu is not None else 0.01 * noise_std**2
        super().__init__(A0, B0, Q, R, config)

    def compute(self, V: np.ndarray, S: np.ndarray, K_prev: np.ndarray | None) -> GainUpdate:
        t0 = time.perf_counter()
        theta = ridge_estimate(V, S, self.config.lam, self.theta0)
        K = oslo_gain(theta, V, self.Q, self.R, self.mu / self.noise_std**2)
        if K is None or not is_stabilising(*self._split(theta), K):
            return self.ce_gain(V, S, K_prev, t0, fallback=K_prev is not None)
        return GainUpdate(K, *self._split(theta), False, False, False, time.perf_counter() - t0)


def oslo_gain(theta: np.ndarray, V: np.ndarray, Q: np.ndarray, R: np.ndarray, mu: float,
              K_ref: np.ndarray | None = None) -> np.ndarray | None:
    """OSLO's relaxed SDP with unit noise covariance (the problem is homogeneous in (S, W), so mu is given
    in units of the noise variance); K (u = -K x), or None when the solver fails.

    Conditioning: aircraft pitch's optimal covariance spans orders of magnitude, which an interior-point
    solver does not survive. So the variable is written S = T S' T^T, with T T^T the (regularised)
    stationary covariance of z under the reference gain K_ref (the estimate's LQR by default), and the
    constraint is multiplied by L^{-1} on both sides (L L^T = that covariance's state block): a congruence,
    so the problem is the same, but its solution S' is near the identity."""
    import cvxpy as cp

    n, m = Q.shape[0], R.shape[0]
    d = n + m
    A, B = theta[:, :n], theta[:, n:]
    H = np.zeros((d, d))
    H[:n, :n], H[n:, n:] = Q, R
    try:
        if K_ref is None:
            K_ref = dlqr_cross(A, B, Q, R)
        import scipy.linalg

        Sxx = scipy.linalg.solve_discrete_lyapunov(A - B @ K_ref, np.eye(n))
        G = np.vstack([np.eye(n), -K_ref])
        Sz = G @ Sxx @ G.T
        Sz = Sz + 1e-3 * np.diag(np.diag(Sz)) + 1e-9 * np.trace(Sz) * np.eye(d)
        T = np.linalg.cholesky(Sz)
        L_inv = np.linalg.inv(np.linalg.cholesky(Sxx))
    except (ValueError, np.linalg.LinAlgError):
        return None
    Sp = cp.Variable((d, d), PSD=True)
    Sig = T @ Sp @ T.T
    V_inv = np.linalg.inv(V)
    lhs = Sig[:n, :n] - theta @ Sig @ theta.T - np.eye(n) + mu * cp.trace(Sig @ V_inv) * np.eye(n)
    lhs = L_inv @ lhs @ L_inv.T
    problem = cp.Problem(cp.Minimize(cp.trace((T.T @ H @ T) @ Sp)), [0.5 * (lhs + lhs.T) >> 0])
    try:
        with warnings.catch_warnings():  # an inaccurate solution is refused below, not worth a warning
            warnings.simplefilter("ignore")
            problem.solve(solver=cp.CLARABEL)
    except cp.error.SolverError:
        return None
    if problem.status != "optimal" or Sp.value is None:
        return None
    S = T @ Sp.value @ T.T
    try:
        K = -np.linalg.solve(S[:n, :n], S[:n, n:]).T
    except np.linalg.LinAlgError:
        return None
    return K if np.all(np.isfinite(K)) else None


class Oracle(IRLQR):
    """The optimal gain of the true system, never updated (update() is a no-op)."""

    def __init__(self, A: np.ndarray, B: np.ndarray, Q: np.ndarray, R: np.ndarray, config: IRLQRConfig):
        super().__init__(A, B, Q, R, config)
        self._K = dlqr_cross(A, B, Q, R)

    def compute(self, V: np.ndarray, S: np.ndarray, K_prev: np.ndarray | None) -> GainUpdate:
        if K_prev is None:
            return GainUpdate(np.zeros((self.R.shape[0], self.Q.shape[0])), self.theta0[:, :self.Q.shape[0]],
                              self.theta0[:, self.Q.shape[0]:], False, False, False, 0.0)
        return GainUpdate(K_prev, self.theta0[:, :self.Q.shape[0]], self.theta0[:, self.Q.shape[0]:],
                          False, False, False, 0.0)

    def observe(self, x: np.ndarray, u: np.ndarray, x_next: np.ndarray) -> bool:
        return False
