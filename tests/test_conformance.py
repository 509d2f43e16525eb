"""Conformance of a real `vigil serve` to docs/protocol.md, section by section.

One test (or one parametrised group) per normative statement of the document, named after its section
(`test_s6_...` checks §6) and quoting or paraphrasing the statement in its docstring. Every test talks to a real
runtime process over real ZeroMQ sockets, as a third-party driver would: raw DEALER sockets and msgpack built
here, no vigil client code. Four runtimes are shared by the tests of this module (they do not interfere: every
test uses robot ids of its own):

- `main`: lockstep, the aircraft-pitch LQR bundle, default pipeline, session expiry and clocks (loopback tcp);
- `timers`: the same bundle with a short link timeout and session expiry (§10);
- `realtime`: realtime mode, `--pipeline 3`, bound to a non-local address (`tcp://0.0.0.0`, `--allow-remote`) so
  that clocks are not deemed comparable by default (§9.4);
- `dual`: a bundle with two observation arrays, one of them `bool`, whose policy fails on large states.

Time enters only where the statement is about time (link timeout, session expiry, arrival dating), as generous
bounds. To make queueing deterministic, a few tests freeze the runtime (SIGSTOP) while a robot sends, so that
everything it sent is waiting when the runtime looks again.

Statements already checked by other modules are not repeated here:

- §1 other transports (ipc) and busy polling: test_session.py::test_other_transports_and_busy_polling
- §2, §3, §4, §5, §8 one malformed message per error code and limit (bad_frames, too_large, bad_header,
  bad_version, bad_kind, bad_dtype, bad_shape, not_finite, bad_spec, refused, no_session; the error's seq and
  robot; the connection stays usable): test_protocol.py::test_malformed_message_gets_error_and_loop_keeps_serving,
  and the same table in a row with the exit counters: test_protocol.py::test_error_counters_on_exit
- §2 unknown header keys are ignored: test_protocol.py::test_unknown_header_keys_are_ignored
- §3 the runtime always sends the six envelope keys (hello, reset, act, heartbeat, error, bye replies):
  test_protocol.py::test_replies_carry_the_whole_envelope (the link-loss act: test_s10_link_loss_act here)
- §5 a frame over ZMQ_MAXMSGSIZE drops that connection only, which then gets no_session:
  test_protocol.py::test_message_over_the_libzmq_cap_drops_only_that_connection
- §6 no handler answers `internal`, whatever it is sent: test_fuzz.py (every handler, mutated messages, 10^5
  messages in the slow test). `internal` itself needs a runtime bug: no conforming test can provoke it
- §7.1 the hello reply carries the manifest and policy id: test_session.py::test_hello_reply_carries_the_manifest;
  refusals (shape, dtype, name, extra array, action shape):
  test_session.py::test_hello_refused_when_spec_does_not_match_bundle;
  a second connection with the same robot id takes the session over:
  test_session.py::test_same_robot_id_on_a_second_socket_takes_the_session_over; a new socket resumes the
  session (reconnect counted, link_restored): test_session.py::test_reconnect_with_new_socket_resumes_session;
  the action dtype is not compared, actions are float32:
  test_session.py::test_action_dtype_is_not_compared_and_actions_are_float32; after a runtime restart the
  driver resumes on no_session: test_client.py::test_step_resumes_the_session_after_the_runtime_restarts,
  test_reliability.py::test_runtime_killed_and_restarted_while_robots_keep_trying
- §7.3 scores and plan of scored (chunked) policies: test_swap.py, test_session_tick.py; clipping to the
  manifest's bounds and one action per act from a chunk:
  test_faults.py::test_chunked_policy_clipping_and_saturation_through_the_runtime
- §7.4 reset numbers episodes: test_session.py::test_reset_and_heartbeat_replies; `no_instruction` for a
  language-conditioned policy: test_flow_export.py; `sim` recipes in data requests: test_requests.py
- §7.6 a robot's error report becomes a `warn` alert from monitor `robot`:
  test_session.py::test_robot_reported_error_becomes_alert
- §7.7 bye ends the session (disconnected event, no link alert):
  test_faults.py::test_bye_ends_the_session_without_link_alert;
  the runtime's own bye when it stops: test_session.py::test_runtime_says_bye_when_it_stops
- §8 rejections bump errors / error.<code> and raise a `protocol` alert: test_protocol.py::test_error_counters_on_exit
- §9.2 realtime acts on the freshest of one read, other kinds never discarded:
  test_faults.py::test_realtime_acts_on_freshest_observation_only
- §9.3 a missed deadline sends the safe action with a deadline verdict, one stored alert:
  test_faults.py::test_deadline_miss_sends_safe_action; the default deadline is one control period:
  test_faults.py::test_default_deadline_is_one_control_period
- §10 link loss: the unsolicited safe act and one `stop` alert per outage, a second outage is a new loss, traffic
  ends it: test_faults.py::test_link_loss_sends_safe_action_and_alerts, ::test_link_loss_before_first_observation;
  heartbeats, resets and rejected messages count as traffic: test_faults.py::test_any_traffic_keeps_the_link_alive;
  a robot's heartbeats keep an idle link (reference driver):
  test_client.py::test_heartbeats_keep_an_idle_link_alive_and_a_silent_one_gets_the_link_loss_act
- §10 the check interval, min(50 ms, link_timeout_s / 4), and "timers run between rounds" (§5.1) describe the loop;
  the tests bound link loss from both sides (after link_timeout_s, well before a busy machine's 5 s), no closer
- §7.1 "two robots must never use the same id", "use one connection per robot id", §4 the C++ notes and §11 are
  requirements on drivers, not on the runtime: the driver author's kit is tested against them (test_s11_...)
- §12 operator stream (alerts stored before published, ids, deduplication, data requests, swap): test_alerts.py,
  test_store.py, test_requests.py, test_reliability.py, test_swap.py, test_client.py; §12.1 control channel:
  test_fuzz.py::test_control_channel_*, test_client.py::test_control_link_swaps_and_reports_a_refusal
- §14 security (loopback only, CURVE): test_auth.py
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from conftest import Subscriber, assert_lqr_action, gain_of, start_serve, wait_until

from vigil.runtime.stream import subscribe
from vigil.wire.protocol import ENVELOPE, ROBOT_KINDS, Message, decode, encode

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "protocol.md"
EXAMPLE = ROOT / "examples" / "robot_driver.py"
CTX = zmq.Context.instance()
STATE = {"name": "state", "dtype": "float32", "shape": [3]}
ACTION = {"name": "action", "dtype": "float32", "shape": [1]}
SPEC = {"observation": [STATE], "action": ACTION}
X = np.array([0.05, -0.01, 0.08], np.float32)
REPLY_S = 10.0  # an upper bound for a reply that must come (never a claim about speed)
QUIET_S = 1.0  # how long we listen to conclude that no reply comes
HELLO_REPLY_KEYS = {"policy", "manifest", "mode", "deadline_ms", "heartbeat_s", "link_timeout_s", "pipeline",
                    "clock_synced", "session_expiry_s", "execution", "transitions"}


# -- a driver's view: raw frames on a DEALER ----------------------------------------------------------------------


def pack(header: Any) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def frames(kind: str, robot: str = "", seq: int = 1, arrays: dict[str, np.ndarray] | None = None,
           t_ns: int | None = None, **keys: Any) -> list[bytes]:
    """A message as docs/protocol.md §2-§4 describe it: a msgpack header with the six envelope keys (and `keys`),
    then one little-endian C-order frame per array. `t_ns` defaults to our wall clock, as a driver sends it."""
    descs, bufs = [], []
    for name, a in (arrays or {}).items():
        a = np.ascontiguousarray(a)
        descs.append({"name": name, "dtype": a.dtype.name, "shape": list(a.shape)})
        bufs.append(a.tobytes())
    header = {"v": 1, "kind": kind, "robot": robot, "seq": seq, "t_ns": time.time_ns() if t_ns is None else t_ns,
              "arrays": descs, **keys}
    return [pack(header), *bufs]


class Robot:
    """A DEALER socket, as any driver has: no vigil client code in between."""

    def __init__(self, endpoint: str, robot: str = "", routing_id: bytes | None = None):
        self.endpoint, self.robot = endpoint, robot
        self.sock = CTX.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        self.sock.connect(endpoint)
        self._seq = itertools.count(1)
        self.hello_reply: Message | None = None

    def next_seq(self) -> int:
        return next(self._seq)

    def send_raw(self, parts: list[bytes]) -> None:
        self.sock.send_multipart(parts)

    def send(self, kind: str, arrays: dict[str, np.ndarray] | None = None, seq: int | None = None,
             robot: str | None = None, **keys: Any) -> int:
        seq = self.next_seq() if seq is None else seq
        self.send_raw(frames(kind, self.robot if robot is None else robot, seq, arrays, **keys))
        return seq

    def recv_raw(self, timeout_s: float = REPLY_S) -> list[bytes] | None:
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return self.sock.recv_multipart()

    def recv(self, timeout_s: float = REPLY_S) -> Message:
        raw = self.recv_raw(timeout_s)
        assert raw is not None, f"no message from the runtime within {timeout_s} s"
        return decode(raw, kinds=ROBOT_KINDS)

    def silent(self, timeout_s: float = QUIET_S) -> bool:
        """Nothing arrives within timeout_s."""
        return self.recv_raw(timeout_s) is None

    def reply_to(self, seq: int, timeout_s: float = REPLY_S) -> Message:
        """The reply with `seq`, skipping link-loss acts (unsolicited, §10)."""
        deadline = time.monotonic() + timeout_s
        while True:
            msg = self.recv(max(0.0, deadline - time.monotonic()))
            if msg.seq == seq and not is_link_loss(msg):
                return msg

    def ask(self, kind: str, arrays: dict[str, np.ndarray] | None = None, **keys: Any) -> Message:
        return self.reply_to(self.send(kind, arrays, **keys))

    def hello(self, spec: Any = None, **keys: Any) -> Message:
        reply = self.ask("hello", spec=SPEC if spec is None else spec, **keys)
        assert reply.kind == "hello", reply.meta
        self.hello_reply = reply
        return reply

    def act(self, x: np.ndarray = X, **keys: Any) -> Message:
        return self.ask("obs", {"state": np.asarray(x, np.float32)}, **keys)

    def close(self) -> None:
        self.sock.close(linger=0)


def is_link_loss(msg: Message) -> bool:
    return msg.kind == "act" and any(v[0] == "link" for v in msg.meta.get("verdicts", ()))


def code(msg: Message) -> str | None:
    return msg.meta.get("code") if msg.kind == "error" else None


@dataclass
class Live:
    """A running runtime shared by a module's tests, with an operator-stream subscriber."""

    served: Any
    sub: Subscriber
    K: np.ndarray
    robots: list[Robot]

    @property
    def endpoint(self) -> str:
        return self.served.robot_endpoint

    def robot(self, robot: str = "", hello: bool = False, routing_id: bytes | None = None, **keys: Any) -> Robot:
        r = Robot(self.endpoint, robot, routing_id)
        self.robots.append(r)
        if hello:
            r.hello(**keys)
        return r

    def mark(self) -> int:
        """Take in what the stream delivered so far; the index of the next message."""
        while self.sub.pump(0):
            pass
        return len(self.sub.seen)

    def find(self, pred: Callable[[str, Message], bool], since: int = 0, timeout_s: float = REPLY_S) -> Message:
        """The first operator-stream message from index `since` on (already taken in or new) for which pred is
        true."""
        deadline = time.monotonic() + timeout_s
        i = since
        while True:
            for topic, msg in self.sub.seen[i:]:
                if pred(topic, msg):
                    return msg
            i = max(i, len(self.sub.seen))
            left = deadline - time.monotonic()
            assert left > 0, f"no matching operator-stream message within {timeout_s} s"
            self.sub.pump(max(1, int(left * 1000)))

    def periodic(self, pred: Callable[[Message], bool] = lambda m: True, since: int | None = None) -> Message:
        """A periodic telemetry message for which pred is true; by default one published after this call (the
        first message after what was taken in is skipped: it may have been on its way)."""
        since = self.mark() + 1 if since is None else since
        return self.find(lambda t, m: t == "telemetry" and "counters" in m.meta and pred(m), since)

    def event(self, robot: str, event: str, since: int = 0) -> Message:
        """A telemetry event of this robot."""
        return self.find(lambda t, m: t == "telemetry" and m.robot == robot and m.meta.get("event") == event, since)

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """The runtime is stopped (SIGSTOP) inside the block; what robots send meanwhile waits in the kernel and is
        all there when it goes on (SIGCONT)."""
        pid = self.served.proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            def stopped() -> bool:
                stats = [(t / "stat").read_text() for t in Path(f"/proc/{pid}/task").iterdir()]
                return all(s[s.rindex(")") + 2] in "tT" for s in stats)

            wait_until(stopped, timeout_s=10, interval_s=0.005)
            yield
            time.sleep(0.3)  # our ZeroMQ I/O thread hands what we sent to the kernel
        finally:
            os.kill(pid, signal.SIGCONT)


