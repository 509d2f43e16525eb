"""IR-LQR (training/irlqr.py), its baselines and the study: estimator, Riccati with cross term, epochs,
fallback and its stability guard, a short run against certainty equivalence, `vigil train lqr`."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
from conftest import run_vigil

from vigil.sim.linear import aircraft_pitch, oracle, uav_2d
from vigil.training.irlqr import (
    IRLQR,
    IRLQRConfig,
    compute_gain,
    dlqr_cross,
    is_stabilising,
    optimism,
    ridge_estimate,
    spectral_radius,
)
from vigil.training.lqr_baselines import CEC, OSLO, Oracle, oslo_gain
from vigil.training.lqr_study import draw_prior, published, run_study, summarize


def random_system(rng: np.random.Generator, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    A = rng.standard_normal((n, n))
    A *= 1.1 / spectral_radius(A)  # open-loop unstable, so the Riccati solution matters
    return A, rng.standard_normal((n, m))


# -- estimator -----------------------------------------------------------------------------------------

def test_ridge_estimate_recovers_a_known_system():
    rng = np.random.default_rng(1)
    A, B = random_system(rng, 3, 2)
    A *= 0.8  # stable, so an excited rollout stays bounded
    learner = IRLQR(np.zeros((3, 3)), np.zeros((3, 2)), np.eye(3), np.eye(2), IRLQRConfig(lam=1.0, g1=0, g2=0))
    x = np.zeros(3)
    for _ in range(3000):
        u = rng.standard_normal(2)
        x_next = A @ x + B @ u + 0.05 * rng.standard_normal(3)
        learner.observe(x, u, x_next)
        x = x_next
    A_hat, B_hat = learner.estimate()
    assert np.abs(A_hat - A).max() < 0.02 and np.abs(B_hat - B).max() < 0.02


def test_ridge_estimate_without_data_is_the_prior():
    theta0 = np.arange(6.0).reshape(2, 3)
    assert np.allclose(ridge_estimate(7.0 * np.eye(3), np.zeros((2, 3)), 7.0, theta0), theta0)


# -- Riccati with cross term ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(8))
def test_riccati_with_cross_term_matches_the_transformed_problem(seed):
    """x'Qx + u'Ru + 2x'Nu: substitute u = v - R^{-1} N' x, which leaves Q - N R^{-1} N' and A - B R^{-1} N'
    without a cross term; solve that with scipy's DARE and map the gain back."""
    rng = np.random.default_rng(seed)
    n, m = int(rng.integers(2, 5)), int(rng.integers(1, 3))
    A, B = random_system(rng, n, m)
    M = rng.standard_normal((n + m, n + m))
    H = M @ M.T + 0.5 * np.eye(n + m)  # positive definite joint cost with off-diagonal blocks
    Q, R, N = H[:n, :n], H[n:, n:], H[:n, n:]
    K = dlqr_cross(A, B, Q, R, N)
    Rinv_Nt = np.linalg.solve(R, N.T)
    At, Qt = A - B @ Rinv_Nt, Q - N @ Rinv_Nt
    P = scipy.linalg.solve_discrete_are(At, B, Qt, R)
    K_ref = np.linalg.solve(R + B.T @ P @ B, B.T @ P @ At) + Rinv_Nt
    assert np.allclose(K, K_ref, rtol=1e-6, atol=1e-8)
    assert is_stabilising(A, B, K)


def test_riccati_without_cross_term_is_the_oracle():
    for system in (aircraft_pitch(), uav_2d()):
        assert np.allclose(dlqr_cross(system.A, system.B, system.Q, system.R), oracle(system)[0], rtol=1e-6)


# -- epochs ---------------------------------------------------------------------------------------------

def test_epoch_rule_fires_on_determinant_doubling():
    # n = m = 1, lam = 1: z = (a, 0) multiplies det V by 1 + a^2.
    learner = IRLQR(np.array([[0.5]]), np.array([[1.0]]), np.eye(1), np.eye(1), IRLQRConfig(lam=1.0, g1=0, g2=0))
    assert learner.epoch == 0
    assert not learner.observe(np.array([np.sqrt(0.99)]), np.zeros(1), np.zeros(1))  # det 1.99
    assert learner.observe(np.array([0.2]), np.zeros(1), np.zeros(1))                 # det 2.03 > 2 * 1
    learner.update()
    assert learner.epoch == 1
    assert not learner.update_due()                       # the reference is now det 2.03
    assert not learner.observe(np.zeros(1), np.array([0.99]), np.zeros(1))   # det 2.03 * 1.98 < 4.06
    assert learner.observe(np.zeros(1), np.array([0.2]), np.zeros(1))        # det 2.03 * 2.02 > 4.06
    assert learner.step(np.zeros(1), np.zeros(1), np.zeros(1)) is not None   # step updates when due
    assert learner.epoch == 2 and len(learner.update_seconds) == 2


def test_optimism_lowers_the_cost_and_changes_the_gain():
    system = uav_2d()
    V = 5.0 * np.eye(6)
    S = np.zeros((4, 6))
    theta0 = np.hstack([system.A, system.B])
    ce = compute_gain(V, S, theta0, system.Q, system.R, IRLQRConfig(lam=5.0, g1=0, g2=0), None)
    opt = compute_gain(V, S, theta0, system.Q, system.R, IRLQRConfig(lam=5.0, g1=0.3, g2=0), None)
    assert np.allclose(ce.K, oracle(system)[0], rtol=1e-6)
    assert not np.allclose(opt.K, ce.K, rtol=1e-3)
    assert np.allclose(optimism(V, 0.3, 0.0), 0.06 * np.eye(6))


