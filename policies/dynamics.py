"""The bundle's forward-dynamics ensemble in onnxruntime: the dynamics monitor's model (monitors/dynamics.py).

The graph (`dynamics.onnx`, written by training/dynamics.py) takes the model inputs `x` (B, width) and the observed
state changes `observed` (B, P) and returns the members' predicted changes `delta` (M, B, P) and the monitor's
per-step `signals` (B, G+1): one residual per group, then the disagreement (docs/dynamics.md). Loaded once per
bundle by `Policy` and shared by every robot's monitor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from vigil.monitors.dynamics import DISAGREEMENT
from vigil.policies.bundle import _fast_run, session_options
from vigil.policies.manifest import sha256_file


def features(states: np.ndarray, actions: np.ndarray, inputs: Sequence[int] | np.ndarray,
             history: int) -> np.ndarray:
    """(T, width) model inputs for the steps of one episode: states (T+1 or T, D) and the actions applied after
    each state (T, m). Row t: state t's input dimensions, then actions t, t-1, ... (zeros before the first)."""
    states, actions = np.asarray(states, np.float32), np.asarray(actions, np.float32)
    actions = actions.reshape(len(actions), -1)
    T = len(actions)
    parts = [states[:T][:, np.asarray(inputs, np.int64)]]
    for k in range(history):
        lagged = np.zeros_like(actions)
        lagged[k:] = actions[:T - k] if k else actions
        parts.append(lagged)
    return np.concatenate(parts, axis=1)


class DynamicsModel:
    """The bundle's forward-dynamics ensemble in an onnxruntime session: features in, per-member state changes
    out, and the per-step signals."""

    def __init__(self, folder: str | Path, block: Mapping[str, Any], threads: int = 1):
        try:
            self.file = Path(folder) / str(block["model"])
            self.state = str(block.get("state", "state"))
            self.inputs = np.asarray(block["inputs"], np.int64)
            self.predict = np.asarray(block["predict"], np.int64)
            self.history = int(block["history"])
            self.action_dim = int(block["action_dim"])
            self.sigma = np.asarray(block["sigma"], np.float64)
            groups = block.get("groups") or {"robot": list(range(len(self.predict)))}
            self.groups = {str(g): np.asarray(ix, np.int64) for g, ix in groups.items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"monitor.dynamics must hold model, inputs, predict, history, action_dim and sigma "
                             f"({exc!r})") from None
        if self.sigma.shape != self.predict.shape or (self.sigma <= 0).any() or self.history < 1:
            raise ValueError("monitor.dynamics: sigma must be positive, one per predicted dimension; history >= 1")
        for g, ix in self.groups.items():
            if not len(ix) or ix.min() < 0 or ix.max() >= len(self.predict):
                raise ValueError(f"monitor.dynamics.groups.{g} must list positions in predict "
                                 f"(0..{len(self.predict) - 1})")
        if not self.file.is_file():
            raise ValueError(f"monitor.dynamics.model: {self.file} does not exist")
        want = block.get("sha256")
        if want and sha256_file(self.file) != want:
            raise ValueError(f"monitor.dynamics.model: {self.file} does not match its sha256 in the manifest")
        self.session = ort.InferenceSession(str(self.file), session_options(threads),
                                            providers=["CPUExecutionProvider"])
        self.names = tuple(block.get("signals") or (*self.groups, DISAGREEMENT))
        outputs = {o.name for o in self.session.get_outputs()}
        if not {"delta", "signals"} <= outputs or self.names != (*self.groups, DISAGREEMENT):
            raise ValueError(f"monitor.dynamics.model: {self.file} must output delta and signals (one per group, "
                             "then disagreement)")
        self._run = _fast_run(self.session)
        self.width = len(self.inputs) + self.history * self.action_dim

    def features(self, states: np.ndarray, actions: np.ndarray) -> np.ndarray:
        return features(states, actions, self.inputs, self.history)

    def signals(self, x: np.ndarray, observed: np.ndarray) -> np.ndarray:
        """(B, S) per-step signals, in the order of `self.signals` (computed in the graph)."""
        return self._run(["signals"], {"x": x, "observed": observed}, None)[0]

    def scores(self, states: np.ndarray, actions: np.ndarray) -> dict[str, np.ndarray]:
        """Per-step signals of one episode: states (T+1, D), actions (T, m); step t compares states t and t+1."""
        states = np.asarray(states, np.float32)
        T = len(actions)
        if T == 0:
            return {s: np.zeros(0) for s in self.names}
        observed = np.ascontiguousarray(states[1:T + 1, self.predict] - states[:T, self.predict])
        out = self.signals(np.ascontiguousarray(self.features(states, actions)), observed).astype(np.float64)
        return {name: out[:, i] for i, name in enumerate(self.names)}
