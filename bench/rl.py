"""BPO against this project's PPO and against Stable-Baselines3 PPO on MuJoCo control (issue 7, items 2 and 3).

Every run has the same budget of environment steps, the same networks (actor 256x256 ReLU mean with a
state-independent log std initialised at 0; critic 256x256 ReLU), the same rollout (2048 steps, 1
environment), minibatch (64), epochs (10), learning rate (3e-4), gamma/lambda (0.99/0.95), gradient clip
(1.0) and the same normalisation (running observation mean/std clipped at +-10, rewards scaled by the std
of the discounted return). BPO and our PPO are training/rl.py with `loss` = bpo | ppo; SB3 PPO is
stable_baselines3.PPO on a VecNormalize'd environment with those settings (its value network is separate
from the policy's, as ours is, and it bootstraps truncated episodes, as ours does).

Final return: the deterministic policy (the Gaussian's mean) on 10 evaluation episodes, reset with seeds
10000..10009, the same for every run. Our actors are evaluated through their exported `gaussian` bundle
on onnxruntime (what the robot would run); SB3's through its own predict() on observations normalised with
its frozen VecNormalize statistics. Learning curve: the mean return of the training episodes that ended in
each 2048-step rollout, averaged over seeds.

Deployment (item 3): the BPO Hopper-v5 bundle of seed 0, in process through onnxruntime against
`vigil serve` + `vigil sim --env Hopper-v5` (child processes, ZeroMQ over tcp), on the same seeds, lockstep
and realtime at the environment's 125 Hz.

Two runs at a time (one per core, one torch thread each); resumable. Raw results: one result.json per run
(bench-runs/rl/ENV/ALGO-sSEED/), deploy.json and run.json (the invocation) in bench-runs/rl, gathered into
bench/out/rl.json; the `rl` section of BENCHMARKS.md and docs/figures/rl_curves.png are rendered from them
(`--report-only` renders them again from the finished runs without training).

    .venv/bin/python -m bench.rl                  # make bench-rl
    .venv/bin/python -m bench.rl --report-only    # re-write the section from the finished runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    BENCH_RUNS,
    FIGURES,
    OUT,
    markers,
    pyplot,
    run_info,
    save_figure,
    section,
    write_benchmarks,
    write_raw,
)

NAME = "rl"
RUNS = BENCH_RUNS / "rl"
RAW = OUT / "rl.json"

BUDGET = {"InvertedPendulum-v5": 100_000, "Hopper-v5": 200_000, "HalfCheetah-v5": 200_000}
ALGOS = ("bpo", "ppo", "sb3-ppo")
EVAL_SEED, EVAL_EPISODES, MAX_STEPS = 10_000, 10, 1000
ROLLOUT = 2048


def evaluate(env_id: str, act: Callable[[np.ndarray], np.ndarray], episodes: int = EVAL_EPISODES,
             seed: int = EVAL_SEED) -> list[float]:
    """Undiscounted return of `episodes` deterministic episodes reset with seeds seed, seed+1, ..."""
    from vigil.sim.envs import GymEnv

    env = GymEnv(env_id)
    returns = []
    try:
        for ep in range(episodes):
            obs, ret, steps, done = env.reset(seed=seed + ep), 0.0, 0, False
            while steps < MAX_STEPS and not done:
                r = env.step(act(obs["state"]))
                obs, ret, steps, done = r.obs, ret + r.reward, steps + 1, r.terminated or r.truncated
            returns.append(ret)
    finally:
        env.close()
    return returns


def bundle_act(bundle: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The action the runtime would send for a state: a bundle through `Agent`, which clips to the action box
    (as training does; MuJoCo clips the control anyway, but the tasks' control cost is computed on the action
    as given). SB3's predict() clips the same way."""
    from vigil.policies.agent import Agent
    from vigil.policies.bundle import load_policy

    agent = Agent(load_policy(bundle, prefer_gpu=False))
    return lambda o: agent.act({"state": o}).action


