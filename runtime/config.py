"""Configuration: frozen dataclasses whose fields are both TOML keys and command-line flags.

Every `vigil` command has one (ServeConfig here, the others next to their commands). A field with a help
text (`metadata={"help": ...}`) is a flag: `add_flags` adds it to a parser, `config_from_args` builds the
dataclass from a TOML table and the flags given, and the dataclass's `__post_init__` validates with
`check_fields`, so every error names the key and what was expected. Defaults are what a single robot on
the same computer wants: loopback endpoints, lockstep, a deadline of one control period.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import tomllib
import types
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

MODES = ("lockstep", "realtime")
EXECUTIONS = ("sync", "async")
MERGES = ("rtc", "naive", "blend", "temporal", "sync")  # policies/executor.py MERGES (config stays numpy-free)

T = TypeVar("T")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class ServeConfig:
    bundle: str = field(default="", metadata={"help": "policy bundle folder (policy.onnx + manifest.json)"})
    robot_endpoint: str = field(default="tcp://127.0.0.1:5555", metadata={
        "help": "ZeroMQ endpoint the robot link (ROUTER) binds; robots connect a DEALER here"})
    operator_endpoint: str = field(default="tcp://127.0.0.1:5556", metadata={
        "help": "ZeroMQ endpoint the operator stream (PUB) binds"})
    store: str = field(default="vigil-alerts.db", metadata={
        "help": "SQLite file every alert is written to before it is published"})
    mode: str = field(default="lockstep", metadata={
        "help": "lockstep: answer every observation in order; realtime: act on the freshest, drop stale ones",
        "choices": MODES})
    deadline_ms: float = field(default=0.0, metadata={
        "help": "longest time from an observation's arrival (queueing included) to its decision before the safe "
                "action is sent instead; 0 = one control period"})
    link_timeout_s: float = field(default=0.5, metadata={
        "help": "silence from a robot longer than this is link loss: safe action and an alert"})
    session_expiry_s: float = field(default=300.0, metadata={
        "help": "a robot silent this long is forgotten (its policy state and monitor windows too); its next "
                "message must be a new hello"})
    heartbeat_s: float = field(default=0.1, metadata={
        "help": "interval robots are asked to send heartbeats at when they have nothing else to send"})
    telemetry_s: float = field(default=1.0, metadata={"help": "interval of telemetry messages on the operator stream"})
    trace: bool = field(default=True, metadata={
        "help": "publish every robot's plan scores and verdict levels on the operator stream (topic `trace`), for "
                "live views such as `vigil console`; --no-trace turns it off (default: on)"})
    alert_repeat_s: float = field(default=5.0, metadata={
        "help": "a condition that persists is re-alerted at most this often (in between it is counted)"})
    saturation_window: int = field(default=20, metadata={"help": "ticks over which the saturation monitor judges"})
    busy_poll_us: float = field(default=0.0, metadata={
        "help": "spin on a non-blocking poll for this long after each message before blocking (0: always block); "
                "costs a core, saves wake-up latency"})
    threads: int = field(default=1, metadata={
        "help": "onnxruntime intra-op threads (1 is fastest for small policies at batch 1)"})
    request_interval_s: float = field(default=60.0, metadata={
        "help": "a task gets at most one data request per this many seconds (filed when the VFD monitor reaches "
                "alert; the alerts in between are not requests)"})
    pipeline: int = field(default=8, metadata={
        "help": "messages a robot may have waiting at the runtime when it declares no `pipeline` in hello; beyond "
                "that its oldest waiting observation is dropped with an `overflow` error (robots are served in "
                "turn, one message each per round)"})
    batch_plans: int = field(default=1, metadata={
        "help": "plan the waiting observations of up to this many robots in one onnxruntime call when the graph "
                "takes a batch (1: each robot's tick plans alone, reproducible whatever the other robots do)"})
    stream_hwm: int = field(default=10_000, metadata={
        "help": "operator-stream messages queued per subscriber; beyond that a slow subscriber loses messages (it "
                "sees the gap in alert ids and reads them back from the store)"})
    control_endpoint: str = field(default="", metadata={
        "help": "ZeroMQ endpoint the control channel (ROUTER) binds, for `vigil swap` (hot-swapping the bundle); "
                "empty: no control channel"})
    allow_remote: bool = field(default=False, metadata={
        "help": "permit binding endpoints that are not loopback without authentication (prints a warning; see "
                "docs/operator.md)"})
    curve_secret: str = field(default="", metadata={
        "help": "the runtime's CURVE secret key file (NAME.key_secret from `vigil keys`): authentication and "
                "encryption on every endpoint; needs curve_allow"})
    curve_allow: str = field(default="", metadata={
        "help": "folder of the client public key files (*.key) allowed to connect when curve_secret is set"})
    execution: str = field(default="sync", metadata={
        "help": "sync: an observation at a chunk boundary waits for the next plan; async: the next chunk is planned "
                "on a worker while the current one executes (chunked policies only; docs/operator.md)",
        "choices": EXECUTIONS, "group": "asynchronous execution"})
    merge: str = field(default="rtc", metadata={
        "help": "with --execution async, how a new chunk takes over: rtc (real-time chunking: prefix inputs for a "
                "policy with rtc_mode, switch at adoption), naive, blend, temporal (ACT ensembling), sync",
        "choices": MERGES, "group": "asynchronous execution"})
    execute_horizon: int = field(default=0, metadata={
        "help": "s: ticks between the starts of two plans (0: the bundle's chunk.execute)",
        "group": "asynchronous execution"})
    delay_quantile: float = field(default=0.9, metadata={
        "help": "the delay d assumed for a plan is this quantile of the recent plan delays, in ticks (rounded up)",
        "group": "asynchronous execution"})
    plan_delay: str = field(default="", metadata={
        "help": "simulated plan delay for evaluation: constant:50ms, jitter:50ms,10ms or spikes:50ms,p=0.05,x=10 "
                "(lockstep: in ticks, reproducible; realtime: the worker sleeps up to it); empty: none",
        "group": "asynchronous execution"})
    adaptive_horizon_vfd: float | None = field(default=None, metadata={
        "help": "when the executing chunk's vfd score is above this, the next plan starts after max(d, 1) ticks "
                "instead of s (default: off)", "group": "asynchronous execution"})
    record: str = field(default="", metadata={
        "help": "folder to record every robot's episodes into, one MCAP file per robot and episode with Foxglove's "
                "schemas (docs/recording.md; needs vigil[record]); empty: no recording", "group": "recording"})
    record_flush_s: float = field(default=1.0, metadata={
        "help": "a recording's open chunk is written to its file at least this often: a crash of the runtime loses "
                "at most this much of it", "group": "recording"})
    record_rotate_mb: float = field(default=256.0, metadata={
        "help": "an episode's recording goes on in a new file once its file has passed this many MB",
        "group": "recording"})
    transitions: str = field(default="", metadata={
        "help": "SQLite file to log robots' transitions into (robots that ask in hello report reward, terminated, "
                "truncated with each observation; vigil learn reads it); empty: off", "group": "learning"})
    transitions_queue: int = field(default=100_000, metadata={
        "help": "transitions waiting for the log's writer at most; beyond, one is dropped and counted (the loop "
                "never waits)", "group": "learning"})
    reward: str = field(default="", metadata={
        "help": "a learned reward model folder (vigil prefs train): score every finished episode and publish the "
                "predicted return and its std on the operator stream (event episode_scored); empty: off",
        "group": "recording"})
    foxglove_ws: int = field(default=0, metadata={
        "help": "also serve what is recorded live to Foxglove on ws://127.0.0.1:PORT (needs vigil[record]; works "
                "without --record); 0: off", "group": "recording"})

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
        if not 1 <= self.batch_plans <= 256:
            raise bad("batch_plans", "an integer 1..256")
        if not 1 <= self.pipeline <= 256:
            raise bad("pipeline", "an integer 1..256")
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
        if self.execution not in EXECUTIONS:
            raise bad("execution", f"one of {EXECUTIONS}")
        if self.merge not in MERGES:
            raise bad("merge", f"one of {MERGES}")
        if type(self.execute_horizon) is not int or self.execute_horizon < 0:
            raise bad("execute_horizon", "an integer >= 0 (0: the bundle's chunk.execute)")
        if not 0 < self.delay_quantile <= 1:
            raise bad("delay_quantile", "a number in (0, 1]")
        if self.adaptive_horizon_vfd is not None and not -math.inf < self.adaptive_horizon_vfd < math.inf:
            raise bad("adaptive_horizon_vfd", "a finite number (a VFD level), or absent")
        if self.plan_delay:
            from vigil.policies.delays import DelayModel

            try:
                DelayModel.parse(self.plan_delay)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if not 0 < self.record_flush_s < math.inf:
            raise bad("record_flush_s", "a finite number > 0 (seconds)")
        if not 0 < self.record_rotate_mb < math.inf:
            raise bad("record_rotate_mb", "a finite number > 0 (MB)")
        if type(self.foxglove_ws) is not int or not 0 <= self.foxglove_ws <= 65535:
            raise bad("foxglove_ws", "a tcp port 1..65535, or 0: off")
        if type(self.transitions_queue) is not int or self.transitions_queue < 1:
            raise bad("transitions_queue", "an integer >= 1")
        if self.reward and not os.path.isfile(os.path.join(self.reward, "reward.onnx")):
            raise bad("reward", "a reward model folder with reward.onnx and reward.json (vigil prefs train)")
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
    table = read_toml(path).get("serve", {}) if path is not None else None
    return build_config(ServeConfig, overrides, table, "serve")


def check_table(cls: type, table: Mapping[str, Any], section: str) -> dict[str, Any]:
    """Values of a TOML table for the frozen dataclass `cls`: every key must be a field, and its value of
    the field's type (ints are accepted for floats, bools never for numbers)."""
    known = {f.name: f for f in fields(cls)}
    out = {}
    for key, value in table.items():
        f = known.get(key)
        if f is None:
            raise ConfigError(f"config key '{section}.{key}' is unknown; expected one of {sorted(known)}")
        expected = _value_type(cls, f)
        ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if expected is tuple and isinstance(value, list):
            value, ok = tuple(value), True
        if not ok:
            raise ConfigError(f"config key '{section}.{key}' must be a {expected.__name__}, got {value!r}")
        out[key] = value
    return out


