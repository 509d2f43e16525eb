"""Fuzzing every message handler of a live runtime (issue 8, deliverable 1).

test_protocol.py fuzzes `decode` alone and sends a table of hand-made malformed messages. Here:

* property-based tests (hypothesis) send structurally valid messages of every robot kind, with arbitrary
  robot names, seqs, meta values and arrays of every whitelisted dtype and shape, and byte-level mutations of
  them (bit flips, truncation, frame duplication, removal and swaps, appended garbage), to a real `vigil serve`
  child process over a real DEALER socket, from a robot with a session or without one;
* the control channel gets random and mutated `swap` requests (nonsense bundle paths, junk bundle folders);
* a seeded run of 10^5 random and mutated messages from many robot names on several DEALER sockets, after
  which a well-behaved robot gets exact LQR actions and the exit counters account for every message.

The oracle for each message is computed in the test process: what `decode` (the runtime's own validator)
says about the frames, then what the handler of the decoded kind may answer. Every reply must decode, every
error must carry a non-empty code that is never `internal` (a handler raised something other than
ProtocolError), and the process must stay up. No mocks, no timing assertions.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from conftest import assert_lqr_action, gain_of, pitch_specs, start_serve, tcp_endpoint
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vigil.runtime.client import RobotLink
from vigil.wire.protocol import (
    CONTROL_KINDS,
    DTYPES,
    ENVELOPE,
    ROBOT_KINDS,
    Message,
    ProtocolError,
    check_arrays,
    decode,
    encode,
)

FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
REPLY_TIMEOUT_MS = 20_000  # an upper bound for a reply that must come (never a claim about speed)
SENTINEL = "sentinel-" + "5eb1d0c4" * 6  # 57 characters no strategy below produces
OBS_SPEC = pitch_specs()[0]
GOOD_SPEC = {"observation": [s.to_dict() for s in pitch_specs()[0]], "action": pitch_specs()[1].to_dict()}
SAFE_ACTION = np.zeros(1, np.float32)  # the pitch bundle's safe action
# Which error codes each handler may answer a message that `decode` accepted with (besides its own reply kind).
HANDLER_CODES = {"hello": {"bad_header", "bad_spec", "refused"}, "obs": {"no_session", "bad_shape", "bad_dtype"},
                 "reset": {"no_session", "bad_header"}, "heartbeat": set(), "bye": set(), "act": {"bad_kind"},
                 "error": {"no_session"}}


def runtime_flags() -> dict[str, Any]:
    # No unsolicited safe act (link loss) may come between a message and its reply, no session may expire
    # and no deadline may be missed because the machine is busy: every reply is a reply to something we sent.
    # The deepest pipeline, so that no burst here overflows (overflow is tested in tests/test_conformance.py §5.1):
    # the replies keep the two orders the oracle pairs them in.
    return {"deadline_ms": 60_000, "link_timeout_s": 100_000, "session_expiry_s": 1_000_000, "telemetry_s": 0.5,
            "pipeline": 256}


# -- the oracle ------------------------------------------------------------------------------------------------


@dataclass
class Expect:
    """What the runtime may answer one message with, computed from the frames alone."""

    code: str | None = None  # decode (or check_arrays, for an obs with a session) refuses it with this code
    msg: Message | None = None  # what decode made of it, when it accepted it

    @property
    def maybe_silent(self) -> bool:
        """A robot's own `error` report is answered only when the robot has no session (no_session)."""
        return self.msg is not None and self.msg.kind == "error"


def expect(frames: Sequence[bytes]) -> Expect:
    try:
        return Expect(msg=decode(frames))
    except ProtocolError as exc:
        return Expect(code=exc.code)


def read_reply(raw: list[bytes], kinds: frozenset[str] = ROBOT_KINDS) -> Message:
    """Every reply must be a well-formed message; an error must say why, and never be `internal`."""
    try:
        reply = decode(raw, kinds=kinds)
    except ProtocolError as exc:  # pragma: no cover - a failure message
        raise AssertionError(f"the runtime sent a malformed reply ({exc}): {raw!r:.500}") from None
    if reply.kind == "error":
        code = reply.meta.get("code")
        assert isinstance(code, str) and code, reply.meta
        assert code != "internal", f"a handler raised something other than ProtocolError: {reply.meta}"
        assert isinstance(reply.meta.get("message"), str), reply.meta
    return reply


