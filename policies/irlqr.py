"""IR-LQR: optimistic online LQR by intrinsic rewards -- the one implementation, numpy only.

The method: docs/algorithms.md#ir-lqr-optimistic-online-lqr-by-intrinsic-rewards.

The runtime runs it on board (runtime/learning.py) and the offline study re-exports it
(`vigil.training.irlqr`), so the controller that is studied is the controller that flies. This module
imports numpy and the standard library only (the onboard rule: no scipy, no python-control); the Riccati
equation with a cross term is solved here by a structure-preserving doubling iteration, and the tests hold
it against python-control on random systems.

The system x' = A x + B u + w is unknown; the learner starts from a prior (A0, B0) and acts with a linear
gain, u = -K x (the sign convention of `vigil.sim.linear` and of `linear_gain` bundles; the method is often
written with u = K x). With z = [x; u] it keeps

    V_t = lam I + sum z z^T,     S_t = sum x_next z^T,     [A_hat B_hat] = (lam [A0 B0] + S_t) V_t^{-1}

(ridge regression centred on the prior), and recomputes the gain only at the start of a new epoch, when
det V_t > 2 det V at the last update (log-det doubling). The gain of an epoch is the LQR of the estimate
under an *optimistic* stage cost

    H = blkdiag(Q, R),   O = (g1 + g2 sqrt(||V_t||_2)) V_t^{-1},   H_opt = sym(H - O),

i.e. the cost of a state-action pair is lowered by its epistemic variance z^T V^{-1} z (the intrinsic
reward). O has off-diagonal blocks, so the Riccati equation carries a cross term N = H_opt[x, u]
(`dlqr_cross(A, B, Q, R, N)`).

Fallback (published): when lambda_max(O) >= 0.95 lambda_min(H) (H_opt would no longer be safely positive
definite) keep the previous gain and count a fallback. Guard (ours, docs/decisions.md 72): the published
rule fired exactly when the state blew up (V then grows in a few directions, ||V|| is huge) and froze a
destabilising gain. So a fallback keeps the previous gain only when the current estimate says it is
stabilising (spectral radius of A_hat - B_hat K below 1); otherwise the gain becomes the certainty-
equivalent LQR of the current estimate (H unmodified, which is always well posed), and the event is counted
as a guarded fallback.

The learner is driven one transition at a time (`observe`), its gain recomputation is a pure function of
a snapshot of its statistics (`compute_gain`), so a runtime can run it off the control thread and `adopt`
the new gain between ticks.

`LearnerSpec` is the `learner` block of a `linear_gain` manifest (docs/bundles.md): the prior, the cost and
the settings, validated with errors that name the key.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------------------------------
# Hyperparameters
# ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class IRLQRConfig:
    """IR-LQR's settings. Defaults are the UAV's published ones
    (docs/algorithms.md#ir-lqr-optimistic-online-lqr-by-intrinsic-rewards)."""

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


# ------------------------------------------------------------------------------------------------------
# Pieces: estimate, Riccati with cross term, optimism, stability
# ------------------------------------------------------------------------------------------------------

def ridge_estimate(V: np.ndarray, S: np.ndarray, lam: float, theta0: np.ndarray) -> np.ndarray:
    """[A_hat B_hat] = (lam theta0 + S) V^{-1}, theta0 = [A0 B0] (n, n+m). V is symmetric positive definite."""
    return np.linalg.solve(V, (lam * theta0 + S).T).T


def sym(M: np.ndarray) -> np.ndarray:
    return 0.5 * (M + M.T)


def dare(A: np.ndarray, B: np.ndarray, Q: np.ndarray, R: np.ndarray, tol: float = 1e-13,
         max_iter: int = 200) -> np.ndarray:
    """Stabilising solution P of P = A'PA - A'PB (R + B'PB)^{-1} B'PA + Q (no cross term), by the
    structure-preserving doubling algorithm (Chu, Fan & Lin 2005):

        A_0 = A, G_0 = B R^{-1} B', H_0 = Q;   W = I + G_k H_k
        A_{k+1} = A_k W^{-1} A_k,  G_{k+1} = G_k + A_k W^{-1} G_k A_k',  H_{k+1} = H_k + A_k' H_k W^{-1} A_k

    H_k -> P quadratically (the k-th iterate has seen 2^k steps of the Riccati recursion). Raises
    ValueError when the iteration does not converge to a finite solution (no stabilising solution)."""
    n = A.shape[0]
    I = np.eye(n)
    G = sym(B @ np.linalg.solve(R, B.T))
    Ak, Hk = np.array(A, dtype=float), sym(np.asarray(Q, dtype=float))
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging iteration is reported below, not warned about
        return _doubling(Ak, G, Hk, I, n, tol, max_iter)


def _doubling(Ak: np.ndarray, G: np.ndarray, Hk: np.ndarray, I: np.ndarray, n: int, tol: float,
              max_iter: int) -> np.ndarray:
    for _ in range(max_iter):
        W = I + G @ Hk
        X = np.linalg.solve(W, np.hstack([Ak, G]))     # W^{-1} [A_k, G_k]
        WA, WG = X[:, :n], X[:, n:]
        H_next = sym(Hk + Ak.T @ Hk @ WA)
        G = sym(G + Ak @ WG @ Ak.T)
        Ak = Ak @ WA
        if not (np.all(np.isfinite(H_next)) and np.all(np.isfinite(Ak)) and np.all(np.isfinite(G))):
            raise ValueError("the Riccati iteration diverged: no stabilising solution")
        done = np.abs(H_next - Hk).max() <= tol * max(1.0, np.abs(H_next).max())
        Hk = H_next
        if done:
            return Hk
    raise ValueError(f"the Riccati iteration did not converge in {max_iter} doublings")


def dlqr_cross(A: np.ndarray, B: np.ndarray, Q: np.ndarray, R: np.ndarray,
               N: np.ndarray | None = None) -> np.ndarray:
    """Gain K (u = -K x) minimising sum x'Qx + u'Ru + 2 x'Nu on x' = A x + B u.

    The cross term is eliminated by u = v - R^{-1} N' x, which leaves the problem (A - B R^{-1} N', B,
    Q - N R^{-1} N', R) without one; its DARE is solved by doubling (`dare`) and the gain mapped back,
    K = (R + B'PB)^{-1} B'P A~ + R^{-1} N'. Raises ValueError (or numpy's LinAlgError) when the Riccati
    equation has no stabilising solution, as python-control's `dlqr` does."""
    A, B, Q, R = (np.asarray(M, dtype=float) for M in (A, B, Q, R))
    np.linalg.cholesky(sym(R))  # R must be positive definite (raises LinAlgError otherwise)
    if N is None:
        At, Qt, Rinv_Nt = A, Q, None
    else:
        Rinv_Nt = np.linalg.solve(R, np.asarray(N, dtype=float).T)
        At, Qt = A - B @ Rinv_Nt, Q - np.asarray(N, dtype=float) @ Rinv_Nt
    P = dare(At, B, Qt, R)
    K = np.linalg.solve(R + B.T @ P @ B, B.T @ P @ At)
    if Rinv_Nt is not None:
        K = K + Rinv_Nt
    if not np.all(np.isfinite(K)):
        raise ValueError("non-finite LQR gain")
    if spectral_radius(A - B @ K) >= 1.0:
        raise ValueError("the Riccati solution is not stabilising")
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
    `update()` computes the new gain and adopts it; `step(...)` does both. A host that computes off the
    control thread takes `snapshot()`, runs `compute(*snapshot[:3])` elsewhere and `adopt`s the result.
    `gain()` is the gain to act with, u = -K x."""

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

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(V, S, K_prev, log det V): copies, so `compute` can run on them elsewhere while `observe` goes on."""
        return self.V.copy(), self.S.copy(), self._K, float(np.linalg.slogdet(self.V)[1])

    def update(self) -> GainUpdate:
        """Start a new epoch: recompute the gain from the current statistics and adopt it."""
        V, S, K_prev, logdet = self.snapshot()
        result = self.compute(V, S, K_prev)
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


# ------------------------------------------------------------------------------------------------------
# The manifest's `learner` block
# ------------------------------------------------------------------------------------------------------

LEARNER_KINDS = ("irlqr",)
_SETTINGS = {  # key -> (default, check, what is expected)
    "lam": (None, lambda v: _number(v) and v > 0, "a number > 0"),
    "g1": (None, lambda v: _number(v) and v >= 0, "a number >= 0"),
    "g2": (None, lambda v: _number(v) and v >= 0, "a number >= 0"),
    "fallback_ratio": (0.95, lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "epoch_factor": (2.0, lambda v: _number(v) and v > 1, "a number > 1"),
    "stability_guard": (True, lambda v: isinstance(v, bool), "true or false"),
}
_MATRICES = ("A0", "B0", "Q", "R")


class LearnerError(ValueError):
    """A `learner` block that cannot be used; the message names the key (e.g. `learner.B0`)."""


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class LearnerSpec:
    """The `learner` block of a `linear_gain` manifest: {kind: "irlqr", A0, B0, Q, R, lam, g1, g2,
    fallback_ratio?, epoch_factor?, stability_guard?}. Matrices are lists of rows."""

    kind: str
    A0: np.ndarray
    B0: np.ndarray
    Q: np.ndarray
    R: np.ndarray
    config: IRLQRConfig

    @classmethod
    def from_dict(cls, d: Any, n: int, m: int) -> LearnerSpec:
        """Validate a block for a policy with n states and m actions. Raises LearnerError naming the key."""
        if not isinstance(d, Mapping):
            raise LearnerError("manifest key 'learner' must be a map {kind, A0, B0, Q, R, lam, g1, g2, ...}, "
                               f"got {d!r}")
        kind = d.get("kind")
        if kind not in LEARNER_KINDS:
            raise LearnerError(f"manifest key 'learner.kind' must be one of {LEARNER_KINDS}, got {kind!r}")
        unknown = sorted(set(d) - {"kind", *_MATRICES, *_SETTINGS})
        if unknown:
            raise LearnerError(f"manifest key 'learner.{unknown[0]}' is not a learner setting (known: kind, "
                               f"{', '.join(_MATRICES)}, {', '.join(_SETTINGS)})")
        shapes = {"A0": (n, n), "B0": (n, m), "Q": (n, n), "R": (m, m)}
        mats = {key: _matrix(d, key, shape) for key, shape in shapes.items()}
        for key in ("Q", "R"):
            M = mats[key]
            if not np.allclose(M, M.T, rtol=1e-9, atol=1e-12):
                raise LearnerError(f"manifest key 'learner.{key}' must be symmetric")
            low = float(np.linalg.eigvalsh(M)[0])
            if low <= 0:
                raise LearnerError(f"manifest key 'learner.{key}' must be positive definite "
                                   f"(smallest eigenvalue {low:.3g})")
        settings = {}
        for key, (default, check, what) in _SETTINGS.items():
            if key not in d:
                if default is None:
                    raise LearnerError(f"manifest key 'learner.{key}' is missing; expected {what}")
                settings[key] = default
                continue
            if not check(d[key]):
                raise LearnerError(f"manifest key 'learner.{key}' must be {what}, got {d[key]!r}")
            settings[key] = d[key]
        config = IRLQRConfig(lam=float(settings["lam"]), g1=float(settings["g1"]), g2=float(settings["g2"]),
                             fallback_ratio=float(settings["fallback_ratio"]),
                             epoch_factor=float(settings["epoch_factor"]),
                             stability_guard=bool(settings["stability_guard"]))
        spec = cls(kind, mats["A0"], mats["B0"], mats["Q"], mats["R"], config)
        try:
            spec.learner()
        except (ValueError, np.linalg.LinAlgError) as exc:
            raise LearnerError(f"manifest key 'learner': the prior (A0, B0) has no LQR gain under (Q, R): "
                               f"{exc}") from None
        return spec

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {"kind": self.kind, "A0": self.A0.tolist(), "B0": self.B0.tolist(), "Q": self.Q.tolist(),
                "R": self.R.tolist(), "lam": c.lam, "g1": c.g1, "g2": c.g2, "fallback_ratio": c.fallback_ratio,
                "epoch_factor": c.epoch_factor, "stability_guard": c.stability_guard}

    def learner(self) -> IRLQR:
        """A fresh learner (no data yet; its gain is the LQR of the prior)."""
        return IRLQR(self.A0, self.B0, self.Q, self.R, self.config)


def _matrix(d: Mapping[str, Any], key: str, shape: tuple[int, int]) -> np.ndarray:
    what = f"a {shape[0]} x {shape[1]} matrix (a list of {shape[0]} rows of {shape[1]} finite numbers)"
    if key not in d:
        raise LearnerError(f"manifest key 'learner.{key}' is missing; expected {what}")
    rows = d[key]
    if (not isinstance(rows, list) or len(rows) != shape[0]
            or not all(isinstance(r, list) and len(r) == shape[1] and all(_number(v) for v in r) for r in rows)):
        raise LearnerError(f"manifest key 'learner.{key}' must be {what}, got {rows!r}"[:400])
    return np.asarray(rows, dtype=float)
