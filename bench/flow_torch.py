"""Torch cost of the flow ensemble (vigil.training.flow) on this machine: training throughput, and the
cost of one plan at batch 1 (encode once + the 10 Euler steps of the integrating members + one-way VFD
with N = 5 noise samples) for M = 1, 2, 5, 8, full members versus a shared encoder, per VFD pair
convention. These are torch numbers; the onnxruntime ones come with the export.

    .venv/bin/python -m bench.flow_torch [--threads 1] [--train-steps 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from vigil.training.flow import Ensemble, FlowConfig, plan, train_ensemble


def plan_us(cfg: FlowConfig, pairs: str, reps: int) -> float:
    """Median wall time of one plan at batch 1, microseconds."""
    ens = Ensemble(cfg).eval()
    obs, instr = torch.randn(1, cfg.obs_dim), torch.randn(1, cfg.instr_dim)
    noise = torch.randn(cfg.vfd_samples, 1, cfg.horizon, cfg.action_dim)
    times = []
    with torch.inference_mode():
        for _ in range(20):
            plan(ens, obs, instr, noise, pairs)
        for _ in range(reps):
            t0 = time.perf_counter()
            plan(ens, obs, instr, noise, pairs)
            times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def train_rate(cfg: FlowConfig) -> float:
    """Training samples per second, counted per member (batch_size x steps x members / s)."""
    n = 4096
    obs, instr = torch.randn(n, cfg.obs_dim), torch.randn(n, cfg.instr_dim)
    chunks = torch.rand(n, cfg.horizon, cfg.action_dim) * 2 - 1
    train_ensemble(dataclasses.replace(cfg, steps=5), obs, instr, chunks, progress=False)  # warm up
    t0 = time.perf_counter()
    train_ensemble(cfg, obs, instr, chunks, progress=False)
    return cfg.batch_size * cfg.steps * cfg.members / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = FlowConfig()
    print(f"torch {torch.__version__}, {args.threads} thread(s); hidden {base.hidden}, depth {base.depth}, "
          f"H {base.horizon}, N {base.vfd_samples}, {base.euler_steps} Euler steps\n")
    for shared in (False, True):
        cfg = dataclasses.replace(base, steps=args.train_steps, shared_encoder=shared)
        print(f"training M=5 {'shared encoder' if shared else 'full members'}, batch {cfg.batch_size}/member: "
              f"{train_rate(cfg):,.0f} samples/s (summed over members)")
    print("\n| M | variant | pairs | plan µs (batch 1) |\n|---|---|---|---|")
    for m in (1, 2, 5, 8):
        for shared in (False, True):
            for pairs in (("lower", "anchor") if m > 2 else ("lower",)):
                cfg = dataclasses.replace(base, members=m, shared_encoder=shared)
                us = plan_us(cfg, pairs, args.reps)
                print(f"| {m} | {'shared' if shared else 'full'} | {pairs if m > 1 else '-'} | {us:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
