"""Wire protocol: pure encode/decode tests, then a table of malformed messages sent raw to a live runtime
process while a well-behaved robot keeps getting correct actions."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from conftest import assert_lqr_action, gain_of, pitch_specs, recv_raw_reply, start_serve
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vigil.runtime.client import LinkError, RobotLink
from vigil.wire.protocol import (
    DEFAULT_LIMITS,
    DTYPES,
    ENVELOPE,
    ROBOT_KINDS,
    STREAM_KINDS,
    VERSION,
    ArraySpec,
    Limits,
    Message,
    ProtocolError,
    check_arrays,
    decode,
    encode,
    error,
)

# -- building raw frames ----------------------------------------------------------------------------------

STATE = {"name": "state", "dtype": "float32", "shape": [3]}
GOOD_STATE = np.array([0.01, -0.002, 0.03], np.float32)


def head(**fields: Any) -> bytes:
    """A msgpack header: a valid obs envelope for the pitch bundle, with `fields` replacing or (None) removing keys."""
    h: dict[str, Any] = {"v": VERSION, "kind": "obs", "robot": "bad-bot", "seq": 77, "t_ns": 1, "arrays": [STATE]}
    for k, v in fields.items():
        if v is None:
            h.pop(k, None)
        else:
            h[k] = v
    return msgpack.packb(h, use_bin_type=True)


def obs(x: Any = GOOD_STATE, dtype: str = "float32", shape: list | None = None, **fields: Any) -> list[bytes]:
    """An obs message: header declaring one array `state` and its buffer."""
    a = np.asarray(x, dtype=np.dtype(dtype).newbyteorder("<"))
    desc = {"name": "state", "dtype": dtype, "shape": list(a.shape) if shape is None else shape}
    return [head(arrays=[desc], **fields), a.tobytes()]


def hello(spec: Any, **fields: Any) -> list[bytes]:
    meta = {"spec": spec} if spec is not None else {}
    return [head(kind="hello", arrays=[], robot=fields.pop("robot", "hello-bot"), **meta, **fields)]


GOOD_SPEC = {"observation": [{"name": "state", "dtype": "float32", "shape": [3]}],
             "action": {"name": "action", "dtype": "float32", "shape": [1]}}


@dataclass(frozen=True)
class Case:
    """A malformed message, the code the runtime must answer with, and the seq the error reply must echo (None:
    the header cannot be read, anything goes). `level` says where it is caught: "decode" (protocol.decode),
    "spec" (protocol.check_arrays against the bundle's observation spec) or "loop" (the runtime's handlers);
    the first two are also tested without a runtime."""

    frames: Callable[[], list[bytes]]
    code: str
    seq: int | None = 77
    level: str = "decode"
    fresh_link: bool = False  # send from a link that never said hello (otherwise: from a robot with a session)


BIG = 9 * 1024 * 1024  # one array over max_array_bytes (8 MiB) but far under libzmq's cap
CASES: dict[str, Case] = {
    # envelope
    "wrong_version": Case(lambda: obs(v=2), "bad_version"),
    "version_missing": Case(lambda: obs(v=None), "bad_version"),
    "version_string": Case(lambda: obs(v="1"), "bad_version"),
    "version_float": Case(lambda: obs(v=1.0), "bad_version"),
    "unknown_kind": Case(lambda: obs(kind="teleport"), "bad_kind"),
    "kind_missing": Case(lambda: obs(kind=None), "bad_kind"),
    "kind_not_string": Case(lambda: obs(kind=["obs"]), "bad_kind"),
    "kind_is_map": Case(lambda: obs(kind={"obs": 1}), "bad_kind"),
    "stream_kind_from_robot": Case(lambda: obs(kind="alert"), "bad_kind"),
    "act_from_robot": Case(lambda: [head(kind="act", arrays=[{"name": "action", "dtype": "float32", "shape": [1]}]),
                                    np.zeros(1, np.float32).tobytes()], "bad_kind", level="loop"),
    "robot_not_string": Case(lambda: obs(robot=5), "bad_header"),
    "robot_too_long": Case(lambda: obs(robot="r" * 65), "bad_header"),
    "array_name_too_long": Case(lambda: [head(arrays=[{**STATE, "name": "s" * 65}]), GOOD_STATE.tobytes()],
                                "bad_header"),
    "seq_negative": Case(lambda: obs(seq=-1), "bad_header", seq=None),
    "seq_float": Case(lambda: obs(seq=1.5), "bad_header", seq=None),
    "seq_too_big": Case(lambda: obs(seq=2**64 - 1), "bad_header", seq=None),
    "seq_bool": Case(lambda: obs(seq=True), "bad_header", seq=0),  # the reply's seq must itself be valid
    "t_ns_string": Case(lambda: obs(t_ns="now"), "bad_header"),
    "arrays_not_list": Case(lambda: [head(arrays={"state": 1})], "bad_header"),
    "array_desc_not_map": Case(lambda: [head(arrays=["state"]), GOOD_STATE.tobytes()], "bad_header"),
    "array_name_empty": Case(lambda: [head(arrays=[{**STATE, "name": ""}]), GOOD_STATE.tobytes()], "bad_header"),
    "array_name_twice": Case(lambda: [head(arrays=[STATE, STATE]), GOOD_STATE.tobytes(), GOOD_STATE.tobytes()],
                             "bad_header"),
    "bin_in_header": Case(lambda: [head(blob=b"\x00\x01"), GOOD_STATE.tobytes()], "bad_header", seq=None),
    # dtypes
    "dtype_not_whitelisted": Case(lambda: [head(arrays=[{**STATE, "dtype": "complex64"}]), bytes(24)], "bad_dtype"),
    "dtype_float16": Case(lambda: [head(arrays=[{**STATE, "dtype": "float16"}]), bytes(6)], "bad_dtype"),
    "dtype_object": Case(lambda: [head(arrays=[{**STATE, "dtype": "object"}]), bytes(24)], "bad_dtype"),
    "dtype_not_string": Case(lambda: [head(arrays=[{**STATE, "dtype": ["float32"]}]), bytes(12)], "bad_dtype"),
    "dtype_differs_from_spec": Case(lambda: obs(GOOD_STATE, dtype="float64"), "bad_dtype", level="spec"),
    "int_dtype_for_float_spec": Case(lambda: obs([1, 2, 3], dtype="int32"), "bad_dtype", level="spec"),
    # shapes
    "shape_mismatch": Case(lambda: obs(np.zeros(4)), "bad_shape", level="spec"),
    "shape_2d": Case(lambda: obs(np.zeros((1, 3))), "bad_shape", level="spec"),
    "scalar_state": Case(lambda: obs(np.float32(1.0)), "bad_shape", level="spec"),
    "missing_array": Case(lambda: [head(arrays=[{**STATE, "name": "pos"}]), GOOD_STATE.tobytes()], "bad_shape",
                          level="spec"),
    "extra_array": Case(lambda: [head(arrays=[STATE, {**STATE, "name": "extra"}]), GOOD_STATE.tobytes(),
                                 GOOD_STATE.tobytes()], "bad_shape", level="spec"),
    "no_arrays": Case(lambda: [head(arrays=[])], "bad_shape", level="spec"),
    "shape_negative": Case(lambda: [head(arrays=[{**STATE, "shape": [-3]}]), bytes(12)], "bad_shape"),
    "shape_too_many_dims": Case(lambda: [head(arrays=[{**STATE, "shape": [1, 1, 1, 1, 3]}]), bytes(12)], "bad_shape"),
    "shape_not_list": Case(lambda: [head(arrays=[{**STATE, "shape": 3}]), bytes(12)], "bad_shape"),
    "shape_bool_dim": Case(lambda: [head(arrays=[{**STATE, "shape": [True, 3]}]), bytes(12)], "bad_shape"),
    # sizes
    "oversized_header": Case(lambda: obs(padding="x" * (DEFAULT_LIMITS.max_header_bytes + 1)), "too_large"),
    "oversized_array": Case(lambda: obs(np.zeros(BIG // 4, np.float32)), "too_large"),
    "oversized_declared_shape": Case(lambda: [head(arrays=[{**STATE, "shape": [3_000_000]}]), bytes(12)], "too_large"),
    # a declared shape whose element count overflows int64 must not wrap around to a small size
    "shape_product_overflows": Case(lambda: [head(arrays=[{**STATE, "shape": [65536] * 4}]), b""], "too_large"),
    "too_many_arrays": Case(lambda: [head(arrays=[{**STATE, "name": f"a{i}"} for i in range(17)]),
                                     *[GOOD_STATE.tobytes()] * 17], "too_large"),
    "total_too_large": Case(lambda: [head(arrays=[{**STATE, "name": f"a{i}", "shape": [6 * 2**18]} for i in range(3)]),
                                     *[bytes(6 * 2**20)] * 3], "too_large"),
    # values
    "nan": Case(lambda: obs([np.nan, 0.0, 0.0]), "not_finite"),
    "inf": Case(lambda: obs([0.0, np.inf, 0.0]), "not_finite"),
    "neg_inf_float64": Case(lambda: obs([0.0, 0.0, -np.inf], dtype="float64"), "not_finite"),
    # frames
    "missing_buffer_frame": Case(lambda: [head()], "bad_frames"),
    "extra_buffer_frame": Case(lambda: [head(), GOOD_STATE.tobytes(), GOOD_STATE.tobytes()], "bad_frames"),
    "short_buffer": Case(lambda: [head(), GOOD_STATE.tobytes()[:-1]], "bad_frames"),
    "long_buffer": Case(lambda: [head(), GOOD_STATE.tobytes() + b"\x00"], "bad_frames"),
    # not a header at all
    "garbage_bytes": Case(lambda: [b"\xc1\xff\x00garbage\x93"], "bad_header", seq=None),
    "truncated_msgpack": Case(lambda: [head()[:-5], GOOD_STATE.tobytes()], "bad_header", seq=None),
    "header_not_map": Case(lambda: [msgpack.packb([1, "obs", "r", 77]), GOOD_STATE.tobytes()], "bad_header", seq=None),
    "header_is_int": Case(lambda: [msgpack.packb(7)], "bad_header", seq=None),
    "header_int_keys": Case(lambda: [msgpack.packb({1: 1, "v": 1})], "bad_header", seq=None),
    "empty_frame": Case(lambda: [b""], "bad_header", seq=None),
    "header_trailing_bytes": Case(lambda: [head() + b"\x00", GOOD_STATE.tobytes()], "bad_header", seq=None),
    "header_is_json": Case(lambda: [json.dumps({"v": 1, "kind": "obs", "seq": 77}).encode()], "bad_header", seq=None),
    # session
    "obs_before_hello": Case(lambda: obs(), "no_session", level="loop", fresh_link=True),
    "reset_before_hello": Case(lambda: [head(kind="reset", arrays=[])], "no_session", level="loop",
                               fresh_link=True),
    "hello_without_robot": Case(lambda: hello(GOOD_SPEC, robot=""), "bad_header", level="loop",
                                fresh_link=True),
    "hello_without_spec": Case(lambda: hello(None), "bad_spec", level="loop", fresh_link=True),
    "hello_spec_not_map": Case(lambda: hello([1, 2]), "bad_spec", level="loop", fresh_link=True),
    "hello_spec_bad_dtype": Case(lambda: hello({**GOOD_SPEC, "observation": [{**STATE, "dtype": "complex64"}]}),
                                 "bad_spec", level="loop", fresh_link=True),
    "hello_spec_unhashable_dtype": Case(lambda: hello({**GOOD_SPEC, "observation": [{**STATE, "dtype": ["x"]}]}),
                                        "bad_spec", level="loop", fresh_link=True),
    "hello_refused_shape": Case(lambda: hello({**GOOD_SPEC, "observation": [{**STATE, "shape": [4]}]}), "refused",
                                level="loop", fresh_link=True),
    "hello_refused_action": Case(lambda: hello({**GOOD_SPEC, "action": {**STATE, "name": "action", "shape": [2]}}),
                                 "refused", level="loop", fresh_link=True),
}

def case_params(level: str | None = None) -> list:
    """The table as pytest params: the cases of one level (unit tests), or all of them (against a runtime)."""
    return [pytest.param(name, case, id=name) for name, case in CASES.items() if level is None or case.level == level]


# -- pure unit tests: no sockets ---------------------------------------------------------------------------


def roundtrip(msg: Message, **kw: Any) -> Message:
    frames = encode(msg)
    # what arrives from libzmq is bytes; make sure memoryview / bytearray frames work too
    return decode([bytes(f) if i % 2 else bytearray(bytes(f)) for i, f in enumerate(frames)], **kw)


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 3), (1, 2, 1, 2)])
def test_roundtrip_every_dtype_and_shape(dtype, shape):
    rng = np.random.default_rng(0)
    a = (rng.normal(size=shape) * 50).astype(dtype)
    got = roundtrip(Message("obs", "r1", 5, 123, {"x": a}))
    assert got.kind == "obs" and got.robot == "r1" and got.seq == 5 and got.t_ns == 123
    assert list(got.arrays) == ["x"]
    assert got.arrays["x"].dtype == np.dtype(dtype) and got.arrays["x"].shape == shape
    np.testing.assert_array_equal(got.arrays["x"], a)


def test_roundtrip_keeps_order_meta_and_converts_layout():
    big_endian = np.arange(6, dtype=">f8").reshape(2, 3)
    fortran = np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4))
    strided = np.arange(20, dtype=np.float32)[::3]
    msg = Message("hello", "robot-7", 9, 0, {"b": big_endian, "f": fortran, "s": strided},
                  {"spec": {"observation": []}, "env": "x", "n": [1, 2.5, None, True]})
    got = roundtrip(msg)
    assert list(got.arrays) == ["b", "f", "s"]
    for name, a in msg.arrays.items():
        np.testing.assert_array_equal(got.arrays[name], a)
        assert got.arrays[name].dtype.byteorder in ("<", "=", "|")
    assert got.arrays["b"].dtype == np.float64
    assert dict(got.meta) == {"spec": {"observation": []}, "env": "x", "n": [1, 2.5, None, True]}
    assert got.t_ns > 0  # encode stamps t_ns when it is 0


def test_roundtrip_stream_kinds_and_error_message():
    for kind in sorted(STREAM_KINDS):
        assert roundtrip(Message(kind, "r", 1), kinds=STREAM_KINDS).kind == kind
    with pytest.raises(ProtocolError) as exc:
        roundtrip(Message("alert", "r", 1))  # not a robot-link kind
    assert exc.value.code == "bad_kind"
    err = roundtrip(error("bad_shape", "state must be [3]", "r", 4, extra=1))
    assert err.kind == "error" and err.seq == 4 and err.robot == "r"
    assert err.meta == {"code": "bad_shape", "message": "state must be [3]", "extra": 1}


def test_decode_accepts_zmq_frames():
    ctx = zmq.Context.instance()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://vigil-test-frames")
        b.connect("inproc://vigil-test-frames")
        x = np.arange(5, dtype=np.float32)
        a.send_multipart(encode(Message("obs", "r", 3, 0, {"state": x})))
        assert b.poll(5000)
        got = decode(b.recv_multipart(copy=False))
        np.testing.assert_array_equal(got.arrays["state"], x)
    finally:
        a.close(0)
        b.close(0)


@pytest.mark.parametrize("bad", [np.zeros(2, np.float16), np.zeros(2, np.complex64), np.array(["a"]),
                                 np.array([{}], dtype=object)], ids=["float16", "complex64", "str", "object"])
def test_encode_refuses_dtypes_off_the_whitelist(bad):
    with pytest.raises(ProtocolError) as exc:
        encode(Message("obs", "r", 1, 0, {"x": bad}))
    assert exc.value.code == "bad_dtype"


@pytest.mark.parametrize("key", sorted(ENVELOPE))
def test_encode_refuses_meta_that_collides_with_the_envelope(key):
    with pytest.raises(ProtocolError) as exc:
        encode(Message("obs", "r", 1, 0, {}, {key: 1}))
    assert exc.value.code == "bad_header"
    assert key in exc.value.message


@pytest.mark.parametrize("name, case", case_params("decode"))
def test_decode_error_codes(name, case):
    with pytest.raises(ProtocolError) as exc:
        decode(case.frames())
    assert exc.value.code == case.code, exc.value.message


@pytest.mark.parametrize("name, case", case_params("spec"))
def test_check_arrays_error_codes(name, case):
    """Messages that decode fine but do not match the bundle's observation spec."""
    msg = decode(case.frames())
    assert msg.kind == "obs"
    with pytest.raises(ProtocolError) as exc:
        check_arrays(msg, pitch_specs()[0])
    assert exc.value.code == case.code, exc.value.message


