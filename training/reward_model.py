"""Reward models learned from an operator's pairwise preferences (Bradley–Terry), with their uncertainty.

An episode is summarised by the flow ensemble's own encoding of what it saw: member 0's context (observation and
instruction, `Ensemble.encode`) at every plan, with the action executed after it. The summary is the mean context,
the last context and the mean action (2h + m numbers), so the model sees where the episode went and how it ended.
A small MLP maps the summary to a return R; Bradley–Terry fits P(A better than B) = sigmoid(R(A) - R(B)) to the
answers ('a', 'b'; a tie is the target 1/2; 'cannot tell' is left out).

Uncertainty (RewardUQ's families), all giving posterior samples of R for every episode:
  ensemble  M independently initialised MLPs (a deep ensemble);
  laplace   one MLP, then a Gaussian posterior over its last layer from the Bradley–Terry Hessian (last-layer
            Laplace; the prior precision is the weight decay's);
  dropout   one MLP with dropout, sampled with fixed masks (MC dropout);
  single    one MLP, no uncertainty (the baseline every uncertainty method must beat on calibration).

The model exports to ONNX with the frozen encoder inside (`export_onnx`): the runtime scores a finished episode
from its states, instruction embedding and actions, with numpy and onnxruntime only (policies/reward.py).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

METHODS = ("ensemble", "laplace", "dropout", "single")
ANSWERS = {"a": 1.0, "b": 0.0, "tie": 0.5}  # 'unsure' (cannot tell) is not fitted


@dataclass(frozen=True)
class RewardConfig:
    """Hyperparameters of a preference reward model (one place, CleanRL style)."""

    method: str = "ensemble"
    members: int = 5           # ensemble members
    hidden: int = 64
    dropout: float = 0.2       # dropout method: rate
    samples: int = 32          # posterior samples (dropout masks, Laplace draws)
    steps: int = 300           # Adam steps per fit (full batch: the answers are few)
    lr: float = 3e-3
    prior: float = 3.0         # precision of the Gaussian prior on every weight (an L2 term, also Laplace's)
    every: int = 4             # steps between plans (the executed part of a chunk)
    seed: int = 0

    def check(self) -> RewardConfig:
        if self.method not in METHODS:
            raise ValueError(f"reward.method {self.method!r}: expected one of {METHODS}")
        for key in ("members", "hidden", "samples", "steps", "every"):
            if getattr(self, key) < 1:
                raise ValueError(f"reward.{key} {getattr(self, key)}: expected an integer >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"reward.dropout {self.dropout}: expected a number in [0, 1)")
        return self


# ------------------------------------------------------------------------------------------------ features


class Summary(nn.Module):
    """(states (P, obs), instruction (1, d), actions (P, m)) -> the episode summary (2h + m,), with a frozen copy
    of member 0's encoder: the same function in training and in the exported graph."""

    def __init__(self, ens):
        super().__init__()
        self.encoder = copy.deepcopy(ens.subset(1)).eval()
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    def forward(self, states: Tensor, instr: Tensor, actions: Tensor) -> Tensor:
        ctx = self.encoder.encode(states, instr.expand(states.shape[0], -1))[0]  # (P, h)
        return torch.cat([ctx.mean(0), ctx[-1], actions.mean(0)])


def plan_inputs(states: np.ndarray, actions: np.ndarray, every: int) -> tuple[np.ndarray, np.ndarray]:
    """An episode's plan-time states (P, obs) and the mean action executed after each (P, m)."""
    T = len(actions)
    idx = np.arange(0, T, every)
    acts = np.stack([actions[t:t + every].mean(0) for t in idx])
    return np.asarray(states[idx], np.float32), acts.astype(np.float32)


def summaries(ens, episodes: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], every: int = 4) -> np.ndarray:
    """Summaries (N, 2h + m) of episodes given as (states (T+1, obs), instruction embedding (d,), actions (T, m))."""
    net = Summary(ens)
    out = []
    with torch.no_grad():
        for states, instr, actions in episodes:
            s, a = plan_inputs(states, actions, every)
            out.append(net(torch.from_numpy(s), torch.as_tensor(instr, dtype=torch.float32)[None],
                           torch.from_numpy(a)).numpy())
    return np.stack(out)


# --------------------------------------------------------------------------------------------------- model


