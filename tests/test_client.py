"""The robot driver's contract (runtime/client.py) against a real `vigil serve`: `RobotLink.step` applies the
runtime's action when it comes in time and the safe action otherwise (and says why), resumes a session the
runtime forgot, keeps an idle session alive with heartbeats; `infer` is the openpi-style lockstep call;
`ControlLink` swaps bundles and `probe` tells whether a runtime answers. Real processes and sockets; time
enters only as generous upper bounds."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_lqr_action, gain_of, pitch_specs, tcp_endpoint, wait_until

from vigil.runtime.auth import ClientKeys, create_keys
from vigil.runtime.client import ControlLink, LinkError, ReplyError, RobotLink, probe
from vigil.runtime.launch import LOCAL_TCP
from vigil.runtime.store import AlertStore

X = np.array([0.05, -0.02, 0.1], np.float32)


def obs(x: np.ndarray = X) -> dict[str, np.ndarray]:
    return {"state": x}


def safe_action_of(link: RobotLink) -> np.ndarray:
    assert link.hello_reply is not None
    return np.asarray(link.hello_reply.manifest["safe_action"], np.float32)


def wait_stopped(pid: int) -> None:
    """Until every thread of pid is stopped (SIGSTOP takes effect asynchronously)."""
    def all_stopped() -> bool:
        stats = [(t / "stat").read_text() for t in Path(f"/proc/{pid}/task").iterdir()]
        return all(s[s.rindex(")") + 2] in "tT" for s in stats)

    wait_until(all_stopped, timeout_s=10, interval_s=0.005)


@pytest.fixture(scope="module")
def half_gain_bundle(lqr_bundle, tmp_path_factory) -> Path:
    """The aircraft-pitch LQR with half the gain: a bundle the runtime accepts in a swap."""
    from vigil.policies.manifest import read_manifest
    from vigil.training.export import export_linear_gain

    m = read_manifest(lqr_bundle)
    folder = tmp_path_factory.mktemp("client") / "pitch-half-gain"
    export_linear_gain(folder, "pitch-half-gain", gain_of(lqr_bundle) / 2, m.control_rate_hz,
                       state_low=m.observation[0].low, state_high=m.observation[0].high)
    return folder


# -- step -------------------------------------------------------------------------------------------------


def test_step_returns_the_runtime_action_with_its_verdicts_and_timing(serve, lqr_bundle, links):
    served = serve(lqr_bundle, deadline_ms=5000)
    link = links(served.robot_endpoint, "stepper")
    reply = link.step(obs(), deadline_s=5.0)
    assert reply.fallback is None and reply.safe is False and reply.verdicts == ()
    assert_lqr_action(reply.action, gain_of(lqr_bundle), X)
    assert reply.policy == served.policy and reply.message is not None and reply.message.seq == reply.seq
    assert reply.latency_s is not None  # measured (how fast: bench/latency.py)
    assert "infer_us" in reply.meta and reply.late == ()


def test_step_falls_back_on_the_safe_action_at_its_deadline_and_reports_the_late_answer(serve, lqr_bundle, links):
    served = serve(lqr_bundle, deadline_ms=60_000, link_timeout_s=60)
    link = links(served.robot_endpoint, "watchdog")
    os.kill(served.proc.pid, signal.SIGSTOP)  # the runtime hangs: nothing can answer
    try:
        wait_stopped(served.proc.pid)
        stalled = link.step(obs(), deadline_s=0.2)
    finally:
        os.kill(served.proc.pid, signal.SIGCONT)
    assert stalled.fallback == "timeout" and stalled.safe and stalled.message is None
    np.testing.assert_array_equal(stalled.action, safe_action_of(link))

    x = np.array([-0.1, 0.03, 0.0], np.float32)
    reply = link.step(obs(x), deadline_s=10.0)  # the runtime answers both, in order
    assert reply.fallback is None
    assert_lqr_action(reply.action, gain_of(lqr_bundle), x)  # the answer to this observation, not the late one
    assert [late.seq for late in reply.late] == [stalled.seq] and link.late == 1
    assert reply.late[0].message.kind == "act" and reply.late[0].latency_s is not None  # measured (how long: bench/)


def test_step_on_an_error_answer_applies_the_safe_action(serve, lqr_bundle, links):
    served = serve(lqr_bundle, deadline_ms=5000)
    link = links(served.robot_endpoint, "wrong-shape")
    reply = link.step({"state": np.zeros(4, np.float32)}, deadline_s=5.0)
    assert reply.fallback == "error:bad_shape" and reply.safe
    assert reply.message is not None and reply.message.kind == "error" and reply.meta["code"] == "bad_shape"
    np.testing.assert_array_equal(reply.action, safe_action_of(link))
    assert link.step(obs(), deadline_s=5.0).fallback is None  # the link stays usable


def test_step_on_a_closed_link_is_unsent_with_the_safe_action(serve, lqr_bundle, links):
    """How long the step waits (the robot's pace) is measured in bench/, not asserted here."""
    served = serve(lqr_bundle)
    link = links(served.robot_endpoint, "unplugged")
    link.close()
    reply = link.step(obs(), deadline_s=0.1)
    assert reply.fallback == "unsent" and link.unsent == 1
    np.testing.assert_array_equal(reply.action, safe_action_of(link))


def test_the_runtime_bye_is_remembered_and_explains_the_fallback(serve, lqr_bundle, links):
    served = serve(lqr_bundle, deadline_ms=5000)
    link = links(served.robot_endpoint, "left-alone")
    assert link.step(obs(), deadline_s=5.0).fallback is None
    served.stop()  # the runtime says bye to every robot it knows (best effort; on loopback it arrives)

    def bye_taken_in() -> bool:
        link.heartbeat_if_idle()
        return link.runtime_bye is not None

    wait_until(bye_taken_in, timeout_s=10)
    assert link.runtime_bye == "runtime stopping"
    reply = link.step(obs(), deadline_s=0.1)
    assert reply.fallback == "bye" and reply.safe
    np.testing.assert_array_equal(reply.action, safe_action_of(link))


def test_step_resumes_the_session_after_the_runtime_restarts(serve, lqr_bundle, tmp_path):
    endpoint = tcp_endpoint()
    first = serve(lqr_bundle, robot_endpoint=endpoint, deadline_ms=5000, link_timeout_s=60)
    link = RobotLink(endpoint, "phoenix")
    try:
        link.hello(*pitch_specs())
        link.reset(episode=0, task="hold-pitch")
        assert link.step(obs(), deadline_s=5.0).fallback is None
        first.kill()  # a crash: no bye
        assert link.step(obs(), deadline_s=0.1).fallback in ("timeout", "unsent")
        second = serve(lqr_bundle, robot_endpoint=endpoint, deadline_ms=5000, link_timeout_s=60)
        fallbacks = []

        def served_again() -> bool:
            reply = link.step(obs(), deadline_s=0.5, resume_s=2.0)
            fallbacks.append(reply.fallback)
            if reply.fallback is None:
                assert_lqr_action(reply.action, gain_of(lqr_bundle), X)
            return reply.fallback is None

        wait_until(served_again, timeout_s=30, interval_s=0)
        assert "no_session" in fallbacks and link.resumed == 1, fallbacks
        link.bye()
        counters = second.stop()
        assert counters["ticks"] >= 1 and counters.get("error.no_session", 0) >= 1
    finally:
        link.close()


def test_heartbeats_keep_an_idle_link_alive_and_a_silent_one_gets_the_link_loss_act(serve, lqr_bundle, links):
    served = serve(lqr_bundle, link_timeout_s=1.0)
    link = links(served.robot_endpoint, "idler")
    link.step(obs(), deadline_s=5.0)
    end = time.monotonic() + 3.0  # three link timeouts with nothing to say but heartbeats
    while time.monotonic() < end:
        link.heartbeat_if_idle()
        time.sleep(0.02)
    assert link.heartbeats >= 5 and link.link_lost == 0
    assert not [a for a in AlertStore(served.store, readonly=True).since(0) if a.monitor == "link"]

    time.sleep(2.5)  # now silence: the runtime declares the link lost and sends its safe action, unasked

    def link_loss_taken_in() -> bool:
        link.heartbeat_if_idle()  # takes in what the runtime sent meanwhile
        return link.link_lost == 1

    wait_until(link_loss_taken_in, timeout_s=10)
    wait_until(lambda: [a.monitor for a in AlertStore(served.store, readonly=True).since(0)] == ["link"])
    assert link.step(obs(), deadline_s=5.0).fallback is None  # and the next observation is served


# -- infer (openpi-client style) ----------------------------------------------------------------------------


def test_infer_returns_actions_and_raises_on_an_error_answer(serve, lqr_bundle, links):
    served = serve(lqr_bundle, deadline_ms=5000)
    link = links(served.robot_endpoint, "openpi-style")
    out = link.infer({"state": X.tolist()})  # lists are fine, as in openpi-client: arrays are made here
    assert_lqr_action(np.asarray(out["actions"]), gain_of(lqr_bundle), X)
    assert out["safe"] is False and out["verdicts"] == [] and out["policy"] == served.policy
    assert out["policy_timing"]["infer_ms"] >= 0
    with pytest.raises(ReplyError) as err:
        link.infer({"state": np.zeros(2, np.float32)})
    assert err.value.code == "bad_shape"


# -- ControlLink and probe --------------------------------------------------------------------------------


def test_control_link_swaps_and_reports_a_refusal(serve, lqr_bundle, half_gain_bundle, links, tmp_path):
    served = serve(lqr_bundle, control_endpoint=LOCAL_TCP, deadline_ms=5000)
    control = ControlLink(served.control_endpoint)
    old = served.policy
    answer = control.swap(half_gain_bundle, timeout_s=60)
    assert answer["kind"] == "swap" and answer["ok"] is True and answer["previous"] == old
    new = answer["policy"]
    assert new.startswith("pitch-half-gain@")
    refused = control.swap(tmp_path / "no-such-bundle", timeout_s=60)
    assert refused["ok"] is False and "manifest.json" in refused["reason"] and refused["policy"] == new
    reply = links(served.robot_endpoint, "after-swap").step(obs(), deadline_s=5.0)
    assert reply.policy == new
    assert_lqr_action(reply.action, gain_of(half_gain_bundle), X)
    counters = served.stop()
    assert counters["swaps"] == 1 and counters["swaps_refused"] == 1


def test_probe_tells_whether_a_runtime_answers(serve, lqr_bundle):
    served = serve(lqr_bundle, control_endpoint=LOCAL_TCP)
    control = ControlLink(served.control_endpoint)
    assert control.probe(timeout_s=5.0) and probe(served.robot_endpoint, timeout_s=5.0)
    counters = served.stop()
    assert counters.get("errors", 0) == 0 and counters.get("ticks", 0) == 0  # probing touched nothing
    assert not control.probe(timeout_s=0.3) and not probe(served.robot_endpoint, timeout_s=0.3)
    with pytest.raises(LinkError, match="no answer"):
        control.swap(lqr_bundle, timeout_s=0.3)


def test_curve_keys_work_for_both_links(serve, lqr_bundle, half_gain_bundle, tmp_path):
    _, runtime_secret = create_keys(tmp_path / "server", "runtime")
    _, robot_secret = create_keys(tmp_path / "allowed", "robot")
    keys = ClientKeys.load(robot_secret, tmp_path / "server" / "runtime.key")
    served = serve(lqr_bundle, curve_secret=runtime_secret, curve_allow=tmp_path / "allowed",
                   control_endpoint=LOCAL_TCP, deadline_ms=5000)
    link = RobotLink(served.robot_endpoint, "trusted", keys=keys)
    try:
        link.hello(*pitch_specs(), timeout_s=10)
        reply = link.step(obs(), deadline_s=5.0)
        assert reply.fallback is None
        assert_lqr_action(reply.action, gain_of(lqr_bundle), X)
    finally:
        link.close()
    assert probe(served.robot_endpoint, timeout_s=5.0, keys=keys)
    assert not probe(served.robot_endpoint, timeout_s=0.5)  # no keys: no handshake, no answer
    control = ControlLink(served.control_endpoint, keys=keys)
    assert control.probe(timeout_s=5.0) and not ControlLink(served.control_endpoint).probe(timeout_s=0.5)
    assert control.swap(half_gain_bundle, timeout_s=60)["ok"] is True