def test_check_arrays_accepts_the_declared_spec():
    msg = decode(obs())
    check_arrays(msg, pitch_specs()[0])  # no exception
    np.testing.assert_array_equal(msg.arrays["state"], GOOD_STATE)


def test_decode_empty_message_and_custom_limits():
    with pytest.raises(ProtocolError) as exc:
        decode([])
    assert exc.value.code == "bad_frames"
    small = Limits(max_array_bytes=8)
    with pytest.raises(ProtocolError) as exc:
        decode(obs(), limits=small)
    assert exc.value.code == "too_large"
    assert decode(obs()).arrays["state"].shape == (3,)


def test_protocol_error_carries_code_and_message():
    e = ProtocolError("bad_shape", "state must be [3]")
    assert e.code == "bad_shape" and e.message == "state must be [3]" and "bad_shape" in str(e)


def test_array_spec_roundtrip_and_errors():
    spec = ArraySpec("state", "float32", (2, 2), (-1.0, -1, -1, -1), (1, 1, 1, 1))
    assert ArraySpec.from_dict(spec.to_dict()) == spec
    for bad in [[1], {"dtype": "float32", "shape": [1]}, {"name": "x", "dtype": "float16", "shape": [1]},
                {"name": "x", "dtype": "float32", "shape": [-1]}, {"name": "x", "dtype": "float32", "shape": "3"},
                {"name": "x", "dtype": "float32", "shape": [2], "low": [0.0]},
                {"name": "x", "dtype": "float32", "shape": [2], "high": [0.0, "a"]}]:
        with pytest.raises(ProtocolError) as exc:
            ArraySpec.from_dict(bad, "spec.observation[0]")
        assert exc.value.code == "bad_spec"
        assert "spec.observation[0]" in exc.value.message


