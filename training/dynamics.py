"""A forward-dynamics ensemble for the dynamics monitor (monitors/dynamics.py): train, measure, export to ONNX.

Each member is an MLP that predicts how the state changes over one step, obs_{t+1} - obs_t on the predicted
dimensions, from the current observation's input dimensions and the last `history` actions applied (a_t,
a_{t-1}, ...). Members differ by initialisation and by the bootstrap of the episodes they train on (PETS-style),
so that their spread grows away from the data. The held-out episodes (a fraction, never trained on) give each
predicted dimension's error scale sigma_d: the monitor's scores are in these units.

Which dimensions, by default (docs/dynamics.md): inputs are every state dimension that varies in the data;
predicted are the dimensions of the current frame that move (for Meta-World's 39-dim state, the first 18: hand,
gripper and the objects' poses; the next 18 repeat the previous frame and the last 3 are the goal; the inputs are
the current frame's too, `default_dims`). Objects are predicted as well as the hand because friction and mass act on
what the robot touches.

    vigil train dynamics --demos DIR --bundle runs/mt10/bundle      (also run by `vigil train flow`)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vigil.policies.dynamics import features
from vigil.training.demos import DemoSet

MODEL_FILE = "dynamics.onnx"
CLIP = 10.0  # normalised inputs are clipped to this (a state far outside the data: the members disagree, no overflow)
METAWORLD_FRAME = 18  # Meta-World's state: this frame (18), the previous frame (18), the goal (3)


@dataclass(frozen=True)
class DynamicsConfig:
    members: int = 5
    hidden: int = 128
    depth: int = 2
    history: int = 4  # actions in the input: a_t, a_{t-1}, ... (what the arm's lag depends on; docs/dynamics.md)
    steps: int = 3000
    batch: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-5
    holdout: float = 0.15  # fraction of episodes held out to measure the error scale per dimension
    seed: int = 0
    state: str = "state"  # the observation array modelled
    inputs: tuple[int, ...] | None = None  # default: every dimension that varies in the data
    predict: tuple[int, ...] | None = None  # default: the current frame's dimensions that move (module docstring)

    def __post_init__(self) -> None:
        for key, ok, want in (("members", self.members >= 2, "an integer >= 2 (disagreement needs two)"),
                              ("hidden", self.hidden >= 1, "an integer >= 1"), ("depth", self.depth >= 1, ">= 1"),
                              ("history", self.history >= 1, "an integer >= 1"), ("steps", self.steps >= 1, ">= 1"),
                              ("batch", self.batch >= 1, ">= 1"), ("lr", self.lr > 0, "a number > 0"),
                              ("holdout", 0 < self.holdout < 1, "a fraction in (0, 1)")):
            if not ok:
                raise ValueError(f"dynamics.{key} must be {want}, got {getattr(self, key)!r}")


@dataclass
class Transitions:
    """Per-episode states (T+1, D) and actions (T, m), with the task of each episode."""

    states: list[np.ndarray] = field(default_factory=list)
    actions: list[np.ndarray] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)

    def add(self, states: np.ndarray, actions: np.ndarray, task: str = "") -> None:
        states, actions = np.asarray(states, np.float32), np.asarray(actions, np.float32)
        if len(actions) < 1 or len(states) < len(actions) + 1:
            return
        self.states.append(states[:len(actions) + 1])
        self.actions.append(actions.reshape(len(actions), -1))
        self.tasks.append(task)

    def __len__(self) -> int:
        return len(self.states)


def from_demos(folders: Sequence[str | Path], state: str = "state", tasks: Sequence[str] | None = None) -> Transitions:
    """Every episode of the demonstration folders (successful or not: the physics is the same)."""
    out = Transitions()
    for folder in folders:
        ds = DemoSet(folder)
        for info in ds.episodes():
            if tasks and info.task not in tasks:
                continue
            ep = ds.load(info.id)
            out.add(ep.observations[state], ep.actions, ep.task)
    if not len(out):
        raise ValueError(f"no episodes with observation {state!r} in {', '.join(map(str, folders))}")
    return out


def default_dims(data: Transitions, eps: float = 1e-6) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(inputs, predict): the dimensions that vary in the states; of those, the ones whose one-step change varies.
    For Meta-World's 39-dim states both are restricted to the current frame: without the previous frame the model
    cannot read the arm's velocity off the state and must predict the motion from the actions sent, so that a
    weaker or later actuation shows in its residual all episode long instead of being absorbed after one step."""
    s = np.concatenate(data.states)
    inputs = [int(i) for i in np.flatnonzero(s.std(0) > eps)]
    d = np.concatenate([x[1:] - x[:-1] for x in data.states])
    moving = [int(i) for i in np.flatnonzero(d.std(0) > eps)]
    if s.shape[1] == 39:
        inputs = [i for i in inputs if i < METAWORLD_FRAME]
        moving = [i for i in moving if i < METAWORLD_FRAME]
    if not inputs or not moving:
        raise ValueError("the states do not change in the data: nothing to model")
    return tuple(inputs), tuple(moving)


