"""Link loss, deadlines, stale observations, non-finite policy output, and the simulator's fault injection, all
against a real `vigil serve` process."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_lqr_action, gain_of, graph_bundle, manifest_of, recv_raw_reply, run_vigil, wait_until
from onnx import helper

from vigil.runtime.store import AlertStore
from vigil.sim.faults import Faults
from vigil.wire.protocol import Message, ProtocolError

X = np.array([0.05, -0.01, 0.08], np.float32)


def stored(served, monitor: str | None = None):
    """Alerts in the runtime's store (opened read-only, as an operator would), optionally of one monitor."""
    if not served.store.exists():
        return []
    store = AlertStore(served.store, readonly=True)
    try:
        return [r for r in store.since(0) if monitor is None or r.monitor == monitor]
    finally:
        store.close()


def test_link_loss_sends_safe_action_and_alerts(serve, lqr_bundle, links, subscriber):
    served = serve(lqr_bundle, link_timeout_s=0.2, telemetry_s=0.05, deadline_ms=5000)
    sub = subscriber(served.operator_endpoint)
    sub.ready()
    link = links(served.robot_endpoint, "quiet-bot")
    reply = link.act({"state": X})
    assert reply.kind == "act" and reply.meta["safe"] is False
    assert_lqr_action(reply.arrays["action"], gain_of(lqr_bundle), X)

    # the robot goes silent: the runtime acts on its own initiative, with the safe action for the last seq
    msg = recv_raw_reply(link, timeout_s=10)
    assert msg.kind == "act" and msg.seq == reply.seq
    assert msg.meta["safe"] is True
    np.testing.assert_array_equal(msg.arrays["action"], np.asarray(manifest_of(lqr_bundle)["safe_action"], np.float32))
    assert [v[:2] for v in msg.meta["verdicts"]] == [["link", "stop"]]
    assert "infer_us" not in msg.meta  # nothing was inferred for this one

    # the alert goes to operators: first the durable store, then the stream
    topic, alert = sub.wait_for(lambda t, m: m.kind == "alert" and m.meta["monitor"] == "link")
    assert topic == "alert.stop" and alert.robot == "quiet-bot" and alert.meta["severity"] == "stop"
    records = stored(served, "link")  # published implies stored: no waiting here
    assert [r.id for r in records] == [alert.meta["id"]]
    r = records[0]
    assert r.robot == "quiet-bot" and r.severity == "stop" and r.count == 1
    assert r.values["timeout_s"] == pytest.approx(0.2) and r.values["silence_s"] > r.values["timeout_s"]
    _, telemetry = sub.wait_for(lambda t, m: t == "telemetry"
                                and m.meta.get("robots", {}).get("quiet-bot", {}).get("link_lost_now") is True)
    robot = telemetry.meta["robots"]["quiet-bot"]
    assert robot["ticks"] == 1 and robot["link_lost"] == 1 and robot["safe"] == 0 and robot["episode"] == 0

    # the loss is reported once, not every timer tick: nothing more arrives while the robot stays silent
    assert link.recv(0.6) is None
    assert len(stored(served, "link")) == 1
    # traffic re-arms the monitor; the policy acts again
    x2 = -X
    reply = link.act({"state": x2})
    assert reply.meta["safe"] is False
    assert_lqr_action(reply.arrays["action"], gain_of(lqr_bundle), x2)
    _, restored = sub.wait_for(lambda t, m: t == "telemetry" and m.meta.get("event") == "link_restored")
    assert restored.robot == "quiet-bot" and isinstance(restored.meta["values"]["outage_s"], float)  # reported
    # a second outage is a new loss: safe action and a second alert (not deduplicated into the first)
    msg = recv_raw_reply(link, timeout_s=10)
    assert msg.kind == "act" and msg.seq == reply.seq and msg.meta["safe"] is True
    _, second = sub.wait_for(lambda t, m: m.kind == "alert" and m.meta["monitor"] == "link"
                             and m.meta["id"] != alert.meta["id"])
    assert [r.id for r in stored(served, "link")] == [alert.meta["id"], second.meta["id"]]
    counters = served.stop()
    assert counters["ticks"] == 2


def test_link_loss_before_first_observation(serve, lqr_bundle, links):
    """A robot that says hello and then nothing is also lost; the safe action answers seq 0."""
    served = serve(lqr_bundle, link_timeout_s=0.2)
    link = links(served.robot_endpoint, "mute-bot")
    msg = recv_raw_reply(link, timeout_s=10)
    assert msg.kind == "act" and msg.meta["safe"] is True and msg.seq == 0
    wait_until(lambda: stored(served, "link"))