def curve_of(episode_steps: list[int], episode_returns: list[float], total: int) -> list[float]:
    """Mean return of the episodes that ended in each rollout of ROLLOUT steps (nan where none ended)."""
    n = math.ceil(total / ROLLOUT)
    sums, counts = np.zeros(n), np.zeros(n)
    for s, r in zip(episode_steps, episode_returns):
        i = min(n - 1, max(0, math.ceil(s / ROLLOUT) - 1))
        sums[i] += r
        counts[i] += 1
    return [float(s / c) if c else float("nan") for s, c in zip(sums, counts)]


def train_ours(env_id: str, algo: str, seed: int, steps: int, out: Path) -> dict:
    import torch

    from vigil.training.rl import RLConfig, run

    torch.set_num_threads(1)
    cfg = RLConfig(loss=algo, env=env_id, total_steps=steps, seed=seed)
    info = run(cfg, out, progress=False, log=lambda s: None)
    returns = evaluate(env_id, bundle_act(out / "bundle"))
    return {"seconds": info["seconds"], "eval": returns, "curve": info["curve"], "bundle": info["bundle"]}


def sb3_model(env_id: str, seed: int):
    """SB3 PPO with the shared settings (module docstring) on a VecNormalize'd VecMonitor'd environment."""
    import torch.nn as nn
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    venv = VecNormalize(make_vec_env(env_id, n_envs=1, seed=seed), norm_obs=True, norm_reward=True, clip_obs=10.0,
                        gamma=0.99)
    return PPO("MlpPolicy", venv, n_steps=ROLLOUT, batch_size=64, n_epochs=10, learning_rate=3e-4, gamma=0.99,
               gae_lambda=0.95, clip_range=0.2, ent_coef=0.0, vf_coef=0.5, max_grad_norm=1.0, seed=seed, device="cpu",
               policy_kwargs=dict(net_arch=dict(pi=[256, 256], vf=[256, 256]), activation_fn=nn.ReLU,
                                  log_std_init=0.0), verbose=0)


def train_sb3(env_id: str, seed: int, steps: int, out: Path) -> dict:
    import torch
    from stable_baselines3.common.callbacks import BaseCallback

    torch.set_num_threads(1)
    model = sb3_model(env_id, seed)
    ep_steps, ep_returns = [], []

    class Episodes(BaseCallback):
        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:  # make_vec_env's Monitor: the raw, unnormalised return
                    ep_steps.append(self.num_timesteps)
                    ep_returns.append(float(info["episode"]["r"]))
            return True

    t0 = time.perf_counter()
    model.learn(total_timesteps=math.ceil(steps / ROLLOUT) * ROLLOUT, callback=Episodes())
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    model.save(out / "model.zip")
    venv = model.get_env()
    venv.save(str(out / "vecnormalize.pkl"))  # SB3's own format, read by nothing on board
    mean, var = venv.obs_rms.mean.copy(), venv.obs_rms.var.copy()

    def act(o: np.ndarray) -> np.ndarray:
        norm = np.clip((o - mean) / np.sqrt(var + venv.epsilon), -10.0, 10.0)
        return model.predict(norm.astype(np.float32), deterministic=True)[0]

    return {"seconds": seconds, "eval": evaluate(env_id, act), "curve": curve_of(ep_steps, ep_returns, steps),
            "bundle": None}


