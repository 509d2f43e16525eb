"""The monitor interface: every tick, each monitor looks at what happened and returns a verdict."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, NamedTuple

import numpy as np


class Level(IntEnum):
    """ok < warn < alert < stop. `stop` makes the runtime send the bundle's safe action instead."""

    OK = 0
    WARN = 1
    ALERT = 2
    STOP = 3

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Verdict:
    monitor: str
    level: Level
    reason: str = ""
    values: Mapping[str, float] = field(default_factory=dict)


class Tick(NamedTuple):
    """What one control tick looked like, as the monitors see it. (A NamedTuple, not a dataclass: one is made
    every tick, and a tuple is built several times faster.)"""

    robot: str
    seq: int
    obs: Mapping[str, np.ndarray]
    action: np.ndarray  # clipped, what would be sent
    raw_action: np.ndarray  # before clipping
    scores: Mapping[str, float]  # scalar outputs of the policy graph (e.g. VFD)
    compute_s: float  # arrival of the observation (queueing included) to the decision
    plan: int = 0  # number of the plan the scores came from (chunked policies replan every k ticks)
    clipped: bool | None = None  # clipping changed the action (None: not known, compare action and raw_action)
    executed: np.ndarray | None = None  # the action sent on this robot's previous tick (None: the episode's first)


class Monitor(ABC):
    """One judgement about every tick. Instances are per robot, so they may keep windows."""

    name: str = "monitor"

    @abstractmethod
    def update(self, tick: Tick) -> Verdict: ...

    def start_episode(self, info: Mapping[str, Any]) -> None:
        """What the new episode is (its reset's `task`, `instruction`, ...), called after `reset`; most monitors
        judge every task alike and ignore it."""

    def reset(self) -> None:
        """Forget per-episode state (called on `reset`)."""

    def ok(self) -> Verdict:
        try:
            return self._ok
        except AttributeError:  # verdicts are immutable: build the all-clear once per monitor
            self._ok: Verdict = Verdict(self.name, Level.OK)
            return self._ok
