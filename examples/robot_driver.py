"""A robot driver for a vigil runtime, written against docs/protocol.md only: the driver author's kit.

Dependencies: pyzmq, msgpack, numpy. No vigil import: this file is what you port to C++ (cppzmq + msgpack-c
or msgpack-cxx + Eigen) or Rust (zmq + rmp-serde + ndarray). Section numbers (§) refer to docs/protocol.md.

    driver = Driver("tcp://127.0.0.1:5555", "pitch-1", observation=[("state", "float32", [3])],
                    action=("action", "float32", [1]))
    driver.hello()                                    # §7.1: spec, pipeline; keeps the safe action
    driver.reset(task="aircraft-pitch")               # §7.4
    for each control period:
        step = driver.step({"state": x}, wait_s)      # §11: the runtime's action, or the safe action by then
        apply(step.action)
    driver.idle(seconds)                              # nothing to send: heartbeats (§10)
    driver.bye()                                      # §7.7

`python examples/robot_driver.py --endpoint tcp://127.0.0.1:5555 --steps 200` drives a runtime serving the
aircraft-pitch LQR bundle (`vigil bundle lqr --system aircraft-pitch`) with a simulated aircraft, x' = A x + B u,
and prints a summary as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field

import msgpack
import numpy as np
import zmq

VERSION = 1
DTYPES = {name: np.dtype(name).newbyteorder("<") for name in  # §3: the whitelist, always little-endian
          ("float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "bool")}


# -- frames (§2-§4) ------------------------------------------------------------------------------------------

def encode(kind: str, robot: str, seq: int, arrays: dict | None = None, **keys) -> list[bytes]:
    """[header, buffer1, ...]: a msgpack map with the six envelope keys (+ kind-specific keys), then one frame
    of raw little-endian C-order bytes per array, in the order of `arrays` in the header."""
    arrays = arrays or {}
    descs, frames = [], []
    for name, value in arrays.items():
        a = np.ascontiguousarray(value, dtype=DTYPES[np.asarray(value).dtype.name])
        descs.append({"name": name, "dtype": a.dtype.name, "shape": list(a.shape)})
        frames.append(a.tobytes())
    header = {"v": VERSION, "kind": kind, "robot": robot, "seq": seq, "t_ns": time.time_ns(), "arrays": descs,
              **keys}
    return [msgpack.packb(header, use_bin_type=True), *frames]


def decode(frames: list[bytes]) -> tuple[dict, dict]:
    """(header, arrays) of a message from the runtime. The runtime only sends well-formed messages; a driver
    still checks what it relies on (raises ValueError)."""
    header = msgpack.unpackb(frames[0], raw=False)
    if not isinstance(header, dict) or header.get("v") != VERSION:
        raise ValueError("not a vigil v1 message")
    descs = header.get("arrays", [])
    if len(descs) != len(frames) - 1:
        raise ValueError("frame count differs from the header's arrays")
    arrays = {}
    for d, buf in zip(descs, frames[1:]):
        dt = DTYPES[d["dtype"]]
        if len(buf) != dt.itemsize * int(np.prod(d["shape"])):
            raise ValueError(f"array {d['name']!r}: wrong frame length")
        arrays[d["name"]] = np.frombuffer(buf, dt).reshape(d["shape"])
    return header, arrays


# -- the driver (§11) --------------------------------------------------------------------------------------


class Refused(RuntimeError):
    """The runtime cannot drive this robot (hello answered `refused` or `bad_spec`), or did not answer."""


@dataclass
class Step:
    """What to apply this period. `fallback` is None when the runtime's act for this observation came in time
    (then `action` is the runtime's, which is its safe action when `safe`); else the robot applies the
    manifest's safe action itself and `fallback` says why: "timeout", "error:<code>", "no_session" (the
    session was resumed for the next period), "unsent" (no connection), "bye" (the runtime is stopping)."""

    seq: int
    action: np.ndarray
    safe: bool
    fallback: str | None = None
    meta: dict = field(default_factory=dict)  # the act's header: verdicts, infer_us, queue_us, decide_us, ...


class Driver:
    def __init__(self, endpoint: str, robot: str, observation: list[tuple[str, str, list[int]]],
                 action: tuple[str, str, list[int]], pipeline: int = 1, clock_synced: bool | None = None, **info):
        self.endpoint, self.robot = endpoint, robot
        spec = [{"name": n, "dtype": d, "shape": list(s)} for n, d, s in observation]
        self.hello_keys = {"spec": {"observation": spec,
                                    "action": {"name": action[0], "dtype": action[1], "shape": list(action[2])}},
                           "pipeline": pipeline, **info}
        if clock_synced is not None:  # default: the runtime decides from its endpoint (§9.4)
            self.hello_keys["clock_synced"] = clock_synced
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)  # never set ZMQ_ROUTING_ID (§1)
        self.sock.setsockopt(zmq.SNDHWM, 32)  # stale observations are worthless: queue little on a dead link
        self.sock.connect(endpoint)
        self.seq = 0
        self.last_send = time.monotonic()
        self.last_reset: dict | None = None
        self.reply: dict = {}  # the hello reply: manifest, mode, deadline_ms, heartbeat_s, ...
        self.safe_action = np.zeros(0, np.float32)
        self.counts = {"link_lost": 0, "late": 0, "resumed": 0, "heartbeats": 0}
        self.runtime_bye = False

    # sending and receiving

    def send(self, kind: str, arrays: dict | None = None, **keys) -> int | None:
        """Send without blocking; the seq used, or None when there is no connection (the message is dropped)."""
        self.seq += 1  # starts at 1: seq 0 never names one of ours (§3)
        try:
            self.sock.send_multipart(encode(kind, self.robot, self.seq, arrays, **keys), zmq.NOBLOCK)
        except zmq.Again:
            return None
        self.last_send = time.monotonic()
        return self.seq

    def receive(self, until: float) -> tuple[dict, dict] | None:
        """The next message from the runtime, waiting until `until` (time.monotonic) at most."""
        ms = max(0, int((until - time.monotonic()) * 1000))
        if not self.sock.poll(ms):
            return None
        return decode(self.sock.recv_multipart())

    def wait_for(self, seq: int, until: float) -> tuple[dict, dict] | None:
        """The reply with `seq` (replies are matched by seq, §7), or None by `until`. Anything else that arrives
        meanwhile is taken in: a late reply to an earlier request, the link-loss act (§10), the runtime's bye."""
        while (msg := self.receive(until)) is not None:
            if msg[0]["seq"] == seq:
                return msg
            self.take_in(msg[0])
            if msg[0]["kind"] == "bye":  # the runtime is stopping: no answer will come
                return None
        return None

    def take_in(self, header: dict) -> None:
        if header["kind"] == "act" and any(v[0] == "link" for v in header.get("verdicts", ())):
            self.counts["link_lost"] += 1  # the runtime heard nothing from us for link_timeout_s: safe action
        elif header["kind"] == "bye":
            self.runtime_bye = True  # the runtime is stopping (§7.7): safe action until it is back
        elif header["kind"] in ("act", "error"):
            self.counts["late"] += 1  # an answer to an observation we stopped waiting for: never applied

    def request(self, kind: str, timeout_s: float, **keys) -> dict:
        seq = self.send(kind, **keys)
        reply = self.wait_for(seq, time.monotonic() + timeout_s) if seq is not None else None
        if reply is None:
            raise Refused(f"no answer to {kind} from {self.endpoint} within {timeout_s} s")
        return reply[0]

    # the session

    def hello(self, timeout_s: float = 5.0) -> dict:
        """Introduce the robot (§7.1). Keeps the hello reply and the manifest's safe action."""
        reply = self.request("hello", timeout_s, **self.hello_keys)
        if reply["kind"] == "error":
            raise Refused(f"hello refused: {reply['code']}: {reply['message']}")
        self.reply = reply
        self.safe_action = np.asarray(reply["manifest"]["safe_action"], np.float32)
        self.runtime_bye = False
        return reply

    def reset(self, timeout_s: float = 2.0, **keys) -> int:
        """A new episode (§7.4); returns the runtime's episode number. Remembered, so a resume can repeat it."""
        self.last_reset = keys
        reply = self.request("reset", timeout_s, **keys)
        if reply["kind"] == "error":
            raise Refused(f"reset refused: {reply['code']}: {reply['message']}")
        return reply["episode"]

    def resume(self, timeout_s: float = 1.0) -> None:
        """The runtime answered no_session (it restarted, or the session expired, §10.1): hello again, and the
        episode's reset again so that the policy knows the task."""
        self.hello(timeout_s)
        if self.last_reset is not None:
            self.reset(timeout_s, **self.last_reset)
        self.counts["resumed"] += 1

    def step(self, obs: dict, wait_s: float) -> Step:
        """Send one observation and return what to apply, at the latest `wait_s` after the call (§9.2, §11)."""
        until = time.monotonic() + wait_s
        seq = self.send("obs", obs)
        if seq is None:
            time.sleep(max(0.0, until - time.monotonic()))  # keep the pace all the same
            return Step(self.seq, self.safe_action, True, "unsent")
        reply = self.wait_for(seq, until)
        if reply is None:
            return Step(seq, self.safe_action, True, "bye" if self.runtime_bye else "timeout")
        header, arrays = reply
        if header["kind"] == "error":
            if header["code"] == "no_session":
                try:
                    self.resume()
                except Refused:
                    pass  # nobody knows us yet: the next no_session tries again
                return Step(seq, self.safe_action, True, "no_session", header)
            return Step(seq, self.safe_action, True, f"error:{header['code']}", header)  # overflow included
        return Step(seq, arrays["action"], bool(header["safe"]), None, header)

    def idle(self, seconds: float) -> None:
        """Nothing to send for a while: a heartbeat whenever nothing went out for heartbeat_s (§10), taking in
        what the runtime sends meanwhile (heartbeat replies, a link-loss act, its bye)."""
        end = time.monotonic() + seconds
        period = float(self.reply.get("heartbeat_s", 0.1))
        while (now := time.monotonic()) < end:
            if now - self.last_send >= period:
                if self.send("heartbeat") is not None:
                    self.counts["heartbeats"] += 1
            msg = self.receive(min(end, max(now + 0.001, self.last_send + period)))
            if msg is not None and msg[0]["kind"] != "heartbeat":
                self.take_in(msg[0])

    def bye(self, timeout_s: float = 1.0) -> None:
        try:
            self.request("bye", timeout_s)
        except Refused:
            pass
        self.sock.close(linger=0)


