"""Environments the simulator can play: the role a robot plays on the link, gymnasium-style.

An `Environment` declares its observation arrays and action, resets and steps.  `LinearEnv` runs a
linear system from sim/linear.py (reward = -stage cost); `GymEnv` wraps any gymnasium environment id
with a Box observation and action space (the MuJoCo ones in particular); `MetaWorldEnv`
(sim/metaworld_env.py) plays a Meta-World task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from vigil.sim.linear import SYSTEMS, LinearSystem, stage_cost
from vigil.wire.protocol import ArraySpec

if TYPE_CHECKING:
    from vigil.sim.shifts import Shift


@dataclass(frozen=True)
class StepResult:
    obs: Mapping[str, np.ndarray]
    reward: float
    terminated: bool
    truncated: bool
    info: Mapping[str, Any] = field(default_factory=dict)


class Environment(ABC):
    name: str
    observation_spec: tuple[ArraySpec, ...]
    action_spec: ArraySpec
    control_rate_hz: float

    @abstractmethod
    def reset(self, seed: int | None = None) -> Mapping[str, np.ndarray]: ...

    @abstractmethod
    def step(self, action: np.ndarray) -> StepResult: ...

    def close(self) -> None:
        pass


class LinearEnv(Environment):
    """x' = A x + B u + w, w ~ N(0, noise_std^2 I). The noise sequence is fixed by the seed, so the same
    seed replays the same disturbances (used for same-noise comparisons against the oracle)."""

    def __init__(self, system: LinearSystem, horizon: int = 200):
        self.system, self.horizon = system, horizon
        self.name = system.name
        self.observation_spec = (ArraySpec("state", "float32", (system.n,)),)
        self.action_spec = ArraySpec("action", "float32", (system.m,))
        self.control_rate_hz = 1.0 / system.dt
        self.noise = np.zeros((horizon, system.n))
        self.x = system.x0.copy()
        self.t = 0

    def reset(self, seed: int | None = None) -> Mapping[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        self.noise = rng.normal(0.0, self.system.noise_std, (self.horizon, self.system.n))
        self.x, self.t = self.system.x0.astype(np.float64).copy(), 0
        return {"state": self.x.astype(np.float32)}

    def step(self, action: np.ndarray) -> StepResult:
        u = np.asarray(action, np.float64).reshape(self.system.m)
        cost = stage_cost(self.system, self.x, u)
        self.x = self.system.A @ self.x + self.system.B @ u + self.noise[self.t]
        self.t += 1
        return StepResult({"state": self.x.astype(np.float32)}, -cost, False, self.t >= self.horizon, {"cost": cost})


@dataclass(frozen=True)
class Dynamics:
    """A robot that answers differently than the simulator it was trained in (gymnasium MuJoCo tasks): every body's
    mass and every geom's friction scaled, the actuators' gear scaled (weaker or stronger motors), and each action
    taking effect `latency` steps late (the previous actions are applied meanwhile; zeros at the start)."""

    mass: float = 1.0
    friction: float = 1.0
    gain: float = 1.0
    latency: int = 0

    @property
    def none(self) -> bool:
        return (self.mass, self.friction, self.gain, self.latency) == (1.0, 1.0, 1.0, 0)

    def describe(self) -> str:
        return f"mass x{self.mass}, friction x{self.friction}, actuator gain x{self.gain}, latency {self.latency} steps"


class GymEnv(Environment):
    """Any gymnasium environment with Box observation and action spaces, e.g. Hopper-v5; `dynamics` changes a
    MuJoCo task's physics and actuation (the "real" robot of a simulation-to-real study)."""

    def __init__(self, env_id: str, dynamics: Dynamics | None = None, **kwargs: Any):
        import gymnasium as gym

        self.env = gym.make(env_id, **kwargs)
        self.name = env_id
        self.dynamics = dynamics or Dynamics()
        self._pending: list[np.ndarray] = []
        if not self.dynamics.none:
            model = getattr(self.env.unwrapped, "model", None)
            if model is None:
                raise ValueError(f"{env_id}: mass, friction, gain and latency changes need a MuJoCo task")
            model.body_mass[:] *= self.dynamics.mass
            model.body_inertia[:] *= self.dynamics.mass
            model.geom_friction[:, 0] *= self.dynamics.friction
            model.actuator_gear[:, 0] *= self.dynamics.gain
        obs_space, act_space = self.env.observation_space, self.env.action_space
        if not isinstance(obs_space, gym.spaces.Box) or not isinstance(act_space, gym.spaces.Box):
            raise ValueError(f"{env_id}: only Box observation and action spaces are supported")
        self.observation_spec = (ArraySpec("state", "float32", tuple(obs_space.shape)),)
        self.action_spec = ArraySpec("action", "float32", tuple(act_space.shape),
                                     tuple(act_space.low.astype(float).ravel()),
                                     tuple(act_space.high.astype(float).ravel()))
        self.control_rate_hz = float(self.env.metadata.get("render_fps") or 50)

    def reset(self, seed: int | None = None) -> Mapping[str, np.ndarray]:
        obs, _ = self.env.reset(seed=seed)
        self._pending = [np.zeros(self.action_spec.shape)] * self.dynamics.latency
        return {"state": np.asarray(obs, np.float32)}

    def step(self, action: np.ndarray) -> StepResult:
        action = np.asarray(action, np.float64)
        if self.dynamics.latency:  # the action waits; the one sent `latency` steps ago takes effect
            self._pending.append(action)
            action = self._pending.pop(0)
        obs, reward, terminated, truncated, info = self.env.step(action)
        return StepResult({"state": np.asarray(obs, np.float32)}, float(reward), bool(terminated), bool(truncated),
                          {k: v for k, v in info.items() if np.isscalar(v)})

    def close(self) -> None:
        self.env.close()