def check_reply(e: Expect, reply: Message, K: np.ndarray, session: bool | None = None) -> None:
    """`reply` answers the message `e` was computed from. `session`: whether the sender had a session when it
    was handled (None: unknown, as when several sockets race for the same robot names)."""
    if e.msg is None:
        assert reply.kind == "error" and reply.meta["code"] == e.code, (e.code, reply.kind, reply.meta)
        return
    m = e.msg
    assert reply.seq == m.seq, (m.kind, m.seq, reply.kind, reply.seq, reply.meta)  # matchable to what was sent
    if reply.kind == "error":
        code = reply.meta["code"]
        assert code in HANDLER_CODES[m.kind], (m.kind, reply.meta)
        if code == "no_session":
            assert session is not True, (m.kind, reply.meta)
        elif m.kind == "obs":  # the same check as the runtime's, against the bundle's observation spec
            assert session is not False
            try:
                check_arrays(m, OBS_SPEC)
            except ProtocolError as exc:
                assert exc.code == code, (exc.code, reply.meta)
            else:
                raise AssertionError(f"an obs that matches the spec was refused: {reply.meta}")
        elif m.kind == "hello" and m.robot and m.meta.get("spec") == GOOD_SPEC:
            raise AssertionError(f"a hello with the bundle's own spec was refused: {reply.meta}")
        elif m.kind == "hello" and not m.robot:
            assert code == "bad_header", reply.meta
        return
    assert reply.kind == ("act" if m.kind == "obs" else m.kind), (m.kind, reply.kind, reply.meta)
    if m.kind == "obs":
        assert session is not False, "an act for a robot without a session"
        check_arrays(m, OBS_SPEC)  # it was acted on, so it must match the spec
        x = m.arrays["state"]
        action = reply.arrays["action"]
        if reply.meta["safe"]:  # only a stop verdict replaces the policy's action (here: -K x overflowed)
            assert any(v[1] == "stop" for v in reply.meta["verdicts"]), reply.meta
            np.testing.assert_array_equal(action, SAFE_ACTION)
        else:
            assert_lqr_action(action, K, x)
    elif m.kind == "hello":
        assert reply.robot == m.robot and isinstance(reply.meta["policy"], str), reply.meta
    elif m.kind == "reset":
        assert type(reply.meta["episode"]) is int and reply.meta["episode"] >= 1, reply.meta
    elif m.kind in ("heartbeat", "bye"):  # the session's robot id; a connection without one is told none
        assert reply.robot == "" if session is False else True, (m.robot, reply.robot)


def fits(e: Expect, reply: Message, K: np.ndarray, session: bool | None) -> AssertionError | None:
    """None if `reply` is a correct answer to the message of `e`, else why not."""
    try:
        check_reply(e, reply, K, session)
    except AssertionError as exc:
        return exc
    return None


def match_replies(sent: list[Expect], replies: list[Message], K: np.ndarray, session: bool | None = None) -> None:
    """Pair the replies one socket received with the messages it sent, and check each.

    Every message gets one reply, except a robot's own `error` report when it has a session. Replies come in two
    interleaved streams, each in the order its messages were sent: the runtime answers a message that `decode`
    refuses at once, while it reads its batch, and the messages it decoded after reading the batch. (So an error
    for a malformed message can overtake the reply to a valid one sent before it; docs/protocol.md tells robots
    to match replies by seq.) Some replies fit either stream (a mutation that renames the `seq` key makes a
    message with seq 0, the seq of an error for a header that is not msgpack), so this searches for a pairing."""
    refused = [e for e in sent if e.msg is None]
    decoded = [e for e in sent if e.msg is not None]
    verdicts: dict[tuple[int, int], AssertionError | None] = {}
    failed: set[tuple[int, int, int]] = set()
    furthest: list = [-1, []]

    def fit(e: Expect, key: int, i: int) -> bool:
        if (key, i) not in verdicts:
            verdicts[key, i] = fits(e, replies[i], K, session)
        if verdicts[key, i] is not None and i >= furthest[0]:
            if i > furthest[0]:
                furthest[:] = [i, []]
            furthest[1].append(f"{e.code or (e.msg.kind, e.msg.seq)}: {verdicts[key, i]}")
        return verdicts[key, i] is None

    def solve(i: int, a: int, b: int) -> bool:
        if i == len(replies):
            return a == len(refused) and all(e.maybe_silent for e in decoded[b:]) and (
                session is not False or b == len(decoded))
        if (i, a, b) in failed:
            return False
        if b < len(decoded) and fit(decoded[b], b, i) and solve(i + 1, a, b + 1):
            return True
        if a < len(refused) and fit(refused[a], -1 - a, i) and solve(i + 1, a + 1, b):
            return True
        if b < len(decoded) and decoded[b].maybe_silent and session is not False and solve(i, a, b + 1):
            return True  # a robot's error report with a session: no reply
        failed.add((i, a, b))
        return False

    if not solve(0, 0, 0):
        detail = (f"reply {furthest[0]} ({replies[furthest[0]]}) fits no candidate: " + "; ".join(furthest[1])
                  if furthest[0] >= 0 else "")
        raise AssertionError(f"{len(replies)} replies do not answer the {len(sent)} messages sent "
                             f"({len(refused)} malformed). {detail}"[:4000])


