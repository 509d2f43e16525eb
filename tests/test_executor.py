"""The asynchronous chunk executor and the delay model, in process: pure state machines over ticks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vigil.policies.delays import DelayModel
from vigil.policies.executor import MERGES, ChunkExecutor, DelayEstimator
from vigil.policies.rtc import prefix_weights
from vigil.runtime.config import MERGES as CONFIG_MERGES
from vigil.runtime.config import ConfigError, ServeConfig

H = 8


def plan(t0: int, m: int = 2) -> np.ndarray:
    """A chunk that says who made it: row i of the plan started at t0 is t0 * 100 + i."""
    return np.repeat((t0 * 100 + np.arange(H, dtype=np.float32))[:, None], m, axis=1)


def drive(ex: ChunkExecutor, ticks: int, delay_of=lambda t0: 3) -> tuple[list, list]:
    """Run `ticks` ticks; a plan started at t0 arrives at t0 + delay_of(t0). Returns the actions' first
    components (None when exhausted) and the requests made."""
    flight: dict[int, int] = {}
    out, requests = [], []
    for t in range(ticks):
        for t0, due in sorted(flight.items()):
            if due <= t:
                ex.deliver(plan(t0), t0, due)
                del flight[t0]
        r = ex.request(t)
        if r is not None:
            requests.append(r)
            if r.blocking:
                ex.deliver(plan(t), t, t)
            else:
                flight[t] = t + delay_of(t)
        a, _ = ex.action(t)
        out.append(None if a is None else float(a[0]))
    return out, requests


def test_the_first_plan_blocks_and_a_plan_is_adopted_at_exactly_started_plus_d():
    ex = ChunkExecutor(H, 4, "rtc", initial_delay=2)
    out, requests = drive(ex, 8, lambda t0: 1)  # early: arrives at t0 + 1, adopted at t0 + d = t0 + 2
    assert requests[0].blocking and requests[0].tick == 0
    assert [(r.tick, r.delay, r.execute, r.blocking) for r in requests[1:]] == [(4, 2, 4, False)]
    assert out[:6] == [0, 1, 2, 3, 4, 5]  # indices 4, 5 of the first chunk: committed while the plan is computed
    assert out[6] == 402.0  # adopted at started + d = 6, from index d = 2
    assert ex.counts["late"] == 0 and ex.counts["adopted"] == 2


def test_the_adoption_tick_uses_the_delay_assumed_when_the_plan_started():
    ex = ChunkExecutor(H, 4, "rtc", initial_delay=3)
    out, requests = drive(ex, 8, lambda t0: 3)
    assert requests[1].delay == 3
    assert out[6] == 6.0 and out[7] == 403.0  # old chunk up to started + d - 1, then index d of the new one


def test_a_late_plan_is_adopted_at_the_next_tick_from_the_index_of_the_elapsed_ticks():
    ex = ChunkExecutor(H, 4, "rtc", initial_delay=1)
    out, _ = drive(ex, 8, lambda t0: 3)  # assumed d = 1, arrives 3 ticks after its start
    assert out[4:8] == [4.0, 5.0, 6.0, 403.0]  # the old chunk goes on (indices 5, 6) until it arrives at 7
    assert ex.counts["late"] == 1


def test_an_exhausted_chunk_gives_none_never_an_action_past_its_end():
    ex = ChunkExecutor(H, 4, "rtc", initial_delay=2)
    out, _ = drive(ex, 14, lambda t0: 100 if t0 else 0)  # the planner stalls after the first plan
    assert out[:8] == [float(i) for i in range(8)]
    assert out[8:] == [None] * 6
    assert ex.counts["exhausted"] == 6


def test_a_plan_arriving_after_an_outage_resumes_at_the_index_of_the_elapsed_ticks():
    ex = ChunkExecutor(H, 4, "rtc", initial_delay=2)
    out, _ = drive(ex, 12, lambda t0: 6)  # started at 4, arrives at 10 (after the chunk ran out at 8)
    assert out[8:10] == [None, None] and out[10] == 406.0


def test_a_plan_older_than_its_horizon_is_discarded():
    ex = ChunkExecutor(H, 4, "naive", initial_delay=2)
    out, _ = drive(ex, 14, lambda t0: 9)
    assert out[12] is None and ex.counts["stale"] == 1


def test_sync_executes_s_actions_and_every_plan_blocks():
    ex = ChunkExecutor(H, 4, "sync")
    out, requests = drive(ex, 9)
    assert all(r.blocking for r in requests) and [r.tick for r in requests] == [0, 4, 8]
    assert out == [0, 1, 2, 3, 400, 401, 402, 403, 800]


def test_the_delay_estimate_is_a_quantile_not_the_mean_and_keeps_d_le_s_le_h_minus_d():
    est = DelayEstimator(quantile=0.9, initial=1)
    for d in [1] * 9 + [5]:
        est.add(d)
    assert est.estimate() == math.ceil(np.quantile([1] * 9 + [5], 0.9)) == 2
    est = DelayEstimator(quantile=0.9)
    for d in [1] * 8 + [6, 6]:
        est.add(d)
    assert est.estimate() == 6  # the mean (2) would be far too short
    ex = ChunkExecutor(H, 2, "rtc", initial_delay=3)
    assert ex.schedule() == (3, 3)  # d > s: s is raised to d
    ex = ChunkExecutor(H, 6, "rtc", initial_delay=3)
    assert ex.schedule() == (3, 5)  # s <= H - d
    ex = ChunkExecutor(H, 4, "rtc", initial_delay=7)
    assert ex.schedule() == (4, 4)  # d capped at H / 2
    drive(ex, 9, lambda t0: 7)
    assert ex.counts["delay_capped"] == 1  # counted once per plan (started at 4), not per tick


def test_adaptive_horizon_replans_after_max_d_1_ticks_when_the_vfd_is_high():
    ex = ChunkExecutor(H, 4, "rtc", initial_delay=1, adaptive_vfd=0.5)
    r = ex.request(0)
    ex.deliver(plan(0), 0, 0, {"vfd": 0.9})
    ex.action(0)
    assert ex.request(1) is not None and ex.counts["adaptive"] == 1  # s = max(d, 1) = 1
    ex = ChunkExecutor(H, 4, "rtc", initial_delay=1, adaptive_vfd=0.5)
    r = ex.request(0)
    ex.deliver(plan(0), 0, 0, {"vfd": 0.1})
    ex.action(0)
    assert ex.request(1) is None and r is not None


def test_the_rtc_prefix_and_weights():
    ex = ChunkExecutor(H, 3, "rtc", initial_delay=2)
    ex.request(0)
    ex.deliver(plan(0), 0, 0)
    for t in range(3):
        assert ex.request(t) is None
        ex.action(t)
    r = ex.request(3)
    assert r.tick == 3 and r.execute == 3 and r.delay == 2
    want = np.zeros((H, 2), np.float32)
    want[:H - 3] = plan(0)[3:]  # the current chunk from index s on, on the new chunk's indices, zero-padded
    np.testing.assert_array_equal(r.prefix, want)
    np.testing.assert_array_equal(r.weights, prefix_weights(H, 3, 2, "exp"))
    assert r.weights[0] == r.weights[1] == 1.0 and r.weights[H - 3:].sum() == 0
    trained = ChunkExecutor(H, 3, "rtc", initial_delay=2, rtc_schedule="zeros")
    trained.request(0)
    trained.deliver(plan(0), 0, 0)
    assert trained.request(3).weights.tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    naive = ChunkExecutor(H, 3, "naive", initial_delay=2)
    naive.request(0)
    naive.deliver(plan(0), 0, 0)
    assert naive.request(3).prefix is None


def test_blend_is_0_3_old_plus_0_7_new_over_the_overlap():
    ex = ChunkExecutor(H, 4, "blend", initial_delay=2)
    out, _ = drive(ex, 9, lambda t0: 3)
    assert out[7] == pytest.approx(0.3 * 7 + 0.7 * 403)  # arrived at 7: old index 7, new index 3
    assert out[8] == 404.0  # the old chunk ended: the new one alone


def test_temporal_ensembling_weights_every_chunks_prediction_oldest_first():
    ex = ChunkExecutor(H, 4, "temporal", initial_delay=1)
    out, requests = drive(ex, 4, lambda t0: 1)
    assert [r.tick for r in requests] == [0, 1, 2, 3] and requests[1].execute == 1
    # tick 3: predictions of the plans started at 0, 1, 2 (arrived at 2, 3): 3, 102, 201
    w = np.exp(-0.01 * np.arange(3))
    assert out[3] == pytest.approx(float((w * np.array([3.0, 102.0, 201.0])).sum() / w.sum()), rel=1e-6)
    assert out[0] == 0.0 and out[1] == 1.0


def test_the_merges_the_config_offers_are_the_executors():
    assert CONFIG_MERGES == MERGES


def test_delay_models_parse_and_are_deterministic():
    assert DelayModel.parse("constant:50ms").sampler(0).draw() == 50.0
    jitter = DelayModel.parse("jitter:50ms,10ms")
    a, b = jitter.sampler(7), jitter.sampler(7)
    draws = [a.draw() for _ in range(200)]
    assert draws == [b.draw() for _ in range(200)] and min(draws) >= 0.0
    spikes = DelayModel.parse("spikes:50ms,p=0.05,x=10")
    s = spikes.sampler(3)
    draws = [s.draw() for _ in range(2000)]
    assert set(draws) == {50.0, 500.0} and 0.02 < draws.count(500.0) / 2000 < 0.09
    assert DelayModel.ticks(50, 20) == 1 and DelayModel.ticks(51, 20) == 2 and DelayModel.ticks(0, 20) == 0


@pytest.mark.parametrize("text", ["bogus", "constant:50", "constant:50ms,3ms", "jitter:50ms", "spikes:50ms,p=0.1",
                                  "spikes:50ms,p=2,x=3", "jitter:-5ms,1ms"])
def test_bad_delay_models_name_the_key(text):
    with pytest.raises(ValueError, match="plan_delay"):
        DelayModel.parse(text)
    with pytest.raises(ConfigError, match="config key 'plan_delay'"):
        ServeConfig(plan_delay=text)


def test_async_config_keys_are_checked():
    with pytest.raises(ConfigError, match="'execution'"):
        ServeConfig(execution="later")
    with pytest.raises(ConfigError, match="'delay_quantile'"):
        ServeConfig(delay_quantile=0.0)
    with pytest.raises(ConfigError, match="'execute_horizon'"):
        ServeConfig(execute_horizon=-1)
    config = ServeConfig(execution="async", merge="blend", plan_delay="spikes:50ms,p=0.05,x=10")
    assert config.merge == "blend"


# -- the runtime's per-robot driver of the executor (runtime/planner.py), with a fake RTC policy ---------------


class FakeRTCPolicy:
    """Plans `plan(t)` for the observation of tick t and records the graph inputs each plan was given."""

    def __init__(self, mode: str):
        from types import SimpleNamespace

        self.rtc_mode = mode
        self.manifest = SimpleNamespace(chunk_length=H, chunk_execute=4, control_rate_hz=20.0, policy_id="fake@1")
        self.extras: list = []

    def rtc_inputs(self, prefix: np.ndarray, weight: np.ndarray) -> dict[str, np.ndarray]:
        return {"prefix": prefix, "prefix_weight": weight}

    def infer(self, obs, extra=None):
        from vigil.policies.bundle import Plan

        self.extras.append(extra)
        return Plan(plan(int(obs["t"])), {"vfd": 0.0})


class FakeAgent:
    def __init__(self, policy):
        self.policy, self.plans = policy, 0

    def plan_extra(self):
        return None


@pytest.mark.parametrize("mode, schedule", [("guided", "exp"), ("trained", "zeros")])
def test_the_runtime_sends_the_prefix_to_a_policy_with_rtc_and_adopts_on_schedule(mode, schedule):
    from vigil.runtime.planner import AsyncExecution, AsyncSettings, Planner

    policy = FakeRTCPolicy(mode)
    planner = Planner()
    try:
        ex = AsyncExecution(planner, AsyncSettings(plan_delay=DelayModel.parse("constant:100ms")), policy, "r")
        out = []
        for t in range(9):
            ex.collect(t, 1)
            request = ex.executor.request(t)
            if request is not None:
                ex.start(request, {"t": t}, FakeAgent(policy), 1)
            a, info = ex.executor.action(t)
            out.append(float(a[0]))
    finally:
        planner.close()
    assert out == [0, 1, 2, 3, 4, 5, 402, 403, 404]  # d = 2 ticks (100 ms at 20 Hz): the plan of tick 4 from 6
    assert policy.extras[0] is None  # the first plan: nothing executing, no prefix
    second = policy.extras[1]
    want = np.zeros((H, 2), np.float32)
    want[:H - 4] = plan(0)[4:]
    np.testing.assert_array_equal(second["prefix"], want)
    np.testing.assert_array_equal(second["prefix_weight"], prefix_weights(H, 4, 2, schedule))
    assert ex.stats()["delay_p50_ticks"] == 2 and ex.stats()["adopted"] == 2 and ex.executor.in_flight == 1


def test_d_is_capped_at_the_delay_a_trained_rtc_policy_was_trained_for():
    ex = ChunkExecutor(16, 4, "rtc", initial_delay=6, rtc_schedule="zeros", max_delay=3)
    assert ex.schedule() == (3, 4)
