"""Pieces the command-line modules of every package share (runtime/cli.py, sim/cli.py, training/cli.py).

Onboard-only imports: sim/ and training/ may import this module, never the other way round.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vigil.runtime.auth import ClientKeys

# what a command module offers for each of its commands (its PARSERS table, which runtime/cli.py's main()
# reads): fill in the command's parser, then run the parsed arguments
Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]


def stop_on_signals() -> list[int]:
    """SIGINT and SIGTERM append to the returned list; loops poll it and shut down cleanly."""
    stop: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    return stop


def key_args(p: argparse.ArgumentParser) -> None:
    """--key/--server-key: a client's CURVE keys for a runtime with authentication on (runtime/auth.py).
    Hand-written, not config fields: they go together and are loaded into ClientKeys, never kept as paths."""
    g = p.add_argument_group("authentication (a runtime started with --curve-secret/--curve-allow)")
    g.add_argument("--key", help="this client's secret key file (NAME.key_secret from `vigil keys`; its NAME.key "
                                 "must be in the runtime's allow-list)")
    g.add_argument("--server-key", help="the runtime's public key file (RUNTIME.key)")


def client_keys(args: argparse.Namespace, command: str) -> ClientKeys | None:
    """ClientKeys from --key/--server-key, None without them; exits with a clear message on a bad pair."""
    from vigil.runtime.auth import ClientKeys, KeyFileError

    if not args.key and not args.server_key:
        return None
    if not (args.key and args.server_key):
        print(f"vigil {command}: --key and --server-key go together (this client's secret key file and the "
              "runtime's public key file)", file=sys.stderr)
        raise SystemExit(2)
    try:
        return ClientKeys.load(args.key, args.server_key)
    except KeyFileError as exc:
        print(f"vigil {command}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