# -- sockets ---------------------------------------------------------------------------------------------------


class Dealer:
    """A robot's DEALER socket that sends raw frames and collects replies up to a sentinel heartbeat."""

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None):
        self.sock = (ctx or zmq.Context.instance()).socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.connect(endpoint)
        self.sentinels = 0
        self.sent = 0

    def send(self, frames: Sequence[bytes]) -> None:
        self.sock.send_multipart(frames)
        self.sent += 1

    def sync(self) -> list[Message]:
        """Send a sentinel heartbeat and return every reply that came before its answer."""
        self.sentinels += 1
        seq = 2**62 + self.sentinels
        self.send(encode(Message("heartbeat", SENTINEL, seq)))
        replies = []
        while True:
            assert self.sock.poll(REPLY_TIMEOUT_MS), f"no answer to the sentinel within {REPLY_TIMEOUT_MS} ms"
            reply = read_reply(self.sock.recv_multipart())
            if reply.kind == "heartbeat" and reply.seq == seq:  # (its robot id: the session's, or none)
                return replies
            replies.append(reply)

    def hello(self, robot: str) -> None:
        self.send(encode(Message("hello", robot, 1, 0, {}, {"spec": GOOD_SPEC})))
        replies = self.sync()
        assert [r.kind for r in replies] == ["hello"], [r.meta for r in replies]

    def close(self) -> None:
        self.sock.close(linger=0)


@dataclass
class Live:
    served: Any
    K: np.ndarray
    control: str
    junk: dict[str, Path]


@pytest.fixture(scope="module")
def live(tmp_path_factory, lqr_bundle) -> Iterator[Live]:
    """One runtime (with a control channel) for the property-based tests of this module."""
    work = tmp_path_factory.mktemp("fuzz")
    control = tcp_endpoint()
    served = start_serve(work / "serve", lqr_bundle, control_endpoint=control, **runtime_flags())
    try:
        yield Live(served, gain_of(lqr_bundle), control, junk_bundles(work / "junk", lqr_bundle))
    finally:
        if served.alive():
            counters = served.stop()
            assert counters.get("error.internal", 0) == 0, counters


def junk_bundles(root: Path, lqr_bundle: Path) -> dict[str, Path]:
    """Folders that look more or less like bundles, for the control channel."""
    root.mkdir(parents=True)
    made = {}

    def folder(name: str, manifest: bytes | None, onnx: bytes | None) -> None:
        d = root / name
        d.mkdir()
        if manifest is not None:
            (d / "manifest.json").write_bytes(manifest)
        if onnx is not None:
            (d / "policy.onnx").write_bytes(onnx)
        made[name] = d

    real = (lqr_bundle / "manifest.json").read_bytes()
    folder("empty", None, None)
    folder("not-json", b"\x00\xff{garbage", b"")
    folder("json-list", b"[1, 2, 3]", b"")
    folder("json-empty-map", b"{}", b"")
    folder("manifest-only", real, None)
    folder("bad-sha", real, b"\x08\x07garbage onnx")
    folder("truncated-manifest", real[: len(real) // 2], (lqr_bundle / "policy.onnx").read_bytes())
    d = json.loads(real)
    folder("wrong-kind", json.dumps({**d, "kind": "teleport"}).encode(), (lqr_bundle / "policy.onnx").read_bytes())
    folder("no-observation", json.dumps({**d, "observation": 5}).encode(),
           (lqr_bundle / "policy.onnx").read_bytes())
    (root / "a-file").write_bytes(b"not a folder")
    made["a-file"] = root / "a-file"
    return made


# -- strategies ------------------------------------------------------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
                     st.text(max_size=12))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                       max_leaves=10)
