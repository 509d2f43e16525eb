"""`vigil train bpo|ppo`: on-policy actor-critic for gymnasium control tasks, CleanRL style, one file.

BPO (Bounded Policy Optimization, docs/algorithms.md#bpo-bounded-policy-optimization) and PPO share everything here but
the policy loss (training/rl_losses.py), so a comparison of the two measures the loss and nothing else:

- K vectorised environments (gymnasium SyncVectorEnv, autoreset in the SAME step: the observation returned
  after an episode's end is already the next episode's first one, the true final observation is in
  info["final_obs"]), actions sampled from a Gaussian, clipped to the action box for the environment only;
- running observation normalisation (mean/std over every observation seen, clip +-10, as the runtime does
  with a bundle's `normalisation` block) and running reward scaling (rewards divided by the std of the
  discounted return, as gymnasium's NormalizeReward / CleanRL);
- GAE(gamma, lambda) where an episode that *terminated* has no value after its last step and an episode
  that was *truncated* (time limit) is bootstrapped with V(final observation): truncation is not failure;
- actor: 256x256 ReLU MLP for the mean, state-independent log_std (init 0); critic: 256x256 ReLU MLP with
  two heads, V (value, MSE to Qhat) and U (median critic, log-cosh to Qhat); the loss is
  L_pi + c_v MSE(V, Qhat) + c_u logcosh(Qhat - U) for both algorithms (PPO does not use U but trains it
  the same, so the networks see the same critic loss);
- Adam, global gradient-norm clip, E epochs of minibatches over each rollout.

Outputs of `run` in OUT: progress.csv (one row per update), learning_curve.png, actor.pt (actor state dict
and normalisation), provenance.json and the `gaussian` bundle OUT/bundle (observation normalisation in
the manifest, provenance of the run).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn

from vigil.training.rl_losses import bpo_target, logcosh_loss, ppo_clip_loss, tv_loss, value_loss


@dataclass(frozen=True)
class RLConfig:
    """Hyperparameters: BPO's MuJoCo defaults (docs/algorithms.md#bpo-bounded-policy-optimization).
    BPO and PPO runs differ in `loss` only."""

    loss: Literal["bpo", "ppo"] = "bpo"
    env: str = "InvertedPendulum-v5"
    total_steps: int = 1_000_000
    seed: int = 0
    num_envs: int = 1
    rollout_steps: int = 2048      # environment steps per update, over all environments
    minibatch: int = 64
    epochs: int = 10
    lr: float = 3e-4
    gamma: float = 0.99
    gae_lambda: float = 0.95
    c_v: float = 0.5
    c_u: float = 0.5
    c_ent: float = 0.0
    max_grad_norm: float = 1.0
    hidden: int = 256
    # BPO
    eps: float = 0.3
    lam: float = 0.001
    # PPO
    clip: float = 0.2
    norm_adv: bool = True          # PPO normalises advantages per minibatch (CleanRL); BPO's weights are |Qhat - V|
    # shared normalisation
    norm_obs: bool = True
    norm_reward: bool = True
    obs_clip: float = 10.0

    def __post_init__(self):
        if self.loss not in ("bpo", "ppo"):
            raise ValueError(f"loss must be 'bpo' or 'ppo', got {self.loss!r}")
        if self.rollout_steps % self.num_envs:
            raise ValueError(f"rollout_steps ({self.rollout_steps}) must be a multiple of num_envs ({self.num_envs})")
        if self.total_steps < 1 or self.minibatch < 1 or self.epochs < 1:
            raise ValueError("total_steps, minibatch and epochs must be >= 1")


# ------------------------------------------------------------------------------------------ normalisation


class RunningMeanStd:
    """Mean and variance of everything `update` has seen (parallel Welford, as gymnasium's wrappers)."""

    def __init__(self, shape: tuple[int, ...] = ()):
        self.mean = np.zeros(shape, np.float64)
        self.var = np.ones(shape, np.float64)
        self.count = 1e-4

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        b_mean, b_var, b_count = x.mean(axis=0), x.var(axis=0), x.shape[0]
        delta, total = b_mean - self.mean, self.count + b_count
        self.mean = self.mean + delta * b_count / total
        m2 = self.var * self.count + b_var * b_count + delta ** 2 * self.count * b_count / total
        self.var, self.count = m2 / total, total

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.var + 1e-8)


