"""IR-LQR: optimistic online LQR by intrinsic rewards (PAPERS.md §4), in one file.

The system x' = A x + B u + w is unknown; the learner starts from a prior (A0, B0) and acts with a linear
gain, u = -K x (the sign convention of `vigil.sim.linear` and of `linear_gain` bundles; PAPERS.md writes
u = K x). With z = [x; u] it keeps

    V_t = lam I + sum z z^T,     S_t = sum x_next z^T,     [A_hat B_hat] = (lam [A0 B0] + S_t) V_t^{-1}

(ridge regression centred on the prior), and recomputes the gain only at the start of a new epoch, when
det V_t > 2 det V at the last update (log-det doubling). The gain of an epoch is the LQR of the estimate
under an *optimistic* stage cost

    H = blkdiag(Q, R),   O = (g1 + g2 sqrt(||V_t||_2)) V_t^{-1},   H_opt = sym(H - O),

i.e. the cost of a state-action pair is lowered by its epistemic variance z^T V^{-1} z (the intrinsic
reward). O has off-diagonal blocks, so the Riccati equation carries a cross term N = H_opt[x, u]
(`control.dlqr(A, B, Q, R, N)`).

Fallback (published): when lambda_max(O) >= 0.95 lambda_min(H) (H_opt would no longer be safely positive
definite) keep the previous gain and count a fallback. Guard (ours, docs/decisions.md 72): the published
rule fired exactly when the state blew up (V then grows in a few directions, ||V|| is huge) and froze a
destabilising gain. So a fallback keeps the previous gain only when the current estimate says it is
stabilising (spectral radius of A_hat - B_hat K below 1); otherwise the gain becomes the certainty-
equivalent LQR of the current estimate (H unmodified, which is always well posed), and the event is counted
as a guarded fallback.

The learner is driven one transition at a time (`observe`), its gain recomputation is a pure function of
a snapshot of its statistics (`compute_gain`), so a runtime can run it off the control thread and swap the
new gain in. numpy/scipy and python-control only: no torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import control
import numpy as np


# ------------------------------------------------------------------------------------------------------
# Hyperparameters
# ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IRLQRConfig:
    """IR-LQR's settings. Defaults are the UAV's published ones (PAPERS.md §4)."""

    lam: float = 5.0                 # ridge weight of the prior (V_0 = lam I)
    g1: float = 0.01                 # optimism: O = (g1 + g2 sqrt(||V||_2)) V^{-1}
    g2: float = 0.01
    prior_std: float = 0.1           # std of the prior's perturbation (study only: how (A0, B0) are drawn)
    relative_prior: bool = False     # perturbation std relative to each block's RMS entry (else absolute)
    fallback_ratio: float = 0.95     # fallback when lambda_max(O) >= fallback_ratio * lambda_min(H)
    epoch_factor: float = 2.0        # a new epoch when det V > epoch_factor * det V at the last update
    stability_guard: bool = True     # never keep a gain the current estimate says is unstable

    def __post_init__(self) -> None:
        if self.lam <= 0 or self.g1 < 0 or self.g2 < 0 or self.prior_std < 0:
            raise ValueError("lam must be > 0 and g1, g2, prior_std >= 0")
        if not 0 < self.fallback_ratio <= 1 or self.epoch_factor <= 1:
            raise ValueError("fallback_ratio must be in (0, 1] and epoch_factor > 1")


# The published settings of PAPERS.md §4, per system.
PUBLISHED = {
    "aircraft-pitch": IRLQRConfig(lam=20.0, g1=0.01, g2=0.001, prior_std=0.01),
    "uav-2d": IRLQRConfig(lam=5.0, g1=0.01, g2=0.01, prior_std=0.1),
}


# ------------------------------------------------------------------------------------------------------
# Pieces: estimate, Riccati with cross term, optimism, stability
# ------------------------------------------------------------------------------------------------------

def ridge_estimate(V: np.ndarray, S: np.ndarray, lam: float, theta0: np.ndarray) -> np.ndarray:
    """[A_hat B_hat] = (lam theta0 + S) V^{-1}, theta0 = [A0 B0] (n, n+m). V is symmetric positive definite."""
    return np.linalg.solve(V, (lam * theta0 + S).T).T


def dlqr_cross(A: np.ndarray, B: np.ndarray, Q: np.ndarray, R: np.ndarray,
               N: np.ndarray | None = None) -> np.ndarray:
    """Gain K (u = -K x) minimising sum x'Qx + u'Ru + 2 x'Nu on x' = A x + B u (python-control's dlqr).
    Raises ValueError (or numpy's LinAlgError) when the Riccati equation has no stabilising solution."""
    if N is None:
        N = np.zeros(B.shape)
    K, _, _ = control.dlqr(A, B, Q, R, N)
    K = np.asarray(K, dtype=float)
    if not np.all(np.isfinite(K)):
        raise ValueError("non-finite LQR gain")
    return K


def spectral_radius(M: np.ndarray) -> float:
    return float(np.max(np.abs(np.linalg.eigvals(M))))


def is_stabilising(A: np.ndarray, B: np.ndarray, K: np.ndarray) -> bool:
    """Whether u = -K x stabilises x' = A x + B u (spectral radius of A - B K below 1)."""
    return spectral_radius(A - B @ K) < 1.0


def optimism(V: np.ndarray, g1: float, g2: float) -> np.ndarray:
    """O = (g1 + g2 sqrt(||V||_2)) V^{-1}: the intrinsic reward's weight on z z^T."""
    scale = g1 + g2 * np.sqrt(np.linalg.norm(V, 2))
    return scale * np.linalg.inv(V)


def sym(M: np.ndarray) -> np.ndarray:
    return 0.5 * (M + M.T)


# ------------------------------------------------------------------------------------------------------
# One gain computation (an epoch boundary): a pure function of a snapshot of the statistics
# ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GainUpdate:
    """What one epoch boundary decided. `fallback`: the published rule fired; `guarded`: the previous gain
    was unstable under the estimate and was replaced by the certainty-equivalent gain; `failed`: no
    Riccati solution, the previous gain is kept."""

    K: np.ndarray
    A_hat: np.ndarray
    B_hat: np.ndarray
    fallback: bool
    guarded: bool
    failed: bool
    seconds: float


def compute_gain(V: np.ndarray, S: np.ndarray, theta0: np.ndarray, Q: np.ndarray, R: np.ndarray,
                 config: IRLQRConfig, K_prev: np.ndarray | None) -> GainUpdate:
    """The gain of a new epoch from the statistics (V, S) (IR-LQR's update, with the fallback and guard)."""
    t0 = time.perf_counter()
    n, m = Q.shape[0], R.shape[0]
    theta = ridge_estimate(V, S, config.lam, theta0)
    A_hat, B_hat = theta[:, :n], theta[:, n:]
    H = np.zeros((n + m, n + m))
    H[:n, :n], H[n:, n:] = Q, R
    w, U = np.linalg.eigh(V)  # one decomposition gives ||V||_2, V^{-1} and lambda_max(O)
    scale = config.g1 + config.g2 * np.sqrt(w[-1])
    O = scale * (U / w) @ U.T
    K = K_prev
    fallback = guarded = failed = False
    if scale / w[0] >= config.fallback_ratio * min(np.linalg.eigvalsh(Q)[0], np.linalg.eigvalsh(R)[0]):
        fallback = K_prev is not None       # (the very first gain has nothing to fall back on: plain LQR)
        Hopt = H
    else:
        Hopt = sym(H - O)
    if not fallback:
        try:
            K = dlqr_cross(A_hat, B_hat, Hopt[:n, :n], Hopt[n:, n:], Hopt[:n, n:])
            if K_prev is not None and not is_stabilising(A_hat, B_hat, K):
                raise ValueError("the Riccati gain does not stabilise the estimate")
        except (ValueError, np.linalg.LinAlgError):
            if K_prev is None:
                raise
            failed = True
    if (fallback or failed) and config.stability_guard and not is_stabilising(A_hat, B_hat, K_prev):
        try:  # the kept gain is unstable under the estimate: certainty equivalence instead (always well posed)
            K, guarded = dlqr_cross(A_hat, B_hat, Q, R), True
        except (ValueError, np.linalg.LinAlgError):
            pass  # the estimate is not stabilisable: nothing better to offer than the previous gain
    return GainUpdate(np.array(K, dtype=float), A_hat, B_hat, fallback, guarded, failed,
                      time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------------
# The learner: one transition at a time
# ------------------------------------------------------------------------------------------------------

class IRLQR:
    """Online IR-LQR. `observe(x, u, x_next)` adds a transition and says whether an epoch boundary is due;
    `update()` computes the new gain (call it off the control thread if you like: it reads a snapshot);
    `step(...)` does both. `gain()` is the gain to act with, u = -K x."""

    def __init__(self, A0: np.ndarray, B0: np.ndarray, Q: np.ndarray, R: np.ndarray, config: IRLQRConfig):
        self.config = config
        self.Q, self.R = np.asarray(Q, float), np.asarray(R, float)
        self.theta0 = np.hstack([A0, B0]).astype(float)
        n, d = self.theta0.shape
        self.V = config.lam * np.eye(d)
        self.S = np.zeros((n, d))
        self.steps = 0
        self.epoch = 0
        self.fallbacks = 0
        self.guarded = 0
        self.failures = 0
        self.update_seconds: list[float] = []
        self._logdet_last = float(np.linalg.slogdet(self.V)[1])
        self._log_factor = float(np.log(config.epoch_factor))
        self._K = self.compute(self.V, self.S, None).K

    def compute(self, V: np.ndarray, S: np.ndarray, K_prev: np.ndarray | None) -> GainUpdate:
        """The gain rule (IR-LQR's; the baselines of `lqr_baselines` override it). Pure in (V, S, K_prev)."""
        return compute_gain(V, S, self.theta0, self.Q, self.R, self.config, K_prev)

    def exploration_std(self, t: int) -> float:
        """Std of the noise added to the action at step t (IR-LQR injects none; CEC+PE overrides)."""
        return 0.0

    def gain(self) -> np.ndarray:
        return self._K

    def observe(self, x: np.ndarray, u: np.ndarray, x_next: np.ndarray) -> bool:
        """Add one transition; True when det V has grown by the epoch factor since the last update."""
        z = np.concatenate([x, u])
        self.V += np.outer(z, z)
        self.S += np.outer(x_next, z)
        self.steps += 1
        return self.update_due()

    def update_due(self) -> bool:
        return float(np.linalg.slogdet(self.V)[1]) > self._logdet_last + self._log_factor

    def update(self) -> GainUpdate:
        """Start a new epoch: recompute the gain from the current statistics and adopt it."""
        logdet = float(np.linalg.slogdet(self.V)[1])
        result = self.compute(self.V.copy(), self.S.copy(), self._K)
        self.adopt(result, logdet)
        return result

    def adopt(self, result: GainUpdate, logdet: float) -> None:
        """Take a gain computed (maybe elsewhere) from the statistics whose log det V was `logdet`."""
        self._K = result.K
        self._logdet_last = logdet
        self.epoch += 1
        self.fallbacks += result.fallback
        self.guarded += result.guarded
        self.failures += result.failed
        self.update_seconds.append(result.seconds)

    def step(self, x: np.ndarray, u: np.ndarray, x_next: np.ndarray) -> GainUpdate | None:
        """observe, then update when an epoch boundary is due; the update or None."""
        return self.update() if self.observe(x, u, x_next) else None

    def estimate(self) -> tuple[np.ndarray, np.ndarray]:
        """The current ridge estimate (A_hat, B_hat)."""
        theta = ridge_estimate(self.V, self.S, self.config.lam, self.theta0)
        n = self.Q.shape[0]
        return theta[:, :n], theta[:, n:]
