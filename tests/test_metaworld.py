"""Meta-World tasks as vigil environments: specs, seeded variants, the episode-end rule, the scripted experts,
the camera, make_env, and `vigil sim --system reach-v3` against a real runtime. Real Meta-World, real MuJoCo,
real off-screen rendering (EGL)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("metaworld")

from conftest import graph_bundle, run_vigil  # noqa: E402

from vigil.sim.envs import LinearEnv, make_env  # noqa: E402
from vigil.sim.metaworld_env import HELDOUT_INSTRUCTIONS, INSTRUCTIONS, MT10_TASKS, MetaWorldEnv, variants  # noqa: E402


@pytest.fixture(scope="module")
def reach():
    env = MetaWorldEnv("reach-v3")
    yield env
    env.close()


def run_expert(env: MetaWorldEnv, seed: int):
    obs = env.reset(seed=seed)
    first_success, t = None, 0
    while True:
        r = env.step(env.expert_action(obs["state"]))
        obs = r.obs
        if r.info["success"] == 1.0 and first_success is None:
            first_success = t
        t += 1
        if r.terminated or r.truncated:
            return r, t, first_success


def test_task_lists_match_the_installed_metaworld():
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS, MT10_V3
    from metaworld.policies import ENV_POLICY_MAP

    assert list(MT10_TASKS) == list(MT10_V3)  # what metaworld.MT10(seed=0).train_classes holds, in its order
    assert set(INSTRUCTIONS) == set(MT10_TASKS)
    assert HELDOUT_INSTRUCTIONS and not set(HELDOUT_INSTRUCTIONS) & set(MT10_TASKS)
    for task, text in {**INSTRUCTIONS, **HELDOUT_INSTRUCTIONS}.items():
        assert task in ALL_V3_ENVIRONMENTS and task in ENV_POLICY_MAP, task
        assert len(text.split()) >= 2
    assert len(set(INSTRUCTIONS.values()) | set(HELDOUT_INSTRUCTIONS.values())) == \
        len(INSTRUCTIONS) + len(HELDOUT_INSTRUCTIONS)  # every task its own instruction


def test_specs_and_dtypes(reach):
    assert [(s.name, s.dtype, s.shape) for s in reach.observation_spec] == [("state", "float32", (39,))]
    a = reach.action_spec
    assert (a.name, a.dtype, a.shape, a.low, a.high) == ("action", "float32", (4,), (-1.0,) * 4, (1.0,) * 4)
    assert reach.control_rate_hz == pytest.approx(80.0)  # Meta-World: dt = 5 frames x 2.5 ms
    assert reach.instruction == INSTRUCTIONS["reach-v3"] and reach.name == "reach-v3"
    obs = reach.reset(seed=0)
    assert set(obs) == {"state"} and obs["state"].dtype == np.float32 and obs["state"].shape == (39,)
    r = reach.step(np.zeros(4, np.float32))
    assert r.obs["state"].dtype == np.float32 and isinstance(r.reward, float)
    assert r.info["success"] in (0.0, 1.0) and r.info["variant"] == 0.0
    assert not r.terminated and not r.truncated
    with pytest.raises(ValueError, match="unknown Meta-World task"):
        MetaWorldEnv("reach-v2")


def test_seed_picks_a_variant_deterministically(reach):
    a = reach.reset(seed=3)["state"]
    steps_a = [reach.step(np.full(4, 0.3, np.float32)).obs["state"] for _ in range(5)]
    b = reach.reset(seed=3)["state"]
    steps_b = [reach.step(np.full(4, 0.3, np.float32)).obs["state"] for _ in range(5)]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.stack(steps_a), np.stack(steps_b))
    goals = {tuple(reach.reset(seed=s)["state"][36:39]) for s in range(5)}
    assert len(goals) == 5  # different seeds, different goals
    assert reach.variant == 4
    np.testing.assert_array_equal(reach.reset(seed=50)["state"], reach.reset(seed=0)["state"])  # 50 variants
    assert len(variants("reach-v3")) == 50


@pytest.mark.parametrize("task", ["reach-v3", "push-v3"])
def test_expert_succeeds_and_episode_ends_after_holding_success(task):
    env = MetaWorldEnv(task)
    try:
        for seed in (0, 1):
            r, steps, first = run_expert(env, seed)
            assert r.terminated and not r.truncated, (task, seed, steps)
            assert first is not None and steps == first + env.hold_steps  # success held for hold_steps steps
            assert steps < 200
    finally:
        env.close()


def test_hold_zero_never_terminates_and_the_step_limit_truncates(reach):
    env = MetaWorldEnv("reach-v3", max_steps=80, hold_steps=0)
    try:
        r, steps, first = run_expert(env, 0)
        assert first is not None and r.truncated and not r.terminated and steps == 80
        with pytest.raises(RuntimeError, match="reset first"):
            env.step(np.zeros(4, np.float32))
    finally:
        env.close()


def test_camera_image():
    env = MetaWorldEnv("push-v3", camera=True, image_size=48)
    try:
        assert [(s.name, s.dtype, s.shape) for s in env.observation_spec] == \
            [("state", "float32", (39,)), ("image", "uint8", (48, 48, 3))]
        obs = env.reset(seed=0)
        img0 = obs["image"]
        assert img0.dtype == np.uint8 and img0.shape == (48, 48, 3) and img0.flags.c_contiguous
        assert img0.std() > 10 and len(np.unique(img0.reshape(-1, 3), axis=0)) > 50  # a scene, not a blank
        for _ in range(15):
            obs = env.step(np.array([1.0, 0.0, 0.0, 0.0], np.float32)).obs
        assert np.abs(obs["image"].astype(int) - img0.astype(int)).sum() > 0  # the arm moved, the image did too
        # the corner camera renders upside down: ours is MuJoCo's image flipped vertically
        raw = env._renderer.render()
        np.testing.assert_array_equal(env.render(), np.flipud(raw))
    finally:
        env.close()


def test_make_env_gives_metaworld_tasks_and_keeps_the_others():
    env = make_env("reach-v3", horizon=120)
    try:
        assert isinstance(env, MetaWorldEnv) and env.max_steps == 120 and not env.camera
    finally:
        env.close()
    assert isinstance(make_env("aircraft-pitch"), LinearEnv)


def test_vigil_sim_plays_reach_against_a_runtime(serve, tmp_path):
    """`vigil sim --system reach-v3` through a real runtime serving a 39 -> 4 policy (a constant action)."""
    from onnx.helper import make_node

    bundle = tmp_path / "reach-const"
    graph_bundle(bundle, [make_node("MatMul", ["state", "w"], ["m"]), make_node("Add", ["m", "b"], ["action"])],
                 obs_dim=39, act_dim=4, outputs={"action": ["batch", 4]},
                 initializers={"w": np.zeros((39, 4)), "b": np.array([0.0, 0.5, 0.0, 0.0])},
                 action={"name": "action", "dtype": "float32", "shape": [4], "low": [-1.0] * 4, "high": [1.0] * 4},
                 control_rate_hz=80.0)
    served = serve(bundle, deadline_ms=5000)
    summary = tmp_path / "reach.json"
    sim = run_vigil("sim", "--connect", served.robot_endpoint, "--system", "reach-v3", "--steps", "25",
                    "--episodes", "2", "--summary", str(summary))
    assert sim.returncode == 0, sim.stdout + sim.stderr
    episodes = json.loads(summary.read_text())
    assert [ep["steps"] for ep in episodes] == [25, 25]
    assert all(ep["errors"] == 0 and ep["robot_safe"] == 0 and ep["runtime_safe"] == 0 for ep in episodes)
    assert all(isinstance(ep["success"], bool) for ep in episodes)  # Meta-World reports task success
    assert "success" in sim.stdout
    assert served.stop()["ticks"] == 50


@pytest.mark.slow
def test_cached_variants_are_mt10s(tmp_path, monkeypatch):
    """The on-disk variant cache rebuilds exactly metaworld.MT10(seed=0).train_tasks (builds MT10: ~5-15 s)."""
    import pickle

    import metaworld

    from vigil.sim import metaworld_env as mw

    monkeypatch.setenv("VIGIL_CACHE", str(tmp_path))
    mw._mt10_variants.cache_clear()
    built = mw._mt10_variants()  # builds MT10 and writes the cache
    mw._mt10_variants.cache_clear()
    cached = mw._mt10_variants()  # reads the cache
    mw._mt10_variants.cache_clear()
    reference = metaworld.MT10(seed=0).train_tasks
    for task in MT10_TASKS:
        ref = [pickle.loads(t.data) for t in reference if t.env_name == task]
        for got in (built[task], cached[task]):
            assert len(got) == len(ref) == 50
            for g, r in zip(got, ref):
                g = pickle.loads(g.data)
                assert np.array_equal(g.pop("rand_vec"), r["rand_vec"])
                assert g == {k: v for k, v in r.items() if k != "rand_vec"}
