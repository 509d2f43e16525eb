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

from vigil.sim.shard import Backend, ray_session

CONDITIONS = ("nominal", "positions", "physics")  # sim.shifts: as bench/flow_detect.py's conditions


@dataclass(frozen=True)
class EpisodeSpec:
    task: str
    condition: str = "nominal"
    seed: int = 20
    max_steps: int = 500
    record: bool = False  # keep the states and actions (the dynamics monitor's calibration)


@dataclass
class EpisodeResult:
    index: int
    spec: EpisodeSpec
    rollout: Any  # training.calibrate.Rollout: success, return, steps, per-plan scores (and stillness), success plan
    seconds: float = 0.0
    worker: str = ""
    link: dict[str, Any] | None = None  # served: runtime, latency (us), verdicts, robot-side safe actions

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
                "seconds": self.seconds, "worker": self.worker, "link": self.link}


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
        self.camera = has_camera(self.policy.manifest)
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
        r = rollout(self.agent, self.env(spec), spec.seed, spec.max_steps, spec.record)
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
    backend = Backend("ray", workers, address, retries)
    with ray_session(backend) as ray:
        actor = ray.remote(num_cpus=1, max_restarts=retries, max_task_retries=retries)(FleetActor)
        bundle = str(Path(bundle).resolve())
        robots = [actor.remote(bundle, crash_once) for _ in range(robot_count(ray, backend))]
        todo = batches(specs, batch_size)
        busy: dict[Any, Any] = {}
        results = Collected(len(specs), progress)
        while todo or busy:
            for robot in robots:  # every idle actor gets the next batch
                if todo and robot not in busy.values():
                    busy[robot.play.remote(todo.pop(0))] = robot
            done, _ = ray.wait(list(busy), num_returns=1)
            busy.pop(done[0])
            results.add(ray.get(done[0]))
        return results.in_order()


# ------------------------------------------------------------------ simulated robots against served runtimes


class RuntimeLost(RuntimeError):
    """The runtime a robot was talking to stopped answering (its process or node died)."""


def has_camera(manifest) -> bool:
    """Whether the bundle sees images: its robots' environments must render."""
    return any(spec.name == "image" for spec in manifest.observation)


class LinkRobot:
    """A simulated robot that plays episodes through a vigil robot link against a `vigil serve` (lockstep: each
    observation waits for its action, so an episode's result does not depend on machine load)."""

    def __init__(self, camera: bool = False):
        self.camera = camera
        self.envs: dict[tuple[str, str, int], Any] = {}
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    env = Worker.env
    close = Worker.close

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def play(self, index: int, spec: EpisodeSpec, endpoint: str) -> EpisodeResult:
        """One episode against the runtime at `endpoint`; RuntimeLost if that runtime stops answering."""
        from vigil.runtime.client import LinkError, probe
        from vigil.sim.robot import SimConfig, run_episodes
        from vigil.training.calibrate import Rollout

        fallbacks = [0]

        def watch(stats) -> None:  # a robot-side safe action: is the runtime still there?
            if stats.robot_safe > fallbacks[0]:
                fallbacks[0] = stats.robot_safe
                if not probe(endpoint, 1.0):
                    raise RuntimeLost(endpoint)

        t0 = time.perf_counter()
        if not probe(endpoint, 1.0):  # a runtime already gone: say so at once (a hello would wait 5 s)
            raise RuntimeLost(endpoint)
        cfg = SimConfig(endpoint, f"fleet-{self.name}", episodes=1, steps=spec.max_steps, seed=spec.seed)
        try:
            st = run_episodes(self.env(spec), cfg, on_step=watch, first_episode=index)[0]
        except LinkError as exc:  # hello or reset unanswered
            if probe(endpoint, 1.0):
                raise
            raise RuntimeLost(endpoint) from exc
        rollout = Rollout(spec.task, spec.seed, bool(st.success), st.steps, st.scores, None, st.reward)
        lat = st.summary()["latency_us"]
        link = {"runtime": endpoint, "latency_us": {k: lat[k] for k in ("p50", "p99", "max", "n")},
                "verdicts": st.verdicts, "robot_safe": st.robot_safe, "runtime_safe": st.runtime_safe}
        return EpisodeResult(index, spec, rollout, time.perf_counter() - t0, self.name, link)

    def play_batch(self, batch: Sequence[tuple[int, EpisodeSpec]], endpoint: str
                   ) -> tuple[list[EpisodeResult], str | None, list[tuple[int, EpisodeSpec]]]:
        """(finished episodes, the endpoint that was lost or None, the episodes not finished because of it)."""
        done = []
        for k, (i, s) in enumerate(batch):
            try:
                done.append(self.play(i, s, endpoint))
            except RuntimeLost:
                return done, endpoint, list(batch[k:])
        return done, None, []