# Arbitrary headers (any msgpack-able map, with envelope keys drawn from near-valid values) and frames:
# decode must either return a message or raise ProtocolError — nothing else ("Raises only ProtocolError").
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**64 + 1, 2**64 - 1), st.floats(allow_nan=True),
                     st.text(max_size=8), st.binary(max_size=4))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                       max_leaves=12)
_dims = st.one_of(st.integers(-2, 2**31), st.sampled_from([0, 1, 3, 65536, 2**31 - 1]), _scalars)
_desc = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.sampled_from(["state", "a", ""]), _values),
    "dtype": st.one_of(st.sampled_from(sorted(DTYPES) + ["float16", "object"]), _values),
    "shape": st.one_of(st.lists(_dims, max_size=5), _values)})
_header = st.fixed_dictionaries({}, optional={
    "v": st.one_of(st.just(VERSION), _values), "kind": st.one_of(st.sampled_from(sorted(ROBOT_KINDS)), _values),
    "robot": st.one_of(st.just("r"), _values), "seq": st.one_of(st.integers(0, 10), _values),
    "t_ns": st.one_of(st.just(0), _values), "arrays": st.one_of(st.lists(_desc, max_size=3), _values),
    "extra": _values})


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(header=_header, buffers=st.lists(st.binary(max_size=64), max_size=4))
def test_decode_raises_only_protocol_error(header, buffers):
    try:
        frame0 = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return
    try:
        msg = decode([frame0, *buffers])
    except ProtocolError as exc:
        assert isinstance(exc.code, str) and exc.code
        return
    assert msg.kind in ROBOT_KINDS
    for a in msg.arrays.values():
        assert a.nbytes <= DEFAULT_LIMITS.max_array_bytes


