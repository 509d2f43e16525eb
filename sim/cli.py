"""The simulation commands of `vigil`: sim | expert | demo (vigil[sim]).

runtime/cli.py's main() imports this module only when one of these commands is asked for, and calls
PARSERS[command]: fill in the command's parser, then run it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vigil.runtime.cliargs import Command, client_keys, key_args, stop_on_signals
from vigil.runtime.client import LinkError
from vigil.runtime.config import add_flags, check_fields, config_from_args
from vigil.sim.envs import Dynamics, make_env
from vigil.sim.faults import Faults
from vigil.sim.robot import SimConfig, run_episodes
from vigil.sim.shifts import Shift

FAULTS = "fault injection"
SHIFT = "distribution shift (Meta-World tasks; sim/shifts.py)"

# -- sim ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimScenario:
    """What the simulated robot plays besides its link (SimConfig): the environment, injected faults, a
    distribution shift."""

    env: str = field(default="aircraft-pitch", metadata={
        "help": "aircraft-pitch, uav-2d, a Meta-World task (e.g. reach-v3; its instruction is sent with every "
                "reset), or a gymnasium environment id", "flag": "--system", "aliases": ("--env",)})
    summary: str | None = field(default=None, metadata={
        "help": "write the per-episode summary as JSON to this file"})
    obs_noise: float = field(default=0.0, metadata={
        "help": "std of Gaussian noise added to observations", "group": FAULTS})
    drop: float = field(default=0.0, metadata={"help": "probability an observation is lost", "group": FAULTS})
    delay_ms: float = field(default=0.0, metadata={"help": "latency added before each observation", "group": FAULTS})
    disconnect_at: int = field(default=-1, metadata={
        "help": "step at which the link goes down (-1: never)", "group": FAULTS})
    disconnect_s: float = field(default=1.0, metadata={"help": "seconds the link stays down", "group": FAULTS})
    fault_start: int = field(default=0, metadata={"help": "first step of noise/drop/delay", "group": FAULTS})
    fault_stop: int = field(default=2**62, metadata={"help": "step at which noise/drop/delay end", "group": FAULTS})
    noise_dims: str | None = field(default=None, metadata={
        "help": "comma-separated state indices that get --obs-noise (default: all)", "group": FAULTS})
    shift_positions: float = field(default=0.0, metadata={
        "help": "move objects and goal this fraction of their range beyond the training range", "group": SHIFT})
    friction: float = field(default=1.0, metadata={"help": "scale of every geom's sliding friction", "group": SHIFT})
    mass: float = field(default=1.0, metadata={"help": "scale of the task bodies' mass and inertia", "group": SHIFT})
    instruction: str | None = field(default=None, metadata={
        "help": "send this instruction instead of the task's own (e.g. a held-out task's, on this task's scene)",
        "group": SHIFT})
    gain: float = field(default=1.0, metadata={
        "help": "scale of the actuators' gear (gymnasium MuJoCo) or of every action (Meta-World): weaker or "
                "stronger motors", "group": SHIFT})
    action_latency: int = field(default=0, metadata={
        "help": "steps an action waits before it takes effect (MuJoCo and Meta-World tasks)", "group": SHIFT})

    def __post_init__(self) -> None:
        check_fields(self, [
            ("env", bool(self.env), "an environment name"),
            ("gain", 0 < self.gain < math.inf, "a finite number > 0"),
            ("action_latency", self.action_latency >= 0, "an integer >= 0 (steps)"),
            ("obs_noise", 0 <= self.obs_noise < math.inf, "a finite number >= 0"),
            ("drop", 0 <= self.drop <= 1, "a probability in [0, 1]"),
            ("delay_ms", 0 <= self.delay_ms < math.inf, "a finite number >= 0 (milliseconds)"),
            ("disconnect_at", self.disconnect_at >= -1, "a step >= 0, or -1: never"),
            ("disconnect_s", 0 <= self.disconnect_s < math.inf, "a finite number >= 0 (seconds)"),
            ("fault_start", self.fault_start >= 0, "a step >= 0"),
            ("fault_stop", self.fault_stop >= self.fault_start, "a step >= fault_start"),
            ("noise_dims", self.noise_dims is None or _indices(self.noise_dims) is not None,
             "comma-separated state indices such as 0,2"),
            ("shift_positions", 0 <= self.shift_positions < math.inf, "a finite number >= 0 (fraction of the range)"),
            ("friction", 0 < self.friction < math.inf, "a finite number > 0 (a scale)"),
            ("mass", 0 < self.mass < math.inf, "a finite number > 0 (a scale)")])

    def faults(self) -> Faults:
        return Faults(self.obs_noise, self.drop, self.delay_ms, self.disconnect_at, self.disconnect_s,
                      self.fault_start, self.fault_stop,
                      noise_dims=None if self.noise_dims is None else _indices(self.noise_dims))

    def shift(self) -> Shift:
        return Shift(self.shift_positions, self.friction, self.mass)

    def dynamics(self) -> Dynamics:
        return Dynamics(gain=self.gain, latency=self.action_latency)


def _indices(text: str) -> tuple[int, ...] | None:
    """0,2 -> (0, 2); None if `text` is not comma-separated indices."""
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        return None
    return dims if all(d >= 0 for d in dims) else None


def _sim_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Connect to a runtime as a robot (DEALER) and run episodes of a linear system (aircraft-pitch, "
                     "uav-2d) or any gymnasium environment id (e.g. Hopper-v5), optionally injecting faults.")
    add_flags(p, SimConfig)
    add_flags(p, SimScenario)
    key_args(p)


def cmd_sim(args: argparse.Namespace) -> int:
    scenario = config_from_args(SimScenario, args)
    cfg = config_from_args(SimConfig, args, keys=client_keys(args, "sim"))
    shift, faults = scenario.shift(), scenario.faults()
    try:
        env = make_env(scenario.env, horizon=cfg.steps, shift=shift, dynamics=scenario.dynamics())
    except ValueError as exc:
        print(f"vigil sim: {exc}", file=sys.stderr)
        return 2
    if scenario.instruction:
        if not hasattr(env, "instruction"):
            print(f"vigil sim: --instruction needs a language-conditioned task, not {scenario.env}", file=sys.stderr)
            return 2
        env.instruction = scenario.instruction
    print(f"vigil sim: {env.name} as {cfg.robot} -> {cfg.endpoint} ({cfg.mode}); faults: {faults.describe()}"
          + (f"; shift: {shift.describe()}" if not shift.none else "")
          + (f"; dynamics: {env.dynamics.describe()}" if not getattr(env, "dynamics", Dynamics()).none else ""),
          flush=True)
    try:
        episodes = run_episodes(env, cfg, faults)
    except LinkError as exc:
        print(f"vigil sim: {exc}", file=sys.stderr)
        return 1
    finally:
        env.close()
    summary = [e.summary() for e in episodes]
    for s in summary:
        line = (f"episode {s['episode']}: {s['steps']} steps, reward {s['reward']:.3f}, "
                f"latency p50 {s['latency_us']['p50']:.0f} us p99 {s['latency_us']['p99']:.0f} us, "
                f"safe actions runtime {s['runtime_safe']} robot {s['robot_safe']}, errors {s['errors']}")
        if s["success"] is not None:
            line += f", success {'yes' if s['success'] else 'no'}"
        if s["oracle_cost"] is not None:
            line += f", cost {s['cost']:.3f} (same-noise optimum {s['oracle_cost']:.3f}, T*J* {s['optimal_cost']:.3f})"
        print(line, flush=True)
    if scenario.summary:
        Path(scenario.summary).write_text(json.dumps(summary, indent=1))
    return 0


# -- expert -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertConfig:
    demos: str = field(metadata={"help": "dataset folder the demonstrations are added to (created)"})
    store: str = field(default="vigil-alerts.db", metadata={"help": "the runtime's store (SQLite file)"})
    connect: str | None = field(default=None, metadata={
        "help": "runtime operator-stream endpoint: wake up on `request` messages instead of only polling the store"})
    name: str = field(default="", metadata={"help": "who claims (default: expert-<host>-<pid>)"})
    lease_s: float = field(default=600.0, metadata={
        "help": "a claim lapses after this many seconds (a crashed expert holds nothing longer)"})
    tasks: str | None = field(default=None, metadata={"help": "comma-separated tasks to answer (default: all)"})
    once: bool = field(default=False, metadata={"help": "answer what is open now, then exit"})
    max_requests: int = field(default=0, metadata={
        "help": "exit after answering this many requests (0: no limit)", "flag": "--max"})
    timeout: float = field(default=0.0, metadata={
        "help": "exit after this many seconds without a claimable request (0: never)"})
    poll_s: float = field(default=1.0, metadata={"help": "how often the store is checked when idle"})

    def __post_init__(self) -> None:
        check_fields(self, [
            ("demos", bool(self.demos), "a dataset folder"),
            ("connect", self.connect is None or "://" in self.connect, "a ZeroMQ endpoint such as tcp://127.0.0.1:5556"),
            ("lease_s", 0 < self.lease_s < math.inf, "a finite number > 0 (seconds)"),
            ("max_requests", self.max_requests >= 0, "an integer >= 0 (0: no limit)"),
            ("timeout", 0 <= self.timeout < math.inf, "a finite number >= 0 (seconds; 0: never)"),
            ("poll_s", 0 < self.poll_s < math.inf, "a finite number > 0 (seconds)")])


def _expert_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Claim open data requests that carry a simulator recipe from the runtime's store, answer each "
                     "with a Meta-World scripted-expert demonstration from the request's reset (same task, variant "
                     "and shift), record it in the dataset format of `vigil demos record` (source \"request\", "
                     "meta.request = the id) and mark the request fulfilled, or rejected with the reason. Requests "
                     "from real robots are left to teleoperation (docs/operator.md).")
    add_flags(p, ExpertConfig)


def cmd_expert(args: argparse.Namespace) -> int:
    import os
    import socket

    from vigil.runtime.requests import RequestStore
    from vigil.sim.expert import serve_requests
    from vigil.training.demos import DemoWriter

    config = config_from_args(ExpertConfig, args)
    if not Path(config.store).exists():
        print(f"vigil expert: store {config.store} does not exist", file=sys.stderr)
        return 1
    name = config.name or f"expert-{socket.gethostname()}-{os.getpid()}"
    store = RequestStore(config.store, timeout=10.0)  # not a control loop: waiting for a lock is fine
    writer = DemoWriter(config.demos)
    stop = stop_on_signals()

    def report(a) -> None:
        print(json.dumps({"request": a.request, "task": a.task, "fulfilled": a.fulfilled, "demo": a.demo,
                          "reason": a.reason, "steps": a.steps}), flush=True)

    try:
        answers = serve_requests(store, writer, name, config.lease_s, config.connect, config.once,
                                 config.max_requests, config.timeout, config.poll_s,
                                 tuple(t for t in (config.tasks or "").split(",") if t),
                                 on_answer=report, should_stop=lambda: bool(stop))
    finally:
        store.close()
    print(f"vigil expert: {name} answered {len(answers)} request(s), "
          f"{sum(a.fulfilled for a in answers)} fulfilled", file=sys.stderr, flush=True)
    return 0


# -- demo ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    workdir: str = field(default=".vigil-demo", metadata={
        "help": "folder for the bundles, store, datasets, recordings and every command's log (reused: the "
                "exported instruction encoder is kept between runs)"})
    tasks: str = field(default="reach-v3,push-v3,pick-place-v3,door-open-v3,drawer-close-v3", metadata={
        "help": "comma-separated Meta-World MT10 tasks, one simulated robot each"})
    nominal_episodes: int = field(default=3, metadata={"help": "nominal episodes per robot"})
    shifted_episodes: int = field(default=6, metadata={"help": "shifted episodes per robot (objects moved out)"})
    shift: float = field(default=0.3, metadata={
        "help": "how far the shifted episodes move the objects beyond their range, in range widths"})
    eval_episodes: int = field(default=20, metadata={
        "help": "held-out shifted episodes per requesting task, before and after the swap"})
    worn_episodes: int = field(default=2, metadata={
        "help": "episodes of one more robot on the first task whose arm is worn (every action halved): the dynamics "
                "monitor's maintenance alert (0: none)"})
    max_steps: int = field(default=200, metadata={"help": "steps per episode, at most"})
    save_steps: int = field(default=0, metadata={"help": "fine-tuning steps of the SAVE round (0: the shipped "
                                                         "config's)"})
    calibration_episodes: int = field(default=-1, metadata={
        "help": "nominal calibration episodes per task after the SAVE round (-1: the shipped config's)"})
    console_port: int = field(default=8765, metadata={"help": "port of `vigil console` (loopback)"})
    record: bool = field(default=True, metadata={"help": "record the deployment as MCAP (needs vigil[record])"})
    screenshots: str = field(default="", metadata={
        "help": "folder to save screenshots of the console into while the demo runs (headless Chromium through "
                "selenium, vigil[dev]); empty: none"})
    realtime: bool = field(default=False, metadata={
        "help": "pace the deployment robots at 80 Hz in real time (on 2 cores five robots then starve: they "
                "apply their own safe action when an action comes late); default lockstep"})

    def __post_init__(self) -> None:
        check_fields(self, [("workdir", bool(self.workdir), "a folder"),
                            ("tasks", bool(self.task_list()), "comma-separated Meta-World task names"),
                            ("nominal_episodes", self.nominal_episodes >= 1, "an integer >= 1"),
                            ("shifted_episodes", self.shifted_episodes >= 1, "an integer >= 1"),
                            ("shift", 0 < self.shift < math.inf, "a finite number > 0 (range widths)"),
                            ("eval_episodes", self.eval_episodes >= 1, "an integer >= 1"),
                            ("worn_episodes", self.worn_episodes >= 0, "an integer >= 0"),
                            ("max_steps", self.max_steps >= 1, "an integer >= 1"),
                            ("save_steps", self.save_steps >= 0, "an integer >= 0 (0: the shipped config's)"),
                            ("calibration_episodes", self.calibration_episodes >= -1,
                             "an integer >= 0 (-1: the shipped config's)"),
                            ("console_port", 0 <= self.console_port < 65536, "a port number")])

    def task_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.tasks.split(",") if t.strip())


def _demo_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("The main job end to end: a flow-matching ensemble served with its VFD monitor; simulated robots "
                     "run nominal then shifted episodes; VFD alerts and data requests are filed; the scripted expert "
                     "answers; a SAVE round fine-tunes; `vigil swap` hot-swaps; success before and after. A few "
                     "minutes on 2 cores (sim/demo.py).")
    add_flags(p, DemoConfig)


def cmd_demo(args: argparse.Namespace) -> int:
    from vigil.sim.demo import MainDemo, run_main_demo
    from vigil.sim.metaworld_env import MT10_TASKS as MT10

    config = config_from_args(DemoConfig, args)
    unknown = [t for t in config.task_list() if t not in MT10]
    if unknown:
        print(f"vigil demo: config key 'tasks' must be MT10 tasks ({', '.join(MT10)}), got {unknown}",
              file=sys.stderr)
        return 2
    return run_main_demo(MainDemo(Path(config.workdir), config.task_list(), config.nominal_episodes,
                                  config.shifted_episodes, config.shift, config.eval_episodes, config.max_steps,
                                  save_steps=config.save_steps, calibration_episodes=config.calibration_episodes,
                                  console_port=config.console_port, worn_episodes=config.worn_episodes,
                                  record=config.record, realtime=config.realtime,
                                  screenshots=Path(config.screenshots) if config.screenshots else None))


@dataclass(frozen=True)
class LqrDemoConfig:
    workdir: str = field(default=".vigil-demo-lqr", metadata={
        "help": "folder for the bundle, alert store and simulator summary"})
    steps: int = field(default=400, metadata={"help": "simulation steps"})
    rate_hz: float = field(default=100.0, metadata={
        "help": "realtime control rate in Hz (the system's own is 20)", "flag": "--rate"})
    outage_s: float = field(default=0.5, metadata={"help": "length of the link outage injected half way"})

    def __post_init__(self) -> None:
        check_fields(self, [("workdir", bool(self.workdir), "a folder"),
                            ("steps", self.steps >= 1, "an integer >= 1"),
                            ("rate_hz", 0 < self.rate_hz < math.inf, "a finite number > 0 (Hz)"),
                            ("outage_s", 0 <= self.outage_s < math.inf, "a finite number >= 0 (seconds)")])


def _demo_lqr_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Export the optimal LQR of the aircraft-pitch system as a bundle, serve it, run the simulator "
                     "against it with a link outage half way, show the alert stream, and print a summary.")
    add_flags(p, LqrDemoConfig)


def cmd_demo_lqr(args: argparse.Namespace) -> int:
    from vigil.sim.demo_lqr import run_demo

    config = config_from_args(LqrDemoConfig, args)
    return run_demo(Path(config.workdir), config.steps, config.rate_hz, config.outage_s)


@dataclass(frozen=True)
class EvalConfig:
    bundle: str = field(metadata={"help": "the bundle folder to evaluate (a flow ensemble's, with its encoder)"})
    tasks: str | None = field(default=None, metadata={
        "help": "comma-separated Meta-World tasks (default: the tasks in the bundle's provenance)"})
    conditions: str = field(default="nominal", metadata={
        "help": "comma-separated conditions: nominal, positions (objects 0.5 range widths out), physics "
                "(friction x0.3, mass x4)"})
    episodes: int = field(default=10, metadata={"help": "episodes per task and condition (seeds seed..)"})
    seed: int = field(default=20, metadata={"help": "seed of each task's first episode (variants not in training)"})
    max_steps: int = field(default=500, metadata={"help": "steps per episode (at most)"})
    ray: bool = field(default=False, metadata={"help": "run the episodes on Ray (a local one unless --address)"})
    address: str | None = field(default=None, metadata={"help": "a Ray cluster to join (implies --ray)"})
    workers: int = field(default=2, metadata={"help": "CPUs of the local Ray"})
    served: bool = field(default=False, metadata={
        "help": "robots talk to `vigil serve` runtimes over ZeroMQ (one per node on Ray) instead of running the "
                "bundle in process: adds tick latency, stored alerts and runtime faults to the report"})
    runtimes_per_node: int = field(default=1, metadata={"help": "with --served on Ray: runtimes started on each node"})
    out: str | None = field(default=None, metadata={"help": "write every episode's result as JSON here"})

    def __post_init__(self) -> None:
        check_fields(self, [("bundle", bool(self.bundle), "a bundle folder"),
                            ("episodes", self.episodes >= 1, "an integer >= 1"),
                            ("seed", self.seed >= 0, "an integer >= 0"),
                            ("max_steps", self.max_steps >= 1, "an integer >= 1"),
                            ("workers", self.workers >= 1, "an integer >= 1"),
                            ("runtimes_per_node", self.runtimes_per_node >= 1, "an integer >= 1")])


def _eval_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Evaluate a bundle on tasks, conditions and seeds with simulated robots, serially or on Ray "
                     "(sim/fleet.py; the same episodes give the same results either way), and print the table.")
    add_flags(p, EvalConfig)


def cmd_eval(args: argparse.Namespace) -> int:
    import json
    import time

    from vigil.policies.manifest import read_manifest
    from vigil.sim import fleet
    from vigil.sim.shard import Backend

    config = config_from_args(EvalConfig, args)
    tasks = [t.strip() for t in config.tasks.split(",") if t.strip()] if config.tasks else \
        sorted(read_manifest(Path(config.bundle)).provenance.get("tasks", {}))
    if not tasks:
        print("vigil eval: no tasks given and none in the bundle's provenance (--tasks)", file=sys.stderr)
        return 2
    specs = fleet.specs_for(tasks, [c.strip() for c in config.conditions.split(",")], config.episodes, config.seed,
                            config.max_steps)
    on_ray = config.ray or bool(config.address)
    t0 = time.perf_counter()
    runtimes: list[dict] = []
    try:
        if config.served:
            backend = Backend("ray" if on_ray else "serial", config.workers, config.address)
            run = fleet.run_served(config.bundle, specs, backend, config.runtimes_per_node)
            results, runtimes = run.results, run.runtimes
        elif on_ray:
            results = fleet.run_ray(config.bundle, specs, config.workers, config.address)
        else:
            results = fleet.run_serial(config.bundle, specs)
    except (ValueError, RuntimeError) as exc:
        print(f"vigil eval: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    rows = fleet.table(results)
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()))
    print(f"{len(results)} episodes in {seconds:.1f} s ({'Ray' if on_ray else 'serial'}"
          f"{', served' if config.served else ''}), success {sum(r.success for r in results) / len(results):.0%}")
    for rt in runtimes:  # what each runtime stored, by monitor and severity
        counts: dict[str, int] = {}
        for a in rt["alerts"]:
            counts[f"{a['monitor']}.{a['severity']}"] = counts.get(f"{a['monitor']}.{a['severity']}", 0) + a["count"]
        print(f"runtime {rt['endpoint']} ({'stopped' if rt['alive'] else 'died'}): stored alerts "
              + (", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "none"))
    if config.out:
        Path(config.out).write_text(json.dumps({"rows": rows, "episodes": [r.to_dict() for r in results],
                                                "runtimes": runtimes, "seconds": seconds}, indent=1))
    return 0


PARSERS: dict[str, Command] = {
    "eval": (_eval_parser, cmd_eval),
    "sim": (_sim_parser, cmd_sim),
    "expert": (_expert_parser, cmd_expert),
    "demo": (_demo_parser, cmd_demo),
    "demo-lqr": (_demo_lqr_parser, cmd_demo_lqr),
}
