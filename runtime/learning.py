"""Onboard learning: a `linear_gain` bundle with a `learner` block improves its gain while it serves.

Each robot is its own system, so each session gets its own learner (`SessionLearner`, IR-LQR from
policies/irlqr.py, started from the bundle's prior). Every tick the runtime hands it the transition that
just completed -- the previous observation, the action the runtime sent for it (the policy's, or the safe
action when a monitor said stop) and this observation -- which costs two outer products and a log-det.
When an epoch is due, the gain is computed OFF the control thread: a snapshot of the statistics goes to
one worker thread shared by the runtime (`GainWorker`), and the loop never waits for it. Between ticks
(`poll`, at the start of a tick and from the loop's timers) a finished computation is adopted: the
session's gain changes, and the next action uses it. No tick is skipped or delayed by the computation
(numpy releases the GIL in its larger operations; the gain computation is ~0.5 ms of small ones).

The gain is per session, not per policy: it reaches the shared onnxruntime session as the graph input
`gain` through the agent's per-robot inputs (policies/agent.py), so robots never see each other's gain.

A transition is used only when the two observations are consecutive: same episode (a reset breaks the
chain), no message lost in between (the robot's seq increases by one per message it sends; a gap --
a dropped or stale observation -- skips that transition), and no link loss in between.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vigil.monitors.base import Level, Verdict
from vigil.policies.irlqr import GainUpdate, LearnerSpec
from vigil.runtime.alerts import AlertHook
from vigil.runtime.hooks import Hook
from vigil.runtime.stream import OperatorStream

if TYPE_CHECKING:
    from vigil.runtime.session import Decision, Session
    from vigil.wire.protocol import Message

log = logging.getLogger("vigil.learning")


class GainWorker:
    """One background thread for every session's gain computations (one at a time: they are short, and
    a second core is better left to the loop). `on_done` is called (on the worker thread) when a computation
    finishes: the runtime passes its `wake`, so the loop adopts the gain before the next observation."""

    def __init__(self, on_done: Callable[[], None] | None = None) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self.on_done = on_done

    def submit(self, fn, *args) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vigil-learner")
        future = self._pool.submit(fn, *args)
        if self.on_done is not None:
            on_done = self.on_done
            future.add_done_callback(lambda _: on_done())
        return future

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


@dataclass(frozen=True)
class Adopted:
    """A gain the session now acts with: the learner's decision, its epoch, and `delay_ticks`, how many
    ticks acted with the previous gain from the snapshot on (the tick that took the snapshot included):
    1 when the computation finished before the next observation arrived; 0 would be the offline
    learner's schedule, which computes before acting."""

    update: GainUpdate
    epoch: int
    steps: int  # transitions learned from, at the snapshot
    delay_ticks: int
    gain: np.ndarray  # float32, as fed to the graph


class SessionLearner:
    def __init__(self, spec: LearnerSpec, worker: GainWorker):
        self.spec = spec
        self.learner = spec.learner()
        self.worker = worker
        self.gain32 = np.ascontiguousarray(self.learner.gain(), dtype=np.float32)
        self._prev: tuple[np.ndarray, np.ndarray, int] | None = None  # (x, u, seq) of the last tick
        self._future: Future | None = None
        self._pending: tuple[float, int, int] | None = None  # (log det V, steps, tick) of the snapshot in flight
        self.ticks = 0
        self.skipped = 0  # transitions not learned from (a gap in seq)

    @property
    def computing(self) -> bool:
        return self._future is not None

    def transition(self, x_next: np.ndarray, seq: int) -> None:
        """This tick's observation completes the previous tick's transition: learn from it, and start a gain
        computation in the background when an epoch is due (unless one is already running)."""
        self.ticks += 1
        prev, self._prev = self._prev, None
        if prev is None:
            return
        x, u, prev_seq = prev
        if seq != prev_seq + 1:
            self.skipped += 1
            return
        due = self.learner.observe(x, u, np.asarray(x_next, np.float64))
        if due and self._future is None:
            V, S, K_prev, logdet = self.learner.snapshot()
            self._pending = (logdet, self.learner.steps, self.ticks)
            self._future = self.worker.submit(self.learner.compute, V, S, K_prev)

    def acted(self, x: np.ndarray, u: np.ndarray, seq: int) -> None:
        """The runtime sent action u for observation x (message seq): the start of the next transition."""
        self._prev = (np.asarray(x, np.float64), np.asarray(u, np.float64), seq)

    def bridge(self, seq: int) -> None:
        """Another message from the robot (a heartbeat) came between two observations: it used up a seq."""
        if self._prev is not None and seq == self._prev[2] + 1:
            self._prev = (self._prev[0], self._prev[1], seq)

    def break_chain(self) -> None:
        """A reset or a link loss: the next observation does not follow from the last action."""
        self._prev = None

    def poll(self) -> Adopted | None:
        """Adopt a finished gain computation, if there is one (never waits)."""
        future = self._future
        if future is None or not future.done():
            return None
        self._future = None
        logdet, steps, tick = self._pending
        self._pending = None
        try:
            update = future.result()
        except Exception:  # a bug in the computation must not stop the robot: keep the gain, say so
            log.exception("gain computation failed; keeping the current gain")
            update = GainUpdate(self.learner.gain(), *self.learner.estimate(), False, False, True, 0.0)
        self.learner.adopt(update, logdet)
        if not np.all(np.isfinite(update.K)):  # defence in depth: never feed a non-finite gain
            return None
        self.gain32 = np.ascontiguousarray(update.K, dtype=np.float32)
        return Adopted(update, self.learner.epoch, steps, self.ticks + 1 - tick, self.gain32)

    def stats(self) -> Mapping[str, float]:
        L = self.learner
        return {"epoch": L.epoch, "steps": L.steps, "fallbacks": L.fallbacks, "guarded": L.guarded,
                "failures": L.failures, "skipped": self.skipped}