# -- against a live runtime process ------------------------------------------------------------------------


class LiveRuntime:
    """One `vigil serve` shared by the table below, a well-behaved robot and a misbehaving one with a session."""

    def __init__(self, served, good: RobotLink, bad: RobotLink, K: np.ndarray):
        self.served, self.good, self.bad, self.K = served, good, bad, K
        self.rng = np.random.default_rng(1)

    def good_act(self) -> None:
        x = self.rng.uniform(-0.5, 0.5, 3).astype(np.float32)
        reply = self.good.act({"state": x}, timeout_s=5.0)
        assert reply.kind == "act", reply.meta
        assert reply.meta["safe"] is False and reply.meta["verdicts"] == []
        assert_lqr_action(reply.arrays["action"], self.K, x)


@pytest.fixture(scope="module")
def live(tmp_path_factory, lqr_bundle):
    served = start_serve(tmp_path_factory.mktemp("live"), lqr_bundle, deadline_ms=5000, telemetry_s=0.05,
                         link_timeout_s=300)  # no unsolicited link-loss act may come between a message and its reply
    obs_spec, act_spec = pitch_specs()
    good, bad = RobotLink(served.robot_endpoint, "good-bot"), RobotLink(served.robot_endpoint, "bad-bot")
    good.hello(obs_spec, act_spec)
    bad.hello(obs_spec, act_spec)
    try:
        yield LiveRuntime(served, good, bad, gain_of(lqr_bundle))
    finally:
        good.close()
        bad.close()
        if served.alive():
            served.stop()


