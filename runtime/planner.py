"""Asynchronous execution (`vigil serve --execution async`): plan the next chunk while the current one executes.

One worker thread per runtime plans for every robot (onnxruntime releases the GIL while it runs, so the loop
keeps answering); a finished plan wakes the loop (`Runtime.wake`). Per robot, `AsyncExecution` drives a pure
`ChunkExecutor` (policies/executor.py) with the robot's tick (its observation count this episode): on each
observation it collects the finished plans, maybe starts one, and returns the executor's action. No
observation waits for a plan in realtime mode, except an episode's first (nothing to execute yet).

Availability of a plan, which decides where it is adopted:
- lockstep with a delay model (`plan_delay`): the plan becomes available at tick started + the model's delay in
  ticks (ceil(ms * control_rate_hz / 1000), at least 1); if the worker is not done by then the loop waits for it
  (a lockstep robot waits anyway), so runs are reproducible on a loaded machine;
- otherwise: when the worker is done (realtime with a model: the worker pads the plan time with a sleep up to
  the drawn delay); a blocking plan — an episode's first, every plan under `--merge sync` — is padded the same
  way on the loop, so a synchronous robot really waits as long as the modelled planner takes).

A reset or a resumed session drops the plans in flight (their results are discarded by episode); a hot swap
takes effect at the next plan started (the one in flight finishes with the old policy).
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from vigil.monitors.base import Level, Verdict
from vigil.policies.agent import Agent
from vigil.policies.bundle import Plan, Policy
from vigil.policies.delays import DelayModel, DelaySampler
from vigil.policies.executor import ChunkExecutor, PlanRequest
from vigil.runtime.hooks import Hook

if TYPE_CHECKING:
    from vigil.runtime.session import Session

log = logging.getLogger("vigil.planner")
_clock = time.perf_counter
EXHAUSTED = "chunk_exhausted"  # the alert's monitor name
EXHAUSTED_OK = Verdict(EXHAUSTED, Level.OK)  # re-arms the alert once chunks cover the ticks again
RTC_SCHEDULES = {"guided": "exp", "trained": "zeros"}


@dataclass(frozen=True)
class AsyncSettings:
    """What `ServeConfig` says about asynchronous execution, parsed once."""

    merge: str = "rtc"
    execute_horizon: int = 0  # s; 0: the bundle's chunk.execute
    delay_quantile: float = 0.9
    plan_delay: DelayModel | None = None
    adaptive_vfd: float | None = None
    lockstep: bool = True

    @classmethod
    def from_config(cls, config: Any) -> AsyncSettings:
        model = DelayModel.parse(config.plan_delay) if config.plan_delay else None
        return cls(config.merge, config.execute_horizon, config.delay_quantile, model,
                   config.adaptive_horizon_vfd, config.mode == "lockstep")


def runs_async(policy: Policy) -> bool:
    """Asynchronous execution applies to chunked policies (H > 1); for the others async is sync."""
    return policy.manifest.chunk_length > 1


class Planner:
    """The worker thread that makes every robot's plans, one at a time, in the order they were started.
    `on_done` (the runtime's `wake`) is called on the worker when a plan is done."""

    def __init__(self, on_done: Callable[[], None] | None = None):
        self.on_done = on_done
        self._pool: ThreadPoolExecutor | None = None
        self._closed = threading.Event()

    def submit(self, policy: Policy, obs: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray] | None,
               pad_s: float) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vigil-planner")
        future = self._pool.submit(self._plan, policy, obs, extra, pad_s)
        if self.on_done is not None:
            on_done = self.on_done
            future.add_done_callback(lambda _: on_done())
        return future

    def _plan(self, policy: Policy, obs: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray] | None,
              pad_s: float) -> tuple[Plan, float, float]:
        """(plan, inference seconds, end time): the plan padded to `pad_s` (realtime with a delay model)."""
        t0 = _clock()
        plan = policy.infer(obs, extra)
        infer_s = _clock() - t0
        if pad_s > infer_s:
            self._closed.wait(pad_s - infer_s)  # interruptible: closing the runtime does not wait for a pad
        return plan, infer_s, _clock()

    def close(self) -> None:
        self._closed.set()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


@dataclass
class _Job:
    request: PlanRequest
    episode: int
    tag: tuple[int, str]  # (plan number, policy id)
    future: Future
    t_submit: float
    available: int | None  # lockstep with a model: the tick the plan becomes available at
    model_ms: float


