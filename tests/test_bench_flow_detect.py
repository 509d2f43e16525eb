"""bench/flow_detect.py: its statistics on known inputs, and one real rollout of each kind it plays."""

from __future__ import annotations

import numpy as np
import pytest

import bench.flow_detect as fd


def test_auroc_counts_ties_half_and_matches_the_pairwise_definition():
    assert fd.auroc([1, 2, 3], [2, 4]) == pytest.approx(4.5 / 6)
    assert fd.auroc([0, 0], [1]) == 1.0 and fd.auroc([1], [0, 0]) == 0.0
    rng = np.random.default_rng(0)
    neg, pos = rng.normal(size=40), rng.normal(0.5, size=30)
    pairs = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert fd.auroc(neg, pos) == pytest.approx(pairs)
    assert np.isnan(fd.auroc([], [1.0]))


def _episode(condition, task, success, level, rng, plans=12):
    scores = {"vfd": list(level + 0.1 * rng.random(plans)), "random": list(rng.random(plans))}
    return {"condition": condition, "task": task, "seed": 0, "success": success, "steps": 100, "scores": scores}


def test_analysis_separates_a_perfect_detector_from_random():
    rng = np.random.default_rng(1)
    eps = []
    for task, rate in (("a", 1.0), ("b", 0.5), ("c", 0.0)):  # VFD level rises as the task's success falls
        level = {"a": 1.0, "b": 2.0, "c": 3.0}[task]
        for k in range(10):
            ok = k < 10 * rate
            eps.append(_episode("nominal", task, ok, level + (0 if ok else 0.5), rng))
            eps.append(_episode("calibration", task, True, level, rng))
            eps.append(_episode("positions", task, False, 10.0, rng))  # far out, always fails
    res = fd.analyse_run(eps, ("vfd", "random"), early_plans=8, window=3, alpha=0.1)
    assert res["shift"][("vfd", "positions")] == 1.0
    assert 0.3 < res["shift"][("random", "positions")] < 0.7
    assert res["tpr"][("vfd", "positions")] == 1.0 and res["time"][("vfd", "positions")] == 0
    assert res["fail"][("vfd", "pooled")] > 0.9 and res["fail"][("vfd", "nominal")] > 0.5
    assert res["task"]["vfd"][0] == pytest.approx(-1.0)  # Spearman: higher VFD, lower success
    assert res["success"]["positions"] == 0.0 and res["n"]["nominal"] == 30
    # the calibrated threshold keeps the calibration scores' false-alarm rate near alpha per plan
    assert res["thr"]["vfd"] < 10


@pytest.mark.parametrize("condition,task", [("positions", "reach-v3"), ("noise", "push-v3"),
                                            ("heldout", "door-close-v3")])
def test_rollout_scores_every_detector_in_the_windows(tiny_run, condition, task):
    job = fd.Job(str(tiny_run), condition, task, (20, 21), max_steps=16, detect_plans=3, ablation_plans=2,
                 noise_dims=(0, 1, 2) if condition == "noise" else None)
    eps = fd.run_job(job)
    assert [e["seed"] for e in eps] == [20, 21] and all(e["steps"] == 16 for e in eps)
    for e in eps:
        s = e["scores"]
        assert all(len(s[d]) == 3 for d in fd.DETECTORS)
        assert len(s["vfd_anchor"]) == len(s["vfd_M2"]) == len(s["vfd_anchor_N1"]) == 2 and "vfd_M3" not in s
        assert all(v > 0 for v in s["vfd"]) and all(np.isfinite(v) for d in s for v in s[d])
    assert eps[0]["scores"]["vfd"] != eps[1]["scores"]["vfd"]
    again = fd.run_job(job)  # seeded: the same episodes again
    assert again[0]["scores"] == eps[0]["scores"]
