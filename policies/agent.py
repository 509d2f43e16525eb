"""Executing a shared policy for one robot: replanning on schedule, clipping to the action bounds."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from vigil.policies.bundle import Plan, Policy
from vigil.policies.chunks import ActionChunkQueue

_clock = time.perf_counter


class Step(NamedTuple):
    """What the policy decided this tick. `raw` is before clipping (the saturation monitor wants it).
    (A NamedTuple: one is made every tick.)"""

    action: np.ndarray
    raw: np.ndarray
    scores: Mapping[str, float]
    replanned: bool
    infer_s: float
    plan: int = 0  # plans made so far this episode; the scores belong to plan number `plan`
    clipped: bool = False  # clipping to the action bounds changed the action


class Agent:
    def __init__(self, policy: Policy):
        self._use(policy)
        self._scores: Mapping[str, float] = {}
        self.rng = np.random.default_rng()
        self.episode: dict[str, np.ndarray] = {}  # graph inputs fixed for the episode (instruction)
        self.inputs: dict[str, np.ndarray] = {}  # this robot's own graph inputs, e.g. its learnt `gain`
        self.instruction: str | None = None
        self.plans = 0
        self._prefilled: float | None = None  # a batch-made plan's inference time, until its tick

    def _use(self, policy: Policy) -> None:
        self.policy = policy
        m = policy.manifest
        self.queue = ActionChunkQueue(m.chunk_execute)
        n = m.action.shape[0]
        self.low = np.asarray(m.action.low if m.action.low is not None else [-np.inf] * n, np.float32)
        self.high = np.asarray(m.action.high if m.action.high is not None else [np.inf] * n, np.float32)
        self._bounded = m.action.low is not None or m.action.high is not None
        # Small actions are clipped on Python floats: numpy's per-call overhead is most of the cost below ~16.
        self._low_list, self._high_list = self.low.tolist(), self.high.tolist()
        self._small = n <= 16
        self.safe_action = np.asarray(m.safe_action, np.float32)
        self._plan_inputs = policy.draws_inputs  # the policy draws inputs per plan (noise)

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
        self._prefilled = None
        self.episode = self.policy.episode_inputs(instruction)
        self.instruction = instruction
        if seed is not None:
            self.rng = np.random.default_rng(seed)

    def act(self, obs: Mapping[str, np.ndarray]) -> Step:
        t0 = _clock()
        queue = self.queue
        replanned = queue.needs_plan()
        infer_s = 0.0
        if replanned:
            self.planned(self.policy.infer(obs, self.plan_extra()))
        elif self._prefilled is not None:  # planned together with other robots' (`planned`): this is its tick
            replanned, infer_s, self._prefilled = True, self._prefilled, None
        raw = queue.pop()
        action, clipped = self.clip(raw)
        return Step(action, raw, self._scores, replanned, _clock() - t0 + infer_s, self.plans, clipped)

    def plan_extra(self) -> dict[str, np.ndarray] | None:
        """The graph inputs besides the observation for the next plan: the episode's (instruction), this
        robot's own (e.g. its gain) and fresh per-plan draws (noise, from this robot's generator)."""
        extra = self.policy.plan_inputs(self.rng) if self._plan_inputs else None
        if extra or self.episode or self.inputs:
            extra = {**self.episode, **self.inputs, **(extra or {})}
        return extra

    def planned(self, plan: Plan, infer_s: float | None = None) -> None:
        """Take a plan made for this robot's next observation. With `infer_s` (the plan was made in a batch with
        other robots' before the tick), the next `act` uses it and reports that time as its inference."""
        self.queue.push(plan.actions)
        self._scores = plan.scores
        self.plans += 1
        self._prefilled = infer_s

    def clip(self, raw: np.ndarray) -> tuple[np.ndarray, bool]:
        """The action within the manifest's bounds, and whether clipping changed it (the asynchronous executor,
        runtime/planner.py, clips its actions here too)."""
        if not self._bounded:
            return raw, False
        if self._small:
            values = raw.tolist()
            clipped = [lo if x < lo else hi if x > hi else x for x, lo, hi in zip(values, self._low_list,
                                                                                   self._high_list)]
            if clipped == values:  # a NaN is kept as it is (the action monitor stops on it)
                return raw, False
            return np.array(clipped, np.float32), True
        action = np.minimum(np.maximum(raw, self.low), self.high)  # np.clip costs 3x as much
        return action, bool((action != raw).any())
