"""What every benchmark shares: where things go, what machine and commit a number came from, the command that
produced it, raw results as JSON, figures, and the generated sections of BENCHMARKS.md and RELIABILITY.md.

A bench measures into a raw JSON file (`write_raw`), renders its section from that file alone, and writes the
section between its markers (`write_benchmarks`), so a report can be rewritten without measuring again.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"  # raw results (git-ignored)
BENCH_RUNS = ROOT / "bench-runs"  # long experiments' work folders (git-ignored)
FIGURES = ROOT / "docs" / "figures"
BENCHMARKS = ROOT / "BENCHMARKS.md"
RELIABILITY = ROOT / "RELIABILITY.md"
BENCHMARKS_INTRO = ("# Benchmarks\n\nMeasured, not estimated: each section below is written by the script it names "
                    "and rewritten whenever that script runs.\n\n")


# ------------------------------------------------------------------------------------------------------
# Where a number came from
# ------------------------------------------------------------------------------------------------------

def utc_now() -> str:
    """The time a run started, as every section prints it."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def git_state() -> str:
    """The short commit, and whether the code under test had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "runtime", "policies", "monitors", "wire"],
                               capture_output=True, text=True, cwd=ROOT, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" (runtime/policies/monitors/wire with uncommitted changes)" if dirty else "")


def _lscpu(key: str) -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    m = re.search(rf"^{re.escape(key)}:\s*(.+)$", out, re.M)
    return m.group(1).strip() if m else ""


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def machine(openpi_versions: dict[str, str] | None = None) -> dict[str, str]:
    """CPU, cores, memory, OS and the runtime's library versions: what a latency depends on. `openpi_versions`
    describes the second environment bench.latency runs its openpi peer in, when it ran one."""
    import msgpack
    import numpy as np
    import onnxruntime
    import zmq

    cpu = _lscpu("Model name")
    if not cpu:
        m = re.search(r"^model name\s*:\s*(.+)$", _read("/proc/cpuinfo"), re.M)
        cpu = m.group(1).strip() if m else platform.processor() or "unknown"
    family, model, hyper = _lscpu("CPU family"), _lscpu("Model"), _lscpu("Hypervisor vendor")
    cpu += (f" (family {family}, model {model})" if family else "") + (f", {hyper} guest" if hyper else "")
    halt = re.search(r"guest_halt_poll_ns=(\d+)", _read("/proc/cmdline"))
    mem = re.search(r"MemTotal:\s*(\d+) kB", _read("/proc/meminfo"))
    pretty = re.search(r'^PRETTY_NAME="?([^"\n]+)', _read("/etc/os-release"), re.M)
    os_name = pretty.group(1) if pretty else platform.system()
    info = {"CPU": cpu, "cores": str(os.cpu_count()),
            "memory": f"{int(mem.group(1)) / 2**20:.1f} GiB" if mem else "unknown",
            "OS": f"{os_name}, Linux {platform.release()}"
                  + (f" (guest halt-polling {halt.group(1)} ns: an idle vCPU halts at once)" if halt else ""),
            "vigil environment": f"Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, "
                                 f"pyzmq {zmq.__version__} (libzmq {zmq.zmq_version()}), numpy {np.__version__}, "
                                 f"msgpack {msgpack.version and '.'.join(map(str, msgpack.version))}"}
    if openpi_versions:
        info["openpi environment"] = ", ".join(f"{k} {v}" for k, v in openpi_versions.items())
    return info


def _main_module() -> str | None:
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return spec.name if spec is not None else None


def command_line(argv: Sequence[str] | None = None, *, env: str = "") -> str:
    """The command that reproduces this run, from the repository root: `[env] .venv/bin/python -m bench.NAME
    ARGS` (the script's path when it was not started with -m)."""
    def rel(p: str) -> str:
        try:
            return os.path.relpath(p, ROOT) if os.path.isabs(p) else p
        except ValueError:
            return p

    args = list(sys.argv[1:] if argv is None else argv)
    module = _main_module()
    target = ["-m", module] if module else [rel(str(Path(sys.argv[0]).resolve()))]
    return " ".join(filter(None, [env, shlex.join([rel(sys.executable), *target, *args])]))


def run_info(argv: Sequence[str] | None = None, *, env: str = "", started: str | None = None) -> dict[str, Any]:
    """What a raw result records about its run: when, which commit, which command, which machine."""
    return {"started": started or utc_now(), "git": git_state(), "command": command_line(argv, env=env),
            "machine": machine()}


def written_by(run: dict[str, Any], *, seconds: float | None = None) -> str:
    """The first line of a generated section: script, date, duration, commit, machine."""
    took = "" if seconds is None else (f" in {seconds:.0f} s" if seconds < 600 else f" in {seconds / 60:.0f} min")
    m = run.get("machine", {})
    return (f"Written by `{run['command']}` on {run['started']}{took}; commit {run['git']}; "
            f"{m.get('CPU', '?')}, {m.get('cores', '?')} cores.")


def free_port() -> int:
    """A loopback tcp port free right now, for the benches that bind their own sockets (a runtime started
    through vigil.runtime.launch binds port 0 itself and needs none). Cheap to import, unlike
    vigil.sim.demo, which every latency child process paid for."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------------
# Raw results
# ------------------------------------------------------------------------------------------------------

def jsonable(x: Any) -> Any:
    """Plain JSON types for numpy values, tuples and paths; non-finite floats become None (JSON has none)."""
    import numpy as np

    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    return x


def write_raw(path: Path, data: dict[str, Any]) -> Path:
    """Write a bench's raw results; its report is rendered from this file alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(data), indent=1) + "\n")
    return path


def read_raw(path: Path) -> dict[str, Any]:
    """A bench's raw results; a clear exit when there are none (raw results are not in the repository)."""
    if not path.exists():
        raise SystemExit(f"no raw results at {path}: run the benchmark without --report-only first")
    return json.loads(path.read_text())


def raw_copy(data: dict[str, Any]) -> dict[str, Any]:
    """`data` as it will read back from its raw file, so that a fresh run renders exactly what --report-only
    renders later."""
    return json.loads(json.dumps(jsonable(data)))


def as_numbers(x: Any) -> Any:
    """Raw results read back, with every None (a non-finite float in JSON) as nan again. For raw results in
    which None only ever stands for a number."""
    if isinstance(x, dict):
        return {k: as_numbers(v) for k, v in x.items()}
    if isinstance(x, list):
        return [as_numbers(v) for v in x]
    return float("nan") if x is None else x


def nan(x: float | None) -> float:
    """The float a raw value stands for (None in JSON is nan)."""
    return float("nan") if x is None else float(x)


# ------------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------------

def pyplot():
    """matplotlib.pyplot with a backend that needs no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Save and close a figure (creating its folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


# ------------------------------------------------------------------------------------------------------
# Generated sections
# ------------------------------------------------------------------------------------------------------

def markers(name: str) -> tuple[str, str]:
    """The comment lines a generated section sits between."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def section(name: str, lines: Sequence[str]) -> str:
    """A generated section: `lines` between the markers of `name`."""
    begin, end = markers(name)
    return "\n".join([begin, *lines, end])


def write_section(path: Path, text: str, begin: str, end: str, intro: str) -> None:
    """Replace the section between `begin` and `end` in `path` (append it if absent; create the file with
    `intro` if missing). Other sections of the file, and the hand-written text around them, are left alone."""
    doc = path.read_text() if path.exists() else intro
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(doc):
        doc = pattern.sub(lambda _: text, doc, count=1)
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(doc if doc.endswith("\n") else doc + "\n")


def write_benchmarks(text: str, begin: str, end: str) -> None:
    """Replace the section between `begin` and `end` in BENCHMARKS.md (append it if absent)."""
    write_section(BENCHMARKS, text, begin, end, BENCHMARKS_INTRO)


def add_fleet_args(ap) -> None:
    """--workers, --ray, --address: where a bench's rollouts run (sim/shard.py: local processes by default, a
    local Ray with --ray, a Ray cluster with --address)."""
    ap.add_argument("--workers", type=int, default=2, help="worker processes (or CPUs of the local Ray)")
    ap.add_argument("--ray", action="store_true", help="run the rollouts on a local Ray (the extra vigil[fleet])")
    ap.add_argument("--address", help="run the rollouts on the Ray cluster at this address (implies --ray)")


def fleet_backend(args):
    from vigil.sim.shard import backend_from_args

    return backend_from_args(args.ray, args.workers, args.address)
