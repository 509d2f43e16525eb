"""Trace: each robot's plan scores on the operator stream, plan by plan, for operators who watch them live.

Alerts say when a score crossed a threshold; the trace says how it got there. On every new plan (and on every
verdict change between plans) the hook publishes one `trace` message with the plan's scores (e.g. `vfd`),
every monitor's level, whether the safe action went out, and the thresholds the bundle's VFD monitor uses, so
a console can draw the score against its thresholds without reading the bundle. A robot whose policy does not
score its plans (an LQR gain, a gaussian policy) is traced only when a verdict changes.

Cost: a dictionary and one PUB send per plan, on the loop thread after the reply; PUB drops for slow
subscribers, so the trace is a live view, not a record (`vigil serve --record` records).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from vigil.runtime.hooks import Hook
from vigil.runtime.stream import OperatorStream
from vigil.wire.protocol import Message

if TYPE_CHECKING:
    from vigil.runtime.session import Decision, Session
    from vigil.wire.protocol import Message as Obs


class TraceHook(Hook):
    name = "trace"

    def __init__(self, stream: OperatorStream):
        self.stream = stream
        self.published = 0

    def on_policy(self, session: Session) -> None:
        vfd = session.policy.manifest.monitor.get("vfd") or {}
        thresholds = {k: float(v) for k, v in (vfd.get("thresholds") or {}).items()}
        session.state[self.name] = [-1, (), {"vfd": thresholds} if thresholds else {}]

    def on_reset(self, session: Session) -> None:
        state = session.state.get(self.name)
        if state is not None:
            state[0], state[1] = -1, ()

    def on_decision(self, session: Session, obs: Obs, decision: Decision) -> None:
        state = session.state.get(self.name)
        if state is None:
            return
        levels = tuple(v.level for v in decision.judged)
        new_plan = decision.plan != state[0] and bool(decision.scores)  # a policy that scores nothing: levels only
        if not new_plan and levels == state[1]:
            return  # no new scores, same verdicts: nothing new to draw
        state[0], state[1] = decision.plan, levels
        meta: dict[str, Any] = {
            "episode": session.episode, "step": session.step, "plan": decision.plan, "policy": decision.policy,
            "scores": {k: float(v) for k, v in decision.scores.items()},
            "levels": {v.monitor: v.level.label for v in decision.judged}, "safe": decision.safe,
            "thresholds": state[2]}
        self.stream.publish("trace", Message("trace", session.robot, decision.plan, time.time_ns(), {}, meta))
        self.published += 1

    def stats(self) -> dict[str, Any]:
        return {"trace": {"published": self.published}}
