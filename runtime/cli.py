"""`vigil` command line: the entry point, and the onboard commands keys | serve | alerts | requests | swap.

`main()` knows every command's name and one-line help (COMMANDS) without importing its code, and imports
only the module that owns the command asked for: sim/cli.py (sim, expert, demo) or training/cli.py
(bundle, demos, train, calibrate) add their parsers only then, so the onboard commands never load the
simulator, the training code or torch. Every command's flags come from a frozen config dataclass
(runtime/config.py: add_flags, config_from_args); a config error prints `vigil <command>: <what>` and exits 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import zmq

# cmd_serve and cmd_swap call these by their old private names
from vigil.runtime.cliargs import Command, key_args
from vigil.runtime.cliargs import client_keys as _client_keys
from vigil.runtime.cliargs import stop_on_signals as _stop_on_signals
from vigil.runtime.config import (
    ConfigError,
    ServeConfig,
    add_flags,
    check_fields,
    config_from_args,
    describe,
    load_config,
)

ONBOARD = "vigil.runtime.cli"

# command -> (module that owns it, one-line help), in the order `vigil --help` lists them
COMMANDS: dict[str, tuple[str, str]] = {
    "keys": (ONBOARD, "create a CURVE key pair for authentication (runtime or client)"),
    "serve": (ONBOARD, "run the onboard runtime: robot link, policy, monitors, operator stream"),
    "sim": ("vigil.sim.cli", "play the robot: a simulated system connected to a runtime"),
    "alerts": (ONBOARD, "watch the operator stream live, or replay alerts from the store"),
    "requests": (ONBOARD, "list the data requests in a runtime's store"),
    "expert": ("vigil.sim.cli", "answer data requests with scripted-expert demonstrations (simulation)"),
    "swap": (ONBOARD, "hot-swap the bundle a running runtime serves"),
    "console": ("vigil.console.cli", "the operator's web page: robots, VFD traces, alerts, requests, swaps"),
    "demo": ("vigil.sim.cli", "the main job: a flow ensemble served, VFD alerts, data requests, expert, SAVE, swap"),
    "demo-lqr": ("vigil.sim.cli", "runtime + simulator + alert view on aircraft pitch, with a link outage half way"),
    "bundle": ("vigil.training.cli", "write a bundle that needs no training (optimal LQR, instruction encoder)"),
    "demos": ("vigil.training.cli", "record and list demonstration datasets (Meta-World scripted experts)"),
    "train": ("vigil.training.cli", "train a policy from demonstrations (needs vigil[train])"),
    "calibrate": ("vigil.training.cli", "calibrate a flow_ensemble bundle's VFD monitor on nominal rollouts"),
    "learn": ("vigil.training.cli", "the off-board learner: trains on a runtime's transitions, hot-swaps its policy"),
    "eval": ("vigil.sim.cli", "evaluate a bundle on tasks, conditions and seeds, serially or on Ray (a fleet)"),
    "prefs": ("vigil.prefs.cli", "operator preference queries: list, show, answer (and learn a reward from them)"),
}
EXTRAS = {"vigil.sim.cli": "vigil[sim]", "vigil.training.cli": "vigil[train]",  # what their modules need
          "vigil.console.cli": "vigil[console]"}


# -- keys ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeysConfig:
    name: str  # the positional NAME: a positional argument, not a flag (written by hand in _keys_parser)
    dir: str = field(default="keys", metadata={"help": "folder to write the pair into (created)"})

    def __post_init__(self) -> None:
        check_fields(self, [("dir", bool(self.dir), "a folder")])


def _keys_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Write NAME.key (the public key: give it to the other side) and NAME.key_secret (the secret "
                     "key: keep it on this computer, mode 0600) into --dir. The runtime takes its secret file with "
                     "--curve-secret and a folder of allowed client public files with --curve-allow; a client "
                     "takes its secret file with --key and the runtime's public file with --server-key.")
    p.add_argument("name", help="key name, e.g. runtime, robot-1, operator-alice")
    add_flags(p, KeysConfig)


def cmd_keys(args: argparse.Namespace) -> int:
    from vigil.runtime.auth import KeyFileError, create_keys

    config = config_from_args(KeysConfig, args, name=args.name)
    try:
        public, secret = create_keys(config.dir, config.name)
    except KeyFileError as exc:
        print(f"vigil keys: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"public": str(public), "secret": str(secret)}), flush=True)
    return 0


# -- serve --------------------------------------------------------------------------------------------------


def _serve_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Serve a policy bundle to robots over ZeroMQ. Options override the [serve] table of --config; "
                     "every option is listed below with its default.")
    # --config and --log-level by hand: the file the fields are read from, and a logging setting, not fields
    p.add_argument("--config", help="TOML file with a [serve] table (keys as the options below, with underscores)")
    add_flags(p, ServeConfig)
    p.add_argument("--log-level", default="INFO", help="logging level: DEBUG, INFO, WARNING, ERROR (default: INFO)")


def cmd_serve(args: argparse.Namespace) -> int:
    from vigil.runtime.launch import ready_line, stopped_line
    from vigil.runtime.server import Runtime

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    overrides = {key: getattr(args, key) for key, _, _ in describe()}
    try:
        config = load_config(args.config, **overrides)
        if not config.bundle:
            raise ConfigError("config key 'bundle' must name a policy bundle folder (--bundle DIR)")
        runtime = Runtime(config)
    except (ConfigError, ValueError, OSError, zmq.ZMQError) as exc:
        print(f"vigil serve: {exc}", file=sys.stderr)
        return 2
    for ep in config.exposed():
        print(f"vigil serve: WARNING: {ep} is reachable from other computers WITHOUT authentication (--allow-remote); "
              "anyone on the network can drive or watch this robot. Use --curve-secret/--curve-allow "
              "(`vigil keys`).", file=sys.stderr, flush=True)
    stop = _stop_on_signals()
    print(ready_line(policy=runtime.manifest.policy_id, **runtime.endpoints(), store=config.store), flush=True)
    counters = runtime.run(should_stop=lambda: bool(stop))
    print(stopped_line(stopped_by=signal.Signals(stop[0]).name if stop else None, **counters), flush=True)
    return 0


# -- alerts -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlertsConfig:
    connect: str = field(default="tcp://127.0.0.1:5556", metadata={"help": "runtime operator-stream endpoint"})
    store: str = field(default="vigil-alerts.db", metadata={"help": "the runtime's alert store (SQLite file)"})
    since: int | None = field(default=None, metadata={"help": "replay stored alerts with id greater than this"})
    follow: bool = field(default=False, metadata={
        "help": "with --since: keep following the live stream afterwards"})
    telemetry: bool = field(default=False, metadata={"help": "also print telemetry messages"})
    json: bool = field(default=False, metadata={"help": "one JSON object per line instead of text"})
    timeout: float = field(default=0.0, metadata={"help": "exit after this many seconds of silence (0: never)"})

    def __post_init__(self) -> None:
        check_fields(self, [("connect", "://" in self.connect, "a ZeroMQ endpoint such as tcp://127.0.0.1:5556"),
                            ("since", self.since is None or self.since >= 0, "an alert id >= 0"),
                            ("timeout", 0 <= self.timeout < math.inf, "a finite number >= 0 (seconds; 0: never)")])


def _alerts_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Without --since: print alerts as the runtime publishes them (with --store, gaps in alert ids "
                     "are filled from the store). With --since N: print every stored alert with id > N, then exit "
                     "(or keep following with --follow).")
    add_flags(p, AlertsConfig)
    key_args(p)


def cmd_alerts(args: argparse.Namespace) -> int:
    from vigil.runtime.alerts_view import AlertView

    config = config_from_args(AlertsConfig, args)
    view = AlertView(config.store, as_json=config.json, telemetry=config.telemetry,
                     keys=_client_keys(args, "alerts"))
    if config.since is not None:
        try:
            view.replay(config.since)
        except FileNotFoundError as exc:
            print(f"vigil alerts: {exc}", file=sys.stderr)
            return 1
        if not config.follow:
            return 0
    stop = _stop_on_signals()
    view.follow(config.connect, timeout_s=config.timeout or None, should_stop=lambda: bool(stop))
    if view.missed:
        print(f"vigil alerts: {view.missed} alert(s) dropped on the stream, {view.filled} of them read back from "
              f"{config.store}", file=sys.stderr, flush=True)
    return 0


# -- requests -----------------------------------------------------------------------------------------------

REQUEST_STATES = ("open", "claimed", "expired", "fulfilled", "rejected")


@dataclass(frozen=True)
class RequestsConfig:
    store: str = field(default="vigil-alerts.db", metadata={"help": "the runtime's store (SQLite file)"})
    status: str | None = field(default=None, metadata={"help": "only requests in this state",
                                                        "choices": REQUEST_STATES})
    task: str | None = field(default=None, metadata={"help": "only requests for this task"})
    since: int = field(default=0, metadata={"help": "only requests with id greater than this"})
    json: bool = field(default=False, metadata={"help": "one JSON object per line instead of text"})

    def __post_init__(self) -> None:
        check_fields(self, [("status", self.status in (None, *REQUEST_STATES), f"one of {REQUEST_STATES}"),
                            ("since", self.since >= 0, "a request id >= 0")])


def _requests_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("List SAVE data requests (filed by the runtime when the VFD monitor alerts) from the store, "
                     "oldest first, with their lifecycle: open, claimed (expired: the claim's lease is over), "
                     "fulfilled (with the demonstration), rejected (with the reason).")
    add_flags(p, RequestsConfig)


def cmd_requests(args: argparse.Namespace) -> int:
    from vigil.runtime.requests import RequestStore

    config = config_from_args(RequestsConfig, args)
    try:
        store = RequestStore(config.store, readonly=True)
    except FileNotFoundError as exc:
        print(f"vigil requests: {exc}", file=sys.stderr)
        return 1
    try:
        records = store.list(status=config.status, task=config.task, since=config.since)
    finally:
        store.close()
    for r in records:
        if config.json:
            print(json.dumps(r.to_json()), flush=True)
            continue
        stamp = time.strftime("%m-%d %H:%M:%S", time.localtime(r.t_ns / 1e9))
        state = r.state()
        detail = {"claimed": f"by {r.claimed_by}", "expired": f"was {r.claimed_by}",
                  "fulfilled": f"demo {r.demo}", "rejected": str(r.reason)}.get(state, "")
        print(f"#{r.id:<5} {stamp} {state:<9} {r.task or '-':<24} {r.robot:<10} step {r.step:<4} "
              f"score {r.score:.4g} > {r.threshold:.4g} {detail}".rstrip(), flush=True)
    return 0


# -- swap ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwapConfig:
    bundle: str = field(metadata={"help": "bundle folder, as seen from the runtime's computer"})
    connect: str = field(default="tcp://127.0.0.1:5557", metadata={"help": "the runtime's control endpoint"})
    timeout: float = field(default=120.0, metadata={"help": "seconds to wait for the answer"})

    def __post_init__(self) -> None:
        check_fields(self, [("bundle", bool(self.bundle), "a bundle folder"),
                            ("connect", "://" in self.connect, "a ZeroMQ endpoint such as tcp://127.0.0.1:5557"),
                            ("timeout", 0 < self.timeout < math.inf, "a finite number > 0 (seconds)")])


def _swap_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Ask a runtime (started with --control-endpoint) to load another bundle in the background and "
                     "serve it from every robot's next plan, without a restart and without a missed tick. A bundle "
                     "whose observations, action shape, control rate or safe action differ is refused and the old "
                     "one keeps serving. Prints the runtime's answer as JSON; exit status 0 swapped, 1 refused, 2 "
                     "no answer.")
    add_flags(p, SwapConfig)
    key_args(p)


def _swap(args: argparse.Namespace) -> int:
    """Validate the flags as a SwapConfig (exit 2 on a bad one), then swap. cmd_swap reads its flags from
    `args`: it gets the config's values, the defaults of absent flags included."""
    config = config_from_args(SwapConfig, args)
    return cmd_swap(argparse.Namespace(**{**vars(args), **asdict(config)}))