def describe() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every option, for --help and docs."""
    return [(f.name, f.default, f.metadata["help"]) for f in fields(ServeConfig)]


# -- the same pattern for every command: flags from fields, one error style -----------------------------


def check_fields(config: Any, rules: Iterable[tuple[str, bool, str]], section: str = "") -> None:
    """The one error style of every config's `__post_init__`: the first rule (key, holds, expected) that
    does not hold raises ConfigError "config key 'key' must be <expected>, got <value>"."""
    for key, holds, expected in rules:
        if not holds:
            name = f"{section}.{key}" if section else key
            raise ConfigError(f"config key {name!r} must be {expected}, got {getattr(config, key)!r}")


def flag_fields(cls: type) -> list[Field]:
    """The fields of the dataclass `cls` that are command-line flags: those with a help text. Others are
    set by the command itself (a positional argument, loaded keys)."""
    return [f for f in fields(cls) if "help" in f.metadata]


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per flag field of `cls` to `parser`.

    The flag is --field-name, or metadata "flag" (plus "aliases"); its type is the field's (X, X | None,
    tuple[X, ...] for one or more values); metadata "choices", "metavar" and "group" (the title of an
    argument group) pass through; a field without a default is a required flag. A bool field is a switch to
    the opposite of its default (--no-field-name when the default is True). Every flag defaults to None, so
    that `config_from_args` tells a given flag from an absent one and the TOML table and the field's
    default show through; the help states the field's default instead."""
    hints = get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in flag_fields(cls):
        meta = f.metadata
        title = meta.get("group")
        if title is not None and title not in groups:
            groups[title] = parser.add_argument_group(title)
        target = parser if title is None else groups[title]
        kind, many = _flag_type(hints[f.name])
        required = f.default is MISSING and f.default_factory is MISSING
        switch_off = kind is bool and f.default is True
        stated = not (required or f.default is None or switch_off or "(default:" in meta["help"])
        text = meta["help"] + (f" (default: {f.default!r})".replace("%", "%%") if stated else "")
        name = meta.get("flag", ("--no-" if switch_off else "--") + f.name.replace("_", "-"))
        names = [name, *meta.get("aliases", ())]
        if kind is bool:
            target.add_argument(*names, dest=f.name, action="store_const", const=not f.default, default=None,
                                help=text)
        else:
            metavar = meta.get("metavar")
            if metavar is None and "flag" in meta and "choices" not in meta:  # named as the flag, not the field
                metavar = name.lstrip("-").replace("-", "_").upper()
            target.add_argument(*names, dest=f.name, type=kind, nargs="+" if many else None, default=None,
                                choices=meta.get("choices"), required=required, metavar=metavar, help=text)


