"""A simulated operator who answers preference queries, for benchmarks and tests.

Three kinds, to show what well- and mis-specified feedback do to a learned reward:

  bt      Bradley–Terry over the episode's dense return (Meta-World's shaped reward, summed):
          P(A better) = sigmoid((R_A - R_B) / (temperature * spread)), where spread is the standard deviation of
          the returns of that task's episodes in the pool: the same temperature means the same noise on every task.
  noisy   bt, then the answer flipped with probability `flip` (a distracted operator).
  biased  Bradley–Terry over minus the episode's length instead of its return: prefers whichever attempt ended
          sooner (an episode ends early when the task has been held done), and cannot tell how close a failure
          came. A mis-specified operator.

The answers are 'a' or 'b'; the annotator never says tie. `prob` is the true preference probability, what a
calibrated reward model should state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KINDS = ("bt", "noisy", "biased")


@dataclass(frozen=True)
class Annotator:
    kind: str = "bt"
    temperature: float = 0.1  # in units of the task's return spread (biased: of its length spread)
    flip: float = 0.15        # noisy: probability of a flipped answer

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"annotator kind {self.kind!r}: expected one of {KINDS}")
        if self.temperature <= 0:
            raise ValueError(f"annotator temperature {self.temperature}: expected a number > 0")
        if not 0 <= self.flip < 0.5:
            raise ValueError(f"annotator flip {self.flip}: expected a probability in [0, 0.5)")

    def utility(self, ret: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """What this annotator prefers more of, per episode."""
        return -np.asarray(steps, float) if self.kind == "biased" else np.asarray(ret, float)

    def prob(self, u_a: np.ndarray, u_b: np.ndarray, spread: np.ndarray) -> np.ndarray:
        """P(the annotator answers 'a'), flips included."""
        p = 1.0 / (1.0 + np.exp(-(np.asarray(u_a) - np.asarray(u_b)) / (self.temperature * np.maximum(spread, 1e-9))))
        return p * (1 - self.flip) + (1 - p) * self.flip if self.kind == "noisy" else p

    def answer(self, u_a: np.ndarray, u_b: np.ndarray, spread: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Sampled answers, 1.0 for 'a' and 0.0 for 'b'."""
        p = self.prob(u_a, u_b, spread)
        return (rng.random(np.shape(p)) < p).astype(np.float32)


def spreads(values: np.ndarray, tasks: np.ndarray) -> dict[str, float]:
    """Per task: the standard deviation of `values` (returns or lengths) over that task's episodes."""
    return {t: float(np.std(values[tasks == t])) or 1.0 for t in np.unique(tasks)}
