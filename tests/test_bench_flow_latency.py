"""bench.flow_latency runs and prints its table (smoke check; the figures live in BENCHMARKS.md)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # 40 s of full-size plan graphs; its report is rendered in test_bench_common.py
def test_flow_latency_benchmark_smoke():
    out = subprocess.run([sys.executable, "-m", "bench.flow_latency", "--members", "1", "2",
                          "--samples", "2", "1", "--reps", "3", "--no-write"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| full members") or
            line.startswith("| shared encoder")]
    # per variant: lower at the first N, anchor at every N; columns: variant, pairs, N, M=1, M=2
    assert len(rows) == 6 and all(line.count("|") == 6 for line in rows)
    assert "plain policy, one member at N = 1" in out.stdout
