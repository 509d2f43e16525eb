"""Fleets of simulated robots: evaluate a bundle on many (task, condition, seed) episodes, serially or on Ray.

An episode is an `EpisodeSpec`; a worker holds the bundle (loaded once per worker) and an environment per (task,
condition), and plays episodes exactly as `vigil calibrate` does (policies.agent.Agent: the bundle's session, its
chunk execution, the instruction embedded once, plan noise seeded by the episode seed). So the same specs give the
same results serially and on Ray, in any order, on any node (tests/test_fleet.py).

On Ray (the extra `vigil[fleet]`), one actor per CPU (a simulated robot: the bundle loaded once, its
environments kept) plays batches of episodes handed out as actors become idle. An actor whose process or node
dies is restarted by Ray and the call it was running is retried (`max_restarts`, `max_task_retries`); only a
finished call returns its results, so a lost worker loses nothing and counts nothing twice. `address` None starts
a local Ray on this machine; an address joins a cluster. `crash_once` is fault injection for the fault tests: the
first worker to play that spec index exits abruptly.

    vigil eval --bundle runs/mt10/bundle --conditions nominal,positions --episodes 10 --workers 2 --ray
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

CONDITIONS = ("nominal", "positions", "physics")  # sim.shifts: as bench/flow_detect.py's conditions


@dataclass(frozen=True)
class EpisodeSpec:
    task: str
    condition: str = "nominal"
    seed: int = 20
    max_steps: int = 500


@dataclass
class EpisodeResult:
    index: int
    spec: EpisodeSpec
    rollout: Any  # training.calibrate.Rollout: success, return, steps, per-plan scores (and stillness), success plan
    seconds: float = 0.0
    worker: str = ""

    @property
    def success(self) -> bool:
        return bool(self.rollout.success)

    @property
    def ret(self) -> float:
        return float(self.rollout.ret)

    @property
    def steps(self) -> int:
        return int(self.rollout.steps)

    @property
    def scores(self) -> dict[str, list[float]]:
        return self.rollout.scores

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "spec": asdict(self.spec), "rollout": asdict(self.rollout),
                "seconds": self.seconds, "worker": self.worker}


def shift_of(condition: str):
    from vigil.sim.shifts import Shift

    shifts = {"nominal": Shift(), "positions": Shift(positions=0.5), "physics": Shift(friction=0.3, mass=4.0)}
    if condition not in shifts:
        raise ValueError(f"unknown condition {condition!r}: use one of {CONDITIONS}")
    return shifts[condition]


def check_specs(specs: Sequence[EpisodeSpec]) -> None:
    """Refuse unknown task names and conditions before any worker starts."""
    from vigil.sim.metaworld_env import ALL_INSTRUCTIONS

    bad = sorted({s.task for s in specs} - set(ALL_INSTRUCTIONS))
    if bad:
        raise ValueError(f"unknown task(s) {bad}: use Meta-World task names such as {sorted(ALL_INSTRUCTIONS)[:3]}")
    for s in specs:
        shift_of(s.condition)


class Worker:
    """A bundle and its environments in one process; plays episodes in order."""

    def __init__(self, bundle: str | Path):
        from vigil.policies.agent import Agent
        from vigil.policies.bundle import load_policy

        self.policy = load_policy(Path(bundle), prefer_gpu=False)
        self.agent = Agent(self.policy)
        self.camera = any(spec.name == "image" for spec in self.policy.manifest.observation)
        self.envs: dict[tuple[str, str, int], Any] = {}
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    def env(self, spec: EpisodeSpec):
        from vigil.sim.envs import make_env

        key = (spec.task, spec.condition, spec.max_steps)
        if key not in self.envs:
            self.envs[key] = make_env(spec.task, horizon=spec.max_steps, camera=self.camera,
                                      shift=shift_of(spec.condition))
        return self.envs[key]

    def play(self, index: int, spec: EpisodeSpec) -> EpisodeResult:
        """One episode, played by training/calibrate.py's `rollout` (one rollout code for every caller)."""
        from vigil.training.calibrate import rollout

        t0 = time.perf_counter()
        r = rollout(self.agent, self.env(spec), spec.seed, spec.max_steps)
        return EpisodeResult(index, spec, r, time.perf_counter() - t0, self.name)

    def close(self) -> None:
        for env in self.envs.values():
            env.close()


