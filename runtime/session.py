"""One robot's session: the tick as a plain object.

`Session.on_obs(arrays, seq, t_recv)` decides what one observation gets -- the policy's action, or the
bundle's safe action when a monitor says stop or the policy raised -- together with the monitors' verdicts
and the plan's scores, and returns it as a `Decision`. A session owns no socket and files nothing: the loop
(runtime/server.py) sends the reply that `act_reply` builds from the decision, then tells its hooks
(runtime/hooks.py), which do everything that is not deciding (alerts, data requests, the online learner,
telemetry).

A session also holds what a robot is between ticks: its episode (reset), its link's liveness, the policy it
plans with (a swapped-in policy is offered to every session and taken at the session's next plan boundary,
so no action chunk is cut short) and per-hook state (`state`, keyed by hook name).

Under `--execution async` a chunked policy's next chunk is planned on the runtime's planner worker while the
current one executes (runtime/planner.py, policies/executor.py): `_tick_async` is that tick, and a swapped-in
policy is taken when the session's next plan starts.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import msgpack
import numpy as np

from vigil.monitors.base import Level, Monitor, Tick, Verdict
from vigil.monitors.dynamics import dynamics_monitor
from vigil.monitors.failure import FailureMonitor
from vigil.monitors.safety import ActionMonitor, DeadlineMonitor, LinkMonitor, ObservationMonitor, SaturationMonitor
from vigil.monitors.stability import StabilityMonitor
from vigil.monitors.vfd import VFDMonitor
from vigil.policies.agent import Agent
from vigil.policies.bundle import Policy
from vigil.policies.manifest import Manifest
from vigil.runtime.inbox import HARD_LIMIT
from vigil.runtime.planner import EXHAUSTED, EXHAUSTED_OK, AsyncExecution, AsyncSettings, Planner, runs_async
from vigil.wire.protocol import ArraySpec, Layout, ProtocolError, check_arrays

log = logging.getLogger("vigil.session")
_clock = time.perf_counter
_STOP = Level.STOP
_NONE: tuple[Verdict, ...] = ()
_NO_SCORES: Mapping[str, float] = {}


class Decision(NamedTuple):
    """What one tick decided. `verdicts` holds the verdicts above ok (they go in the reply); `judged` every
    monitor's verdict, ok ones included (an ok re-arms an alert). `infer_s` is None on decisions that did not
    consult the policy (link loss). A NamedTuple: one is made every tick."""

    action: np.ndarray  # what is sent: the safe action when `safe`
    safe: bool
    verdicts: tuple[Verdict, ...]
    judged: Sequence[Verdict]
    scores: Mapping[str, float]
    plan: int  # number of the plan the scores belong to (0: none this episode)
    policy: str  # policy id that decided
    infer_s: float | None  # the policy step (onnxruntime, chunk queue, clipping)
    queue_s: float  # arrival of the observation to the start of its tick (runtime/inbox.py: what arrival is)
    decide_s: float  # start of the tick to the decision; the deadline is on queue_s + decide_s
    t_arrival: float = 0.0  # when the observation arrived (perf_counter)
    failed: bool = False  # the policy raised: `action` is the safe action, `verdicts` says why
    execution: Mapping[str, Any] | None = None  # asynchronous execution: replanned, adopted, plan_age, delay, plan


MonitorFactory = Callable[[Policy], list[Monitor]]


def standard_monitors(deadline_s: float, saturation_window: int) -> MonitorFactory:
    """The monitors every session runs, for a manifest: observation range, action finiteness, saturation,
    the deadline, and the bundle's own (VFD thresholds, the failure monitor, the dynamics monitor, a stability
    block, or a learner's default stability)."""
    def make(policy: Policy) -> list[Monitor]:
        manifest = policy.manifest
        monitors: list[Monitor] = [ObservationMonitor(manifest.observation), ActionMonitor(),
                                   SaturationMonitor(saturation_window), DeadlineMonitor(deadline_s)]
        if "vfd" in manifest.monitor:
            monitors.append(VFDMonitor.from_manifest(manifest.monitor["vfd"]))
        if "failure" in manifest.monitor:
            monitors.append(FailureMonitor.from_manifest(manifest.monitor["failure"]))
        if "dynamics" in manifest.monitor:
            dynamics = dynamics_monitor(policy)
            if dynamics is not None:
                monitors.append(dynamics)
        if "stability" in manifest.monitor or manifest.learner:
            monitors.append(StabilityMonitor.from_manifest(manifest.monitor.get("stability")))
        return monitors

    return make