_values_or_bytes = st.one_of(_values, st.binary(max_size=4))  # a bin anywhere in the header is refused
_meta_keys = st.text(max_size=10).filter(lambda k: k not in ENVELOPE)
_names = st.one_of(st.sampled_from(["state", "action", "x"]), st.text(min_size=1, max_size=64))
_robots = st.one_of(st.sampled_from([f"hyp-{i}" for i in range(5)]), st.text(max_size=64))
_seqs = st.integers(0, 2**63 - 1)
_dims = st.one_of(st.integers(0, 4), st.integers(-2, 2**64 - 1), _values)
_shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4)
_array = st.sampled_from(sorted(DTYPES)).flatmap(lambda n: hnp.arrays(DTYPES[n], _shapes))
# The pitch bundle's observation: float32[3], any values (NaN and infinities too: decode refuses those).
_state = hnp.arrays(np.float32, (3,), elements=st.floats(width=32))
_small_state = hnp.arrays(np.float32, (3,), elements=st.floats(-12, 12, width=32))
_arrays = st.dictionaries(_names, _array, max_size=3)
_array_desc = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.sampled_from(["state", "action", ""]), _values),
    "dtype": st.one_of(st.sampled_from(sorted(DTYPES) + ["float16", "object"]), _values),
    "shape": st.one_of(st.lists(_dims, max_size=5), _values),
    "low": st.one_of(st.lists(st.floats(), max_size=4), _values),
    "high": st.one_of(st.lists(st.integers(-5, 5), max_size=4), _values)})
_specs = st.one_of(
    st.just(GOOD_SPEC),
    st.fixed_dictionaries({"observation": st.just(GOOD_SPEC["observation"]), "action": _array_desc}),
    st.fixed_dictionaries({}, optional={"observation": st.one_of(st.lists(_array_desc, max_size=3), _values),
                                        "action": st.one_of(_array_desc, _values)}),
    _values)
KIND_META = {
    "hello": st.fixed_dictionaries({"spec": _specs}, optional={"env": _values, "instruction": _values}),
    "reset": st.fixed_dictionaries({}, optional={
        "instruction": st.one_of(st.text(max_size=20), _values),
        "seed": st.one_of(st.integers(-1, 2**64 - 1), _values),
        "sim": st.one_of(st.fixed_dictionaries({"env": st.one_of(st.text(max_size=8), _values)},
                                               optional={"seed": _values}), _values),
        "task": _values, "episode": _values}),
    "error": st.fixed_dictionaries({}, optional={"code": st.one_of(st.text(max_size=12), _values),
                                                 "message": _values}),
}


@st.composite
def messages(draw) -> list[bytes]:
    """The frames of a structurally valid message (encode's output) of any robot kind."""
    kind = draw(st.sampled_from(sorted(ROBOT_KINDS)))
    if kind == "obs":
        arrays = draw(st.one_of(st.fixed_dictionaries({"state": st.one_of(_small_state, _state)}), _arrays))
    else:
        arrays = draw(st.one_of(st.just({}), _arrays))
    meta = draw(st.dictionaries(_meta_keys, _values, max_size=3))
    meta.update(draw(KIND_META.get(kind, st.just({}))))
    robot, seq = draw(_robots), draw(_seqs)
    # now and then one thing the envelope does not allow (decode refuses the message before any handler)
    broken = draw(st.sampled_from([None] * 8 + ["robot", "seq", "bytes", "name"]))
    if broken == "robot":
        robot = draw(st.text(min_size=65, max_size=70))
    elif broken == "seq":
        seq = draw(st.integers(2**63, 2**64 - 1))
    elif broken == "bytes":
        meta[draw(_meta_keys)] = draw(_values_or_bytes)
    elif broken == "name":
        arrays = {**arrays, draw(st.sampled_from(["", "n" * 65])): np.zeros(1, np.float32)}
    msg = Message(kind, robot, seq, draw(st.integers(0, 2**63 - 1)), arrays, meta)
    return [bytes(f) for f in encode(msg)]


# -- byte-level mutations (shared by hypothesis and the seeded run) --------------------------------------------

MUTATIONS = ("flip", "set", "truncate", "append", "dup", "remove", "frame", "swap")


