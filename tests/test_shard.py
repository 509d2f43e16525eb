"""sim/shard.py: the same outcomes serially, over processes and on Ray; a job's own error comes back once and is
not retried; a worker that dies is replaced and its job run again, counted once; a bench's rollouts through it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vigil.sim.shard import Backend, backend_from_args, shard

sys.path.insert(0, str(Path(__file__).parent))
import shard_jobs  # noqa: E402

ray = pytest.importorskip("ray")


@pytest.fixture(autouse=True)
def _shared_ray(local_ray):
    """Every test here joins the session's local Ray (conftest.local_ray)."""


def outcomes(backend: Backend) -> dict[int, tuple]:
    got = {}
    for out in shard(shard_jobs.square, range(6), backend, (100,), shard_jobs.init, ("ready",)):
        assert out.item not in got  # each job's outcome exactly once
        got[out.item] = (out.value[0], out.value[2]) if out.error is None else repr(out.error)
    return got


@pytest.mark.parametrize("kind", ["serial", "processes", "ray"])
def test_every_backend_gives_the_same_outcomes(kind):
    got = outcomes(Backend(kind, 2))
    assert got == {0: (100, ["ready"]), 1: (101, ["ready"]), 2: (104, ["ready"]), 3: "ValueError('three is bad')",
                   4: (116, ["ready"]), 5: (125, ["ready"])}  # the initializer ran once per worker, before its jobs


def test_a_dead_worker_is_replaced_and_its_job_counted_once(tmp_path):
    marker = tmp_path / "died"
    got = [(o.item, o.value, o.error) for o in shard(shard_jobs.die_once, range(5), Backend("ray", 2), (str(marker),))]
    assert marker.exists()
    assert sorted(got) == [(x, 10 * x, None) for x in range(5)]


def test_backend_flags_and_errors():
    assert backend_from_args(False, 1, None) == Backend("serial", 1)
    assert backend_from_args(False, 2, None) == Backend("processes", 2)
    assert backend_from_args(False, 2, "10.0.0.1:6379").kind == "ray"
    with pytest.raises(ValueError, match="kind"):
        Backend("threads")
    with pytest.raises(RuntimeError, match="cannot reach the Ray cluster"):
        list(shard(shard_jobs.square, [1], Backend("ray", 1, "127.0.0.1:1")))


def test_bench_rollouts_shard_on_ray_with_the_serial_results(tiny_run):
    """bench/flow_detect's rollout jobs (bench-flow's, and bench-failure's) on Ray: the serial episodes exactly."""
    import bench.flow_detect as fd

    jobs = [fd.Job(str(tiny_run), c, "reach-v3", (20,), max_steps=12, detect_plans=2, ablation_plans=1)
            for c in ("nominal", "positions")]
    serial = {o.item.condition: o.value for o in shard(fd.run_job, jobs, Backend("serial"))}
    on_ray = {o.item.condition: o.value for o in shard(fd.run_job, jobs, Backend("ray", 2),
                                                        initializer=fd._init_worker)}
    assert on_ray == serial and all(e[0]["scores"]["vfd"] for e in serial.values())
