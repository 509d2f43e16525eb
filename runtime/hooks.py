"""Hooks: everything the runtime does that is not deciding an action.

The loop (runtime/server.py) decides, replies, and then tells its hooks what happened. Filing alerts
(runtime/alerts.py), filing data requests (runtime/requests.py), the online IR-LQR learner
(runtime/learning.py) and telemetry (runtime/telemetry.py) are hooks; a recorder or a console feed is a new
hook, not a branch in the loop. A hook overrides only the events it cares about; the loop calls only the
overridden ones, in the order the hooks were given, and a hook that raises is logged and counted
(`hook_failed`), never allowed to stop the loop or the other hooks.

Hooks run on the loop's thread, after the robot has its reply, so they must be quick: anything slow (a
gain computation, a disk write that may block) goes to a worker, and the worker wakes the loop when it is
done (`Runtime.wake`), which then calls `on_timer`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from vigil.monitors.base import Verdict

if TYPE_CHECKING:
    from vigil.runtime.session import Decision, Session
    from vigil.wire.protocol import Message

log = logging.getLogger("vigil.hooks")

EVENTS = ("on_hello", "on_policy", "on_reset", "on_decision", "on_heartbeat", "on_verdict", "on_link_lost",
          "on_link_restored", "on_forget", "on_timer")


class Hook:
    """The events of the loop. Every method is optional; `name` keys the hook's per-session state
    (`session.state[name]`) and its telemetry."""

    name = "hook"

    def on_hello(self, session: Session, resumed: bool) -> None:
        """A robot said hello: a new session, or (`resumed`) an existing one on a new connection."""

    def on_policy(self, session: Session) -> None:
        """`session` plans with `session.policy` from now on: a new session, or a swap taken at a plan
        boundary. Called before the session's next action is decided, so per-robot graph inputs set here
        (`session.agent.inputs`) are used by it."""

    def on_reset(self, session: Session) -> None:
        """A new episode began (`session.episode`, `session.info`)."""

    def on_decision(self, session: Session, obs: Message, decision: Decision) -> None:
        """An observation was answered with `decision` (the reply is already sent)."""

    def on_heartbeat(self, session: Session, seq: int) -> None:
        """A heartbeat from a robot with a session."""

    def on_verdict(self, robot: str, verdict: Verdict) -> None:
        """A judgement made outside a tick: a rejected message, a robot's own error report, a swap."""

    def on_link_lost(self, session: Session, verdict: Verdict) -> None:
        """The robot went silent for longer than the link timeout (the safe action was sent, best effort)."""

    def on_link_restored(self, session: Session, outage_s: float) -> None:
        """Traffic from a robot whose link had been declared lost."""

    def on_forget(self, session: Session, reason: str) -> None:
        """The session ends: `disconnected` (the robot said bye) or `expired` (silent past the expiry)."""

    def on_timer(self, now: float) -> None:
        """The loop's timers ran (at least every 50 ms, and whenever a worker woke the loop)."""

    def stats(self) -> Mapping[str, Any]:
        """Runtime-wide figures for the periodic telemetry message (merged at its top level)."""
        return {}

    def robot_stats(self, session: Session) -> Mapping[str, Any]:
        """Per-robot figures for the periodic telemetry message (merged into `robots[robot]`)."""
        return {}

    def close(self) -> None:
        """The runtime stops."""


class Hooks:
    """The hooks of a runtime, called event by event. Only overridden methods are called: an event no hook
    cares about costs nothing on the hot path."""

    def __init__(self, hooks: Sequence[Hook], counters: Counter):
        self.hooks = list(hooks)
        self.counters = counters
        self._calls: dict[str, list[Callable[..., Any]]] = {
            event: [getattr(h, event) for h in self.hooks if getattr(type(h), event) is not getattr(Hook, event)]
            for event in EVENTS}
        self._decision = self._calls["on_decision"]

    def emit(self, event: str, *args: Any) -> None:
        for call in self._calls[event]:
            try:
                call(*args)
            except Exception:  # a hook must never take the control loop down
                self.counters["hook_failed"] += 1
                log.exception("hook %s failed on %s", getattr(call, "__self__", call), event)

    def decision(self, session: Session, obs: Message, decision: Decision) -> None:
        """`emit("on_decision", ...)` without the lookup: it runs every tick."""
        for call in self._decision:
            try:
                call(session, obs, decision)
            except Exception:
                self.counters["hook_failed"] += 1
                log.exception("hook %s failed on on_decision", getattr(call, "__self__", call))

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for h in self.hooks:
            out.update(h.stats())
        return out

    def robot_stats(self, session: Session) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for h in self.hooks:
            out.update(h.robot_stats(session))
        return out

    def close(self) -> None:
        for h in self.hooks:
            try:
                h.close()
            except Exception:
                log.exception("hook %s failed to close", h.name)
