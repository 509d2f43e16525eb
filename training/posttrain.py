"""Post-training a flow ensemble without an expert: the simulator judges outcomes (docs/posttrain.md).

One file, CleanRL style: `PosttrainConfig` holds the hyperparameters, `run` is the loop. Each iteration:

    collect   the current policy plays `episodes` episodes per task in process (member 0's chunk from fresh
              noise, as its bundle plays), recording at every plan the observation and the whole sampled chunk,
              and per episode the dense return, the success flag and the safety cost
    weigh     an objective turns episodes into a pseudo-reward r~ and every plan of an episode gets its weight
    fine-tune every member on the weighted samples (reward-weighted flow matching: minibatches drawn in proportion
              to the weights; or `top`: the best fraction only), so the ensemble stays an ensemble

The entropy-regularised optimum of E[r~] - T KL(pi || pi_pre) is pi* proportional to pi_pre exp(r~ / T);
sampling the policy's own chunks and re-weighting them by exp(r~ / T) estimates it directly. Objectives:

    mean         r~ = the episode's return, standardised per task
    cvar-left    TFFT: the left-CVaR dual, eta* = argmax eta - E[(eta - R)_+] / alpha (the alpha-quantile of the
                 returns per task), then r~ = -(eta* - R)_+ / alpha: only the lower tail is penalised
    constrained  CFO: r~ = R - lam g - rho/2 g_+^2 with g = cost - budget, and lam <- max(0, lam + rho E[g])
                 after every iteration (the dual update)
    expand       ActFlow: attempts on situations just beyond the training range (object positions moved out),
                 chosen where VFD is highest among candidates (or uniformly: `guide = "uniform"`); a verifier
                 (the simulator's success flag) keeps the successful attempts, and every member continues
                 training on them beside a replay of the original demonstrations, half and half

The safety cost is the fraction of steps on which the end effector moved faster than `speed_limit` (m/s).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

OBJECTIVES = ("mean", "cvar-left", "constrained", "expand")
WEIGHTINGS = ("exp", "top", "ppo", "gbpo")  # two reward-weighted flow-matching ways, two policy-gradient losses
GUIDES = ("vfd", "uniform")


@dataclass(frozen=True)
class PosttrainConfig:
    """Hyperparameters of a post-training run (the `[posttrain]` table of configs/posttrain.toml)."""

    objective: str = "mean"
    weighting: str = "exp"          # exp: reward-weighted flow matching; top: filtered self-imitation;
    #                                 ppo / gbpo: policy gradient through stochastic Euler steps (§ machinery)
    sigma: float = 0.1              # ppo / gbpo: noise of the stochastic Euler steps (x += v dt + sigma sqrt(dt) e)
    pg_epochs: int = 4              # ppo / gbpo: passes over the collected plans per iteration
    pg_lr: float = 1e-5             # ppo / gbpo: Adam's step (the path likelihoods are sharp)
    clip: float = 0.2               # ppo's clip, gbpo's eps
    iterations: int = 3
    episodes: int = 10              # per task per iteration
    max_steps: int = 300
    temperature: float = 0.5        # T of exp(r~ / T), r~ in per-task standard deviations
    top_fraction: float = 0.3       # `top`: the share of episodes kept
    cvar_alpha: float = 0.2         # the left tail TFFT penalises
    speed_limit: float = 1.0        # m/s of the end effector (the hand is state[0:3], 80 Hz); the expert's p90
    cost_budget: float = 0.05       # allowed share of steps above the speed limit
    rho: float = 0.5                # CFO's penalty weight and dual step (on costs in per-task standard deviations)
    expand_shift: float = 0.3       # object/goal positions, in range widths beyond the training range
    candidates: int = 3             # expand: candidate situations per attempt, the one with the highest VFD kept
    guide: str = "vfd"              # expand: vfd | uniform
    teacher: str = "self"           # expand: self (the policy's own attempts) | expert (the scripted expert plays the
    #                                 chosen situations instead: SAVE at the same number of simulator episodes)
    steps: int = 400                # fine-tuning steps per iteration
    lr: float = 3e-4
    batch_size: int = 128
    seed: int = 0
    tasks: tuple[str, ...] = field(default_factory=tuple)  # default: the run's tasks
    reward: str = ""                # a learned reward (`vigil prefs train` folder): its predicted return replaces the
    #                                 simulator's in the objective (the evaluation still reports the simulator's)
    pad_success: bool = False       # the simulator's return over the whole horizon: an episode ended early by a held
    #                                 success keeps its last reward to max_steps (training/prefs.horizon_return)

    def check(self) -> PosttrainConfig:
        from vigil.runtime.config import ConfigError

        def bad(key: str, expected: str) -> ConfigError:
            return ConfigError(f"config key 'posttrain.{key}' must be {expected}, got {getattr(self, key)!r}")

        for key, options in (("objective", OBJECTIVES), ("weighting", WEIGHTINGS), ("guide", GUIDES),
                             ("teacher", ("self", "expert"))):
            if getattr(self, key) not in options:
                raise bad(key, f"one of {options}")
        for key in ("iterations", "episodes", "max_steps", "steps", "batch_size", "candidates", "pg_epochs"):
            if getattr(self, key) < 1:
                raise bad(key, "an integer >= 1")
        for key in ("temperature", "lr", "speed_limit", "rho", "sigma", "clip", "pg_lr"):
            if not 0 < getattr(self, key) < math.inf:
                raise bad(key, "a finite number > 0")
        for key in ("top_fraction", "cvar_alpha"):
            if not 0 < getattr(self, key) <= 1:
                raise bad(key, "a number in (0, 1]")
        if not 0 <= self.cost_budget <= 1:
            raise bad("cost_budget", "a share of steps in [0, 1]")
        if self.expand_shift < 0:
            raise bad("expand_shift", "a number >= 0")
        if self.reward and not (Path(self.reward) / "reward.onnx").exists():
            raise bad("reward", "a reward model folder with reward.onnx (vigil prefs train)")
        if self.reward and self.objective == "expand":
            raise bad("reward", "empty for expand (its verifier is the simulator's success)")
        return self


# -------------------------------------------------------------------------------------------- objectives


def cvar_threshold(returns: Sequence[float] | np.ndarray, alpha: float) -> float:
    """eta* = argmax_eta eta - E[(eta - R)_+] / alpha, the left tail's dual (TFFT). The objective is concave and
    piecewise linear with kinks at the samples, so its maximum is at a sample: the alpha-quantile."""
    r = np.sort(np.asarray(returns, float))
    values = [eta - np.maximum(eta - r, 0).mean() / alpha for eta in r]
    return float(r[int(np.argmax(values))])


def left_cvar(returns: Sequence[float] | np.ndarray, alpha: float) -> float:
    """CVaR_alpha of the lower tail, via the same dual: max_eta eta - E[(eta - R)_+] / alpha."""
    r = np.asarray(returns, float)
    eta = cvar_threshold(r, alpha)
    return float(eta - np.maximum(eta - r, 0).mean() / alpha)


def cvar_pseudo_reward(returns: np.ndarray, eta: float, alpha: float) -> np.ndarray:
    """TFFT's left-tail pseudo-reward -(eta - R)_+ / alpha: zero above the threshold, only the tail penalised."""
    return -np.maximum(eta - np.asarray(returns, float), 0.0) / alpha


