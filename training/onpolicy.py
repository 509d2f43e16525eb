"""BPO and PPO for a streaming learner: rollouts come from the runtime's transition log, not from an environment.

`vigil train bpo|ppo` (training/rl.py) owns its environments; `vigil learn --algo bpo|ppo` does not: the robot
acts through the runtime, which serves an *exploring* gaussian bundle (`export_exploring`) that samples its
action and reports the log-probability of what the robot got. The learner gathers the transitions that carry
such a log-probability, and when it holds `rollout_steps` of them it makes one update exactly as training/rl.py
does (GAE, E epochs of minibatches, the same networks and the same loss function, `rl.policy_loss`: BPO and PPO
still differ in the loss only), exports the next exploring bundle and swaps it in.

Two things differ from training in simulation, both forced by the robot:

- **Clipped actions.** The runtime clips the sampled action to the bounds before the robot sees it, and the log
  keeps what the robot got. The log-probability is that of a censored Gaussian (Fujita and Maeda, "Clipped
  Action Policy Gradient", ICML 2018): the density inside the bounds, the Gaussian's mass beyond a bound at it.
  The exported graph and the learner compute it with the same function (`censored_log_prob`).
- **Rollouts are not cut by the learner.** A rollout is whatever the log holds since the last update: the
  episodes of several robots, interrupted by swaps and link losses. GAE runs along each robot's episode and
  cuts its trace wherever the steps are not consecutive; where a piece ends without the episode ending, it
  bootstraps with V(next observation). Transitions in the rollout that the previous policy played (before the
  swap took effect) keep their own log-probability, so the ratio is against the policy that acted.

Observation normalisation is fixed: the warm start's (the simulation training's), which the served bundle
applies; a running normalisation would move the inputs under every policy the learner swaps in.
"""

from __future__ import annotations

import copy
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from vigil.training.rl import Actor, Critic, RLConfig, RunningMeanStd, gae, policy_loss
from vigil.training.rl_losses import logcosh_loss, value_loss

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def log_ndtr(z: torch.Tensor) -> torch.Tensor:
    """log Phi(z) in float32 with ONNX-exportable operations (no erfc): through erf above z = -4, by the
    asymptotic series -z^2/2 - log(-z) - log sqrt(2 pi) + log(1 - 1/z^2 + 3/z^4) below (relative error < 0.5%)."""
    direct = torch.log(torch.clamp(0.5 * (1.0 + torch.erf(z / math.sqrt(2.0))), min=1e-30))
    zc = torch.clamp(z, max=-4.0)
    z2 = zc * zc
    asym = -0.5 * z2 - torch.log(-zc) - _LOG_SQRT_2PI + torch.log(1.0 - 1.0 / z2 + 3.0 / (z2 * z2))
    return torch.where(z > -4.0, direct, asym)


def censored_log_prob(mean: torch.Tensor, log_std: torch.Tensor, action: torch.Tensor, low: torch.Tensor,
                      high: torch.Tensor) -> torch.Tensor:
    """log-probability (summed over the last axis) of `action`, a Gaussian draw clipped to [low, high]: the
    density inside, log P(x <= low) at the lower bound, log P(x >= high) at the upper one."""
    std = log_std.exp()
    inside = -0.5 * ((action - mean) / std) ** 2 - log_std - _LOG_SQRT_2PI
    at_low = log_ndtr((low - mean) / std)
    at_high = log_ndtr((mean - high) / std)
    logp = torch.where(action <= low, at_low, torch.where(action >= high, at_high, inside))
    return logp.sum(-1)