# -- fallback and guard ---------------------------------------------------------------------------------

def fallback_case(K_prev: np.ndarray, guard: bool = True):
    system = uav_2d()
    V = 5.0 * np.eye(6)
    S = np.zeros((4, 6))
    theta0 = np.hstack([system.A, system.B])
    cfg = IRLQRConfig(lam=5.0, g1=10.0, g2=0.0, stability_guard=guard)  # lambda_max(O) = 2 >= 0.95 * 0.1
    return system, compute_gain(V, S, theta0, system.Q, system.R, cfg, K_prev)


def test_fallback_keeps_a_stabilising_previous_gain():
    system = uav_2d()
    K_prev = 0.8 * oracle(system)[0]
    assert is_stabilising(system.A, system.B, K_prev)
    _, up = fallback_case(K_prev)
    assert up.fallback and not up.guarded and np.array_equal(up.K, K_prev)


def test_fallback_never_keeps_a_gain_the_estimate_says_is_unstable():
    system = uav_2d()
    K_prev = -0.5 * oracle(system)[0]  # pushes the wrong way
    assert not is_stabilising(system.A, system.B, K_prev)
    _, up = fallback_case(K_prev)
    assert up.fallback and up.guarded
    assert is_stabilising(up.A_hat, up.B_hat, up.K)
    assert np.allclose(up.K, oracle(system)[0], rtol=1e-6)  # the estimate is the truth here: CE = oracle
    _, unguarded = fallback_case(K_prev, guard=False)      # the published rule alone freezes it
    assert unguarded.fallback and not unguarded.guarded and np.array_equal(unguarded.K, K_prev)


def test_learner_counts_fallbacks_and_guards():
    system = uav_2d()
    learner = IRLQR(system.A, system.B, system.Q, system.R, IRLQRConfig(lam=5.0, g1=10.0, g2=0.0))
    assert np.allclose(learner.gain(), oracle(system)[0], rtol=1e-6)  # no previous gain: plain LQR
    learner._K = -0.5 * learner.gain()
    learner.update()
    assert learner.fallbacks == 1 and learner.guarded == 1 and is_stabilising(system.A, system.B, learner.gain())


# -- baselines, priors ------------------------------------------------------------------------------------

def test_oslo_without_optimism_is_the_lqr():
    system = uav_2d()
    theta = np.hstack([system.A, system.B])
    K = oslo_gain(theta, 1e6 * np.eye(6), system.Q, system.R, mu=1e-9)
    assert K is not None and np.allclose(K, oracle(system)[0], rtol=1e-3, atol=1e-4)


def test_baselines_and_oracle_start_from_their_gains():
    system = uav_2d()
    cfg = IRLQRConfig(lam=5.0)
    assert np.allclose(CEC(system.A, system.B, system.Q, system.R, cfg).gain(), oracle(system)[0], rtol=1e-6)
    o = Oracle(system.A, system.B, system.Q, system.R, cfg)
    assert not o.observe(np.ones(4), np.ones(2), np.ones(4)) and np.allclose(o.gain(), oracle(system)[0])
    assert OSLO(system.A, system.B, system.Q, system.R, cfg, noise_std=0.2).mu == pytest.approx(0.01 * 0.04)


def test_relative_prior_keeps_structural_zeros_and_scales_with_the_entry():
    system = aircraft_pitch()
    A0, B0 = draw_prior(system, 0.01, True, np.random.default_rng(0))
    assert np.all(A0[system.A == 0] == 0) and np.all(np.abs(B0 / system.B - 1) < 0.05)
    A0, B0 = draw_prior(system, 0.01, False, np.random.default_rng(0))
    assert np.abs(B0 - system.B).max() > 0.002  # absolute: on the scale of B itself


# -- a short study ----------------------------------------------------------------------------------------

def test_short_irlqr_run_on_uav_is_comparable_to_cec_and_never_diverges():
    result = run_study(published("uav-2d", trials=6, steps=200, methods=("ir-lqr", "cec", "oracle")))
    rows = {r["method"]: r for r in summarize(result)}
    assert rows["ir-lqr"]["diverged"] == 0 and rows["cec"]["diverged"] == 0
    ir, ce = result.final_regret("ir-lqr", crn=True), result.final_regret("cec", crn=True)
    assert abs(ir.mean() - ce.mean()) <= 0.1 * abs(ce.mean()) + 1.0
    assert rows["oracle"]["regret_crn_mean"] == 0.0
    assert np.all(np.isfinite(result.methods["ir-lqr"].costs))


def test_vigil_train_lqr_documents_every_option_and_runs():
    r = run_vigil("train", "lqr", "--help")
    assert r.returncode == 0, r.stderr
    for option in ("--system", "--trials", "--steps", "--seed", "--out", "--lam", "--g1", "--g2", "--prior-std",
                   "--prior", "--methods", "--no-guard", "--no-progress"):
        assert option in r.stdout
    r = run_vigil("train", "lqr", "--system", "uav-2d", "--trials", "2", "--steps", "30", "--methods",
                  "ir-lqr,cec", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "ir-lqr" in r.stdout and "J* =" in r.stdout
    r = run_vigil("train", "lqr", "--methods", "nonsense", "--no-progress")
    assert r.returncode == 2 and "unknown method" in r.stderr