def normalise(x: np.ndarray, rms: RunningMeanStd | None, clip: float) -> np.ndarray:
    """clip((x - mean) / std, -clip, clip) as float32: the same formula as the runtime's Policy.feed."""
    if rms is None:
        return np.asarray(x, np.float32)
    return np.clip((x - rms.mean) / rms.std, -clip, clip).astype(np.float32)


# ---------------------------------------------------------------------------------------------- networks


def mlp(n_in: int, n_out: int, hidden: int, out_gain: float) -> nn.Sequential:
    """Two hidden ReLU layers, orthogonal init (CleanRL); the output layer's gain is small for the policy."""
    layers = [nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out)]
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.orthogonal_(layer.weight, math.sqrt(2) if layer is not layers[-1] else out_gain)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class Actor(nn.Module):
    """Gaussian policy on *normalised* observations; forward returns the mean (what the bundle exports)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        self.net = mlp(obs_dim, act_dim, hidden, 0.01)
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)

    def dist(self, obs: torch.Tensor) -> torch.distributions.Normal:
        mean = self.net(obs)
        return torch.distributions.Normal(mean, self.log_std.exp().expand_as(mean))


class Critic(nn.Module):
    """V(s) and U(s) (median critic): one trunk, two heads. Returns (V, U), each (b,)."""

    def __init__(self, obs_dim: int, hidden: int = 256):
        super().__init__()
        self.net = mlp(obs_dim, 2, hidden, 1.0)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.net(obs)
        return out[..., 0], out[..., 1]


# ------------------------------------------------------------------------------------------------- GAE


def gae(rewards: np.ndarray, values: np.ndarray, next_values: np.ndarray, terminated: np.ndarray,
        dones: np.ndarray, gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Advantages and lambda-returns Qhat = A + V for arrays (T, K) of one rollout.

    next_values[t]: V of the observation after step t: the next step's for a running episode, V(final
    observation) for an episode that ended at t (the last row: V of the observation after the rollout).
    terminated[t]: the episode ended in a terminal state at t, so nothing follows (no bootstrap);
    dones[t]: the episode ended at t for any reason (terminated or truncated): the lambda-trace is cut, but
    a truncated step still bootstraps with next_values[t] = V(final observation).
    """
    T = rewards.shape[0]
    adv = np.zeros_like(rewards, dtype=np.float64)
    last = np.zeros(rewards.shape[1:], np.float64)
    for t in reversed(range(T)):
        delta = rewards[t] + gamma * (1.0 - terminated[t]) * next_values[t] - values[t]
        last = delta + gamma * lam * (1.0 - dones[t]) * last
        adv[t] = last
    return adv.astype(np.float32), (adv + values).astype(np.float32)


# ------------------------------------------------------------------------------------------ the losses


def policy_loss(cfg: RLConfig, ratio: torch.Tensor, adv: torch.Tensor, qhat: torch.Tensor, u_old: torch.Tensor
                ) -> torch.Tensor:
    """The one place BPO and PPO differ."""
    if cfg.loss == "bpo":
        return tv_loss(ratio, bpo_target(qhat, u_old, cfg.eps, cfg.lam), adv.abs())
    if cfg.norm_adv and adv.numel() > 1:
        adv = (adv - adv.mean()) / (adv.std() + 1e-8)
    return ppo_clip_loss(ratio, adv, cfg.clip)


# -------------------------------------------------------------------------------------------- training


