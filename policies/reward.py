"""A learned reward on board: score a finished episode with a preference reward model (training/reward_model.py).

The model is a folder with `reward.onnx` (the flow ensemble's frozen encoder and the reward heads in one graph)
and `reward.json` (its configuration). `RewardScorer.score` takes an episode's states, its instruction embedding
and the actions it executed, and returns the predicted return and its standard deviation over the model's
posterior (ensemble members, dropout masks or Laplace draws). numpy and onnxruntime only: the runtime scores
episodes as they finish, and post-training uses the same code as its reward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from vigil.policies.bundle import providers, session_options


@dataclass(frozen=True)
class Score:
    ret: float
    std: float


class RewardScorer:
    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not (folder / "reward.onnx").exists():
            raise FileNotFoundError(f"{folder}: no reward.onnx (train one with `vigil prefs train`)")
        self.info = json.loads((folder / "reward.json").read_text())
        self.every = int(self.info["config"]["every"])
        self.session = ort.InferenceSession(str(folder / "reward.onnx"), session_options(1),
                                            providers=providers(False))

    def score(self, states: np.ndarray, instruction: np.ndarray, actions: np.ndarray) -> Score:
        """An episode given step by step: states (T or T+1, obs), instruction embedding (d,), actions (T, m).
        Plans are taken every `every` steps, as in training."""
        actions = np.asarray(actions, np.float32)
        T = len(actions)
        if T == 0:
            raise ValueError("an episode with no actions has nothing to score")
        idx = np.arange(0, T, self.every)
        acts = np.stack([actions[t:t + self.every].mean(0) for t in idx]).astype(np.float32)
        return self.score_plans(np.asarray(states, np.float32)[idx], instruction, acts)

    def score_plans(self, states: np.ndarray, instruction: np.ndarray, actions: np.ndarray) -> Score:
        """Plan-time states (P, obs) and the mean action executed after each (P, m)."""
        ret, std = self.session.run(None, {"state": np.asarray(states, np.float32),
                                           "instruction": np.asarray(instruction, np.float32).reshape(1, -1),
                                           "action": np.asarray(actions, np.float32)})
        return Score(float(ret), float(std))