def mutate(frames: list[bytes], op: str, a: int, b: int, data: bytes) -> list[bytes]:
    """One mutation of a message: `a`, `b` pick frames and positions (modulo), `data` is new bytes."""
    out = [bytearray(f) for f in frames]
    i = a % len(out)
    f = out[i]
    if op == "flip" and f:
        f[b % len(f)] ^= 1 << (a % 8)
    elif op == "set" and f:
        f[b % len(f)] = data[0] if data else 0
    elif op == "truncate":
        del f[b % (len(f) + 1):]
    elif op == "append":
        f += data
    elif op == "dup":
        out.insert(i, bytearray(f))
    elif op == "remove" and len(out) > 1:
        del out[i]
    elif op == "frame":
        out.insert(b % (len(out) + 1), bytearray(data))
    elif op == "swap":
        j = b % len(out)
        out[i], out[j] = out[j], out[i]
    return [bytes(f) for f in out]


_mutation = st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 2**16), st.integers(0, 2**16),
                      st.binary(max_size=16))


# -- property-based tests of every handler ----------------------------------------------------------------------


def exchange(live: Live, frames: list[bytes], session: bool, robot: str) -> None:
    """Send `frames` from a new robot socket (one that said hello as `robot` first, if `session`), and check
    the reply (or the silence) against the oracle; the runtime must still be up."""
    dealer = Dealer(live.served.robot_endpoint)
    try:
        if session:
            dealer.hello(robot)
        dealer.send(frames)
        replies = dealer.sync()
        e = expect(frames)
        event(f"{e.msg.kind if e.msg else 'undecodable'} -> "
              + (", ".join(r.meta["code"] if r.kind == "error" else r.kind for r in replies) or "no reply"))
        match_replies([e], replies, live.K, session)
    finally:
        dealer.close()
    assert live.served.alive(), live.served.log()


@FUZZ
@given(frames=messages(), session=st.booleans(), robot=st.sampled_from([f"hyp-{i}" for i in range(5)]))
def test_every_handler_answers_valid_messages(live, frames, session, robot):
    exchange(live, frames, session, robot)


@FUZZ
@given(frames=messages(), mutations=st.lists(_mutation, min_size=1, max_size=4), session=st.booleans(),
       robot=st.sampled_from([f"hyp-{i}" for i in range(5)]))
def test_every_handler_answers_mutated_messages(live, frames, mutations, session, robot):
    for m in mutations:
        frames = mutate(frames, *m)
    exchange(live, frames, session, robot)


@FUZZ
@given(state=st.one_of(_state, _small_state), kind=st.sampled_from(["obs", "obs", "error"]),
       meta=st.dictionaries(_meta_keys, _values, max_size=3), seq=_seqs,
       robot=st.sampled_from([f"hyp-{i}" for i in range(5)]))
def test_observations_and_error_reports_from_a_robot_with_a_session(live, state, kind, meta, seq, robot):
    """The act path with any float32 state (huge, tiny, subnormal, out of range, NaN): the exact LQR action, or
    the safe action with a stop verdict; a robot's error report gets no reply."""
    arrays = {"state": state} if kind == "obs" else {}
    exchange(live, [bytes(f) for f in encode(Message(kind, robot, seq, 0, arrays, meta))], True, robot)


@FUZZ
@given(frames=st.lists(st.binary(max_size=40), min_size=1, max_size=5), session=st.booleans())
def test_random_frames_get_an_error(live, frames, session):
    exchange(live, frames, session, "hyp-raw")


# -- the control channel ---------------------------------------------------------------------------------------


class Controller:
    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def recv(self) -> Message:
        assert self.sock.poll(REPLY_TIMEOUT_MS), "no answer on the control channel"
        return read_reply(self.sock.recv_multipart(), kinds=CONTROL_KINDS)

    def close(self) -> None:
        self.sock.close(linger=0)


def answers(frames: list[bytes], reply: Message) -> bool:
    try:
        check_control_reply(frames, reply)
        return True
    except AssertionError:
        return False


