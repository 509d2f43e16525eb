"""Score every finished episode on board with a learned reward (a preference reward model, policies/reward.py).

With `vigil serve --reward DIR`, the runtime keeps, per robot, the state it saw and the action it sent at every
tick of the episode. When the episode ends (the next `reset`, or the robot's `bye` or expiry) it scores it once
and publishes the predicted return and its standard deviation on the operator stream:

    topic `telemetry`, event `episode_scored`, values {episode, steps, ret, std, task}

An operator sees which attempts the reward model rates well and how sure it is; a high std marks the attempts
worth asking about. A score is a reading, not an alert, so nothing is stored first. Scoring runs between
episodes, never inside a tick; an episode the model cannot score (no state array, too short) is skipped and
counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from vigil.policies.reward import RewardScorer
from vigil.runtime.hooks import Hook
from vigil.runtime.stream import OperatorStream
from vigil.wire.protocol import Message

if TYPE_CHECKING:
    from vigil.runtime.session import Decision, Session


class EpisodeScoreHook(Hook):
    name = "episode_score"

    def __init__(self, scorer: RewardScorer, stream: OperatorStream, counters: Counter, state: str = "state"):
        self.scorer, self.stream, self.counters, self.key = scorer, stream, counters, state
        self.last: dict[str, dict[str, Any]] = {}  # robot -> its last score (telemetry)

    def _start(self, session: Session) -> dict[str, Any]:
        """A new episode's buffer, with what conditions it (instruction embedding, task) as of its start."""
        instr = session.agent.episode.get(getattr(session.policy, "instruction_input", ""), None)
        buf = {"states": [], "actions": [], "episode": session.episode, "instr": instr,
               "task": str(session.info.get("task", ""))}
        session.state[self.name] = buf
        return buf

    def on_decision(self, session: Session, obs: Message, decision: Decision) -> None:
        state = obs.arrays.get(self.key)
        if state is not None:
            buf = session.state.get(self.name) or self._start(session)
            buf["states"].append(np.array(state, np.float32))
            buf["actions"].append(np.array(decision.action, np.float32))

    def on_reset(self, session: Session) -> None:
        self._finish(session)
        self._start(session)

    def on_forget(self, session: Session, reason: str) -> None:
        self._finish(session)

    def _finish(self, session: Session) -> None:
        buf = session.state.pop(self.name, None)
        if not buf or not buf["actions"]:
            return
        instr = buf["instr"]
        if instr is None:
            self.counters["episode_score_skipped"] += 1  # no instruction embedding: nothing to condition on
            return
        score = self.scorer.score(np.stack(buf["states"]), np.asarray(instr)[0], np.stack(buf["actions"]))
        values = {"episode": buf["episode"], "steps": len(buf["actions"]), "ret": score.ret, "std": score.std,
                  "task": buf["task"]}
        self.last[session.robot] = values
        self.counters["episodes_scored"] += 1
        self.stream.event(session.robot, "episode_scored", values)

    def robot_stats(self, session: Session) -> Mapping[str, Any]:
        last = self.last.get(session.robot)
        return {"last_episode_score": last} if last else {}


def episode_scorer(folder: str, stream: OperatorStream, counters: Counter) -> EpisodeScoreHook:
    """The hook for `vigil serve --reward FOLDER` (the model is loaded, and checked, at start)."""
    return EpisodeScoreHook(RewardScorer(folder), stream, counters)
