"""Rollouts for the failure-prediction study (issue 18): every signal at every plan of whole episodes.

A run is a `vigil train flow` folder with ensemble.pt and density.pt (configs/flow-mt10-failure.toml). Episodes
are played in process with the torch ensemble acting exactly as its bundle does in the runtime (member 0's
chunk from the plan's noise, 4 of 8 actions executed, noise from a generator seeded by the episode seed). At
every plan, until the episode ends (success held, or the 500-step limit), the signals of docs/failure.md:

    vfd      the bundle's one-way VFD                         (in the graph)
    rnd      RND on member 0's context                        (in the graph, training/density.py)
    logpzo   logpZO on member 0's context                     (in the graph)
    tinc     temporal inconsistency: mean squared difference between the overlapping parts of this plan's
             chunk and the previous one (the executed chunks; free on board)
    gu       GU: sum of log variance across members from 5 shared noise draws
    ace      action-chunk entropy (FIPER): 32 chunks of member 0, a histogram per action element with cells of
             0.03 x the action range, mean entropy over elements
    stac     STAC: squared MMD (RBF kernel, median bandwidth of the first plan) between the overlapping parts
             of this plan's 32 sampled chunks and the previous plan's
    stillness  minus the log of how far the observed state moved since the previous plan (a stalled robot
             barely moves; free on board, from the observations the monitor already sees)
    random   uniform noise (the floor)

Conditions: nominal (variants 20..39), calibration (variants 40..59: conformal bands and combiners are fitted
on these only), positions (0.5 range widths out), physics (friction x0.3, mass x4), noise (std 0.01 on the
dimensions that vary in the task's demonstrations), heldout (Meta-World tasks outside the training set).
Output: OUT/episodes-<run>.jsonl, one line per episode with every signal's per-plan list.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import add_fleet_args, fleet_backend
from bench.flow_detect import _init_worker, varying_dims
from vigil.sim.shard import Backend, shard

SIGNALS = ("vfd", "rnd", "logpzo", "tinc", "gu", "ace", "stac", "stillness", "random")
CONDITIONS = ("nominal", "calibration", "positions", "physics", "noise", "heldout")
NOISE_STD = 0.01
ACE_SAMPLES = 32
ACE_CELL = 0.03 * 2.0  # 0.03 x the action range [-1, 1]


@dataclass(frozen=True)
class Job:
    run: str
    condition: str
    task: str
    seeds: tuple[int, ...]
    max_steps: int = 500
    noise_dims: tuple[int, ...] | None = None


_MODELS: dict[str, object] = {}


def _model(run: str):
    if run not in _MODELS:
        import torch

        from vigil.policies.instructions import InstructionEncoder
        from vigil.training import density
        from vigil.training.train_flow import load_checkpoint

        torch.set_num_threads(1)
        ens, _, _ = load_checkpoint(Path(run) / "ensemble.pt")
        heads = density.load(Path(run) / "density.pt")
        _MODELS[run] = (ens, heads, InstructionEncoder.load(Path(run) / "bundle" / "encoder"))
    return _MODELS[run]


def ace(samples: np.ndarray) -> float:
    """Mean over action elements of the entropy of the samples' histogram (cells ACE_CELL wide)."""
    cells = np.floor(samples.reshape(len(samples), -1) / ACE_CELL).astype(np.int64)  # (S, D)
    total = 0.0
    for col in cells.T:
        _, counts = np.unique(col, return_counts=True)
        p = counts / counts.sum()
        total -= float((p * np.log(p)).sum())
    return total / cells.shape[1]


def mmd2(x: np.ndarray, y: np.ndarray, bw: float) -> float:
    """Biased squared MMD with an RBF kernel of bandwidth bw between sample sets x (n, d) and y (m, d)."""
    def k(a, b):
        d = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-d / (2 * bw * bw))
    return float(k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean())


