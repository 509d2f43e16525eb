"""bench/rl.py (issue 7 item 2): the learning-curve binning, a real (tiny) Stable-Baselines3 run through the
same evaluation as ours, and the report's verdicts on hand-made results."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("stable_baselines3")
pytest.importorskip("mujoco")

import bench.rl as bench_rl  # noqa: E402  (after the skips: it needs them)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_curve_bins_episodes_by_the_rollout_they_ended_in():
    R = bench_rl.ROLLOUT
    curve = bench_rl.curve_of([10, R, R + 1, 3 * R], [1.0, 3.0, 10.0, 7.0], 3 * R)
    assert curve[0] == 2.0 and curve[1] == 10.0 and curve[2] == 7.0
    assert all(math.isnan(x) for x in bench_rl.curve_of([], [], 2 * R))


def test_sb3_run_is_evaluated_like_ours(tmp_path):
    """2048 steps of SB3 PPO with the shared settings, then the deterministic evaluation on the fixed seeds."""
    res = bench_rl.train_sb3("InvertedPendulum-v5", 0, 2048, tmp_path / "sb3")
    assert len(res["eval"]) == bench_rl.EVAL_EPISODES and all(r > 0 for r in res["eval"])
    assert len(res["curve"]) == 1 and res["curve"][0] > 0
    model = bench_rl.sb3_model("InvertedPendulum-v5", 0)
    pi = model.policy.mlp_extractor.policy_net
    assert [m.out_features for m in pi if hasattr(m, "out_features")] == [256, 256]  # the same size as ours
    assert (tmp_path / "sb3" / "model.zip").exists()
    # the evaluation is deterministic: the same policy gives the same returns on the same seeds
    again = bench_rl.evaluate("InvertedPendulum-v5", lambda o: np.zeros(1, np.float32), episodes=3)
    assert again == bench_rl.evaluate("InvertedPendulum-v5", lambda o: np.zeros(1, np.float32), episodes=3)


def test_report_states_the_targets_honestly():
    def runs(finals):
        return [{"eval": [f] * 3, "curve": [f] * 5, "seconds": 100.0, "steps": 100_000} for f in finals]

    results = {"Hopper-v5": {"bpo": runs([900, 1000, 1100]), "ppo": runs([1000, 1100, 1200]),
                             "sb3-ppo": runs([1000, 1500, 2000])}}
    text = bench_rl.report(results, 3, None, None)
    assert "| Hopper-v5 | bpo | 1000.0 ± 100.0 | 900, 1000, 1100 |" in text
    assert "BPO below PPO" in text and "within one std or above" in text
    assert "our PPO vs SB3: within one std" in text