def job(env_id: str, algo: str, seed: int, steps: int) -> dict:
    """One training run and its evaluation; the result is written next to the run (resumable)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = RUNS / env_id / f"{algo}-s{seed}"
    res_file = out / "result.json"
    if res_file.exists():
        return json.loads(res_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    res = train_sb3(env_id, seed, steps, out) if algo == "sb3-ppo" else train_ours(env_id, algo, seed, steps, out)
    res.update(env=env_id, algo=algo, seed=seed, steps=math.ceil(steps / ROLLOUT) * ROLLOUT)
    res_file.write_text(json.dumps(res) + "\n")
    return res


# ------------------------------------------------------------------------------------------- deployment


def deploy_check(env_id: str, bundle: Path, episodes: int) -> dict:
    """The bundle in process (onnxruntime) and served (`vigil serve` + `vigil sim`), same reset seeds."""
    from vigil.runtime.launch import serving

    local = evaluate(env_id, bundle_act(bundle), episodes)
    out = {"in_process": local}
    with tempfile.TemporaryDirectory(prefix="vigil-rl-") as tmp:
        for mode in ("lockstep", "realtime"):
            with serving(bundle, Path(tmp) / mode, log_level="WARNING") as served:
                summary = Path(tmp) / f"{mode}.json"
                subprocess.run([sys.executable, "-m", "vigil.runtime.cli", "sim", "--connect", served.robot_endpoint,
                                "--env", env_id, "--robot", f"hopper-{mode}", "--episodes", str(episodes),
                                "--steps", str(MAX_STEPS), "--seed", str(EVAL_SEED), "--mode", mode,
                                "--act-timeout", "5", "--summary", str(summary)], check=True,
                               stdout=subprocess.DEVNULL, timeout=1800)
                out[mode] = json.loads(summary.read_text())
    return out


# ---------------------------------------------------------------------------------------------- report


def _ms(xs) -> str:
    xs = np.asarray(xs, float)
    return f"{xs.mean():.1f} ± {xs.std(ddof=1) if len(xs) > 1 else 0.0:.1f}"


def plot(results: dict, path: Path) -> None:
    """Learning curves: mean over seeds and min-max band, per task and algorithm."""
    plt = pyplot()
    envs = [e for e in BUDGET if e in results]
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.8), dpi=100, squeeze=False)
    for ax, env_id in zip(axes[0], envs):
        for k, algo in enumerate(ALGOS):
            runs = results[env_id].get(algo, [])
            if not runs:
                continue
            curves = np.array([[np.nan if v is None else v for v in r["curve"]] for r in runs], float)
            # carry the last value over rollouts in which no episode ended (long episodes late in training)
            for c in curves:
                for i in range(1, len(c)):
                    if np.isnan(c[i]):
                        c[i] = c[i - 1]
            x = (np.arange(curves.shape[1]) + 1) * ROLLOUT
            m = np.nanmean(curves, 0)
            ax.plot(x, m, color=f"C{k}", label=f"{algo} ({len(runs)} seeds)")
            ax.fill_between(x, np.nanmin(curves, 0), np.nanmax(curves, 0), color=f"C{k}", alpha=0.15)
        ax.set_title(env_id, fontsize=10)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("training episode return")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("mean over seeds (line) and min-max (band)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


def describe_run(minutes: float | None) -> dict[str, Any]:
    """The invocation that trained the runs: when, commit, machine, library versions, the shared settings."""
    import dataclasses

    import stable_baselines3
    import torch

    from vigil.training.rl import RLConfig

    cfg = dataclasses.asdict(RLConfig())
    return {**run_info(env="OMP_NUM_THREADS=1"), "minutes": minutes, "torch": torch.__version__,
            "stable_baselines3": stable_baselines3.__version__,
            "config": {k: cfg[k] for k in ("rollout_steps", "num_envs", "minibatch", "epochs", "lr", "gamma",
                                           "gae_lambda", "max_grad_norm", "eps", "lam", "clip")}}


def report(results: dict, seeds: int, deploy: dict | None, run: dict[str, Any] | None) -> str:
    """The section, from the runs' results, the deployment check and the invocation (`describe_run`; the
    current code's when None)."""
    run = run or describe_run(None)
    cfg, m = run["config"], run["machine"]
    took = f"; {run['minutes']:.0f} min in all" if run.get("minutes") else ""
    lines = ["## BPO vs PPO vs Stable-Baselines3 PPO (issue 7)", "",
             f"Written by `{run['command']}` on {run['started']}; commit {run['git']}; "
             f"{m['CPU']}, {m['cores']} cores, {m['memory']}; torch {run['torch']} (CPU), stable-baselines3 "
             f"{run['stable_baselines3']}.",
             f"- Two runs at a time, one torch thread each{took}.",
             f"- Budget: {', '.join(f'{e} {n // 1000}k' for e, n in BUDGET.items())} environment steps per run, "
             f"{seeds} seeds (0..{seeds - 1}) per algorithm.",
             f"- Shared: actor and critic 256x256 ReLU, log std init 0, rollout {cfg['rollout_steps']} steps x "
             f"{cfg['num_envs']} env, minibatch {cfg['minibatch']}, {cfg['epochs']} epochs, Adam {cfg['lr']}, "
             f"gamma {cfg['gamma']}, lambda {cfg['gae_lambda']}, grad clip {cfg['max_grad_norm']}, observation and "
             f"reward normalisation. BPO: eps {cfg['eps']}, lam {cfg['lam']}, median critic (log-cosh). PPO: clip "
             f"{cfg['clip']}, advantages normalised per minibatch (ours and SB3's). SB3: stable_baselines3.PPO "
             "with these settings on VecNormalize.",
             f"- Final return: the deterministic policy on {EVAL_EPISODES} evaluation episodes (reset seeds "
             f"{EVAL_SEED}..{EVAL_SEED + EVAL_EPISODES - 1}), mean per run, then mean ± std over seeds; ours through "
             "the exported bundle on onnxruntime. Time: training wall time per 10^5 environment steps, mean over "
             "seeds.",
             "",
             "| task | algorithm | final return (mean ± std over seeds) | per seed | last training rollouts | "
             "s per 10^5 steps |",
             "|---|---|---|---|---|---|"]
    verdicts = []
    for env_id in BUDGET:
        if env_id not in results:
            continue
        finals = {}
        for algo in ALGOS:
            runs = results[env_id].get(algo, [])
            if not runs:
                continue
            final = [float(np.mean(r["eval"])) for r in runs]
            finals[algo] = np.asarray(final)
            tail = [float(np.nanmean([np.nan if v is None else v for v in r["curve"][-5:]])) for r in runs]
            per_1e5 = [r["seconds"] / r["steps"] * 1e5 for r in runs]
            lines.append(f"| {env_id} | {algo} | {_ms(final)} | {', '.join(f'{x:.0f}' for x in final)} | "
                         f"{_ms(tail)} | {np.mean(per_1e5):.0f} |")
        if len(finals) == 3 and all(len(v) > 1 for v in finals.values()):
            b, p, s = (finals[a] for a in ALGOS)
            sd = s.std(ddof=1)
            verdicts.append(
                f"- {env_id}: BPO {b.mean():.1f} vs our PPO {p.mean():.1f}: "
                f"{'BPO at least PPO' if b.mean() >= p.mean() else 'BPO below PPO'}; "
                f"BPO vs SB3 {s.mean():.1f} ± {sd:.1f}: "
                f"{'within one std or above' if b.mean() >= s.mean() - sd else 'more than one std below'}; "
                f"our PPO vs SB3: {'within one std' if abs(p.mean() - s.mean()) <= sd else 'more than one std away'}"
                f"{' (above)' if p.mean() > s.mean() + sd else ' (below)' if p.mean() < s.mean() - sd else ''}.")
    lines += ["", "Targets (BPO ≥ our PPO and within one std of SB3 or above; our PPO within one std of SB3):", "",
              *verdicts, "", "![learning curves](docs/figures/rl_curves.png)", ""]
    if deploy:
        loc = np.asarray(deploy["in_process"])
        lines += ["### Deployment: the BPO Hopper-v5 bundle (seed 0) in process and over ZeroMQ", "",
                  f"The same {len(loc)} reset seeds; in process: onnxruntime on the bundle; served: `vigil serve "
                  "--bundle` + `vigil sim --env Hopper-v5` as child processes over tcp.", "",
                  "| where | mean return ± std | steps per episode | runtime safe actions | robot safe actions |",
                  "|---|---|---|---|---|",
                  f"| in process | {_ms(loc)} | - | - | - |"]
        for mode in ("lockstep", "realtime"):
            eps = deploy.get(mode) or []
            if eps:
                r = [e["reward"] for e in eps]
                lines.append(f"| served, {mode}{' (125 Hz)' if mode == 'realtime' else ''} | {_ms(r)} | "
                             f"{np.mean([e['steps'] for e in eps]):.0f} | {sum(e['runtime_safe'] for e in eps)} | "
                             f"{sum(e['robot_safe'] for e in eps)} |")
        if deploy.get("lockstep"):
            same = all(abs(e["reward"] - x) <= 1e-4 * max(1.0, abs(x)) for e, x in zip(deploy["lockstep"], loc))
            lines += ["", f"Lockstep episodes equal to the in-process ones, episode by episode: {same}."]
        lines.append("")
    return section(NAME, lines)