@contextmanager
def live_runtime(tmp_path_factory, name: str, bundle: Path, K: np.ndarray | None = None,
                 **flags: Any) -> Iterator[Live]:
    served = start_serve(tmp_path_factory.mktemp(name), bundle, telemetry_s=0.05, **flags)
    sub = Subscriber(subscribe(CTX, served.operator_endpoint))
    live = Live(served, sub, K if K is not None else np.zeros((1, 3)), [])
    try:
        sub.ready()
        yield live
    finally:
        for r in live.robots:
            r.close()
        sub.sock.close(linger=0)
        if served.alive():
            served.stop()


@pytest.fixture(scope="module")
def main(tmp_path_factory, lqr_bundle) -> Iterator[Live]:
    """Lockstep, defaults (pipeline 8, session expiry 300 s, loopback: clocks comparable); a deadline and a link
    timeout no busy machine can miss."""
    with live_runtime(tmp_path_factory, "main", lqr_bundle, gain_of(lqr_bundle), deadline_ms=5000,
                      link_timeout_s=300) as live:
        yield live


@pytest.fixture(scope="module")
def timers(tmp_path_factory, lqr_bundle) -> Iterator[Live]:
    """Link loss after 0.4 s of silence, sessions expire after 1.5 s, heartbeats asked every 0.05 s."""
    with live_runtime(tmp_path_factory, "timers", lqr_bundle, gain_of(lqr_bundle), deadline_ms=5000,
                      link_timeout_s=0.4, heartbeat_s=0.05, session_expiry_s=1.5) as live:
        yield live


@pytest.fixture(scope="module")
def realtime(tmp_path_factory, lqr_bundle) -> Iterator[Live]:
    """Realtime, `--pipeline 3`, the robot link on a non-local address (so clock_synced defaults to false)."""
    with live_runtime(tmp_path_factory, "realtime", lqr_bundle, gain_of(lqr_bundle), mode="realtime", pipeline=3,
                      robot_endpoint="tcp://0.0.0.0:0", allow_remote=True, deadline_ms=5000,
                      link_timeout_s=300) as live:
        yield live


DUAL_SPEC = {"observation": [{"name": "state", "dtype": "float32", "shape": [2]},
                             {"name": "flag", "dtype": "bool", "shape": [1]}],
             "action": {"name": "action", "dtype": "float32", "shape": [2]}}


@pytest.fixture(scope="module")
def dual(tmp_path_factory) -> Iterator[Live]:
    """action = state * flag for observations `state` float32 [2] and `flag` bool [1]; onnxruntime raises (a
    Reshape that cannot fit) when a state component exceeds 100: a policy that fails on some inputs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from vigil.policies.manifest import write_bundle
    from vigil.training.export import OPSET

    node = helper.make_node
    graph = helper.make_graph(
        [node("Cast", ["flag"], ["f"], to=TensorProto.FLOAT), node("Mul", ["state", "f"], ["a"]),
         node("ReduceMax", ["state"], ["m"], keepdims=0), node("Greater", ["m", "limit"], ["g"]),
         node("Cast", ["g"], ["gi"], to=TensorProto.INT64), node("Add", ["gi", "one"], ["n"]),
         node("Mul", ["n", "two"], ["n2"]), node("Unsqueeze", ["n2", "axis0"], ["n1"]),
         node("Concat", ["minus1", "n1"], ["shape"], axis=0), node("Reshape", ["a", "shape"], ["action"])],
        "dual", [helper.make_tensor_value_info("state", TensorProto.FLOAT, ["batch", 2]),
                 helper.make_tensor_value_info("flag", TensorProto.BOOL, ["batch", 1])],
        [helper.make_tensor_value_info("action", TensorProto.FLOAT, ["batch", 2])],
        [numpy_helper.from_array(np.array(100.0, np.float32), "limit"),
         numpy_helper.from_array(np.array(1, np.int64), "one"), numpy_helper.from_array(np.array(2, np.int64), "two"),
         numpy_helper.from_array(np.array([0], np.int64), "axis0"),
         numpy_helper.from_array(np.array([-1], np.int64), "minus1")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="vigil-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder = tmp_path_factory.mktemp("dual") / "dual"
    write_bundle(folder, model.SerializeToString(), {
        "name": "dual", "kind": "gaussian", "observation": DUAL_SPEC["observation"], "action": DUAL_SPEC["action"],
        "safe_action": [0.0, 0.0], "control_rate_hz": 20.0,
        "onnx": {"inputs": {"state": "state", "flag": "flag"}, "action": "action"}})
    with live_runtime(tmp_path_factory, "dual-serve", folder, deadline_ms=5000, link_timeout_s=300) as live:
        yield live


def dual_obs(state: Any, flag: Any, flag_first: bool = False) -> dict[str, np.ndarray]:
    s, f = np.asarray(state, np.float32), np.asarray(flag, np.bool_)
    return {"flag": f, "state": s} if flag_first else {"state": s, "flag": f}


def bool_frames(robot: str, seq: int, state: Any, flag_byte: int, flag_first: bool = False) -> list[bytes]:
    """An obs of the dual bundle whose bool array holds the raw byte `flag_byte`."""
    parts = frames("obs", robot, seq, dual_obs(state, [True], flag_first))
    parts[1 if flag_first else 2] = bytes([flag_byte])
    return parts


# == §1 Transport ====================================================================================================


def test_s1_a_dealer_sends_and_receives_header_and_buffers_without_delimiter(main):
    """"A DEALER sends the message frames directly (frame 0 = header) ... what the DEALER receives is exactly
    [header, buffer1, ..., bufferN]"."""
    r = main.robot("s1-frames", hello=True)
    seq = r.send("obs", {"state": X})
    raw = r.recv_raw()
    assert raw is not None and len(raw) == 2
    header = msgpack.unpackb(raw[0], raw=False)
    assert header["kind"] == "act" and header["seq"] == seq and header["arrays"] == [ACTION]
    assert_lqr_action(np.frombuffer(raw[1], "<f4"), main.K, X)


def test_s1_a_req_socket_is_read_as_an_empty_header(main):
    """"Do not use a REQ socket: REQ inserts an empty delimiter frame, which the runtime would read as an empty
    (invalid) header" (and its reply, without a delimiter, never reaches the REQ socket)."""
    before = main.periodic().meta["counters"].get("error.bad_header", 0)
    req = CTX.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    try:
        req.connect(main.endpoint)
        req.send_multipart(frames("hello", "s1-req", 1, spec=SPEC))
        assert not req.poll(int(QUIET_S * 1000))
    finally:
        req.close(linger=0)
    main.periodic(lambda m: m.meta["counters"].get("error.bad_header", 0) == before + 1)


