"""Failure prediction (docs/failure.md): time-varying conformal bands, the logistic combiner, the density heads in
the plan graph, and the failure monitor calibrated into a manifest and run by the runtime over real sockets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vigil.monitors.bands import Band, conformal_quantile, episode_statistic, fit_shape, running_mean
from vigil.monitors.base import Level, Tick
from vigil.monitors.failure import POOLED, FailureMonitor, stillness
from vigil.training.failure import failure_block, fit_logistic, fit_task_bands
from vigil.wire.protocol import ArraySpec

INSTRUCTION = "reach the goal position"


def synthetic_episode(rng, T: int, shift: float = 0.0, start: int = 10) -> np.ndarray:
    """A score that rises and falls over the episode (like VFD around a grasp), noise growing with it."""
    t = np.arange(T)
    centre = 1.0 + 2.0 * np.exp(-((t - 15) / 6.0) ** 2)
    x = centre + 0.2 * centre * rng.standard_normal(T)
    x[start:] += shift
    return x


# -- bands ----------------------------------------------------------------------------------------------------


def test_running_mean_and_conformal_quantile():
    np.testing.assert_allclose(running_mean([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(running_mean([1, 2, 3], 1), [1, 2, 3])
    assert conformal_quantile(list(range(1, 20)), 0.1) == 18  # ceil(20 * 0.9) = 18th of 19
    assert conformal_quantile([1.0, 2.0], 0.1) == math.inf  # too few for that rank: never alarm


def test_band_controls_the_per_episode_false_alarm_rate():
    """Calibrated on successful episodes of varying length, the band's alarm rate on fresh successful episodes
    is the asked per-episode rate (not per plan), and a shift after plan 10 is caught almost always."""
    rng = np.random.default_rng(0)
    for alpha in (0.1, 0.3):
        calib = {"a": [synthetic_episode(rng, int(rng.integers(20, 40))) for _ in range(2000)]}
        band = fit_task_bands(calib, alpha)["a"]
        fresh = [synthetic_episode(rng, int(rng.integers(20, 40))) for _ in range(2000)]
        rate = np.mean([(band.exceedance(e) > band.q).any() for e in fresh])
        # sampling error: sqrt(a(1-a)/1000 + a(1-a)/2000) <= 0.018 (1000 episodes set q); 3 sigma ~ 0.05
        assert abs(rate - alpha) < 0.05, (alpha, rate)
        shifted = [synthetic_episode(rng, 30, shift=2.0) for _ in range(200)]
        assert np.mean([(band.exceedance(e) > band.q).any() for e in shifted]) > 0.95
    # the band follows the score over time: higher where the score is, so the bump itself raises no alarm
    assert band.threshold(15) > band.threshold(35) + 1.0


def test_band_shape_carries_forward_and_round_trips():
    band = fit_shape([np.ones(5), np.ones(8) * 2, np.ones(6) * 3], min_alive=2, smooth=0).with_q(1.5)
    assert len(band.centre) == 8
    assert band.centre[7] == band.centre[5]  # fewer than 2 episodes alive after plan 5: carried forward
    assert band.z(100, band.centre[-1]) == 0.0  # later plans use the last entry
    again = Band.from_dict(band.to_dict())
    assert again.q == 1.5 and np.allclose(again.centre, band.centre)
    assert episode_statistic(band, [band.threshold(0) + 1e-6]) > band.q
    with pytest.raises(ValueError, match="centre"):
        Band.from_dict({"centre": [1.0]}, "monitor.failure.bands.x.vfd")
    with pytest.raises(ValueError, match="scales > 0"):
        Band.from_dict({"centre": [1.0], "scale": [0.0]})


def test_logistic_recovers_the_informative_feature():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((4000, 2))
    y = (rng.random(4000) < 1 / (1 + np.exp(-(2.0 * X[:, 0] - 1.0)))).astype(float)
    beta = fit_logistic(X, y, l2=1e-6)
    assert abs(beta[0] + 1.0) < 0.2 and abs(beta[1] - 2.0) < 0.25 and abs(beta[2]) < 0.15


# -- the monitor ------------------------------------------------------------------------------------------------


def _block(rng, with_failures: bool = True) -> dict:
    eps = []
    for task, level in (("reach-v3", 1.0), ("push-v3", 3.0)):
        for k in range(60):
            failed = with_failures and k % 5 == 0
            scores = {f: list(level * synthetic_episode(rng, 25, shift=1.5 if failed else 0.0)) for f in
                      ("vfd", "rnd", "logpzo")}
            eps.append({"task": task, "success": not failed, "scores": scores})
    return failure_block(eps, features=("vfd", "rnd", "logpzo"), instructions={INSTRUCTION: "reach-v3"})


def _ticks(monitor: FailureMonitor, scores: list[dict[str, float]]) -> list:
    obs, a = {"state": np.zeros(3, np.float32)}, np.zeros(2, np.float32)
    out = []
    for plan, s in enumerate(scores, 1):
        for _ in range(4):  # four ticks per plan: only the first judges
            out.append(monitor.update(Tick("r", 0, obs, a, a, s, 0.0, plan)))
    return out


def test_failure_block_and_monitor_judge_per_task():
    rng = np.random.default_rng(2)
    block = _block(rng)
    assert block["features"] == ["vfd", "rnd", "logpzo"] and block["failures"] == 24
    assert set(block["bands"]) == {"reach-v3", "push-v3", POOLED}
    assert all(w > 0 for w in block["weights"])  # the failed episodes' scores were higher: positive weights
    m = FailureMonitor.from_manifest(block)
    # a reach-level episode shifted like push's scores: far above reach's band -> alert; push's band -> fine
    high = [{f: 3.0 * x for f in ("vfd", "rnd", "logpzo")} for x in synthetic_episode(rng, 25)]
    m.reset()
    m.start_episode({"instruction": INSTRUCTION})  # the task from the instruction
    verdicts = _ticks(m, high)
    assert any(v.level == Level.ALERT for v in verdicts) and "reach-v3" in next(
        v.reason for v in verdicts if v.level == Level.ALERT)
    m.reset()
    m.start_episode({"task": "push-v3"})
    calm = [{f: 3.0 * x for f in ("vfd", "rnd", "logpzo")} for x in
            1.0 + 2.0 * np.exp(-((np.arange(25) - 15) / 6.0) ** 2)]  # exactly push's centre
    assert all(v.level == Level.OK for v in _ticks(m, calm))
    m.reset()
    m.start_episode({"task": "door-open-v3"})  # unknown task: the pooled band
    assert m._task == POOLED
    # a bundle without the density outputs: the monitor stays quiet rather than guess
    assert all(v.level == Level.OK for v in _ticks(m, [{"vfd": 100.0}] * 5))


def test_failure_block_without_failures_or_successes():
    rng = np.random.default_rng(3)
    block = _block(rng, with_failures=False)
    assert block["failures"] == 0 and block["weights"] == [pytest.approx(1 / 3)] * 3 and block["bias"] == 0.0
    eps = [{"task": "t", "success": False, "scores": {f: [1.0, 2.0] for f in ("vfd", "rnd", "logpzo")}}]
    with pytest.raises(ValueError, match="density heads"):
        failure_block(eps, features=("vfd", "rnd", "logpzo"))
    assert failure_block(eps, features=("vfd", "rnd", "logpzo"), successful_only=False)["episodes"] == 1
    with pytest.raises(ValueError, match="stillness"):  # the default features include the state's stillness
        failure_block(eps, successful_only=False)


def test_stillness_feature_sees_a_stalled_robot():
    """The monitor computes `stillness` itself from the observed state; a robot that stops moving while its
    calibration episodes kept moving raises an alert, with the graph's scores perfectly ordinary."""
    rng = np.random.default_rng(5)
    eps = []
    for _ in range(60):
        states = np.cumsum(rng.normal(0.0, 0.05, (25, 3)), 0)
        m = [stillness(None if k == 0 else states[k - 1], states[k]) for k in range(25)]
        eps.append({"task": "reach-v3", "success": True,
                    "scores": {"vfd": list(1 + 0.1 * rng.random(25)), "stillness": m}})
    block = failure_block(eps, features=("vfd", "stillness"))
    monitor = FailureMonitor.from_manifest(block)
    a = np.zeros(2, np.float32)
    for stalled, expect in ((False, Level.OK), (True, Level.ALERT)):
        monitor.reset()
        monitor.start_episode({"task": "reach-v3"})
        states = np.cumsum(rng.normal(0.0, 0.05, (25, 3)), 0)
        if stalled:
            states[5:] = states[5]
        levels = [monitor.update(Tick("r", k, {"state": states[k]}, a, a, {"vfd": 1.05}, 0.0, k + 1)).level
                  for k in range(25)]
        assert (max(levels) >= Level.ALERT) == (expect == Level.ALERT), (stalled, levels)


