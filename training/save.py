"""SAVE: uncertainty-guided acquisition of demonstrations and fine-tuning rounds.

The method: docs/algorithms.md#save-uncertainty-guided-acquisition-of-demonstrations.

One file, CleanRL style, in three parts:

1. `acquire` — which B candidate demonstrations to ask an expert for. Pure numpy, any per-candidate
   score (VFD for SAVE, Action-L2 or GU for the baselines of the same rule):
     u_T = mean score of task T's candidates;  for each of the B slots a task is drawn with
     p(T) ∝ max(u_T, 0)^tau  (tau = 2.5; tau = 0 is uniform over tasks), with replacement, capped by the
     task's remaining candidates; inside the drawn task its most uncertain remaining candidate is taken.
   "uniform" (uniform over tasks, random candidate order inside one) and "random" (B candidates uniformly
   from the whole pool) are the baselines.
2. `candidate_scores` — the score of each candidate at its initial observation, from the torch ensemble.
3. `save_round` — `vigil train save-round`: fine-tune every member warm-started from the current run's
   checkpoint on old and acquired data, half and half in every minibatch (`flow.minibatches`), for a few
   steps; export a new bundle with provenance (parent, requests, demonstrations, steps, seed) and
   re-calibrate its VFD thresholds on nominal rollouts (training/calibrate.py).

    vigil train save-round --run runs/mt10 --old-demos data/mt10 --acquired data/acquired \\
        --requests vigil-alerts.db --out runs/mt10-r1

In deployment the acquisition is the runtime's: a VFD alert files a data request (runtime/requests.py),
`vigil expert` answers it, and a round fine-tunes on what was answered (docs/save.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from vigil.runtime.config import ConfigError, check_table, read_toml
from vigil.training.demos import DemoSet

RULES = ("save", "uniform", "random")
SCORES = ("vfd", "action_l2", "gu")
DEFAULT_TAU = 2.5

# ------------------------------------------------------------------------------------------ acquisition


def task_uncertainty(uncertainty_by_task: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """u_T: the mean score of each task's candidates (nan for a task without candidates)."""
    return {t: float(np.mean(s)) if len(s) else math.nan for t, s in uncertainty_by_task.items()}


def task_probabilities(u: np.ndarray, left: np.ndarray, tau: float) -> np.ndarray:
    """p(T) ∝ max(u_T, 0)^tau over tasks with candidates left (0^0 = 1: tau = 0 is uniform); if every
    such task has p = 0 (all uncertainties <= 0), uniform over the tasks with candidates left."""
    w = np.where(left > 0, np.power(np.maximum(np.nan_to_num(u, nan=0.0), 0.0), tau), 0.0)
    if w.sum() <= 0:
        w = (left > 0).astype(np.float64)
    return w / w.sum()


