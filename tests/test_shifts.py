"""Distribution shifts of Meta-World tasks (sim/shifts.py) and observation noise on chosen dimensions."""

from __future__ import annotations

import numpy as np
import pytest

from vigil.sim.faults import Faults
from vigil.sim.shifts import Shift, shift_positions


def test_shift_positions_lands_outside_the_range_and_keeps_the_layout():
    low, high = np.array([-0.1, 0.6, 0.02, -0.1, 0.8, 0.05]), np.array([0.1, 0.7, 0.02, 0.1, 0.9, 0.3])
    v = np.array([0.03, 0.65, 0.02, -0.05, 0.85, 0.1])
    out = shift_positions(v, low, high, 0.5)
    assert out[0] == pytest.approx(0.1 + 0.5 * 0.2)  # x (the widest horizontal axis), past the nearer boundary
    assert out[3] - v[3] == pytest.approx(out[0] - v[0])  # the goal moves with the object
    np.testing.assert_array_equal(np.delete(out, [0, 3]), np.delete(v, [0, 3]))
    below = shift_positions(np.array([-0.08, 0.65, 0.02]), low[:3], high[:3], 0.25)
    assert below[0] == pytest.approx(-0.1 - 0.25 * 0.2)
    np.testing.assert_array_equal(shift_positions(v, low, high, 0.0), v)
    # no horizontal range in x: y is used
    assert shift_positions(np.array([0.0, 0.8, 0.2]), np.array([0.0, 0.75, 0.2]), np.array([0.0, 0.9, 0.2]),
                           1.0)[1] == pytest.approx(0.75 - 0.15)


def test_shift_validates_and_describes():
    assert Shift().none and Shift().describe() == "none"
    assert "friction x0.3" in Shift(friction=0.3).describe()
    for bad in (dict(positions=-1), dict(friction=0), dict(mass=-2)):
        with pytest.raises(ValueError, match="invalid shift"):
            Shift(**bad)


def test_metaworld_env_applies_and_undoes_shifts():
    from vigil.sim.metaworld_env import MetaWorldEnv

    env = MetaWorldEnv("push-v3", max_steps=20)
    try:
        nominal = env.reset(seed=20)["state"].copy()
        friction, mass = env.env.model.geom_friction[:, 0].copy(), env.env.model.body_mass.copy()
        space = env.env._random_reset_space
        env.shift = Shift(positions=0.5, friction=0.3, mass=4.0)
        shifted = env.reset(seed=20)["state"]
        np.testing.assert_allclose(env.env.model.geom_friction[:, 0], 0.3 * friction)
        puck = env._task_bodies
        assert len(puck) == 1 and env.env.model.body_mass[puck[0]] == pytest.approx(4 * mass[puck[0]])
        others = np.setdiff1d(np.arange(len(mass)), puck)
        np.testing.assert_array_equal(env.env.model.body_mass[others], mass[others])  # robot, table untouched
        x = shifted[4]  # the puck's x
        assert not space.low[0] <= x <= space.high[0]
        assert abs(abs(x - (space.high[0] if nominal[4] >= 0 else space.low[0])) - 0.1) < 0.01
        for _ in range(3):  # the shifted world runs
            env.step(np.zeros(4, np.float32))
        env.shift = Shift()
        again = env.reset(seed=20)["state"]
        np.testing.assert_allclose(again, nominal, atol=1e-6)  # nothing of the shift is left behind
        np.testing.assert_array_equal(env.env.model.geom_friction[:, 0], friction)
    finally:
        env.close()


def test_observation_noise_on_chosen_dimensions_only():
    rng = np.random.default_rng(0)
    obs = {"state": np.zeros(6, np.float32), "image": np.zeros((2, 2, 3), np.uint8)}
    out = Faults(obs_noise=0.1, noise_dims=(1, 4)).corrupt(obs, 0, rng)
    changed = np.flatnonzero(out["state"] != 0)
    assert set(changed) == {1, 4} and out["state"].dtype == np.float32
    assert out["image"] is obs["image"]
    everywhere = Faults(obs_noise=0.1).corrupt(obs, 0, rng)["state"]
    assert np.count_nonzero(everywhere) == 6
    assert "on dims 1,4" in Faults(obs_noise=0.1, noise_dims=(1, 4)).describe()


def test_sim_cli_refuses_shifts_where_they_do_not_apply():
    from conftest import run_vigil

    r = run_vigil("sim", "--system", "aircraft-pitch", "--friction", "0.5", "--connect", "tcp://127.0.0.1:1")
    assert r.returncode == 2 and "Meta-World" in r.stderr and "Traceback" not in r.stderr
    r = run_vigil("sim", "--system", "reach-v3", "--mass", "-1", "--connect", "tcp://127.0.0.1:1")
    assert r.returncode == 2 and "config key 'mass'" in r.stderr and "Traceback" not in r.stderr
