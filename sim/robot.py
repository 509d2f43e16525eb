"""The simulator playing the robot: connect to a runtime, run episodes, inject faults, measure.

Lockstep: each step sends the observation and waits for its action (deterministic, for tests and
evaluation).  Realtime: the robot keeps its own clock at `rate_hz`; an action that has not arrived by the
end of the period is replaced by the safe action, as a real robot's watchdog would.  In both modes a
robot that gets no usable action (dropped message, error reply, link down) applies the bundle's safe action.
That contract is the driver's (`RobotLink.step`); this module adds the environment, faults and statistics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from vigil.runtime.auth import ClientKeys
from vigil.runtime.client import LinkError, Reply, RobotLink
from vigil.runtime.config import MODES, check_fields
from vigil.sim.envs import Environment, LinearEnv
from vigil.sim.faults import Faults
from vigil.sim.linear import oracle, rollout_cost


@dataclass(frozen=True)
class SimConfig:
    """The robot side of `vigil sim`; fields with a help text are its flags (runtime/config.py add_flags)."""

    endpoint: str = field(default="tcp://127.0.0.1:5555", metadata={
        "help": "runtime robot-link endpoint", "flag": "--connect"})
    robot: str = field(default="sim-0", metadata={"help": "robot id announced in hello"})
    episodes: int = field(default=1, metadata={"help": "number of episodes"})
    steps: int = field(default=200, metadata={"help": "steps per episode (at most)"})
    seed: int = field(default=0, metadata={"help": "seed of the first episode (episode i uses seed+i)"})
    mode: str = field(default="lockstep", metadata={
        "help": "lockstep waits for each action; realtime keeps the robot's own clock", "choices": MODES})
    # 0: the environment's own control rate (realtime pacing, and outage pacing)
    rate_hz: float = field(default=0.0, metadata={
        "help": "control rate in Hz for realtime pacing and outages (0: the environment's own)", "flag": "--rate"})
    # lockstep: how long to wait for an action before applying the safe one
    act_timeout_s: float = field(default=1.0, metadata={
        "help": "lockstep: seconds to wait for an action", "flag": "--act-timeout"})
    transitions: bool = field(default=False, metadata={
        "help": "report each action's reward and the episode's end with the next observation, so a runtime with "
                "--transitions logs transitions for a learner (vigil learn)"})
    keys: ClientKeys | None = None  # CURVE keys for an authenticating runtime (runtime/auth.py); no flag

    def __post_init__(self) -> None:
        check_fields(self, [
            ("endpoint", "://" in self.endpoint, "a ZeroMQ endpoint such as tcp://127.0.0.1:5555"),
            ("robot", bool(self.robot), "a robot id"),
            ("episodes", self.episodes >= 1, "an integer >= 1"),
            ("steps", self.steps >= 1, "an integer >= 1"),
            ("seed", self.seed >= 0, "an integer >= 0"),
            ("mode", self.mode in MODES, f"one of {MODES}"),
            ("rate_hz", 0 <= self.rate_hz < math.inf, "a finite number >= 0 (Hz; 0: the environment's own)"),
            ("act_timeout_s", 0 < self.act_timeout_s < math.inf, "a finite number > 0 (seconds)")])


NO_FAULTS = Faults()


@dataclass
class EpisodeStats:
    episode: int
    seed: int
    steps: int = 0
    reward: float = 0.0
    cost: float = 0.0
    runtime_safe: int = 0  # actions the runtime marked safe (a monitor said stop)
    robot_safe: int = 0  # safe actions the robot applied itself (no action in time, error, link down)
    errors: int = 0
    resumed: int = 0  # times the runtime had forgotten us (restart, expiry) and the session was re-established
    verdicts: dict[str, int] = field(default_factory=dict)
    latency_us: list[float] = field(default_factory=list)
    success: bool | None = None  # tasks that report info["success"] (Meta-World): reached at any step
    scores: dict[str, list[float]] = field(default_factory=dict)  # per plan, e.g. {"vfd": [...]}, in order
    last_plan: int | None = None
    oracle_cost: float | None = None  # linear systems: optimal controller on the same noise
    optimal_cost: float | None = None  # linear systems: T * J*

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        del d["last_plan"]  # bookkeeping of _exchange, not a result
        lat = np.asarray(self.latency_us) if self.latency_us else np.zeros(1)
        d["latency_us"] = {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                           "max": float(lat.max()), "n": len(self.latency_us)}
        return d


def run_episodes(env: Environment, cfg: SimConfig, faults: Faults = NO_FAULTS,
                 on_step: Callable[[EpisodeStats], None] | None = None, first_episode: int = 0) -> list[EpisodeStats]:
    """Connect as `cfg.robot`, run `cfg.episodes` episodes of `cfg.steps` steps, say bye. Episodes are numbered
    from `first_episode` in `reset` (a fleet robot numbers them by their place in its evaluation)."""
    link = RobotLink(cfg.endpoint, cfg.robot, keys=cfg.keys)
    hello = link.hello(env.observation_spec, env.action_spec, env=env.name,
                       **({"transitions": True} if cfg.transitions else {}))
    rate = cfg.rate_hz or env.control_rate_hz
    rng = np.random.default_rng(cfg.seed + 10_000)
    results = []
    try:
        for ep in range(cfg.episodes):
            seed = cfg.seed + ep
            stats = EpisodeStats(first_episode + ep, seed)
            obs = env.reset(seed=seed)
            instruction = getattr(env, "instruction", None)  # language-conditioned tasks (Meta-World)
            recipe = getattr(env, "reset_recipe", None)  # reproducible resets: data requests can replay them
            link.reset(episode=first_episode + ep, task=env.name, seed=seed,
                       **({"instruction": instruction} if instruction is not None else {}),
                       **({"sim": recipe(seed)} if recipe is not None else {}))
            done, outcome = False, None
            while stats.steps < cfg.steps and not done:
                t = stats.steps
                if t == faults.disconnect_at:
                    obs, done = _outage(env, link, hello.safe_action, faults.disconnect_s, rate, cfg.steps, stats, obs)
                    outcome = None  # what happened during the outage is not the policy's doing
                    continue
                action = _exchange(link, faults.corrupt(obs, t, rng), faults, t, rng, cfg, rate, stats,
                                   outcome if hello.transitions else None)
                obs, done, outcome = _apply(env, action, stats)
                if on_step is not None:
                    on_step(stats)
            if hello.transitions and outcome is not None:  # the last observation: the episode's last transition
                outcome["truncated"] = outcome["truncated"] or not outcome["terminated"]
                link.step(obs, cfg.act_timeout_s, outcome=outcome)  # its action is not applied
            if isinstance(env, LinearEnv):
                K, J = oracle(env.system)
                stats.oracle_cost = rollout_cost(env.system, K, env.noise[: stats.steps])
                stats.optimal_cost = J * stats.steps
            results.append(stats)
    finally:
        link.bye()
    return results


def _apply(env: Environment, action: np.ndarray, stats: EpisodeStats):
    """Apply the action: (next observation, done, the outcome the next observation reports)."""
    result = env.step(action)
    stats.steps += 1
    stats.reward += result.reward
    stats.cost += float(result.info.get("cost", 0.0))
    if "success" in result.info:
        stats.success = bool(stats.success) or bool(result.info["success"])
    outcome = {"reward": float(result.reward), "terminated": bool(result.terminated),
               "truncated": bool(result.truncated)}
    return result.obs, result.terminated or result.truncated, outcome


def _exchange(link: RobotLink, obs, faults: Faults, t: int, rng: np.random.Generator, cfg: SimConfig,
              rate: float, stats: EpisodeStats, outcome: dict | None = None) -> np.ndarray:
    """Send one observation and return the action to apply (the safe one if none usable arrives): realtime
    waits for the rest of the period and sleeps out what is left of it; lockstep waits up to act_timeout_s."""
    t0 = time.perf_counter()
    if delay := faults.delay_s(t):
        time.sleep(delay)
    wait_until = t0 + (1.0 / rate if cfg.mode == "realtime" else cfg.act_timeout_s)
    resumed, resume_s = link.resumed, min(1.0, cfg.act_timeout_s)
    if faults.dropped(t, rng):  # lost on the way: the robot waits for an answer that cannot come
        reply = link.await_reply(link.next_seq(), wait_until - time.perf_counter(), resume_s=resume_s)
    else:
        reply = link.step(obs, wait_until - time.perf_counter(), resume_s=resume_s, outcome=outcome)
    if cfg.mode == "realtime" and (left := wait_until - time.perf_counter()) > 0:
        time.sleep(left)  # keep the robot's clock
    stats.resumed += link.resumed - resumed
    _count(reply, stats)
    return reply.action


def _count(reply: Reply, stats: EpisodeStats) -> None:
    """One tick's reply in the episode's statistics."""
    if reply.fallback is not None:
        stats.robot_safe += 1
        stats.errors += reply.message is not None  # the runtime answered with an error
        return
    stats.latency_us.append(reply.latency_s * 1e6)
    for monitor, level, _ in reply.verdicts:
        key = f"{monitor}.{level}"
        stats.verdicts[key] = stats.verdicts.get(key, 0) + 1
    stats.runtime_safe += reply.safe
    if reply.plan is not None and reply.plan != stats.last_plan:  # a chunk's actions share one plan: count it once
        stats.last_plan = reply.plan
        for name, value in reply.scores.items():
            stats.scores.setdefault(name, []).append(float(value))


def _outage(env: Environment, link: RobotLink, safe: np.ndarray, seconds: float, rate: float, max_steps: int,
            stats: EpisodeStats, obs):
    """The link is down for `seconds`: the robot keeps its control rate on the safe action, then reconnects."""
    link.close()
    t_end = time.perf_counter() + seconds
    done = False
    while time.perf_counter() < t_end:
        if stats.steps < max_steps and not done:
            obs, done, _ = _apply(env, safe, stats)
            stats.robot_safe += 1
        time.sleep(1.0 / rate)
    for _ in range(50):
        try:
            link.reconnect(timeout_s=0.2)
            break
        except LinkError:
            time.sleep(0.05)
    else:
        raise LinkError(f"could not reconnect to {link.endpoint}")
    return obs, done