def test_failure_monitor_config_errors_name_the_key():
    rng = np.random.default_rng(4)
    block = _block(rng)
    with pytest.raises(ValueError, match="monitor.failure"):
        FailureMonitor.from_manifest({k: v for k, v in block.items() if k != "bias"})
    with pytest.raises(ValueError, match="weights"):
        FailureMonitor.from_manifest({**block, "weights": [1.0]})
    bad = {**block, "bands": {**block["bands"], "push-v3": {"vfd": block["bands"]["push-v3"]["vfd"]}}}
    with pytest.raises(ValueError, match="push-v3 lacks"):
        FailureMonitor.from_manifest(bad)


# -- density heads in the graph, calibrated, served ------------------------------------------------------------


@pytest.fixture(scope="module")
def density_bundle(encoder_bundle, tmp_path_factory):
    """A tiny ensemble with RND/logpZO heads trained on reach demonstrations, exported; and its pieces."""
    from test_flow_export import CFG, expert_demos

    from vigil.policies.instructions import InstructionEncoder
    from vigil.training import density
    from vigil.training.flow import train_ensemble
    from vigil.training.flow_export import export_flow_ensemble

    torch.manual_seed(0)
    instr = InstructionEncoder.load(encoder_bundle).embed([INSTRUCTION])
    obs, chunks = expert_demos()
    instrs = np.repeat(instr, len(obs), 0)
    ens, _ = train_ensemble(CFG, obs, instrs, chunks, progress=False)
    ctx = density.member0_contexts(ens, torch.as_tensor(obs), torch.as_tensor(instrs))
    heads, hist = density.fit(ctx, density.DensityConfig(dim=CFG.hidden, steps=400, seed=0))
    assert np.mean(hist["flow"][-40:]) < np.mean(hist["flow"][:40])
    folder = tmp_path_factory.mktemp("density") / "reach-flow"
    export_flow_ensemble(folder, ens, CFG, encoder_bundle, "reach-flow", density=heads,
                         prov={"tasks": {"reach-v3": {"instruction": INSTRUCTION}}})
    return folder, ens, heads, obs, instr


