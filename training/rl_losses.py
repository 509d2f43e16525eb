"""The policy and critic losses of training/rl.py, as pure functions of tensors.

The method: docs/algorithms.md#bpo-bounded-policy-optimization.

BPO and PPO share the rollout, GAE, normalisation, networks and the critic losses; they differ only in
the policy loss:

    PPO  L = -E[min(rho A, clip(rho, 1 - c, 1 + c) A)]              one-sided hinge around the bound
    BPO  L =  E[|rho - rho*| |Qhat - V|],                           two-sided: overshoot is penalised too
         rho* = 1 - eps + 2 eps sigmoid(clamp((Qhat - U) / lam, +-10))

U(s) is the "median critic", trained with the log-cosh loss E[log(2 cosh((Qhat - U) / 2))]: for residuals
much larger than 2 its gradient is sign-like, so U tends to the median of Qhat, for residuals much smaller
than 2 it is quadratic (U tends to the mean). GBPO is the group-relative variant for groups of rollouts
from one start state (a bandit: no critic, statistics of the group instead).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOG2 = math.log(2.0)


def bpo_target(qhat: torch.Tensor, u: torch.Tensor, eps: float, lam: float) -> torch.Tensor:
    """rho* = 1 - eps + 2 eps sigmoid(clamp((Qhat - U) / lam, -10, 10)), in [1 - eps, 1 + eps]."""
    z = torch.clamp((qhat - u) / lam, -10.0, 10.0)
    return 1.0 - eps + 2.0 * eps * torch.sigmoid(z)


def tv_loss(ratio: torch.Tensor, rho_star: torch.Tensor, adv_abs: torch.Tensor) -> torch.Tensor:
    """Advantage-weighted total variation E[|rho - rho*| |Qhat - V|]; rho* and |Qhat - V| carry no gradient."""
    return ((ratio - rho_star.detach()).abs() * adv_abs.detach()).mean()


def logcosh_loss(qhat: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """E[log(2 cosh((Qhat - U) / 2))], computed as |x| + softplus(-2|x|) (x = (Qhat - U) / 2): no overflow."""
    x = ((qhat - u) / 2.0).abs()
    return (x + F.softplus(-2.0 * x)).mean()


def ppo_clip_loss(ratio: torch.Tensor, adv: torch.Tensor, clip: float) -> torch.Tensor:
    """PPO's clipped surrogate, as a loss: -E[min(rho A, clip(rho, 1 - clip, 1 + clip) A)]."""
    return -torch.min(ratio * adv, torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * adv).mean()


def value_loss(v: torch.Tensor, qhat: torch.Tensor) -> torch.Tensor:
    """MSE(V, Qhat)."""
    return F.mse_loss(v, qhat.detach())


def gbpo_target(rewards: torch.Tensor, eps_lo: float, eps_hi: float, temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """For rewards (G, K), K rollouts in each of G groups: (A, rho*) with A the z-score of the reward in its
    group and rho* = 1 - eps_lo + (eps_lo + eps_hi) sigmoid((r - median_g) / (std_g T)). A group whose
    rewards are all equal has A = 0 (it teaches nothing) and rho* = 1 - eps_lo + (eps_lo + eps_hi) / 2."""
    r = rewards.float()
    std = r.std(dim=1, keepdim=True, unbiased=False)
    safe = torch.where(std > 1e-8, std, torch.ones_like(std))
    adv = torch.where(std > 1e-8, (r - r.mean(dim=1, keepdim=True)) / safe, torch.zeros_like(r))
    median = r.median(dim=1, keepdim=True).values  # the lower median for even K, as torch defines it
    target = torch.where(std > 1e-8, (r - median) / (safe * temperature), torch.zeros_like(r))
    return adv, 1.0 - eps_lo + (eps_lo + eps_hi) * torch.sigmoid(target)


def gbpo_loss(ratio: torch.Tensor, rewards: torch.Tensor, eps_lo: float = 0.2, eps_hi: float = 0.2,
              temperature: float = 1.0) -> torch.Tensor:
    """Group-relative BPO: E[|rho - rho*| |A|] with (A, rho*) from gbpo_target; ratio and rewards (G, K)."""
    adv, rho_star = gbpo_target(rewards, eps_lo, eps_hi, temperature)
    return tv_loss(ratio, rho_star, adv.abs())
