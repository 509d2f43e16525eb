"""The tick as a plain object: `Session.on_obs` in process, with a fake policy (no sockets, no onnxruntime).

The fake is a `Policy` subclass whose `infer` is plain numpy: the session, agent, monitors and reply builder
under test are the real ones the runtime runs.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from vigil.monitors.base import Level
from vigil.monitors.safety import LinkMonitor
from vigil.policies.bundle import Plan, Policy
from vigil.policies.manifest import Manifest
from vigil.runtime.session import Session, act_reply, check_spec, standard_monitors
from vigil.wire.protocol import ArraySpec, ProtocolError, decode

STATE = ArraySpec("state", "float32", (2,), low=(-5.0, -5.0), high=(5.0, 5.0))


class FakePolicy(Policy):
    """action[h] = state + h (a chunk of `length`), score `vfd` = |state|^2; raises on a state of 13."""

    def __init__(self, name: str = "fake", length: int = 1, execute: int = 1, vfd: dict | None = None):
        self.manifest = Manifest(
            name=name, kind="gaussian", observation=(STATE,),
            action=ArraySpec("action", "float32", (2,), low=(-1.0, -10.0), high=(1.5, 10.0)),
            safe_action=(0.0, 0.5), control_rate_hz=100.0, sha256=f"{name:0<64}"[:64], chunk_length=length,
            chunk_execute=execute, onnx_scores=("vfd",), monitor={"vfd": vfd} if vfd else {})
        self.calls = 0

    def infer(self, obs, extra=None) -> Plan:
        self.calls += 1
        x = obs["state"]
        if x[0] == 13:
            raise RuntimeError("thirteen")
        chunk = np.stack([x + h for h in range(self.manifest.chunk_length)]).astype(np.float32)
        return Plan(chunk, {"vfd": float(x @ x)})


def make_session(policy: Policy, on_policy=None) -> Session:
    return Session("r1", b"id", policy, standard_monitors(deadline_s=0.05, saturation_window=3),
                   LinkMonitor(0.5, time.monotonic()), {"env": "fake"}, (STATE,), on_policy=on_policy)


def obs(*x: float) -> dict[str, np.ndarray]:
    return {"state": np.asarray(x, np.float32)}


def test_a_tick_returns_the_policys_action_clipped_and_its_scores():
    session = make_session(FakePolicy())
    d = session.on_obs(obs(0.5, 20.0), seq=7, t_recv=time.perf_counter())
    np.testing.assert_array_equal(d.action, [0.5, 10.0])  # clipped to the bounds
    assert not d.safe and d.scores == {"vfd": pytest.approx(400.25)} and d.plan == 1
    assert [v.monitor for v in d.verdicts] == ["observation"]  # 20 is above the declared high of 5
    assert d.policy == "fake@" + "fake".ljust(12, "0") and d.infer_s is not None and d.decide_s > 0
    assert session.last_seq == 7 and session.step == 1 and session.counters["ticks"] == 1


def test_a_stop_verdict_sends_the_safe_action():
    session = make_session(FakePolicy())
    d = session.on_obs(obs(0.1, 0.1), 1, t_recv=time.perf_counter() - 1.0)  # a second late: the deadline
    assert d.safe and d.action.tolist() == [0.0, 0.5]
    assert [(v.monitor, v.level) for v in d.verdicts] == [("deadline", Level.STOP)]
    assert session.counters["safe"] == 1


def test_a_policy_that_raises_gets_a_failed_decision_not_an_exception():
    session = make_session(FakePolicy())
    d = session.on_obs(obs(13, 0), 3, time.perf_counter())
    assert d.failed and d.safe and d.action.tolist() == [0.0, 0.5] and d.infer_s is None
    assert d.verdicts[0].monitor == "policy" and "thirteen" in d.verdicts[0].reason
    assert session.counters["policy_failed"] == 1
    assert not session.on_obs(obs(1, 0), 4, time.perf_counter()).failed  # the next one is tried afresh


def test_chunks_replan_every_execute_ticks_and_a_swap_waits_for_the_boundary():
    old, new = FakePolicy("old", length=4, execute=2), FakePolicy("new", length=4, execute=2)
    told = []
    session = make_session(old, on_policy=lambda s: told.append(s.policy.manifest.name))
    assert told == ["old"]
    plans = [session.on_obs(obs(0, 0), i, time.perf_counter()) for i in range(1, 4)]
    assert [d.plan for d in plans] == [1, 1, 2] and [d.action[0] for d in plans] == [0, 1, 0]
    session.offer(new)  # mid-chunk: the second action of plan 2 still comes from the old policy
    assert session.on_obs(obs(0, 0), 4, time.perf_counter()).policy.startswith("old@")
    assert session.on_obs(obs(0, 0), 5, time.perf_counter()).policy.startswith("new@")
    assert told == ["old", "new"] and session.counters["swaps"] == 1 and new.calls == 1


def test_reset_checks_its_keys_and_starts_an_episode():
    session = make_session(FakePolicy(vfd={"thresholds": {"alert": 1.0}, "window": 1}))
    session.on_obs(obs(2, 0), 1, time.perf_counter())
    with pytest.raises(ProtocolError, match="seed"):
        session.reset({"seed": -1})
    assert session.reset({"task": "t", "seed": 3}) == 1 and session.step == 0 and session.info["task"] == "t"
    d = session.on_obs(obs(2, 0), 2, time.perf_counter())
    assert d.plan == 1 and [v.monitor for v in d.verdicts] == ["vfd"]


def test_act_reply_is_a_valid_act_message():
    session = make_session(FakePolicy())
    d = session.on_obs(obs(0.25, 0.5), 42, time.perf_counter())
    msg = decode(act_reply("r1", 42, d))
    assert msg.kind == "act" and msg.seq == 42 and msg.robot == "r1"
    assert msg.arrays["action"].tolist() == [0.25, 0.5] and msg.meta["safe"] is False
    assert msg.meta["scores"] == {"vfd": pytest.approx(0.3125)} and msg.meta["plan"] == 1
    assert "infer_us" in msg.meta and msg.meta["verdicts"] == []
    lost = decode(act_reply("r1", 42, session.link_lost(session.link.check(time.monotonic() + 1) or d.verdicts[0])))
    assert lost.meta["safe"] is True and "infer_us" not in lost.meta


def test_check_spec_returns_the_declared_arrays_or_refuses():
    manifest = FakePolicy().manifest
    spec = {"observation": [STATE.to_dict()], "action": manifest.action.to_dict()}
    assert check_spec(spec, manifest) == (STATE,)
    with pytest.raises(ProtocolError, match="refused"):
        check_spec({**spec, "observation": [STATE.to_dict(), STATE.to_dict()]}, manifest)
    with pytest.raises(ProtocolError) as err:
        check_spec({"observation": "state"}, manifest)
    assert err.value.code == "bad_spec"


def test_plan_together_gives_each_robot_its_own_plan(lqr_bundle):
    """Three robots' observations planned in one onnxruntime call: each gets -K x of its own state, and its
    tick reports the plan as its own (a real linear_gain bundle; its graph takes a batch)."""
    from conftest import assert_lqr_action, gain_of

    from vigil.policies.bundle import load_policy
    from vigil.runtime.session import plan_together

    policy = load_policy(lqr_bundle)
    spec = policy.manifest.observation[0]
    sessions = [Session(f"r{i}", b"%d" % i, policy, standard_monitors(1.0, 3), LinkMonitor(0.5, time.monotonic()),
                        {}, (spec,)) for i in range(3)]
    states = [np.array([0.01 * i, -0.02, 0.03 * i], np.float32) for i in range(3)]
    assert plan_together([(s, {"state": x}) for s, x in zip(sessions, states)], max_batch=8) == 3
    K = gain_of(lqr_bundle)
    for s, x in zip(sessions, states):
        d = s.on_obs({"state": x}, 1, time.perf_counter())
        assert_lqr_action(d.action, K, x)
        assert d.plan == 1 and d.infer_s > 0
    # a batch of one is not worth a call: left to the robot's own tick
    assert plan_together([(sessions[0], {"state": states[0]})], max_batch=8) == 0


def test_telemetry_percentiles_match_numpy():
    """The telemetry's sort-based p50/p99 (cheap between ticks) equal numpy's linear percentiles."""
    from vigil.runtime.telemetry import percentiles

    rng = np.random.default_rng(0)
    assert percentiles([]) == (0.0, 0.0)
    for n in (1, 2, 3, 10, 101, 257):
        values = rng.exponential(100.0, n).tolist()
        np.testing.assert_allclose(percentiles(values), np.percentile(values, [50, 99]), rtol=1e-12)