def make_envs(env_id: str, num_envs: int, seed: int):
    import gymnasium as gym

    envs = gym.vector.SyncVectorEnv([lambda: gym.make(env_id) for _ in range(num_envs)],
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs.action_space.seed(seed)
    return envs


def observations_after(obs: np.ndarray, done: np.ndarray, info: dict) -> np.ndarray:
    """The observation each environment reached with this step (SAME_STEP autoreset): `obs` for a running
    episode, info["final_obs"] for one that ended (its `obs` is already the next episode's first)."""
    out = np.array(obs, copy=True)
    if done.any():
        for i in np.flatnonzero(info.get("_final_obs", done)):
            out[i] = info["final_obs"][i]
    return out


@dataclass
class TrainResult:
    actor: Actor
    critic: Critic
    obs_rms: RunningMeanStd | None
    history: list[dict[str, float]]
    episode_returns: list[float]      # every finished episode, in order (undiscounted, raw rewards)
    episode_steps: list[int]          # the global step at which each finished
    seconds: float

    def obs_mean_std(self, obs_dim: int) -> tuple[np.ndarray, np.ndarray]:
        if self.obs_rms is None:
            return np.zeros(obs_dim), np.ones(obs_dim)
        return self.obs_rms.mean.copy(), self.obs_rms.std.copy()


def train(cfg: RLConfig, progress: bool = False, on_update: Callable[[dict], None] | None = None) -> TrainResult:
    """Train for cfg.total_steps environment steps (rounded up to whole rollouts)."""
    torch.manual_seed(cfg.seed)
    rng_np = np.random.default_rng(cfg.seed)
    envs = make_envs(cfg.env, cfg.num_envs, cfg.seed)
    obs_dim = int(np.prod(envs.single_observation_space.shape))
    act_dim = int(np.prod(envs.single_action_space.shape))
    low, high = envs.single_action_space.low, envs.single_action_space.high
    actor, critic = Actor(obs_dim, act_dim, cfg.hidden), Critic(obs_dim, cfg.hidden)
    opt = torch.optim.Adam(list(actor.parameters()) + list(critic.parameters()), lr=cfg.lr, eps=1e-5)
    obs_rms = RunningMeanStd((obs_dim,)) if cfg.norm_obs else None
    ret_rms = RunningMeanStd(()) if cfg.norm_reward else None

    K, T = cfg.num_envs, cfg.rollout_steps // cfg.num_envs
    n_updates = max(1, math.ceil(cfg.total_steps / cfg.rollout_steps))
    buf_obs = np.zeros((T, K, obs_dim), np.float32)
    buf_act = np.zeros((T, K, act_dim), np.float32)
    buf_logp, buf_v, buf_u, buf_r, buf_nv, buf_term, buf_done = (np.zeros((T, K), np.float32) for _ in range(7))

    raw_obs, _ = envs.reset(seed=cfg.seed)
    if obs_rms is not None:
        obs_rms.update(raw_obs)
    disc_ret = np.zeros(K)               # discounted return, for reward scaling
    ep_ret, ep_len = np.zeros(K), np.zeros(K, int)
    episode_returns: list[float] = []
    episode_steps: list[int] = []
    history: list[dict[str, float]] = []
    step = 0
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_updates * cfg.rollout_steps, unit="step", desc=f"{cfg.loss} {cfg.env}")

    for update in range(n_updates):
        n_episodes_before = len(episode_returns)
        # ---- rollout
        for t in range(T):
            obs_n = normalise(raw_obs, obs_rms, cfg.obs_clip)
            with torch.no_grad():
                o = torch.as_tensor(obs_n)
                d = actor.dist(o)
                a = d.sample()
                v, u = critic(o)
            buf_obs[t], buf_act[t] = obs_n, a.numpy()
            buf_logp[t], buf_v[t], buf_u[t] = d.log_prob(a).sum(-1).numpy(), v.numpy(), u.numpy()
            raw_obs, r, term, trunc, info = envs.step(np.clip(a.numpy(), low, high))
            step += K
            done = term | trunc
            ep_ret += r
            ep_len += 1
            for i in np.flatnonzero(done):
                episode_returns.append(float(ep_ret[i]))
                episode_steps.append(step)
                ep_ret[i], ep_len[i] = 0.0, 0
            if ret_rms is not None:  # NormalizeReward: scale by the std of the discounted return
                disc_ret = disc_ret * cfg.gamma * (1.0 - term) + r
                ret_rms.update(disc_ret[:, None].reshape(-1))
                r = r / math.sqrt(float(ret_rms.var) + 1e-8)
                disc_ret[done] = 0.0
            buf_r[t], buf_term[t], buf_done[t] = r, term, done
            # the value of the observation after this step; for ended episodes V(final observation)
            next_raw = observations_after(raw_obs, done, info)
            if obs_rms is not None:
                obs_rms.update(raw_obs)  # the new episodes' first observations and the running ones
            with torch.no_grad():
                buf_nv[t] = critic(torch.as_tensor(normalise(next_raw, obs_rms, cfg.obs_clip)))[0].numpy()
        if bar is not None:
            bar.update(T * K)
        adv, qhat = gae(buf_r, buf_v, buf_nv, buf_term, buf_done, cfg.gamma, cfg.gae_lambda)

        # ---- optimisation: E epochs of minibatches over the flattened rollout
        b_obs = torch.as_tensor(buf_obs.reshape(T * K, obs_dim))
        b_act = torch.as_tensor(buf_act.reshape(T * K, act_dim))
        b_logp, b_adv, b_q, b_u = (torch.as_tensor(x.reshape(-1)) for x in (buf_logp, adv, qhat, buf_u))
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "median_loss", "approx_kl",
                                                        "tv", "clipfrac", "grad_norm")}
        for _ in range(cfg.epochs):
            order = rng_np.permutation(T * K)
            for start in range(0, T * K, cfg.minibatch):
                idx = torch.as_tensor(order[start:start + cfg.minibatch])
                d = actor.dist(b_obs[idx])
                logp = d.log_prob(b_act[idx]).sum(-1)
                log_ratio = logp - b_logp[idx]
                ratio = log_ratio.exp()
                v, u = critic(b_obs[idx])
                l_pi = policy_loss(cfg, ratio, b_adv[idx], b_q[idx], b_u[idx])
                l_v, l_u = value_loss(v, b_q[idx]), logcosh_loss(b_q[idx], u)
                loss = l_pi + cfg.c_v * l_v + cfg.c_u * l_u
                if cfg.c_ent:
                    loss = loss - cfg.c_ent * d.entropy().sum(-1).mean()
                opt.zero_grad()
                loss.backward()
                gn = nn.utils.clip_grad_norm_(list(actor.parameters()) + list(critic.parameters()), cfg.max_grad_norm)
                opt.step()
                with torch.no_grad():
                    stats["policy_loss"].append(l_pi.item())
                    stats["value_loss"].append(l_v.item())
                    stats["median_loss"].append(l_u.item())
                    stats["approx_kl"].append(((ratio - 1) - log_ratio).mean().item())
                    stats["tv"].append((ratio - 1).abs().mean().item())
                    stats["clipfrac"].append(((ratio - 1).abs() > cfg.clip).float().mean().item())
                    stats["grad_norm"].append(float(gn))
        finished = episode_returns[n_episodes_before:]
        row = {"update": update + 1, "steps": step, "episodes": len(finished),
               "mean_return": float(np.mean(finished)) if finished else float("nan"),
               **{k: float(np.mean(v)) for k, v in stats.items()},
               "log_std": float(actor.log_std.detach().mean()), "wall_s": time.perf_counter() - t0}
        history.append(row)
        if bar is not None:
            recent = episode_returns[-10:]
            bar.set_postfix(ret=f"{np.mean(recent):.1f}" if recent else "-", kl=f"{row['approx_kl']:.3f}")
        if on_update is not None:
            on_update(row)
    if bar is not None:
        bar.close()
    envs.close()
    return TrainResult(actor.eval(), critic.eval(), obs_rms, history, episode_returns, episode_steps,
                       time.perf_counter() - t0)