class RuntimeHost:
    """A `vigil serve` of the bundle on one node, its robot link bound on that node's address."""

    def __init__(self, bundle: str, host: str = "127.0.0.1", deadline_ms: float = 1000.0,
                 workdir: str | None = None):
        import tempfile

        from vigil.runtime.launch import start_serve

        self.workdir = workdir or tempfile.mkdtemp(prefix="vigil-fleet-serve-")
        remote = host not in ("127.0.0.1", "localhost")  # a cluster's robots on other machines may move here
        self.served = start_serve(bundle, self.workdir, robot_endpoint=f"tcp://{host}:0",
                                  operator_endpoint=f"tcp://{host}:0", deadline_ms=deadline_ms, allow_remote=remote)

    def endpoint(self) -> str:
        return self.served.robot_endpoint

    def kill(self) -> None:
        """SIGKILL the runtime (fault injection: a runtime that dies)."""
        self.served.kill()

    def report(self) -> dict[str, Any]:
        """The alerts in its store, and its counters when it stopped (None if it died)."""
        from vigil.runtime.launch import LaunchError
        from vigil.runtime.store import AlertStore

        alive = self.served.alive()
        try:
            counters = self.served.stop() if alive else None
        except LaunchError:
            counters = None
        store = AlertStore(self.served.store, readonly=True)
        try:
            alerts = [{"robot": a.robot, "severity": a.severity, "monitor": a.monitor, "reason": a.reason,
                       "count": a.count} for a in store.since(0)]
        finally:
            store.close()
        return {"endpoint": self.served.robot_endpoint, "alive": alive, "alerts": alerts, "counters": counters}


@dataclass
class ServedRun:
    """A served evaluation: the episodes in spec order, what every runtime stored, and how many batches moved to
    another runtime because theirs died."""

    results: list[EpisodeResult]
    runtimes: list[dict[str, Any]]
    moved: int = 0