def test_any_traffic_keeps_the_link_alive(serve, lqr_bundle, links):
    """Heartbeats, resets, robot-reported errors and even rejected messages count as traffic (docs/protocol.md
    section 10): none of them is an observation, yet the link is never declared lost."""
    served = serve(lqr_bundle, link_timeout_s=1.0)
    link = links(served.robot_endpoint, "beating-bot")
    t_end = time.monotonic() + 2.2  # over two link timeouts without an observation, messages 20x a timeout apart
    sent = 0
    while time.monotonic() < t_end:
        seq = link.next_seq()
        which = sent % 4
        if which == 0:
            link.send(Message("heartbeat", link.robot, seq))
        elif which == 1:
            link.send(Message("reset", link.robot, seq))
        elif which == 2:
            link.send(Message("obs", link.robot, seq, 0, {"state": np.zeros(4, np.float32)}))  # rejected: shape
        else:
            link.send(Message("heartbeat", link.robot, seq))
        reply = recv_raw_reply(link)
        expected = ["heartbeat", "reset", "error", "heartbeat"][which]
        assert reply.kind == expected and reply.seq == seq, (reply.kind, reply.meta)  # never a safe act
        sent += 1
        time.sleep(0.05)
    assert sent >= 4
    assert stored(served, "link") == []
    # positive control: stop beating and the same runtime does declare the link lost
    msg = recv_raw_reply(link, timeout_s=10)
    assert msg.kind == "act" and msg.meta["safe"] is True
    wait_until(lambda: stored(served, "link"))


def test_bye_ends_the_session_without_link_alert(serve, lqr_bundle, links, subscriber):
    served = serve(lqr_bundle, link_timeout_s=0.3, telemetry_s=0.05)
    sub = subscriber(served.operator_endpoint)
    sub.ready()
    link = links(served.robot_endpoint, "polite-bot")
    assert link.act({"state": X}).kind == "act"
    seq = link.next_seq()
    reply = link.request(Message("bye", link.robot, seq))
    assert reply.kind == "bye" and reply.seq == seq
    _, event = sub.wait_for(lambda t, m: t == "telemetry" and m.meta.get("event") == "disconnected")
    assert event.robot == "polite-bot" and event.meta["values"]["ticks"] == 1
    # the session is gone: the same socket must say hello again, and silence is not link loss
    assert link.act({"state": X}).meta["code"] == "no_session"
    time.sleep(0.9)  # three link timeouts
    assert stored(served, "link") == []


def test_deadline_miss_sends_safe_action(serve, lqr_bundle, links):
    # 1 us from receipt to decision cannot be met by any inference: every tick is a deadline miss
    served = serve(lqr_bundle, deadline_ms=0.001, alert_repeat_s=3600)
    link = links(served.robot_endpoint, "slow-bot")
    assert link.hello_reply.deadline_ms == pytest.approx(0.001)
    safe = np.asarray(manifest_of(lqr_bundle)["safe_action"], np.float32)
    rng = np.random.default_rng(3)
    for _ in range(5):
        x = rng.uniform(-1, 1, 3).astype(np.float32)
        reply = link.act({"state": x})
        assert reply.kind == "act" and reply.meta["safe"] is True
        np.testing.assert_array_equal(reply.arrays["action"], safe)
        assert ["deadline", "stop"] in [v[:2] for v in reply.meta["verdicts"]]
    records = wait_until(lambda: stored(served, "deadline"))
    counters = served.stop()
    # deduplicated: one stored alert for a condition that persisted, the rest counted as suppressed
    assert len(records) == 1 and records[0].severity == "stop" and records[0].robot == "slow-bot"
    assert records[0].values["deadline_ms"] == pytest.approx(0.001)
    assert records[0].values["compute_ms"] > records[0].values["deadline_ms"]
    assert counters["ticks"] == 5


def test_default_deadline_is_one_control_period(serve, lqr_bundle, links):
    served = serve(lqr_bundle)
    link = links(served.robot_endpoint, "r")
    assert link.hello_reply.deadline_ms == pytest.approx(1e3 / manifest_of(lqr_bundle)["control_rate_hz"])
    assert link.hello_reply.mode == "lockstep"


def _wait_stopped(pid: int) -> None:
    """Until every thread of pid is stopped (SIGSTOP takes effect asynchronously)."""
    tasks = Path(f"/proc/{pid}/task")

    def all_stopped() -> bool:
        states = []
        for t in tasks.iterdir():
            stat = (t / "stat").read_text()
            states.append(stat[stat.rindex(")") + 2])
        return all(s in "tT" for s in states)

    wait_until(all_stopped, timeout_s=10, interval_s=0.005)