def flag_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The flags of `cls` given on the command line (absent ones are None and left out)."""
    values = {}
    for f in flag_fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return values


def build_config(cls: type[T], values: Mapping[str, Any], table: Mapping[str, Any] | None = None,
                 section: str = "") -> T:
    """`cls` from its TOML table (if any; checked by check_table), overridden by the non-None `values`;
    the dataclass validates itself."""
    merged = check_table(cls, table, section) if table else {}
    merged.update({k: v for k, v in values.items() if v is not None})
    return cls(**merged)


def config_from_args(cls: type[T], args: argparse.Namespace, table: Mapping[str, Any] | None = None,
                     section: str = "", **fixed: Any) -> T:
    """`cls` from the flags `add_flags` added (over its TOML table, if any) and `fixed`: the fields that are
    no flags, such as a positional argument."""
    return build_config(cls, {**flag_values(cls, args), **fixed}, table, section)


def _flag_type(hint: Any) -> tuple[type, bool]:
    """(value type, many) of a field annotation: X, X | None, tuple[X, ...]."""
    if get_origin(hint) in (Union, types.UnionType):
        [inner] = [a for a in get_args(hint) if a is not type(None)]
        return _flag_type(inner)
    if get_origin(hint) is tuple:
        return get_args(hint)[0], True
    return hint, False


def _value_type(cls: type, f: Field) -> type:
    """The type a TOML value of field `f` must have: the default's, or the annotation's without None."""
    if f.default is not MISSING and f.default is not None:
        return type(f.default)
    kind, many = _flag_type(get_type_hints(cls)[f.name])
    return tuple if many else kind