def check_spec(spec: Any, manifest: Manifest) -> tuple[ArraySpec, ...]:
    """The observation arrays a robot declares in its hello `spec`, if they are exactly the policy's (else
    `bad_spec` for a malformed spec, `refused` for one this policy cannot drive)."""
    if not isinstance(spec, dict):
        raise ProtocolError("bad_spec", "hello must carry spec: {observation: [array specs], action: array spec}")
    obs = spec.get("observation")
    if not isinstance(obs, list):
        raise ProtocolError("bad_spec", "spec.observation must be a list of array specs")
    specs = tuple(ArraySpec.from_dict(d, f"spec.observation[{i}]") for i, d in enumerate(obs))
    declared = {s.name: s for s in specs}
    for want in manifest.observation:
        got = declared.get(want.name)
        if got is None or got.dtype != want.dtype or got.shape != want.shape:
            raise ProtocolError("refused", f"policy {manifest.policy_id} needs observation {want.name!r} "
                                f"{want.dtype}{list(want.shape)}, robot declares "
                                f"{f'{got.dtype}{list(got.shape)}' if got else 'nothing'}")
    if set(declared) != {s.name for s in manifest.observation} or len(declared) != len(specs):
        raise ProtocolError("refused", f"robot declares observations {sorted(declared)}, policy uses "
                            f"{sorted(s.name for s in manifest.observation)}")
    act = ArraySpec.from_dict(spec.get("action"), "spec.action")
    if act.shape != manifest.action.shape:
        raise ProtocolError("refused", f"policy acts in {list(manifest.action.shape)}, robot declares "
                            f"{list(act.shape)}")
    return specs


def hello_options(meta: Mapping[str, Any], pipeline: int, clock_synced: bool) -> tuple[int, bool]:
    """The robot's `pipeline` depth and `clock_synced` from its hello (docs/protocol.md §7.1), else the defaults."""
    depth, synced = meta.get("pipeline", pipeline), meta.get("clock_synced", clock_synced)
    if type(depth) is not int or not 1 <= depth <= HARD_LIMIT:
        raise ProtocolError("bad_header", f"hello key 'pipeline' must be an integer 1..{HARD_LIMIT}")
    if type(synced) is not bool:
        raise ProtocolError("bad_header", "hello key 'clock_synced' must be a bool")
    return depth, synced