def test_realtime_acts_on_freshest_observation_only(serve, lqr_bundle, links):
    served = serve(lqr_bundle, mode="realtime", link_timeout_s=60, deadline_ms=5000)
    link = links(served.robot_endpoint, "fast-bot")
    assert link.hello_reply.mode == "realtime"
    K = gain_of(lqr_bundle)
    reply = link.act({"state": X})
    assert_lqr_action(reply.arrays["action"], K, X)

    # Freeze the runtime so that several observations are queued when it looks again: deterministic batching.
    xs = [np.array([0.01 * i, 0.0, -0.02 * i], np.float32) for i in range(1, 7)]
    os.kill(served.proc.pid, signal.SIGSTOP)
    try:
        _wait_stopped(served.proc.pid)
        seqs = []
        for i, x in enumerate(xs):
            seqs.append(link.next_seq())
            link.send(Message("obs", link.robot, seqs[-1], 0, {"state": x}))
            if i == 2:  # other kinds are never discarded
                hb_seq = link.next_seq()
                link.send(Message("heartbeat", link.robot, hb_seq))
        time.sleep(0.3)  # let libzmq hand them to the kernel
    finally:
        os.kill(served.proc.pid, signal.SIGCONT)
    replies = []
    while (msg := link.recv(1.0)) is not None:
        replies.append(msg)
    assert sorted((m.kind, m.seq) for m in replies) == [("act", seqs[-1]), ("heartbeat", hb_seq)]
    act = next(m for m in replies if m.kind == "act")
    assert_lqr_action(act.arrays["action"], K, xs[-1])
    counters = served.stop()
    assert counters["stale_dropped"] == len(xs) - 1
    assert counters["ticks"] == 2


def test_nonfinite_policy_output_never_reaches_the_robot(serve, tmp_path, links):
    """A policy that returns NaN (here log of a negative number) must not make the runtime send a non-finite
    action: the wire forbids non-finite values, and the robot's own decode refuses them."""
    bundle = tmp_path / "log-policy"
    graph_bundle(bundle, [helper.make_node("MatMul", ["state", "w"], ["lin"]),
                          helper.make_node("Log", ["lin"], ["action"])],
                 obs_dim=3, act_dim=1, outputs={"action": ["batch", 1]},
                 initializers={"w": np.array([[1.0], [0.0], [0.0]])})
    served = serve(bundle, deadline_ms=5000)
    link = links(served.robot_endpoint, "nan-bot")
    ok = link.act({"state": np.array([np.e, 0, 0], np.float32)})
    assert ok.meta["safe"] is False and ok.arrays["action"][0] == pytest.approx(1.0)
    try:
        reply = link.act({"state": np.array([-1.0, 0, 0], np.float32)})
    except ProtocolError as exc:
        pytest.fail(f"the runtime sent a message its own protocol refuses: {exc}")
    if reply.kind == "act":
        assert np.isfinite(reply.arrays["action"]).all()
        assert reply.meta["safe"] is True and any(v[1] == "stop" for v in reply.meta["verdicts"])
    else:
        assert reply.kind == "error"
    assert served.alive()


# -- the simulator's fault injection, as processes ----------------------------------------------------------


def run_sim(served, tmp_path: Path, *args: str) -> list[dict]:
    summary = tmp_path / f"sim-{time.monotonic_ns()}.json"
    sim = run_vigil("sim", "--connect", served.robot_endpoint, "--system", "aircraft-pitch", "--summary", str(summary),
                    *args)
    assert sim.returncode == 0, sim.stdout + sim.stderr
    return json.loads(summary.read_text())


def test_sim_drop_makes_robot_apply_safe_action(serve, lqr_bundle, tmp_path):
    served = serve(lqr_bundle, link_timeout_s=30, deadline_ms=5000)
    [ep] = run_sim(served, tmp_path, "--steps", "20", "--drop", "1.0", "--fault-start", "5", "--fault-stop", "10",
                   "--act-timeout", "0.1")
    assert ep["steps"] == 20
    assert ep["robot_safe"] == 5  # the five dropped observations: the robot fell back on the safe action itself
    assert ep["runtime_safe"] == 0 and ep["errors"] == 0
    assert ep["latency_us"]["n"] == 15
    counters = served.stop()
    assert counters["ticks"] == 15  # the dropped observations never reached the runtime


def test_sim_observation_noise_changes_what_the_runtime_sees(serve, lqr_bundle, tmp_path):
    served = serve(lqr_bundle, link_timeout_s=30, deadline_ms=5000)
    [clean] = run_sim(served, tmp_path, "--steps", "50")
    [noisy] = run_sim(served, tmp_path, "--steps", "50", "--obs-noise", "0.01")
    for ep in (clean, noisy):
        assert ep["steps"] == 50 and ep["robot_safe"] == 0 and ep["runtime_safe"] == 0 and ep["errors"] == 0
    # the true system and its noise are the same in both runs (same seed): only the observations differ
    assert noisy["oracle_cost"] == clean["oracle_cost"]
    assert abs(clean["cost"] - clean["oracle_cost"]) <= 1e-3 * clean["oracle_cost"]
    # a noise of std 0.01 on the state, through a gain of ~200, moves actions by ~2: far beyond float32 effects
    assert abs(noisy["cost"] - noisy["oracle_cost"]) > 1e-2 * noisy["oracle_cost"]