def test_s1_a_robots_messages_are_handled_in_arrival_order(main):
    """"Requests may be pipelined (several in flight) ... the runtime ... handles each connection's messages in
    arrival order", and "Every reply carries the request's seq" (§7)."""
    r = main.robot("s1-order", hello=True)
    xs = [np.array([0.01 * i, 0.0, -0.01 * i], np.float32) for i in range(1, 7)]
    sent = [r.send("obs", {"state": xs[0]}), r.send("heartbeat"), r.send("obs", {"state": xs[1]}), r.send("reset")]
    sent += [r.send("obs", {"state": x}) for x in xs[2:6]]  # 8 in flight: the default pipeline depth
    replies = [r.recv() for _ in sent]
    assert [m.seq for m in replies] == sent
    assert [m.kind for m in replies] == ["act", "heartbeat", "act", "reset", "act", "act", "act", "act"]
    for m, x in zip([m for m in replies if m.kind == "act"], xs):
        assert_lqr_action(m.arrays["action"], main.K, x)


def test_s1_a_message_failing_validation_is_answered_as_soon_as_it_is_read(main):
    """"a message that fails validation (§6 steps 1-9) is answered as soon as it is read ... before messages read
    earlier have had their turn; so match replies by seq"."""
    r = main.robot("s1-overtake", hello=True)
    with main.frozen():
        first = r.send("obs", {"state": X})
        bad = r.send("obs", {"state": np.array([np.nan, 0, 0], np.float32)})
        last = r.send("obs", {"state": -X})
    replies = [r.recv() for _ in range(3)]
    assert [(m.kind, m.seq) for m in replies] == [("error", bad), ("act", first), ("act", last)]
    assert code(replies[0]) == "not_finite"


@pytest.mark.parametrize("header", [b"\xc1garbage", b"", pack({"v": 1, "kind": "obs", "seq": 7})[:-3]],
                         ids=["garbage", "empty", "truncated"])
def test_s1_an_unreadable_header_is_answered_with_seq_0(main, header):
    """"An error for a header that is not even valid msgpack carries seq 0"."""
    r = main.robot()
    r.send_raw([header])
    reply = r.recv()
    assert code(reply) == "bad_header" and reply.seq == 0


def test_s1_a_connection_that_reuses_a_connected_routing_id_gets_no_reply_at_all(main):
    """"a connection that sets the routing id of a peer already connected is ignored inside libzmq: its messages
    never reach the runtime, it gets no reply at all (not even an error), for as long as that connection lasts,
    even after the other peer has gone. The peer already connected is unaffected.\""""
    first = main.robot("s1-routing-first", hello=True, routing_id=b"s1-routing-id")
    second = main.robot("s1-routing-second", routing_id=b"s1-routing-id")
    second.send("hello", spec=SPEC)
    second.send("heartbeat")
    second.send("obs", {"state": X})
    assert second.silent()
    assert first.act().kind == "act"  # unaffected, and its replies are its own
    assert (m := first.ask("heartbeat")).kind == "heartbeat" and m.robot == "s1-routing-first"
    first.close()
    time.sleep(0.3)
    second.send("heartbeat")
    assert second.silent()  # still nothing, though the routing id is free now
    third = main.robot("s1-routing-third", routing_id=b"s1-routing-id")  # a new connection may take it
    assert third.ask("heartbeat").kind == "heartbeat"


# == §2 Frames =======================================================================================================


@pytest.mark.parametrize("header", [
    pytest.param({"v": 1, "kind": "heartbeat", b"seq": 5}, id="bin-key"),
    pytest.param({"v": 1, "kind": "heartbeat", "seq": 5, "x": msgpack.ExtType(1, b"ab")}, id="ext-value"),
    pytest.param({"v": 1, "kind": "hello", "robot": "s2-bin", "seq": 5,
                  "spec": {"observation": [{**STATE, "name": b"state"}], "action": ACTION}}, id="nested-bin"),
])
def test_s2_header_without_str_keys_or_with_bin_or_ext_values_is_refused(main, header):
    """"Map keys must be msgpack str ... The header must not contain msgpack bin or ext values anywhere" (§8:
    `bad_header`)."""
    r = main.robot()
    r.send_raw([pack(header)])
    assert code(r.recv()) == "bad_header"


def test_s2_any_integer_encoding_and_float32_or_float64_are_accepted(main):
    """"Integers may use any msgpack integer encoding (fixint, uint8..uint64, int8..int64); floats may be float32
    or float64." Key order does not matter either."""
    spec = {"observation": [{**STATE, "low": [-10.0, -10.0, -10.0], "high": [10.0, 10.0, 10.0]}], "action": ACTION}
    body = (b"\xa4kind\xa5hello" + b"\xa5robot\xa9s2-encode" + b"\xa3seq\xcf" + (7).to_bytes(8, "big")
            + b"\xa4t_ns\xd3" + time.time_ns().to_bytes(8, "big") + b"\xa6arrays\x90"
            + b"\xa4spec" + msgpack.packb(spec, use_single_float=True) + b"\xa1v\xd0\x01")  # v last, as an int8
    r = main.robot()
    r.send_raw([b"\x87" + body])
    reply = r.recv()
    assert reply.kind == "hello" and reply.seq == 7 and reply.robot == "s2-encode"
    seq = (8).to_bytes(2, "big")
    r.send_raw([b"\x86" + b"\xa1v\xcc\x01" + b"\xa4kind\xa3obs" + b"\xa3seq\xcd" + seq + b"\xa4t_ns\x00"
                + b"\xa5robot\xa0" + b"\xa6arrays" + msgpack.packb([STATE]), X.tobytes()])
    act = r.recv()
    assert act.kind == "act" and act.seq == 8
    assert_lqr_action(act.arrays["action"], main.K, X)


# == §3 The envelope =================================================================================================


def test_s3_envelope_keys_are_optional_except_v_and_kind(main):
    """`robot`, `seq`, `t_ns`, `arrays` are "optional (default ...)": a header of only `v` and `kind` is valid."""
    r = main.robot()
    r.send_raw([pack({"v": 1, "kind": "heartbeat"})])
    reply = r.recv()
    assert reply.kind == "heartbeat" and reply.seq == 0 and reply.robot == ""


@pytest.mark.parametrize("key, value, ok", [
    ("seq", 2**63 - 1, True), ("seq", 2**63, False), ("t_ns", 2**63 - 1, True), ("t_ns", 2**63, False),
    ("robot", "r" * 64, True), ("robot", "r" * 65, False),
])
def test_s3_seq_t_ns_and_robot_ranges(main, key, value, ok):
    """"seq: 0 <= seq < 2^63", "t_ns: 0 <= t_ns < 2^63", "robot: at most 64 characters" (else `bad_header`)."""
    r = main.robot()
    h = {"v": 1, "kind": "heartbeat", "robot": "", "seq": 3, "t_ns": 1, "arrays": [], key: value}
    r.send_raw([pack(h)])
    reply = r.recv()
    if ok:
        assert reply.kind == "heartbeat" and reply.seq == h["seq"] and reply.robot == ""  # no session: no id
    else:
        assert code(reply) == "bad_header"
        assert reply.seq == (0 if key == "seq" else 3)  # an unreadable seq is answered with seq 0


def test_s3_seq_is_copied_never_interpreted(main):
    """"the runtime never interprets or checks the order of a robot's seq; it copies it into the reply"."""
    r = main.robot("s3-seq", hello=True)
    for seq in (5, 3, 5, 0, 2**63 - 1):
        r.send("obs", {"state": X}, seq=seq)
        reply = r.recv()
        assert (reply.kind, reply.seq) == ("act", seq)


def test_s3_robot_field_is_not_read_on_messages_of_a_session(main):
    """"For every other message the runtime knows the sender by its connection ... and does not read this field"."""
    main.robot("s3-other", hello=True)
    r = main.robot("s3-mine", hello=True)
    for kind, arrays in (("obs", {"state": X}), ("reset", None), ("heartbeat", None)):
        reply = r.reply_to(r.send(kind, arrays, robot="s3-other"))
        assert reply.kind == {"obs": "act"}.get(kind, kind) and reply.robot == "s3-mine"


ACCEPTED = "no_session"  # decoding accepted the message; the handler then wants a session


@pytest.mark.parametrize("desc, buf, expected", [
    pytest.param({"name": "n" * 64, "dtype": "uint8", "shape": [1]}, b"\x01", ACCEPTED, id="name-64"),
    pytest.param({"name": "n" * 65, "dtype": "uint8", "shape": [1]}, b"\x01", "bad_header", id="name-65"),
    pytest.param({"name": "d", "dtype": "uint8", "shape": [2**31]}, b"", "bad_shape", id="dim-2^31"),
    pytest.param({"name": "d", "dtype": "uint8", "shape": [2**31 - 1]}, b"", "too_large", id="dim-2^31-1"),
    pytest.param({"name": "d", "dtype": "uint8", "shape": [1, 1, 1, 2]}, b"\x01\x02", ACCEPTED, id="4-dims"),
    pytest.param({"name": "d", "dtype": "int64", "shape": []}, bytes(8), ACCEPTED, id="scalar"),
    pytest.param({"name": "d", "dtype": "int64", "shape": []}, bytes(7), "bad_frames", id="scalar-short"),
    pytest.param({"name": "d", "dtype": "float64", "shape": [0, 5]}, b"", ACCEPTED, id="empty"),
])
def test_s3_array_descriptor_constraints(main, desc, buf, expected):
    """Descriptor: "name 1 to 64 characters", "shape at most 4 dimensions, each 0 <= d < 2^31; [] is a scalar
    (one element)", and §4: a frame holds exactly itemsize x product(shape) bytes."""
    r = main.robot()
    header = {"v": 1, "kind": "obs", "robot": "", "seq": 10, "t_ns": 1, "arrays": [desc]}
    r.send_raw([pack(header), buf])
    reply = r.recv()
    assert code(reply) == expected and reply.seq == 10