def make_env(name: str, horizon: int = 200, camera: bool = False, shift: Shift | None = None,
             dynamics: Dynamics | None = None) -> Environment:
    """A linear system by name (aircraft-pitch, uav-2d), a Meta-World task (reach-v3, push-v3, ...: MT10 and
    the held-out tasks of sim/metaworld_env.py; `camera` adds the 64x64 image, `shift` a sim.shifts.Shift)
    or a gymnasium id (Hopper-v5)."""
    from vigil.sim.metaworld_env import ALL_INSTRUCTIONS  # plain data; metaworld itself loads on construction

    if name not in ALL_INSTRUCTIONS and name not in SYSTEMS and shift is not None and not shift.none:
        if shift.positions:
            raise ValueError(f"--shift-positions applies to Meta-World tasks, not {name!r}")
        d = dynamics or Dynamics()
        dynamics = Dynamics(d.mass * shift.mass, d.friction * shift.friction, d.gain, d.latency)
        shift = None
    if shift is not None and not shift.none and name not in ALL_INSTRUCTIONS:
        raise ValueError(f"distribution shifts (positions, friction, mass) apply to Meta-World and gymnasium MuJoCo "
                         f"tasks, not {name!r}")
    if dynamics is not None and not dynamics.none and name in ALL_INSTRUCTIONS:
        if (dynamics.mass, dynamics.friction) != (1.0, 1.0):
            raise ValueError("Meta-World tasks change friction and mass through the shift (--friction, --mass)")
        from vigil.sim.shifts import Shift

        s = shift or Shift()
        shift = Shift(s.positions, s.friction, s.mass, s.gain * dynamics.gain, s.latency + dynamics.latency)
        dynamics = None
    if dynamics is not None and not dynamics.none and name in SYSTEMS:
        raise ValueError(f"actuator gain and latency changes apply to MuJoCo tasks, not {name!r}")
    if name in SYSTEMS:
        return LinearEnv(SYSTEMS[name](), horizon)
    if name in ALL_INSTRUCTIONS:
        from vigil.sim.metaworld_env import MetaWorldEnv
        from vigil.sim.shifts import Shift

        return MetaWorldEnv(name, camera=camera, max_steps=horizon, shift=shift or Shift())
    return GymEnv(name, dynamics)
