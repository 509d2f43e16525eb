"""Fleets of simulated robots (sim/fleet.py, `vigil eval`): the same episodes give the same results serially and on
a local Ray, a worker that dies mid-run loses nothing and counts nothing twice, and bad input gets clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_vigil

from vigil.sim import fleet
from vigil.sim.shard import Backend

ROOT = Path(__file__).resolve().parents[1]
ray = pytest.importorskip("ray")


@pytest.fixture(autouse=True)
def _shared_ray(local_ray):
    """Every test here joins the session's local Ray (conftest.local_ray)."""


@pytest.fixture(scope="module")
def bundle(encoder_bundle, tmp_path_factory) -> Path:
    """The demo's shipped ensemble with its encoder beside it (what `vigil demo` serves)."""
    folder = tmp_path_factory.mktemp("fleet") / "bundle"
    shutil.copytree(ROOT / "sim" / "assets" / "mt10" / "run" / "bundle", folder)
    shutil.copytree(encoder_bundle, folder / "encoder")
    return folder


SPECS = fleet.specs_for(["reach-v3", "push-v3"], ["nominal", "positions"], 2, max_steps=40)


def same(a, b) -> bool:
    return [(r.index, r.spec, r.success, r.ret, r.steps, r.scores) for r in a] == \
        [(r.index, r.spec, r.success, r.ret, r.steps, r.scores) for r in b]


def test_serial_and_ray_give_the_same_episodes(bundle, tmp_path):
    serial = fleet.run_serial(bundle, SPECS)
    marker = tmp_path / "crashed"
    on_ray = fleet.run_ray(bundle, SPECS, workers=2, batch_size=2, crash_once=(3, str(marker)))
    assert marker.exists()  # a worker died abruptly mid-run ...
    assert same(serial, on_ray)  # ... and its episodes were played again elsewhere, each counted once
    assert len({r.worker for r in on_ray}) >= 2 and all(r.scores["vfd"] for r in on_ray)
    rows = fleet.table(serial)
    assert [(r["task"], r["condition"], r["episodes"]) for r in rows] == [
        ("push-v3", "nominal", 2), ("push-v3", "positions", 2), ("reach-v3", "nominal", 2),
        ("reach-v3", "positions", 2)]
    assert all(r["mean vfd"] > 0 for r in rows)


def test_served_robots_match_in_process_and_move_off_a_dying_runtime(bundle):
    """Robots over real robot links against `vigil serve` runtimes give the in-process episodes exactly (lockstep,
    the same seeded plan noise); on Ray with two runtimes, the first one is SIGKILLed once an episode is back:
    its robot's unfinished batch is played again against the other runtime, nothing lost or counted twice."""
    specs = SPECS[:6]
    key = [(r.index, r.spec, r.success, r.ret, r.steps, r.scores["vfd"]) for r in fleet.run_serial(bundle, specs)]
    served = fleet.run_served(bundle, specs)
    assert [(r.index, r.spec, r.success, r.ret, r.steps, r.scores["vfd"]) for r in served.results] == key
    # every tick answered by the runtime and its round trip recorded (how fast: make bench-fleet)
    assert all(r.link["latency_us"]["n"] == r.steps and r.link["robot_safe"] == 0 for r in served.results)
    (rt,) = served.runtimes
    assert rt["alive"] and rt["counters"]["ticks"] == sum(r.steps for r in served.results)
    assert {a["monitor"] for a in rt["alerts"]} >= {"vfd"}  # the shipped bundle alerts on these variants

    moved = fleet.run_served(bundle, specs, Backend("ray", 2), runtimes_per_node=2, batch_size=2,
                             kill_runtime_after=1)
    assert [(r.index, r.spec, r.success, r.ret, r.steps, r.scores["vfd"]) for r in moved.results] == key
    assert moved.moved >= 1 and [rt["alive"] for rt in moved.runtimes] == [False, True]
    dead, survivor = (rt["endpoint"] for rt in moved.runtimes)
    assert sum(r.link["runtime"] == survivor for r in moved.results) > sum(r.link["runtime"] == dead
                                                                           for r in moved.results)


def test_bad_tasks_and_unreachable_clusters_get_clear_errors(bundle):
    with pytest.raises(ValueError, match="juggle-v3"):
        fleet.run_serial(bundle, [fleet.EpisodeSpec("juggle-v3")])
    with pytest.raises(ValueError, match="condition"):
        fleet.run_ray(bundle, [fleet.EpisodeSpec("reach-v3", "gravity")])
    with pytest.raises(RuntimeError, match="cannot reach the Ray cluster"):
        fleet.run_ray(bundle, SPECS[:1], address="127.0.0.1:1")


def test_vigil_eval_command(bundle, tmp_path):
    out = tmp_path / "eval.json"
    r = run_vigil("eval", "--bundle", str(bundle), "--tasks", "reach-v3", "--episodes", "2", "--max-steps", "40",
                  "--ray", "--workers", "2", "--out", str(out), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "reach-v3 | nominal | 2" in r.stdout and "(Ray)" in r.stdout
    doc = json.loads(out.read_text())
    assert len(doc["episodes"]) == 2 and doc["rows"][0]["episodes"] == 2
    r = run_vigil("eval", "--bundle", str(bundle), "--tasks", "reach-v3,juggle-v3")
    assert r.returncode == 2 and "juggle-v3" in r.stderr and "Traceback" not in r.stderr


def test_calibration_on_the_fleet_gives_the_same_thresholds(bundle, tmp_path):
    """`vigil calibrate --ray` shares the rollouts out; the monitor block it writes is the serial one."""
    from vigil.training.calibrate import calibrate_bundle

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(bundle, a)
    shutil.copytree(bundle, b)
    serial, _ = calibrate_bundle(a, ["reach-v3", "push-v3"], 3, 40, max_steps=60, progress=False,
                                 successful_only=False)
    on_ray, rollouts = calibrate_bundle(b, ["reach-v3", "push-v3"], 3, 40, max_steps=60, progress=False,
                                        successful_only=False, ray=True, workers=2)
    assert serial == on_ray and len(rollouts) == 6 and all(r.scores["vfd"] for r in rollouts)
