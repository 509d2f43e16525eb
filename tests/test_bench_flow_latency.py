"""bench/flow_latency.py runs and prints its table (smoke check; the figures live in BENCHMARKS.md)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_flow_latency_benchmark_smoke():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "flow_latency.py"), "--members", "1", "2",
                          "--reps", "3", "--no-write"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| full members") or
            line.startswith("| shared encoder")]
    assert len(rows) == 4 and all(line.count("|") == 5 for line in rows)
