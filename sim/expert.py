"""The simulated expert who answers data requests (`vigil expert`).

It claims open requests that carry a simulator recipe (`sim`, sent by a simulated robot with its reset) from
the runtime's store, plays Meta-World's scripted expert for the requested task, records the episode into a
demonstration dataset in the format of `vigil demos record` (training/demos.py), and marks the request
fulfilled with the episode's id, or rejected with a reason.

Where the demonstration starts: at the nearest reproducible state, the episode's reset (same task, same
variant seed, same shift), not at the exact observation that raised the request.  Meta-World's reset is
deterministic, so a request raised at step 0 is answered from exactly its state; one raised at step k > 0
happened after k actions of the policy, which the runtime does not keep, so it cannot be replayed, and the
scripted expert's own first k steps would reach a different state.  The request keeps the observation and
the step, for tools that can restore a state (a teleoperator moves the robot there).

Requests without a recipe (real robots) are never claimed here: they wait for a teleoperation tool
(docs/operator.md, "Answering requests by teleoperation").  An unsuccessful scripted rollout is not recorded
(it would teach the wrong thing) and the request is rejected with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from vigil.runtime.requests import RequestRecord, RequestStore, demo_meta
from vigil.runtime.stream import subscribe
from vigil.training.demos import DemoWriter, rollout_expert

log = logging.getLogger("vigil.expert")


@dataclass(frozen=True)
class Answer:
    """How one request was answered: `demo` (episode id) if fulfilled, else `reason`."""

    request: int
    task: str
    demo: str | None
    reason: str = ""
    steps: int = 0

    @property
    def fulfilled(self) -> bool:
        return self.demo is not None


def demonstrate(request: RequestRecord, writer: DemoWriter) -> tuple[str | None, str, int]:
    """Record the scripted expert from the request's reset recipe. Returns (episode id or None, reason, steps)."""
    from vigil.sim.metaworld_env import ALL_INSTRUCTIONS, MetaWorldEnv
    from vigil.sim.shifts import Shift

    sim = dict(request.sim or {})
    if sim.get("env") != "metaworld":
        return None, f"unknown simulator {sim.get('env')!r}: this expert plays Meta-World only", 0
    task = sim.get("task", request.task)
    if task not in ALL_INSTRUCTIONS:
        return None, f"unknown task {task!r}: no scripted expert for it", 0
    seed = sim.get("seed")
    if type(seed) is not int or seed < 0:
        return None, f"the request's simulator recipe has no reset seed (sim.seed = {seed!r})", 0
    image = request.observation.get("image")
    env = MetaWorldEnv(task, camera=image is not None, image_size=int(image.shape[0]) if image is not None else 64,
                       max_steps=int(sim.get("max_steps", 500)), shift=Shift(**sim.get("shift", {})))
    try:
        episode = rollout_expert(env, seed)
    finally:
        env.close()
    if not episode.succeeded:
        return None, f"the scripted expert did not succeed within {episode.steps} steps (seed {seed})", episode.steps
    episode = dataclasses.replace(episode, source="request", meta={
        **episode.meta, **demo_meta(request, "scripted"), "start": "reset", "requested_step": request.step})
    return writer.add(episode), "", episode.steps


def answer(store: RequestStore, request: RequestRecord, writer: DemoWriter, by: str) -> Answer:
    """Demonstrate one claimed request and record the outcome in the store."""
    try:
        demo, reason, steps = demonstrate(request, writer)
    except Exception as exc:  # a broken simulator or recipe: the request is rejected, the expert goes on
        log.exception("request #%d failed", request.id)
        demo, reason, steps = None, f"expert failed: {type(exc).__name__}: {exc}", 0
    if demo is not None:
        store.fulfil(request.id, by, writer.folder, demo)
    else:
        store.reject(request.id, by, reason)
    return Answer(request.id, request.task, demo, reason, steps)


def serve_requests(store: RequestStore, writer: DemoWriter, by: str, lease_s: float = 600.0,
                   connect: str | None = None, once: bool = False, max_requests: int = 0,
                   idle_timeout_s: float = 0.0, poll_s: float = 1.0, tasks: tuple[str, ...] = (),
                   on_answer: Callable[[Answer], None] = lambda a: None,
                   should_stop: Callable[[], bool] = lambda: False) -> list[Answer]:
    """Claim and answer requests until told to stop. The store is the source of truth; the `request` topic
    of the operator stream (`connect`) only wakes the expert early, so nothing is missed when it drops
    messages. `once`: answer what is claimable now, then return; `max_requests` (> 0) and `idle_timeout_s`
    (> 0, seconds without a claimable request) end the loop too."""
    sub = subscribe(zmq.Context.instance(), connect, ["request"]) if connect else None
    answers: list[Answer] = []
    idle_since = time.monotonic()
    try:
        while not should_stop() and not (max_requests and len(answers) >= max_requests):
            request = store.claim(by, lease_s, sim_only=True, tasks=tasks)
            if request is None:
                if once or (idle_timeout_s and time.monotonic() - idle_since > idle_timeout_s):
                    break
                _wait(sub, poll_s)
                continue
            answers.append(answer(store, request, writer, by))
            on_answer(answers[-1])
            idle_since = time.monotonic()
    finally:
        if sub is not None:
            sub.close(linger=0)
    return answers


def _wait(sub: Any, poll_s: float) -> None:
    """Until a `request` message arrives (then drain what is queued) or `poll_s` passes."""
    if sub is None:
        time.sleep(poll_s)
        return
    if sub.poll(int(poll_s * 1000)):
        while sub.poll(0):
            sub.recv_multipart()