@pytest.mark.parametrize("name, case", case_params())
def test_malformed_message_gets_error_and_loop_keeps_serving(live, name, case, subscriber):
    sub = subscriber(live.served.operator_endpoint)
    # the first periodic telemetry this new subscriber gets was published after the previous case was answered
    _, first = sub.wait_new(lambda topic, msg: topic == "telemetry" and "counters" in msg.meta)
    before = first.meta["counters"].get(f"error.{case.code}", 0)
    live.good_act()
    link = live.bad
    if case.fresh_link:
        link = RobotLink(live.served.robot_endpoint, "fresh")
        link.connect()
    try:
        link.send_raw(case.frames())
        reply = recv_raw_reply(link)
    finally:
        if case.fresh_link:
            link.close()
    assert reply.kind == "error", (reply.kind, reply.meta)
    assert reply.meta["code"] == case.code, reply.meta
    assert isinstance(reply.meta["message"], str) and reply.meta["message"]
    assert reply.robot == ("" if case.fresh_link else "bad-bot")  # the session's robot id, if there is one
    if case.seq is not None:
        assert reply.seq == case.seq  # the robot can match the error to what it sent
    live.good_act()
    # the bad robot's link is still usable after the error
    assert live.bad.heartbeat(timeout_s=5.0).kind == "heartbeat"
    assert live.served.alive(), live.served.log()
    # and the error counter is visible to operators on the telemetry stream: exactly one more of this code
    sub.wait_new(lambda topic, msg: topic == "telemetry" and "counters" in msg.meta
                 and msg.meta["counters"].get(f"error.{case.code}", 0) == before + 1)