class AsyncExecution:
    """One robot's asynchronous execution: its executor, its plans in flight and their measured delays."""

    def __init__(self, planner: Planner, settings: AsyncSettings, policy: Policy, robot: str):
        m = policy.manifest
        self.planner, self.settings, self.rate_hz = planner, settings, m.control_rate_hz
        self.horizon = m.chunk_length
        execute = min(settings.execute_horizon or m.chunk_execute, self.horizon)
        model = settings.plan_delay
        initial = max(1, model.ticks(model.median_ms, self.rate_hz)) if model else 1
        self.rtc_mode = getattr(policy, "rtc_mode", None)
        self.executor = ChunkExecutor(self.horizon, execute, settings.merge, quantile=settings.delay_quantile,
                                      initial_delay=initial, adaptive_vfd=settings.adaptive_vfd,
                                      rtc_schedule=RTC_SCHEDULES.get(self.rtc_mode or "", "exp"),
                                      max_delay=getattr(policy, "rtc_max_delay", None) or None)
        self._sampler: DelaySampler | None = model.sampler(zlib.crc32(robot.encode())) if model else None
        self._jobs: list[_Job] = []
        self.counters: Counter = Counter()
        self._delays_ms: deque[float] = deque(maxlen=256)
        self._delays_ticks: deque[int] = deque(maxlen=256)

    def fits(self, policy: Policy) -> bool:
        """Whether this execution can go on with `policy` (a swap): same chunk length, same kind of RTC."""
        return (runs_async(policy) and policy.manifest.chunk_length == self.horizon
                and getattr(policy, "rtc_mode", None) == self.rtc_mode)

    # -- the tick ----------------------------------------------------------------------------------------

    def collect(self, tick: int, episode: int) -> None:
        """Deliver the plans available at this tick (lockstep with a model: wait for one that is due)."""
        if not self._jobs:
            return
        keep = []
        for job in self._jobs:
            if job.episode != episode:  # a plan of an earlier episode: never used
                self.counters["plans_discarded"] += 1
                continue
            if job.available is not None:
                if tick < job.available:
                    keep.append(job)
                    continue
                if not job.future.done():
                    self.counters["waited_for_planner"] += 1
                arrived = job.available
            elif job.future.done():
                arrived = tick
            else:
                keep.append(job)
                continue
            self._deliver(job, arrived)
        self._jobs = keep

    def _deliver(self, job: _Job, arrived: int) -> None:
        started = job.request.tick
        try:
            plan, _, t_end = job.future.result()
        except Exception as exc:  # noqa: BLE001 - the robot goes on with its chunk; the next plan is tried afresh
            log.warning("plan for tick %d failed: %s", started, exc)
            self.counters["plans_failed"] += 1
            self.executor.drop(started)
            return
        self.executor.deliver(plan.actions, started, arrived, plan.scores, job.tag)
        self._delays_ms.append(max(job.model_ms, (t_end - job.t_submit) * 1e3))
        self._delays_ticks.append(arrived - started)

    def start(self, request: PlanRequest, obs: Mapping[str, np.ndarray], agent: Agent, episode: int) -> float:
        """Start the plan `request` asks for with this tick's observation: on the worker, or here when it is
        blocking (delivered at once). Returns the seconds this tick spent planning."""
        policy = agent.policy
        extra = agent.plan_extra()
        if getattr(policy, "rtc_mode", None) and request.prefix is not None:
            extra = {**(extra or {}), **_rtc_inputs(policy, request)}
        agent.plans += 1
        tag = (agent.plans, policy.manifest.policy_id)
        if request.blocking:  # the observation waits: with a delay model, the ticks it would wait are counted
            t0 = _clock()
            plan = policy.infer(obs, extra)
            model_ms = self._sampler.draw() if self._sampler is not None else 0.0
            if not self.settings.lockstep and (pad := model_ms / 1e3 - (_clock() - t0)) > 0:
                time.sleep(pad)  # realtime: the observation really waits as long as the modelled planner takes
            infer_s = _clock() - t0
            waited = DelayModel.ticks(model_ms, self.rate_hz) if self._sampler is not None else 0
            self.executor.deliver(plan.actions, request.tick, request.tick + waited, plan.scores, tag)
            return infer_s
        model_ms = self._sampler.draw() if self._sampler is not None else 0.0
        lockstep_model = self.settings.lockstep and self._sampler is not None
        available = request.tick + max(1, DelayModel.ticks(model_ms, self.rate_hz)) if lockstep_model else None
        pad_s = model_ms / 1e3 if self._sampler is not None and not lockstep_model else 0.0
        future = self.planner.submit(policy, obs, extra, pad_s)
        self._jobs.append(_Job(request, episode, tag, future, _clock(), available, model_ms))
        return 0.0

    def drop(self, reason: str) -> None:
        """A reset or a resumed session: the plans in flight are never used (the worker still finishes them)."""
        self.counters["plans_discarded"] += len(self._jobs)
        self._jobs = []
        self.executor.reset()

    def reseed(self, seed: int | None) -> None:
        if seed is not None and self.settings.plan_delay is not None:
            self._sampler = self.settings.plan_delay.sampler(seed)

    def stats(self) -> dict[str, Any]:
        """Per-robot telemetry: d, s, the plan delay's p50/p90 (ms and ticks), adopted/late/exhausted counts."""
        ms, ticks = sorted(self._delays_ms), sorted(self._delays_ticks)
        return {**self.executor.stats(), **self.counters,
                "delay_p50_ms": _q(ms, 0.5), "delay_p90_ms": _q(ms, 0.9),
                "delay_p50_ticks": _q(ticks, 0.5), "delay_p90_ticks": _q(ticks, 0.9)}


def _rtc_inputs(policy: Policy, request: PlanRequest) -> dict[str, np.ndarray]:
    """The prefix Y and weights W as graph inputs: the policy's own `rtc_inputs` when it has one."""
    make = getattr(policy, "rtc_inputs", None)
    if callable(make):
        return dict(make(request.prefix, request.weights))
    return {"prefix": request.prefix[None].astype(np.float32), "prefix_weight": request.weights[None]}


def _q(ordered: list, q: float) -> float:
    if not ordered:
        return 0.0
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


class PlannerHook(Hook):
    """Telemetry of asynchronous execution (`robots.<id>.async`) and the worker's end with the runtime."""

    name = "planner"

    def __init__(self, planner: Planner):
        self.planner = planner

    def robot_stats(self, session: Session) -> Mapping[str, Any]:
        execution = session.execution
        return {} if execution is None else {"async": execution.stats()}

    def close(self) -> None:
        self.planner.close()