def lagrangian_reward(returns: np.ndarray, g: np.ndarray, lam: float, rho: float) -> np.ndarray:
    """CFO's augmented-Lagrangian pseudo-reward R - lam g - rho/2 g_+^2 (g = cost - budget)."""
    g = np.asarray(g, float)
    return np.asarray(returns, float) - lam * g - 0.5 * rho * np.maximum(g, 0.0) ** 2


def dual_update(lam: float, mean_g: float, rho: float) -> float:
    """lam <- max(0, lam + rho E[g]): the constraint's price rises while it is violated, falls (to 0) once met."""
    return max(0.0, lam + rho * float(mean_g))


def episode_weights(pseudo: np.ndarray, temperature: float, weighting: str, top_fraction: float) -> np.ndarray:
    """exp: exp((r~ - max r~) / T) (the KL-regularised optimum's density ratio); top: 1 for the best fraction."""
    pseudo = np.asarray(pseudo, float)
    if weighting == "top":
        k = max(1, int(round(top_fraction * len(pseudo))))
        w = np.zeros(len(pseudo))
        w[np.argsort(-pseudo, kind="stable")[:k]] = 1.0
        return w
    return np.exp((pseudo - pseudo.max()) / temperature)


def standardise_per_task(values: np.ndarray, tasks: Sequence[str]) -> np.ndarray:
    out = np.asarray(values, float).copy()
    tasks = np.asarray(tasks)
    for t in np.unique(tasks):
        m = tasks == t
        out[m] = (out[m] - out[m].mean()) / (out[m].std() + 1e-8)
    return out