class Heads(nn.Module):
    """K MLPs on standardised summaries -> R (K, N). Dropout (if any) before each hidden activation's output."""

    def __init__(self, dim: int, hidden: int, k: int, dropout: float):
        super().__init__()
        self.nets = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Dropout(dropout),
                                                nn.Linear(hidden, hidden), nn.SiLU(), nn.Dropout(dropout),
                                                nn.Linear(hidden, 1)) for _ in range(k))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def features(self, x: Tensor, k: int = 0) -> Tensor:
        """The last hidden layer of net k (N, hidden): what last-layer Laplace is Bayesian over."""
        return self.nets[k][:-1]((x - self.mean) / self.std)

    def last_features(self, x: Tensor) -> Tensor:
        """Net 0's last hidden layer with a constant 1 for the bias (N, hidden + 1): R = last_weights() . this."""
        return torch.cat([self.features(x), torch.ones(len(x), 1)], 1)

    def last_weights(self) -> Tensor:
        """Net 0's output layer as one vector (hidden + 1,): its weights, then its bias."""
        last = self.nets[0][-1]
        return torch.cat([last.weight[0], last.bias]).detach()

    def forward(self, x: Tensor) -> Tensor:
        z = (x - self.mean) / self.std
        return torch.stack([net(z)[:, 0] for net in self.nets])


