"""monitors/safety.py: the observation, saturation, deadline and link monitors, one tick at a time."""

from __future__ import annotations

import numpy as np
import pytest

from vigil.monitors.base import Level, Tick
from vigil.monitors.safety import DeadlineMonitor, LinkMonitor, ObservationMonitor, SaturationMonitor
from vigil.wire.protocol import ArraySpec


def tick(obs=None, action=(0.0,), raw=None, compute_s=0.0, scores=None) -> Tick:
    action = np.asarray(action, np.float32)
    return Tick("r", 1, obs or {}, action, action if raw is None else np.asarray(raw, np.float32), scores or {},
                compute_s)


def test_observation_monitor():
    m = ObservationMonitor([ArraySpec("state", "float32", (3,), (-1.0,) * 3, (1.0,) * 3),
                            ArraySpec("free", "float64", (2,))])
    free = np.zeros(2)

    def judge(x, f=free):
        return m.update(tick({"state": np.asarray(x, np.float32), "free": np.asarray(f)}))

    assert judge([0.0, 1.0, -1.0]).level == Level.OK  # bounds are inclusive
    v = judge([0.0, 1.5, 0.0])
    assert (v.monitor, v.level) == ("observation", Level.ALERT) and "state[1]" in v.reason and "above" in v.reason
    assert v.values == {"index": 1, "value": 1.5, "high": 1.0}
    v = judge([-3.0, 0.0, -2.0])
    assert v.level == Level.ALERT and "below" in v.reason and v.values["index"] == 0 and v.values["low"] == -1.0
    assert judge([np.nan, 0.0, 0.0]).level == Level.STOP
    assert judge([0.0, 0.0, 0.0], [1e30, -1e30]).level == Level.OK  # no bounds declared: any finite value
    assert judge([0.0, 0.0, 0.0], [np.inf, 0.0]).level == Level.STOP


def test_observation_monitor_one_sided_bounds():
    m = ObservationMonitor([ArraySpec("x", "float32", (2,), low=(0.0, 0.0))])
    assert m.update(tick({"x": np.array([1e6, 0.0], np.float32)})).level == Level.OK
    assert m.update(tick({"x": np.array([-1.0, 0.0], np.float32)})).level == Level.ALERT
    h = ObservationMonitor([ArraySpec("x", "float32", (2,), high=(0.0, 0.0))])
    assert h.update(tick({"x": np.array([-1e6, 0.0], np.float32)})).level == Level.OK
    assert h.update(tick({"x": np.array([0.0, 1.0], np.float32)})).level == Level.ALERT


@pytest.mark.parametrize("low, high, value", [((0.0, 0.0), None, np.inf), (None, (0.0, 0.0), -np.inf)])
def test_observation_monitor_stops_on_infinity_with_one_sided_bounds(low, high, value):
    m = ObservationMonitor([ArraySpec("x", "float32", (2,), low, high)])
    assert m.update(tick({"x": np.array([value, 0.0], np.float32)})).level == Level.STOP


def test_observation_monitor_checks_integer_ranges():
    enc = ObservationMonitor([ArraySpec("enc", "int32", (2,), (0.0, 0.0), (100.0, 100.0))])
    assert enc.update(tick({"enc": np.array([5, 100], np.int32)})).level == Level.OK
    v = enc.update(tick({"enc": np.array([5, 101], np.int32)}))
    assert v.level == Level.ALERT and v.values["index"] == 1


def test_saturation_monitor():
    m = SaturationMonitor(window=4, warn_fraction=0.5)
    sat = dict(action=(1.0,), raw=(3.0,))  # clipping changed the action
    free = dict(action=(0.5,), raw=(0.5,))
    assert [m.update(tick(**sat)).level for _ in range(3)] == [Level.OK] * 3  # window not full yet
    assert m.update(tick(**sat)).level == Level.ALERT  # 4 of 4
    v = m.update(tick(**free))
    assert v.level == Level.WARN and v.values["fraction"] == 0.75
    assert m.update(tick(**free)).level == Level.WARN  # 2 of 4
    assert m.update(tick(**free)).level == Level.OK  # 1 of 4
    m.reset()
    assert [m.update(tick(**sat)).level for _ in range(4)] == [Level.OK] * 3 + [Level.ALERT]


def test_saturation_of_an_exploring_policy_is_judged_by_its_mean():
    """Samples of an exploring policy reach the bounds by design: its `mean_clipped` score is judged instead."""
    m = SaturationMonitor(window=4)
    noisy = dict(action=(1.0,), raw=(1.4,), scores={"logp": -1.0, "mean_clipped": 0.0})
    assert [m.update(tick(**noisy)).level for _ in range(8)] == [Level.OK] * 8
    intent = dict(action=(1.0,), raw=(1.4,), scores={"logp": -1.0, "mean_clipped": 1.0})
    assert [m.update(tick(**intent)).level for _ in range(4)][-1] == Level.ALERT


def test_deadline_monitor():
    m = DeadlineMonitor(0.01)
    assert m.update(tick(compute_s=0.01)).level == Level.OK
    v = m.update(tick(compute_s=0.02))
    assert v.level == Level.STOP and v.values["compute_ms"] == pytest.approx(20) and v.values["deadline_ms"] == 10


def test_link_monitor():
    m = LinkMonitor(0.5, now=100.0)
    assert m.check(100.5) is None  # silence == timeout is not yet a loss
    v = m.check(100.7)
    assert (v.monitor, v.level) == ("link", Level.STOP) and v.values["silence_s"] == pytest.approx(0.7)
    assert m.lost and m.check(101.5) is None  # reported once
    assert m.seen(102.0) == pytest.approx(2.0)  # the outage, ended
    assert not m.lost and m.seen(102.1) is None
    assert m.check(102.5) is None and m.check(102.7) is not None  # re-armed
