"""vigil wire protocol: one msgpack header frame, then one raw buffer frame per array.

A message on the robot link or the operator stream is a list of ZeroMQ frames::

    frame 0      msgpack map  {v, kind, robot, seq, t_ns, arrays: [{name, dtype, shape}], ...}
    frame 1..n   the raw little-endian, C-ordered bytes of each array, in header order

Everything received is validated before anything else touches it (`decode`), and everything that fails
raises `ProtocolError` with a stable `code`, never anything else.  Keys of the header that are not part of
the envelope travel in `Message.meta` (for example `code`/`message` of an `error`, `spec` of a `hello`).
The full reference, written for robot-driver authors in any language, is docs/protocol.md.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, NamedTuple

import msgpack
import numpy as np

VERSION = 1
ROBOT_KINDS = frozenset({"hello", "obs", "act", "reset", "heartbeat", "error", "bye"})
STREAM_KINDS = frozenset({"alert", "request", "telemetry", "trace"})  # operator stream (stream.py)
CONTROL_KINDS = frozenset({"swap", "error"})  # control channel (`vigil swap`; server.py)
KINDS = ROBOT_KINDS | STREAM_KINDS | CONTROL_KINDS
ENVELOPE = frozenset({"v", "kind", "robot", "seq", "t_ns", "arrays"})
# Whitelisted element types; the wire is always little-endian.
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in ("float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "bool")
}
_WIRE_NAME = {dt: name for name, dt in DTYPES.items()}  # dtype -> wire name (dtype.name is slow)
_packb = msgpack.Packer(use_bin_type=True).pack
_unpackb = msgpack.unpackb
_isfinite = math.isfinite
_I63 = 2**63
_SMALL = 64  # arrays up to this many elements have their values checked as Python numbers (faster than numpy)


class ProtocolError(Exception):
    """A message that must not be used. `code` is stable and goes back to the sender."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what a peer may send; anything above is refused with `too_large`."""

    max_header_bytes: int = 64 * 1024
    max_arrays: int = 16
    max_dims: int = 4
    max_array_bytes: int = 8 * 1024 * 1024
    max_total_bytes: int = 16 * 1024 * 1024
    max_name_len: int = 64


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class ArraySpec:
    """Declared name, dtype and shape of one array, with optional element bounds (for range monitors)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    low: tuple[float, ...] | None = None
    high: tuple[float, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.low is not None:
            d["low"] = list(self.low)
        if self.high is not None:
            d["high"] = list(self.high)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "spec") -> ArraySpec:
        if not isinstance(d, Mapping):
            raise ProtocolError("bad_spec", f"{where} must be a map with name, dtype, shape")
        name, dtype, shape = d.get("name"), d.get("dtype"), d.get("shape")
        if not isinstance(name, str) or not name:
            raise ProtocolError("bad_spec", f"{where}.name must be a non-empty string")
        if type(dtype) is not str or dtype not in DTYPES:
            raise ProtocolError("bad_spec", f"{where}.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if not isinstance(shape, (list, tuple)) or not all(_is_int(s) and s >= 0 for s in shape):
            raise ProtocolError("bad_spec", f"{where}.shape must be a list of non-negative integers")
        size = int(np.prod(shape)) if shape else 1

        def bound(key: str) -> tuple[float, ...] | None:
            v = d.get(key)
            if v is None:
                return None
            if not isinstance(v, (list, tuple)) or len(v) != size or not all(_is_num(x) for x in v):
                raise ProtocolError("bad_spec", f"{where}.{key} must be a list of {size} numbers")
            return tuple(float(x) for x in v)

        return cls(name, dtype, tuple(int(s) for s in shape), bound("low"), bound("high"))


_EMPTY: Mapping[str, Any] = MappingProxyType({})


class Message(NamedTuple):
    """A decoded message. `arrays` keeps header order; `meta` holds the kind-specific header keys. (A
    NamedTuple rather than a frozen dataclass: immutable all the same, and built several times faster,
    which counts on the hot path.)"""

    kind: str
    robot: str = ""
    seq: int = 0
    t_ns: int = 0
    arrays: Mapping[str, np.ndarray] = _EMPTY
    meta: Mapping[str, Any] = _EMPTY


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def encode(msg: Message) -> list:
    """Frames for `msg`: the header, then each array's buffer (numpy buffers are sent without a copy)."""
    descs = []
    bufs = []
    for name, arr in msg.arrays.items():
        a = np.asarray(arr)
        wire = _WIRE_NAME.get(a.dtype)
        if wire is None or not a.flags.c_contiguous:
            wire = a.dtype.name
            if wire not in DTYPES:
                raise ProtocolError("bad_dtype", f"array {name!r}: dtype {wire} is not on the wire whitelist")
            a = np.ascontiguousarray(a, dtype=DTYPES[wire])
        descs.append({"name": name, "dtype": wire, "shape": list(a.shape)})
        bufs.append(a.data if a.ndim else a.tobytes())
    header = {"v": VERSION, "kind": msg.kind, "robot": msg.robot, "seq": msg.seq,
              "t_ns": msg.t_ns or time.time_ns(), "arrays": descs}
    if msg.meta:
        if not ENVELOPE.isdisjoint(msg.meta):
            raise ProtocolError("bad_header", f"meta keys {sorted(ENVELOPE & set(msg.meta))} collide with the envelope")
        header.update(msg.meta)
    return [_packb(header), *bufs]