def check_control_reply(frames: list[bytes], reply: Message, real: str | None = None) -> None:
    """The control channel's answer to `frames`: an error (exactly the code decode or the swap handler gives),
    or a `swap` with ok false for anything that is not a bundle (the real bundle, `real`, may swap)."""
    try:
        msg = decode(frames, kinds=CONTROL_KINDS)
    except ProtocolError as exc:
        assert reply.kind == "error" and reply.meta["code"] == exc.code, (exc.code, reply.kind, reply.meta)
        return
    assert reply.seq == msg.seq
    bundle = msg.meta.get("bundle")
    if msg.kind != "swap":
        assert reply.kind == "error" and reply.meta["code"] == "bad_kind", reply.meta
    elif type(bundle) is not str or not bundle:
        assert reply.kind == "error" and reply.meta["code"] == "bad_header", reply.meta
    else:
        assert reply.kind == "swap" and reply.meta["bundle"] == bundle, (reply.kind, reply.meta)
        if real is not None and os.path.realpath(os.path.join(real, "..", bundle)) == os.path.realpath(real):
            return
        assert reply.meta["ok"] is False, reply.meta
        assert isinstance(reply.meta["reason"], str) and reply.meta["reason"], reply.meta


@st.composite
def swaps(draw, junk: Sequence[str]) -> list[bytes]:
    bundle = draw(st.one_of(st.sampled_from([*junk, "/", ".", "..", "/nonexistent/bundle", "/dev/null",
                                             "/proc/self", "serve.out", "alerts.db", "a\x00b", "x" * 5000]),
                            st.text(max_size=30), _values))
    meta = draw(st.dictionaries(_meta_keys, _values, max_size=2))
    meta.update(draw(st.fixed_dictionaries({}, optional={"bundle": st.just(bundle)})))
    kind = draw(st.sampled_from(["swap", "swap", "swap", "error"]))
    return [bytes(f) for f in encode(Message(kind, draw(st.text(max_size=8)), draw(_seqs), 0, draw(st.one_of(
        st.just({}), _arrays)), meta))]


@settings(FUZZ, max_examples=200)
@given(data=st.data(), mutations=st.lists(_mutation, max_size=3))
def test_control_channel_fuzz(live, data, mutations):
    frames = data.draw(swaps([str(p) for p in live.junk.values()]))
    for m in mutations:
        frames = mutate(frames, *m)
    ctl = Controller(live.control)
    try:
        ctl.sock.send_multipart(frames)
        check_control_reply(frames, ctl.recv())
    finally:
        ctl.close()
    assert live.served.alive(), live.served.log()


def test_control_channel_burst_then_a_real_swap(live, lqr_bundle, tmp_path):
    """Swap requests faster than bundles load: each gets exactly one answer (a refusal while another swap is in
    progress), the runtime stays up, and afterwards a real swap succeeds and robots get the same actions."""
    rng = np.random.default_rng(8)
    junk = [str(p) for p in live.junk.values()]
    ctl = Controller(live.control)
    try:
        sent = []
        for i in range(60):
            frames = encode(Message("swap", "", 1000 + i, 0, {}, {"bundle": junk[i % len(junk)]}))
            frames = [bytes(f) for f in frames]
            if i % 3 == 2:
                frames = mutate(frames, MUTATIONS[int(rng.integers(len(MUTATIONS)))], int(rng.integers(2**16)),
                                int(rng.integers(2**16)), rng.bytes(4))
            ctl.sock.send_multipart(frames)
            sent.append(frames)
        replies = [ctl.recv() for _ in sent]
        busy = 0
        by_seq = {}
        for r in replies:
            by_seq.setdefault(r.seq, []).append(r)
            busy += r.kind == "swap" and "in progress" in r.meta.get("reason", "")
        print(f"\n{busy} of {len(sent)} swap requests were refused because another swap was loading")
        assert not ctl.sock.poll(200)  # and nothing more than one answer per request came
        # pair replies with requests by seq where the request decodes (order differs: loads answer late; a header
        # that is not msgpack gets an error with seq 0, and so does a swap whose 'seq' key a mutation renamed)
        undecodable = Counter()
        for frames in sent:
            try:
                seq = decode(frames, kinds=CONTROL_KINDS).seq
            except ProtocolError as exc:
                undecodable[exc.code] += 1
                continue
            assert any(answers(frames, r) for r in by_seq.get(seq, [])), f"no fitting answer to swap #{seq}"
            by_seq[seq].remove(next(r for r in by_seq[seq] if answers(frames, r)))
        rest = Counter(r.meta.get("code") for rs in by_seq.values() for r in rs)
        assert rest == undecodable, (rest, undecodable)
        copy = tmp_path / "same-lqr"
        shutil.copytree(lqr_bundle, copy)
        ctl.sock.send_multipart(encode(Message("swap", "", 999, 0, {}, {"bundle": str(copy)})))
        answer = ctl.recv()
        assert answer.kind == "swap" and answer.meta["ok"] is True and answer.seq == 999, answer.meta
    finally:
        ctl.close()
    link = RobotLink(live.served.robot_endpoint, "after-swap-fuzz")
    try:
        link.hello(*pitch_specs())
        for x in np.random.default_rng(9).uniform(-0.5, 0.5, (20, 3)).astype(np.float32):
            reply = link.act({"state": x}, timeout_s=REPLY_TIMEOUT_MS / 1000)
            assert reply.kind == "act" and reply.meta["safe"] is False, reply.meta
            assert_lqr_action(reply.arrays["action"], live.K, x)
    finally:
        link.close()
    assert live.served.alive(), live.served.log()