def verified(episodes: Sequence[Attempt]) -> list[Attempt]:
    """The verifier: the simulator's success flag. Only attempts it accepts become training data."""
    return [e for e in episodes if e.success]


# -------------------------------------------------------------------------------------------- rollouts


@dataclass
class Attempt:
    """One episode of the current policy: what the fine-tuning needs, and what the evaluation reports."""

    task: str
    seed: int
    obs: list[np.ndarray] = field(default_factory=list)     # state at every plan
    chunks: list[np.ndarray] = field(default_factory=list)  # the sampled chunk (H, m) at every plan
    ret: float = 0.0
    success: bool = False
    over: int = 0       # steps above the speed limit
    steps: int = 0
    vfd0: float = 0.0   # VFD of the first plan
    last_reward: float = 0.0
    paths: list[np.ndarray] = field(default_factory=list)   # ppo / gbpo: member 0's stochastic Euler path per plan

    @property
    def cost(self) -> float:
        return self.over / max(1, self.steps)


def stochastic_path(ens, obs: torch.Tensor, instr: torch.Tensor, x0: torch.Tensor, sigma: float,
                    gen: torch.Generator, member: int = 0) -> torch.Tensor:
    """Member `member`'s Euler integration with Gaussian steps x += v dt + sigma sqrt(dt) e: every step is a
    Gaussian, so the whole path has a likelihood (Flow-GRPO, ReinFlow). x0 (B, D) -> the path (B, n + 1, D)."""
    n = ens.cfg.euler_steps
    with torch.no_grad():
        ctx = ens.encode(obs, instr, members=[member])
        xs = [x0]
        for k in range(n):
            v = ens.velocity(ctx, xs[-1][None, None], k / n, members=[member])[0, 0]
            xs.append(xs[-1] + v / n + sigma * math.sqrt(1.0 / n) * torch.randn(x0.shape, generator=gen))
    return torch.stack(xs, 1)


def path_logp(ens, obs: torch.Tensor, instr: torch.Tensor, paths: torch.Tensor, sigma: float) -> torch.Tensor:
    """Log-likelihood of each Euler step of paths (B, n + 1, D) under every member: (M, n, B), up to a constant
    shared by old and new (each step is one action of the policy gradient, as in Flow-GRPO)."""
    n = ens.cfg.euler_steps
    ctx = ens.encode(obs, instr)                                   # (M, B, h)
    x, nxt = paths[:, :-1], paths[:, 1:]                           # (B, n, D)
    t = torch.arange(n, dtype=torch.float32) / n
    v = ens.velocity(ctx, x.transpose(0, 1)[None], t.reshape(1, n, 1))  # (M, n, B, D)
    mean = x.transpose(0, 1)[None] + v / n
    err = (nxt.transpose(0, 1)[None] - mean).square().sum(-1)      # (M, n, B)
    return -err / (2 * sigma * sigma / n)