def test_density_scores_in_the_graph_match_torch_and_see_the_shift(density_bundle):
    import onnxruntime as ort

    from vigil.policies.manifest import read_manifest

    folder, ens, heads, obs, instr = density_bundle
    assert read_manifest(folder).onnx_scores == ("vfd", "rnd")  # logpZO stays offline (docs/failure.md)
    sess = ort.InferenceSession(str(folder / "policy.onnx"))
    state = np.concatenate([obs[::10], obs[::10] + 3.0]).astype(np.float32)
    n = len(state)
    noise = np.random.default_rng(0).standard_normal((n, 5, 8, 4)).astype(np.float32)
    _, _, rnd = sess.run(None, {"state": state, "instruction": np.repeat(instr, n, 0), "noise": noise})
    with torch.no_grad():
        ctx = ens.encode(torch.as_tensor(state), torch.as_tensor(np.repeat(instr, n, 0)), members=[0])[0]
        want_rnd, lpz = heads(ctx)
    np.testing.assert_allclose(rnd, want_rnd.numpy(), rtol=1e-4, atol=1e-7)
    half = n // 2
    assert np.median(rnd[half:]) > 5 * np.median(rnd[:half])  # far from the demonstrations: both see it
    assert np.median(lpz[half:].numpy()) > 2 * np.median(lpz[:half].numpy())


