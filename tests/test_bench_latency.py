"""Smoke test of bench.latency: it runs end to end and prints the vigil rows (timings are not judged)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_latency_benchmark_quick_smoke():
    proc = subprocess.run([sys.executable, "-m", "bench.latency", "--quick", "--no-openpi", "--no-write"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("| policy | transport | system |") for line in lines), proc.stdout
    for policy in ("linear_gain", "gaussian"):
        for transport in ("tcp", "ipc"):
            assert any(line.startswith(f"| {policy} | {transport} | **vigil**") for line in lines), proc.stdout
            assert any(line.startswith(f"| {policy} | {transport} | (b) zmq echo") for line in lines), proc.stdout
        assert any(line.startswith(f"| {policy} | in-process | (a) onnxruntime") for line in lines), proc.stdout