# -- a simulated robot: aircraft pitch (x = [angle of attack, pitch rate, pitch angle], u = elevator) ------------

# The continuous model of docs/lqr.md discretised exactly (zero-order hold) at dt = 0.05 s (20 Hz).
A = np.array([[9.835039430552754e-01, 2.782194092685029e+00, 0.0],
              [-6.820546364783367e-04, 9.779591823414588e-01, 0.0],
              [-9.729535054945371e-04, 2.804103045722424e+00, 1.0]])
B = np.array([[1.292687458326036e-02], [9.999570831550300e-04], [1.424594033481650e-03]])
X0 = np.array([0.035, 0.0, 0.087])


def simulate(driver: Driver, steps: int, wait_s: float, period_s: float = 0.0, noise: float = 0.0,
             seed: int = 0) -> list[dict]:
    """One episode: reset, then `steps` periods of observe -> step -> apply -> x' = A x + B u (+ noise). With
    `period_s` > 0 the loop keeps that period, idling (heartbeats) for what is left of it. Returns one record
    per period: the state observed, the action applied and why."""
    rng = np.random.default_rng(seed)
    driver.reset(task="aircraft-pitch", seed=seed)
    x, records = X0.copy(), []
    for _ in range(steps):
        start = time.monotonic()
        obs = x.astype(np.float32)
        step = driver.step({"state": obs}, wait_s)
        records.append({"seq": step.seq, "x": obs.tolist(), "u": step.action.tolist(), "safe": step.safe,
                        "fallback": step.fallback, "queue_us": step.meta.get("queue_us"),
                        "decide_us": step.meta.get("decide_us")})
        x = A @ x + B @ step.action.astype(np.float64) + noise * rng.standard_normal(3)
        if period_s > 0:
            driver.idle(period_s - (time.monotonic() - start))
    return records