class Exploring(nn.Module):
    """The exported graph of an exploring bundle: (normalised obs, standard normal noise) -> (the sample, unclipped;
    the log-probability of the sample clipped to the bounds, as the runtime will clip it; 1 where the mean itself
    is beyond a bound, else 0, for the saturation monitor, which judges the policy's intent, not its noise)."""

    def __init__(self, actor: Actor, low: np.ndarray, high: np.ndarray):
        super().__init__()
        self.actor = actor
        self.register_buffer("low", torch.as_tensor(np.asarray(low, np.float32)))
        self.register_buffer("high", torch.as_tensor(np.asarray(high, np.float32)))

    def forward(self, obs: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mean = self.actor(obs)
        log_std = self.actor.log_std.expand_as(mean)
        sample = mean + log_std.exp() * noise
        clipped = torch.minimum(torch.maximum(sample, self.low), self.high)
        beyond = ((mean < self.low) | (mean > self.high)).any(-1).float()
        return sample, censored_log_prob(mean, log_std, clipped, self.low, self.high), beyond


def export_exploring(folder: str | Path, name: str, actor: Actor, obs_dim: int, action_low: Sequence[float],
                     action_high: Sequence[float], control_rate_hz: float, obs_mean: Sequence[float],
                     obs_std: Sequence[float], obs_clip: float = 10.0, prov: Mapping[str, Any] | None = None):
    """An exploring `gaussian` bundle (policies/bundle.py GaussianPolicy): the graph samples with the noise the
    runtime draws per plan and reports the scores `logp` and `mean_clipped`."""
    from vigil.policies.manifest import write_bundle
    from vigil.training.export import OPSET, _tup, provenance
    from vigil.wire.protocol import ArraySpec

    low, high = np.asarray(action_low, np.float32), np.asarray(action_high, np.float32)
    graph = Exploring(copy.deepcopy(actor).cpu().eval(), low, high).eval()
    m = len(low)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter, chosen (dynamo=False)
        torch.onnx.export(graph, (torch.zeros(1, obs_dim), torch.zeros(1, m)), buf, input_names=["obs", "noise"],
                          output_names=["action", "logp", "mean_clipped"],
                          dynamic_axes={"obs": {0: "batch"}, "noise": {0: "batch"}, "action": {0: "batch"},
                                        "logp": {0: "batch"}, "mean_clipped": {0: "batch"}},
                          opset_version=OPSET, dynamo=False)
    return write_bundle(folder, buf.getvalue(), {
        "name": name, "kind": "gaussian",
        "observation": [ArraySpec("state", "float32", (obs_dim,)).to_dict()],
        "action": ArraySpec("action", "float32", (m,), _tup(low), _tup(high)).to_dict(),
        "safe_action": [0.0] * m, "control_rate_hz": control_rate_hz,
        "onnx": {"inputs": {"obs": "state"}, "action": "action", "scores": ["logp", "mean_clipped"]},
        "normalisation": {"state": {"mean": list(map(float, obs_mean)), "std": list(map(float, obs_std)),
                                    "clip": float(obs_clip)}},
        "provenance": dict(prov or provenance()),
        "extra": {"exploration": {"noise_input": "noise"}},
    })


_COLUMNS = ("obs", "action", "reward", "next_obs", "terminated", "truncated", "logp", "robot", "episode", "step")


class OnPolicy:
    """One streaming on-policy learner: `add` rows from the log, `update` when `ready`, `state`/`load`."""

    def __init__(self, obs_dim: int, act_dim: int, low: np.ndarray, high: np.ndarray, cfg: RLConfig,
                 obs_mean: np.ndarray, obs_std: np.ndarray, critic_warmup: int = 0):
        torch.manual_seed(cfg.seed)
        self.cfg, self.critic_warmup = cfg, critic_warmup
        self.actor, self.critic = Actor(obs_dim, act_dim, cfg.hidden), Critic(obs_dim, cfg.hidden)
        self.opt = torch.optim.Adam([*self.actor.parameters(), *self.critic.parameters()], lr=cfg.lr, eps=1e-5)
        self.low, self.high = torch.as_tensor(low, dtype=torch.float32), torch.as_tensor(high, dtype=torch.float32)
        self.obs_mean, self.obs_std = np.asarray(obs_mean, np.float64), np.asarray(obs_std, np.float64)
        self.ret_rms = RunningMeanStd(()) if cfg.norm_reward else None
        self.rng = np.random.default_rng(cfg.seed)
        self.updates = 0      # policy updates (one per rollout)
        self.steps = 0        # gradient steps
        self.skipped = 0      # transitions without a log-probability (safe actions, a deterministic policy)
        self.rows: list[dict[str, np.ndarray]] = []

    @property
    def size(self) -> int:
        return sum(len(r["reward"]) for r in self.rows)

    def ready(self) -> bool:
        return self.size >= self.cfg.rollout_steps

    def add(self, rows: Mapping[str, np.ndarray]) -> None:
        """Keep the transitions an exploring policy sampled (a finite `logp`)."""
        keep = np.isfinite(rows["logp"])
        self.skipped += int((~keep).sum())
        if keep.any():
            self.rows.append({k: np.asarray(rows[k])[keep] for k in _COLUMNS})

    def normalise(self, x: np.ndarray) -> torch.Tensor:
        clip = self.cfg.obs_clip
        return torch.as_tensor(np.clip((x - self.obs_mean) / self.obs_std, -clip, clip).astype(np.float32))

    def update(self) -> dict[str, float]:
        """One update on the rollout gathered since the last: GAE along each robot's episode, then E epochs."""
        cfg = self.cfg
        b = {k: np.concatenate([r[k] for r in self.rows]) for k in _COLUMNS}
        self.rows = []
        order = np.lexsort((b["step"], b["episode"], b["robot"]))  # each robot's episode, in step order
        b = {k: v[order] for k, v in b.items()}
        n = len(b["reward"])
        same_next = np.zeros(n, bool)  # row i+1 continues row i's episode without a gap
        same_next[:-1] = ((b["robot"][1:] == b["robot"][:-1]) & (b["episode"][1:] == b["episode"][:-1])
                          & (b["step"][1:] == b["step"][:-1] + 1))
        term = b["terminated"].astype(np.float32)
        cut = (~same_next | b["terminated"] | b["truncated"]).astype(np.float32)
        obs, nxt = self.normalise(b["obs"]), self.normalise(b["next_obs"])
        with torch.no_grad():
            v, u = (x.numpy() for x in self.critic(obs))
            nv = self.critic(nxt)[0].numpy()
        reward = b["reward"].astype(np.float64)
        if self.ret_rms is not None:  # NormalizeReward along each piece, as training/rl.py does per environment
            disc, ret = 0.0, np.zeros(n)
            for i in range(n):
                disc = disc * cfg.gamma + reward[i]
                ret[i] = disc
                if cut[i]:
                    disc = 0.0
            self.ret_rms.update(ret)
            reward = reward / math.sqrt(float(self.ret_rms.var) + 1e-8)
        adv, qhat = gae(reward[:, None].astype(np.float32), v[:, None], nv[:, None], term[:, None], cut[:, None],
                        cfg.gamma, cfg.gae_lambda)
        act = torch.as_tensor(b["action"], dtype=torch.float32)
        old_logp = torch.as_tensor(b["logp"], dtype=torch.float32)
        t_adv, t_q, t_u = (torch.as_tensor(x.reshape(-1)) for x in (adv, qhat, u))
        stats: dict[str, list[float]] = {k: [] for k in ("policy_loss", "value_loss", "approx_kl", "tv")}
        params = [*self.actor.parameters(), *self.critic.parameters()]
        for _ in range(cfg.epochs):
            perm = self.rng.permutation(n)
            for start in range(0, n, cfg.minibatch):
                idx = torch.as_tensor(perm[start:start + cfg.minibatch])
                logp = self._log_prob(obs[idx], act[idx])
                log_ratio = logp - old_logp[idx]
                ratio = log_ratio.exp()
                v_i, u_i = self.critic(obs[idx])
                l_pi = policy_loss(cfg, ratio, t_adv[idx], t_q[idx], t_u[idx])
                l_v, l_u = value_loss(v_i, t_q[idx]), logcosh_loss(t_q[idx], u_i)
                loss = cfg.c_v * l_v + cfg.c_u * l_u
                if self.steps >= self.critic_warmup:  # until then the actor is frozen: the critic learns the robot
                    loss = loss + l_pi
                self.opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                self.opt.step()
                self.steps += 1
                with torch.no_grad():
                    stats["policy_loss"].append(l_pi.item())
                    stats["value_loss"].append(l_v.item())
                    stats["approx_kl"].append(((ratio - 1) - log_ratio).mean().item())
                    stats["tv"].append((ratio - 1).abs().mean().item())
        self.updates += 1
        return {"rollout": n, **{k: float(np.mean(x)) for k, x in stats.items()},
                "log_std": float(self.actor.log_std.detach().mean())}

    def log_prob(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        """The current actor's censored log-probability of actions (raw observations in): for checks."""
        with torch.no_grad():
            return self._log_prob(self.normalise(obs), torch.as_tensor(action)).numpy()

    def _log_prob(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """The actor's censored log-probability of clipped actions, normalised observations in."""
        mean = self.actor(obs)
        return censored_log_prob(mean, self.actor.log_std.expand_as(mean), action, self.low, self.high)

    def warm_start(self, checkpoint: Mapping[str, Any]) -> None:
        """Actor and critic of `vigil train bpo|ppo` (its actor.pt); its observation normalisation stays fixed."""
        if "actor" not in checkpoint or "obs_mean" not in checkpoint:
            raise ValueError("--warm-start for an on-policy learner must be the actor.pt of `vigil train bpo|ppo` "
                             "(keys actor, critic, obs_mean, obs_std)")
        self.actor.load_state_dict(checkpoint["actor"])
        if "critic" in checkpoint:
            self.critic.load_state_dict(checkpoint["critic"])
        self.obs_mean = np.asarray(checkpoint["obs_mean"], np.float64)
        self.obs_std = np.asarray(checkpoint["obs_std"], np.float64)

    def state(self) -> dict[str, Any]:
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(), "opt": self.opt.state_dict(),
                "obs_mean": self.obs_mean, "obs_std": self.obs_std, "updates": self.updates, "steps": self.steps,
                "ret_rms": None if self.ret_rms is None else vars(self.ret_rms).copy(), "skipped": self.skipped}

    def load(self, state: Mapping[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.opt.load_state_dict(state["opt"])
        self.obs_mean, self.obs_std = state["obs_mean"], state["obs_std"]
        self.updates, self.steps, self.skipped = int(state["updates"]), int(state["steps"]), int(state["skipped"])
        if self.ret_rms is not None and state.get("ret_rms"):
            vars(self.ret_rms).update(state["ret_rms"])
