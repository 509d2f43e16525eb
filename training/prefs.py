"""The preference loop's offline half: record a pool of the policy's attempts, summarise them, ask, learn a reward.

    episodes recorded (collect_pool) -> pairs chosen (training/pairs.py) -> the operator answers (console,
    `vigil prefs answer`; runtime/preferences.py stores it) -> reward model refitted (training/reward_model.py)
    -> post-training with the learned reward (`vigil train posttrain --reward`) -> hot swap

A pool is a dataset folder in the demonstration format (training/demos.py) whose episodes are the policy's own
attempts (`source = "policy"`), with their observations, executed actions, rewards and success flags. The rewards
are kept for evaluation and for the simulated annotator; a learned reward never reads them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_AGENTS: dict[str, Any] = {}  # per worker process: the bundle's agent, loaded once


def _agent(bundle: str):
    if bundle not in _AGENTS:
        from vigil.policies.agent import Agent
        from vigil.policies.bundle import load_policy

        _AGENTS[bundle] = Agent(load_policy(Path(bundle), prefer_gpu=False))
    return _AGENTS[bundle]


def play_attempts(job: tuple[str, tuple[int, ...]], bundle: str, max_steps: int) -> list:
    """One task's attempts by the bundle, played as the runtime plays it (policies.agent.Agent, seeded)."""
    from vigil.sim.envs import make_env
    from vigil.training.demos import Episode

    task, seeds = job
    agent = _agent(bundle)
    env = make_env(task, horizon=max_steps)
    out = []
    try:
        for seed in seeds:
            obs = env.reset(seed=seed)
            agent.reset(env.instruction, seed)
            states, actions, rewards, success = [obs["state"]], [], [], []
            for _ in range(max_steps):
                step = agent.act(obs)
                r = env.step(step.action)
                obs = r.obs
                states.append(obs["state"])
                actions.append(np.asarray(step.action, np.float32))
                rewards.append(r.reward)
                success.append(float(r.info.get("success", 0.0)) >= 1.0)
                if r.terminated or r.truncated:
                    break
            out.append(Episode(task=task, instruction=env.instruction, seed=seed,
                               observations={"state": np.stack(states).astype(np.float32)},
                               actions=np.stack(actions), rewards=np.asarray(rewards, np.float32),
                               success=np.asarray(success, bool), source="policy",
                               meta={"bundle": str(bundle), "max_steps": max_steps}))
    finally:
        env.close()
    return out


def collect_pool(bundle: str | Path, tasks: Sequence[str], episodes: int, seed: int, max_steps: int,
                 out: str | Path, backend=None, progress: bool = True) -> list[str]:
    """Record `episodes` attempts per task (seeds seed..) into the pool `out`; on `backend` (sim/shard.py)."""
    from tqdm import tqdm

    from vigil.sim.shard import Backend, shard
    from vigil.training.demos import DemoWriter

    writer = DemoWriter(out)
    bundle = str(Path(bundle).resolve())
    jobs = [(t, tuple(range(seed + k, seed + min(k + 8, episodes)))) for t in tasks for k in range(0, episodes, 8)]
    ids = []
    with tqdm(total=len(tasks) * episodes, desc="attempts", disable=not progress) as bar:
        for done in shard(play_attempts, jobs, backend or Backend("serial"), (bundle, max_steps)):
            if done.error is not None:
                raise done.error
            ids += [writer.add(e) for e in done.value]
            bar.update(len(done.value))
    return ids


