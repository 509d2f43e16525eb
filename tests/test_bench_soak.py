"""bench/soak.py: a short soak runs end to end through `RobotLink.step`, writes its raw results and every miss
(one JSON line each, with a cause), and the report is rendered from those files alone. Timings are not judged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import soak  # noqa: E402  (bench/ is not a package)

DEADLINE_US = 10_000.0


def miss(**fields) -> dict:
    """A robot's miss record as robot_main writes it: a timed-out tick, sent on time, nothing known yet."""
    return {"robot": "soak-0", "tick": 10, "seq": 12, "t": 1.0, "wall": 1.7e9, "late_send_us": 100.0,
            "wait_us": 10_100.0, "overshoot_us": 100.0, "fallback": "timeout", "deadline_verdict": None,
            "answer": "never", "rtt_us": None, "queue_us": None, "decide_us": None, "infer_us": None, **fields}


@pytest.mark.parametrize("record, cause", [
    (miss(fallback="bye"), "shutdown"),
    (miss(t=9.995), "shutdown"),  # in flight when the first robot finished, at 10 s
    (miss(late_send_us=4000.0), "late_send"),
    (miss(wait_us=14_000.0, overshoot_us=4000.0), "late_send"),
    (miss(fallback=None, answer="in time", rtt_us=12_000.0, infer_us=11_000.0,
          deadline_verdict="decided in 11 ms, deadline 10 ms"), "runtime"),
    (miss(fallback="error:internal", answer="in time", rtt_us=300.0), "runtime"),
    (miss(answer="late", rtt_us=15_000.0, infer_us=200.0), "queueing"),  # inferred: no queue_us
    (miss(answer="late", rtt_us=15_000.0, infer_us=200.0, queue_us=14_000.0), "queueing"),
    (miss(answer="late", rtt_us=15_000.0, decide_us=12_000.0, queue_us=1000.0), "runtime"),
    (miss(answer="late", rtt_us=15_000.0, infer_us=11_000.0), "runtime"),
    (miss(), "lost"),
    (miss(fallback="unsent"), "lost"),
])
def test_every_miss_gets_one_cause(record, cause):
    got, basis = soak.classify_miss(record, DEADLINE_US, t_stop=10.0)
    assert got == cause and basis, (got, basis)


def test_short_soak_writes_raw_results_and_the_report_renders_from_them(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "bench.soak", "--robots", "2", "--ticks", "400",
                           "--curve-trips", "0", "--warmup-ticks", "50", "--bin-s", "1", "--no-progress",
                           "--raw-only", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "soak.json").read_text())
    misses = soak.read_misses(out / results["misses_file"])
    assert results["summary"]["ticks"] == 400
    assert all(m["cause"] in soak.CAUSES and m["basis"] for m in misses)
    s = results["summary"]
    assert len(misses) == s["robot_misses"] + s["runtime_deadline_verdicts"]  # every miss is in the file, once
    text = soak.render_file(out / "soak.json")  # nothing re-run: the report from the files alone
    assert text.startswith(soak.BEGIN) and text.endswith(soak.END) and "Why the robots missed" in text
    assert text in proc.stdout  # the same section the run printed
