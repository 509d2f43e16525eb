"""`vigil console` (vigil[console]): the operator's web page next to the runtime.

runtime/cli.py's main() imports this module only when `console` is asked for, and calls PARSERS["console"].
On start it prints one JSON line, like `vigil serve`:

    {"vigil": "console", "url": "http://127.0.0.1:8765/?token=...", "bind": "127.0.0.1:8765", ...}

The URL carries the token: open it in the browser on this computer (docs/console.md, security).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import socket
import sys
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# at import, not in cmd_console: without vigil[console], main() then says which extra `vigil console` needs
import uvicorn

from vigil.console.app import Settings, build_app
from vigil.console.auth import Guard, TokenError, is_loopback_host, load_token, new_token
from vigil.console.feed import Feed
from vigil.runtime.cliargs import Command, client_keys, key_args, stop_on_signals
from vigil.runtime.config import add_flags, check_fields, config_from_args


def split_bind(bind: str) -> tuple[str, int] | None:
    """("127.0.0.1", 8765) from "127.0.0.1:8765" ("[::1]:8765" for IPv6); None if it is not host:port."""
    try:
        parts = urlsplit(f"//{bind}")
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or port is None or parts.path or parts.query:
        return None
    return parts.hostname, port


@dataclass(frozen=True)
class ConsoleConfig:
    connect: str = field(default="tcp://127.0.0.1:5556", metadata={"help": "the runtime's operator-stream endpoint"})
    store: str = field(default="vigil-alerts.db", metadata={"help": "the runtime's store (SQLite file)"})
    control: str = field(default="", metadata={
        "help": "the runtime's control endpoint, for swapping bundles from the page (empty: no swap action)"})
    bind: str = field(default="127.0.0.1:8765", metadata={
        "help": "HOST:PORT the web page is served on (port 0: any free port). Beyond loopback every page needs "
                "the token too (no TLS: prefer an SSH tunnel)"})
    token_file: str = field(default="", metadata={
        "help": "file holding the token actions need (first line, >= 16 characters, mode 0600); empty: a new "
                "token, printed in the console's URL"})
    lease_s: float = field(default=1800.0, metadata={
        "help": "lease of a claim taken from the page (a claim lapses after this)"})
    poll_s: float = field(default=1.0, metadata={"help": "how often the store is read"})
    silence_s: float = field(default=3.0, metadata={
        "help": "the page warns when the runtime has not been heard from for longer than this"})
    swap_timeout: float = field(default=120.0, metadata={"help": "seconds to wait for the answer to a swap"})

    def __post_init__(self) -> None:
        check_fields(self, [
            ("connect", "://" in self.connect, "a ZeroMQ endpoint such as tcp://127.0.0.1:5556"),
            ("store", bool(self.store), "a SQLite file"),
            ("control", self.control == "" or "://" in self.control,
             "a ZeroMQ endpoint such as tcp://127.0.0.1:5557, or empty"),
            ("bind", split_bind(self.bind) is not None, "HOST:PORT such as 127.0.0.1:8765"),
            ("lease_s", 0 < self.lease_s < math.inf, "a finite number > 0 (seconds)"),
            ("poll_s", 0 < self.poll_s <= 60, "a number of seconds in (0, 60]"),
            ("silence_s", 0 < self.silence_s < math.inf, "a finite number > 0 (seconds)"),
            ("swap_timeout", 0 < self.swap_timeout < math.inf, "a finite number > 0 (seconds)")])


def _console_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Serve the operator's web page: every robot's state, its VFD trace against the thresholds, "
                     "alerts (live, gaps filled from the store), the data-request queue with claim / answer / reject "
                     "/ release, preference queries (two attempts side by side, answered once), hot swaps with the "
                     "serving bundle's provenance and a swap action (--control), IR-LQR gain swaps. Loopback by "
                     "default; actions always need the token printed in the URL.")
    add_flags(p, ConsoleConfig)
    key_args(p)


def cmd_console(args: argparse.Namespace) -> int:
    config = config_from_args(ConsoleConfig, args)
    keys = client_keys(args, "console")
    try:
        token = load_token(config.token_file) if config.token_file else new_token()
    except TokenError as exc:
        print(f"vigil console: {exc}", file=sys.stderr)
        return 2
    host, port = split_bind(config.bind)
    loopback = is_loopback_host(host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        print(f"vigil console: cannot listen on {config.bind}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    sock.listen(128)
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    feed = Feed(config.connect, config.store, keys, config.poll_s, config.silence_s)
    app = build_app(feed, Guard(token, loopback), Settings(config.store, config.control, keys, config.lease_s,
                                                           config.swap_timeout))
    if not loopback:
        print(f"vigil console: WARNING: listening on {shown}:{port}, beyond loopback: every page needs the token, "
              "and the traffic is not encrypted (prefer `ssh -L 8765:127.0.0.1:8765` to a loopback console)",
              file=sys.stderr, flush=True)
    print(json.dumps({"vigil": "console", "url": f"http://{shown}:{port}/?token={token}", "bind": f"{shown}:{port}",
                      "connect": config.connect, "store": config.store, "control": config.control}), flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                           ws_max_size=1 << 16, timeout_graceful_shutdown=2))
    stop = stop_on_signals()
    server.capture_signals = contextlib.nullcontext  # ours (stop_on_signals): SIGINT/SIGTERM end the server below

    async def main() -> None:
        async def watch() -> None:
            while not stop:
                await asyncio.sleep(0.1)
            server.should_exit = True

        watcher = asyncio.create_task(watch())
        await server.serve(sockets=[sock])
        watcher.cancel()

    asyncio.run(main())
    print(json.dumps({"vigil": "console stopped"}), flush=True)
    return 0


PARSERS: dict[str, Command] = {"console": (_console_parser, cmd_console)}
