"""Start `vigil serve` as a child process, wait until it is ready, stop it: the one way tests, benches, tools
and the demo run a runtime.

`vigil serve` binds its endpoints (port 0 = a free port chosen by the kernel, so two runtimes never race for
one), then prints one JSON line on stdout, before it serves:

    {"vigil": "ready", "pid": 1234, "policy": "...", "robot_endpoint": "tcp://127.0.0.1:41877",
     "operator_endpoint": "tcp://127.0.0.1:39211", "control_endpoint": "", "store": "vigil-alerts.db"}

and when it stops (SIGINT or SIGTERM) one more, with its counters: `{"vigil": "stopped", "stopped_by":
"SIGINT", "received": ..., ...}`. `start_serve` starts the process with stdout and stderr in files of a
work folder (so a chatty runtime never blocks on a full pipe) and waits for the ready line; `serving` is
the context manager that also stops it.

    with serving("bundles/pitch") as served:
        link = RobotLink(served.robot_endpoint, "arm-1")
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOCAL_TCP = "tcp://127.0.0.1:0"  # loopback, a free port chosen at bind time


class LaunchError(RuntimeError):
    """The runtime exited, or printed no ready line in time; the message carries its output."""


@dataclass
class Served:
    """A running `vigil serve` child process and where to reach it (its endpoints as bound)."""

    proc: subprocess.Popen
    workdir: Path
    bundle: Path
    store: Path
    robot_endpoint: str = ""
    operator_endpoint: str = ""
    control_endpoint: str = ""
    policy: str = ""
    ready: dict[str, Any] = field(default_factory=dict)
    exit_counters: dict[str, Any] | None = None

    @property
    def out(self) -> Path:
        return self.workdir / "serve.out"

    @property
    def err(self) -> Path:
        return self.workdir / "serve.err"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 20) -> dict[str, Any]:
        """SIGINT, wait, and return the counters of the runtime's `stopped` line. Raises LaunchError if it
        does not stop in time (it is then killed) or exits with an error."""
        if self.exit_counters is not None:
            return self.exit_counters
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise LaunchError(f"vigil serve did not stop on SIGINT within {timeout_s} s\n{self.log()}") from None
        if rc != 0:
            raise LaunchError(f"vigil serve exited {rc}\n{self.log()}")
        stopped = [line for line in _json_lines(self.out) if line.get("vigil") == "stopped"]
        if not stopped:
            raise LaunchError(f"vigil serve printed no 'stopped' line\n{self.log()}")
        self.exit_counters = {k: v for k, v in stopped[-1].items() if k != "vigil"}
        return self.exit_counters

    def kill(self) -> None:
        """SIGKILL (a crash, as far as the robots can tell) and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def log(self) -> str:
        out = self.out.read_text(errors="replace") if self.out.exists() else ""
        err = self.err.read_text(errors="replace") if self.err.exists() else ""
        return f"--- serve stdout ---\n{out}\n--- serve stderr ---\n{err[-5000:]}"


def serve_command(bundle: str | os.PathLike, python: str = sys.executable, **flags: Any) -> list[str]:
    """The `vigil serve` command line for `flags` (underscores: `link_timeout_s=0.2` becomes
    `--link-timeout-s 0.2`; True is a bare switch; None and False are left out)."""
    args = [python, "-m", "vigil.runtime.cli", "serve", "--bundle", str(bundle)]
    for key, value in flags.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


def start_serve(bundle: str | os.PathLike, workdir: str | os.PathLike, *, timeout_s: float = 60,
                python: str = sys.executable, env: dict[str, str] | None = None, **flags: Any) -> Served:
    """Start `vigil serve --bundle BUNDLE` with `flags` and return once it printed its ready line.

    Unless given, the robot link and the operator stream bind free loopback tcp ports and the store is
    `workdir/alerts.db`. stdout and stderr go to `workdir/serve.out` and `workdir/serve.err`."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    flags.setdefault("robot_endpoint", LOCAL_TCP)
    flags.setdefault("operator_endpoint", LOCAL_TCP)
    flags.setdefault("store", str(workdir / "alerts.db"))
    cmd = serve_command(bundle, python, **flags)
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(workdir / "serve.out", "w") as out, open(workdir / "serve.err", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=child_env, cwd=workdir)
    served = Served(proc, workdir, Path(bundle), Path(flags["store"]))
    try:
        ready = wait_ready(served, timeout_s)
    except BaseException:
        served.kill()
        raise
    served.ready = ready
    served.robot_endpoint = ready["robot_endpoint"]
    served.operator_endpoint = ready["operator_endpoint"]
    served.control_endpoint = ready.get("control_endpoint", "")
    served.policy = ready.get("policy", "")
    return served


def wait_ready(served: Served, timeout_s: float) -> dict[str, Any]:
    """The runtime's ready line, once it is printed; LaunchError if the process exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        for line in _json_lines(served.out):
            if line.get("vigil") == "ready":
                return line
        if served.proc.poll() is not None:
            raise LaunchError(f"vigil serve exited {served.proc.returncode} before it was ready\n{served.log()}")
        if time.monotonic() > deadline:
            raise LaunchError(f"vigil serve printed no ready line within {timeout_s} s\n{served.log()}")
        time.sleep(0.01)


@contextmanager
def serving(bundle: str | os.PathLike, workdir: str | os.PathLike | None = None, **flags: Any) -> Iterator[Served]:
    """`start_serve` as a context manager: the runtime is stopped (SIGINT, then SIGKILL if it hangs) on exit.
    Without `workdir`, a temporary folder holds its output and store for the duration."""
    with tempfile.TemporaryDirectory(prefix="vigil-serve-") if workdir is None else nullcontext(workdir) as folder:
        served = start_serve(bundle, folder, **flags)
        try:
            yield served
        finally:
            if served.alive():
                try:
                    served.stop(timeout_s=10)
                except LaunchError:
                    served.kill()


def ready_line(**fields: Any) -> str:
    """What `vigil serve` prints once its endpoints are bound."""
    return json.dumps({"vigil": "ready", "pid": os.getpid(), **fields})


def stopped_line(**fields: Any) -> str:
    """What `vigil serve` prints when it has stopped: why, and its counters."""
    return json.dumps({"vigil": "stopped", **fields})


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """The complete JSON-object lines of a file that may still be growing."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    lines = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n") or not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            lines.append(obj)
    return lines
