"""Issue 8, faults with real processes: the runtime killed and restarted under running robots, a policy that
raises, a slow operator subscriber, and a store that refuses writes. Nothing acknowledged may be lost and the
control loop must keep answering."""

from __future__ import annotations

import io
import json
import resource
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import (
    VIGIL,
    assert_lqr_action,
    child_env,
    gain_of,
    graph_bundle,
    start_serve,
    tcp_endpoint,
    wait_until,
)

from vigil.runtime.alerts_view import AlertView
from vigil.runtime.requests import RequestStore
from vigil.runtime.store import AlertStore
from vigil.wire.protocol import Message

X = np.array([0.3, -0.2, 0.1], np.float32)


@pytest.fixture(scope="module")
def unsure_pitch(tmp_path_factory) -> Path:
    """An aircraft-pitch policy (action 0) whose VFD score is always above the alert threshold: every tick is
    a VFD alert, and every `request_interval_s` the runtime files a data request for the robot's task."""
    from onnx.helper import make_node

    folder = tmp_path_factory.mktemp("unsure") / "unsure-pitch"
    graph_bundle(folder, [make_node("MatMul", ["state", "W"], ["action"]),
                          make_node("ReduceSumSquare", ["state"], ["sq"], axes=[1], keepdims=0),
                          make_node("Add", ["sq", "one"], ["vfd"])],
                 obs_dim=3, act_dim=1, outputs={"action": ["batch", 1], "vfd": ["batch"]},
                 initializers={"W": np.zeros((3, 1)), "one": np.array(1.0)},
                 onnx={"inputs": {"state": "state"}, "action": "action", "scores": ["vfd"]},
                 monitor={"vfd": {"score": "vfd", "window": 1, "thresholds": {"alert": 0.5}}})
    return folder


@pytest.fixture(scope="module")
def fragile_pitch(tmp_path_factory) -> Path:
    """action = W x, except that onnxruntime raises (a Reshape to a data-dependent shape that does not fit)
    when any state component exceeds 100: a policy that fails on some inputs."""
    from onnx import TensorProto
    from onnx.helper import make_node

    folder = tmp_path_factory.mktemp("fragile") / "fragile-pitch"
    graph_bundle(folder, [make_node("MatMul", ["state", "W"], ["a"]),
                          make_node("ReduceMax", ["state"], ["m"], keepdims=0),
                          make_node("Greater", ["m", "limit"], ["g"]),
                          make_node("Cast", ["g"], ["gi"], to=TensorProto.INT64),
                          make_node("Add", ["gi", "one"], ["n"]),
                          make_node("Unsqueeze", ["n", "axis0"], ["n1"]),
                          make_node("Concat", ["minus1", "n1"], ["shape"], axis=0),
                          make_node("Reshape", ["a", "shape"], ["action"])],
                 obs_dim=3, act_dim=1, outputs={"action": ["batch", 1]},
                 initializers={"W": np.array([[1.0], [2.0], [3.0]]), "limit": np.array(100.0),
                               "one": np.array(1), "axis0": np.array([0]), "minus1": np.array([-1])})
    return folder


def published_ids(sub: zmq.Socket, into: dict[str, set[int]], timeout_ms: int = 0) -> None:
    """Read what is waiting on a raw SUB socket; note the store ids of alerts and requests."""
    from vigil.wire.protocol import STREAM_KINDS, decode

    while sub.poll(timeout_ms):
        frames = sub.recv_multipart()
        msg = decode(frames[1:], kinds=STREAM_KINDS)
        if msg.kind in ("alert", "request") and msg.meta.get("id", 0) > 0:
            into[msg.kind].add(int(msg.meta["id"]))
        timeout_ms = 0


