"""The preference loop end to end (issue 21), with real parts: the policy's attempts recorded into a pool, pairs
filed as queries in a real SQLite store, answered by a simulated operator through `vigil prefs`, a reward model
trained and exported, a runtime scoring finished episodes with it on the operator stream (real sockets), and
post-training optimising it."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import run_vigil, start_serve

from vigil.runtime.stream import receive, subscribe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(encoder_bundle, tmp_path_factory) -> Path:
    """The demo's shipped run (ensemble.pt + bundle) with its encoder beside it."""
    folder = tmp_path_factory.mktemp("prefs") / "run"
    shutil.copytree(ROOT / "sim" / "assets" / "mt10" / "run", folder)
    shutil.copytree(encoder_bundle, folder / "bundle" / "encoder")
    return folder


def test_preference_loop_from_the_command_line(run, tmp_path):
    from vigil.runtime.preferences import PreferenceStore
    from vigil.training.prefs import collect_pool

    pool, store, rm = tmp_path / "pool", tmp_path / "prefs.db", tmp_path / "reward"
    ids = collect_pool(run / "bundle", ["reach-v3", "push-v3"], 4, 100, 40, pool, progress=False)
    assert len(ids) == 8
    base = ["--store", str(store), "--pool", str(pool), "--run", str(run)]
    r = run_vigil("prefs", "ask", *base, "--rule", "random", "--batch", "6", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    st = PreferenceStore(store, readonly=True)
    recs = st.list(status="open")
    st.close()
    assert len(recs) == 6 and all(rec.rule == "random" for rec in recs)
    by_id = {e: t for e, t in zip(ids, ["reach-v3"] * 4 + ["push-v3"] * 4, strict=True)}  # written in task order
    assert all(by_id.get(rec.episode_a, rec.task) == rec.task == by_id.get(rec.episode_b, rec.task) for rec in recs)
    r = run_vigil("prefs", "annotate", "--store", str(store), "--pool", str(pool), "--kind", "bt")
    assert r.returncode == 0 and "answered 6" in r.stdout, r.stdout + r.stderr[-2000:]
    r = run_vigil("prefs", "train", *base, "--out", str(rm), "--method", "ensemble", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads((rm / "reward.json").read_text())
    assert info["answers"] == 6 and (rm / "reward.onnx").exists()
    r = run_vigil("prefs", "ask", *base, "--rule", "drts", "--model", str(rm), "--batch", "2", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    st = PreferenceStore(store, readonly=True)
    new = st.list(status="open")
    st.close()
    assert len(new) == 2 and all(rec.rule == "drts" and 0 <= rec.predicted <= 1 for rec in new)
    old = {tuple(sorted((rec.episode_a, rec.episode_b))) for rec in recs}
    assert not old & {tuple(sorted((rec.episode_a, rec.episode_b))) for rec in new}  # never asked twice
    r = run_vigil("prefs", "ask", *base, "--rule", "drts", "--batch", "2")
    assert r.returncode == 2 and "--model" in r.stderr and "Traceback" not in r.stderr

    # the runtime scores finished episodes with the learned reward, on the operator stream
    served = start_serve(tmp_path / "serve", run / "bundle", reward=str(rm))
    ctx = zmq.Context.instance()
    sub = subscribe(ctx, served.operator_endpoint, ["telemetry"])
    try:
        time.sleep(0.3)  # the subscription reaches the PUB socket
        r = run_vigil("sim", "--connect", served.robot_endpoint, "--system", "reach-v3", "--episodes", "2",
                      "--steps", "24", timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        scored = []
        deadline = time.monotonic() + 10
        while len(scored) < 2 and time.monotonic() < deadline:
            for _, msg in receive(sub, timeout_ms=200):
                if msg.meta.get("event") == "episode_scored":
                    scored.append(msg.meta["values"])
        # the session numbers episodes by the resets it has seen
        assert [s["episode"] for s in scored] == [1, 2] and all(s["steps"] == 24 for s in scored)
        assert all(np.isfinite(s["ret"]) and s["std"] > 0 and s["task"] == "reach-v3" for s in scored)
    finally:
        sub.close()
        served.stop()
    r = run_vigil("serve", "--bundle", str(run / "bundle"), "--reward", str(tmp_path))
    assert r.returncode == 2 and "reward" in r.stderr


def test_post_training_optimises_the_learned_reward(run, tmp_path):
    """objective_returns: with `reward`, the objective's returns are the model's predictions from what the policy
    saw and did; `pad_success` extends the simulator's to the horizon."""
    from vigil.policies.instructions import InstructionEncoder
    from vigil.policies.reward import RewardScorer
    from vigil.training import posttrain as P
    from vigil.training.prefs import encoder_folder, save_model
    from vigil.training.reward_model import RewardConfig, fit, summaries
    from vigil.training.train_flow import load_checkpoint

    ens, cfg, _ = load_checkpoint(run / "ensemble.pt")
    encoder = InstructionEncoder.load(encoder_folder(run), prefer_gpu=False)
    pc = P.PosttrainConfig(max_steps=24, episodes=2).check()
    attempts = P.collect(ens, ["reach-v3"], [1, 2, 3], encoder, pc)
    instr = {"reach-v3": encoder.embed([P._instruction("reach-v3")])[0]}
    x = summaries(ens, [(np.stack(a.obs), instr["reach-v3"], np.zeros((len(a.obs), 4), np.float32)) for a in attempts],
                  every=1)
    fitted = fit(x, np.array([(0, 1), (1, 2)]), np.array([1.0, 0.0], np.float32), RewardConfig(steps=20))
    save_model(fitted, tmp_path / "rm", ens, {})
    with_reward = P.PosttrainConfig(max_steps=24, reward=str(tmp_path / "rm")).check()
    got = P.objective_returns(attempts, with_reward, instr)
    scorer = RewardScorer(tmp_path / "rm")
    want = [scorer.score_plans(np.stack(a.obs), instr["reach-v3"],
                               np.stack([np.clip(c, -1, 1)[:4].mean(0) for c in a.chunks])).ret for a in attempts]
    assert np.allclose(got, want) and len(set(np.round(got, 6))) == 3
    padded = P.objective_returns(attempts, P.PosttrainConfig(max_steps=100, pad_success=True).check(), instr)
    assert np.allclose(padded, [a.ret + (100 - a.steps) * a.last_reward for a in attempts])
    with pytest.raises(ValueError, match="posttrain.reward"):
        P.PosttrainConfig(reward=str(tmp_path)).check()