def test_calibrated_failure_monitor_alerts_through_the_runtime(density_bundle, serve, links):
    """Per-plan scores of the real graph on nominal stretches of the demonstrations calibrate monitor.failure
    into the manifest; `vigil serve` then runs it: a far-out observation raises a stored `failure` alert."""
    import onnxruntime as ort

    from vigil.policies.manifest import read_manifest
    from vigil.runtime.store import AlertStore
    from vigil.training.calibrate import write_monitor

    folder, _, _, obs, instr = density_bundle
    sess = ort.InferenceSession(str(folder / "policy.onnx"))
    rng = np.random.default_rng(0)
    episodes = []
    for _ in range(40):  # successful "episodes": stretches of the demonstrations, one plan every 4 steps
        start = int(rng.integers(0, len(obs) - 60))
        states = obs[start:start + 60:4].astype(np.float32)
        noise = rng.standard_normal((len(states), 5, 8, 4)).astype(np.float32)
        _, vfd, rnd = sess.run(None, {"state": states, "instruction": np.repeat(instr, len(states), 0),
                                      "noise": noise})
        m = [stillness(None if k == 0 else states[k - 1], states[k]) for k in range(len(states))]
        episodes.append({"task": "reach-v3", "success": True,
                         "scores": {"vfd": vfd.tolist(), "rnd": rnd.tolist(), "stillness": m}})
    write_monitor(folder, failure_block(episodes, instructions={INSTRUCTION: "reach-v3"}), "failure")
    assert "failure" in read_manifest(folder).monitor

    served = serve(folder)
    link = links(served.robot_endpoint, "arm-1", hello=False)
    link.hello((ArraySpec("state", "float32", (39,)),), ArraySpec("action", "float32", (4,)))
    assert link.reset(instruction=INSTRUCTION, seed=2).kind == "reset"
    far = (obs[0] + 3.0).astype(np.float32)
    seen = []
    for _ in range(12):  # three plans
        reply = link.act({"state": far}, timeout_s=10)
        assert reply.kind == "act", reply.meta
        seen += [v for v in reply.meta["verdicts"] if v[0] == "failure"]
    assert any(v[1] == "alert" for v in seen), seen
    served.stop()
    alerts = AlertStore(served.store, readonly=True).since(0)
    assert any(a.monitor == "failure" and a.severity == "alert" and "task reach-v3" in a.reason for a in alerts), alerts


def test_vigil_calibrate_writes_the_failure_monitor(density_bundle, tmp_path):
    """`vigil calibrate` on a bundle with the density heads writes monitor.failure beside monitor.vfd, from the same
    rollouts (stillness recorded as the runtime computes it); the runtime's monitor loads it."""
    import json
    import shutil

    from conftest import run_vigil

    from vigil.policies.manifest import read_manifest

    folder = tmp_path / "bundle"
    shutil.copytree(density_bundle[0], folder)
    r = run_vigil("calibrate", "--bundle", str(folder), "--tasks", "reach-v3", "--episodes", "4", "--seed", "40",
                  "--max-steps", "48", "--all-episodes", "--no-progress", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    printed = json.loads(r.stdout)["failure"]
    block = read_manifest(folder).monitor["failure"]
    assert block["features"] == ["vfd@pooled", "rnd@pooled", "stillness@pooled"] and block["logit_band"] == "pooled"
    assert printed["episodes"] == block["episodes"] == 4 and "bands" not in printed
    assert set(block["bands"]) == {"reach-v3", POOLED}
    assert len(block["bands"][POOLED]["stillness"]["centre"]) == 12  # 48 steps, a plan every 4
    assert block["instructions"] == {INSTRUCTION: "reach-v3"}
    FailureMonitor.from_manifest(block)
    r = run_vigil("calibrate", "--bundle", str(folder), "--failure", "1.5", "--no-progress")
    assert r.returncode != 0 and "failure" in r.stderr


def test_demonstrations_hold_the_goal(tmp_path):
    """`vigil demos record --hold-steps` ends an expert episode only after the task was done that many steps."""
    from conftest import run_vigil

    from vigil.training.demos import DemoSet

    for hold in (1, 30):
        r = run_vigil("demos", "record", "--tasks", "reach-v3", "--episodes", "1", "--hold-steps", str(hold),
                      "--out", str(tmp_path / f"h{hold}"))
        assert r.returncode == 0, r.stderr
        ds = DemoSet(tmp_path / f"h{hold}")
        ep = ds.load(ds.episodes()[0].id)
        assert ep.meta["hold_steps"] == hold and ep.succeeded
        assert ep.success[-hold:].all() and ep.steps - ep.success_step == hold  # success_step: 0-based index
    r = run_vigil("demos", "record", "--tasks", "reach-v3", "--hold-steps", "0", "--out", str(tmp_path / "x"))
    assert r.returncode != 0 and "hold_steps" in r.stderr
