"""bench/common.py: generated sections replace only their own markers, raw results read back as written, and a
bench renders the same section from its raw file as from a fresh measurement (bench.flow_latency, tiny)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

import bench.flow_latency as flow_latency
from bench.common import (
    as_numbers,
    command_line,
    markers,
    raw_copy,
    read_raw,
    section,
    write_raw,
    write_section,
)


def test_write_section_replaces_only_its_own_markers(tmp_path):
    doc = tmp_path / "DOC.md"
    doc.write_text("# Doc\n\nhand-written intro\n\n" + section("a", ["old a"]) + "\n\nnotes on a\n\n"
                   + section("b", ["old b"]) + "\n")
    write_section(doc, section("a", ["new a", "second line"]), *markers("a"), intro="unused")
    text = doc.read_text()
    assert "new a\nsecond line" in text and "old a" not in text
    assert "hand-written intro" in text and "notes on a" in text and "old b" in text
    assert text.index("new a") < text.index("notes on a") < text.index("old b")  # in place, not appended


def test_write_section_appends_a_new_section_and_creates_a_missing_file(tmp_path):
    doc = tmp_path / "NEW.md"
    write_section(doc, section("a", ["first"]), *markers("a"), intro="# New\n")
    write_section(doc, section("b", ["second"]), *markers("b"), intro="# unused\n")
    text = doc.read_text()
    assert text.startswith("# New\n") and text.endswith("<!-- b:end -->\n")
    assert text.index("<!-- a:end -->") < text.index("<!-- b:begin -->")


def test_raw_results_read_back_as_written(tmp_path):
    data = {"x": np.float32(1.5), "n": np.int64(3), "ok": np.bool_(True), "arr": np.arange(3), "t": (1, 2),
            "gone": float("nan"), "inf": np.inf, "path": tmp_path, "nested": {"v": [np.float64(0.25), None]}}
    path = write_raw(tmp_path / "out" / "raw.json", data)
    back = read_raw(path)
    assert back == raw_copy(data)
    assert back["x"] == 1.5 and back["n"] == 3 and back["ok"] is True and back["arr"] == [0, 1, 2]
    assert back["t"] == [1, 2] and back["path"] == str(tmp_path)
    assert back["gone"] is None and back["inf"] is None  # JSON has no nan or inf
    numbers = as_numbers(back["nested"])
    assert numbers["v"][0] == 0.25 and math.isnan(numbers["v"][1])


def test_read_raw_without_results_says_how_to_make_them(tmp_path):
    with pytest.raises(SystemExit, match="without --report-only"):
        read_raw(tmp_path / "missing.json")


def test_command_line_names_the_module_or_the_script():
    line = command_line(["--quick", "a b"], env="OMP_NUM_THREADS=1")
    assert line.startswith("OMP_NUM_THREADS=1 ") and line.endswith("--quick 'a b'")
    main = sys.modules["__main__"]
    spec = getattr(main, "__spec__", None)
    assert (f"-m {spec.name}" in line) if spec is not None else (Path(sys.argv[0]).name in line)


def test_flow_latency_renders_the_same_section_from_its_raw_file(tmp_path, monkeypatch, capsys):
    args = flow_latency.parse_args(["--members", "2", "--samples", "1", "--reps", "2"])
    raw = flow_latency.measure(args)
    fresh = flow_latency.render(raw)
    rows = [line for line in fresh.splitlines() if line.startswith(("| full members", "| shared encoder"))]
    assert len(rows) == 4 and all(line.count("|") == 5 for line in rows)  # (lower, anchor) x (full, shared)
    monkeypatch.setattr(flow_latency, "RAW", write_raw(tmp_path / "flow_latency.json", raw))
    assert flow_latency.main(["--report-only", "--no-write"]) == 0
    assert capsys.readouterr().out.strip() == fresh.strip()
