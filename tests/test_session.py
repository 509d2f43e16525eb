"""A robot's session with a live runtime process: hello and refusal, reset, heartbeat, robot-reported errors,
reconnect with a new socket, several robots at once, and the runtime saying bye when it stops."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_lqr_action, gain_of, manifest_of, recv_raw_reply, wait_until

from vigil.runtime.client import LinkError, RobotLink
from vigil.runtime.store import AlertStore
from vigil.wire.protocol import ArraySpec, Message

X = np.array([0.02, 0.001, -0.05], np.float32)


def test_hello_reply_carries_the_manifest(serve, lqr_bundle, links):
    served = serve(lqr_bundle, heartbeat_s=0.25, link_timeout_s=2.0)
    link = links(served.robot_endpoint, "r1", env="aircraft-pitch")
    h = link.hello_reply
    manifest = manifest_of(lqr_bundle)
    assert h.manifest == manifest
    assert h.policy == f"{manifest['name']}@{manifest['onnx']['sha256'][:12]}"
    assert h.mode == "lockstep" and h.heartbeat_s == 0.25
    np.testing.assert_array_equal(h.safe_action, np.asarray(manifest["safe_action"], np.float32))


@pytest.mark.parametrize("observation, action", [
    ((ArraySpec("state", "float32", (4,)),), ArraySpec("action", "float32", (1,))),
    ((ArraySpec("state", "float64", (3,)),), ArraySpec("action", "float32", (1,))),
    ((ArraySpec("pos", "float32", (3,)),), ArraySpec("action", "float32", (1,))),
    ((ArraySpec("state", "float32", (3,)), ArraySpec("image", "uint8", (8, 8))), ArraySpec("action", "float32", (1,))),
    ((ArraySpec("state", "float32", (3,)),), ArraySpec("action", "float32", (2,))),
], ids=["obs-shape", "obs-dtype", "obs-name", "extra-obs", "action-shape"])
def test_hello_refused_when_spec_does_not_match_bundle(serve, lqr_bundle, observation, action):
    served = serve(lqr_bundle)
    link = RobotLink(served.robot_endpoint, "wrong-robot")
    try:
        link.connect()
        spec = {"observation": [s.to_dict() for s in observation], "action": action.to_dict()}
        reply = link.request(Message("hello", "wrong-robot", link.next_seq(), 0, {}, {"spec": spec}))
        assert reply.kind == "error" and reply.meta["code"] == "refused", reply.meta
        # the reference driver turns the refusal into LinkError
        with pytest.raises(LinkError, match="refused"):
            link.hello(observation, action)
        # refused means no session
        reply = link.act({s.name: np.zeros(s.shape, s.dtype) for s in observation})
        assert reply.kind == "error" and reply.meta["code"] == "no_session"
    finally:
        link.close()
    assert served.alive()


def test_reset_and_heartbeat_replies(serve, lqr_bundle, links):
    served = serve(lqr_bundle)
    link = links(served.robot_endpoint, "r1")
    hb = link.heartbeat()
    assert hb.kind == "heartbeat" and hb.robot == "r1"
    first = link.reset(task="aircraft-pitch", episode=0)
    assert first.kind == "reset" and first.meta["episode"] == 1
    assert link.act({"state": X}).kind == "act"
    second = link.reset()
    assert second.kind == "reset" and second.meta["episode"] == 2 and second.seq > first.seq
    # a heartbeat from a robot without a session is answered too (it is how drivers probe for a runtime)
    stranger = links(served.robot_endpoint, "stranger", hello=False)
    seq = stranger.next_seq()
    reply = stranger.request(Message("heartbeat", "stranger", seq))
    assert reply.kind == "heartbeat" and reply.seq == seq and reply.robot == ""  # no session: no robot id


def test_reconnect_with_new_socket_resumes_session(serve, lqr_bundle, links, subscriber):
    served = serve(lqr_bundle, link_timeout_s=0.2, telemetry_s=0.05, deadline_ms=5000)
    sub = subscriber(served.operator_endpoint)
    sub.ready()
    K = gain_of(lqr_bundle)
    link = links(served.robot_endpoint, "roamer")
    assert link.reset().meta["episode"] == 1
    assert_lqr_action(link.act({"state": X}).arrays["action"], K, X)

    link.close()  # the link goes down ...
    wait_until(lambda: [r for r in AlertStore(served.store, readonly=True).since(0) if r.monitor == "link"])
    link.reconnect()  # ... and comes back on a new socket, same robot id
    _, event = sub.wait_for(lambda t, m: t == "telemetry" and m.meta.get("event") == "link_restored")
    assert event.robot == "roamer" and isinstance(event.meta["values"]["outage_s"], float)  # reported
    x = -2 * X
    reply = link.act({"state": x})
    assert reply.meta["safe"] is False
    assert_lqr_action(reply.arrays["action"], K, x)
    # same session: the episode count goes on instead of starting again at 1
    assert link.reset().meta["episode"] == 2
    counters = served.stop()
    assert counters["reconnects"] == 1 and counters["ticks"] == 2


def test_robot_reported_error_becomes_alert(serve, lqr_bundle, links, subscriber):
    served = serve(lqr_bundle, telemetry_s=0.05)
    sub = subscriber(served.operator_endpoint)
    sub.ready()
    link = links(served.robot_endpoint, "grumpy")
    link.send(Message("error", "grumpy", link.next_seq(), 0, {}, {"code": "motor_hot", "message": "joint 3 at 80 C"}))
    topic, alert = sub.wait_for(lambda t, m: m.kind == "alert" and m.meta["monitor"] == "robot")
    assert topic == "alert.warn" and alert.robot == "grumpy"
    assert "motor_hot" in alert.meta["reason"] and "joint 3" in alert.meta["reason"]
    [record] = [r for r in AlertStore(served.store, readonly=True).since(0) if r.monitor == "robot"]
    assert record.id == alert.meta["id"] and record.reason == alert.meta["reason"]


def test_two_robots_have_independent_sessions(serve, lqr_bundle, links):
    served = serve(lqr_bundle, deadline_ms=5000, link_timeout_s=300)
    K = gain_of(lqr_bundle)
    a, b = links(served.robot_endpoint, "robot-a"), links(served.robot_endpoint, "robot-b")
    rng = np.random.default_rng(7)
    for _ in range(10):
        xa, xb = rng.uniform(-1, 1, 3).astype(np.float32), rng.uniform(-1, 1, 3).astype(np.float32)
        sa, sb = a.next_seq(), b.next_seq()
        a.send(Message("obs", "robot-a", sa, 0, {"state": xa}))  # both in flight at once
        b.send(Message("obs", "robot-b", sb, 0, {"state": xb}))
        ra, rb = recv_raw_reply(a), recv_raw_reply(b)
        assert (ra.kind, ra.seq, ra.robot) == ("act", sa, "robot-a")
        assert (rb.kind, rb.seq, rb.robot) == ("act", sb, "robot-b")
        assert_lqr_action(ra.arrays["action"], K, xa)
        assert_lqr_action(rb.arrays["action"], K, xb)
    assert a.reset().meta["episode"] == 1
    assert a.reset().meta["episode"] == 2
    assert b.reset().meta["episode"] == 1


def test_runtime_says_bye_when_it_stops(serve, lqr_bundle, links, subscriber):
    served = serve(lqr_bundle, telemetry_s=0.05, link_timeout_s=300)  # only the bye may arrive unsolicited
    sub = subscriber(served.operator_endpoint)
    sub.ready()
    link = links(served.robot_endpoint, "r1")
    idle = links(served.robot_endpoint, "r2")
    reply = link.act({"state": X})
    counters = served.stop()
    assert counters["stopped_by"] == "SIGINT" and counters["ticks"] == 1
    bye = recv_raw_reply(link)
    assert bye.kind == "bye" and bye.robot == "r1" and bye.seq == reply.seq
    assert bye.meta["reason"] == "runtime stopping"
    bye = recv_raw_reply(idle)
    assert bye.kind == "bye" and bye.robot == "r2" and bye.seq == 0  # no observation acted on: seq 0
    # the last telemetry, sent at shutdown, has the same counters the process printed
    while sub.pump(500):
        pass
    last = [m for t, m in sub.seen if t == "telemetry" and "counters" in m.meta][-1]
    assert last.meta["counters"] == {k: v for k, v in counters.items() if k != "stopped_by"}


@pytest.mark.parametrize("transport", ["ipc", "tcp-busy-poll"])
def test_other_transports_and_busy_polling(serve, lqr_bundle, links, tmp_path, transport):
    """The same exchange over ipc sockets in tmp_path, and over tcp with the opt-in busy polling loop."""
    if transport == "ipc":
        served = serve(lqr_bundle, robot_endpoint=f"ipc://{tmp_path}/robot.sock",
                       operator_endpoint=f"ipc://{tmp_path}/operator.sock", deadline_ms=5000)
    else:
        served = serve(lqr_bundle, busy_poll_us=500, deadline_ms=5000)
    K = gain_of(lqr_bundle)
    link = links(served.robot_endpoint, "r1")
    rng = np.random.default_rng(11)
    for _ in range(20):
        x = rng.uniform(-1, 1, 3).astype(np.float32)
        reply = link.act({"state": x})
        assert reply.meta["safe"] is False
        assert_lqr_action(reply.arrays["action"], K, x)
    assert served.stop()["ticks"] == 20


def test_same_robot_id_on_a_second_socket_takes_the_session_over(serve, lqr_bundle, links):
    served = serve(lqr_bundle, deadline_ms=5000, link_timeout_s=300)
    first = links(served.robot_endpoint, "twin")
    assert first.reset().meta["episode"] == 1
    second = links(served.robot_endpoint, "twin")  # same id, new connection: resumes (takes over) the session
    assert first.act({"state": X}).meta["code"] == "no_session"
    assert_lqr_action(second.act({"state": X}).arrays["action"], gain_of(lqr_bundle), X)
    assert second.reset().meta["episode"] == 2
    assert served.stop()["reconnects"] == 1


def test_action_dtype_is_not_compared_and_actions_are_float32(serve, lqr_bundle):
    served = serve(lqr_bundle, deadline_ms=5000)
    link = RobotLink(served.robot_endpoint, "f64-robot")
    try:
        link.hello((ArraySpec("state", "float32", (3,)),), ArraySpec("action", "float64", (1,), (-5.0,), (5.0,)))
        x = np.array([0.0, 0.1, 0.0], np.float32)  # u = -K x is about -20, outside the robot's declared [-5, 5]
        reply = link.act({"state": x})
        assert reply.arrays["action"].dtype == np.float32
        assert reply.arrays["action"][0] < -5  # the robot's own bounds are validated, not applied (the manifest's are)
        assert_lqr_action(reply.arrays["action"], gain_of(lqr_bundle), x)
    finally:
        link.close()


def test_silent_robot_session_expires(serve, lqr_bundle, links, subscriber):
    """A robot silent past session_expiry_s is forgotten: telemetry says so, and its socket must say hello
    again (no_session) before acting."""
    served = serve(lqr_bundle, link_timeout_s=0.1, session_expiry_s=0.4, telemetry_s=0.05)
    sub = subscriber(served.operator_endpoint)
    sub.ready()
    link = links(served.robot_endpoint, "wanderer")
    assert link.act({"state": np.zeros(3, np.float32)}).kind == "act"
    _, event = sub.wait_for(lambda t, m: t == "telemetry" and m.meta.get("event") == "expired")
    assert event.robot == "wanderer" and event.meta["values"]["ticks"] == 1
    assert link.act({"state": np.zeros(3, np.float32)}).meta["code"] == "no_session"
    assert served.stop()["sessions_expired"] == 1
