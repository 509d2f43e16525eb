"""Soft actor-critic for a streaming learner, in one file (CleanRL's sac_continuous_action, reshaped so that data
arrives from outside: `SAC.update(batch)` is one gradient step; who collects the data is not its business).

Twin Q critics with Polyak-averaged targets, a tanh-squashed Gaussian actor, the entropy temperature tuned to
a target of -dim(A). Two of the sim-to-online study's knobs (arXiv 2602.20220) are here: `critic_warmup`, the
number of updates during which the actor is frozen while the critics catch up with the new data (slowing the
critic's influence early), and the update-to-data ratio, which the caller sets by how many updates it makes per
new transition. The actor exports as a `gaussian` bundle whose action is the squashed mean (`export`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


@dataclass(frozen=True)
class SACConfig:
    hidden: int = 256
    gamma: float = 0.99
    tau: float = 0.005
    actor_lr: float = 3e-4
    critic_lr: float = 1e-3
    batch_size: int = 256
    policy_frequency: int = 2      # actor and temperature updated every this many critic updates (CleanRL)
    critic_warmup: int = 0         # updates with the actor frozen (after a warm start: let the critics catch up)
    autotune: bool = True
    alpha: float = 0.2             # the initial (or fixed) entropy temperature
    seed: int = 0


def _mlp(n_in: int, n_out: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, n_out))


class Actor(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int, low: np.ndarray, high: np.ndarray):
        super().__init__()
        self.net = _mlp(obs_dim, 2 * act_dim, hidden)
        self.register_buffer("scale", torch.as_tensor((high - low) / 2.0, dtype=torch.float32))
        self.register_buffer("bias", torch.as_tensor((high + low) / 2.0, dtype=torch.float32))

    def forward(self, obs: Tensor) -> Tensor:
        """The deterministic action (the squashed mean): what the exported bundle computes."""
        mean, _ = self.net(obs).chunk(2, dim=-1)
        return torch.tanh(mean) * self.scale + self.bias

    def sample(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        log_std = LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(log_std) + 1)
        normal = torch.distributions.Normal(mean, log_std.exp())
        u = normal.rsample()
        y = torch.tanh(u)
        logp = normal.log_prob(u) - torch.log(self.scale * (1 - y.pow(2)) + 1e-6)
        return y * self.scale + self.bias, logp.sum(-1)


class QNet(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = _mlp(obs_dim + act_dim, 1, hidden)

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        return self.net(torch.cat([obs, act], -1))[:, 0]


class SAC:
    def __init__(self, obs_dim: int, act_dim: int, low: np.ndarray, high: np.ndarray, cfg: SACConfig):
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.actor = Actor(obs_dim, act_dim, cfg.hidden, np.asarray(low, np.float32), np.asarray(high, np.float32))
        self.q1, self.q2 = QNet(obs_dim, act_dim, cfg.hidden), QNet(obs_dim, act_dim, cfg.hidden)
        self.q1_target, self.q2_target = copy.deepcopy(self.q1), copy.deepcopy(self.q2)
        self.q_opt = torch.optim.Adam([*self.q1.parameters(), *self.q2.parameters()], lr=cfg.critic_lr)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr)
        self.target_entropy = -float(act_dim)
        self.log_alpha = torch.tensor(np.log(cfg.alpha), dtype=torch.float32, requires_grad=True)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=cfg.critic_lr)
        self.updates = 0

    @property
    def alpha(self) -> float:
        return float(self.log_alpha.exp()) if self.cfg.autotune else self.cfg.alpha

    def update(self, b: dict[str, Tensor]) -> dict[str, float]:
        """One gradient step on a batch {obs, action, reward, next_obs, done} (done: terminated only; a
        truncated episode bootstraps)."""
        cfg = self.cfg
        with torch.no_grad():
            next_a, next_logp = self.actor.sample(b["next_obs"])
            q_next = torch.min(self.q1_target(b["next_obs"], next_a), self.q2_target(b["next_obs"], next_a))
            target = b["reward"] + cfg.gamma * (1 - b["done"]) * (q_next - self.alpha * next_logp)
        q_loss = F.mse_loss(self.q1(b["obs"], b["action"]), target) + F.mse_loss(self.q2(b["obs"], b["action"]), target)
        self.q_opt.zero_grad()
        q_loss.backward()
        self.q_opt.step()
        out = {"q_loss": float(q_loss.detach())}
        if self.updates >= cfg.critic_warmup and self.updates % cfg.policy_frequency == 0:
            for _ in range(cfg.policy_frequency):
                a, logp = self.actor.sample(b["obs"])
                actor_loss = (self.alpha * logp - torch.min(self.q1(b["obs"], a), self.q2(b["obs"], a))).mean()
                self.actor_opt.zero_grad()
                actor_loss.backward()
                self.actor_opt.step()
                if cfg.autotune:
                    with torch.no_grad():
                        _, logp = self.actor.sample(b["obs"])
                    alpha_loss = -(self.log_alpha.exp() * (logp + self.target_entropy)).mean()
                    self.alpha_opt.zero_grad()
                    alpha_loss.backward()
                    self.alpha_opt.step()
            out["actor_loss"] = float(actor_loss.detach())
        with torch.no_grad():
            for net, tgt in ((self.q1, self.q1_target), (self.q2, self.q2_target)):
                for p, tp in zip(net.parameters(), tgt.parameters(), strict=True):
                    tp.mul_(1 - cfg.tau).add_(cfg.tau * p)
        self.updates += 1
        return out

    def state(self) -> dict[str, Any]:
        return {"actor": self.actor.state_dict(), "q1": self.q1.state_dict(), "q2": self.q2.state_dict(),
                "q1_target": self.q1_target.state_dict(), "q2_target": self.q2_target.state_dict(),
                "q_opt": self.q_opt.state_dict(), "actor_opt": self.actor_opt.state_dict(),
                "log_alpha": self.log_alpha.detach().clone(), "alpha_opt": self.alpha_opt.state_dict(),
                "updates": self.updates}

    def load(self, state: dict[str, Any], actor_only: bool = False) -> None:
        self.actor.load_state_dict(state["actor"])
        if actor_only:  # a warm start from another run: the critics learn this world from scratch
            return
        for k in ("q1", "q2", "q1_target", "q2_target", "q_opt", "actor_opt", "alpha_opt"):
            getattr(self, k).load_state_dict(state[k])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.updates = int(state["updates"])


class Replay:
    """A ring buffer of transitions (numpy), sampled uniformly."""

    def __init__(self, obs_dim: int, act_dim: int, capacity: int = 1_000_000):
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), np.float32)
        self.action = np.zeros((capacity, act_dim), np.float32)
        self.reward = np.zeros(capacity, np.float32)
        self.done = np.zeros(capacity, np.float32)
        self.capacity, self.size, self.pos = capacity, 0, 0

    def add(self, obs, action, reward, next_obs, terminated) -> None:
        """Append rows in order (a batch read from the log at once); beyond capacity the oldest are overwritten."""
        n = len(reward)
        m = min(n, self.capacity)  # of more rows than fit, only the last `capacity` survive
        idx = (self.pos + n - m + np.arange(m)) % self.capacity
        for name, rows in (("obs", obs), ("action", action), ("reward", reward), ("next_obs", next_obs),
                           ("done", terminated)):
            getattr(self, name)[idx] = np.asarray(rows, np.float32)[n - m:]
        self.pos = (self.pos + n) % self.capacity
        self.size = min(self.size + n, self.capacity)

    def sample(self, n: int, rng: np.random.Generator) -> dict[str, Tensor]:
        idx = rng.integers(0, self.size, n)
        return {k: torch.as_tensor(getattr(self, k)[idx]) for k in ("obs", "action", "reward", "next_obs", "done")}