class FleetActor:
    """A simulated robot on Ray: one Worker (the bundle loaded once, its environments kept) playing batches. Ray
    restarts a dead actor and retries the call it was running (max_restarts, max_task_retries)."""

    def __init__(self, bundle: str, crash_once: tuple[int, str] | None = None):
        self.worker = Worker(bundle)
        self.crash_once = crash_once

    def play(self, batch: Sequence[tuple[int, EpisodeSpec]]) -> list[EpisodeResult]:
        c = self.crash_once
        if c is not None and c[0] in {i for i, _ in batch} and not os.path.exists(c[1]):
            Path(c[1]).write_text("crashed once\n")
            os._exit(1)  # the worker process dies abruptly, as a lost node would
        return [self.worker.play(i, s) for i, s in batch]


def batches(specs: Sequence[EpisodeSpec], size: int) -> list[list[tuple[int, EpisodeSpec]]]:
    """Specs numbered in order and cut into batches, grouped by (task, condition) so a worker reuses its env."""
    order = sorted(range(len(specs)), key=lambda i: (specs[i].task, specs[i].condition, i))
    items = [(i, specs[i]) for i in order]
    return [items[k:k + size] for k in range(0, len(items), size)]


def run_serial(bundle: str | Path, specs: Sequence[EpisodeSpec], progress: Callable[[int], None] | None = None
               ) -> list[EpisodeResult]:
    check_specs(specs)
    worker = Worker(bundle)
    out = []
    try:
        for i, s in enumerate(specs):
            out.append(worker.play(i, s))
            if progress:
                progress(1)
    finally:
        worker.close()
    return out


def run_ray(bundle: str | Path, specs: Sequence[EpisodeSpec], workers: int = 2, address: str | None = None,
            batch_size: int = 4, retries: int = 3, crash_once: tuple[int, str] | None = None,
            progress: Callable[[int], None] | None = None) -> list[EpisodeResult]:
    """The same episodes on Ray: `workers` CPUs of a local Ray (address None) or a cluster; results in spec order."""
    check_specs(specs)
    try:
        import ray
    except ImportError:
        raise RuntimeError("Ray is not installed: pip install 'vigil[fleet]' (or run serially)") from None
    if address:
        reachable(address)
    started = False
    if not ray.is_initialized():
        try:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise RuntimeError(f"cannot reach the Ray cluster at {address!r}: {exc}") from None
        started = True
    try:
        actor = ray.remote(num_cpus=1, max_restarts=retries, max_task_retries=retries)(FleetActor)
        bundle = str(Path(bundle).resolve())
        cpus = int(ray.cluster_resources().get("CPU", 1))  # a cluster: one robot per CPU it offers
        robots = [actor.remote(bundle, crash_once) for _ in range(max(1, workers if not address else cpus))]
        todo = batches(specs, batch_size)
        busy: dict[Any, Any] = {}
        results: dict[int, EpisodeResult] = {}
        while todo or busy:
            for robot in robots:  # every idle actor gets the next batch
                if todo and robot not in busy.values():
                    busy[robot.play.remote(todo.pop(0))] = robot
            done, _ = ray.wait(list(busy), num_returns=1)
            busy.pop(done[0])
            for r in ray.get(done[0]):
                if r.index in results:
                    raise RuntimeError(f"episode {r.index} came back twice")  # cannot happen: one return per call
                results[r.index] = r
                if progress:
                    progress(1)
        missing = sorted(set(range(len(specs))) - set(results))
        if missing:
            raise RuntimeError(f"episodes {missing[:5]}... were lost")
        return [results[i] for i in range(len(specs))]
    finally:
        if started:
            ray.shutdown()


def reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a cluster address nothing listens at (Ray itself would wait for minutes)."""
    import socket

    hostport = address.split("://", 1)[-1]
    if hostport == "auto":
        return
    host, _, port = hostport.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"cannot reach the Ray cluster at {address!r}: {exc} (start one with `ray start "
                           "--head`, or leave out --address for a local Ray)") from None


def specs_for(tasks: Sequence[str], conditions: Sequence[str], episodes: int, seed: int = 20, max_steps: int = 500
              ) -> list[EpisodeSpec]:
    return [EpisodeSpec(t, c, seed + k, max_steps) for t in tasks for c in conditions for k in range(episodes)]


def table(results: Sequence[EpisodeResult]) -> list[dict[str, Any]]:
    """Per (task, condition): episodes, success, mean return and mean per-plan score of each graph output."""
    rows = []
    keys = sorted({(r.spec.task, r.spec.condition) for r in results})
    for task, cond in keys:
        rs = [r for r in results if (r.spec.task, r.spec.condition) == (task, cond)]
        row = {"task": task, "condition": cond, "episodes": len(rs), "success": float(np.mean([r.success for r in rs])),
               "return": float(np.mean([r.ret for r in rs]))}
        for name in sorted({n for r in rs for n in r.scores}):
            row[f"mean {name}"] = float(np.mean([np.mean(r.scores[name]) for r in rs if r.scores.get(name)]))
        rows.append(row)
    return rows
