"""Onboard learning (issue 6 items 3-4): the numpy Riccati against python-control, the onboard learner
against the training one, the manifest's learner block, `vigil bundle lqr --learner`, and over real
sockets: learning lowers cost against the prior controller, gain swaps and fallbacks reach the operator
stream, the stability monitor stops a diverging robot."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import control
import numpy as np
import pytest
from conftest import manifest_of, run_vigil, wait_until

from vigil.monitors.base import Level, Tick
from vigil.monitors.stability import StabilityMonitor
from vigil.policies.irlqr import IRLQR as OnboardIRLQR
from vigil.policies.irlqr import LearnerSpec, dlqr_cross, spectral_radius
from vigil.policies.manifest import Manifest, ManifestError
from vigil.runtime.learning import GainWorker, SessionLearner
from vigil.sim.envs import LinearEnv
from vigil.sim.linear import SYSTEMS
from vigil.sim.robot import SimConfig, run_episodes
from vigil.training import irlqr as training_irlqr
from vigil.training.irlqr import IRLQR, PUBLISHED
from vigil.training.lqr import export_prior_lqr, prior_of

# -- the numpy core ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(10))
def test_numpy_riccati_with_cross_term_agrees_with_python_control(seed):
    rng = np.random.default_rng(100 + seed)
    n, m = int(rng.integers(2, 6)), int(rng.integers(1, 4))
    A = rng.standard_normal((n, n))
    A *= rng.uniform(0.5, 1.3) / spectral_radius(A)
    B = rng.standard_normal((n, m))
    M = rng.standard_normal((n + m, n + m))
    H = M @ M.T + 0.3 * np.eye(n + m)
    Q, R, N = H[:n, :n], H[n:, n:], H[:n, n:]
    K_ref, _, _ = control.dlqr(A, B, Q, R, N)
    K = dlqr_cross(A, B, Q, R, N)
    assert np.allclose(K, K_ref, rtol=1e-7, atol=1e-9)
    K_ref, _, _ = control.dlqr(A, B, Q, R)
    assert np.allclose(dlqr_cross(A, B, Q, R), K_ref, rtol=1e-7, atol=1e-9)


def test_numpy_riccati_refuses_an_unstabilisable_system():
    A = np.diag([1.5, 0.5])
    B = np.array([[0.0], [1.0]])  # the unstable mode is not reachable
    with pytest.raises(ValueError):
        dlqr_cross(A, B, np.eye(2), np.eye(1))


def test_training_reexports_the_onboard_learner():
    assert training_irlqr.IRLQR is OnboardIRLQR and training_irlqr.dlqr_cross is dlqr_cross


def test_onboard_learner_equals_the_training_learner_step_for_step():
    """SessionLearner (the runtime's: snapshots, a worker thread, adoption between ticks) against the training
    learner's synchronous `step`, on a seeded aircraft trajectory. Waiting for each computation before the
    next tick makes the two schedules identical, so gains must agree exactly at every step."""
    system = SYSTEMS["aircraft-pitch"]()
    A0, B0 = prior_of(system, 0.01, True, 0)
    spec = LearnerSpec("irlqr", A0, B0, system.Q, system.R, PUBLISHED["aircraft-pitch"])
    spec = LearnerSpec.from_dict(json.loads(json.dumps(spec.to_dict())), 3, 1)  # through the manifest's JSON
    worker = GainWorker()
    onboard = SessionLearner(spec, worker)
    offline = IRLQR(A0, B0, system.Q, system.R, PUBLISHED["aircraft-pitch"])
    noise = np.random.default_rng(3).normal(0, system.noise_std, (300, 3))
    x, swaps = system.x0.copy(), 0
    try:
        for t in range(300):
            onboard.transition(x, t)  # tick t completes (x_{t-1}, u_{t-1}, x_t), as offline.step did below
            if onboard.computing:
                wait_until(lambda: onboard._future.done(), 10)
                assert onboard.poll() is not None
                swaps += 1
            assert np.array_equal(onboard.learner.gain(), offline.gain()), t
            assert np.array_equal(onboard.gain32, offline.gain().astype(np.float32))
            u = -offline.gain() @ x
            onboard.acted(x, u, t)
            x_next = system.A @ x + system.B @ u + noise[t]
            offline.step(x, u, x_next)
            x = x_next
    finally:
        worker.close()
    assert swaps >= 3 and onboard.learner.epoch == offline.epoch == swaps
    assert onboard.learner.steps == offline.steps - 1  # the last transition is completed by a tick that never came
    assert np.array_equal(onboard.learner.fallbacks, offline.fallbacks)


def test_a_gap_in_seq_or_a_reset_skips_the_transition():
    system = SYSTEMS["uav-2d"]()
    spec = LearnerSpec("irlqr", system.A, system.B, system.Q, system.R, PUBLISHED["uav-2d"])
    learner = SessionLearner(spec, GainWorker())
    x, u = np.ones(4), np.ones(2)
    learner.acted(x, u, 1)
    learner.transition(x, 2)   # consecutive: learnt
    learner.acted(x, u, 2)
    learner.bridge(3)          # a heartbeat in between
    learner.transition(x, 4)   # still consecutive
    learner.acted(x, u, 4)
    learner.transition(x, 6)   # seq 5 lost: skipped
    learner.acted(x, u, 6)
    learner.break_chain()      # reset
    learner.transition(x, 7)
    assert learner.learner.steps == 2 and learner.skipped == 1


# -- the manifest's learner block ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def learner_bundle(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("learner") / "pitch-irlqr"
    assert run_vigil("bundle", "lqr", "--system", "aircraft-pitch", "--learner", "irlqr", "--out",
                     str(folder)).returncode == 0
    return folder


def test_vigil_bundle_lqr_learner_writes_the_prior_and_the_learner(learner_bundle, tmp_path):
    d = manifest_of(learner_bundle)
    system = SYSTEMS["aircraft-pitch"]()
    A0, B0 = prior_of(system, 0.01, True, 0)
    assert d["kind"] == "linear_gain" and d["learner"]["kind"] == "irlqr"
    assert np.allclose(d["learner"]["A0"], A0) and np.allclose(d["learner"]["B0"], B0)
    assert d["learner"]["lam"] == 20.0 and d["learner"]["g1"] == 0.01 and d["learner"]["g2"] == 0.001
    spec = LearnerSpec.from_dict(d["learner"], 3, 1)
    assert np.allclose(d["extra"]["gain"], spec.learner().gain())  # the graph's default: the learner's first gain
    assert d["monitor"]["stability"]["bound"] > 0
    fixed = tmp_path / "fixed"
    r = run_vigil("bundle", "lqr", "--system", "aircraft-pitch", "--prior", "relative", "--out", str(fixed))
    assert r.returncode == 0, r.stderr
    f = manifest_of(fixed)
    assert "learner" not in f and np.allclose(f["extra"]["gain"], dlqr_cross(A0, B0, system.Q, system.R))
    r = run_vigil("bundle", "lqr", "--g1", "0.1", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "--learner" in r.stderr


def _broken(d: dict, path: str, value) -> dict:
    d = copy.deepcopy(d)
    keys = path.split(".")
    target = d
    for k in keys[:-1]:
        target = target[k]
    if value is _DELETE:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value
    return d


_DELETE = object()


@pytest.mark.parametrize("path, value, message", [
    ("learner.kind", "ppo", "'learner.kind' must be one of"),
    ("learner.lam", _DELETE, "'learner.lam' is missing"),
    ("learner.lam", -1.0, "'learner.lam' must be a number > 0"),
    ("learner.g2", "big", "'learner.g2' must be a number >= 0"),
    ("learner.B0", [[1.0, 2.0]], "'learner.B0' must be a 3 x 1 matrix"),
    ("learner.A0", [[1, 0, 0], [0, 1, 0], [0, 0, float("nan")]], "'learner.A0' must be a 3 x 3 matrix"),
    ("learner.Q", [[1, 0, 0], [0, -1, 0], [0, 0, 1]], "'learner.Q' must be positive definite"),
    ("learner.R", [[0.1, 1.0]], "'learner.R' must be a 1 x 1 matrix"),
    ("learner.epoch_factor", 1.0, "'learner.epoch_factor' must be a number > 1"),
    ("learner.stability_guard", "yes", "'learner.stability_guard' must be true or false"),
    ("learner.gamma", 1.0, "'learner.gamma' is not a learner setting"),
    ("learner", [1, 2], "'learner' must be a map"),
    ("kind", "gaussian", "'learner' is for kind linear_gain only"),
    ("normalisation", {"state": {"mean": [0, 0, 0], "std": [1, 1, 1]}}, "cannot be combined with 'normalisation'"),
    ("extra.offset", [0.5], "'extra.offset' must be zeros"),
    ("monitor.stability.window", 0, "'monitor.stability.window' must be an integer >= 1"),
    ("monitor.stability.growth", 1.0, "'monitor.stability.growth' must be > 1"),
    ("monitor.stability.array", "image", "'monitor.stability.array' must name an observation array"),
    ("monitor.stability.horizon", 3, "'monitor.stability.horizon' is not a setting"),
])
def test_manifest_learner_block_errors_name_the_key(learner_bundle, path, value, message):
    d = manifest_of(learner_bundle)
    Manifest.from_dict(d)  # the bundle as written is valid
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Manifest.from_dict(_broken(d, path, value))


def test_vigil_serve_refuses_a_bad_learner_block(learner_bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(learner_bundle, bad)
    d = manifest_of(bad)
    d["learner"]["B0"] = [[1.0, 2.0]]
    (bad / "manifest.json").write_text(json.dumps(d))
    r = run_vigil("serve", "--bundle", str(bad), "--robot-endpoint", "tcp://127.0.0.1:0", "--operator-endpoint",
                  "tcp://127.0.0.1:0", "--store", str(tmp_path / "a.db"), timeout=60)
    assert r.returncode == 2 and "learner.B0" in r.stderr


# -- the stability monitor -----------------------------------------------------------------------------------

def _tick(x) -> Tick:
    return Tick("r", 0, {"state": np.asarray(x, np.float32)}, np.zeros(1, np.float32), np.zeros(1, np.float32), {}, 0.0)


def test_stability_monitor_stops_on_growth_and_beyond_the_bound():
    mon = StabilityMonitor(window=5, growth=10.0, min_norm=1.0, bound=100.0)
    for _ in range(10):
        assert mon.update(_tick([0.05, 0, 0])).level == Level.OK
    levels = [mon.update(_tick([0.05 * 2.0**k, 0, 0])).level for k in range(1, 12)]
    assert Level.STOP in levels and levels[0] == Level.OK
    mon.reset()
    assert mon.update(_tick([150.0, 0, 0])).level == Level.STOP  # beyond the bound at once
    mon.reset()
    for _ in range(10):  # slow wandering below min_norm never stops
        assert mon.update(_tick([0.9, 0, 0])).level == Level.OK
    mon.reset()  # a reset to rest (x0 = 0, the uav's) then noise: no ratio to a zero state
    levels = [mon.update(_tick([0.0, 0, 0]))] + [mon.update(_tick([0.3 * k, 0, 0])) for k in range(1, 10)]
    assert all(v.level == Level.OK for v in levels)


# -- over real sockets: `vigil serve` + the sim robot ---------------------------------------------------------

def _episode_cost(served, steps: int, robot: str, seed: int = 0) -> float:
    env = LinearEnv(SYSTEMS["uav-2d"](), horizon=steps)
    stats = run_episodes(env, SimConfig(served.robot_endpoint, robot, 1, steps, seed))
    assert stats[0].steps == steps and stats[0].robot_safe == 0 and stats[0].runtime_safe == 0
    return stats[0].cost


def test_onboard_learner_over_real_sockets_lowers_cost_against_the_prior_controller(serve, tmp_path):
    """The same prior (uav-2d, published absolute 0.1, seed 0) as a fixed gain and as an IR-LQR bundle, on the
    same noise sequence: learning on board costs less. Offline on this prior the learner pays 285 against the
    prior controller's 340 over 400 steps."""
    learn, fixed = tmp_path / "learn", tmp_path / "fixed"
    export_prior_lqr("uav-2d", learn, learner=True)
    export_prior_lqr("uav-2d", fixed, learner=False)
    served_learn, served_fixed = serve(learn), serve(fixed)
    cost_learn = _episode_cost(served_learn, 400, "uav-a")
    cost_fixed = _episode_cost(served_fixed, 400, "uav-b")
    counters = served_learn.stop()
    assert counters.get("gain_swaps", 0) >= 3
    assert cost_learn < 0.95 * cost_fixed, (cost_learn, cost_fixed)
    assert "gain_swaps" not in served_fixed.stop()


def test_gain_swaps_and_fallbacks_appear_on_the_operator_stream(serve, subscriber, tmp_path):
    """g1 = 10 makes the published fallback fire at every epoch (lambda_max(O) >= 0.95 lambda_min(H)):
    every epoch is a `gain` telemetry event, every fallback a stored warn alert from monitor `learner`."""
    bundle = tmp_path / "fallback"
    export_prior_lqr("uav-2d", bundle, learner=True, g1=10.0)
    served = serve(bundle)
    sub = subscriber(served.operator_endpoint)
    sub.ready()
    _episode_cost(served, 100, "uav-f")
    _, gain = sub.wait_for(lambda topic, m: topic == "telemetry" and m.meta.get("event") == "gain")
    assert gain.robot == "uav-f"
    values = gain.meta["values"]
    assert values["epoch"] >= 1 and np.shape(values["gain"]) == (2, 4) and values["update_ms"] >= 0
    assert values["fallback"]
    _, alert = sub.wait_for(lambda topic, m: topic == "alert.warn" and m.meta.get("monitor") == "learner")
    assert alert.robot == "uav-f" and "fallback" in alert.meta["reason"]
    counters = served.stop()
    assert counters["gain_swaps"] >= 1
    stored = run_vigil("alerts", "--store", str(served.store), "--since", "0", "--json")
    rows = [json.loads(line) for line in stored.stdout.splitlines()]
    learner_rows = [r for r in rows if r.get("monitor") == "learner"]
    assert learner_rows and all(r["severity"] == "warn" for r in learner_rows)


def test_stability_monitor_commands_the_safe_action_on_a_diverging_state(serve, links, subscriber, learner_bundle):
    served = serve(learner_bundle)
    sub = subscriber(served.operator_endpoint)
    sub.ready()
    link = links(served.robot_endpoint, "pitch-d")
    replies = []
    for k in range(40):  # 21 ticks near rest, then the state doubles every tick
        x = np.array([0.01, 0.0, 0.01], np.float32) * (2.0 ** max(0, k - 20))
        replies.append(link.act({"state": x}))
    assert all(r.kind == "act" for r in replies)
    assert not any(r.meta["safe"] for r in replies[:21])
    stopped = [r for r in replies if r.meta["safe"]]
    assert stopped, "the stability monitor never stopped the robot"
    first = stopped[0]
    assert any(v[0] == "stability" and v[1] == "stop" for v in first.meta["verdicts"])
    assert np.array_equal(first.arrays["action"], np.zeros(1, np.float32))  # the bundle's safe action
    _, alert = sub.wait_for(lambda topic, m: topic == "alert.stop" and m.meta.get("monitor") == "stability")
    assert alert.robot == "pitch-d" and ("unstable" in alert.meta["reason"] or "bound" in alert.meta["reason"])