def default_groups(predict: Sequence[int], state_dim: int) -> dict[str, list[int]]:
    """Residual groups, as positions in `predict`: for Meta-World's 39-dim state, `robot` (hand xyz and gripper,
    dimensions 0-3) and `object` (the objects' poses); otherwise every predicted dimension is `robot`."""
    if state_dim == 39:
        robot = [i for i, d in enumerate(predict) if d < 4]
        obj = [i for i, d in enumerate(predict) if d >= 4]
        return {k: v for k, v in (("robot", robot), ("object", obj)) if v}
    return {"robot": list(range(len(predict)))}


def arrays(data: Transitions, idx: Sequence[int], inputs: Sequence[int], predict: Sequence[int],
           history: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, episode index per row) of the episodes idx."""
    xs, ys, es = [], [], []
    for i in idx:
        s, a = data.states[i], data.actions[i]
        xs.append(features(s, a, inputs, history))
        ys.append(s[1:, list(predict)] - s[:-1, list(predict)])
        es.append(np.full(len(a), i))
    return np.concatenate(xs), np.concatenate(ys).astype(np.float32), np.concatenate(es)


def _ensemble(cfg: DynamicsConfig, n_in: int, n_out: int, x_mean, x_std, y_mean, y_std):
    """M MLPs as one module with batched weights: (M, B, in) -> (M, B, out) in raw units, normalisation inside."""
    import torch
    from torch import nn

    class BatchedLinear(nn.Module):
        def __init__(self, m: int, i: int, o: int, gen: torch.Generator):
            super().__init__()
            bound = 1 / np.sqrt(i)
            self.w = nn.Parameter((torch.rand(m, i, o, generator=gen) * 2 - 1) * bound)
            self.b = nn.Parameter((torch.rand(m, 1, o, generator=gen) * 2 - 1) * bound)

        def forward(self, h):
            return torch.baddbmm(self.b, h, self.w)

    class Ensemble(nn.Module):
        def __init__(self):
            super().__init__()
            gen = torch.Generator().manual_seed(cfg.seed)
            dims = [n_in] + [cfg.hidden] * cfg.depth + [n_out]
            self.layers = nn.ModuleList(BatchedLinear(cfg.members, a, b, gen) for a, b in zip(dims, dims[1:]))
            for name, v in (("x_mean", x_mean), ("x_std", x_std), ("y_mean", y_mean), ("y_std", y_std)):
                self.register_buffer(name, torch.as_tensor(v, dtype=torch.float32))

        def normalised(self, xn):  # (M, B, in) normalised -> (M, B, out) normalised
            h = xn
            for i, layer in enumerate(self.layers):
                h = layer(h)
                if i < len(self.layers) - 1:
                    h = torch.nn.functional.silu(h)
            return h

        def forward(self, x):  # (B, in) raw -> (M, B, out) raw: the exported graph
            xn = ((x - self.x_mean) / self.x_std).clamp(-CLIP, CLIP).unsqueeze(0).expand(cfg.members, -1, -1)
            return self.normalised(xn) * self.y_std + self.y_mean

    return Ensemble()


@dataclass(frozen=True)
class Fitted:
    model: Any  # the torch module
    cfg: DynamicsConfig
    inputs: tuple[int, ...]
    predict: tuple[int, ...]
    sigma: np.ndarray  # held-out RMSE of the ensemble mean per predicted dimension
    info: Mapping[str, Any]
    groups: Mapping[str, list[int]] = field(default_factory=dict)


def fit(data: Transitions, cfg: DynamicsConfig = DynamicsConfig(), progress: bool = True,
        log: Callable[[str], None] = print) -> Fitted:
    """Train the ensemble on the data's episodes less a held-out fraction; measure sigma on the held-out ones."""
    import torch
    from tqdm import trange

    inputs, predict = default_dims(data)
    inputs, predict = cfg.inputs or inputs, cfg.predict or predict
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(data))
    n_hold = max(1, int(round(cfg.holdout * len(data)))) if len(data) > 1 else 0
    hold, train = order[:n_hold], order[n_hold:] if n_hold < len(data) else order
    x, y, ep = arrays(data, train, inputs, predict, cfg.history)
    # a dimension (almost) constant in the data must not blow up at a value it never took: its scale is at least
    # a twentieth of the typical one, and normalised inputs are clipped to +-CLIP in the graph
    x_mean, x_std = x.mean(0), x.std(0)
    x_std = np.maximum(x_std, max(0.05 * float(np.median(x_std)), 1e-6))
    y_mean, y_std = y.mean(0), np.maximum(y.std(0), 1e-8)
    torch.manual_seed(cfg.seed)
    model = _ensemble(cfg, x.shape[1], y.shape[1], x_mean, x_std, y_mean, y_std)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    xn = torch.as_tensor(np.clip((x - x_mean) / x_std, -CLIP, CLIP))
    yn = torch.as_tensor((y - y_mean) / y_std)
    # bootstrap per member, by episode: each member draws its rows from its own resample of the training episodes
    episodes = np.unique(ep)
    rows = {e: np.flatnonzero(ep == e) for e in episodes}
    boot = [np.concatenate([rows[e] for e in rng.choice(episodes, len(episodes))]) for _ in range(cfg.members)]
    gen = np.random.default_rng(cfg.seed + 1)
    losses = []
    for _ in trange(cfg.steps, desc="dynamics ensemble", disable=not progress, mininterval=1.0):
        idx = torch.as_tensor(np.stack([b[gen.integers(len(b), size=cfg.batch)] for b in boot]))
        pred = model.normalised(xn[idx])
        loss = ((pred - yn[idx]) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    hx, hy, _ = arrays(data, hold if len(hold) else train, inputs, predict, cfg.history)
    with torch.no_grad():
        mean = model(torch.as_tensor(hx)).mean(0).numpy()
    rmse = np.sqrt(((hy - mean) ** 2).mean(0)).astype(np.float64)
    floor = max(0.05 * float(np.median(rmse)), 1e-7)
    sigma = np.maximum(rmse, floor)
    info = {"train_episodes": int(len(train)), "heldout_episodes": int(len(hold)), "rows": int(len(x)),
            "loss_last": float(np.mean(losses[-max(1, cfg.steps // 20):])),
            "heldout_rmse_over_std": float(np.mean(rmse / np.maximum(hy.std(0), 1e-12)))}
    log(f"dynamics ensemble: {cfg.members} members, {len(train)} episodes ({len(x)} steps), held-out error "
        f"{info['heldout_rmse_over_std']:.3f} of the change's std")
    return Fitted(model, cfg, tuple(inputs), tuple(predict), sigma, info,
                  default_groups(predict, data.states[0].shape[1]))


def scored(fitted: Fitted):
    """The exported graph: (x (B, width), observed (B, P)) -> (delta (M, B, P), signals (B, G+1)), the monitor's
    per-step signals (monitors/dynamics.py: each group's log mean squared normalised residual, then the log mean
    normalised disagreement) computed in onnxruntime, so that a tick costs one call and no numpy."""
    import torch
    from torch import nn

    from vigil.monitors.dynamics import LOG_FLOOR

    groups = [torch.as_tensor(ix, dtype=torch.long) for ix in fitted.groups.values()]

    class Scored(nn.Module):
        def __init__(self):
            super().__init__()
            self.ensemble = fitted.model
            self.register_buffer("inv2", torch.as_tensor(1.0 / fitted.sigma ** 2, dtype=torch.float32))
            for i, ix in enumerate(groups):
                self.register_buffer(f"group{i}", ix)

        def forward(self, x, observed):
            d = self.ensemble(x)  # (M, B, P)
            mean = d.mean(0)
            err = (observed - mean) ** 2 * self.inv2
            out = [torch.log(err.index_select(1, getattr(self, f"group{i}")).mean(1) + LOG_FLOOR)
                   for i in range(len(groups))]
            out.append(torch.log((d.var(0, unbiased=False) * self.inv2).mean(1) + LOG_FLOOR))
            return d, torch.stack(out, dim=1)

    return Scored().eval()


def export(fitted: Fitted, folder: str | Path, action_dim: int) -> dict[str, Any]:
    """Write OUT/dynamics.onnx into a bundle folder; return the model keys of `monitor.dynamics`."""
    import torch

    from vigil.monitors.dynamics import DISAGREEMENT
    from vigil.policies.manifest import sha256_file

    folder = Path(folder)
    path = folder / MODEL_FILE
    x = torch.zeros(1, len(fitted.inputs) + fitted.cfg.history * action_dim)
    observed = torch.zeros(1, len(fitted.predict))
    tmp = folder / f".{MODEL_FILE}.{os.getpid()}.tmp"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter, chosen (dynamo=False)
        torch.onnx.export(scored(fitted), (x, observed), str(tmp), input_names=["x", "observed"],
                          output_names=["delta", "signals"], opset_version=17, dynamo=False,
                          dynamic_axes={"x": {0: "batch"}, "observed": {0: "batch"}, "delta": {1: "batch"},
                                        "signals": {0: "batch"}})
    os.replace(tmp, path)
    return {"model": MODEL_FILE, "sha256": sha256_file(path), "state": fitted.cfg.state,
            "inputs": list(fitted.inputs), "predict": list(fitted.predict), "groups": dict(fitted.groups),
            "signals": [*fitted.groups, DISAGREEMENT], "history": fitted.cfg.history,
            "action_dim": int(action_dim), "members": fitted.cfg.members,
            "sigma": [float(f"{s:.6g}") for s in fitted.sigma], "config": asdict(fitted.cfg), "fit": dict(fitted.info)}


def add_to_bundle(bundle: str | Path, data: Transitions, cfg: DynamicsConfig = DynamicsConfig(),
                  progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit on `data`, export into the bundle and write `monitor.dynamics` (the model keys; calibration comes from
    `vigil calibrate`, and any earlier calibration is dropped: it belonged to another model)."""
    from vigil.policies.manifest import read_manifest
    from vigil.training.calibrate import write_monitor

    manifest = read_manifest(bundle)
    if cfg.state not in {s.name for s in manifest.observation}:
        raise ValueError(f"dynamics.state: the bundle has no observation {cfg.state!r}")
    fitted = fit(data, cfg, progress, log)
    block = export(fitted, bundle, int(np.prod(manifest.action.shape)))
    write_monitor(bundle, block, "dynamics")
    log(f"dynamics: wrote {Path(bundle) / MODEL_FILE} and monitor.dynamics (calibrate it with `vigil calibrate`)")
    return block


def carry_over(parent: str | Path, bundle: str | Path) -> bool:
    """Give a bundle made from another (a SAVE round, post-training) its parent's dynamics ensemble: the robot and
    its physics did not change with the policy. The calibration keys are dropped (they belong to the parent
    policy's rollouts); `vigil calibrate` sets them again. Returns whether there was one to carry."""
    import shutil

    from vigil.monitors.dynamics import CALIBRATION_KEYS
    from vigil.policies.manifest import read_manifest
    from vigil.training.calibrate import write_monitor

    parent, bundle = Path(parent), Path(bundle)
    block = read_manifest(parent).monitor.get("dynamics") if (parent / "manifest.json").is_file() else None
    if not block or not (parent / str(block.get("model", MODEL_FILE))).is_file():
        return False
    shutil.copy2(parent / str(block["model"]), bundle / str(block["model"]))
    keep = {k: v for k, v in block.items() if k not in CALIBRATION_KEYS}
    write_monitor(bundle, keep, "dynamics")
    return True