def summary(records: list[dict], driver: Driver) -> dict:
    fallbacks: dict[str, int] = {}
    for r in records:
        if r["fallback"]:
            fallbacks[r["fallback"]] = fallbacks.get(r["fallback"], 0) + 1
    queue = [r["queue_us"] for r in records if r["queue_us"] is not None]
    return {"robot": driver.robot, "policy": driver.reply.get("policy"), "steps": len(records),
            "runtime_actions": sum(r["fallback"] is None for r in records),
            "runtime_safe": sum(r["fallback"] is None and r["safe"] for r in records), "fallbacks": fallbacks,
            "final_state": records[-1]["x"] if records else None,
            "queue_us_max": max(queue) if queue else None, **driver.counts}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5555", help="the runtime's robot endpoint")
    p.add_argument("--robot", default="pitch-1", help="robot id (unique among the runtime's robots)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--wait-ms", type=float, default=0.0,
                   help="how long to wait for each act before applying the safe action (0: one control period)")
    p.add_argument("--realtime", action="store_true", help="keep the control period (heartbeats in between)")
    p.add_argument("--noise", type=float, default=0.0, help="std of the process noise")
    args = p.parse_args(argv)
    driver = Driver(args.endpoint, args.robot, observation=[("state", "float32", [3])],
                    action=("action", "float32", [1]), env="aircraft-pitch")
    try:
        hello = driver.hello()
        period_s = 1.0 / float(hello["manifest"]["control_rate_hz"])
        wait_s = args.wait_ms / 1e3 if args.wait_ms > 0 else period_s
        records = simulate(driver, args.steps, wait_s, period_s if args.realtime else 0.0, args.noise)
    finally:
        driver.bye()
    result = summary(records, driver)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