def acquire(uncertainty_by_task: Mapping[str, Sequence[float]], budget: int, tau: float = DEFAULT_TAU,
            rng: np.random.Generator | None = None, rule: str = "save") -> list[tuple[str, int]]:
    """Choose `budget` candidates: a list of (task, index into that task's candidates), in slot order.

    rule "save": per slot a task with p ∝ max(u_T, 0)^tau among tasks with candidates left (with
    replacement across slots, so an uncertain task can fill several), then its most uncertain remaining
    candidate (ties: lower index first). "uniform": the same with tau = 0 and the candidates of a task in
    random order. "random": `budget` candidates uniformly from the pool, tasks ignored. A budget larger
    than the pool takes the whole pool. Scores may be any uncertainty (VFD, Action-L2, ...); they must be
    finite."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, not {rule!r}")
    if budget < 0 or not 0 <= tau < math.inf:
        raise ValueError(f"budget must be >= 0 and tau finite and >= 0, got {budget} and {tau}")
    rng = rng if rng is not None else np.random.default_rng()
    tasks = list(uncertainty_by_task)
    scores = [np.asarray(uncertainty_by_task[t], np.float64).reshape(-1) for t in tasks]
    if any(not np.all(np.isfinite(s)) for s in scores):
        raise ValueError("candidate scores must be finite")
    sizes = np.array([len(s) for s in scores], np.int64)
    if rule == "random":
        pool = [(t, i) for t, n in zip(tasks, sizes) for i in range(n)]
        pick = rng.choice(len(pool), size=min(budget, len(pool)), replace=False) if pool else []
        return [pool[k] for k in pick]
    if rule == "save":
        order = [np.argsort(-s, kind="stable") for s in scores]  # most uncertain first
        u = np.array(list(task_uncertainty(dict(zip(tasks, scores))).values()), np.float64)
    else:
        order = [rng.permutation(n) for n in sizes]
        u, tau = np.ones(len(tasks)), 0.0
    taken = np.zeros(len(tasks), np.int64)
    out: list[tuple[str, int]] = []
    for _ in range(min(budget, int(sizes.sum()))):
        k = int(rng.choice(len(tasks), p=task_probabilities(u, sizes - taken, tau)))
        out.append((tasks[k], int(order[k][taken[k]])))
        taken[k] += 1
    return out


def by_task(tasks: Sequence[str], scores: Sequence[float]) -> tuple[dict[str, np.ndarray], dict[str, list[int]]]:
    """Group per-candidate scores by task for `acquire`: ({task: scores}, {task: candidate indices}); a
    pick (task, i) of `acquire` is candidate `indices[task][i]`."""
    index: dict[str, list[int]] = {}
    for k, t in enumerate(tasks):
        index.setdefault(t, []).append(k)
    s = np.asarray(scores, np.float64)
    return {t: s[ix] for t, ix in index.items()}, index


def candidate_scores(ensemble, candidates: Sequence, encoder, score: str = "vfd", samples: int | None = None,
                     seed: int = 0, batch: int = 256) -> np.ndarray:
    """Each candidate demonstration's uncertainty at its initial observation (SAVE's step 1): what
    the policy thinks before the expert shows anything. candidates: Episodes (training/demos.py: task,
    instruction, observations with "state" and, for vision ensembles, "image"); encoder: the onboard
    InstructionEncoder (anything with `embed`). score: "vfd" (one-way, the ensemble's pair convention),
    "action_l2" or "gu"; `samples` noise samples per candidate (default cfg.vfd_samples), seeded. -> (n,)"""
    import torch

    from vigil.training.flow import IMAGE, STATE, action_l2, gu, vfd_one_way

    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, not {score!r}")
    cfg = ensemble.cfg
    n = len(candidates)
    if n == 0:
        return np.zeros(0)
    texts = sorted({c.instruction for c in candidates})
    table = dict(zip(texts, np.asarray(encoder.embed(texts), np.float32)))
    state = np.stack([np.asarray(c.observations[STATE][0], np.float32) for c in candidates])
    instr = torch.from_numpy(np.stack([table[c.instruction] for c in candidates]))
    image = np.stack([np.asarray(c.observations[IMAGE][0]) for c in candidates]) if cfg.vision else None
    N, H, m, M = samples or cfg.vfd_samples, cfg.horizon, cfg.action_dim, cfg.members
    # all the noise first: a candidate's score does not depend on how the candidates are batched
    shape = (M, N, n, H, m) if score == "action_l2" else (N, n, H, m)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    fn = {"vfd": vfd_one_way, "action_l2": action_l2, "gu": gu}[score]
    out = []
    for lo in range(0, n, batch):
        sl = slice(lo, min(n, lo + batch))
        obs: Any = torch.from_numpy(state[sl])
        if image is not None:
            obs = {STATE: obs, IMAGE: torch.from_numpy(image[sl])}
        out.append(fn(ensemble, obs, instr[sl], noise[..., sl, :, :]).cpu().numpy().astype(np.float64))
    return np.concatenate(out)


def rollout_scores(ensemble, candidates: Sequence, encoder, plans: int = 8, seed: int = 0,
                   envs: dict | None = None, max_steps: int = 500) -> np.ndarray:
    """Each candidate's mean one-way VFD over the policy's own first `plans` plans, played in simulation from
    the candidate's reset (its task and seed: the Meta-World variant), executing H // 2 actions per plan as
    a flow_ensemble bundle does. What the onboard VFD monitor would see there, rather than the uncertainty
    at the first observation only (`candidate_scores`): the `save_rollout` rule of bench/save.py, which
    needed about half the demonstrations of uniform acquisition where the initial-observation score did
    not beat it (BENCHMARKS.md, SAVE; docs/decisions.md 84). candidates: anything with task, seed and
    instruction (EpisodeInfo or Episode); envs: a {task: env} cache to reuse across calls. -> (n,)"""
    import torch

    from vigil.sim.envs import make_env
    from vigil.training.flow import STATE, plan

    cfg = ensemble.cfg
    H, m, N, execute = cfg.horizon, cfg.action_dim, cfg.vfd_samples, max(1, cfg.horizon // 2)
    envs = {} if envs is None else envs
    out = []
    for c in candidates:
        env = envs.get(c.task)
        if env is None:
            env = envs[c.task] = make_env(c.task, horizon=max_steps)
        instr = torch.as_tensor(encoder.embed([c.instruction]), dtype=torch.float32)
        rng = np.random.default_rng([seed, int(c.seed), 7])
        obs, scores = env.reset(seed=int(c.seed)), []
        for _ in range(plans):
            state = torch.as_tensor(obs[STATE], dtype=torch.float32)[None]
            chunk, vfd = plan(ensemble, state, instr,
                              torch.from_numpy(rng.standard_normal((N, 1, H, m), dtype=np.float32)))
            scores.append(float(vfd[0]))
            done = False
            for a in np.clip(chunk[0].numpy(), -1.0, 1.0)[:execute]:
                r = env.step(a)
                obs, done = r.obs, r.terminated or r.truncated
                if done:
                    break
            if done:
                break
        out.append(float(np.mean(scores)))
    return np.asarray(out)


# ---------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SaveConfig:
    """One fine-tuning round (the `[save]` table of a TOML config; CLI flags override it).

    steps = 2000: a tenth of pretraining's 20 000 (FlowConfig.steps). A round starts from a converged
    ensemble and adds a few demonstrations; long rounds would mostly re-fit the old data. lr and
    batch_size 0 keep the run's. seed -1: the parent's seed plus the round number, so every round draws
    fresh minibatches and noise. Calibration as `vigil calibrate` (its episodes per task on nominal
    variants from calibration_seed on); 0 episodes skips it and the bundle has no monitor.vfd."""

    # fields with a help text are also flags of `vigil train save-round` (runtime/config.py add_flags)
    steps: int = field(default=2000, metadata={"help": "fine-tuning optimiser steps"})
    lr: float = 0.0
    batch_size: int = 0
    seed: int = field(default=-1, metadata={
        "help": "seed of the round's minibatches and noise (-1: parent's + round)"})
    calibration_episodes: int = field(default=10, metadata={
        "help": "nominal calibration episodes per task (0: no calibration)"})
    calibration_seed: int = field(default=40, metadata={"help": "seed of each task's first calibration episode"})
    calibration_max_steps: int = field(default=500, metadata={"help": "steps per calibration episode, at most"})
    calibration_all_episodes: bool = field(default=False, metadata={
        "help": "calibrate on every rollout, not only the successful ones"})

    def check(self) -> SaveConfig:
        """Refuse values a round cannot use; errors name the key."""
        for key, ok, expected in (("steps", self.steps >= 1, "an integer >= 1"),
                                  ("lr", 0 <= self.lr < math.inf, "a finite number >= 0 (0: the run's)"),
                                  ("batch_size", self.batch_size >= 0, "an integer >= 0 (0: the run's)"),
                                  ("seed", self.seed >= -1, "an integer >= 0, or -1 (parent's seed + round)"),
                                  ("calibration_episodes", self.calibration_episodes >= 0, "an integer >= 0"),
                                  ("calibration_seed", self.calibration_seed >= 0, "an integer >= 0"),
                                  ("calibration_max_steps", self.calibration_max_steps >= 1, "an integer >= 1")):
            if not ok:
                raise ConfigError(f"config key 'save.{key}' must be {expected}, got {getattr(self, key)!r}")
        return self


def save_config_from_dict(doc: Mapping[str, Any], **overrides: Any) -> SaveConfig:
    """SaveConfig from a parsed TOML document's `[save]` table (absent: defaults), then non-None overrides.
    Other tables are left to their readers (a flow config may carry [flow] and [save] together)."""
    table = doc.get("save", {})
    if not isinstance(table, Mapping):
        raise ConfigError("config key 'save' must be a table ([save]) of SaveConfig fields")
    values = check_table(SaveConfig, table, "save")
    values.update(check_table(SaveConfig, {k: v for k, v in overrides.items() if v is not None}, "save"))
    return SaveConfig(**values).check()


def load_save_config(path: str | Path | None = None, **overrides: Any) -> SaveConfig:
    return save_config_from_dict(read_toml(path) if path is not None else {}, **overrides)


# ------------------------------------------------------------------------------------------ fine-tuning


def concat_data(parts: Sequence[tuple]) -> tuple:
    """Concatenate (obs, instr, chunks) training sets; obs may be {"state", "image"} mappings (vision)."""
    obs = [p[0] for p in parts]
    if isinstance(obs[0], Mapping):
        obs_all: Any = {k: np.concatenate([o[k] for o in obs]) for k in obs[0]}
    else:
        obs_all = np.concatenate(obs)
    return obs_all, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def replay_groups(n_old: int, n_acquired: int) -> np.ndarray:
    """The group label of each example of old + acquired data: 0 old, 1 acquired. `train_ensemble` draws an
    equal share of each group into every minibatch: half old, half acquired (SAVE's step 5)."""
    return np.concatenate([np.zeros(n_old, np.int64), np.ones(n_acquired, np.int64)])


def finetune(ensemble, cfg, old: tuple, acquired: tuple, progress: bool = True):
    """Fine-tune every member of `ensemble` (copied, not changed; its observation normalisation is kept)
    on old and acquired (obs, instr, chunks), half and half in every minibatch, with cfg's optimisation
    settings (steps, lr, batch_size, seed). Returns (ensemble, history) as `train_ensemble`."""
    from vigil.training.flow import train_ensemble

    n_old, n_acq = len(old[2]), len(acquired[2])
    if n_old == 0 or n_acq == 0:
        raise ValueError(f"a round needs old and acquired examples, got {n_old} and {n_acq}")
    obs, instr, chunks = concat_data([old, acquired])
    return train_ensemble(cfg, obs, instr, chunks, progress=progress, ensemble=ensemble,
                          groups=replay_groups(n_old, n_acq))


# -------------------------------------------------------------------------------------------- the data


@dataclass(frozen=True)
class Acquired:
    """One acquired demonstration: where it is, and the request it answered (None if not from one)."""

    dataset: str
    episode: str
    task: str
    request: int | None


def acquired_demos(folder: str | Path, requests: str | Path | None = None,
                   log: Callable[[str], None] = print) -> list[Acquired]:
    """The successful demonstrations of a dataset folder (what `vigil expert` or a teleoperation tool
    wrote). With a request store: only those that fulfilled requests of that store (its `fulfilled` rows
    naming this folder), so demonstrations recorded for other reasons are left out. The request id comes
    from the store, else from the episode's `meta.request` (source "request")."""
    demos = DemoSet(folder)
    here = demos.folder.resolve()
    ok = {e.id: e for e in demos.episodes(success=True)}
    failed = len(demos) - len(ok)
    if failed:
        log(f"acquired: {failed} unsuccessful episode(s) in {folder} left out")
    if requests is None:
        return [Acquired(str(here), e.id, e.task, e.meta.get("request") if e.source == "request" else None)
                for e in ok.values()]
    from vigil.runtime.requests import RequestStore

    store = RequestStore(requests, readonly=True)
    try:
        fulfilled = store.list(status="fulfilled")
    finally:
        store.close()
    out, elsewhere = [], 0
    for r in fulfilled:
        if r.dataset is None or Path(r.dataset).resolve() != here:
            elsewhere += 1
            continue
        info = ok.get(r.demo or "")
        if info is None:
            raise ValueError(f"request #{r.id} names episode {r.demo!r} of {here}, which is not a successful "
                             f"episode there")
        out.append(Acquired(str(here), info.id, info.task, r.id))
    if elsewhere:
        log(f"acquired: {elsewhere} fulfilled request(s) of {requests} answered into other datasets, left out")
    return out


def _old_episode_ids(demos: DemoSet, tasks: Sequence[str], exclude: set[str]) -> list[str]:
    return [e.id for e in demos.episodes(success=True) if e.task in tasks and e.id not in exclude]


def _merge_stats(into: dict, stats: Mapping[str, Mapping[str, Any]]) -> None:
    for task, s in stats.items():
        t = into.setdefault(task, {"episodes": 0, "steps": 0, "instruction": s["instruction"]})
        t["episodes"] += s["episodes"]
        t["steps"] += s["steps"]


# ------------------------------------------------------------------------------------------------ round


def save_round(run_dir: str | Path, old_demos: Sequence[str | Path], acquired_dir: str | Path,
               out_dir: str | Path, requests: str | Path | None = None, config: SaveConfig = SaveConfig(),
               encoder: str | Path | None = None, progress: bool = True,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """One SAVE round: RUN (a `vigil train flow` or earlier round's folder: ensemble.pt, provenance.json,
    bundle/) + old demonstrations + acquired ones -> OUT with ensemble.pt, loss.csv, learning_curve.png,
    provenance.json and the calibrated bundle OUT/bundle. Returns a summary."""
    import torch

    from vigil.policies.instructions import InstructionEncoder
    from vigil.policies.manifest import read_manifest
    from vigil.training.calibrate import DEFAULT_ALPHAS, DEFAULT_WINDOW, calibrate_bundle
    from vigil.training.train_flow import (
        _git_commit,
        check_flow_config,
        dataset_tensors,
        export_run,
        fit_density,
        load_checkpoint,
        write_run,
    )

    config = config.check()
    run, out = Path(run_dir), Path(out_dir)
    if out.resolve() == run.resolve():
        raise ValueError("--out must be a new folder, not the parent run's")
    parent, cfg, ck = load_checkpoint(run / "ensemble.pt")
    parent_prov: dict[str, Any] = dict(ck["provenance"])
    parent_save = parent_prov.get("save") or {}
    round_no = int(parent_save.get("round", 0)) + 1
    manifest = read_manifest(run / "bundle") if (run / "bundle" / "manifest.json").is_file() else None
    seed = config.seed if config.seed >= 0 else cfg.seed + round_no
    round_cfg = check_flow_config(dataclasses.replace(
        cfg, steps=config.steps, seed=seed, lr=config.lr or cfg.lr, batch_size=config.batch_size or cfg.batch_size))

    # the encoder the parent was trained with, unless given: a run built on another computer names a folder
    # that is not here (the demo's shipped ensemble); any export of the same packaged encoder embeds alike
    encoder_path = Path(encoder) if encoder is not None else Path(parent_prov["encoder"]["folder"])
    encoder = InstructionEncoder.load(encoder_path, prefer_gpu=False)
    acquired = acquired_demos(acquired_dir, requests, log)
    if not acquired:
        raise ValueError(f"no acquired demonstrations in {acquired_dir}"
                         + (f" that fulfilled requests of {requests}" if requests else ""))
    acq_set = DemoSet(acquired_dir)
    acq_stats: dict[str, dict] = {}
    acq_data = dataset_tensors(acq_set, cfg, encoder, stats=acq_stats, episode_ids=[a.episode for a in acquired])

    old_parts, old_stats, old_sources = [], {}, []
    tasks = sorted(parent_prov.get("tasks", {}))
    exclude = {a.episode for a in acquired}  # when old and acquired share a folder
    for folder in old_demos:
        demos = DemoSet(folder)
        ids = _old_episode_ids(demos, tasks, exclude if demos.folder.resolve() == acq_set.folder.resolve() else set())
        if not ids:
            log(f"old data: no successful episodes of {tasks} in {folder}")
            continue
        stats: dict[str, dict] = {}
        old_parts.append(dataset_tensors(demos, cfg, encoder, stats=stats, episode_ids=ids))
        _merge_stats(old_stats, stats)
        old_sources.append({"dataset": str(demos.folder.resolve()), "episodes": len(ids),
                            "steps": int(sum(s["steps"] for s in stats.values()))})
    if not old_parts:
        raise ValueError(f"no old data: none of {[str(f) for f in old_demos]} has successful episodes of the "
                         f"run's tasks {tasks}")
    old_data = concat_data(old_parts)
    n_old, n_acq = len(old_data[2]), len(acq_data[2])
    log(f"round {round_no}: {n_old} old steps ({sum(s['episodes'] for s in old_stats.values())} episodes), "
        f"{n_acq} acquired steps ({len(acquired)} demonstrations: "
        f"{', '.join(sorted({a.task for a in acquired}))}), half and half per minibatch, {config.steps} steps")

    all_stats: dict[str, dict] = {}
    _merge_stats(all_stats, old_stats)
    _merge_stats(all_stats, acq_stats)
    base_name = parent_save.get("base_name") or (manifest.name if manifest is not None else None)
    provenance: dict[str, Any] = {
        **{k: v for k, v in parent_prov.items() if k in ("encoder", "successful_only")},
        "encoder": {"folder": str(encoder_path.resolve()), "name": encoder.meta.get("name"),
                    "onnx_sha256": encoder.meta.get("onnx", {}).get("sha256"), "dim": encoder.dim},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "demos": [s["dataset"] for s in old_sources] + [str(acq_set.folder.resolve())],
        "tasks": all_stats,
        "episodes": sum(s["episodes"] for s in all_stats.values()),
        "steps": int(n_old + n_acq),
        "config": asdict(round_cfg),
        "config_file": None,
        "seed": seed,
        "versions": {**parent_prov.get("versions", {}), "torch": torch.__version__, "numpy": np.__version__},
        "git_commit": _git_commit(),
        "save": {
            "round": round_no,
            "parent": {"run": str(run.resolve()), "bundle": str((run / "bundle").resolve()) if manifest else None,
                       "policy": manifest.policy_id if manifest else None, "seed": cfg.seed,
                       "steps": cfg.steps, "round": int(parent_save.get("round", 0))},
            "lineage": list(parent_save.get("lineage", [])) + [manifest.policy_id if manifest else str(run.resolve())],
            "base_name": base_name,
            "requests": sorted({a.request for a in acquired if a.request is not None}),
            "request_store": str(Path(requests).resolve()) if requests is not None else None,
            "acquired": [asdict(a) for a in acquired],
            "old": old_sources,
            "replay": "every minibatch half old, half acquired (flow.minibatches)",
            "steps": config.steps, "seed": seed, "lr": round_cfg.lr, "batch_size": round_cfg.batch_size,
            "config": asdict(config),
        },
    }
    t0 = time.perf_counter()
    ens, history = finetune(parent, round_cfg, old_data, acq_data, progress=progress)
    write_run(out, ens, round_cfg, provenance, history, time.perf_counter() - t0,
              f"SAVE round {round_no} from {base_name or run.name}: {len(acquired)} acquired demos, "
              f"{config.steps} steps, seed {seed}", log)
    rate = manifest.control_rate_hz if manifest is not None else 80.0  # same rate: the swap requires it
    name = f"{base_name}-r{round_no}" if base_name else None
    density = None
    # the fine-tuned encoder moved: the failure monitor's RND is fitted again, where the parent had one (a parent
    # without the head, such as the demo's shipped ensemble, gets none: a round does not add monitors)
    if round_cfg.density_steps > 0 and (manifest is None or "rnd" in manifest.onnx_scores):
        obs_all, instr_all, _ = concat_data([old_data, acq_data])
        density = fit_density(out, ens, round_cfg, obs_all, instr_all, provenance, progress, log)
    bundle = export_run(out, ens, round_cfg, encoder_path, provenance, rate, log, name=name, density=density)
    from vigil.training.dynamics import carry_over

    carry_over(run / "bundle", bundle)  # the dynamics monitor's ensemble: same robot, recalibrated below

    calibration = None
    if config.calibration_episodes > 0:
        parent_vfd = dict(manifest.monitor.get("vfd", {})) if manifest is not None else {}
        calibration, _ = calibrate_bundle(
            bundle, None, config.calibration_episodes, config.calibration_seed,
            int(parent_vfd.get("window", DEFAULT_WINDOW)), dict(parent_vfd.get("alphas", DEFAULT_ALPHAS)),
            config.calibration_max_steps, progress=progress, successful_only=not config.calibration_all_episodes)
        log(f"calibration: thresholds {calibration['thresholds']} from {calibration['episodes']} episode(s)")
    else:
        log("calibration: skipped (calibration_episodes = 0): the bundle has no monitor.vfd; run vigil calibrate")
    provenance["calibration"] = calibration
    (out / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    return {"round": round_no, "checkpoint": str(out / "ensemble.pt"), "bundle": bundle,
            "provenance": str(out / "provenance.json"), "requests": provenance["save"]["requests"],
            "acquired": len(acquired), "loss_first": provenance["loss_first"], "loss_last": provenance["loss_last"],
            "calibrated": calibration is not None}