@dataclass
class Fitted:
    """A fitted reward model: the heads, and (laplace) the last layer's posterior covariance."""

    cfg: RewardConfig
    heads: Heads
    cov: Tensor | None = None  # (hidden + 1, hidden + 1): last layer weights and bias
    _masked: Fitted | None = None  # dropout: the fixed masks folded into heads

    def samples(self, x: np.ndarray) -> np.ndarray:
        """Posterior samples of R for summaries x (N, D) -> (S, N); S = 1 for `single`."""
        xt = torch.as_tensor(x, dtype=torch.float32)
        cfg = self.cfg
        with torch.no_grad():
            if cfg.method in ("ensemble", "single"):
                self.heads.eval()
                return self.heads(xt).numpy()
            if cfg.method == "dropout":  # one fixed mask per sample, shared by every episode (as exported)
                if self._masked is None:
                    self._masked = _masks_as_heads(self)
                return self._masked.heads(xt).numpy()
            self.heads.eval()  # laplace: draws of the last layer around the MAP
            return (self.laplace_draws() @ self.heads.last_features(xt).T).numpy()

    def laplace_draws(self) -> Tensor:
        """`samples` fixed draws (S, hidden + 1) of the last layer from its Laplace posterior (the same every call,
        and in the exported graph)."""
        w = self.heads.last_weights()
        g = torch.Generator().manual_seed(self.cfg.seed + 99)
        return w + torch.randn(self.cfg.samples, len(w), generator=g) @ torch.linalg.cholesky(self.cov).T

    def mean_std(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = self.samples(x)
        return s.mean(0), s.std(0)

    def prob(self, x: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """P(A better than B) for pairs (n, 2) of rows of x, averaged over the posterior samples."""
        s = self.samples(x)
        d = s[:, pairs[:, 0]] - s[:, pairs[:, 1]]
        return (1.0 / (1.0 + np.exp(-np.clip(d, -50, 50)))).mean(0)


def fit(x: np.ndarray, pairs: np.ndarray, labels: np.ndarray, cfg: RewardConfig) -> Fitted:
    """Bradley–Terry fit on summaries x (N, D), answered pairs (n, 2) (row indices of x) and labels (n,) in
    {1, 0, 1/2} (A better, B better, tie)."""
    cfg = cfg.check()
    torch.manual_seed(cfg.seed)
    k = cfg.members if cfg.method == "ensemble" else 1
    heads = Heads(x.shape[1], cfg.hidden, k, cfg.dropout if cfg.method == "dropout" else 0.0)
    xt = torch.as_tensor(x, dtype=torch.float32)
    heads.mean.copy_(xt.mean(0))
    heads.std.copy_(xt.std(0).clamp_min(1e-3))
    pt = torch.as_tensor(np.asarray(pairs, np.int64).reshape(-1, 2))
    yt = torch.as_tensor(np.asarray(labels, np.float32))
    opt = torch.optim.Adam(heads.parameters(), lr=cfg.lr)
    heads.train()
    n = max(len(pt), 1)
    for _ in range(cfg.steps if len(pt) else 0):
        r = heads(xt)
        logit = r[:, pt[:, 0]] - r[:, pt[:, 1]]
        loss = nn.functional.binary_cross_entropy_with_logits(logit, yt.expand_as(logit)) * len(heads.nets)
        loss = loss + cfg.prior / (2 * n) * sum(p.square().sum() for p in heads.parameters())  # MAP: the prior
        opt.zero_grad()
        loss.backward()
        opt.step()
    heads.eval()
    cov = laplace_cov(heads, xt, pt, cfg) if cfg.method == "laplace" else None
    return Fitted(cfg, heads, cov)


def laplace_cov(heads: Heads, x: Tensor, pairs: Tensor, cfg: RewardConfig) -> Tensor:
    """Posterior covariance of the last layer: (sum_n p(1-p) d d^T + prior I)^-1, d the pair's feature
    difference (the bias cancels in a difference; it keeps the prior's variance)."""
    with torch.no_grad():
        phi, w = heads.last_features(x), heads.last_weights()
        prec = torch.eye(len(w)) * cfg.prior
        if len(pairs):
            d = phi[pairs[:, 0]] - phi[pairs[:, 1]]
            p = torch.sigmoid(d @ w)
            prec = prec + (d * (p * (1 - p))[:, None]).T @ d
        return torch.linalg.inv(prec)


def labels_of(answers: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(mask of answers that are fitted, their targets): 'a' 1, 'b' 0, 'tie' 1/2; 'unsure' left out."""
    keep = np.array([a in ANSWERS for a in answers], bool)
    return keep, np.array([ANSWERS[a] for a in answers if a in ANSWERS], np.float32)


# ----------------------------------------------------------------------------------------------- metrics


def accuracy(prob: np.ndarray, truth: np.ndarray) -> float:
    """Share of pairs where P(A better) > 1/2 agrees with the true order (truth 1: A better)."""
    return float(np.mean((prob > 0.5) == (truth > 0.5)))


def nll(prob: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(prob, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def ece(prob: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error of the stated P(A better) against observed answers, symmetrised: each pair is
    read in the order that makes its stated probability >= 1/2 (a pair's order is arbitrary)."""
    conf = np.where(prob >= 0.5, prob, 1 - prob)
    hit = np.where(prob >= 0.5, y, 1 - y)
    edges = np.linspace(0.5, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(conf[m].mean() - hit[m].mean())
    return float(total)


# ------------------------------------------------------------------------------------------------- export


class Scorer(nn.Module):
    """The exported graph: (state (P, obs), instruction (1, d), action (P, m)) -> (ret, ret_std) from the
    posterior samples (ensemble members, dropout masks or Laplace draws; fixed at export)."""

    def __init__(self, ens, fitted: Fitted, draws: Tensor | None):
        super().__init__()
        self.summary = Summary(ens)
        self.heads = copy.deepcopy(fitted.heads).eval()
        self.method = fitted.cfg.method
        self.register_buffer("draws", draws if draws is not None else torch.zeros(1, 1))

    def forward(self, state: Tensor, instruction: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        x = self.summary(state, instruction, action)[None]
        if self.method == "laplace":
            r = (self.draws @ self.heads.last_features(x).T)[:, 0]
        else:
            r = self.heads(x)[:, 0]
        return r.mean(), r.std(unbiased=False)


def export_onnx(ens, fitted: Fitted, folder: str | Path, obs_dim: int, instr_dim: int, act_dim: int) -> Path:
    """reward.onnx and reward.json (the config) in `folder`. MC dropout is exported as an ensemble of its fixed
    masks (one head per mask), so the graph is deterministic and the runtime needs nothing but onnxruntime."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fitted_export, draws = fitted, None
    if fitted.cfg.method == "dropout":
        fitted_export = _masks_as_heads(fitted)
    elif fitted.cfg.method == "laplace":
        draws = fitted.laplace_draws()
    model = Scorer(ens, fitted_export, draws).eval()
    P = 5
    args = (torch.zeros(P, obs_dim), torch.zeros(1, instr_dim), torch.zeros(P, act_dim))
    torch.onnx.export(model, args, str(folder / "reward.onnx"), input_names=["state", "instruction", "action"],
                      output_names=["ret", "ret_std"], dynamic_axes={"state": {0: "plans"}, "action": {0: "plans"}},
                      opset_version=17, dynamo=False)
    (folder / "reward.json").write_text(json.dumps({"format": "vigil-reward/1", "config": asdict(fitted.cfg),
                                                    "inputs": {"state": obs_dim, "instruction": instr_dim,
                                                               "action": act_dim}}, indent=1))
    return folder / "reward.onnx"


def _masks_as_heads(fitted: Fitted) -> Fitted:
    """MC dropout with fixed masks as an explicit ensemble: head s is the MLP with mask s folded into its
    weights (inverted dropout: kept units scaled by 1/(1-p))."""
    cfg, net = fitted.cfg, fitted.heads.nets[0]
    g = torch.Generator().manual_seed(cfg.seed + 99)
    p = cfg.dropout
    heads = Heads(len(fitted.heads.mean), cfg.hidden, cfg.samples, 0.0)
    heads.mean.copy_(fitted.heads.mean)
    heads.std.copy_(fitted.heads.std)
    with torch.no_grad():
        for s in range(cfg.samples):
            m1 = (torch.rand(cfg.hidden, generator=g) >= p).float() / (1 - p)
            m2 = (torch.rand(cfg.hidden, generator=g) >= p).float() / (1 - p)
            tgt = heads.nets[s]
            tgt[0].load_state_dict(net[0].state_dict())
            tgt[3].weight.copy_(net[3].weight * m1[None])
            tgt[3].bias.copy_(net[3].bias)
            tgt[6].weight.copy_(net[6].weight * m2[None])
            tgt[6].bias.copy_(net[6].bias)
    return Fitted(RewardConfig(**{**asdict(cfg), "method": "ensemble", "members": cfg.samples}), heads)