def test_error_counters_on_exit(tmp_path, lqr_bundle, links):
    """Every malformed message of the table, in a row, to a fresh runtime: it stays up, and the JSON line of
    counters it prints when stopped by SIGINT counts each error code exactly."""
    served = start_serve(tmp_path, lqr_bundle, deadline_ms=5000, link_timeout_s=300)
    try:
        good = links(served.robot_endpoint, "good-bot")
        bad = links(served.robot_endpoint, "bad-bot")
        fresh = links(served.robot_endpoint, "fresh", hello=False)
        K = gain_of(lqr_bundle)
        expected: Counter = Counter()
        for name, case in CASES.items():
            link = fresh if case.fresh_link else bad
            link.send_raw(case.frames())
            reply = recv_raw_reply(link)
            assert reply.kind == "error" and reply.meta["code"] == case.code, (name, reply.meta)
            expected[case.code] += 1
            x = np.array([0.1, -0.01, 0.2], np.float32)
            assert_lqr_action(good.act({"state": x}, timeout_s=5.0).arrays["action"], K, x)
        assert served.alive(), served.log()
    finally:
        counters = served.stop()
    assert counters["stopped_by"] == "SIGINT"
    assert counters["errors"] == sum(expected.values())
    for code, n in expected.items():
        assert counters[f"error.{code}"] == n, code
    assert counters["ticks"] == sum(expected.values())
    # errors from a robot with a session are also operator alerts (monitor "protocol"), deduplicated per robot
    from vigil.runtime.store import AlertStore

    records = AlertStore(served.store, readonly=True).since(0)
    protocol = [r for r in records if r.monitor == "protocol"]
    assert protocol and all(r.robot == "bad-bot" and r.severity == "warn" for r in protocol)


