"""`vigil demo`, the main job, as a newcomer runs it, scaled down: the shipped ensemble served, robots nominal
then shifted, data requests filed and answered, a SAVE round, a hot swap, success before and after. Real
processes, real Meta-World, the real store; the full-size run is `make demo` (a few minutes)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from conftest import run_vigil

from vigil.runtime.requests import RequestStore
from vigil.runtime.store import AlertStore
from vigil.sim.demo import ASSETS


def test_the_shipped_ensemble_is_small_and_says_where_it_came_from():
    files = [p for p in ASSETS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 8e6  # "at most a few MB"
    manifest = json.loads((ASSETS / "run" / "bundle" / "manifest.json").read_text())
    assert manifest["kind"] == "flow_ensemble" and set(manifest["monitor"]["vfd"]["thresholds"]) >= {"warn", "alert"}
    assert manifest["monitor"]["dynamics"]["q"] and (ASSETS / "run" / "bundle" / "dynamics.onnx").is_file()
    readme = (ASSETS / "README.md").read_text()
    assert "make demo-assets" in readme and "vigil train flow" in readme
    assert not (ASSETS / "run" / "bundle" / "encoder").exists()  # exported by the demo, not shipped


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.hang_limit(540)  # the whole main job, a child process per step (its own timeout: 540 s)
def test_demo_runs_the_main_job_end_to_end(tmp_path, encoder_bundle):
    work = tmp_path / "demo"
    shutil.copytree(encoder_bundle, work / "encoder")  # what a second run reuses; the export is tested elsewhere
    r = run_vigil("demo", "--workdir", str(work), "--tasks", "reach-v3,pick-place-v3", "--nominal-episodes", "1",
                  "--shifted-episodes", "2", "--eval-episodes", "2", "--worn-episodes", "1", "--max-steps", "80",
                  "--save-steps", "30", "--calibration-episodes", "1", "--no-record", "--console-port", "0",
                  timeout=540)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    out = r.stdout
    assert "=== vigil demo summary ===" in out
    for task in ("reach-v3", "pick-place-v3"):
        assert re.search(rf"^{task}\s+robot-\d", out, re.M), out[-3000:]
    requests = RequestStore(work / "vigil.db", readonly=True)
    try:
        records = requests.list()
    finally:
        requests.close()
    assert records and any(rec.status == "fulfilled" for rec in records)
    assert {a.monitor for a in AlertStore(work / "vigil.db", readonly=True).since(0)} >= {"vfd", "swap"}
    prov = json.loads((work / "run1" / "provenance.json").read_text())
    assert prov["save"]["steps"] == 30 and prov["save"]["requests"]
    assert re.search(r"^hot swap\s+flow-\S+ -> flow-\S+-r1@", out, re.M), out[-2000:]
    assert re.search(r"^success\s+requesting tasks.*before \d+%, after \d+%", out, re.M)
    for tag in ("nominal", "worn", "shifted", "before", "after"):
        assert list((work / "sims").glob(f"{tag}-*.json")), tag
    # the worn arm (every action halved) gets the dynamics monitor's maintenance alert, not a data request's
    worn = [a for a in AlertStore(work / "vigil.db", readonly=True).since(0)
            if a.robot == "worn-arm" and a.monitor == "dynamics"]
    assert worn and worn[0].values["diagnosis"] == "robot", out[-3000:]
    assert re.search(r"^dynamics alerts\s+\d+: .*the worn arm \(worn-arm, actions halved\): \d+ robot", out, re.M)


def test_demo_refuses_unknown_tasks_by_name(tmp_path):
    r = run_vigil("demo", "--workdir", str(tmp_path / "d"), "--tasks", "reach-v3,juggle-v3")
    assert r.returncode == 2 and "'tasks'" in r.stderr and "juggle-v3" in r.stderr and "Traceback" not in r.stderr
