"""Distribution shifts of a Meta-World task: the conditions a policy was not trained for.

A `Shift` changes the world the robot acts in, not the link (that is `sim.faults.Faults`): where the
objects and goals are, and the physics of what the arm touches.  It is applied by `MetaWorldEnv.reset`, so
the same variant seed gives the same shifted episode.

positions (float, 0 = off): move the task's objects and goal outside the range the benchmark draws them
  from.  Meta-World draws a task variant as a vector of positions (object xyz, then goal xyz when the goal is
  drawn separately) uniformly from a box.  The shift picks the horizontal axis (x, else y) with the widest
  range of the first position block, and moves every block along it by the same distance, so that the
  first block lands `positions` x (range width) beyond the boundary nearer to where it was.  Moving all
  blocks together keeps their layout (Meta-World re-draws a frozen variant forever when object and goal
  are too close, so a shift must not bring them together) and makes the shift visible only as "the scene
  is somewhere it never was", not as a new arrangement.
friction (float, 1 = off): scales the sliding friction of every geom (MuJoCo combines a contact's two
  frictions by their maximum, so scaling all of them scales every contact).
mass (float, 1 = off): scales the mass and inertia of the task's bodies (everything that is not the robot,
  the table, the wall or the mocap target).
gain (float, 1 = off): scales every action the arm receives (weaker or stronger actuation: a worn gearbox, a
  low battery, a controller gain set wrong): the hand moves `gain` x as far per command, the gripper closes with
  `gain` x the force.
latency (int steps, 0 = off): each action takes effect `latency` steps late (a slow network or controller);
  meanwhile the earlier actions are applied, zeros at the start of an episode.

friction and mass change how the world answers the robot; gain and latency change how the robot's commands take
effect. Neither moves anything the policy sees at the start of an episode: they are the shifts a dynamics model
sees and the policy's own uncertainty cannot (monitors/dynamics.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Shift:
    positions: float = 0.0
    friction: float = 1.0
    mass: float = 1.0
    gain: float = 1.0
    latency: int = 0

    def __post_init__(self) -> None:
        if self.positions < 0 or self.friction <= 0 or self.mass <= 0 or self.gain <= 0 or self.latency < 0 \
                or int(self.latency) != self.latency:
            raise ValueError(f"invalid shift {self}: need positions >= 0, friction > 0, mass > 0, gain > 0, "
                             "latency an integer >= 0")

    @property
    def none(self) -> bool:
        return (self.positions, self.friction, self.mass, self.gain, self.latency) == (0, 1, 1, 1, 0)

    def describe(self) -> str:
        parts = []
        if self.positions:
            parts.append(f"positions {self.positions:g} x range beyond the training range")
        if self.friction != 1:
            parts.append(f"friction x{self.friction:g}")
        if self.mass != 1:
            parts.append(f"task-body mass x{self.mass:g}")
        if self.gain != 1:
            parts.append(f"actuation gain x{self.gain:g}")
        if self.latency:
            parts.append(f"actions {self.latency} step(s) late")
        return ", ".join(parts) or "none"


NO_SHIFT = Shift()  # the world as trained


def shift_positions(rand_vec: np.ndarray, low: np.ndarray, high: np.ndarray, amount: float) -> np.ndarray:
    """The variant vector with its position blocks moved `amount` x (range width) past the nearer boundary
    (see the module docstring). rand_vec, low, high: (3k,) of k xyz blocks. Unchanged if amount is 0 or no
    horizontal axis of the first block varies."""
    v = np.asarray(rand_vec, np.float64).copy()
    if amount <= 0:
        return v
    width = np.asarray(high, np.float64) - np.asarray(low, np.float64)
    axis = 0 if width[0] > 0 else 1 if width[1] > 0 else None
    if axis is None:
        return v
    mid = (low[axis] + high[axis]) / 2
    target = high[axis] + amount * width[axis] if v[axis] >= mid else low[axis] - amount * width[axis]
    v[axis::3] += target - v[axis]
    return v
