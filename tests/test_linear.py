"""sim/linear.py and its environment (sim/envs.py LinearEnv): exact discretisation, and episodes that replay
their noise and cost what the closed-loop rollout costs."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.signal

from vigil.sim.envs import LinearEnv, make_env
from vigil.sim.linear import SYSTEMS, oracle, rollout_cost, stage_cost, zero_order_hold
from vigil.wire.protocol import ArraySpec


def test_zero_order_hold_matches_scipy():
    Ac, Bc = np.array([[0.0, 1.0], [-2.0, -0.3]]), np.array([[0.0], [1.0]])
    A, B = zero_order_hold(Ac, Bc, 0.1)
    Ad, Bd, *_ = scipy.signal.cont2discrete((Ac, Bc, np.eye(2), np.zeros((2, 1))), 0.1, method="zoh")
    np.testing.assert_allclose(A, Ad, rtol=1e-12)
    np.testing.assert_allclose(B, Bd, rtol=1e-12)


def test_linear_env_replays_noise_and_matches_rollout_cost():
    system = SYSTEMS["aircraft-pitch"]()
    env = make_env("aircraft-pitch", horizon=30)
    assert isinstance(env, LinearEnv) and env.control_rate_hz == 20.0
    assert env.observation_spec == (ArraySpec("state", "float32", (3,)),)
    K, _ = oracle(system)
    obs = env.reset(seed=5)
    noise = env.noise.copy()
    assert obs["state"].dtype == np.float32
    np.testing.assert_array_equal(obs["state"], system.x0.astype(np.float32))
    total, x = 0.0, system.x0.copy()
    for t in range(30):
        u = -K @ x
        r = env.step(u)
        assert r.info["cost"] == pytest.approx(stage_cost(system, x, u)) and r.reward == -r.info["cost"]
        total += r.info["cost"]
        x = system.A @ x + system.B @ u + noise[t]
        np.testing.assert_allclose(r.obs["state"], x.astype(np.float32))
        assert r.truncated == (t == 29)
    assert total == pytest.approx(rollout_cost(system, K, noise), rel=1e-12)
    env.reset(seed=5)
    np.testing.assert_array_equal(env.noise, noise)  # same seed, same disturbances
    env.reset(seed=6)
    assert not np.array_equal(env.noise, noise)
    assert np.std(noise) == pytest.approx(system.noise_std, rel=0.3)