def test_runtime_killed_and_restarted_while_robots_keep_trying(tmp_path, unsure_pitch):
    """Three `vigil sim` robots (realtime, 50 Hz) run through a SIGKILL of the runtime and its restart on the
    same endpoints and store. They keep their rate on the safe action while it is gone, resume (hello and the
    episode's reset again) when it is back, and are served again. Every alert and data request that was
    published (which happens only after it is stored) before the kill is in the store afterwards."""
    robot_ep, op_ep, store = tcp_endpoint(), tcp_endpoint(), tmp_path / "store.db"
    flags = dict(robot_endpoint=robot_ep, operator_endpoint=op_ep, store=store, request_interval_s=0.2,
                 alert_repeat_s=0.05, link_timeout_s=0.5, deadline_ms=1000)
    first = start_serve(tmp_path / "first", unsure_pitch, **flags)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(op_ep)
    seen: dict[str, set[int]] = {"alert": set(), "request": set()}
    robots = []
    for i in range(3):
        summary = tmp_path / f"robot{i}.json"
        robots.append((summary, subprocess.Popen(
            [*VIGIL, "sim", "--connect", robot_ep, "--system", "aircraft-pitch", "--robot", f"bot{i}",
             "--mode", "realtime", "--rate", "50", "--steps", "500", "--summary", str(summary)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())))
    second = None
    try:
        deadline = time.monotonic() + 30
        while (len(seen["alert"]) < 10 or len(seen["request"]) < 3) and time.monotonic() < deadline:
            published_ids(sub, seen, 100)
        assert len(seen["alert"]) >= 10 and len(seen["request"]) >= 3, seen
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=10)
        published_ids(sub, seen, 200)  # whatever was on its way when it died
        before_kill = {k: set(v) for k, v in seen.items()}
        time.sleep(1.0)  # the robots are on their own for a while
        second = start_serve(tmp_path / "second", unsure_pitch, **flags)
        for _summary, proc in robots:
            assert proc.wait(timeout=60) == 0, proc.stderr.read().decode()
        published_ids(sub, seen, 200)
        counters = second.stop()
    finally:
        sub.close()
        for _, proc in robots:
            if proc.poll() is None:
                proc.kill()
        for served in (first, second):
            if served is not None and served.alive():
                served.kill()
    for summary, _ in robots:
        (ep,) = json.loads(summary.read_text())
        assert ep["steps"] == 500
        assert ep["resumed"] >= 1, ep          # the robot noticed the new runtime and said hello again
        assert ep["robot_safe"] >= 1, ep      # it held the safe action while nobody answered
        assert ep["latency_us"]["n"] >= 1, ep  # and it was served (how many of each is a timing)
        assert ep["robot_safe"] + ep["latency_us"]["n"] == ep["steps"], ep  # every step one or the other
    assert counters["ticks"] >= 3, counters  # the restarted runtime served the resumed robots
    alerts = {r.id for r in AlertStore(store, readonly=True).since(0)}
    requests = RequestStore(store, readonly=True)
    try:
        request_ids = {r.id for r in requests.list()}
    finally:
        requests.close()
    assert before_kill["alert"] <= alerts, before_kill["alert"] - alerts
    assert before_kill["request"] <= request_ids, before_kill["request"] - request_ids
    assert seen["alert"] <= alerts and seen["request"] <= request_ids
    assert max(alerts) > max(before_kill["alert"])  # the second life appended to the same store