class Session:
    """One connected robot. `identity` is the routing id of the connection it last spoke from."""

    def __init__(self, robot: str, identity: bytes, policy: Policy, monitors: MonitorFactory, link: LinkMonitor,
                 info: Mapping[str, Any] | None = None, declared: Sequence[ArraySpec] = (),
                 on_policy: Callable[[Session], None] | None = None, planner: Planner | None = None,
                 settings: AsyncSettings | None = None):
        self.robot = robot
        self.identity = identity
        self.layout = Layout(tuple(declared))  # the robot's observation arrays as it declared them: fast decoding
        self.clock_synced = False  # the robot's t_ns is on a clock comparable with ours (runtime/inbox.py)
        self.pipeline = 1  # messages it may have waiting at the runtime (hello `pipeline`)
        self.info: dict[str, Any] = dict(info or {})  # hello's info, then the current episode's task/instruction/sim
        self.link = link
        self.counters: Counter = Counter()
        self.state: dict[str, Any] = {}  # per-hook state (e.g. the online learner), keyed by hook name
        self.last_seq = 0  # seq of the last observation answered with an action
        self.episode = 0  # resets so far
        self.step = 0  # observations answered since the last reset (the step index in lockstep)
        # the action sent for this episode's previous observation (safe actions included): what the robot applied
        # before this one, as the dynamics monitor needs it (None at an episode's start)
        self.sent: np.ndarray | None = None
        self._make_monitors = monitors
        self._on_policy = on_policy
        self._offered: Policy | None = None
        self._planner, self._settings = planner, settings  # asynchronous execution (runtime/planner.py), if on
        self.execution: AsyncExecution | None = None
        self._async_last: tuple[int, Decision] | None = None  # the last async tick's seq and decision (duplicates)
        self._deferred: tuple | None = None  # a plan to hand to the worker once the reply is sent (after_reply)
        self.agent = Agent(policy)
        self._use(policy)

    # -- the tick ---------------------------------------------------------------------------------------

    def on_obs(self, arrays: Mapping[str, np.ndarray], seq: int, t_recv: float) -> Decision:
        """Decide the action for one observation (already decoded and checked against the spec) received at
        `t_recv` (perf_counter; its arrival as runtime/inbox.py dates it): the deadline counts from there,
        queueing included."""
        t_arrival = t_recv
        t_start = _clock()
        if self.execution is not None:
            decision = self._tick_async(arrays, seq, t_arrival, t_start)
            if decision is not None:
                return decision
        agent = self.agent
        if self._offered is not None and agent.at_plan_boundary:
            self._switch()
        try:
            step = agent.act(arrays)
        except ProtocolError:  # the robot's mistake (e.g. no instruction sent yet): an error reply
            raise
        except Exception as exc:  # onnxruntime refused this input, a custom op raised...: never the robot's problem
            return self._failed(exc, seq, t_arrival, t_start)
        tick = Tick(self.robot, seq, arrays, step.action, step.raw, step.scores, _clock() - t_arrival, step.plan,
                    step.clipped, self.sent)
        judged = [m.update(tick) for m in self.monitors]
        verdicts = tuple(v for v in judged if v.level)
        safe = False
        for v in verdicts:
            if v.level is _STOP:
                safe = True
                break
        decision = Decision(agent.safe_action if safe else step.action, safe, verdicts, judged, step.scores,
                            step.plan, self.policy_id, step.infer_s, t_start - t_arrival, _clock() - t_start,
                            t_arrival)
        self._answered(seq, safe, decision.action)
        return decision

    def _tick_async(self, arrays: Mapping[str, np.ndarray], seq: int, t_arrival: float,
                    t_start: float) -> Decision | None:
        """The tick under asynchronous execution: collect the plans available now, maybe start one (an offered
        policy plans it), act from the executor. None: a swap ended asynchronous execution, decide as usual."""
        last = self._async_last
        if last is not None and seq and seq == last[0]:  # the same observation again (a driver's retry)
            self.counters["duplicate_obs"] += 1  # answered as before; the chunk does not advance
            return last[1]._replace(queue_s=t_start - t_arrival, decide_s=_clock() - t_start, t_arrival=t_arrival)
        decision = self._decide_async(arrays, seq, t_arrival, t_start)
        self._async_last = None if decision is None else (seq, decision)
        return decision

    def _decide_async(self, arrays: Mapping[str, np.ndarray], seq: int, t_arrival: float,
                      t_start: float) -> Decision | None:
        """A new observation's tick (not a retry): collect, maybe plan, act."""
        ex, agent, tick = self.execution, self.agent, self.step
        ex.collect(tick, self.episode)
        request = ex.executor.request(tick)
        infer_s = 0.0
        try:
            if request is not None:
                if self._offered is not None:  # the plan starting now is the new policy's
                    self._switch()
                    if self.execution is None:
                        return None
                    if self.execution is not ex:  # another chunk length: start afresh
                        ex = self.execution
                        request = ex.executor.request(tick)
                if request.blocking:  # the observation waits for it (an episode's first plan, --merge sync)
                    try:
                        infer_s = ex.start(request, arrays, agent, self.episode)
                    except BaseException:
                        ex.executor.drop(request.tick)
                        raise
                else:  # started once the robot has its reply: the worker does not compete with the reply
                    self._deferred = (ex, request, arrays, self.episode)
            raw, info = ex.executor.action(tick)
        except ProtocolError:
            raise
        except Exception as exc:
            return self._failed(exc, seq, t_arrival, t_start)
        execution = {"replanned": request is not None, "adopted": info.adopted, "plan_age": info.age,
                     "delay": ex.executor.delay}
        if raw is None:  # the chunk ran out before the next plan: the safe action, an alert
            self.counters[EXHAUSTED] += 1
            verdict = Verdict(EXHAUSTED, Level.ALERT, f"no planned action for tick {tick}: the chunk ran out before "
                              f"the next plan arrived ({ex.executor.in_flight} in flight)",
                              {"tick": tick, "delay": execution["delay"]})
            self._answered(seq, True, agent.safe_action)
            return Decision(agent.safe_action, True, (verdict,), (verdict,), _NO_SCORES, 0, self.policy_id, infer_s,
                            t_start - t_arrival, _clock() - t_start, t_arrival, execution=execution)
        action, clipped = agent.clip(raw)
        plan, policy_id = info.tag
        execution["plan"] = plan
        judged = [m.update(Tick(self.robot, seq, arrays, action, raw, info.scores, _clock() - t_arrival, plan,
                                clipped, self.sent)) for m in self.monitors]
        judged.append(EXHAUSTED_OK)
        verdicts = tuple(v for v in judged if v.level)
        safe = any(v.level is _STOP for v in verdicts)
        self._answered(seq, safe, agent.safe_action if safe else action)
        return Decision(agent.safe_action if safe else action, safe, verdicts, judged, info.scores, plan, policy_id,
                        _clock() - t_start, t_start - t_arrival, _clock() - t_start, t_arrival,
                        execution=execution)

    def after_reply(self) -> None:
        """Work the tick deferred until the robot has its reply: under asynchronous execution, handing the plan
        started at this tick to the planner's worker (started earlier, the worker's feed preparation and
        onnxruntime call compete with the reply for the CPU and the GIL)."""
        deferred, self._deferred = self._deferred, None
        if deferred is None:
            return
        ex, request, arrays, episode = deferred
        if ex is not self.execution or episode != self.episode:
            ex.executor.drop(request.tick)
            return
        try:
            ex.start(request, arrays, self.agent, episode)
        except Exception as exc:  # noqa: BLE001 - the robot goes on with its chunk; the next plan is tried afresh
            log.warning("robot %s: plan for tick %d could not start: %s", self.robot, request.tick, exc)
            self.counters["plans_failed"] += 1
            ex.executor.drop(request.tick)

    def _failed(self, exc: Exception, seq: int, t_arrival: float, t_start: float) -> Decision:
        """The policy raised on this observation: the safe action at once, a stop verdict that says why; the next
        observation is tried afresh."""
        log.warning("policy %s raised for %s: %s", self.policy_id, self.robot, exc)
        verdict = Verdict("policy", Level.STOP, f"policy raised {type(exc).__name__}: {exc}"[:500],
                          {"error": type(exc).__name__})
        self.counters["policy_failed"] += 1
        self._answered(seq, True, self.agent.safe_action)
        return Decision(self.agent.safe_action, True, (verdict,), (verdict,), _NO_SCORES, 0, self.policy_id, None,
                        t_start - t_arrival, _clock() - t_start, t_arrival, failed=True)

    def _answered(self, seq: int, safe: bool, action: np.ndarray) -> None:
        self.last_seq = seq
        self.sent = action
        self.step += 1
        counters = self.counters
        counters["ticks"] += 1
        counters["safe"] += safe

    def check(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Require exactly the policy's observation arrays (ProtocolError naming what is wrong)."""
        check_arrays(_Obs(arrays), self.observation)

    def wants_plan(self) -> bool:
        """Whether this robot's next observation starts a new plan (an offered policy is taken first, as
        `on_obs` would). Never under asynchronous execution: its plans are made on the planner's worker."""
        if self.execution is not None:
            return False
        if self._offered is not None and self.agent.at_plan_boundary:
            self._switch()
        return self.agent.at_plan_boundary

    def link_lost(self, verdict: Verdict) -> Decision:
        """The decision sent when the link is declared lost: the safe action for the last observation."""
        self.sent = self.agent.safe_action  # what the robot applies meanwhile
        return Decision(self.agent.safe_action, True, (verdict,), (verdict,), _NO_SCORES, 0, self.policy_id, None,
                        0.0, 0.0, _clock())

    # -- between ticks ----------------------------------------------------------------------------------

    def reset(self, meta: Mapping[str, Any]) -> int:
        """A new episode: check the reset's keys, take an offered policy, clear the chunk queue and the monitor
        windows, embed the instruction, reseed. Returns the episode number."""
        instruction, seed, sim = meta.get("instruction"), meta.get("seed"), meta.get("sim")
        if instruction is not None and type(instruction) is not str:
            raise ProtocolError("bad_header", "reset key 'instruction' must be a string")
        if seed is not None and (type(seed) is not int or not 0 <= seed < 2**63):
            raise ProtocolError("bad_header", "reset key 'seed' must be a non-negative integer")
        if sim is not None and not (type(sim) is dict and type(sim.get("env")) is str):
            raise ProtocolError("bad_header", "reset key 'sim' must be a map with at least 'env' (a string)")
        if self._offered is not None:  # a new episode is a plan boundary too
            self._switch()
        self.agent.reset(instruction, seed)
        self._async_last = None
        if self.execution is not None:  # the plans in flight belong to the old episode
            self.execution.drop("reset")
            self.execution.reseed(seed)
        for m in self.monitors:
            m.reset()
            m.start_episode(meta)
        self.episode += 1
        self.step = 0
        self.sent = None
        for key in ("task", "instruction", "sim"):  # what this episode is: requests are filed with it
            self.info.pop(key, None)
        self.info.update({k: v for k, v in meta.items() if k in ("task", "instruction", "episode", "sim")})
        return self.episode

    def resumed(self) -> None:
        """The robot said hello again on a new connection: a plan in flight was made for a robot that may have
        moved on, so it is dropped (asynchronous execution starts afresh; the episode goes on)."""
        if self.execution is not None:
            self.execution.drop("resumed")

    @property
    def execution_mode(self) -> str:
        """"async" when this robot's chunks are executed while the next is planned, else "sync"."""
        return "async" if self.execution is not None else "sync"

    def offer(self, policy: Policy) -> None:
        """A newly swapped-in policy: this robot plans with it from its next plan boundary (or reset) on."""
        self._offered = None if policy is self.policy else policy

    @property
    def policy(self) -> Policy:
        return self.agent.policy

    def _switch(self) -> None:
        """This robot's chunk is used up: it plans with the offered policy from now on, its monitors start
        afresh with the new manifest (e.g. recalibrated VFD thresholds), and the hooks are told."""
        policy, self._offered = self._offered, None
        self.agent.switch(policy)
        self._use(policy)
        self.counters["swaps"] += 1

    def _use(self, policy: Policy) -> None:
        manifest = policy.manifest
        self.policy_id = manifest.policy_id
        self.observation: tuple[ArraySpec, ...] = tuple(manifest.observation)
        self.monitors = self._make_monitors(policy)
        if self._planner is not None:  # asynchronous execution goes on if the new policy's chunks fit it
            if self.execution is None or not self.execution.fits(policy):
                self.execution = (AsyncExecution(self._planner, self._settings or AsyncSettings(), policy, self.robot)
                                  if runs_async(policy) else None)
        self.agent.inputs.clear()  # per-robot graph inputs belong to the policy they were made for
        if self._on_policy is not None:
            self._on_policy(self)


class _Obs(NamedTuple):
    """Just enough of a Message for `check_arrays` to name what is wrong."""

    arrays: Mapping[str, np.ndarray]
    kind: str = "obs"


def plan_together(ready: Sequence[tuple[Session, Mapping[str, np.ndarray]]], max_batch: int) -> int:
    """Make the plans of several robots whose observations are waiting in one onnxruntime call per policy
    (at most `max_batch` robots each), where the graph takes a batch: a small network costs about the same
    for a few rows as for one. Each robot's plan is its own (its observation, instruction, gain and noise
    from its own generator); its tick then takes it instead of planning. A batch that cannot be made (inputs
    without a batch axis, a policy that raises, a robot without an instruction) is left to the robots'
    own ticks. Returns the number of robots planned together."""
    groups: dict[int, list[tuple[Session, Mapping[str, np.ndarray]]]] = {}
    for session, arrays in ready:
        if session.wants_plan():
            groups.setdefault(id(session.policy), []).append((session, arrays))
    done = 0
    for group in groups.values():
        for i in range(0, len(group), max_batch):
            chunk = group[i:i + max_batch]
            if len(chunk) < 2:
                continue
            try:
                for session, arrays in chunk:
                    session.check(arrays)
                t0 = _clock()
                plans = chunk[0][0].policy.infer_batch([a for _, a in chunk],
                                                       [s.agent.plan_extra() for s, _ in chunk])
                infer_s = _clock() - t0
            except Exception:  # noqa: BLE001 - each robot's own tick plans, and reports, as usual
                continue
            for (session, _), plan in zip(chunk, plans):
                session.agent.planned(plan, infer_s)
            done += len(chunk)
    return done


# -- the act reply ----------------------------------------------------------------------------------------

_packb = msgpack.Packer(use_bin_type=True).pack
_time_ns = time.time_ns
_ACTION_DESCS: dict[int, list[dict[str, Any]]] = {}


def act_reply(robot: str, seq: int, decision: Decision) -> list:
    """The frames of the `act` reply to observation `seq` (docs/protocol.md §7.3): every act the runtime
    sends is built here. The header is one msgpack map in the envelope's order, then `policy`, `safe`,
    `verdicts`, `infer_us`, `queue_us` and `decide_us` (absent when the policy was not consulted: link
    loss), and `scores` and `plan` for policies that score their plans; the action is float32."""
    action = decision.action
    if action.dtype != np.float32 or not action.flags.c_contiguous:
        action = np.ascontiguousarray(action, np.float32)
    n = action.shape[0] if action.ndim == 1 else -1
    descs = _ACTION_DESCS.get(n)
    if descs is None:
        descs = [{"name": "action", "dtype": "float32", "shape": list(action.shape)}]
        if n >= 0:
            _ACTION_DESCS[n] = descs
    header = {"v": 1, "kind": "act", "robot": robot, "seq": seq, "t_ns": _time_ns(), "arrays": descs,
              "policy": decision.policy, "safe": decision.safe,
              "verdicts": [[v.monitor, v.level.label, v.reason] for v in decision.verdicts] if decision.verdicts
              else []}
    if decision.infer_s is not None:  # (not rounded: round() costs more than the 8 bytes of a float64)
        header["infer_us"] = decision.infer_s * 1e6
        header["queue_us"] = decision.queue_s * 1e6
        header["decide_us"] = decision.decide_s * 1e6
    if decision.execution is not None:  # asynchronous execution (docs/protocol.md §7.3)
        header.update(decision.execution)
    if decision.scores:  # e.g. the VFD of the plan this action came from, and which plan that was
        header["scores"] = decision.scores
        header["plan"] = decision.plan
    return [_packb(header), action]
