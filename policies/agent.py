"""Executing a shared policy for one robot: replanning on schedule, clipping to the action bounds."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from vigil.policies.bundle import Policy
from vigil.policies.chunks import ActionChunkQueue


@dataclass(frozen=True)
class Step:
    """What the policy decided this tick. `raw` is before clipping (the saturation monitor wants it)."""

    action: np.ndarray
    raw: np.ndarray
    scores: Mapping[str, float]
    replanned: bool
    infer_s: float
    plan: int = 0  # plans made so far this episode; the scores belong to plan number `plan`


class Agent:
    def __init__(self, policy: Policy):
        self._use(policy)
        self._scores: Mapping[str, float] = {}
        self.rng = np.random.default_rng()
        self.episode: dict[str, np.ndarray] = {}  # graph inputs fixed for the episode (instruction)
        self.inputs: dict[str, np.ndarray] = {}  # this robot's own graph inputs, e.g. its learnt `gain`
        self.instruction: str | None = None
        self.plans = 0

    def _use(self, policy: Policy) -> None:
        self.policy = policy
        m = policy.manifest
        self.queue = ActionChunkQueue(m.chunk_execute)
        self.low = np.asarray(m.action.low if m.action.low is not None else [-np.inf] * m.action.shape[0], np.float32)
        self.high = np.asarray(m.action.high if m.action.high is not None else [np.inf] * m.action.shape[0], np.float32)
        self.safe_action = np.asarray(m.safe_action, np.float32)

    @property
    def at_plan_boundary(self) -> bool:
        """The next `act` plans afresh (the current chunk is used up): the moment a policy may be swapped."""
        return self.queue.needs_plan()

    def switch(self, policy: Policy) -> None:
        """Carry on the episode with another (compatible) policy from the next plan: the instruction is
        embedded by the new policy's encoder (warmed up by the loader, so a cache hit), the noise stream and
        the plan count go on. Call it at a plan boundary, so no chunk is cut short."""
        self._use(policy)
        self.episode = policy.episode_inputs(self.instruction)

    def reset(self, instruction: str | None = None, seed: int | None = None) -> None:
        """New episode: empty the chunk queue, embed the instruction once, reseed the plan noise."""
        self.queue.clear()
        self._scores = {}
        self.plans = 0
        self.episode = self.policy.episode_inputs(instruction)
        self.instruction = instruction
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def act(self, obs: Mapping[str, np.ndarray]) -> Step:
        t0 = time.perf_counter()
        replanned = self.queue.needs_plan()
        if replanned:
            extra = self.policy.plan_inputs(self.rng)
            plan = self.policy.infer(obs, {**self.episode, **self.inputs, **extra}
                                     if extra or self.episode or self.inputs else None)
            self.queue.push(plan.actions)
            self._scores = plan.scores
            self.plans += 1
        raw = self.queue.pop()
        action = np.minimum(np.maximum(raw, self.low), self.high)  # np.clip costs 3x as much
        return Step(action, raw, self._scores, replanned, time.perf_counter() - t0, self.plans)
