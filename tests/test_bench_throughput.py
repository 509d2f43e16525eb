"""bench/throughput.py: a very short run (2 and 4 robots, one bundle with and without --batch-plans) goes end to end
through a real `vigil serve`, writes complete raw results, and the report and figure are rendered from the raw file
alone. Timings are not judged."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench import throughput
from bench.common import read_raw

ROOT = Path(__file__).resolve().parent.parent


def test_short_run_writes_raw_results_and_the_report_renders_from_them(tmp_path):
    raw_path = tmp_path / "throughput.json"
    proc = subprocess.run([sys.executable, "-m", "bench.throughput", "--steps", "2,4", "--configs",
                           "linear_gain,linear_gain-batch16", "--duration-s", "1", "--warmup-s", "0.3",
                           "--repeats", "1", "--stop-miss-pct", "100", "--no-progress", "--raw-only", "--out",
                           str(raw_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    raw = read_raw(raw_path)
    steps = raw["steps"]
    assert [(s["n"], s["config"]) for s in steps] == [(2, "linear_gain"), (2, "linear_gain-batch16"),
                                                      (4, "linear_gain"), (4, "linear_gain-batch16")]
    for s in steps:
        obs = len(s["flags"])  # how many in the window is a rate: the bench reports it
        assert all(len(s[k]) == obs for k in ("rtt_us", "runtime_us", "late_us", "send_us", "robot"))
        assert sorted(set(s["robot"])) == list(range(s["n"]))  # every robot played
        assert sum(v >= 0 for v in s["rtt_us"]) > obs // 2  # most observations answered
        assert s["counters"]["stopped_by"] == "SIGINT" and s["counters"]["ticks"] > 0
        assert isinstance(s["window_s"], float) and isinstance(s["runtime_cpu_s"], float)  # timings: in the bench
        assert len(s["generators"]) == 1
        g = s["generators"][0]
        assert g["acts"] > 0 and isinstance(g["window_s"], float) and g["bad"] == 0
        assert isinstance(s["verdicts"], dict) and isinstance(s["alerts"], dict)
    text = throughput.render(raw)  # nothing re-run: the report from the file alone
    assert text.startswith(throughput.BEGIN) and text.endswith(throughput.END)
    assert "robots at 100 Hz with zero runtime deadline verdicts" in text or "no N tested" in text
    assert "linear_gain, --batch-plans 16" in text and "planned together" in text
    assert text in proc.stdout  # the same section the run printed
    figure = throughput.plot(raw, tmp_path / "throughput.png")
    assert figure.stat().st_size > 10_000


def test_section_goes_right_after_the_latency_section(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n<!-- latency:begin -->\nL\n<!-- latency:end -->\n\nreading\n\n"
                   "<!-- fairness:begin -->\nF\n<!-- fairness:end -->\n")
    section = f"{throughput.BEGIN}\nT\n{throughput.END}"
    throughput.write_section_after_latency(section, doc)
    text = doc.read_text()
    assert text.index("<!-- latency:end -->") < text.index(throughput.BEGIN) < text.index("reading")
    throughput.write_section_after_latency(f"{throughput.BEGIN}\nT2\n{throughput.END}", doc)
    text = doc.read_text()
    assert text.count(throughput.BEGIN) == 1 and "T2" in text and "\nT\n" not in text