def test_robot_process_disconnects_and_reconnects_mid_episode(serve, lqr_bundle, tmp_path, subscriber):
    """`vigil sim` (realtime, 50 Hz) drops its link at step 100 for 0.5 s, keeps its rate on the safe action,
    reconnects on a new socket and finishes the episode under the policy; the runtime declares the outage
    (a stored stop alert), resumes the same session (a reconnect, not a new robot) and says when it ended."""
    served = serve(lqr_bundle, link_timeout_s=0.2, telemetry_s=0.05)
    sub = subscriber(served.operator_endpoint)
    sub.ready()
    summary = tmp_path / "sim.json"
    r = subprocess.run([*VIGIL, "sim", "--connect", served.robot_endpoint, "--robot", "flaky", "--mode", "realtime",
                        "--rate", "50", "--steps", "250", "--disconnect-at", "100", "--disconnect-s", "0.5",
                        "--summary", str(summary)], capture_output=True, text=True, env=child_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    (ep,) = json.loads(summary.read_text())
    assert ep["steps"] == 250 and ep["errors"] == 0
    assert ep["robot_safe"] >= 1 and ep["latency_us"]["n"] >= 1, ep  # the safe action in the outage, else the policy
    assert ep["robot_safe"] + ep["latency_us"]["n"] == ep["steps"], ep  # (how many of each is a timing)
    _, alert = sub.wait_for(lambda t, m: m.kind == "alert" and m.meta["monitor"] == "link")
    assert alert.robot == "flaky" and alert.meta["severity"] == "stop"
    _, restored = sub.wait_for(lambda t, m: t == "telemetry" and m.meta.get("event") == "link_restored")
    assert restored.robot == "flaky" and isinstance(restored.meta["values"]["outage_s"], float)  # reported
    stored = AlertStore(served.store, readonly=True).since(0)
    assert [a.id for a in stored if a.monitor == "link"] == [alert.meta["id"]]
    counters = served.stop()
    assert counters["reconnects"] == 1 and counters.get("sessions_expired", 0) == 0


def test_a_policy_that_raises_gets_the_robot_its_safe_action_and_the_loop_goes_on(serve, fragile_pitch, links,
                                                                                  subscriber):
    served = serve(fragile_pitch, link_timeout_s=300, deadline_ms=5000, telemetry_s=0.05)
    sub = subscriber(served.operator_endpoint)
    sub.ready()
    poisoned, steady = links(served.robot_endpoint, "poisoned"), links(served.robot_endpoint, "steady")
    W = np.array([1.0, 2.0, 3.0], np.float32)
    for k in range(20):
        bad = k % 2 == 0
        x = np.array([500.0, 0.0, 0.0] if bad else [0.1, 0.2, -0.1], np.float32)
        reply = poisoned.act({"state": x})
        assert reply.kind == "act"
        if bad:
            assert reply.meta["safe"] is True and reply.arrays["action"].tolist() == [0.0]
            assert reply.meta["verdicts"][0][:2] == ["policy", "stop"]
            assert "raised" in reply.meta["verdicts"][0][2]
        else:
            assert reply.meta["safe"] is False
            np.testing.assert_allclose(reply.arrays["action"], [float(W @ x)], rtol=1e-6)
        # the other robot on the same runtime is served as usual throughout
        y = np.array([0.2, -0.3, 0.4], np.float32)
        other = steady.act({"state": y})
        assert other.kind == "act" and other.meta["safe"] is False
        np.testing.assert_allclose(other.arrays["action"], [float(W @ y)], rtol=1e-6)
    topic, alert = sub.wait_for(lambda t, m: m.kind == "alert" and m.meta["monitor"] == "policy")
    assert topic == "alert.stop" and alert.robot == "poisoned" and alert.meta["id"] > 0
    stored = AlertStore(served.store, readonly=True).since(0)
    assert any(r.monitor == "policy" and r.robot == "poisoned" for r in stored)
    counters = served.stop()
    assert counters["policy_failed"] == 10 and counters["ticks"] == 40 and "error.internal" not in counters


class Stuck(io.StringIO):
    """An operator's terminal that stops taking output until `go` is set."""

    def __init__(self):
        super().__init__()
        self.go = threading.Event()

    def write(self, s: str) -> int:
        self.go.wait()
        return super().write(s)


def test_slow_subscriber_loses_stream_messages_but_no_alert(serve, lqr_bundle, links, tmp_path):
    """An operator view that stalls while the runtime files thousands of alerts: the stream drops messages
    for it (PUB does not wait for anyone; here its queue is 5 messages), the view counts the gap in ids and
    reads the missing alerts back from the store, so it shows every alert exactly once, in order; and
    `vigil alerts --since` replays them all."""
    served = serve(lqr_bundle, operator_endpoint=f"ipc://{tmp_path}/ops.sock", stream_hwm=5, alert_repeat_s=1e-7,
                   link_timeout_s=300)
    out = Stuck()
    view = AlertView(str(served.store), as_json=True, out=out, hwm=5)
    stop = threading.Event()
    follower = threading.Thread(target=view.follow, args=(served.operator_endpoint,),
                                kwargs={"should_stop": stop.is_set}, daemon=True)
    follower.start()
    link = links(served.robot_endpoint, "chatty")
    time.sleep(0.5)  # the subscription is in place
    n = 2500
    text = "x" * 450  # about 600 bytes an alert: beyond what the socket buffers hold
    for i in range(n):
        # the robot's own queue is short (runtime/client.py SEND_QUEUE) and the runtime fsyncs every alert
        while not link.send(Message("error", "chatty", link.next_seq(), 0, {}, {"code": f"c{i}", "message": text})):
            time.sleep(0.001)
    assert link.heartbeat(timeout_s=30).kind == "heartbeat"
    out.go.set()
    # the store's writer thread commits behind the loop: every alert is stored (then published) in time
    wait_until(lambda: len(AlertStore(served.store, readonly=True).since(0)) == n, timeout_s=60)
    wait_until(lambda: view.last_id == n, timeout_s=60)
    stop.set()
    follower.join(timeout=5)
    shown = [json.loads(line)["id"] for line in out.getvalue().splitlines() if '"topic": "alert.' in line]
    assert view.missed > 0, "the stall should have cost the subscriber stream messages"
    assert view.filled == view.missed
    assert shown == list(range(shown[0], n + 1))  # every alert once, in order, from where the view started
    r = subprocess.run([*VIGIL, "alerts", "--store", str(served.store), "--since", "0", "--json"], capture_output=True,
                       text=True, env=child_env(), timeout=60)
    assert r.returncode == 0 and len(r.stdout.splitlines()) == n


def _file_sizes(store: Path) -> int:
    return max((p.stat().st_size for p in (store, Path(f"{store}-wal")) if p.exists()), default=0)


def test_store_that_refuses_writes_is_announced_and_the_loop_goes_on(serve, lqr_bundle, links, subscriber):
    """The runtime's files may not grow any more (RLIMIT_FSIZE on the running process: what a full disk looks
    like to it): alerts wait in memory, the operator gets an unstored notice, every action still comes. When
    the limit is lifted (disk space freed), the held alerts are stored and published in order."""
    served = serve(lqr_bundle, alert_repeat_s=1e-7, link_timeout_s=300, deadline_ms=5000, telemetry_s=0.05)
    sub = subscriber(served.operator_endpoint)
    sub.ready()
    link = links(served.robot_endpoint, "writer")
    K = gain_of(lqr_bundle)

    def note(i: int) -> None:
        link.send(Message("error", "writer", link.next_seq(), 0, {}, {"code": f"n{i}", "message": "note"}))

    for i in range(5):
        note(i)
    assert link.heartbeat().kind == "heartbeat"
    wait_until(lambda: len(AlertStore(served.store, readonly=True).since(0)) == 5)  # (the writer thread's commits)
    pid = served.proc.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (_file_sizes(served.store), hard))
    try:
        for i in range(5, 15):
            note(i)
            reply = link.act({"state": X})  # the loop answers at once, every time
            assert reply.kind == "act" and reply.meta["safe"] is False
            assert_lqr_action(reply.arrays["action"], K, X)
        topic, notice = sub.wait_for(lambda t, m: m.kind == "alert" and m.meta["monitor"] == "store")
        assert topic == "alert.alert" and notice.meta["id"] == 0 and notice.meta["stored"] is False
        assert "cannot be written" in notice.meta["reason"]
        sub.wait_for(lambda t, m: m.kind == "telemetry" and m.meta.get("alerts", {}).get("pending") == 10)
        assert len(AlertStore(served.store, readonly=True).since(0)) == 5
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))  # space again
    sub.wait_for(lambda t, m: m.kind == "alert" and m.meta["monitor"] == "store" and t == "alert.warn")
    wait_until(lambda: len(AlertStore(served.store, readonly=True).since(0)) == 15)
    records = AlertStore(served.store, readonly=True).since(0)
    assert [r.reason for r in records] == [f"robot reported n{i}: note" for i in range(15)]
    wait_until(lambda: sub.pump(50) or {m.meta["id"] for _, m in sub.seen if m.kind == "alert"} >= set(range(1, 16)))
    counters = served.stop()
    assert counters["store_failures"] == 1 and counters["ticks"] == 10


def test_unwritable_store_at_start_is_a_config_error(tmp_path, lqr_bundle):
    r = subprocess.run([*VIGIL, "serve", "--bundle", str(lqr_bundle), "--store", "/proc/vigil/alerts.db",
                        "--robot-endpoint", tcp_endpoint(), "--operator-endpoint", tcp_endpoint()],
                       capture_output=True, text=True, env=child_env(), timeout=60)
    assert r.returncode == 2 and "config key 'store' must be a writable SQLite file" in r.stderr, r.stderr