def describe(robot: str, adopted: Adopted) -> dict:
    """The operator-stream record of one gain swap (telemetry event `gain`)."""
    u = adopted.update
    return {"epoch": adopted.epoch, "steps": adopted.steps, "gain": np.asarray(u.K, float).round(6).tolist(),
            "fallback": u.fallback, "guarded": u.guarded, "failed": u.failed,
            "update_ms": round(u.seconds * 1e3, 3), "delay_ticks": adopted.delay_ticks,
            "t": time.time()}


class LearnerHook(Hook):
    """The online learner as a hook. A session whose policy carries a learner spec gets its own
    `SessionLearner` (from the bundle's prior) when it starts planning with that policy; every answered
    observation completes a transition; reset, link loss, a resumed connection and a failed policy step break
    the chain; a heartbeat between two observations bridges it. Finished gain computations are adopted from
    `on_timer` (the worker wakes the loop when one is done), so the next action uses the new gain; each
    swap is a telemetry event, each fallback a stored warn alert."""

    name = "learner"

    def __init__(self, worker: GainWorker, alerts: AlertHook, stream: OperatorStream, counters: Counter):
        self.worker, self.alerts, self.stream, self.counters = worker, alerts, stream, counters
        self._learning: dict[str, Session] = {}  # robot -> session, for the sessions that have a learner

    def on_policy(self, session: Session) -> None:
        spec = getattr(session.policy, "learner_spec", None)
        learner = SessionLearner(spec, self.worker) if spec is not None else None
        session.state[self.name] = learner  # a new bundle's learner starts from its prior: statistics afresh
        if learner is None:
            self._learning.pop(session.robot, None)
        else:
            session.agent.inputs["gain"] = learner.gain32
            self._learning[session.robot] = session

    def on_hello(self, session: Session, resumed: bool) -> None:
        if resumed and (learner := session.state.get(self.name)) is not None:
            learner.break_chain()

    def on_reset(self, session: Session) -> None:
        if (learner := session.state.get(self.name)) is not None:  # it keeps what it learnt; a new chain starts
            learner.break_chain()

    def on_decision(self, session: Session, obs: Message, decision: Decision) -> None:
        learner = session.state.get(self.name)
        if learner is None:
            return
        x = obs.arrays[session.observation[0].name]
        learner.transition(x, obs.seq)
        if decision.failed:
            learner.break_chain()
        else:
            learner.acted(x, decision.action, obs.seq)

    def on_heartbeat(self, session: Session, seq: int) -> None:
        if (learner := session.state.get(self.name)) is not None:  # a heartbeat between two observations
            learner.bridge(seq)

    def on_link_lost(self, session: Session, verdict: Verdict) -> None:
        if (learner := session.state.get(self.name)) is not None:
            learner.break_chain()

    def on_forget(self, session: Session, reason: str) -> None:
        self._learning.pop(session.robot, None)

    def on_timer(self, now: float) -> None:
        for session in list(self._learning.values()):
            learner = session.state.get(self.name)
            if learner is not None and (adopted := learner.poll()) is not None:
                session.agent.inputs["gain"] = adopted.gain
                self._announce(session, learner, adopted)

    def _announce(self, session: Session, learner: SessionLearner, adopted: Adopted) -> None:
        """A new epoch's gain is in use: a telemetry event for every swap, a stored warn alert for every
        fallback (the published rule kept the previous gain, the guard replaced an unstable one, or the
        Riccati equation had no solution)."""
        u = adopted.update
        session.counters["gain_swaps"] += 1
        session.counters["fallbacks"] += u.fallback
        session.counters["guarded"] += u.guarded
        session.counters["learner_failures"] += u.failed
        self.counters["gain_swaps"] += 1
        self.stream.event(session.robot, "gain", describe(session.robot, adopted))
        reason = None
        if u.guarded:
            reason = (f"IR-LQR epoch {adopted.epoch}: the previous gain is unstable under the current estimate; "
                      "switched to the certainty-equivalent gain (guarded fallback)")
        elif u.fallback:
            reason = (f"IR-LQR epoch {adopted.epoch}: fallback, optimism too large (lambda_max(O) >= "
                      f"{learner.spec.config.fallback_ratio:g} lambda_min(H)); kept the previous gain")
        elif u.failed:
            reason = f"IR-LQR epoch {adopted.epoch}: no stabilising Riccati solution; kept the previous gain"
        if reason is not None:
            self.alerts.file(session.robot, Verdict("learner", Level.WARN, reason, {
                "epoch": adopted.epoch, "steps": adopted.steps, "fallback": u.fallback, "guarded": u.guarded,
                "failed": u.failed}))

    def robot_stats(self, session: Session) -> Mapping[str, Any]:
        learner = session.state.get(self.name)
        return {} if learner is None else {"learner": dict(learner.stats())}

    def close(self) -> None:
        self.worker.close()