def decode(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS, kinds: frozenset[str] = ROBOT_KINDS,
           layout: Layout | None = None) -> Message:
    """Validate and decode frames (bytes, memoryviews or zmq.Frame). Raises only ProtocolError.

    `layout`: the arrays this sender is expected to send (compiled once per session from its declared
    spec); a message whose array descriptors are exactly those skips the per-descriptor checks. Anything
    else is checked descriptor by descriptor, and the first problem is named."""
    if not frames:
        raise ProtocolError("bad_frames", "empty message")
    head = _buffer(frames[0])
    if len(head) > limits.max_header_bytes:
        raise ProtocolError("too_large", f"header is {len(head)} bytes, limit {limits.max_header_bytes}")
    try:
        header = _unpackb(head, raw=False, strict_map_key=True, max_bin_len=0, max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("bad_header", f"header is not valid msgpack ({type(exc).__name__})") from None
    if type(header) is not dict:
        raise ProtocolError("bad_header", "header must be a msgpack map")
    get = header.get
    v = get("v")
    if v != VERSION or type(v) is not int:
        raise ProtocolError("bad_version",
                            f"protocol version {v!r} is not supported (this runtime speaks {VERSION})")
    kind = get("kind")
    if type(kind) is not str or kind not in kinds:
        raise ProtocolError("bad_kind", f"unknown kind {kind!r}; expected one of {sorted(kinds)}")
    robot, seq, t_ns = get("robot", ""), get("seq", 0), get("t_ns", 0)
    if type(robot) is not str or len(robot) > limits.max_name_len:
        raise ProtocolError("bad_header", f"robot must be a string of at most {limits.max_name_len} characters")
    if type(seq) is not int or not 0 <= seq < _I63:
        raise ProtocolError("bad_header", "seq must be a non-negative 64-bit integer")
    if type(t_ns) is not int or not 0 <= t_ns < _I63:
        raise ProtocolError("bad_header", "t_ns must be a non-negative 64-bit integer")
    descs = get("arrays", ())
    if len(header) == 6 and "arrays" in header and "t_ns" in header and "seq" in header and "robot" in header:
        meta = _EMPTY  # the envelope and nothing else (the common case: spares building a set)
    else:
        extra = header.keys() - ENVELOPE
        meta = {k: header[k] for k in extra} if extra else _EMPTY
    if not descs:
        if descs != () and type(descs) is not list:
            raise ProtocolError("bad_header", "arrays must be a list of {name, dtype, shape}")
        if len(frames) != 1:
            raise ProtocolError("bad_frames", f"header declares 0 arrays but {len(frames) - 1} buffer frames arrived")
        return Message(kind, robot, seq, t_ns, _EMPTY, meta)
    if layout is not None and descs == layout.descs and len(frames) == 1 + len(descs):
        return Message(kind, robot, seq, t_ns, layout.arrays(frames), meta)
    return Message(kind, robot, seq, t_ns, _decode_arrays(descs, frames, len(head), limits), meta)


def _decode_arrays(descs: Any, frames: Sequence[Any], total: int, limits: Limits) -> dict[str, np.ndarray]:
    """The arrays of a message whose descriptors are checked one by one (no layout, or not the expected one)."""
    if type(descs) is not list:
        raise ProtocolError("bad_header", "arrays must be a list of {name, dtype, shape}")
    if len(descs) > limits.max_arrays:
        raise ProtocolError("too_large", f"{len(descs)} arrays, limit {limits.max_arrays}")
    if len(frames) != 1 + len(descs):
        raise ProtocolError("bad_frames",
                            f"header declares {len(descs)} arrays but {len(frames) - 1} buffer frames arrived")
    arrays: dict[str, np.ndarray] = {}
    for i, d in enumerate(descs):
        name, arr = _decode_array(d, _buffer(frames[i + 1]), i, limits)
        _check_values(name, arr)
        total += arr.nbytes
        if total > limits.max_total_bytes:
            raise ProtocolError("too_large", f"message exceeds {limits.max_total_bytes} bytes")
        if name in arrays:
            raise ProtocolError("bad_header", f"array name {name!r} appears twice")
        arrays[name] = arr
    return arrays


def _check_values(name: str, arr: np.ndarray) -> None:
    """Floats must be finite; bools must be the bytes 0x00 or 0x01 (numpy would read any other byte as true)."""
    kind = arr.dtype.kind
    if kind == "f":
        if arr.size <= _SMALL:  # numpy's per-call overhead dominates on small arrays: test Python floats
            if not all(map(_isfinite, arr.ravel().tolist())):
                raise ProtocolError("not_finite", f"array {name!r} contains NaN or infinity")
        elif not np.isfinite(arr).all():
            raise ProtocolError("not_finite", f"array {name!r} contains NaN or infinity")
    elif kind == "b" and arr.size and arr.view(np.uint8).max() > 1:
        raise ProtocolError("bad_value", f"array {name!r} is bool: every byte must be 0x00 or 0x01")


@dataclass(frozen=True)
class Layout:
    """The arrays a sender declared (its spec), compiled once so that a message carrying exactly them is
    decoded without re-checking every descriptor: the exact `arrays` list of the header (the order the
    specs were given in), and per array its dtype, shape and byte length. Values are still checked
    (finite floats, strict bools) on every message."""

    specs: tuple[ArraySpec, ...]
    descs: list[dict[str, Any]] = field(init=False, compare=False)
    _plan: tuple[tuple[str, np.dtype, tuple[int, ...], int, bool], ...] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        descs = [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in self.specs]
        plan = tuple((s.name, DTYPES[s.dtype], s.shape, DTYPES[s.dtype].itemsize * math.prod(s.shape),
                      DTYPES[s.dtype].kind in "fb") for s in self.specs)
        if len({s.name for s in self.specs}) != len(self.specs):
            raise ValueError("array names in a layout must be unique")
        object.__setattr__(self, "descs", descs)
        object.__setattr__(self, "_plan", plan)

    def arrays(self, frames: Sequence[Any]) -> dict[str, np.ndarray]:
        """The arrays of a message whose descriptors equal `descs` (the caller checked that, and the frame
        count); raises ProtocolError for a frame of the wrong length or a bad value."""
        arrays = {}
        for i, (name, dt, shape, nbytes, check) in enumerate(self._plan, 1):
            buf = frames[i]
            if type(buf) is not bytes:
                buf = _buffer(buf)
            if len(buf) != nbytes:
                raise ProtocolError("bad_frames", f"array {name!r}: frame has {len(buf)} bytes, shape "
                                    f"{list(shape)} x {dt.name} needs {nbytes}")
            arr = np.frombuffer(buf, dt)
            if len(shape) != 1:
                arr = arr.reshape(shape)
            if check:
                _check_values(name, arr)
            arrays[name] = arr
        return arrays


def _decode_array(d: Any, buf: Any, i: int, limits: Limits) -> tuple[str, np.ndarray]:
    if type(d) is not dict:
        raise ProtocolError("bad_header", f"arrays[{i}] must be a map with name, dtype, shape")
    name, dtype, shape = d.get("name"), d.get("dtype"), d.get("shape")
    if type(name) is not str or not name or len(name) > limits.max_name_len:
        raise ProtocolError("bad_header", f"arrays[{i}].name must be a string of 1..{limits.max_name_len} characters")
    dt = DTYPES.get(dtype) if type(dtype) is str else None
    if dt is None:
        raise ProtocolError("bad_dtype", f"array {name!r}: dtype {dtype!r} is not one of {sorted(DTYPES)}")
    bad_shape = f"array {name!r}: shape must be a list of at most {limits.max_dims} non-negative integers"
    if type(shape) is not list or len(shape) > limits.max_dims:
        raise ProtocolError("bad_shape", bad_shape)
    for s in shape:
        if type(s) is not int or not 0 <= s < 2**31:
            raise ProtocolError("bad_shape", bad_shape)
    expected = dt.itemsize * math.prod(shape)
    if expected > limits.max_array_bytes:
        raise ProtocolError("too_large", f"array {name!r} is {expected} bytes, limit {limits.max_array_bytes}")
    if len(buf) != expected:
        raise ProtocolError("bad_frames",
                            f"array {name!r}: frame has {len(buf)} bytes, shape {shape} x {dtype} needs {expected}")
    return name, np.frombuffer(buf, dtype=dt).reshape(shape)


def _buffer(frame: Any) -> Any:
    """bytes as they are; zmq.Frame and other buffers as a flat byte memoryview."""
    if type(frame) is bytes:
        return frame
    buf = getattr(frame, "buffer", frame)  # zmq.Frame exposes .buffer
    try:
        mv = memoryview(buf)
    except TypeError:
        raise ProtocolError("bad_frames", f"frame of type {type(frame).__name__} is not a buffer") from None
    return mv.cast("B") if mv.ndim != 1 or mv.format != "B" else mv


def check_arrays(msg: Message, specs: Sequence[ArraySpec]) -> None:
    """Require exactly the declared arrays, with the declared dtype and shape."""
    if len(msg.arrays) != len(specs):
        names = ", ".join(s.name for s in specs)
        raise ProtocolError("bad_shape", f"{msg.kind} must carry exactly the arrays [{names}], got {list(msg.arrays)}")
    for s in specs:
        a = msg.arrays.get(s.name)
        if a is None:
            raise ProtocolError("bad_shape", f"{msg.kind} is missing array {s.name!r}")
        if a.dtype != DTYPES[s.dtype]:
            raise ProtocolError("bad_dtype", f"array {s.name!r} must be {s.dtype}, got {a.dtype.name}")
        if a.shape != s.shape:
            raise ProtocolError("bad_shape", f"array {s.name!r} must have shape {list(s.shape)}, got {list(a.shape)}")


def error(code: str, message: str, robot: str = "", seq: int = 0, **meta: Any) -> Message:
    """An `error` reply; the connection stays usable after it."""
    return Message("error", robot, seq, 0, {}, {"code": code, "message": message, **meta})


def peek_seq(body: Sequence[Any]) -> int:
    """Best-effort seq of a message that failed validation, so the sender can match the error to what it
    sent; 0 when even that cannot be read."""
    try:
        header = _unpackb(_buffer(body[0]), raw=False)
        seq = header.get("seq", 0) if isinstance(header, dict) else 0
        return seq if type(seq) is int and 0 <= seq < _I63 else 0
    except Exception:
        return 0
