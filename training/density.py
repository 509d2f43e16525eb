"""Density scores on the policy's own observation encoding: RND and logpZO, for failure prediction.

The method: docs/failure.md (signals). Both are learned from the training data only (no failure data), on
member 0's context — the vector `Ensemble.encode` computes from the normalised state and the instruction
embedding once per plan — standardised with the training contexts' mean and std:

    rnd      random network distillation (FIPER's RND-OE): a fixed, randomly initialised target MLP f and a
             predictor g trained to match it on the training contexts; score = mean (g(z) - f(z))^2. Large
             where the encoding is unlike anything trained on.
    logpzo   FAIL-Detect's logpZO: a small unconditional flow-matching model maps noise to the training
             contexts; the score integrates it backwards (Euler, t = 1 -> 0) from the context to its noise
             z0 and reports ||z0||^2 / dim (the Gaussian log-density of z0, up to sign and a constant).

`DensityHeads` holds both and their normalisation. The bundle export (training/flow_export.py) puts RND inside
the plan graph, after the encoder, so it comes out of the same session.run as the action and VFD; logpZO is
computed offline only (bench/failure_rollouts.py): it ranked below RND and would have cost more than RND and the
monitor together (docs/failure.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

FORMAT = "vigil-density-heads-1"


@dataclass(frozen=True)
class DensityConfig:
    """Hyperparameters of the two heads (small: they run every plan on board)."""

    dim: int = 128            # context width (the ensemble's `hidden`)
    rnd_hidden: int = 128
    rnd_out: int = 32         # target/predictor output width
    flow_hidden: int = 128
    flow_steps: int = 4       # Euler steps of the logpZO backward integration
    time_features: int = 8
    steps: int = 2000         # optimiser steps for each head
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0


def _mlp(d_in: int, hidden: int, d_out: int, depth: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else hidden, hidden), nn.SiLU()]
    return nn.Sequential(*layers, nn.Linear(hidden, d_out))


class DensityHeads(nn.Module):
    """RND and logpZO on a (B, dim) context; `forward` returns (rnd (B,), logpzo (B,))."""

    def __init__(self, cfg: DensityConfig):
        super().__init__()
        self.cfg = cfg
        torch.manual_seed(cfg.seed)
        self.target = _mlp(cfg.dim, cfg.rnd_hidden, cfg.rnd_out)
        self.predictor = _mlp(cfg.dim, cfg.rnd_hidden, cfg.rnd_out)
        self.flow = _mlp(cfg.dim + cfg.time_features, cfg.flow_hidden, cfg.dim, depth=3)
        for p in self.target.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.zeros(cfg.dim))
        self.register_buffer("std", torch.ones(cfg.dim))
        self.register_buffer("freqs", torch.pi * 2.0 ** torch.linspace(0.0, 3.0, cfg.time_features // 2))

    def standardise(self, context: Tensor) -> Tensor:
        return (context - self.mean) / self.std

    def velocity(self, x: Tensor, t: float | Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0], 1)
        emb = torch.cat([torch.sin(t * self.freqs), torch.cos(t * self.freqs)], dim=-1)
        return self.flow(torch.cat([x, emb], dim=-1))

    def rnd(self, z: Tensor) -> Tensor:
        return (self.predictor(z) - self.target(z)).square().mean(-1)

    def logpzo(self, z: Tensor) -> Tensor:
        n = self.cfg.flow_steps
        x = z
        for k in range(n, 0, -1):  # backwards from t = 1 (the data) to t = 0 (the noise)
            x = x - self.velocity(x, k / n) / n
        return x.square().mean(-1)

    def forward(self, context: Tensor) -> tuple[Tensor, Tensor]:
        z = self.standardise(context)
        return self.rnd(z), self.logpzo(z)


def fit(contexts: np.ndarray | Tensor, cfg: DensityConfig, progress: bool = False) -> tuple[DensityHeads, dict]:
    """Train both heads on training contexts (n, dim); returns the heads (eval mode) and their loss history."""
    x = torch.as_tensor(np.asarray(contexts), dtype=torch.float32)
    if x.dim() != 2 or x.shape[1] != cfg.dim:
        raise ValueError(f"contexts must be (n, {cfg.dim}), got {tuple(x.shape)}")
    heads = DensityHeads(cfg)
    heads.mean.copy_(x.mean(0))
    heads.std.copy_(x.std(0).clamp_min(1e-3))
    z = heads.standardise(x)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.Adam([*heads.predictor.parameters(), *heads.flow.parameters()], lr=cfg.lr)
    hist: dict[str, list[float]] = {"rnd": [], "flow": []}
    steps = range(cfg.steps)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="density heads", leave=False)
    heads.train()
    for _ in steps:
        b = z[torch.randint(len(z), (cfg.batch_size,), generator=gen)]
        rnd_loss = heads.rnd(b).mean()
        x0 = torch.randn(b.shape, generator=gen)
        t = torch.rand(b.shape[0], 1, generator=gen)
        flow_loss = F.mse_loss(heads.velocity((1 - t) * x0 + t * b, t), b - x0)
        opt.zero_grad()
        (rnd_loss + flow_loss).backward()
        opt.step()
        hist["rnd"].append(rnd_loss.item())
        hist["flow"].append(flow_loss.item())
    return heads.eval(), hist


def save(path: str | Path, heads: DensityHeads, info: dict[str, Any] | None = None) -> None:
    """A dict of tensors and plain values (loadable with weights_only=True)."""
    torch.save({"format": FORMAT, "cfg": asdict(heads.cfg), "info": dict(info or {}),
                "state_dict": {k: v.detach().clone() for k, v in heads.state_dict().items()}}, path)


def load(path: str | Path) -> DensityHeads:
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if ck.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file (format {ck.get('format')!r})")
    heads = DensityHeads(DensityConfig(**ck["cfg"]))
    heads.load_state_dict(ck["state_dict"])
    return heads.eval()


def member0_contexts(ens, obs, instr, batch: int = 4096) -> Tensor:
    """Member 0's context of every training example: (n, hidden)."""
    out = []
    n = len(obs["state"] if isinstance(obs, dict) else obs)
    with torch.no_grad():
        for i in range(0, n, batch):
            o = {k: v[i:i + batch] for k, v in obs.items()} if isinstance(obs, dict) else obs[i:i + batch]
            out.append(ens.encode(o, torch.as_tensor(instr[i:i + batch]), members=[0])[0])
    return torch.cat(out)