def collect(seeds: int) -> dict:
    results: dict = {}
    for env_id in BUDGET:
        for algo in ALGOS:
            for seed in range(seeds):
                f = RUNS / env_id / f"{algo}-s{seed}" / "result.json"
                if f.exists():
                    results.setdefault(env_id, {}).setdefault(algo, []).append(json.loads(f.read_text()))
    return results


def train(envs: list[str], seeds: int, workers: int) -> None:
    """Every missing run, two at a time (a finished run's result.json is kept: resumable)."""
    from tqdm import tqdm

    # longest first, so the two workers finish together
    jobs = sorted(((e, a, s, BUDGET[e]) for e in envs for a in ALGOS for s in range(seeds)), key=lambda j: -j[3])
    with ProcessPoolExecutor(workers) as pool:
        futures = {pool.submit(job, *j): j for j in jobs}
        for fut in tqdm(as_completed(futures), total=len(futures), desc="bench-rl runs"):
            e, a, s, _ = futures[fut]
            res = fut.result()
            tqdm.write(f"{e} {a} seed {s}: final {np.mean(res['eval']):.1f} ({res['seconds']:.0f} s)")


def reevaluate() -> None:
    """Evaluate the finished runs' bundles again (ours), after a change to evaluate()."""
    for f in sorted(RUNS.glob("*/*/result.json")):
        res = json.loads(f.read_text())
        if res.get("bundle"):
            res["eval"] = evaluate(res["env"], bundle_act(Path(res["bundle"])))
            f.write_text(json.dumps(res) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--envs", default=",".join(BUDGET), help="comma-separated subset of " + ", ".join(BUDGET))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--report-only", action="store_true", help="render the finished runs again; train nothing")
    ap.add_argument("--no-deploy", action="store_true", help="skip the deployment check over ZeroMQ")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md, figure, raw alone")
    ap.add_argument("--reevaluate", action="store_true",
                    help="evaluate the finished runs' bundles again (ours; after a change to evaluate())")
    args = ap.parse_args(argv)
    envs = [e for e in args.envs.split(",") if e]
    for e in envs:
        if e not in BUDGET:
            ap.error(f"--envs: unknown task {e!r}; expected one of {', '.join(BUDGET)}")
    run_file, deploy_file = RUNS / "run.json", RUNS / "deploy.json"
    bundle = RUNS / "Hopper-v5" / "bpo-s0" / "bundle"
    if not args.report_only:
        t0 = time.perf_counter()
        train(envs, args.seeds, args.workers)
        if args.reevaluate:
            reevaluate()
        if not args.no_deploy and bundle.exists() and not deploy_file.exists():
            deploy_file.write_text(json.dumps(deploy_check("Hopper-v5", bundle, EVAL_EPISODES)) + "\n")
        write_raw(run_file, describe_run((time.perf_counter() - t0) / 60))
    results = collect(args.seeds)
    if not results:
        raise SystemExit(f"no finished runs in {RUNS}: run the benchmark without --report-only first")
    deploy = json.loads(deploy_file.read_text()) if deploy_file.exists() else None
    run = json.loads(run_file.read_text()) if run_file.exists() else None
    text = report(results, args.seeds, deploy, run)
    print(text)
    if not args.no_write:
        write_raw(RAW, {"run": run, "results": results, "deploy": deploy})
        plot(results, FIGURES / "rl_curves.png")
        write_benchmarks(text, *markers(NAME))
    return 0


if __name__ == "__main__":
    sys.exit(main())