# --------------------------------------------------------------------------------------------- outputs

CSV_FIELDS = ["update", "steps", "episodes", "mean_return", "policy_loss", "value_loss", "median_loss", "approx_kl",
              "tv", "clipfrac", "grad_norm", "log_std", "wall_s"]


def write_csv(path: str | Path, history: list[dict[str, float]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        for row in history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def plot_curve(path: str | Path, result: TrainResult, title: str) -> bool:
    """Return of every finished episode (faint) and the mean per update (per rollout) against environment
    steps (a moving average over episodes would lag: early episodes are short, late ones long)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if result.episode_returns:
        x, y = np.asarray(result.episode_steps), np.asarray(result.episode_returns)
        ax.plot(x, y, lw=0.5, alpha=0.3, color="C0", label="episode return")
        h = [row for row in result.history if row["episodes"]]
        ax.plot([row["steps"] for row in h], [row["mean_return"] for row in h], lw=1.5, color="C0", marker=".",
                label="mean over the episodes that ended in each rollout")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episodic return")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def export_actor(folder: str | Path, result: TrainResult, cfg: RLConfig, prov: dict[str, Any]):
    """The final actor as a `gaussian` bundle: the graph maps the normalised observation to the Gaussian's
    mean; the normalisation (mean, std; the runtime clips at +-10, as training did) is in the manifest."""
    import gymnasium as gym

    from vigil.training.export import export_gaussian

    env = gym.make(cfg.env)
    obs_dim = int(np.prod(env.observation_space.shape))
    low, high = env.action_space.low, env.action_space.high
    rate = 1.0 / float(getattr(env.unwrapped, "dt", 0.02))
    env.close()
    mean, std = result.obs_mean_std(obs_dim)
    return export_gaussian(folder, f"{cfg.loss}-{cfg.env}-s{cfg.seed}", result.actor, obs_dim, low, high, rate,
                           obs_mean=mean, obs_std=std, prov=prov)


def run(cfg: RLConfig, out_dir: str | Path, progress: bool = True, log: Callable[[str], None] = print
        ) -> dict[str, Any]:
    """Train and write progress.csv, learning_curve.png, actor.pt, provenance.json and OUT/bundle."""
    from vigil.training.export import provenance

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = train(cfg, progress=progress)
    rets = result.episode_returns
    k = max(1, min(10, len(rets) // 2))
    first = float(np.mean(rets[:k])) if rets else float("nan")
    last = float(np.mean(rets[-k:])) if rets else float("nan")
    log(f"{cfg.loss} {cfg.env}: {len(rets)} episodes in {result.history[-1]['steps']} steps, "
        f"{result.seconds:.1f} s; mean return of the first {k} episodes {first:.1f}, of the last {k} {last:.1f}")
    prov = provenance(algorithm=cfg.loss, env=cfg.env, steps=int(result.history[-1]["steps"]), seed=cfg.seed,
                      config=asdict(cfg), train_seconds=round(result.seconds, 3), episodes=len(rets),
                      return_first=first, return_last=last, torch=torch.__version__)
    write_csv(out / "progress.csv", result.history)
    wrote_png = plot_curve(out / "learning_curve.png", result,
                           f"{cfg.loss.upper()} {cfg.env} seed {cfg.seed}, {cfg.num_envs} env(s)")
    obs_dim = result.actor.net[0].in_features
    mean, std = result.obs_mean_std(obs_dim)
    torch.save({"config": asdict(cfg), "actor": result.actor.state_dict(), "critic": result.critic.state_dict(),
                "obs_mean": torch.as_tensor(mean), "obs_std": torch.as_tensor(std)}, out / "actor.pt")
    export_actor(out / "bundle", result, cfg, prov)
    (out / "provenance.json").write_text(json.dumps(prov, indent=1) + "\n")
    return {"progress_csv": str(out / "progress.csv"),
            "learning_curve": str(out / "learning_curve.png") if wrote_png else None,
            "checkpoint": str(out / "actor.pt"), "bundle": str(out / "bundle"),
            "provenance": str(out / "provenance.json"), "episodes": len(rets),
            "return_first": first, "return_last": last, "seconds": round(result.seconds, 3),
            "curve": [row["mean_return"] for row in result.history]}


def config_for(loss: str, **overrides: Any) -> RLConfig:
    return replace(RLConfig(loss=loss), **{k: v for k, v in overrides.items() if v is not None})
