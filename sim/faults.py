"""Fault injection for simulator-in-the-loop tests: what can go wrong between a robot and its runtime."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Faults:
    """Noise, drops and delay apply to steps in [start, stop); the disconnect happens once, at a step."""

    obs_noise: float = 0.0  # std of Gaussian noise added to every float observation element
    drop: float = 0.0  # probability that an observation is lost on the way to the runtime
    delay_ms: float = 0.0  # added latency before each observation is sent
    disconnect_at: int = -1  # step at which the link goes down (-1: never)
    disconnect_s: float = 0.0  # how long it stays down; the robot applies its safe action meanwhile
    start: int = 0
    stop: int = 2**62
    noise_dims: tuple[int, ...] | None = None  # only these indices of the last axis (None: all of them)

    def __post_init__(self) -> None:
        if self.obs_noise < 0 or not 0 <= self.drop <= 1 or self.delay_ms < 0 or self.disconnect_s < 0:
            raise ValueError(f"invalid faults {self}: need obs_noise >= 0, 0 <= drop <= 1, delay_ms >= 0, "
                             "disconnect_s >= 0")

    def active(self, step: int) -> bool:
        return self.start <= step < self.stop

    def corrupt(self, obs: Mapping[str, np.ndarray], step: int, rng: np.random.Generator) -> Mapping[str, np.ndarray]:
        if self.obs_noise <= 0 or not self.active(step):
            return obs
        out = {}
        for k, v in obs.items():
            if v.dtype.kind != "f":
                out[k] = v
                continue
            noise = rng.normal(0, self.obs_noise, v.shape)
            if self.noise_dims is not None:
                mask = np.zeros(v.shape[-1], bool)
                mask[[d for d in self.noise_dims if d < v.shape[-1]]] = True
                noise *= mask
            out[k] = (v + noise).astype(v.dtype)
        return out

    def dropped(self, step: int, rng: np.random.Generator) -> bool:
        return self.drop > 0 and self.active(step) and rng.random() < self.drop

    def delay_s(self, step: int) -> float:
        return self.delay_ms / 1e3 if self.active(step) else 0.0

    def describe(self) -> str:
        parts = []
        if self.obs_noise:
            dims = "" if self.noise_dims is None else f" on dims {','.join(map(str, self.noise_dims))}"
            parts.append(f"observation noise std {self.obs_noise}{dims}")
        if self.drop:
            parts.append(f"{self.drop:.0%} dropped observations")
        if self.delay_ms:
            parts.append(f"{self.delay_ms} ms added delay")
        if parts and (self.start > 0 or self.stop < 2**62):
            parts[-1] += f" (steps {self.start}..{self.stop if self.stop < 2**62 else 'end'})"
        if self.disconnect_at >= 0:
            parts.append(f"disconnect at step {self.disconnect_at} for {self.disconnect_s} s")
        return ", ".join(parts) or "none"
