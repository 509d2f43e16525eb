"""Runtime configuration: one frozen dataclass, read from TOML (`[serve]` table) and overridden by flags.

Every error names the key and what was expected.  Defaults are what a single robot on the same
computer wants: loopback endpoints, lockstep, a deadline of one control period.
"""

from __future__ import annotations

import ipaddress
import math
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

MODES = ("lockstep", "realtime")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServeConfig:
    bundle: str = field(default="", metadata={"help": "policy bundle folder (policy.onnx + manifest.json)"})
    robot_endpoint: str = field(default="tcp://127.0.0.1:5555", metadata={"help": "ZeroMQ endpoint the robot link (ROUTER) binds; robots connect a DEALER here"})
    operator_endpoint: str = field(default="tcp://127.0.0.1:5556", metadata={"help": "ZeroMQ endpoint the operator stream (PUB) binds"})
    store: str = field(default="vigil-alerts.db", metadata={"help": "SQLite file every alert is written to before it is published"})
    mode: str = field(default="lockstep", metadata={"help": "lockstep: answer every observation in order; realtime: act on the freshest, drop stale ones"})
    deadline_ms: float = field(default=0.0, metadata={"help": "longest receipt-to-decision time before the safe action is sent instead; 0 = one control period"})
    link_timeout_s: float = field(default=0.5, metadata={"help": "silence from a robot longer than this is link loss: safe action and an alert"})
    session_expiry_s: float = field(default=300.0, metadata={"help": "a robot silent this long is forgotten (its policy state and monitor windows too); its next message must be a new hello"})
    heartbeat_s: float = field(default=0.1, metadata={"help": "interval robots are asked to send heartbeats at when they have nothing else to send"})
    telemetry_s: float = field(default=1.0, metadata={"help": "interval of telemetry messages on the operator stream"})
    alert_repeat_s: float = field(default=5.0, metadata={"help": "a condition that persists is re-alerted at most this often (in between it is counted)"})
    saturation_window: int = field(default=20, metadata={"help": "ticks over which the saturation monitor judges"})
    busy_poll_us: float = field(default=0.0, metadata={"help": "spin on a non-blocking poll for this long after each message before blocking (0: always block); costs a core, saves wake-up latency"})
    threads: int = field(default=1, metadata={"help": "onnxruntime intra-op threads (1 is fastest for small policies at batch 1)"})
    request_interval_s: float = field(default=60.0, metadata={"help": "a task gets at most one data request per this many seconds (filed when the VFD monitor reaches alert; the alerts in between are not requests)"})
    stream_hwm: int = field(default=10_000, metadata={"help": "operator-stream messages queued per subscriber; beyond that a slow subscriber loses messages (it sees the gap in alert ids and reads them back from the store)"})
    control_endpoint: str = field(default="", metadata={"help": "ZeroMQ endpoint the control channel (ROUTER) binds, for `vigil swap` (hot-swapping the bundle); empty: no control channel"})
    allow_remote: bool = field(default=False, metadata={"help": "permit binding endpoints that are not loopback without authentication (prints a warning; see docs/operator.md)"})
    curve_secret: str = field(default="", metadata={"help": "the runtime's CURVE secret key file (NAME.key_secret from `vigil keys`): authentication and encryption on every endpoint; needs curve_allow"})
    curve_allow: str = field(default="", metadata={"help": "folder of the client public key files (*.key) allowed to connect when curve_secret is set"})

    def __post_init__(self) -> None:
        def bad(key: str, expected: str) -> ConfigError:
            return ConfigError(f"config key {key!r} must be {expected}, got {getattr(self, key)!r}")

        if self.mode not in MODES:
            raise bad("mode", f"one of {MODES}")
        for key in ("deadline_ms", "busy_poll_us"):
            if not 0 <= getattr(self, key) < math.inf:  # also refuses NaN
                raise bad(key, "a finite number >= 0")
        for key in ("link_timeout_s", "session_expiry_s", "heartbeat_s", "telemetry_s", "alert_repeat_s",
                    "request_interval_s"):
            if not 0 < getattr(self, key) < math.inf:
                raise bad(key, "a finite number > 0 (seconds)")
        if self.saturation_window < 1:
            raise bad("saturation_window", "an integer >= 1")
        if self.threads < 1:
            raise bad("threads", "an integer >= 1")
        if self.stream_hwm < 1:
            raise bad("stream_hwm", "an integer >= 1")
        for key in ("robot_endpoint", "operator_endpoint", "control_endpoint"):
            ep = getattr(self, key)
            if key == "control_endpoint" and ep == "":
                continue  # no control channel
            if not isinstance(ep, str) or "://" not in ep:
                raise bad(key, "a ZeroMQ endpoint such as tcp://127.0.0.1:5555 or ipc:///tmp/vigil.sock"
                          + (" (or empty: none)" if key == "control_endpoint" else ""))
            if not self.allow_remote and not self.authenticated and not is_local(ep):
                raise ConfigError(f"config key {key!r} is {ep!r}, which is not loopback; vigil binds loopback only, "
                                  "unless authentication is on (curve_secret and curve_allow) or allow_remote = true "
                                  "(--allow-remote)")
        if bool(self.curve_secret) != bool(self.curve_allow):
            missing = "curve_allow" if self.curve_secret else "curve_secret"
            raise ConfigError(f"config key {missing!r} must be set too: authentication needs the runtime's secret key "
                              "file (curve_secret) and the folder of allowed client keys (curve_allow)")

    @property
    def authenticated(self) -> bool:
        return bool(self.curve_secret)

    def exposed(self) -> list[str]:
        """Endpoints reachable from other computers without authentication (for the startup warning)."""
        if self.authenticated:
            return []
        return [ep for ep in (self.robot_endpoint, self.operator_endpoint, self.control_endpoint)
                if ep and not is_local(ep)]

    def deadline_s(self, control_rate_hz: float) -> float:
        return self.deadline_ms / 1e3 if self.deadline_ms > 0 else 1.0 / control_rate_hz


def is_local(endpoint: str) -> bool:
    """ipc and inproc are local; tcp must name a loopback address."""
    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    host = urllib.parse.urlsplit(f"//{rest}").hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file as a dict; a missing or malformed file is a ConfigError that names it."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def load_config(path: str | Path | None = None, **overrides: Any) -> ServeConfig:
    """Read `[serve]` from a TOML file (if given), then apply non-None overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        values.update(check_table(ServeConfig, read_toml(path).get("serve", {}), "serve"))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ServeConfig(**values)


def check_table(cls: type, table: Mapping[str, Any], section: str) -> dict[str, Any]:
    """Values of a TOML table for the frozen dataclass `cls`: every key must be a field, and its value of
    the field default's type (ints are accepted for floats, bools never for numbers)."""
    known = {f.name: f for f in fields(cls)}
    out = {}
    for key, value in table.items():
        f = known.get(key)
        if f is None:
            raise ConfigError(f"config key '{section}.{key}' is unknown; expected one of {sorted(known)}")
        expected = type(f.default)
        ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise ConfigError(f"config key '{section}.{key}' must be a {expected.__name__}, got {value!r}")
        out[key] = value
    return out


def describe() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every option, for --help and docs."""
    return [(f.name, f.default, f.metadata["help"]) for f in fields(ServeConfig)]