def run_job(job: Job) -> list[dict]:
    import torch

    from vigil.monitors.failure import stillness
    from vigil.sim.envs import make_env
    from vigil.sim.faults import Faults
    from vigil.sim.shifts import Shift
    from vigil.training import flow

    ens, heads, encoder = _model(job.run)
    cfg = ens.cfg
    shift = {"positions": Shift(positions=0.5), "physics": Shift(friction=0.3, mass=4.0)}.get(job.condition, Shift())
    faults = Faults(NOISE_STD, noise_dims=job.noise_dims) if job.condition == "noise" else Faults()
    env = make_env(job.task, horizon=job.max_steps, shift=shift)
    instr = torch.as_tensor(encoder.embed([env.instruction]), dtype=torch.float32)
    N, H, m = cfg.vfd_samples, cfg.horizon, cfg.action_dim
    execute = max(1, H // 2)
    overlap = H - execute
    out = []
    try:
        for seed in job.seeds:
            rng = np.random.default_rng(seed)  # the runtime's Agent: same generator, same draws
            brng = np.random.default_rng([seed, zlib.crc32(f"{job.condition}/{job.task}".encode())])
            nrng = np.random.default_rng([seed, 2])
            obs = env.reset(seed=seed)
            sig: dict[str, list[float]] = {k: [] for k in SIGNALS}
            success, success_step, steps, queue = False, None, 0, []
            prev_chunk = prev_samples = prev_state = None
            bw = None
            while steps < job.max_steps:
                if not queue:
                    seen = faults.corrupt(obs, steps, nrng)
                    o = torch.as_tensor(seen["state"], dtype=torch.float32)[None]
                    noise = torch.from_numpy(rng.standard_normal((1, N, H, m), dtype=np.float32)).transpose(0, 1)
                    with torch.no_grad():
                        chunk, vfd = flow.plan(ens, o, instr, noise)
                        rnd, lpz = heads(ens.encode(o, instr, members=[0])[0])
                        shared = torch.from_numpy(brng.standard_normal((5, 1, H, m), dtype=np.float32))
                        g = flow.gu(ens, o, instr, shared)
                        many = torch.from_numpy(brng.standard_normal((ACE_SAMPLES, 1, H, m), dtype=np.float32))
                        samples = np.clip(flow.sample(ens, o, instr, many)[:, 0].numpy(), -1, 1)  # (S, H, m)
                    c = np.clip(chunk[0].numpy(), -1.0, 1.0)
                    sig["vfd"].append(float(vfd[0]))
                    sig["rnd"].append(float(rnd[0]))
                    sig["logpzo"].append(float(lpz[0]))
                    sig["gu"].append(float(g[0]))
                    sig["ace"].append(ace(samples))
                    sig["random"].append(float(brng.random()))
                    state = np.asarray(seen["state"], np.float64)
                    sig["stillness"].append(stillness(prev_state, state))
                    prev_state = state
                    if prev_chunk is None:
                        sig["tinc"].append(0.0)
                        sig["stac"].append(0.0)
                        flat = samples.reshape(len(samples), -1)
                        d = np.sqrt(((flat[:, None] - flat[None]) ** 2).sum(-1))
                        bw = float(np.median(d[d > 0])) if (d > 0).any() else 1.0
                    else:
                        sig["tinc"].append(float(((c[:overlap] - prev_chunk[execute:]) ** 2).mean()))
                        sig["stac"].append(mmd2(samples[:, :overlap].reshape(len(samples), -1),
                                                prev_samples[:, execute:].reshape(len(samples), -1), bw))
                    prev_chunk, prev_samples = c, samples
                    queue = list(c[:execute])
                result = env.step(queue.pop(0))
                steps += 1
                if float(result.info.get("success", 0.0)) >= 1.0 and not success:
                    success, success_step = True, steps
                obs = result.obs
                if result.terminated or result.truncated:
                    break
            out.append({"run": Path(job.run).name, "condition": job.condition, "task": job.task, "seed": seed,
                        "success": success, "success_step": success_step, "steps": steps, "execute": execute,
                        "signals": {k: [float(f"{x:.5g}") if math.isfinite(x) else x for x in v]
                                    for k, v in sig.items()}})
    finally:
        env.close()
    return out


def jobs_for(run: Path, episodes: int, calib: int, heldout: list[str], conditions: tuple[str, ...]) -> list[Job]:
    prov = json.loads((run / "provenance.json").read_text())
    demos = Path(prov["demos"])
    jobs = []
    for task in sorted(prov["tasks"]):
        seeds = tuple(range(20, 20 + episodes))
        for c in conditions:
            if c == "nominal":
                jobs.append(Job(str(run), c, task, tuple(range(20, 20 + 2 * episodes))))
            elif c == "calibration":
                jobs.append(Job(str(run), c, task, tuple(range(40, 40 + calib))))
            elif c == "noise":  # the dimensions that vary in the task's demonstrations (bench/flow_detect.py)
                jobs.append(Job(str(run), c, task, seeds, noise_dims=varying_dims(demos, task)[0]))
            elif c != "heldout":
                jobs.append(Job(str(run), c, task, seeds))
    if "heldout" in conditions:
        jobs += [Job(str(run), "heldout", t, tuple(range(20, 20 + episodes))) for t in heldout]
    return jobs


def collect(runs: list[Path], out: Path, episodes: int = 10, calib: int = 20, heldout_tasks: int = 9,
            conditions: tuple[str, ...] = CONDITIONS, workers: int = 2, backend=None) -> None:
    """Play every run's missing episodes into OUT/episodes-<run>.jsonl (resumable through a .part file)."""
    from tqdm import tqdm

    from vigil.sim.metaworld_env import HELDOUT_INSTRUCTIONS

    out.mkdir(parents=True, exist_ok=True)
    heldout = list(HELDOUT_INSTRUCTIONS)[:heldout_tasks]
    jobs = [j for r in runs for j in jobs_for(r, episodes, calib, heldout, conditions)
            if not (out / f"episodes-{r.name}.jsonl").exists()]
    if not jobs:
        return
    files = {Path(j.run).name: out / f"episodes-{Path(j.run).name}.jsonl.part" for j in jobs}
    done = {(n, e["condition"], e["task"]) for n, f in files.items() if f.exists()
            for e in map(json.loads, f.read_text().splitlines())}
    jobs = [j for j in jobs if (Path(j.run).name, j.condition, j.task) not in done]
    t0 = time.monotonic()
    backend = backend or Backend("processes", workers)
    with tqdm(total=sum(len(j.seeds) for j in jobs), desc="episodes") as bar:
        for done in shard(run_job, sorted(jobs, key=lambda j: -len(j.seeds)), backend, initializer=_init_worker):
            if done.error is not None:
                raise done.error
            job, eps = done.item, done.value
            with open(files[Path(job.run).name], "a") as fh:
                for e in eps:
                    fh.write(json.dumps(e) + "\n")
            bar.update(len(eps))
            bar.set_postfix(last=f"{job.condition}/{job.task}", ok=f"{np.mean([e['success'] for e in eps]):.0%}")
    for f in set(files.values()):
        f.rename(f.with_suffix(""))
    with open(out / "rollouts.jsonl", "a") as fh:
        fh.write(json.dumps({"runs": [r.name for r in runs], "minutes": round((time.monotonic() - t0) / 60, 1),
                             "workers": backend.workers, "backend": backend.kind}) + "\n")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--calibration-episodes", type=int, default=20)
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    add_fleet_args(ap)
    a = ap.parse_args()
    collect([Path(r) for r in a.runs.split(",")], Path(a.out), a.episodes, a.calibration_episodes,
            conditions=tuple(a.conditions.split(",")), backend=fleet_backend(a))
