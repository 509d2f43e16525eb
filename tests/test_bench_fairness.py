"""bench/fairness.py: a very short run (2 robots; realtime without, lockstep with the flooder) goes end to end through a
real `vigil serve`, writes complete raw results, and the report and figure are rendered from the raw file alone.
Timings are not judged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench import fairness
from bench.common import read_raw

ROOT = Path(__file__).resolve().parent.parent


def test_short_run_writes_raw_results_and_the_report_renders_from_them(tmp_path):
    raw_path = tmp_path / "fairness.json"
    proc = subprocess.run([sys.executable, "-m", "bench.fairness", "--robots", "2", "--duration-s", "0.8",
                           "--warmup-s", "0.2", "--repeats", "1", "--realtime", "none", "--lockstep", "flood",
                           "--no-progress", "--raw-only", "--out", str(raw_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = read_raw(raw_path)
    rounds = raw["rounds"]
    assert [(r["mode"], r["condition"]) for r in rounds] == [("realtime", "none"), ("lockstep", "flood")]
    for r in rounds:
        assert len(r["robots"]) == 2
        for robot in r["robots"]:
            n = robot["ticks"]
            assert n > 0  # every robot ticked (how many a window holds is a timing: the bench reports it)
            assert all(len(robot[k]) == n for k in ("rtt_us", "answer_us", "queue_us", "decide_us", "flags"))
            assert sum(v is not None for v in robot["rtt_us"]) > n // 2
        assert r["counters"]["stopped_by"] == "SIGINT" and r["counters"]["ticks"] > 0
        assert isinstance(r["window_s"], float) and isinstance(r["runtime_cpu_s"], float)  # timings: in the bench
    assert rounds[0]["flooder"] is None
    f = rounds[1]["flooder"]
    assert f["sent"] > 100 and f["acts"] > 0 and f["pipeline"] is None
    assert f["errors"].get("overflow", 0) > 0  # lockstep: beyond the default depth of 8
    assert rounds[1]["counters"]["overflow_dropped"] > 0
    assert all(isinstance(n, int) for r in rounds for n in r["alerts"].values())
    text = fairness.render(raw)  # nothing re-run: the report from the file alone
    assert text.startswith(fairness.BEGIN) and text.endswith(fairness.END)
    assert "### Realtime" in text and "### Lockstep" in text and "Verdict against the target" in text
    assert text in proc.stdout  # the same section the run printed
    figure = fairness.plot(raw, tmp_path / "fairness.png")
    assert figure.stat().st_size > 10_000
