"""Calibrate a bundle's VFD monitor on nominal rollouts, and write the thresholds into its manifest.

The monitor (monitors/vfd.py) compares a short running mean of the per-plan VFD with thresholds; they are
chosen conformally (monitors/conformal.py) from the scores of rollouts that went well: nominal task
variants the policy did not see in training, played by the bundle exactly as the runtime plays it
(`policies.agent.Agent`: same session, same chunk execution, same per-episode instruction embedding and
seeded plan noise), successful episodes only. Every windowed score of every such episode is one
calibration score, so the false-alarm rate is per plan, the rate a running robot sees per decision.

    vigil calibrate --bundle runs/mt10/bundle --episodes 10 --seed 40
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vigil.monitors.conformal import calibrate
from vigil.monitors.failure import STILL, base_name, stillness
from vigil.policies.agent import Agent
from vigil.policies.bundle import Policy, load_policy
from vigil.policies.manifest import Manifest, read_manifest
from vigil.training.failure import FEATURES, failure_block

DEFAULT_ALPHAS: dict[str, float] = {"warn": 0.25, "alert": 0.10}  # alert: the paper's false-alarm rate
DEFAULT_WINDOW = 3  # plans in the running mean: 150 ms at 80 Hz with 4 of 8 actions per chunk
DYNAMICS_WINDOW = 20  # ticks in the dynamics monitor's running mean (250 ms at 80 Hz; docs/dynamics.md)
DYNAMICS_WARMUP = 3  # ticks at an episode's start the dynamics monitor does not judge


@dataclass
class Rollout:
    task: str
    seed: int
    success: bool = False
    steps: int = 0
    scores: dict[str, list[float]] = field(default_factory=dict)  # per plan, in order
    success_plan: int | None = None  # plans made before the first success (None: never succeeded)
    ret: float = 0.0  # the episode's return (sum of rewards)
    states: list[np.ndarray] | None = None  # with record=True: every observed state (T+1) ...
    actions: list[np.ndarray] | None = None  # ... and every action applied (T): the dynamics monitor's data


def rollout(agent: Agent, env, seed: int, max_steps: int = 500, record: bool = False) -> Rollout:
    """One episode of `env` (a vigil Environment with an `instruction`) driven by `agent` in process; `record`
    keeps its states and actions (the dynamics monitor's calibration)."""
    out = Rollout(env.name, seed)
    obs = env.reset(seed=seed)
    agent.reset(getattr(env, "instruction", None), seed)
    state, plans = None, 0
    if record:
        out.states, out.actions = [np.asarray(obs["state"], np.float32)], []
    for _ in range(max_steps):
        step = agent.act(obs)
        if step.replanned:
            plans += 1
            for name, value in step.scores.items():
                out.scores.setdefault(name, []).append(float(value))
            if "state" in obs:  # the failure monitor's one observation feature, as the runtime computes it
                now = np.asarray(obs["state"], np.float64)
                out.scores.setdefault(STILL, []).append(stillness(state, now))
                state = now
        result = env.step(step.action)
        if record:
            out.actions.append(np.asarray(step.action, np.float32))
            out.states.append(np.asarray(result.obs["state"], np.float32))
        out.steps += 1
        out.ret += float(result.reward)
        if not out.success and float(result.info.get("success", 0.0)) >= 1.0:
            out.success, out.success_plan = True, plans
        obs = result.obs
        if result.terminated or result.truncated:
            break
    return out


def fleet_rollouts(folder: str | Path, tasks: Sequence[str], episodes: int, seed: int, max_steps: int = 500,
                   workers: int = 2, address: str | None = None, record: bool = False) -> list[Rollout]:
    """The same rollouts as `nominal_rollouts`, played on Ray by sim/fleet.py (identical results, in order)."""
    from vigil.sim import fleet

    specs = fleet.specs_for(tasks, ["nominal"], episodes, seed, max_steps, record)
    return [r.rollout for r in fleet.run_ray(folder, specs, workers, address)]


def nominal_rollouts(policy: Policy, tasks: Sequence[str], episodes: int, seed: int, max_steps: int = 500,
                     progress: bool = True, record: bool = False) -> list[Rollout]:
    """`episodes` nominal episodes per task, seeds seed..seed+episodes-1 (Meta-World: variant seed % 50)."""
    from tqdm import tqdm

    from vigil.sim.envs import make_env

    camera = any(spec.name == "image" for spec in policy.manifest.observation)
    agent = Agent(policy)
    out = []
    with tqdm(total=len(tasks) * episodes, desc="calibration rollouts", disable=not progress) as bar:
        for task in tasks:
            env = make_env(task, horizon=max_steps, camera=camera)
            try:
                for k in range(episodes):
                    out.append(rollout(agent, env, seed + k, max_steps, record))
                    bar.update()
            finally:
                env.close()
    return out


def monitor_block(rollouts: Sequence[Rollout], window: int = DEFAULT_WINDOW,
                  alphas: Mapping[str, float] = DEFAULT_ALPHAS, score: str = "vfd",
                  successful_only: bool = True) -> dict:
    """The manifest's `monitor.vfd` map from rollouts: thresholds from the successful ones (from all of
    them with successful_only=False, for tasks that report no success)."""
    good = [r.scores.get(score, []) for r in rollouts if (r.success or not successful_only) and r.scores.get(score)]
    if not good:
        raise ValueError(f"no {'successful ' if successful_only else ''}rollout with '{score}' scores to calibrate "
                         "on (more episodes, or --all-episodes where the task reports no success)")
    thresholds = calibrate(good, window, dict(alphas))
    return {"score": score, "window": window, "thresholds": thresholds, "alphas": dict(alphas),
            "n_calibration": int(sum(len(s) for s in good)), "episodes": len(good),
            "calibration_success": float(np.mean([r.success for r in rollouts])),
            "successful_only": successful_only,
            "tasks": sorted({r.task for r in rollouts})}


def write_monitor(folder: str | Path, block: Mapping, name: str = "vfd") -> Manifest:
    """Replace `monitor.<name>` in the bundle's manifest (atomically; the graph and its sha256 unchanged)."""
    folder = Path(folder)
    read_manifest(folder)  # a valid bundle before we touch it
    path = folder / "manifest.json"
    raw = json.loads(path.read_text())
    raw.setdefault("monitor", {})[name] = json.loads(json.dumps(block))
    tmp = path.with_name(f".manifest.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(raw, indent=2) + "\n")
    os.replace(tmp, path)
    return read_manifest(folder)


def calibrate_bundle(folder: str | Path, tasks: Sequence[str] | None = None, episodes: int = 10, seed: int = 40,
                     window: int = DEFAULT_WINDOW, alphas: Mapping[str, float] = DEFAULT_ALPHAS,
                     max_steps: int = 500, progress: bool = True, successful_only: bool = True,
                     failure_alpha: float = 0.10, ray: bool = False, address: str | None = None,
                     workers: int = 2, dynamics_alpha: float = 0.10,
                     dynamics_window: int = DYNAMICS_WINDOW) -> tuple[dict, list[Rollout]]:
    """Roll the bundle out on nominal variants of its tasks (default: the tasks in its provenance), write
    the calibrated `monitor.vfd` into its manifest, return (the block, the rollouts). A bundle whose graph also
    reports the density score (rnd) gets `monitor.failure` from the same rollouts too (per-episode
    false-alarm rate failure_alpha; 0 skips it; docs/failure.md), and a bundle with a dynamics ensemble gets its
    monitor's bands and q (per-episode false-alarm rate dynamics_alpha, every rollout; 0 skips it;
    docs/dynamics.md)."""
    folder = Path(folder)
    policy = load_policy(folder, prefer_gpu=False)
    if "vfd" not in policy.manifest.onnx_scores:
        raise ValueError(f"{folder}: the bundle's graph has no 'vfd' output to calibrate")
    if tasks is None:
        tasks = sorted(policy.manifest.provenance.get("tasks", {}))
        if not tasks:
            raise ValueError(f"{folder}: no tasks in the bundle's provenance; name them")
    dynamics = dynamics_alpha > 0 and policy.dynamics is not None
    if ray or address:  # a fleet on Ray (sim/fleet.py): the same rollouts, shared out
        rollouts = fleet_rollouts(folder, list(tasks), episodes, seed, max_steps, workers, address, record=dynamics)
    else:
        rollouts = nominal_rollouts(policy, list(tasks), episodes, seed, max_steps, progress, record=dynamics)
    block = monitor_block(rollouts, window, alphas, successful_only=successful_only)
    write_monitor(folder, block)
    if failure_alpha > 0 and {base_name(f)[0] for f in FEATURES} - {STILL} <= set(policy.manifest.onnx_scores):
        prov_tasks = policy.manifest.provenance.get("tasks", {})
        instructions = {v["instruction"]: t for t, v in prov_tasks.items() if isinstance(v, Mapping)
                        and isinstance(v.get("instruction"), str)}
        try:
            failure = failure_block([{"task": r.task, "success": r.success, "scores": r.scores,
                                      "success_plan": r.success_plan} for r in rollouts],
                                    window=window, alpha=failure_alpha, instructions=instructions,
                                    successful_only=successful_only)
        except ValueError as exc:  # the VFD thresholds stand; say why the failure monitor was not calibrated
            block = {**block, "failure": {"skipped": str(exc)}}
        else:
            write_monitor(folder, failure, "failure")
            block = {**block, "failure": {k: v for k, v in failure.items() if k not in ("bands", "instructions")}}
    if dynamics:
        try:
            dyn = dynamics_block(policy, rollouts, dynamics_alpha, dynamics_window)
        except ValueError as exc:  # too few rollouts: the monitor stays off (uncalibrated); say why
            block = {**block, "dynamics": {"skipped": str(exc)}}
        else:
            write_monitor(folder, dyn, "dynamics")
            block = {**block, "dynamics": {k: dyn[k] for k in ("window", "alpha", "q", "warmup", "episodes")}}
    return block, rollouts


def dynamics_block(policy: Policy, rollouts: Sequence[Rollout], alpha: float = 0.10,
                   window: int = DYNAMICS_WINDOW, warmup: int = DYNAMICS_WARMUP) -> dict:
    """The bundle's `monitor.dynamics` with bands and q from the recorded rollouts (every one: the physics does
    not depend on whether the task succeeded), the model's keys kept."""
    from vigil.monitors.dynamics import CALIBRATION_KEYS, bands_block, calibrate_bands

    model = policy.dynamics
    by_task: dict[str, list] = {}
    for r in rollouts:
        if r.actions:
            by_task.setdefault(r.task, []).append(model.scores(np.asarray(r.states), np.asarray(r.actions)))
    bands, q = calibrate_bands(by_task, window, alpha, warmup)
    prov_tasks = policy.manifest.provenance.get("tasks", {})
    instructions = {v["instruction"]: t for t, v in prov_tasks.items() if isinstance(v, Mapping)
                    and isinstance(v.get("instruction"), str)}
    keep = {k: v for k, v in policy.manifest.monitor["dynamics"].items() if k not in CALIBRATION_KEYS}
    return {**keep, **bands_block(bands, q, window, alpha, instructions, warmup,
                                  sum(len(v) for v in by_task.values()))}