def run_served(bundle: str | Path, specs: Sequence[EpisodeSpec], backend: Backend | None = None,
               runtimes_per_node: int = 1, deadline_ms: float = 1000.0, batch_size: int = 4,
               kill_runtime_after: int | None = None, progress: Callable[[int], None] | None = None) -> ServedRun:
    """The episodes played by simulated robots through vigil robot links against `vigil serve` runtimes: serially
    (one runtime, one robot, this process) or on Ray (`runtimes_per_node` runtimes on every node, one robot
    actor per worker CPU, each talking to a runtime on its own node). A runtime that dies: the batch its robot
    was playing goes back to the queue (finished episodes are kept) and the robot moves to a live runtime.
    `kill_runtime_after` (fault injection): the first runtime is killed once that many episodes came back.
    `deadline_ms` is generous by default: robots in lockstep are not real time, and a deadline's safe action
    would make results depend on machine load; the latency columns report what each tick took."""
    check_specs(specs)
    backend = backend or Backend("serial")
    bundle = str(Path(bundle).resolve())
    from vigil.policies.manifest import read_manifest

    camera = has_camera(read_manifest(Path(bundle)))
    if backend.kind != "ray":
        host, robot = RuntimeHost(bundle, deadline_ms=deadline_ms), LinkRobot(camera)
        try:
            results = []
            for i, s in enumerate(specs):
                results.append(robot.play(i, s, host.endpoint()))
                if progress:
                    progress(1)
        finally:
            robot.close()
            report = host.report()
        return ServedRun(results, [report])
    with ray_session(backend) as ray:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
        host_cls = ray.remote(num_cpus=0)(RuntimeHost)
        one_machine = len({n["NodeManagerAddress"] for n in nodes}) == 1  # then loopback is enough
        hosts = [host_cls.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                 .remote(bundle, "127.0.0.1" if one_machine else n["NodeManagerAddress"], deadline_ms)
                 for n in nodes for _ in range(runtimes_per_node)]
        host_node = [n["NodeID"] for n in nodes for _ in range(runtimes_per_node)]
        endpoints = ray.get([h.endpoint.remote() for h in hosts])
        robot_cls = ray.remote(num_cpus=1, max_restarts=backend.retries, max_task_retries=backend.retries)(LinkRobot)
        robots = [robot_cls.remote(camera) for _ in range(robot_count(ray, backend))]
        robot_node = ray.get([r.node.remote() for r in robots])
        live = set(range(len(hosts)))

        def assign(r: int) -> int:  # a live runtime on the robot's node, else any live runtime
            here = [h for h in sorted(live) if host_node[h] == robot_node[r]] or sorted(live)
            if not here:
                raise RuntimeError("every runtime died: nothing left to evaluate against")
            return here[r % len(here)]

        runtime_of = {r: assign(r) for r in range(len(robots))}
        todo = batches(specs, batch_size)
        busy: dict[Any, int] = {}
        results = Collected(len(specs), progress)
        moved, killed = 0, False
        try:
            while todo or busy:
                for r, robot in enumerate(robots):
                    if todo and r not in busy.values():
                        busy[robot.play_batch.remote(todo.pop(0), endpoints[runtime_of[r]])] = r
                done, _ = ray.wait(list(busy), num_returns=1)
                r = busy.pop(done[0])
                finished, lost, rest = ray.get(done[0])
                results.add(finished)
                if lost is not None:  # its runtime died: requeue what it did not finish, move its robots
                    live.discard(endpoints.index(lost))
                    todo.insert(0, rest)
                    for q in runtime_of:
                        if runtime_of[q] not in live:
                            runtime_of[q] = assign(q)
                            moved += 1
                if kill_runtime_after is not None and not killed and len(results) >= kill_runtime_after:
                    ray.get(hosts[0].kill.remote())
                    killed = True
            in_order = results.in_order()
        finally:
            reports = ray.get([h.report.remote() for h in hosts])
        return ServedRun(in_order, reports, moved)


class Collected:
    """Episode results as calls return them: each episode kept once, in spec order at the end, none missing."""

    def __init__(self, n: int, progress: Callable[[int], None] | None):
        self.n, self.progress, self.results = n, progress, {}

    def add(self, finished: Sequence[EpisodeResult]) -> None:
        for r in finished:
            if r.index in self.results:
                raise RuntimeError(f"episode {r.index} came back twice")  # cannot happen: one return per call
            self.results[r.index] = r
            if self.progress:
                self.progress(1)

    def __len__(self) -> int:
        return len(self.results)

    def in_order(self) -> list[EpisodeResult]:
        missing = sorted(set(range(self.n)) - set(self.results))
        if missing:
            raise RuntimeError(f"episodes {missing[:5]}... were lost")
        return [self.results[i] for i in range(self.n)]


def robot_count(ray, backend: Backend) -> int:
    """One robot per worker of a local Ray; on a cluster, one per CPU it offers."""
    return max(1, backend.workers if not backend.address else int(ray.cluster_resources().get("CPU", 1)))


def specs_for(tasks: Sequence[str], conditions: Sequence[str], episodes: int, seed: int = 20, max_steps: int = 500,
              record: bool = False) -> list[EpisodeSpec]:
    return [EpisodeSpec(t, c, seed + k, max_steps, record) for t in tasks for c in conditions for k in range(episodes)]


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
        links = [r.link for r in rs if r.link is not None]
        if links:  # served: tick latency as the robots measured it, and how many episodes raised an alert
            row["p50 ms"] = float(np.median([x["latency_us"]["p50"] for x in links])) / 1e3
            row["p99 ms"] = float(np.max([x["latency_us"]["p99"] for x in links])) / 1e3
            row["alerted"] = float(np.mean([any(k.endswith(".alert") for k in x["verdicts"]) for x in links]))
            row["robot safe"] = int(sum(x["robot_safe"] for x in links))
        rows.append(row)
    return rows