def cmd_swap(args: argparse.Namespace) -> int:
    from vigil.runtime.client import ControlLink, LinkError

    link = ControlLink(args.connect, keys=_client_keys(args, "swap"))
    try:
        answer = link.swap(Path(args.bundle).resolve(), args.timeout)
    except LinkError:
        print(f"vigil swap: no answer from {args.connect} within {args.timeout} s (is the runtime started with "
              "--control-endpoint?)", file=sys.stderr)
        return 2
    print(json.dumps(answer), flush=True)
    return 0 if answer["kind"] == "swap" and answer.get("ok") else 1


# -- the entry point ----------------------------------------------------------------------------------------

PARSERS: dict[str, Command] = {
    "keys": (_keys_parser, cmd_keys),
    "serve": (_serve_parser, cmd_serve),
    "alerts": (_alerts_parser, cmd_alerts),
    "requests": (_requests_parser, cmd_requests),
    "swap": (_swap_parser, _swap),
}


def _parsers(module: str) -> dict[str, Command]:
    """The command table of `module`. This module's own is not imported again: under `python -m
    vigil.runtime.cli` it runs as __main__, and an import would load a second copy."""
    return PARSERS if module == ONBOARD else importlib.import_module(module).PARSERS


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="vigil", description="Host learned robot controllers and watch them.")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)  # `vigil` itself has no option but --help
    for name, (module, text) in COMMANDS.items():
        p = sub.add_parser(name, help=text)
        if name == chosen:  # only the command asked for gets its parser, and only its module is imported
            try:
                add_arguments, run = _parsers(module)[name]
            except ModuleNotFoundError as exc:
                if (exc.name or "vigil").startswith("vigil"):
                    raise  # a module of vigil itself: a bug, not a missing extra
                print(f"vigil {name}: needs {EXTRAS.get(module, 'an optional dependency')} ({exc})",
                      file=sys.stderr)
                return 2
            add_arguments(p)
            p.set_defaults(run_command=run)  # not `run`: a flag may be called so (train save-round --run)
    args = parser.parse_args(argv)
    try:
        return args.run_command(args)
    except ConfigError as exc:
        print(f"vigil {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
