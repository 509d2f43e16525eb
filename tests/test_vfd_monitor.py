"""Conformal calibration and the onboard VFD monitor (numpy only, no policy needed)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vigil.monitors.base import Level, Tick
from vigil.monitors.conformal import calibrate, conformal_threshold, windowed
from vigil.monitors.vfd import VFDMonitor


@pytest.mark.parametrize("n,alpha", [(9, 0.1), (99, 0.1), (1000, 0.1), (200, 0.02), (500, 0.25)])
def test_conformal_threshold_gives_the_requested_false_alarm_rate(n, alpha):
    """Split conformal: over calibrations, the false-alarm rate on fresh exchangeable scores lies in
    [alpha - 1/(n+1), alpha]. Averaged over 400 calibrations it must land there (up to Monte Carlo error)."""
    rng = np.random.default_rng(n)
    rates = []
    for _ in range(400):
        threshold = conformal_threshold(rng.gamma(2.0, 1.0, n), alpha)
        rates.append(np.mean(rng.gamma(2.0, 1.0, 5000) > threshold))
    mean = float(np.mean(rates))
    mc = 4 * np.std(rates) / math.sqrt(len(rates)) + 1e-3  # four standard errors of the mean
    assert alpha - 1 / (n + 1) - mc <= mean <= alpha + mc


def test_conformal_threshold_rank_and_edge_cases():
    scores = np.arange(1.0, 10.0)  # 1..9, n = 9
    assert conformal_threshold(scores, 0.1) == 9.0  # ceil(10 * 0.9) = 9th smallest
    assert conformal_threshold(scores, 0.5) == 5.0  # ceil(10 * 0.5) = 5th smallest
    assert conformal_threshold(scores[:5], 0.05) == math.inf  # too few scores for 5%: never alarm
    with pytest.raises(ValueError, match="alpha"):
        conformal_threshold(scores, 1.5)
    with pytest.raises(ValueError, match="finite"):
        conformal_threshold([1.0, float("nan")], 0.1)


def test_windowed_is_a_running_mean_that_starts_short():
    np.testing.assert_allclose(windowed([1, 2, 3, 4, 5], 3), [1, 1.5, 2, 3, 4])
    np.testing.assert_allclose(windowed([4, 2], 1), [4, 2])


def test_calibrate_pools_windowed_scores_of_every_episode():
    episodes = [[1.0, 1.0, 10.0], [2.0, 2.0]]
    pooled = np.concatenate([windowed(e, 2) for e in episodes])  # [1, 1, 5.5, 2, 2]
    th = calibrate(episodes, window=2, alphas={"warn": 0.5, "alert": 0.2})
    assert th == {"warn": conformal_threshold(pooled, 0.5), "alert": conformal_threshold(pooled, 0.2)}


def tick(vfd: float | None, plan: int) -> Tick:
    a = np.zeros(4, np.float32)
    return Tick("r", plan, {"state": np.zeros(39, np.float32)}, a, a, {} if vfd is None else {"vfd": vfd}, 0.0, plan)


def test_vfd_monitor_levels_window_and_plans():
    m = VFDMonitor({"warn": 1.0, "alert": 2.0, "stop": 5.0}, window=2)
    assert m.update(tick(0.5, 1)).level == Level.OK
    assert m.update(tick(3.0, 2)).level == Level.WARN  # mean(0.5, 3.0) = 1.75
    v = m.update(tick(3.0, 3))  # mean(3, 3) = 3 > alert
    assert v.level == Level.ALERT and v.values["vfd"] == pytest.approx(3.0) and v.values["threshold"] == 2.0
    # the same plan seen again (a chunk executing) is not a new score: the verdict stands, the window unchanged
    for _ in range(5):
        assert m.update(tick(3.0, 3)).level == Level.ALERT
    assert m.update(tick(20.0, 4)).level == Level.STOP  # mean(3, 20)
    m.reset()
    assert m.update(tick(0.1, 1)).level == Level.OK


def test_vfd_monitor_ignores_policies_without_the_score_and_refuses_bad_config():
    m = VFDMonitor({"alert": 1.0})
    assert m.update(tick(None, 1)).level == Level.OK
    with pytest.raises(ValueError, match="unknown levels"):
        VFDMonitor({"panic": 1.0})
    assert VFDMonitor.from_manifest({"thresholds": {"alert": 2.0}, "window": 4}).window == 4