def test_chunked_policy_clipping_and_saturation_through_the_runtime(serve, chunk_bundle):
    """action[h] = state + h, 2 of every 4 executed, bounds [-1, 1.5] x [-10, 10]: what the robot receives follows
    the chunk schedule, is clipped, and a policy that keeps asking for too much raises a saturation alert."""
    from vigil.runtime.client import RobotLink
    from vigil.wire.protocol import ArraySpec

    served = serve(chunk_bundle, saturation_window=3, deadline_ms=5000)
    link = RobotLink(served.robot_endpoint, "chunky")
    try:
        link.hello((ArraySpec("state", "float32", (2,)),), ArraySpec("action", "float32", (2,)))

        def act(x):
            reply = link.act({"state": np.asarray(x, np.float32)})
            assert reply.kind == "act" and reply.meta["safe"] is False
            return reply.arrays["action"], [tuple(v[:2]) for v in reply.meta["verdicts"]]

        a, v = act([0.2, 0.0])
        np.testing.assert_allclose(a, [0.2, 0.0], atol=1e-6)
        assert v == []
        a, v = act([-5.0, -5.0])  # executes the 2nd action of the first plan: [1.2, 1.0]
        np.testing.assert_allclose(a, [1.2, 1.0], rtol=1e-6)
        a, v = act([1.0, 0.0])  # new plan
        np.testing.assert_allclose(a, [1.0, 0.0], atol=1e-6)
        a, v = act([0.0, 0.0])  # [2.0, 1.0] clipped to [1.5, 1.0]: first saturated tick
        np.testing.assert_allclose(a, [1.5, 1.0], rtol=1e-6)
        assert v == []
        a, v = act([-3.0, 0.0])  # [-3, 0] -> [-1, 0]: second, 2 of the last 3 >= warn_fraction 0.5
        np.testing.assert_allclose(a, [-1.0, 0.0], atol=1e-6)
        assert v == [("saturation", "warn")]
        a, v = act([0.0, 0.0])  # [-2, 1] -> [-1, 1]: third of a window of 3: alert, but not a stop
        np.testing.assert_allclose(a, [-1.0, 1.0], atol=1e-6)
        assert v == [("saturation", "alert")]
        assert link.reset().meta["episode"] == 1  # reset: new plan at once, monitor window cleared
        a, v = act([0.5, 0.5])
        np.testing.assert_allclose(a, [0.5, 0.5], atol=1e-6)
        assert v == []
    finally:
        link.close()
    records = wait_until(lambda: len(stored(served, "saturation")) == 2 and stored(served, "saturation"))
    assert [(r.robot, r.severity) for r in records] == [("chunky", "warn"), ("chunky", "alert")]


# -- fault injection in the simulator (sim/faults.py), unit ------------------------------------------------


def test_faults_corrupt_drop_delay_and_validation():
    f = Faults(obs_noise=0.1, drop=1.0, delay_ms=20, start=2, stop=4)
    obs = {"state": np.ones(3, np.float32), "count": np.array([7], np.int32)}
    rng = np.random.default_rng(0)
    assert f.corrupt(obs, 1, rng) is obs and not f.dropped(1, rng) and f.delay_s(1) == 0.0  # before the window
    noisy = f.corrupt(obs, 2, rng)
    assert noisy["state"].dtype == np.float32 and not np.array_equal(noisy["state"], obs["state"])
    assert np.abs(noisy["state"] - 1).max() < 1.0  # std 0.1
    np.testing.assert_array_equal(noisy["count"], obs["count"])  # integers are left alone
    assert f.dropped(3, rng) and f.delay_s(3) == pytest.approx(0.02)
    assert not f.dropped(4, rng) and f.corrupt(obs, 4, rng) is obs  # the window is [start, stop)
    assert "observation noise" in f.describe() and "dropped" in f.describe() and Faults().describe() == "none"
    half = Faults(drop=0.5)
    rng = np.random.default_rng(1)
    drops = [half.dropped(t, rng) for t in range(2000)]
    assert 800 < sum(drops) < 1200
    for bad in [dict(obs_noise=-1), dict(drop=1.5), dict(drop=-0.1), dict(delay_ms=-1), dict(disconnect_s=-1)]:
        with pytest.raises(ValueError):
            Faults(**bad)
