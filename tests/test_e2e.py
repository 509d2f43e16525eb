"""End to end: `vigil serve` and `vigil sim` as separate processes over loopback tcp, aircraft pitch under the
exported LQR bundle, judged against the optimal controller of the true system."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.linalg
from conftest import run_vigil

from vigil.sim.envs import LinearEnv
from vigil.sim.linear import aircraft_pitch, oracle, rollout_cost

STEPS = 200
EPISODES = 16


def expected_cost_and_sd(T: int) -> tuple[float, float, float]:
    """Mean and standard deviation of the T-step cost of u = -K* x from the system's x0, exactly.

    The closed loop is x_{t+1} = Acl x_t + w_t with w_t ~ N(0, s^2 I), so the stacked states X = (x_0..x_{T-1})
    are Gaussian, X = m + L W, and the cost X' Mb X (Mb = blockdiag(Q + K'RK)) has
        mean     m' Mb m + s^2 tr(L' Mb L)
        variance 2 s^4 tr((L' Mb L)^2) + 4 s^2 m' Mb L L' Mb m.
    Also returns E[x_T' P x_T], the boundary term in the identity E_T = x0'P x0 + T J* - E[x_T' P x_T]."""
    s = aircraft_pitch()
    K, _ = oracle(s)
    n, sig = s.n, s.noise_std
    Acl = s.A - s.B @ K
    M = s.Q + K.T @ s.R @ K
    powers = [np.eye(n)]
    for _ in range(T):
        powers.append(Acl @ powers[-1])
    L = np.zeros((n * T, n * T))
    m = np.zeros(n * T)
    for t in range(T):
        m[t * n:(t + 1) * n] = powers[t] @ s.x0
        for u in range(t):
            L[t * n:(t + 1) * n, u * n:(u + 1) * n] = powers[t - 1 - u]
    Mb = np.kron(np.eye(T), M)
    G = L.T @ Mb @ L
    mean = float(m @ Mb @ m + sig**2 * np.trace(G))
    var = float(2 * sig**4 * np.trace(G @ G) + 4 * sig**2 * m @ Mb @ L @ L.T @ Mb @ m)
    P = scipy.linalg.solve_discrete_are(s.A, s.B, s.Q, s.R)
    Sigma_T = sig**2 * sum(p @ p.T for p in powers[:T])
    mT = powers[T] @ s.x0
    boundary = float(mT @ P @ mT + np.trace(P @ Sigma_T))
    return mean, float(np.sqrt(var)), boundary


def test_lqr_episode_reaches_optimal_cost(serve, lqr_bundle, tmp_path):
    # A generous deadline: this test measures control quality; a scheduling hiccup on a loaded CI machine must
    # not turn into a safe action here (the deadline monitor has its own tests in test_faults.py).
    served = serve(lqr_bundle, deadline_ms=2000)
    summary_path = tmp_path / "summary.json"
    sim = run_vigil("sim", "--connect", served.robot_endpoint, "--system", "aircraft-pitch", "--steps", str(STEPS),
                    "--episodes", str(EPISODES), "--summary", str(summary_path))
    assert sim.returncode == 0, sim.stdout + sim.stderr
    episodes = json.loads(summary_path.read_text())
    assert len(episodes) == EPISODES

    system = aircraft_pitch()
    K, J = oracle(system)
    for i, ep in enumerate(episodes):
        assert ep["episode"] == i and ep["seed"] == i
        assert ep["steps"] == STEPS
        # every action came from the policy: no safe action by either side, no error reply
        assert ep["runtime_safe"] == 0 and ep["robot_safe"] == 0 and ep["errors"] == 0, ep
        assert ep["latency_us"]["n"] == STEPS
        assert ep["cost"] == -ep["reward"]
        # the summary's references are what they claim to be: recompute them here from scipy
        env = LinearEnv(system, STEPS)
        env.reset(seed=ep["seed"])
        assert np.isclose(ep["oracle_cost"], rollout_cost(system, K, env.noise), rtol=1e-12)
        assert np.isclose(ep["optimal_cost"], STEPS * J, rtol=1e-12)
        # Same noise, same x0: the only difference from the oracle is float32 arithmetic. The observation is the
        # state rounded to float32 and the graph computes K x in float32, so each action is off by at most ~1e-6
        # of |K||x|; the closed loop is stable (spectral radius 0.993), so a per-step error is amplified at most
        # 1/(1 - 0.993) ~ 140 times in the state. 2 x 140 x 1e-6 < 3e-4 relative in the quadratic cost; 1e-3
        # leaves room, and is still far below anything a wrong gain, a dropped action or a safe action would
        # cause (one zero action costs more than 1% here).
        assert abs(ep["cost"] - ep["oracle_cost"]) <= 1e-3 * ep["oracle_cost"], ep

    # T*J* is the stationary cost; from a fixed x0 and zero initial covariance the expected 200-step cost is
    # smaller by known boundary terms (exact identity for the optimal closed loop):
    #     E_T = x0' P x0 + T J* - E[x_T' P x_T].
    # The slowest closed-loop pole is 0.993 (time constant ~140 steps), so one episode's cost has a standard
    # deviation of ~36 % of its mean: the comparison is statistical, over the mean of EPISODES independent
    # episodes (seeds 0..15), within 4 standard deviations of that mean (Chebyshev: <= 6.25 % for any
    # distribution; far less for this near-Gaussian sum). This catches a cost off by a factor (noise scale,
    # units, a wrong Q or R) that the same-noise comparison above cannot, since both sides share the sim.
    mean, sd, boundary = expected_cost_and_sd(STEPS)
    P = scipy.linalg.solve_discrete_are(system.A, system.B, system.Q, system.R)
    t_jstar = episodes[0]["optimal_cost"]
    assert np.isclose(mean, system.x0 @ P @ system.x0 + t_jstar - boundary, rtol=1e-9)
    costs = np.array([ep["cost"] for ep in episodes])
    assert abs(costs.mean() - mean) <= 4 * sd / np.sqrt(EPISODES), (costs.mean(), mean, sd)


# -- a MuJoCo environment (gymnasium) through the same runtime ------------------------------------------------

PENDULUM = "InvertedPendulum-v5"
# torch's legacy (TorchScript) ONNX exporter, used by vigil.training.export, announces its own deprecation
TORCH_EXPORT_WARNINGS = [pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript"),
                         pytest.mark.filterwarnings("ignore:The feature will be removed")]


@pytest.fixture(scope="module")
def pendulum_policy(bundles_dir):
    """A small random torch MLP exported as a gaussian bundle, with observation normalisation, scaled so that it
    often asks for more than the actuator's [-3, 3]."""
    import torch

    from vigil.training.export import export_gaussian

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    with torch.no_grad():
        net[2].weight.mul_(50.0)
    mean, std = np.array([0.0, 0.0, 0.0, 0.0]), np.array([0.5, 0.1, 2.0, 2.0])
    folder = bundles_dir / "pendulum-mlp"
    export_gaussian(folder, "pendulum-mlp", net, 4, [-3.0], [3.0], 25.0, obs_mean=mean, obs_std=std)

    def reference(x: np.ndarray) -> np.ndarray:
        """What the runtime must send: the clipped mean action of the torch actor on the normalised observation."""
        xn = np.clip((x.astype(np.float32) - mean.astype(np.float32)) / std.astype(np.float32), -10, 10)
        with torch.no_grad():
            u = net(torch.from_numpy(xn[None].astype(np.float32))).numpy()[0]
        return np.clip(u, -3.0, 3.0)

    return folder, reference


@TORCH_EXPORT_WARNINGS[0]
@TORCH_EXPORT_WARNINGS[1]
def test_mujoco_env_lockstep_actions_match_the_torch_policy(serve, pendulum_policy, links):
    from vigil.runtime.client import RobotLink
    from vigil.sim.envs import make_env

    bundle, reference = pendulum_policy
    served = serve(bundle, deadline_ms=5000)
    env = make_env(PENDULUM)
    link = RobotLink(served.robot_endpoint, "pendulum")
    try:
        link.hello(env.observation_spec, env.action_spec, env=env.name)
        low, high = np.asarray(env.action_spec.low, np.float32), np.asarray(env.action_spec.high, np.float32)
        obs, clipped, resets = env.reset(seed=0), 0, 0
        for t in range(40):
            reply = link.act(obs)
            assert reply.kind == "act" and reply.meta["safe"] is False, reply.meta
            a = reply.arrays["action"]
            assert a.shape == (1,) and np.all(low <= a) and np.all(a <= high)
            expected = reference(obs["state"])
            np.testing.assert_allclose(a, expected, rtol=1e-4, atol=1e-5)
            clipped += bool(np.isin(a, [-3.0, 3.0]).any())
            result = env.step(a)
            assert np.isfinite(result.reward) and np.isfinite(result.obs["state"]).all()
            obs = result.obs
            if result.terminated or result.truncated:
                resets += 1
                link.reset()
                obs = env.reset(seed=t + 1)
        assert clipped > 0  # the bounds were exercised, not only respected
    finally:
        link.close()
        env.close()


@TORCH_EXPORT_WARNINGS[0]
@TORCH_EXPORT_WARNINGS[1]
def test_mujoco_env_through_vigil_sim(serve, pendulum_policy, tmp_path):
    bundle, _ = pendulum_policy
    served = serve(bundle, deadline_ms=5000)
    summary = tmp_path / "pendulum.json"
    sim = run_vigil("sim", "--connect", served.robot_endpoint, "--system", PENDULUM, "--steps", "30",
                    "--episodes", "2", "--summary", str(summary))
    assert sim.returncode == 0, sim.stdout + sim.stderr
    episodes = json.loads(summary.read_text())
    assert len(episodes) == 2
    for ep in episodes:
        assert 1 <= ep["steps"] <= 30 and np.isfinite(ep["reward"]) and ep["reward"] > 0
        assert ep["errors"] == 0 and ep["robot_safe"] == 0 and ep["runtime_safe"] == 0
        assert ep["oracle_cost"] is None  # no oracle for a nonlinear MuJoCo system
    counters = served.stop()
    assert counters["ticks"] == sum(ep["steps"] for ep in episodes)