def test_replies_carry_the_whole_envelope(live):
    """"The runtime always sends all six keys": read the raw header frame of each kind of reply."""
    link = RobotLink(live.served.robot_endpoint, "envelope-bot")
    try:
        link.connect()
        obs_spec, act_spec = pitch_specs()
        spec = {"observation": [s.to_dict() for s in obs_spec], "action": act_spec.to_dict()}
        requests = [Message("hello", "envelope-bot", 1, 0, {}, {"spec": spec}),
                    Message("reset", "envelope-bot", 2), Message("obs", "envelope-bot", 3, 0, {"state": GOOD_STATE}),
                    Message("heartbeat", "envelope-bot", 4),
                    Message("obs", "envelope-bot", 5, 0, {"state": -GOOD_STATE}),
                    Message("bye", "envelope-bot", 6)]
        kinds = []
        for req in requests:
            frames = encode(req)
            if req.seq == 5:
                frames = frames[:1]  # drop the buffer: an error reply
            link.send_raw([bytes(f) for f in frames])
            assert link.sock.poll(5000)
            raw = link.sock.recv_multipart()
            header = msgpack.unpackb(raw[0], raw=False)
            assert ENVELOPE <= set(header), (req.kind, sorted(header))
            assert header["v"] == VERSION and header["seq"] == req.seq and header["t_ns"] > 0
            assert len(raw) == 1 + len(header["arrays"])
            kinds.append(header["kind"])
        assert kinds == ["hello", "reset", "act", "heartbeat", "error", "bye"]
    finally:
        link.close()


def test_unknown_header_keys_are_ignored(live):
    x = np.array([0.3, 0.01, -0.2], np.float32)
    frames = encode(Message("obs", "good-bot", live.good.next_seq(), 0, {"state": x},
                            {"note": "from a newer driver", "extra": {"nested": [1, 2]}}))
    live.good.send_raw([bytes(f) for f in frames])
    reply = recv_raw_reply(live.good)
    assert reply.kind == "act" and reply.meta["safe"] is False
    assert_lqr_action(reply.arrays["action"], live.K, x)


def test_message_over_the_libzmq_cap_drops_only_that_connection(live):
    """Above ZMQ_MAXMSGSIZE (64 MiB) libzmq drops the sender's connection without a reply; the DEALER reconnects
    as a new connection, whose next obs gets no_session until it says hello again. Other robots never notice."""
    obs_spec, act_spec = pitch_specs()
    link = RobotLink(live.served.robot_endpoint, "greedy-bot")
    try:
        link.hello(obs_spec, act_spec)
        live.good_act()
        link.send_raw([head(arrays=[{**STATE, "shape": [17 * 2**20]}]), bytes(68 * 2**20)])
        assert link.recv(1.0) is None  # no reply to that one
        live.good_act()
        reply = wait_for_reply_code(link, "no_session")
        assert reply.kind == "error"
        link.hello(obs_spec, act_spec)
        x = np.array([0.1, 0.0, 0.1], np.float32)
        assert_lqr_action(link.act({"state": x}).arrays["action"], live.K, x)
        live.good_act()
        assert live.served.alive()
    finally:
        link.close()


def wait_for_reply_code(link: RobotLink, code: str, timeout_s: float = 10.0) -> Message:
    """Send a valid obs until the reply is an error with `code` (the DEALER reconnects in the background)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            reply = link.act({"state": GOOD_STATE}, timeout_s=0.5)
        except LinkError:
            continue
        if reply.kind == "error" and reply.meta["code"] == code:
            return reply
    raise AssertionError(f"no {code} reply within {timeout_s} s")