@dataclass
class Pool:
    """A pool's episodes as arrays: ids, tasks, summaries x (N, D) and the truth kept for evaluation."""

    ids: list[str]
    tasks: np.ndarray
    x: np.ndarray
    ret: np.ndarray      # dense return over the whole horizon (horizon_return; never read by a learned reward)
    steps: np.ndarray
    success: np.ndarray

    def index(self) -> dict[str, int]:
        return {e: i for i, e in enumerate(self.ids)}

    def groups(self, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        keep = np.ones(len(self.ids), bool) if mask is None else mask
        return {t: np.flatnonzero((self.tasks == t) & keep) for t in np.unique(self.tasks)}


def load_pool(folder: str | Path, run: str | Path, every: int = 4, tasks: Sequence[str] | None = None) -> Pool:
    """Summaries of every episode of the pool with the run's flow ensemble (its member 0 encoder) and the
    instruction encoder its bundle ships."""
    from vigil.policies.instructions import InstructionEncoder
    from vigil.training.demos import DemoSet
    from vigil.training.reward_model import summaries
    from vigil.training.train_flow import load_checkpoint

    ens, _, _ = load_checkpoint(Path(run) / "ensemble.pt")
    encoder = InstructionEncoder.load(encoder_folder(run), prefer_gpu=False)
    ds = DemoSet(folder)
    infos = [e for e in ds.episodes() if tasks is None or e.task in tasks]
    embed = {t: encoder.embed([i])[0] for t, i in {e.task: e.instruction for e in infos}.items()}
    eps = [ds.load(e.id) for e in infos]
    x = summaries(ens, [(e.observations["state"], embed[e.task], e.actions) for e in eps], every)
    return Pool([e.id for e in infos], np.array([e.task for e in infos]), x,
                np.array([horizon_return(e.rewards, int(e.meta.get("max_steps", e.steps))) for e in eps]),
                np.array([e.steps for e in eps]),
                np.array([e.succeeded for e in eps]))


def horizon_return(rewards: np.ndarray, horizon: int) -> float:
    """Meta-World's dense return over the whole horizon. An episode that ended early because the task was held
    done keeps its last reward until the horizon: otherwise a success, which ends the episode, would earn less
    than a failure that runs to the time limit collecting shaped reward."""
    rewards = np.asarray(rewards, float)
    return float(rewards.sum() + max(0, horizon - len(rewards)) * (rewards[-1] if len(rewards) else 0.0))


def encoder_folder(run: str | Path) -> Path:
    """The instruction encoder a run's bundle ships (or the one it was trained with)."""
    import json

    run = Path(run)
    if (run / "bundle" / "encoder" / "encoder.json").exists():
        return run / "bundle" / "encoder"
    prov = json.loads((run / "provenance.json").read_text())
    return Path(prov["encoder"]["folder"])


# ------------------------------------------------------------------------------- the loop from the command line


def save_model(fitted, folder: str | Path, ens, meta: dict[str, Any]) -> Path:
    """reward.onnx + reward.json (the runtime's), reward.pt (the posterior, for choosing the next pairs)."""
    import json

    import torch

    from vigil.training.reward_model import export_onnx

    folder = Path(folder)
    cfg = ens.cfg
    export_onnx(ens, fitted, folder, cfg.obs_dim, cfg.instr_dim, cfg.action_dim)
    torch.save({"heads": fitted.heads, "cov": fitted.cov, "cfg": fitted.cfg}, folder / "reward.pt")
    info = json.loads((folder / "reward.json").read_text())
    (folder / "reward.json").write_text(json.dumps({**info, **meta}, indent=1, default=str))
    return folder


def load_model(folder: str | Path):
    import torch

    from vigil.training.reward_model import Fitted

    d = torch.load(Path(folder) / "reward.pt", weights_only=False)  # our own file, written by save_model
    return Fitted(d["cfg"], d["heads"], d["cov"])


def answered(store: str | Path, pool: Pool, pool_dir: str | Path) -> tuple[np.ndarray, list[str], list[int]]:
    """The store's answered queries on this pool: pairs (rows of pool), answers, query ids."""
    from vigil.runtime.preferences import PreferenceStore

    index = pool.index()
    st = PreferenceStore(store, readonly=True)
    try:
        recs = [r for r in st.list(status="answered") if Path(r.pool).resolve() == Path(pool_dir).resolve()
                and r.episode_a in index and r.episode_b in index]
    finally:
        st.close()
    pairs = np.array([(index[r.episode_a], index[r.episode_b]) for r in recs], int).reshape(-1, 2)
    return pairs, [r.answer for r in recs], [r.id for r in recs]


def train_reward(store: str | Path, pool_dir: str | Path, run: str | Path, out: str | Path, method: str = "ensemble",
                 seed: int = 0) -> dict[str, Any]:
    """Fit the reward model on every answered query of the pool; write it to `out` (ONNX for the runtime)."""
    from vigil.training.reward_model import RewardConfig, fit, labels_of
    from vigil.training.train_flow import load_checkpoint

    pool = load_pool(pool_dir, run)
    pairs, answers, ids = answered(store, pool, pool_dir)
    keep, y = labels_of(answers)
    if not keep.any():
        raise ValueError(f"no answered queries on {pool_dir} in {store} (answer some: vigil prefs answer)")
    fitted = fit(pool.x, pairs[keep], y, RewardConfig(method=method, seed=seed))
    ens, _, _ = load_checkpoint(Path(run) / "ensemble.pt")
    meta = {"answers": int(keep.sum()), "unsure": int((~keep).sum()), "queries": ids, "pool": str(pool_dir),
            "run": str(run), "store": str(store)}
    save_model(fitted, out, ens, meta)
    mean, std = fitted.mean_std(pool.x)
    return {**{k: v for k, v in meta.items() if k != "queries"}, "out": str(out), "method": method,
            "mean_std": float(std.mean())}


def ask(store: str | Path, pool_dir: str | Path, run: str | Path, rule: str, batch: int,
        model: str | Path | None = None, seed: int = 0) -> list[int]:
    """Choose `batch` new pairs of the pool with `rule` (over the model's posterior; without a model, every
    episode looks alike and only `random` makes sense) and file them as open queries."""
    from vigil.runtime.preferences import PreferenceStore
    from vigil.training.pairs import RULES, select_batch

    if rule not in RULES:
        raise ValueError(f"rule {rule!r}: expected one of {RULES}")
    if model is None and rule != "random":
        raise ValueError(f"rule {rule!r} needs a reward model (--model; train one with vigil prefs train)")
    pool = load_pool(pool_dir, run)
    samples = load_model(model).samples(pool.x) if model is not None else np.zeros((1, len(pool.ids)))
    st = PreferenceStore(store)
    try:
        asked = {tuple(sorted((a, b))) for a, b in _all_pairs(st, pool)}
        start = len(asked)
        chosen = select_batch(rule, samples, pool.groups(), batch, np.random.default_rng([seed, start]), asked,
                              start=start)
        ids = []
        for task, a, b in chosen:
            p = float(np.mean(1.0 / (1.0 + np.exp(-(samples[:, a] - samples[:, b]))))) if model is not None else None
            ids.append(st.add(task, str(Path(pool_dir).resolve()), pool.ids[a], pool.ids[b], rule, batch=start,
                              predicted=p).id)
    finally:
        st.close()
    return ids


def _all_pairs(st, pool: Pool) -> list[tuple[int, int]]:
    index = pool.index()
    return [(index[r.episode_a], index[r.episode_b]) for r in st.list()
            if r.episode_a in index and r.episode_b in index]


def annotate(store: str | Path, pool_dir: str | Path, kind: str = "bt", by: str = "simulated-operator",
             seed: int = 0, temperature: float = 0.1, flip: float = 0.15) -> int:
    """Answer every open query on the pool as a simulated operator (sim/annotator.py) would. Returns how many."""
    from vigil.runtime.preferences import PreferenceError, PreferenceStore
    from vigil.sim.annotator import Annotator, spreads
    from vigil.training.demos import DemoSet

    ann = Annotator(kind, temperature, flip)
    ds = DemoSet(pool_dir)
    infos = ds.episodes()
    eps = {e.id: ds.load(e.id) for e in infos}
    ret = np.array([horizon_return(eps[e.id].rewards, int(eps[e.id].meta.get("max_steps", eps[e.id].steps)))
                    for e in infos])
    steps = np.array([eps[e.id].steps for e in infos])
    tasks = np.array([e.task for e in infos])
    utility = ann.utility(ret, steps)
    u = dict(zip([e.id for e in infos], utility, strict=True))
    spread = spreads(utility, tasks)
    rng = np.random.default_rng(seed)
    st = PreferenceStore(store)
    n = 0
    try:
        for r in st.list(status="open"):
            if r.episode_a not in u or r.episode_b not in u:
                continue
            a = ann.answer(np.array([u[r.episode_a]]), np.array([u[r.episode_b]]), spread[r.task], rng)[0]
            try:
                st.answer(r.id, "a" if a else "b", by)
                n += 1
            except PreferenceError:
                pass  # answered meanwhile by someone else: theirs stands
    finally:
        st.close()
    return n