# -- 10^5 random and mutated messages ---------------------------------------------------------------------------

N_MESSAGES = 100_000
BURST = 100
SOCKETS = 6
SEED = 20261124


class Generator:
    """Seeded messages: pure random frames, mutated valid messages, valid messages with wrong arrays, and
    valid messages of every kind from many robot names (some of which said hello)."""

    def __init__(self, seed: int):
        self.rng = rng = np.random.default_rng(seed)
        self.seq = 0
        names = [f"fz-{i}" for i in range(120)]
        for _ in range(80):  # arbitrary unicode names (no surrogates), up to the 64-character limit
            n = int(rng.integers(1, 65))
            cps = rng.integers(1, 0x2FFFF, n)
            names.append("".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF) or "u")
        self.names = [n for n in names if n != "good-bot"]
        self.bad_names = ["", "r" * 65]
        self.states = rng.uniform(-1, 1, (256, 3)).astype(np.float32)
        self.states[::16] *= 30  # out of the observation range: an alert, the policy still acts
        wrong = [np.zeros(3, np.float64), np.zeros(3, np.int32), np.zeros(3, np.uint8), np.zeros(3, bool),
                 np.zeros(4, np.float32), np.zeros((1, 3), np.float32), np.float32(1.0), np.zeros(0, np.float32),
                 np.zeros((3, 3, 3, 3), np.int16), np.array([np.nan, 0, 0], np.float32),
                 np.array([0, np.inf, 0], np.float32), np.array([3e38, 3e38, 3e38], np.float32)]
        self.wrong_arrays = [{"state": a} for a in wrong] + [
            {}, {"pos": self.states[0]}, {"state": self.states[0], "extra": self.states[1]},
            {"State": self.states[0]}, {"state": self.states[0], "": self.states[0]}]
        self.resets = [{}, {"instruction": "pick up the cube", "seed": 3}, {"seed": -1}, {"seed": "x"},
                       {"sim": {"env": "aircraft-pitch"}, "task": "t"}, {"sim": 5}, {"instruction": 7},
                       {"episode": [1, {"a": None}]}]
        self.specs = [GOOD_SPEC] * 6 + [{}, {"observation": []}, {**GOOD_SPEC, "action": {"name": "a"}},
                                        {"observation": [{"name": "state", "dtype": "float64", "shape": [3]}],
                                         "action": GOOD_SPEC["action"]}, [1], None]

    def pick(self, seq: Sequence) -> Any:
        return seq[int(self.rng.integers(len(seq)))]

    def valid(self) -> list[bytes]:
        rng = self.rng
        self.seq += 1
        robot = self.pick(self.names) if rng.random() < 0.97 else self.pick(self.bad_names)
        u = rng.random()
        if u < 0.2:
            spec = self.pick(self.specs)
            msg = Message("hello", robot, self.seq, 1, {}, {} if spec is None else {"spec": spec})
        elif u < 0.6:
            msg = Message("obs", robot, self.seq, 1, {"state": self.pick(self.states)})
        elif u < 0.7:
            msg = Message("reset", robot, self.seq, 1, {}, self.pick(self.resets))
        elif u < 0.85:
            msg = Message("heartbeat", robot, self.seq, 1)
        elif u < 0.9:
            msg = Message("error", robot, self.seq, 1, {}, {"code": "motor_hot", "message": "overheating"})
        elif u < 0.95:
            msg = Message("act", robot, self.seq, 1, {"action": self.states[0][:1]})
        else:
            msg = Message("bye", robot, self.seq, 1)
        return [bytes(f) for f in encode(msg)]

    def wrong(self) -> list[bytes]:
        self.seq += 1
        arrays = self.pick(self.wrong_arrays)
        return [bytes(f) for f in encode(Message("obs", self.pick(self.names), self.seq, 1, arrays))]

    def __call__(self) -> list[bytes]:
        rng = self.rng
        u = rng.random()
        if u < 0.12:  # one frame of random bytes
            return [rng.bytes(int(rng.integers(0, 48)))]
        if u < 0.2:  # several frames of random bytes
            return [rng.bytes(int(rng.integers(0, 32))) for _ in range(int(rng.integers(2, 6)))]
        if u < 0.5:  # a valid message, mutated
            frames = self.valid()
            for _ in range(int(rng.integers(1, 4))):
                frames = mutate(frames, MUTATIONS[int(rng.integers(len(MUTATIONS)))], int(rng.integers(2**16)),
                                int(rng.integers(2**16)), rng.bytes(int(rng.integers(1, 9))))
            return frames
        if u < 0.65:  # a valid obs with the wrong arrays
            return self.wrong()
        return self.valid()


