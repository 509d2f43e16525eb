"""Issue 7, deliverable 3: an actor trained by training/rl.py, exported the way `vigil train` exports it, plays
the same on a simulated robot over the wire as it does in process."""

from __future__ import annotations

from dataclasses import asdict

import pytest

pytest.importorskip("torch")
pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from vigil.runtime.client import RobotLink  # noqa: E402
from vigil.sim.envs import GymEnv  # noqa: E402
from vigil.sim.robot import SimConfig, run_episodes  # noqa: E402
from vigil.training.export import provenance  # noqa: E402
from vigil.training.rl import RLConfig, export_actor, train  # noqa: E402

ENV, SEED, EPISODES, MAX_STEPS = "Hopper-v5", 5, 3, 1000


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def play_in_process(bundle, seeds: list[int]) -> list[tuple[float, int]]:
    """The bundle's deterministic action (the Gaussian's mean) through onnxruntime and the runtime's own Agent
    (which clips to the action box), on GymEnv, reset with the same seeds run_episodes uses (cfg.seed + episode)."""
    from vigil.policies.agent import Agent
    from vigil.policies.bundle import load_policy

    agent = Agent(load_policy(bundle, prefer_gpu=False))
    env = GymEnv(ENV)
    out = []
    try:
        for seed in seeds:
            obs, ret, steps, done = env.reset(seed=seed), 0.0, 0, False
            while steps < MAX_STEPS and not done:
                r = env.step(agent.act(obs).action)
                obs, ret, steps, done = r.obs, ret + r.reward, steps + 1, r.terminated or r.truncated
            out.append((ret, steps))
    finally:
        env.close()
    return out


def test_trained_hopper_bundle_plays_the_same_served_as_in_process(tmp_path, serve):
    """Train BPO on Hopper-v5 for 8192 steps, export with rl.export_actor (what `vigil train` calls), play 3
    episodes in process through onnxruntime and 3 over real ZeroMQ (`vigil serve` + run_episodes, lockstep)
    from the same seeds. The actions are the deterministic mean and both sides run the same graph on the same
    float32 observations (GymEnv casts them before either side normalises), so the trajectories are the same;
    the returns are compared at rel 1e-4 only to allow float rounding if the two onnxruntime sessions ever
    differ (measured: identical). No action may be the safe one: neither the runtime's nor the robot's."""
    cfg = RLConfig(loss="bpo", env=ENV, total_steps=8192, rollout_steps=2048, num_envs=1, epochs=4, seed=SEED)
    result = train(cfg)
    prov = provenance(algorithm=cfg.loss, env=cfg.env, steps=int(result.history[-1]["steps"]), seed=cfg.seed,
                      config=asdict(cfg))
    bundle = tmp_path / "bundle"
    export_actor(bundle, result, cfg, prov)

    seeds = [100 + ep for ep in range(EPISODES)]
    local = play_in_process(bundle, seeds)

    served = serve(bundle, deadline_ms=5000)
    env = GymEnv(ENV)
    try:
        stats = run_episodes(env, SimConfig(endpoint=served.robot_endpoint, robot="hopper-0", episodes=EPISODES,
                                            steps=MAX_STEPS, seed=100, mode="lockstep", act_timeout_s=5.0))
    finally:
        env.close()
    link = RobotLink(served.robot_endpoint, "observer")
    try:
        hello = link.hello(env.observation_spec, env.action_spec, env=ENV)
    finally:
        link.bye()
        link.close()

    wire = [(s.reward, s.steps) for s in stats]
    print(f"\nin process: {local}\nover the wire: {wire}")
    assert [s.seed for s in stats] == seeds
    for (r_local, n_local), s in zip(local, stats):
        assert s.steps == n_local
        assert s.reward == pytest.approx(r_local, rel=1e-4)
        assert s.robot_safe == 0 and s.runtime_safe == 0 and s.errors == 0
    # the episodes differ from one another: the seeds reach the environment
    assert len({round(r, 6) for r, _ in local}) == EPISODES
    p = hello.manifest["provenance"]
    assert (p["algorithm"], p["env"], p["seed"], p["steps"]) == ("bpo", ENV, SEED, 8192)