@pytest.mark.parametrize("dtype", ["float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
                                   "bool", "uint32", "uint64", "float16", "complex64", "str", "object"])
def test_s3_dtype_whitelist(main, dtype):
    """"Nothing else (no uint32, uint64, float16, complex or strings) is accepted" (`bad_dtype`); every whitelisted
    dtype decodes (an extra array is then `bad_shape` against the manifest)."""
    whitelisted = dtype in ("float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "bool")
    r = main.robot()
    size = np.dtype(dtype).itemsize if whitelisted or dtype not in ("str", "object") else 4
    header = {"v": 1, "kind": "obs", "seq": 4, "arrays": [STATE, {"name": "extra", "dtype": dtype, "shape": [2]}]}
    r.send_raw([pack(header), X.tobytes(), bytes(2 * size)])
    assert code(r.recv()) == (ACCEPTED if whitelisted else "bad_dtype")


# == §4 Arrays =======================================================================================================


@pytest.mark.parametrize("byte, path", [(0x02, "declared order"), (0xFF, "declared order"), (0x02, "other order")])
def test_s4_bool_bytes_other_than_0_and_1_are_bad_value(dual, byte, path):
    """"Bool arrays must hold only the bytes 0x00 and 0x01: any other byte is bad_value ... the message is dropped
    before any policy or monitor sees it" (whether its arrays come in the declared order or another)."""
    r = dual.robot(f"s4-bool-{byte}-{path[0]}", hello=True, spec=DUAL_SPEC)
    flag_first = path == "other order"
    r.send_raw(bool_frames(r.robot, 5, [1.0, 2.0], byte, flag_first))
    reply = r.recv()
    assert code(reply) == "bad_value" and reply.seq == 5 and reply.robot == r.robot
    for b, expected in ((0x01, [1.0, 2.0]), (0x00, [0.0, 0.0])):
        r.send_raw(bool_frames(r.robot, 6, [1.0, 2.0], b, flag_first))
        act = r.recv()
        assert act.kind == "act" and act.meta["safe"] is False
        np.testing.assert_array_equal(act.arrays["action"], np.array(expected, np.float32))
    robots = dual.periodic(lambda m: m.meta["robots"].get(r.robot, {}).get("ticks") == 2).meta["robots"]
    assert robots[r.robot]["errors"] == 1  # the refused one was never a tick


def test_s4_bool_strictness_applies_before_any_session(main):
    """`bad_value` is a decoding error (§6 step 9): it comes before the handler's `no_session`."""
    r = main.robot()
    header = {"v": 1, "kind": "obs", "seq": 3, "arrays": [{"name": "mask", "dtype": "bool", "shape": [3]}]}
    r.send_raw([pack(header), b"\x00\x01\x02"])
    assert code(r.recv()) == "bad_value"
    r.send_raw([pack(header), b"\x00\x01\x01"])
    assert code(r.recv()) == "no_session"


def test_s4_rejected_values_never_reach_the_policy_or_monitors(main):
    """"Either way the message is dropped before any policy or monitor sees it": no tick, no monitor verdict."""
    r = main.robot("s4-dropped", hello=True)
    assert r.act().kind == "act"
    for bad in ([np.nan, 0, 0], [0, np.inf, 0], [0, 0, -np.inf]):
        assert code(r.act(np.array(bad, np.float32))) == "not_finite"
    robot = main.periodic(lambda m: m.meta["robots"].get("s4-dropped", {}).get("errors") == 3).meta["robots"]
    assert robot["s4-dropped"]["ticks"] == 1 and robot["s4-dropped"].get("safe", 0) == 0


# == §5 Limits =======================================================================================================


def test_s5_limits_are_inclusive(main):
    """A header of exactly 64 KiB, 16 arrays, an array of exactly 8 MiB are within the limits (only "anything
    above a limit is refused with too_large")."""
    r = main.robot()
    h = {"v": 1, "kind": "heartbeat", "robot": "", "seq": 11, "t_ns": 1, "arrays": [], "pad": ""}
    h["pad"] = "x" * (65_536 - len(pack(h)) - 2)  # str 8 -> str 16 header: 2 more bytes
    assert len(pack(h)) == 65_536
    r.send_raw([pack(h)])
    assert r.recv().kind == "heartbeat"
    h["pad"] += "x"
    r.send_raw([pack(h)])
    assert code(r.recv()) == "too_large"
    sixteen = [{"name": f"a{i}", "dtype": "uint8", "shape": [1]} for i in range(16)]
    r.send_raw([pack({"v": 1, "kind": "obs", "seq": 12, "arrays": sixteen}), *[b"\x00"] * 16])
    assert code(r.recv()) == "no_session"  # decoded: 16 arrays are allowed
    big = {"name": "big", "dtype": "uint8", "shape": [8 * 2**20]}
    r.send_raw([pack({"v": 1, "kind": "obs", "seq": 13, "arrays": [big]}), bytes(8 * 2**20)])
    assert code(r.recv()) == "no_session"  # decoded: 8 MiB is allowed


# == §5.1 Queues, rounds and fairness =================================================================================


def collect(robots: list[Robot], n: int) -> list[tuple[int, Message]]:
    """n messages from the given robots, as (index of the robot, message), in the order the runtime stamped them
    (its wall clock in `t_ns`: the order it served them in)."""
    got: list[tuple[int, Message]] = []
    poller = zmq.Poller()
    for r in robots:
        poller.register(r.sock, zmq.POLLIN)
    deadline = time.monotonic() + REPLY_S
    while len(got) < n:
        assert time.monotonic() < deadline, f"only {len(got)} of {n} replies"
        for sock, _ in poller.poll(100):
            i = next(i for i, r in enumerate(robots) if r.sock is sock)
            got.append((i, decode(sock.recv_multipart(), kinds=ROBOT_KINDS)))
    return sorted(got, key=lambda item: item[1].t_ns)


def test_s5_1_robots_are_served_in_turn(main):
    """"It then serves one message from every connection whose queue is not empty ... A robot that floods the
    runtime therefore gets one message handled per round, like every other robot"."""
    flood = main.robot("s5-flood", hello=True, pipeline=64)
    calm = main.robot("s5-calm", hello=True)
    with main.frozen():
        flood_seqs = [flood.send("obs", {"state": X}) for _ in range(40)]
        calm_seqs = [calm.send("obs", {"state": -X}) for _ in range(5)]
    served = collect([flood, calm], 45)
    assert all(m.kind == "act" for _, m in served)
    assert [m.seq for i, m in served if i == 0] == flood_seqs  # each robot's in its own order
    assert [m.seq for i, m in served if i == 1] == calm_seqs
    flood_before = 0
    for k, (i, _) in enumerate(served):
        if i == 0:
            flood_before += 1
        else:  # the calm robot's j-th act waited for at most j + 1 of the flood (one per round, + one read)
            j = sum(1 for i2, _ in served[:k + 1] if i2 == 1)
            assert flood_before <= j + 1, [i for i, _ in served]


def test_s5_1_overflow_drops_the_oldest_waiting_observation(main):
    """"A message that arrives at a full queue pushes out the oldest waiting obs, which is answered at once with an
    error overflow carrying that observation's seq (counters overflow_dropped, errors, error.overflow) and is
    never handled"; the depth is the `pipeline` declared in hello."""
    before = main.periodic().meta["counters"]
    r = main.robot("s5-overflow", hello=True, pipeline=2)
    assert r.hello_reply.meta["pipeline"] == 2
    with main.frozen():
        seqs = [r.send("obs", {"state": X * i}) for i in range(1, 6)]
    replies = [r.recv() for _ in seqs]
    assert sorted(m.seq for m in replies) == seqs  # every observation answered once
    dropped = [m.seq for m in replies if code(m) == "overflow"]
    acted = [m.seq for m in replies if m.kind == "act"]
    assert dropped and set(dropped) | set(acted) == set(seqs)
    assert acted[-2:] == seqs[-2:] and max(dropped) < seqs[-2]  # the oldest were pushed out, the newest served
    assert all(m.robot == "s5-overflow" for m in replies)
    main.periodic(lambda m: all(m.meta["counters"].get(k, 0) >= before.get(k, 0) + len(dropped)
                                for k in ("overflow_dropped", "error.overflow", "errors")))


def test_s5_1_the_default_depth_is_the_runtimes_pipeline(main, realtime):
    """"else the runtime's default (vigil serve --pipeline, 8)": a robot that declares none may have 8 waiting."""
    r = main.robot("s5-default", hello=True)
    assert r.hello_reply.meta["pipeline"] == 8
    assert realtime.robot("s5-flag", hello=True).hello_reply.meta["pipeline"] == 3
    with main.frozen():
        seqs = [r.send("obs", {"state": X}) for _ in range(10)]
    replies = [r.recv() for _ in seqs]
    assert [m.seq for m in replies if code(m) == "overflow"] == seqs[:2]
    assert [m.seq for m in replies if m.kind == "act"] == seqs[2:]


def test_s5_1_the_default_depth_applies_without_a_session_and_before_the_hello_is_handled(main):
    """The default depth "also applies to connections without a session and to messages read before the hello is
    handled"."""
    stranger = main.robot()
    with main.frozen():
        seqs = [stranger.send("obs", {"state": X}) for _ in range(10)]
    replies = [stranger.recv() for _ in seqs]
    assert [m.seq for m in replies if code(m) == "overflow"] == seqs[:2]
    assert [m.seq for m in replies if code(m) == "no_session"] == seqs[2:]
    early = main.robot("s5-early")
    with main.frozen():  # read in one go with its hello: queued under the default depth of 8, not under 2
        hello = early.send("hello", spec=SPEC, pipeline=2)
        seqs = [early.send("obs", {"state": X}) for _ in range(5)]
    replies = [early.recv() for _ in range(6)]
    assert [(m.kind, m.seq) for m in replies] == [("hello", hello)] + [("act", s) for s in seqs]


def test_s5_1_other_kinds_are_never_pushed_out(main):
    """"Other kinds (hello, reset, heartbeat, bye, error) are never pushed out: when the queue holds no obs, the new
    message is queued beyond the depth"; a later message still pushes out a waiting obs."""
    r = main.robot("s5-kinds", hello=True, pipeline=2)
    with main.frozen():
        beats = [r.send("heartbeat") for _ in range(3)]
        obs = r.send("obs", {"state": X})
        beats.append(r.send("heartbeat"))
    replies = [r.recv() for _ in range(5)]
    assert [m.seq for m in replies if m.kind == "heartbeat"] == beats
    [dropped] = [m for m in replies if m.kind == "error"]
    assert code(dropped) == "overflow" and dropped.seq == obs


def test_s5_1_a_backlog_of_other_kinds_is_answered_in_full(main):
    """Other kinds "are never pushed out", and the runtime "serves as many messages as it read", so a backlog of
    400 heartbeats (queued while the runtime was stopped) is answered in full, in order, with no overflow."""
    r = main.robot()
    with main.frozen():
        seqs = [r.send("heartbeat") for _ in range(400)]
    replies = [r.recv() for _ in seqs]
    assert [m.seq for m in replies] == seqs and all(m.kind == "heartbeat" for m in replies)


def test_s5_1_reads_per_wake_up_are_bounded(realtime):
    """"the runtime reads at most 8 + 2 x (number of sessions) messages ... A long backlog is read over several
    rounds, so in realtime mode it may get several acts": each read's newest observation is acted on."""
    r = realtime.robot("s5-backlog", hello=True, pipeline=256)
    sessions = len(realtime.periodic(lambda m: "s5-backlog" in m.meta["robots"]).meta["robots"])
    with realtime.frozen():
        seqs = [r.send("obs", {"state": X}) for _ in range(200)]
    acts = []
    while (raw := r.recv_raw(QUIET_S)) is not None:
        acts.append(decode(raw, kinds=ROBOT_KINDS))
    assert all(m.kind == "act" for m in acts) and acts[-1].seq == seqs[-1]
    assert [m.seq for m in acts] == sorted(m.seq for m in acts)
    assert len(acts) >= math.ceil(200 / min(256, 8 + 2 * sessions)), (len(acts), sessions)


# == §6 Validation order =============================================================================================

BIG_HEADER_V2 = pack({"v": 2, "kind": "obs", "pad": "x" * 70_000})
NAN = np.array([np.nan, 0, 0], np.float32).tobytes()
BAD_BOOL = b"\x02"
MIB8 = {"name": "a", "dtype": "uint8", "shape": [8 * 2**20]}


def obs_header(*arrays: dict, **fields: Any) -> bytes:
    return pack({"v": 1, "kind": "obs", "robot": "", "seq": 21, "t_ns": 1, "arrays": list(arrays), **fields})


FIRST_FAILURE = {  # name: (frames, session?, expected code): the first failure in §6's order wins
    "size before parse": ([BIG_HEADER_V2], False, "too_large"),
    "version before kind": ([obs_header(v=2, kind="teleport")], False, "bad_version"),
    "kind before robot": ([obs_header(kind="teleport", robot=5)], False, "bad_kind"),
    "robot before array count": ([obs_header(*[STATE] * 17, robot="r" * 65)], False, "bad_header"),
    "array count before frames": ([obs_header(*[{**STATE, "name": f"a{i}"} for i in range(17)])], False,
                                  "too_large"),
    "frames before dtype": ([obs_header({**STATE, "dtype": "float16"}, {**STATE, "name": "b"}), NAN], False,
                            "bad_frames"),
    "arrays in order: name of the first": ([obs_header({**STATE, "name": ""}, {**STATE, "name": "b",
                                                                                "dtype": "float16"}), NAN, NAN],
                                           False, "bad_header"),
    "arrays in order: dtype of the first": ([obs_header({**STATE, "dtype": "float16"}, {**STATE, "name": ""}), NAN,
                                             NAN], False, "bad_dtype"),
    "dtype before shape": ([obs_header({**STATE, "dtype": "uint32", "shape": [-1]}), NAN], False, "bad_dtype"),
    "shape before size": ([obs_header({**STATE, "shape": [1, 1, 1, 2**20, 2**10]}), NAN], False, "bad_shape"),
    "size before frame length": ([obs_header({**STATE, "shape": [2**22]}), NAN], False, "too_large"),
    "frame length before values": ([obs_header({**STATE, "shape": [2]}), NAN], False, "bad_frames"),
    "values of the first array first": ([obs_header(STATE, {"name": "m", "dtype": "bool", "shape": [1]}), NAN,
                                         BAD_BOOL], False, "not_finite"),
    "bool values in order": ([obs_header({"name": "m", "dtype": "bool", "shape": [1]}, STATE), BAD_BOOL, NAN],
                             False, "bad_value"),
    "values before total": ([obs_header(STATE, MIB8, {**MIB8, "name": "b"}), NAN, bytes(8 * 2**20),
                             bytes(8 * 2**20)], False, "not_finite"),
    "total before duplicate name": ([obs_header(MIB8, MIB8), bytes(8 * 2**20), bytes(8 * 2**20)], False,
                                    "too_large"),
    "duplicate name after values": ([obs_header(STATE, STATE), X.tobytes(), NAN], False, "not_finite"),
    "decoding before no_session": ([obs_header(STATE), NAN], False, "not_finite"),
    "act is bad_kind, with or without a session": ([pack({"v": 1, "kind": "act", "seq": 21})], False, "bad_kind"),
    "hello: robot before spec": ([pack({"v": 1, "kind": "hello", "seq": 21})], False, "bad_header"),
    "hello: spec before pipeline": ([pack({"v": 1, "kind": "hello", "robot": "s6-x", "seq": 21,
                                           "spec": {"observation": 1}, "pipeline": 0})], False, "bad_spec"),
    "hello: refused before pipeline": ([pack({"v": 1, "kind": "hello", "robot": "s6-x", "seq": 21,
                                              "spec": {"observation": [{**STATE, "shape": [4]}], "action": 1},
                                              "pipeline": 0})], False, "refused"),
    "hello: bad action spec after observations": ([pack({"v": 1, "kind": "hello", "robot": "s6-x", "seq": 21,
                                                         "spec": {"observation": [STATE], "action": 1}})], False,
                                                  "bad_spec"),
    "obs: session before arrays": ([obs_header({**STATE, "shape": [4]}), bytes(16)], False, "no_session"),
    "obs: array count before dtype": ([obs_header({**STATE, "dtype": "float64"}, {**STATE, "name": "b"}),
                                       bytes(24), bytes(12)], True, "bad_shape"),
    "obs: dtype before shape": ([obs_header({**STATE, "dtype": "float64", "shape": [2]}), bytes(16)], True,
                                "bad_dtype"),
    "reset: session before keys": ([pack({"v": 1, "kind": "reset", "seq": 21, "seed": -1})], False, "no_session"),
}


@pytest.mark.parametrize("name", list(FIRST_FAILURE))
def test_s6_the_first_failure_in_validation_order_wins(main, name):
    """"Everything is validated before it is used; the first failure wins and produces one error reply", in the
    order of §6 (decoding steps 1-9, then the handler of the kind)."""
    parts, session, expected = FIRST_FAILURE[name]
    r = main.robot("s6-robot", hello=session)
    r.send_raw(parts)
    reply = r.recv()
    assert code(reply) == expected, reply.meta
    assert r.ask("heartbeat").kind == "heartbeat"  # one reply only, and the connection stays usable


# == §7 Message kinds ================================================================================================


def test_s7_1_hello_reply_keys(main):
    """The hello reply carries `policy`, `manifest`, `mode`, `deadline_ms`, `heartbeat_s`, `link_timeout_s`,
    `pipeline`, `clock_synced`, `session_expiry_s` and `execution`, with their defaults."""
    reply = main.robot("s7-1-keys", hello=True).hello_reply
    assert HELLO_REPLY_KEYS <= set(reply.meta)
    m = reply.meta
    assert m["policy"] == main.served.policy and isinstance(m["manifest"], dict)
    assert (m["mode"], m["deadline_ms"], m["heartbeat_s"], m["link_timeout_s"]) == ("lockstep", 5000.0, 0.1, 300.0)
    assert (m["pipeline"], m["clock_synced"], m["session_expiry_s"]) == (8, True, 300.0)  # loopback: clocks synced
    assert reply.robot == "s7-1-keys" and m["manifest"]["safe_action"] == [0.0]
    assert m["execution"] == "sync"  # the default (§7.3.1)


@pytest.mark.parametrize("keys, ok", [
    ({"pipeline": 1}, True), ({"pipeline": 256}, True), ({"clock_synced": False}, True),
    ({"pipeline": 0}, False), ({"pipeline": 257}, False), ({"pipeline": 8.0}, False), ({"pipeline": True}, False),
    ({"pipeline": "8"}, False), ({"clock_synced": 1}, False), ({"clock_synced": "true"}, False),
    ({"clock_synced": None}, False),
])
def test_s7_1_pipeline_and_clock_synced(main, keys, ok):
    """"pipeline, if present, is an integer 1..256, and clock_synced, if present, a bool -> else bad_header"; the
    reply carries the values in force."""
    r = main.robot("s7-1-hello-keys")
    reply = r.ask("hello", spec=SPEC, **keys)
    if ok:
        assert reply.kind == "hello"
        for k, v in keys.items():
            assert reply.meta[k] == v
    else:
        assert code(reply) == "bad_header"


def test_s7_1_clock_synced_defaults_to_false_on_a_non_local_endpoint(realtime):
    """clock_synced: "true when the runtime's robot endpoint is local (ipc://, inproc://, or tcp:// on a loopback
    address), else false" (this runtime binds tcp://0.0.0.0)."""
    assert realtime.endpoint.startswith("tcp://0.0.0.0:")
    assert realtime.robot("s7-1-remote", hello=True).hello_reply.meta["clock_synced"] is False
    assert realtime.robot("s7-1-remote-2", hello=True, clock_synced=True).hello_reply.meta["clock_synced"] is True


@pytest.mark.parametrize("spec, expected", [
    pytest.param({"observation": [{**STATE, "low": [0.0, 0.0]}], "action": ACTION}, "bad_spec", id="low-size"),
    pytest.param({"observation": [{**STATE, "high": [0, 0, True]}], "action": ACTION}, "bad_spec", id="high-bool"),
    pytest.param({"observation": [{**STATE, "name": ""}], "action": ACTION}, "bad_spec", id="empty-name"),
    pytest.param({"observation": [{**STATE, "shape": [3.0]}], "action": ACTION}, "bad_spec", id="float-dim"),
    pytest.param({"observation": [STATE, STATE], "action": ACTION}, "refused", id="declared-twice"),
    pytest.param({"observation": [STATE], "action": {**ACTION, "dtype": "float16"}}, "bad_spec", id="action-dtype"),
    pytest.param({"observation": [STATE], "action": {**ACTION, "dtype": "float64"}}, None, id="action-float64"),
    pytest.param({"observation": [{**STATE, "low": [-1, -1, -1], "high": [1, 1, 1]}], "action": ACTION}, None,
                 id="bounds"),
])
def test_s7_1_spec_checks(main, spec, expected):
    """The spec checks of §7.1: valid array specs (`bad_spec`), exactly the manifest's observations, "none twice"
    (`refused`), the action a valid spec whose dtype is not compared."""
    reply = main.robot("s7-1-spec").ask("hello", spec=spec)
    assert code(reply) == expected if expected else reply.kind == "hello"


def test_s7_1_the_robots_bounds_are_validated_not_used(main):
    """"The robot's low/high are validated but not used: range checks use the bounds in the manifest"."""
    narrow = {"observation": [{**STATE, "low": [-0.01] * 3, "high": [0.01] * 3}], "action": ACTION}
    r = main.robot("s7-1-narrow", hello=True, spec=narrow)
    x = np.array([5.0, -5.0, 5.0], np.float32)  # far outside the robot's bounds, inside the manifest's [-10, 10]
    reply = r.act(x)
    assert reply.meta["verdicts"] == [] and reply.meta["safe"] is False
    outside = r.act(np.array([11.0, 0, 0], np.float32))  # outside the manifest's: an observation alert
    assert [v[:2] for v in outside.meta["verdicts"]] == [["observation", "alert"]]


def test_s7_1_other_hello_keys_are_session_information(main):
    """"Any other header keys (the simulator sends env) are kept as session information; env appears in the
    connected telemetry event"."""
    main.robot("s7-1-env", hello=True, env="pitch-rig-3", firmware="2.1")
    assert main.event("s7-1-env", "connected").meta["values"] == {"env": "pitch-rig-3"}


def test_s7_1_hello_again_resumes_with_the_new_keys(main):
    """"A hello with a robot id that already has a session (... or it simply said hello again) resumes that session:
    the same episode count ... with that hello's spec, pipeline and clock_synced (the runtime counts a
    reconnect ...)"."""
    before = main.periodic().meta["counters"].get("reconnects", 0)
    r = main.robot("s7-1-again", hello=True)
    assert r.ask("reset").meta["episode"] == 1
    assert r.hello(pipeline=3, clock_synced=False).meta["pipeline"] == 3
    assert r.hello_reply.meta["clock_synced"] is False
    assert r.ask("reset").meta["episode"] == 2
    main.periodic(lambda m: m.meta["counters"].get("reconnects", 0) == before + 1)


def test_s7_1_takeover_leaves_the_first_connection_without_session(main):
    """"the second hello takes the session over, and the first robot's obs, reset and error then get no_session"."""
    first = main.robot("s7-1-twin", hello=True)
    main.robot("s7-1-twin", hello=True)
    assert code(first.act()) == "no_session"
    assert code(first.ask("reset")) == "no_session"
    assert code(first.ask("error", code="x", message="y")) == "no_session"


def test_s7_2_observation_arrays_in_any_order(dual):
    """"arrays lists exactly the manifest's observation arrays (any order)"."""
    r = dual.robot("s7-2-order", hello=True, spec=DUAL_SPEC)
    for flag_first in (False, True):
        reply = r.ask("obs", dual_obs([3.0, -4.0], [True], flag_first))
        assert reply.kind == "act"
        np.testing.assert_array_equal(reply.arrays["action"], np.array([3.0, -4.0], np.float32))


def test_s7_3_act_keys(main):
    """The act: `robot` the session's id, the observation's `seq`, `policy`, `safe`, `verdicts`, `infer_us`,
    `queue_us`, `decide_us`; one float32 `action` of the manifest's shape."""
    r = main.robot("s7-3-act", hello=True)
    seq = r.send("obs", {"state": X})
    act = r.recv()
    assert act.kind == "act" and act.seq == seq and act.robot == "s7-3-act"
    m = act.meta
    assert m["policy"] == main.served.policy and m["safe"] is False and m["verdicts"] == []
    for key in ("infer_us", "queue_us", "decide_us"):
        assert isinstance(m[key], float) and m[key] >= 0, key
    assert "scores" not in m and "plan" not in m  # not a scored policy
    assert not {"replanned", "adopted", "plan_age", "delay"} & set(m)  # only under asynchronous execution (§7.3.1)
    assert act.arrays["action"].dtype == np.float32 and act.arrays["action"].shape == (1,)
    assert_lqr_action(act.arrays["action"], main.K, X)


def test_s7_3_when_the_policy_fails_the_act_is_safe_without_timings(dual):
    """`safe` is true when "the policy failed on this observation (verdict policy)"; infer_us, queue_us and decide_us
    are absent then."""
    r = dual.robot("s7-3-fails", hello=True, spec=DUAL_SPEC)
    reply = r.ask("obs", dual_obs([500.0, 1.0], [True]))
    assert reply.kind == "act" and reply.meta["safe"] is True
    np.testing.assert_array_equal(reply.arrays["action"], np.zeros(2, np.float32))
    assert reply.meta["verdicts"][0][:2] == ["policy", "stop"]
    assert not {"infer_us", "queue_us", "decide_us"} & set(reply.meta)
    assert r.ask("obs", dual_obs([1.0, 1.0], [True])).meta["safe"] is False  # the next is tried afresh


@pytest.mark.parametrize("keys", [{"instruction": 5}, {"seed": -1}, {"seed": 2**63}, {"seed": 1.5}, {"sim": 3},
                                  {"sim": {"task": "x"}}, {"sim": {"env": 1}}], ids=str)
def test_s7_4_reset_keys_are_checked(main, keys):
    """"A non-string instruction, a bad seed or a sim that is not a map with a string env gets bad_header"."""
    r = main.robot(f"s7-4-keys-{sorted(keys.items())}", hello=True)
    assert code(r.ask("reset", **keys)) == "bad_header"
    assert r.ask("reset", seed=3, sim={"env": "pitch"}, task="t", episode=99).meta["episode"] == 1


def test_s7_4_reset_answers_the_runtimes_episode_count(main):
    """The reply's `episode` is "the number of resets the runtime has handled for this session ..., not the value
    the robot sent"; "Needs a session (no_session otherwise)"."""
    r = main.robot("s7-4-count", hello=True)
    assert [r.ask("reset", episode=41).meta["episode"] for _ in range(3)] == [1, 2, 3]
    assert code(main.robot("s7-4-none").ask("reset")) == "no_session"


def test_s7_5_heartbeat_reply_robot_id(main):
    """"The reply's robot is the session's robot id; a connection without a session gets \"\"", whatever id it sent
    (so it learns nothing about which robots are connected)."""
    owner = main.robot("s7-5-owner", hello=True)
    assert owner.ask("heartbeat", robot="someone").robot == "s7-5-owner"
    stranger = main.robot()
    for sent in ("s7-5-nobody", "s7-5-owner", ""):
        reply = stranger.ask("heartbeat", robot=sent)
        assert reply.kind == "heartbeat" and reply.robot == ""


def test_s7_6_a_robots_error_report_gets_no_reply(main):
    """A robot's own error "needs a session (no_session otherwise), gets no reply": the runtime handles a
    connection's messages in order, so the next reply this robot receives answers its heartbeat."""
    r = main.robot("s7-6-report", hello=True)
    r.send("error", code="motor_hot", message="joint 3 at 80 C")
    seq = r.send("heartbeat")
    reply = r.recv()
    assert (reply.kind, reply.seq) == ("heartbeat", seq)
    assert code(main.robot("s7-6-stranger").ask("error", code="x", message="y")) == "no_session"


def test_s7_6_a_robots_report_becomes_a_warn_alert_truncated_to_500_characters(main):
    """A robot's report "becomes a warn alert from monitor robot (robot reported <code>: <message>, truncated to 500
    characters)"."""
    since = main.mark()
    r = main.robot("s7-6-long", hello=True)
    r.send("error", code="log_full", message="x" * 1000)
    alert = main.find(lambda t, m: m.kind == "alert" and m.robot == "s7-6-long", since)
    assert (alert.meta["monitor"], alert.meta["severity"]) == ("robot", "warn")
    reason = alert.meta["reason"]
    assert reason.startswith("robot reported log_full: xxx") and len(reason) == 500


def test_s7_7_bye_reply_robot_id_and_a_fresh_session_after(main):
    """bye "ends the session of its connection ... answers kind: bye with the same seq (also when there was no
    session, and then ends nothing)", with the robot id rule of heartbeat; "A later hello starts a fresh session"."""
    owner = main.robot("s7-7-owner", hello=True)
    assert owner.ask("reset").meta["episode"] == 1
    stranger = main.robot()
    reply = stranger.ask("bye", robot="s7-7-owner")
    assert reply.kind == "bye" and reply.robot == ""  # another connection's robot: not echoed, and not ended
    assert owner.act().kind == "act"
    assert stranger.ask("bye", robot="s7-7-nobody").robot == ""
    reply = owner.ask("bye", robot="whatever")
    assert reply.kind == "bye" and reply.robot == "s7-7-owner"
    assert code(owner.act()) == "no_session"
    owner.hello()
    assert owner.ask("reset").meta["episode"] == 1  # fresh: the episode count starts again


# == §8 Error codes ==================================================================================================


def test_s8_an_error_carries_the_sessions_robot_id_or_nothing(main):
    """An error's robot "is the session's robot id if this connection has one, else \"\", never the id the rejected
    message carried"."""
    main.robot("s8-known", hello=True)
    mine = main.robot("s8-mine", hello=True)
    assert mine.act(np.zeros(4, np.float32)).robot == "s8-mine"
    stranger = main.robot()
    for robot in ("s8-known", "s8-unknown"):
        reply = stranger.ask("obs", {"state": X}, robot=robot)
        assert code(reply) == "no_session" and reply.robot == ""


def test_s8_a_rejection_bumps_the_robots_errors_and_counts_as_traffic(main):
    """"if the connection has a session, it bumps the robot's errors, counts as link traffic and raises a
    (deduplicated) warn alert from monitor protocol"."""
    since = main.mark()
    r = main.robot("s8-counted", hello=True)
    for _ in range(3):
        assert code(r.act(np.zeros(2, np.float32))) == "bad_shape"
    robots = main.periodic(lambda m: m.meta["robots"].get("s8-counted", {}).get("errors") == 3).meta["robots"]
    assert robots["s8-counted"].get("ticks", 0) == 0
    alert = main.find(lambda t, m: m.kind == "alert" and m.robot == "s8-counted", since)
    assert (alert.meta["monitor"], alert.meta["severity"]) == ("protocol", "warn")


# == §9 Timing =======================================================================================================


def test_s9_2_realtime_discards_a_waiting_observation_across_reads(realtime):
    """"when an obs is read while an earlier obs from the same connection is still waiting in its queue, the earlier
    one is discarded without any reply (stale_dropped) ... Other kinds are never discarded"."""
    before = realtime.periodic().meta["counters"].get("stale_dropped", 0)
    r = realtime.robot("s9-2-stale", hello=True, pipeline=256)
    with realtime.frozen():
        beats = [r.send("heartbeat") for _ in range(2)]
        stale = r.send("obs", {"state": X})
        beats += [r.send("heartbeat") for _ in range(3)]  # within one read (at least 8 messages)
        fresh = r.send("obs", {"state": -X})
    replies = [r.recv() for _ in range(6)]
    assert r.silent(0.3)
    assert [m.seq for m in replies if m.kind == "heartbeat"] == beats
    [act] = [m for m in replies if m.kind == "act"]
    assert act.seq == fresh and stale not in [m.seq for m in replies]
    assert_lqr_action(act.arrays["action"], realtime.K, -X)
    realtime.periodic(lambda m: m.meta["counters"].get("stale_dropped", 0) == before + 1)


def old_obs(r: Robot, age_s: float, x: np.ndarray = X) -> Message:
    return r.reply_to(r.send("obs", {"state": x}, t_ns=time.time_ns() - int(age_s * 1e9)))


def test_s9_3_the_deadline_counts_from_arrival(main):
    """"It is measured ... from the observation's arrival (as dated, §9.4) to the moment the action is decided:
    queueing is included": an observation sent 8 s ago misses this runtime's 5 s deadline."""
    r = main.robot("s9-3-late", hello=True)
    reply = old_obs(r, 8.0)
    assert reply.kind == "act" and reply.meta["safe"] is True
    assert [v[:2] for v in reply.meta["verdicts"]] == [["deadline", "stop"]]
    assert reply.meta["queue_us"] >= 7.9e6
    np.testing.assert_array_equal(reply.arrays["action"], np.zeros(1, np.float32))


@pytest.mark.parametrize("t_ns", [0, "future", "11 s old"])
def test_s9_4_t_ns_that_is_absent_in_the_future_or_10_s_old_is_not_used(main, t_ns):
    """"A t_ns that is 0 (absent), in the runtime's future, or 10 s or more in its past is not used": the arrival is
    then the moment the runtime read the message."""
    r = main.robot("s9-4-unused", hello=True)
    stamp = {0: 0, "future": time.time_ns() + 3 * 10**9, "11 s old": time.time_ns() - 11 * 10**9}[t_ns]
    reply = r.reply_to(r.send("obs", {"state": X}, t_ns=stamp))
    assert reply.meta["safe"] is False and reply.meta["queue_us"] < 5e6


def test_s9_4_a_robot_that_says_its_clock_is_not_synced_is_dated_on_receipt(main):
    """"if the robot's clock is comparable with the runtime's (clock_synced ...) ... the message arrived at t_ns;
    otherwise ... at the moment the runtime began reading the batch it came in"."""
    r = main.robot("s9-4-unsynced", hello=True, clock_synced=False)
    reply = old_obs(r, 8.0)
    assert reply.meta["safe"] is False and reply.meta["queue_us"] < 5e6


def test_s9_4_messages_read_before_the_hello_is_handled_use_the_default(realtime):
    """"Messages read before the connection's hello was handled (in the same batch) are dated with the runtime's
    default for clock_synced" (false on this runtime's non-local endpoint), afterwards with the declared one."""
    r = realtime.robot("s9-4-early")
    with realtime.frozen():
        r.send("hello", spec=SPEC, clock_synced=True)
        early = r.send("obs", {"state": X}, t_ns=time.time_ns() - 8 * 10**9)
    assert r.recv().meta["clock_synced"] is True
    reply = r.reply_to(early)
    assert reply.meta["safe"] is False and reply.meta["queue_us"] < 5e6  # dated when read
    late = old_obs(r, 8.0)
    assert late.meta["safe"] is True and late.meta["queue_us"] >= 7.9e6  # dated from its t_ns


def test_s9_4_queueing_before_the_runtime_reads_counts_for_a_synced_clock(main):
    """With clocks synced, the time an observation waited before the runtime read it is in queue_us."""
    r = main.robot("s9-4-waited", hello=True)
    with main.frozen():
        seq = r.send("obs", {"state": X})
        time.sleep(0.5)
    reply = r.reply_to(seq)
    assert reply.kind == "act" and reply.meta["queue_us"] >= 0.5e6


def test_s9_4_queue_time_per_robot_in_telemetry(main):
    """"The operator stream shows the same per robot (queue_p50_us, queue_p99_us in telemetry, §12)"."""
    r = main.robot("s9-4-telemetry", hello=True)
    since = main.mark()
    assert old_obs(r, 6.0).meta["safe"] is True
    robots = main.periodic(lambda m: m.meta["robots"].get("s9-4-telemetry", {}).get("queue_p99_us", 0) >= 5.9e6,
                           since).meta["robots"]
    mine = robots["s9-4-telemetry"]
    assert mine["queue_p50_us"] >= 5.9e6 and mine["p99_us"] >= mine["queue_p99_us"]


def test_s12_trace_on_first_decision_and_on_verdict_change(main):
    """"trace: published on a robot's first decision, on every new plan, and when a monitor's level changes"
    with the plan's scores, every monitor's level and whether the safe action went out."""
    r = main.robot("s12-trace", hello=True)
    since = main.mark()
    assert r.reply_to(r.send("obs", {"state": X})).kind == "act"
    first = main.find(lambda t, m: t == "trace" and m.robot == "s12-trace", since)
    assert first.kind == "trace" and first.meta["episode"] == 0 and first.meta["safe"] is False
    assert first.meta["scores"] == {} and first.meta["thresholds"] == {}  # an LQR gain scores no plans
    assert set(first.meta["levels"]) >= {"observation", "action", "deadline"}
    assert set(first.meta["levels"].values()) == {"ok"}
    since = main.mark()
    reply = r.reply_to(r.send("obs", {"state": np.full_like(X, 1e9)}))  # the gain saturates the action
    changed = main.find(lambda t, m: t == "trace" and m.robot == "s12-trace", since)
    assert changed.meta["levels"] != first.meta["levels"]
    assert {v[0] for v in reply.meta["verdicts"]} == {k for k, v in changed.meta["levels"].items() if v != "ok"}
    assert changed.meta["safe"] is reply.meta["safe"]


# == §10 Heartbeats, link loss and session expiry ====================================================================


def test_s10_link_loss_act(timers):
    """The link-loss act: `robot` the robot id, the safe action, safe, a link stop verdict, seq of the last
    observation acted on, "no infer_us, queue_us or decide_us", and the whole envelope."""
    r = timers.robot("s10-silent", hello=True)
    acted = r.act()
    assert acted.kind == "act" and acted.meta["safe"] is False
    raw = r.recv_raw()  # sent once the link timeout passed: the link verdict below says why (no timing asserted)
    assert raw is not None
    header = msgpack.unpackb(raw[0], raw=False)
    assert ENVELOPE <= set(header) and header["kind"] == "act" and header["robot"] == "s10-silent"
    assert header["seq"] == acted.seq and header["safe"] is True
    assert [v[:2] for v in header["verdicts"]] == [["link", "stop"]]
    assert not {"infer_us", "queue_us", "decide_us"} & set(header)
    assert np.frombuffer(raw[1], "<f4").tolist() == [0.0]


@pytest.mark.parametrize("traffic", ["heartbeat", "rejected message", "robot error report", "hello, new connection"])
def test_s10_link_restored_whenever_traffic_resumes(timers, traffic):
    """"Whenever traffic resumes from a robot whose link had been declared lost -- any message that counts as traffic
    on the session's connection, or a hello with its robot id on a new connection -- the outage ends: the runtime
    publishes a link_restored telemetry event with outage_s"."""
    robot = "s10-back-" + traffic.split()[0]
    r = timers.robot(robot, hello=True)
    since = timers.mark()
    assert is_link_loss(r.recv())  # silence: declared lost
    if traffic == "heartbeat":
        r.send("heartbeat")
    elif traffic == "rejected message":
        r.send("obs", {"state": np.zeros(5, np.float32)})
    elif traffic == "robot error report":
        r.send("error", code="x", message="y")
    else:
        timers.robot(robot, hello=True)
    event = timers.event(robot, "link_restored", since)
    assert isinstance(event.meta["values"]["outage_s"], float)  # reported (how long it lasted is a timing)


def test_s10_1_a_silent_session_expires(timers):
    """"A session that sees no traffic for longer than session_expiry_s ... expires: the runtime forgets the robot
    ..., publishes a telemetry event expired with the session's counters (counter sessions_expired) ... The
    robot's next obs, reset or error then gets no_session, and a heartbeat or bye is answered as from a connection
    without a session. The driver says hello again, which starts a fresh session (a new connected event)"."""
    r = timers.robot("s10-1-expiring", hello=True)
    assert r.hello_reply.meta["session_expiry_s"] == 1.5
    assert r.ask("reset").meta["episode"] == 1
    assert r.act().kind == "act"
    since = timers.mark()
    expired = timers.event("s10-1-expiring", "expired", since)
    assert expired.meta["values"]["ticks"] == 1 and expired.meta["values"]["link_lost"] == 1
    assert not [m for t, m in timers.sub.seen[since:] if m.kind == "alert" and m.robot == "s10-1-expiring"
                and m.meta["monitor"] != "link"]  # no alert for the expiry itself
    assert code(r.act()) == "no_session"
    assert code(r.ask("reset")) == "no_session"
    assert code(r.ask("error", code="x", message="y")) == "no_session"
    assert r.ask("heartbeat").robot == ""  # answered as from a connection without a session
    since = timers.mark()
    r.hello()
    timers.event("s10-1-expiring", "connected", since)
    assert r.ask("reset").meta["episode"] == 1
    timers.periodic(lambda m: m.meta["counters"].get("sessions_expired", 0) >= 1)


# == §11 The driver author's kit =====================================================================================


@pytest.fixture(scope="module")
def kit():
    """examples/robot_driver.py, imported from its file (it is no package)."""
    spec = importlib.util.spec_from_file_location("robot_driver", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def pitch_driver(kit, live: Live, robot: str, **kw: Any):
    return kit.Driver(live.endpoint, robot, observation=[("state", "float32", [3])],
                      action=("action", "float32", [1]), **kw)


def test_s11_the_kit_imports_only_pyzmq_msgpack_numpy():
    """The driver author's kit is "written against this document only (pyzmq, msgpack, numpy; no vigil import)"."""
    tree = ast.parse(EXAMPLE.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "argparse", "json", "time", "dataclasses", "msgpack", "numpy", "zmq"}, imported


def test_s11_the_kit_drives_an_episode_with_the_policys_actions(kit, main):
    """The kit's hello (spec, pipeline), reset and obs -> act with seq matching: every action is -K x."""
    driver = pitch_driver(kit, main, "s11-kit", pipeline=2)
    try:
        hello = driver.hello()
        assert hello["pipeline"] == 2 and driver.safe_action.tolist() == [0.0]
        records = kit.simulate(driver, 30, wait_s=REPLY_S)
    finally:
        driver.bye()
    assert [r["fallback"] for r in records] == [None] * 30
    for r in records:
        assert_lqr_action(np.asarray(r["u"], np.float32), main.K, np.asarray(r["x"], np.float32))
    assert abs(records[-1]["x"][2]) < abs(records[0]["x"][2])  # the pitch angle is being regulated


def test_s11_the_kits_main_runs_against_a_runtime(main):
    """`python examples/robot_driver.py --endpoint ... --steps N` drives the runtime and prints a JSON summary."""
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--endpoint", main.endpoint, "--robot", "s11-main",
                           "--steps", "25", "--wait-ms", str(REPLY_S * 1000)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (summary["steps"], summary["runtime_actions"], summary["fallbacks"]) == (25, 25, {})
    assert summary["policy"] == main.served.policy


def test_s11_the_kit_applies_the_safe_action_at_its_deadline_and_never_a_late_act(kit, main):
    """"Apply the safe action from the manifest whenever there is no usable action for the current period", and
    discard an act that later arrives for an older seq (§9.2)."""
    driver = pitch_driver(kit, main, "s11-deadline")
    try:
        driver.hello()
        with main.frozen():
            late = driver.step({"state": X}, 0.2)
        assert (late.fallback, late.safe, late.action.tolist()) == ("timeout", True, [0.0])
        step = driver.step({"state": -X}, REPLY_S)  # the late act for `late.seq` arrives first: not applied
        assert step.fallback is None and step.seq == late.seq + 1
        assert_lqr_action(step.action, main.K, -X)
        assert driver.counts["late"] == 1
    finally:
        driver.bye()


def test_s11_the_kit_resumes_on_no_session(kit, main):
    """"On error no_session ...: apply the safe action and send hello again (and the episode's reset)"."""
    driver = pitch_driver(kit, main, "s11-resume")
    try:
        driver.hello()
        assert driver.reset(task="pitch") == 1
        main.robot("s11-resume", hello=True)  # another connection takes the session: ours has none now
        step = driver.step({"state": X}, REPLY_S)
        assert (step.fallback, step.action.tolist()) == ("no_session", [0.0])
        assert driver.counts["resumed"] == 1
        step = driver.step({"state": X}, REPLY_S)
        assert step.fallback is None
        assert_lqr_action(step.action, main.K, X)
        assert driver.reset() == 3  # the resume repeated the episode's reset: same session, third reset
    finally:
        driver.bye()


def test_s11_the_kits_heartbeats_keep_an_idle_link(kit, timers):
    """"Send a heartbeat whenever nothing else has been sent for heartbeat_s": idle for three link timeouts, no link
    loss."""
    driver = pitch_driver(kit, timers, "s11-idle")
    try:
        driver.hello()
        assert driver.step({"state": X}, REPLY_S).fallback is None
        driver.idle(1.2)
        assert driver.counts["heartbeats"] >= 5 and driver.counts["link_lost"] == 0
        assert driver.step({"state": X}, REPLY_S).fallback is None
    finally:
        driver.bye()


# == §13 Worked example ==============================================================================================


def doc_blocks() -> list[list[bytes]]:
    """The hex dumps of §13, as frames: one list per fenced block."""
    text = DOC.read_text()
    section = text[text.index("## 13."):text.index("## 14.")]
    blocks = []
    for block in re.findall(r"```\n(.*?)```", section, re.S):
        parts: list[bytearray] = []
        for line in block.splitlines():
            if line.startswith("frame"):
                parts.append(bytearray())
            elif re.match(r"^[0-9a-f]{4}  ", line):
                if not parts:
                    parts.append(bytearray())
                parts[-1] += bytes.fromhex(line[6:])
        blocks.append([bytes(p) for p in parts])
    return blocks


def test_s13_the_worked_example_is_what_the_runtime_exchanges(main):
    """§13: the hello and obs bytes are what the encoder produces; a runtime answers them with a hello reply of the
    documented keys and an act whose header has the documented bytes but for the measured values."""
    hello, obs, act = doc_blocks()
    spec = {"observation": [STATE], "action": ACTION}
    assert hello == [bytes(encode(Message("hello", "arm-1", 1, 1700000000000000000, {}, {"spec": spec}))[0])]
    assert obs == [bytes(f) for f in encode(Message("obs", "arm-1", 2, 1700000000010000000,
                                                    {"state": np.array([0.035, 0.0, 0.087], np.float32)}))]
    r = main.robot("arm-1")
    r.send_raw(hello)
    reply = r.recv()
    assert reply.kind == "hello" and set(reply.meta) == HELLO_REPLY_KEYS
    r.send_raw(obs)
    raw = r.recv_raw()
    live, documented = msgpack.unpackb(raw[0], raw=False), msgpack.unpackb(act[0], raw=False)
    assert list(live) == list(documented)  # the same keys in the same order
    for key in ("t_ns", "infer_us", "queue_us", "decide_us", "policy"):  # measured (and the bundle's hash)
        live[key] = documented[key]
    assert pack(live) == act[0]
    x = np.array([0.035, 0.0, 0.087], np.float32)
    assert_lqr_action(np.frombuffer(act[1], "<f4"), main.K, x)
    assert_lqr_action(np.frombuffer(raw[1], "<f4"), main.K, x)
    r.send_raw(frames("obs", "arm-1", 3, {"state": np.zeros(4, np.float32)}))
    error = r.recv()
    assert error.meta == {"code": "bad_shape", "message": "array 'state' must have shape [3], got [4]"}


def test_the_module_stays_out_of_the_runtimes_way(main, timers):
    """Not a statement of the document: after everything above, the shared runtimes are up and never answered
    `internal`."""
    for live in (main, timers):
        assert live.served.alive(), live.served.log()
        assert live.periodic().meta["counters"].get("error.internal", 0) == 0