@pytest.mark.parametrize("n_messages", [pytest.param(20_000, id="20k"),
                                        pytest.param(N_MESSAGES, id="100k", marks=pytest.mark.slow)])
def test_100k_random_and_mutated_messages(tmp_path, lqr_bundle, n_messages):
    """10^5 messages under `-m slow`; 2 x 10^4 of the same stream in the default suite (it keeps `make test` fast)."""
    served = start_serve(tmp_path / "serve", lqr_bundle, **runtime_flags())
    K = gain_of(lqr_bundle)
    gen = Generator(SEED)
    ctx = zmq.Context()
    dealers = [Dealer(served.robot_endpoint, ctx) for _ in range(SOCKETS)]
    replies_by_kind: Counter = Counter()
    error_codes: Counter = Counter()
    counters: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        sent = 0
        while sent < n_messages:
            burst: list[list[Expect]] = [[] for _ in dealers]
            for _ in range(BURST):
                frames = gen()
                i = int(gen.rng.integers(SOCKETS))
                dealers[i].send(frames)
                burst[i].append(expect(frames))
            sent += BURST
            for dealer, expected in zip(dealers, burst):
                if not expected:
                    continue
                replies = dealer.sync()
                # sessions move between sockets (the same names say hello on several): session state unknown
                match_replies(expected, replies, K, session=None)
                for r in replies:
                    replies_by_kind[r.kind] += 1
                    if r.kind == "error":
                        error_codes[r.meta["code"]] += 1
            if sent % 20_000 == 0:
                assert served.alive(), served.log()
        elapsed = time.perf_counter() - t0
        print(f"\n{sent} fuzz messages (+{sum(d.sentinels for d in dealers)} sentinels) answered in {elapsed:.1f} s: "
              f"{sent / elapsed:.0f} messages/s; replies {dict(replies_by_kind)}; error codes {dict(error_codes)}")
        assert served.alive(), served.log()
        # every kind of answer happened, and every handler was reached
        assert {"act", "hello", "reset", "heartbeat", "bye", "error"} <= set(replies_by_kind)
        assert {"bad_header", "bad_frames", "bad_kind", "no_session", "bad_shape", "bad_dtype", "not_finite",
                "bad_spec", "refused"} <= set(error_codes), error_codes

        # a well-behaved robot, after all that: exact LQR actions, in lockstep
        link = RobotLink(served.robot_endpoint, "good-bot", ctx)
        try:
            link.hello(*pitch_specs())
            for x in np.random.default_rng(SEED + 1).uniform(-0.5, 0.5, (200, 3)).astype(np.float32):
                reply = link.act({"state": x}, timeout_s=REPLY_TIMEOUT_MS / 1000)
                assert reply.kind == "act" and reply.meta["safe"] is False and reply.meta["verdicts"] == [], reply.meta
                assert_lqr_action(reply.arrays["action"], K, x)
        finally:
            link.close()
        assert served.alive(), served.log()
    finally:
        for d in dealers:
            d.close()
        ctx.term()
        counters = served.stop()
    total_sent = sum(d.sent for d in dealers) + 1 + 200
    assert counters["stopped_by"] == "SIGINT"
    assert counters.get("error.internal", 0) == 0, counters
    # every message arrived (only the readiness probes come on top) and every error reply was counted
    assert n_messages <= total_sent <= counters["received"] <= total_sent + 100, (total_sent, counters["received"])
    assert counters["errors"] == sum(error_codes.values()), counters
    for code, n in error_codes.items():
        assert counters[f"error.{code}"] == n, (code, counters)
    assert counters["ticks"] == replies_by_kind["act"] + 200, counters