def play(ens, env, instr: torch.Tensor, seed: int, max_steps: int, speed_limit: float, rate_hz: float = 80.0,
         sigma: float = 0.0) -> Attempt:
    """One episode with member 0 acting on half of each chunk (the bundle's default execution); sigma > 0: with
    stochastic Euler steps, recording each plan's path (for the policy-gradient machinery)."""
    from vigil.training import flow

    cfg = ens.cfg
    H, m, execute = cfg.horizon, cfg.action_dim, max(1, cfg.horizon // 2)
    rng = np.random.default_rng([seed, 7])
    obs = env.reset(seed=seed)
    out = Attempt(env.name, seed)
    queue: list[np.ndarray] = []
    hand = np.asarray(obs["state"][:3], float)
    for _ in range(max_steps):
        if not queue:
            o = torch.as_tensor(obs["state"], dtype=torch.float32)[None]
            noise = torch.from_numpy(rng.standard_normal((1, cfg.vfd_samples, H, m), dtype=np.float32)).transpose(0, 1)
            with torch.no_grad():
                chunk, vfd = flow.plan(ens, o, instr, noise)
            c = chunk[0].numpy()
            if sigma > 0:
                gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
                path = stochastic_path(ens, o, instr, noise[0].reshape(1, -1), sigma, gen)[0]
                out.paths.append(path.numpy())
                c = path[-1].reshape(H, m).numpy()
            if not out.obs:
                out.vfd0 = float(vfd[0])
            out.obs.append(np.asarray(obs["state"], np.float32))
            out.chunks.append(c.astype(np.float32))
            queue = list(np.clip(c, -1.0, 1.0)[:execute])
        r = env.step(queue.pop(0))
        out.steps += 1
        out.ret += float(r.reward)
        out.last_reward = float(r.reward)
        out.success = out.success or float(r.info.get("success", 0.0)) >= 1.0
        new = np.asarray(r.obs["state"][:3], float)
        out.over += int(np.linalg.norm(new - hand) * rate_hz > speed_limit)
        hand, obs = new, r.obs
        if r.terminated or r.truncated:
            break
    return out


def expert_attempt(env, seed: int, horizon: int) -> Attempt:
    """The scripted expert plays the situation (SAVE's teacher); every step becomes a training example."""
    from vigil.training.demos import rollout_expert
    from vigil.training.flow import make_chunks

    ep = rollout_expert(env, seed)
    actions = np.asarray(ep.actions, np.float32)
    chunks = make_chunks(actions, horizon)
    return Attempt(env.name, seed, obs=list(np.asarray(ep.observations["state"][:len(actions)], np.float32)),
                   chunks=list(chunks), ret=float(np.sum(ep.rewards)), success=ep.succeeded, steps=ep.steps)


def first_vfd(ens, env, instr: torch.Tensor, seed: int) -> float:
    """VFD of the first plan of a situation (reset only): what the ensemble thinks of it before acting."""
    from vigil.training import flow

    cfg = ens.cfg
    obs = env.reset(seed=seed)
    noise = torch.zeros(cfg.vfd_samples, 1, cfg.horizon, cfg.action_dim)
    with torch.no_grad():
        return float(flow.plan(ens, torch.as_tensor(obs["state"], dtype=torch.float32)[None], instr, noise)[1][0])


def _sigma(cfg: PosttrainConfig, choose: Callable | None, evaluation: bool) -> float:
    """Stochastic Euler steps only where the policy-gradient machineries learn from the paths."""
    return cfg.sigma if cfg.weighting in ("ppo", "gbpo") and choose is None and not evaluation else 0.0


def _play_task(job: tuple[str, tuple[int, ...], np.ndarray], ens, cfg: PosttrainConfig, shift, sigma: float
               ) -> list[Attempt]:
    """One task's episodes in a fleet worker (sim/shard.py): the serial loop's `play`, seeded per episode."""
    from vigil.sim.envs import make_env

    torch.set_num_threads(1)
    task, seeds, instr = job
    env = make_env(task, horizon=cfg.max_steps, shift=shift)
    try:
        return [play(ens, env, torch.as_tensor(instr), s, cfg.max_steps, cfg.speed_limit, sigma=sigma)
                for s in seeds]
    finally:
        env.close()


def collect(ens, tasks: Sequence[str], seeds: Sequence[int], encoder, cfg: PosttrainConfig, shift=None,
            choose: Callable | None = None, progress: bool = False, evaluation: bool = False,
            backend=None) -> list[Attempt]:
    """`len(seeds)` episodes per task; `choose(env, instr, seed) -> seed` picks the situation to attempt (expand).
    `backend` (sim/shard.py) plays the tasks on worker processes or Ray, with the serial loop's episodes; expand's
    choice of situations stays in this process (it draws from one generator in order)."""
    from tqdm import tqdm

    from vigil.sim.envs import make_env

    if backend is not None and backend.kind != "serial" and choose is None:
        from vigil.sim.shard import shard

        jobs = [(t, tuple(seeds), np.asarray(encoder.embed([_instruction(t)]), np.float32)) for t in tasks]
        by_task: dict[str, list[Attempt]] = {}
        with tqdm(total=len(tasks) * len(seeds), desc="rollouts", disable=not progress, leave=False) as bar:
            for done in shard(_play_task, jobs, backend, (ens, cfg, shift, _sigma(cfg, choose, evaluation))):
                if done.error is not None:
                    raise done.error
                by_task[done.item[0]] = done.value
                bar.update(len(done.value))
        return [a for t in tasks for a in by_task[t]]
    out = []
    with tqdm(total=len(tasks) * len(seeds), desc="rollouts", disable=not progress, leave=False) as bar:
        for task in tasks:
            env = make_env(task, horizon=cfg.max_steps, shift=shift)
            instr = torch.as_tensor(encoder.embed([env.instruction]), dtype=torch.float32)
            try:
                for s in seeds:
                    chosen = choose(env, instr, s) if choose is not None else s
                    if cfg.teacher == "expert" and choose is not None:
                        out.append(expert_attempt(env, chosen, ens.cfg.horizon))
                        bar.update()
                        continue
                    out.append(play(ens, env, instr, chosen, cfg.max_steps, cfg.speed_limit,
                                    sigma=_sigma(cfg, choose, evaluation)))
                    bar.update()
            finally:
                env.close()
    return out


def objective_returns(attempts: Sequence[Attempt], cfg: PosttrainConfig, instr_of: Mapping[str, np.ndarray]
                      ) -> np.ndarray:
    """The returns the objective optimises: the simulator's (padded to the horizon with `pad_success`), or a learned
    reward's prediction from what the policy saw and did (policies/reward.py, the runtime's own scorer)."""
    if not cfg.reward:
        return np.array([a.ret + (cfg.max_steps - a.steps) * a.last_reward if cfg.pad_success else a.ret
                         for a in attempts])
    from vigil.policies.reward import RewardScorer

    scorer = RewardScorer(cfg.reward)
    out = []
    for a in attempts:
        execute = max(1, len(a.chunks[0]) // 2)
        acts = np.stack([np.clip(c, -1.0, 1.0)[:execute].mean(0) for c in a.chunks])
        out.append(scorer.score_plans(np.stack(a.obs), instr_of[a.task], acts).ret)
    return np.array(out)


def summary(attempts: Sequence[Attempt], alpha: float = 0.1) -> dict[str, float]:
    """Mean success and return, left-CVaR of returns at alpha (per-task standardised too), mean safety cost."""
    rets = np.array([a.ret for a in attempts])
    z = standardise_per_task(rets, [a.task for a in attempts])
    return {"episodes": len(attempts), "success": float(np.mean([a.success for a in attempts])),
            "return": float(rets.mean()), "cvar_return": left_cvar(rets, alpha), "cvar_z": left_cvar(z, alpha),
            "failure_rate": 1.0 - float(np.mean([a.success for a in attempts])),
            "cost": float(np.mean([a.cost for a in attempts])), "vfd0": float(np.mean([a.vfd0 for a in attempts]))}


# ---------------------------------------------------------------------------------------------- the loop


def _examples(attempts: Sequence[Attempt], per_episode: np.ndarray, instr_of: Mapping[str, np.ndarray]):
    obs = np.concatenate([np.stack(a.obs) for a in attempts])
    chunks = np.concatenate([np.stack(a.chunks) for a in attempts])
    instr = np.concatenate([np.repeat(instr_of[a.task][None], len(a.obs), 0) for a in attempts])
    w = np.concatenate([np.full(len(a.obs), wi) for a, wi in zip(attempts, per_episode)])
    return obs, instr, chunks, w


def iterate(ens, cfg: PosttrainConfig, flow_cfg, encoder, tasks: Sequence[str], iteration: int, state: dict,
            replay: tuple | None = None, progress: bool = False, backend=None) -> tuple[Any, dict]:
    """One iteration: collect, weigh, fine-tune every member. `state` carries the dual variable between
    iterations. Returns (the new ensemble, this iteration's log row)."""
    from vigil.sim.shifts import Shift
    from vigil.training.flow import train_ensemble

    seeds = [1000 + iteration * 100 + k for k in range(cfg.episodes)]  # situations no evaluation uses
    instr_of = {t: np.asarray(encoder.embed([_instruction(t)])[0], np.float32) for t in tasks}
    ft_cfg = dataclasses.replace(flow_cfg, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size,
                                 seed=cfg.seed + iteration)
    row: dict[str, Any] = {"iteration": iteration}
    if cfg.objective == "expand":
        shift = Shift(positions=cfg.expand_shift)
        pick = np.random.default_rng([cfg.seed, iteration, 11])

        def choose(env, instr, s):  # candidate situations just beyond the range; VFD-guided or uniform
            cands = [s * cfg.candidates + j for j in range(cfg.candidates)]
            if cfg.guide == "uniform":
                return int(pick.choice(cands))
            return max(cands, key=lambda c: first_vfd(ens, env, instr, c))

        attempts = collect(ens, tasks, seeds, encoder, cfg, shift=shift, choose=choose, progress=progress)
        kept = verified(attempts)
        row.update(summary(attempts), kept=len(kept))
        if not kept:
            return ens, {**row, "note": "no attempt verified: nothing to train on"}
        obs, instr, chunks, _ = _examples(kept, np.ones(len(kept)), instr_of)
        from vigil.training.save import concat_data, replay_groups

        data = concat_data([replay, (obs, instr, chunks)]) if replay is not None else (obs, instr, chunks)
        groups = replay_groups(len(replay[2]), len(chunks)) if replay is not None else None
        new, hist = train_ensemble(ft_cfg, data[0], data[1], data[2], progress=False, ensemble=ens, groups=groups)
        return new, {**row, "loss": float(np.mean(hist["loss"][-50:]))}

    attempts = collect(ens, tasks, seeds, encoder, cfg, progress=progress, backend=backend)
    rets = objective_returns(attempts, cfg, instr_of)
    task_of = [a.task for a in attempts]
    z = standardise_per_task(rets, task_of)
    row.update(summary(attempts))
    if cfg.objective == "mean":
        pseudo = z
    elif cfg.objective == "cvar-left":
        pseudo = np.empty(len(z))
        for t in set(task_of):  # the threshold per task: returns are not comparable across tasks
            m = np.array([x == t for x in task_of])
            eta = cvar_threshold(z[m], cfg.cvar_alpha)
            pseudo[m] = cvar_pseudo_reward(z[m], eta, cfg.cvar_alpha)
    else:  # constrained: the constraint in units of the cost's spread, comparable to the standardised return
        cost = np.array([a.cost for a in attempts])
        g = (cost - cfg.cost_budget) / (cost.std() + 1e-3)
        lam = state.get("lam", 0.0)
        pseudo = lagrangian_reward(z, g, lam, cfg.rho)
        state["lam"] = dual_update(lam, float(g.mean()), cfg.rho)
        row.update(lam=lam, lam_next=state["lam"], g=float((cost - cfg.cost_budget).mean()))
    if cfg.weighting in ("ppo", "gbpo"):
        new, info = policy_gradient(ens, cfg, attempts, pseudo, instr_of)
        return new, {**row, **info}
    w = episode_weights(pseudo, cfg.temperature, cfg.weighting, cfg.top_fraction)
    obs, instr, chunks, wx = _examples(attempts, w, instr_of)
    new, hist = train_ensemble(ft_cfg, obs, instr, chunks, progress=False, ensemble=ens, weights=wx)
    row.update(loss=float(np.mean(hist["loss"][-50:])), ess=float(w.sum() ** 2 / (w ** 2).sum()))
    return new, row


def policy_gradient(ens, cfg: PosttrainConfig, attempts: Sequence[Attempt], pseudo: np.ndarray,
                    instr_of: Mapping[str, np.ndarray]) -> tuple[Any, dict]:
    """PPO's clipped surrogate or GBPO's bounded-ratio loss (training/rl_losses.py) on the likelihood of member 0's
    stochastic paths, each plan carrying its episode's advantage: the pseudo-reward z-scored within its task's
    group of episodes (GBPO's groups). Every member is updated with its own ratio on those paths (members other
    than 0 did not act: for them the ratio is a weighting, not an importance ratio)."""
    from vigil.training.rl_losses import gbpo_target, ppo_clip_loss, tv_loss

    tasks = sorted({a.task for a in attempts})
    K = min(sum(a.task == t for a in attempts) for t in tasks)
    groups = [[i for i, a in enumerate(attempts) if a.task == t][:K] for t in tasks]
    rewards = torch.tensor([[pseudo[i] for i in g] for g in groups], dtype=torch.float32)  # (G, K)
    adv, rho_star = gbpo_target(rewards, cfg.clip, cfg.clip)
    keep = [i for g in groups for i in g]
    ep_adv = dict(zip(keep, adv.flatten().tolist()))
    ep_rho = dict(zip(keep, rho_star.flatten().tolist()))
    idx = [(i, p) for i in keep for p in range(len(attempts[i].paths))]
    obs = torch.as_tensor(np.stack([attempts[i].obs[p] for i, p in idx]))
    instr = torch.as_tensor(np.stack([instr_of[attempts[i].task] for i, _ in idx]))
    paths = torch.as_tensor(np.stack([attempts[i].paths[p] for i, p in idx]))
    a = torch.tensor([ep_adv[i] for i, _ in idx])
    rho = torch.tensor([ep_rho[i] for i, _ in idx])
    new = copy.deepcopy(ens).train()
    with torch.no_grad():
        old = path_logp(ens, obs, instr, paths, cfg.sigma)  # (M, n, B)
    opt = torch.optim.Adam(new.parameters(), lr=cfg.pg_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    n, losses, ratios = len(idx), [], []
    for _ in range(cfg.pg_epochs):
        for b in torch.randperm(n, generator=gen).split(cfg.batch_size):
            logr = (path_logp(new, obs[b], instr[b], paths[b], cfg.sigma) - old[:, :, b]).clamp(-20, 20)
            ratio = logr.exp().flatten(1)                        # (M, n * bs): one ratio per Euler step
            ab, rb = a[b].repeat(logr.shape[1]), rho[b].repeat(logr.shape[1])
            if cfg.weighting == "ppo":
                loss = sum(ppo_clip_loss(ratio[m], ab, cfg.clip) for m in range(ratio.shape[0]))
            else:
                loss = sum(tv_loss(ratio[m], rb, ab.abs()) for m in range(ratio.shape[0]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            ratios.append(ratio.mean().item())
    return new.eval(), {"loss": float(np.mean(losses[-10:])), "ratio": float(np.mean(ratios[-10:])), "plans": n}


def _instruction(task: str) -> str:
    from vigil.sim.metaworld_env import ALL_INSTRUCTIONS

    return ALL_INSTRUCTIONS[task]


def evaluate(ens, tasks: Sequence[str], encoder, cfg: PosttrainConfig, episodes: int, shift=None, seed: int = 20,
             progress: bool = False, backend=None) -> dict[str, float]:
    """Success, return, CVaR, cost (and first-plan VFD) on fixed evaluation seeds (variants seed..)."""
    return summary(collect(ens, tasks, list(range(seed, seed + episodes)), encoder, cfg, shift=shift,
                           progress=progress, evaluation=True, backend=backend))


def run(ens, cfg: PosttrainConfig, encoder, tasks: Sequence[str], replay: tuple | None = None,
        progress: bool = True, log: Callable[[str], None] = print, backend=None) -> tuple[Any, list[dict]]:
    """Every iteration of the objective; returns (the post-trained ensemble, the per-iteration log). `backend`
    (sim/shard.py): where the rollouts run."""
    cfg = cfg.check()
    torch.manual_seed(zlib.crc32(f"{cfg.objective}/{cfg.seed}".encode()))
    state: dict = {}
    rows = []
    cur = copy.deepcopy(ens)
    for it in range(cfg.iterations):
        cur, row = iterate(cur, cfg, cur.cfg, encoder, tasks, it, state, replay, progress, backend)
        rows.append(row)
        log(f"[{cfg.objective}] iteration {it}: success {row['success']:.0%}, return {row['return']:.0f}, "
            f"cost {row['cost']:.3f}" + (f", lam {row['lam']:.2f}" if "lam" in row else "")
            + (f", kept {row['kept']}" if "kept" in row else ""))
    return cur, rows


# ------------------------------------------------------------------------------------------- the command


def load_config(path: str | None, **overrides: Any) -> PosttrainConfig:
    """The `[posttrain]` table of a TOML file (keys and types checked), then non-None overrides."""
    from vigil.runtime.config import check_table, read_toml

    table = dict(read_toml(path).get("posttrain", {})) if path else {}
    if "tasks" in table and isinstance(table["tasks"], list):
        table["tasks"] = tuple(table["tasks"])
    values = check_table(PosttrainConfig, table, "posttrain")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return PosttrainConfig(**values).check()


def plot_iterations(path, rows: Sequence[Mapping[str, Any]], title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    it = [r["iteration"] for r in rows]
    keys = [k for k in ("success", "return", "cost", "lam") if k in rows[0]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
    for ax, k in zip(np.atleast_1d(axes), keys):
        ax.plot(it, [r[k] for r in rows], marker="o")
        ax.set_xlabel("iteration")
        ax.set_title(k + (" (collected with the policy of that iteration)" if k != "lam" else " (dual variable)"),
                     fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def posttrain_run(run_dir, out_dir, config: PosttrainConfig, demos=None, calibration_episodes: int = 5,
                  progress: bool = True, log: Callable[[str], None] = print, successful_only: bool = True,
                  backend=None) -> dict[str, Any]:
    """`vigil train posttrain`: post-train RUN's ensemble (every member) with `config.objective`, write OUT with the
    checkpoint, posttrain.csv, posttrain.png, a recalibrated bundle (VFD and failure monitor) that can be
    hot-swapped for the parent's, and provenance naming the parent."""
    import csv
    import json
    import time
    from datetime import UTC, datetime

    from vigil.policies.instructions import InstructionEncoder
    from vigil.training.calibrate import calibrate_bundle
    from vigil.training.demos import DemoSet
    from vigil.training.train_flow import dataset_tensors, export_run, fit_density, load_checkpoint, save_checkpoint

    run_dir, out = Path(run_dir), Path(out_dir)
    ens, flow_cfg, ck = load_checkpoint(run_dir / "ensemble.pt")
    parent = dict(ck["provenance"])
    encoder_path = run_dir / "bundle" / "encoder"
    if not (encoder_path / "encoder.json").exists():
        encoder_path = Path(parent["encoder"]["folder"])
    encoder = InstructionEncoder.load(encoder_path, prefer_gpu=False)
    tasks = list(config.tasks) or sorted(parent["tasks"])
    demos = demos or parent.get("demos")
    replay = None
    if demos and Path(str(demos)).exists():
        replay = dataset_tensors(DemoSet(demos), flow_cfg, encoder, tasks)
    elif config.objective == "expand":
        raise ValueError(f"expand replays the original demonstrations: none at {demos!r} (pass --demos)")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    new, rows = run(ens, config, encoder, tasks, replay if config.objective == "expand" else None, progress, log,
                    backend)
    seconds = time.perf_counter() - t0
    with open(out / "posttrain.csv", "w", newline="") as f:
        keys = sorted({k for r in rows for k in r})
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    plot_iterations(out / "posttrain.png", rows, f"post-training ({config.objective}, {config.weighting}) of "
                                                 f"{run_dir.name}")
    provenance = {**{k: parent[k] for k in ("tasks", "encoder", "config", "demos", "versions") if k in parent},
                  "created": datetime.now(UTC).isoformat(timespec="seconds"), "seed": config.seed,
                  "posttrain": {"parent": {"run": str(run_dir.resolve()),
                                           "bundle": str((run_dir / "bundle").resolve()),
                                           "seed": flow_cfg.seed},
                                "config": {k: (list(v) if isinstance(v, tuple) else v)
                                           for k, v in dataclasses.asdict(config).items()},
                                "iterations": rows, "seconds": round(seconds, 1),
                                "episodes": int(sum(r.get("episodes", 0) for r in rows))}}
    provenance = json.loads(json.dumps(provenance, default=float))
    loss = np.array([r.get("loss", np.nan) for r in rows], np.float32)
    save_checkpoint(out / "ensemble.pt", new, flow_cfg, provenance, {"loss": loss})
    density = None
    if flow_cfg.density_steps > 0 and replay is not None:
        density = fit_density(out, new, flow_cfg, replay[0], replay[1], provenance, progress, log)
    name = f"flow-{len(tasks)}tasks-M{flow_cfg.members}-s{flow_cfg.seed}-{config.objective}"
    bundle = export_run(out, new, flow_cfg, encoder_path, provenance, 80.0, log, name=name, density=density)
    from vigil.training.dynamics import carry_over

    carry_over(run_dir / "bundle", bundle)  # the dynamics monitor's ensemble: same robot, recalibrated below
    if calibration_episodes > 0:
        block, _ = calibrate_bundle(bundle, tasks, calibration_episodes, 40, max_steps=config.max_steps,
                                    progress=progress, successful_only=successful_only)
        provenance["calibration"] = block
    (out / "provenance.json").write_text(json.dumps(provenance, indent=1, default=float) + "\n")
    return {"bundle": bundle, "iterations": rows, "provenance": str(out / "provenance.json")}
