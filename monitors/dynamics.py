"""Dynamics monitor: does the world answer the robot's commands the way it did in the data?

VFD asks whether the policy has seen situations like this one; it cannot see a world that looks the same but
answers differently (a worn gearbox, a low battery, a heavier load, a slower network, a slippery floor). A
forward-dynamics ensemble can (training/dynamics.py): every tick it predicts how the state should have changed
after the actions the runtime actually sent, and the monitor compares with what the robot reports. Per tick, in
units of the model's own held-out error sigma_d (docs/dynamics.md):

    residual of a group g   log(mean_{d in g} ((obs_t - obs_{t-1} - mean_m delta_m)_d / sigma_d)^2 + 0.01)
    disagreement            log(mean_d (std_m delta_m,d / sigma_d)^2 + 0.01)

The residual is split in groups of state dimensions: `robot` (what the robot's own commands move: Meta-World's
hand and gripper) and `object` (what it touches: the objects' poses), so that a change in actuation or timing
and a change in contact physics are told apart, and noisy contact dimensions do not drown the arm's. Each signal
is smoothed by a running mean over `window` ticks and judged against its task's time-varying band
(monitors/bands.py: centre and scale at each step of nominal episodes, so that moving and holding still are each
judged against their own kind): z(t) = (mean - centre(t)) / scale(t). The monitor alerts when any z passes q, one
q for all signals chosen by split conformal calibration so that a nominal episode raises an alarm with
probability about `alpha` over its whole length (a per-episode false-alarm rate, `calibrate_bands`). Its
diagnosis says which:

    disagreement above q       "unfamiliar": the model (and likely the policy) is out of its data; a residual
                               there says nothing about the robot
    robot residual above q     "robot": a familiar state in which the robot's commands take effect differently
                               (actuation, load, latency): a maintenance alert
    object residual above q    "world": what the robot touches answers differently (friction, mass)

The model (policies/dynamics.py, loaded once per bundle) and the signals are one ONNX graph, run once every
`every` ticks on the rows of those ticks (about 40 us for 4 rows): the verdict is at most `every` - 1 ticks late
and stands in between. The model's input is the recent observation and the last `history` actions the runtime
sent (`Tick.executed`, safe actions included, whichever chunk or asynchronous plan they came from), so the monitor
works alike under sync and asynchronous execution and real-time chunking. Everything comes from the manifest's
`monitor.dynamics`:

    {"model": "dynamics.onnx", "sha256": ..., "state": "state", "inputs": [dims], "predict": [dims],
     "groups": {"robot": [positions in predict], "object": [...]}, "history": 2, "action_dim": 4, "sigma": [...],
     "window": 20, "warmup": 3, "every": 4, "alpha": 0.1, "q": ...,
     "bands": {"<task>": {"robot": band, "object": band, "disagreement": band}, "*": {...}},
     "instructions": {"<instruction>": "<task>"}}

The calibration keys (window .. instructions) are written by `vigil calibrate`; without them the monitor is not
run. numpy and onnxruntime only: the runtime, `vigil calibrate` and the benchmark share this code.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vigil.monitors.bands import Band, conformal_quantile, fit_shape, running_mean, split_halves
from vigil.monitors.base import Level, Monitor, Tick, Verdict

POOLED = "*"
DISAGREEMENT = "disagreement"
LOG_FLOOR = 0.01  # inside the log: a step predicted to the error scale's tenth is as good as perfect
UNFAMILIAR, ROBOT, WORLD = "unfamiliar", "robot", "world"
DIAGNOSES = {"robot": ROBOT, "object": WORLD}  # residual group -> diagnosis (any other group: robot)
MAINTENANCE = ROBOT  # the diagnosis that files a maintenance alert (runtime/requests.py holds data requests back)
CALIBRATION_KEYS = ("window", "alpha", "q", "warmup", "every", "episodes", "bands", "instructions")  # bands_block's


def diagnose(z: Mapping[str, float], q: float) -> tuple[str, str, float] | None:
    """(diagnosis, the signal that decided, its z) of one step's exceedances, or None below q: disagreement first
    (an unfamiliar state: the residual is not evidence about the robot), else the worst residual group. The monitor
    and the calibration code (`first_alarm`) both decide here."""
    if z[DISAGREEMENT] > q:
        return UNFAMILIAR, DISAGREEMENT, z[DISAGREEMENT]
    group = max((g for g in z if g != DISAGREEMENT), key=z.__getitem__)
    return (DIAGNOSES.get(group, ROBOT), group, z[group]) if z[group] > q else None


class DynamicsMonitor(Monitor):
    """Per robot. Each tick adds one row (the previous state and the actions sent, the observed change); every
    `every` ticks the rows are scored in one onnxruntime call and judged step by step, so the verdict is that of
    the last `every` steps and stands until the next batch (a tick costs a row write, a batch a few tens of us)."""

    name = "dynamics"

    def __init__(self, model: Any, bands: Mapping[str, Mapping[str, Band]], q: float, window: int = 20,
                 instructions: Mapping[str, str] | None = None, warmup: int = 3, every: int = 4):
        if window < 1 or every < 1:
            raise ValueError(f"monitor.dynamics.window and .every must be >= 1, got {window} and {every}")
        if POOLED not in bands:
            raise ValueError(f"monitor.dynamics.bands must hold the pooled band {POOLED!r}")
        for task, b in bands.items():
            if missing := [s for s in model.names if s not in b]:
                raise ValueError(f"monitor.dynamics.bands.{task} lacks {missing}")
        self.model, self.bands, self.q, self.window = model, dict(bands), float(q), int(window)
        self.instructions = dict(instructions or {})
        self.warmup, self.every = int(warmup), int(every)
        n_in, m = len(model.inputs), model.action_dim
        self._x = np.zeros((self.every, model.width), np.float32)
        self._obs = np.zeros((self.every, len(model.predict)), np.float32)
        self._hist = np.zeros(model.history * m, np.float32)  # actions sent, newest first
        self._n_in, self._m = n_in, m
        self.reset()

    @classmethod
    def from_block(cls, block: Mapping[str, Any], model: Any) -> DynamicsMonitor | None:
        """The monitor of a bundle's `monitor.dynamics` on its loaded model (policies/dynamics.py), or None when
        the block was never calibrated (no bands)."""
        if "bands" not in block:
            return None
        try:
            bands = {str(task): {k: Band.from_dict(v, f"monitor.dynamics.bands.{task}.{k}") for k, v in b.items()}
                     for task, b in block["bands"].items()}
            q = block["q"]
            q = math.inf if q is None else float(q)
            window, warmup = int(block.get("window", 20)), int(block.get("warmup", 3))
            every = int(block.get("every", 4))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"monitor.dynamics must hold bands, q and window ({exc})") from None
        return cls(model, bands, q, window, block.get("instructions"), warmup, every)

    def start_episode(self, info: Mapping[str, Any]) -> None:
        task = info.get("task")
        if task not in self.bands:
            task = self.instructions.get(str(info.get("instruction")), POOLED)
        self._task = task if task in self.bands else POOLED
        self._band = [self.bands[self._task][name] for name in self.model.names]

    def update(self, tick: Tick) -> Verdict:
        state = tick.obs.get(self.model.state)
        executed = tick.executed
        previous, self._state = self._state, state
        if state is None or executed is None or previous is None:
            return self._last  # the episode's first tick, or a runtime that does not say what it sent
        m, n_in, k = self.model, self._n_in, self._rows
        hist = self._hist
        hist[self._m:] = hist[:-self._m]
        hist[:self._m] = np.asarray(executed, np.float32).reshape(-1)
        prev, now = np.asarray(previous, np.float32).reshape(-1), np.asarray(state, np.float32).reshape(-1)
        self._x[k, :n_in] = prev[m.inputs]
        self._x[k, n_in:] = hist
        self._obs[k] = now[m.predict] - prev[m.predict]
        self._rows = k + 1
        if self._rows == self.every:
            self._judge(m.signals(self._x, self._obs))
            self._rows = 0
        return self._last

    def _judge(self, signals: np.ndarray) -> None:
        """Each row in order: its signals into the running means, z against the task's band, the verdict."""
        verdict = None
        names, bands, sums, recent, window = self.model.names, self._band, self._sums, self._recent, self.window
        for row in signals.tolist():
            t = self._t
            self._t += 1
            z = []
            for i, value in enumerate(row):
                buf = recent[i]
                buf.append(value)
                sums[i] += value
                if len(buf) > window:
                    sums[i] -= buf.popleft()
                z.append(bands[i].z(t, sums[i] / len(buf)))
            if t < self.warmup or verdict is not None:
                continue
            verdict = self._verdict(t, z, names)
        self._last = verdict or self.ok()

    def _verdict(self, t: int, z: list[float], names: tuple[str, ...]) -> Verdict | None:
        by_name = dict(zip(names, z))
        found = diagnose(by_name, self.q)
        if found is None:
            return None
        diagnosis, signal, worst = found
        values = {f"z_{name}": v for name, v in by_name.items()}
        values.update(q=self.q, step=float(t), diagnosis=diagnosis)
        if diagnosis == UNFAMILIAR:
            return Verdict(self.name, Level.ALERT, f"unfamiliar state: the dynamics ensemble disagrees (z {worst:.3g} "
                           f"> {self.q:.3g}, task {self._task}); its residual says nothing about the robot here",
                           values)
        what = ("maintenance: the robot's commands take effect differently than in its data (check actuation, load, "
                "latency)" if diagnosis == ROBOT else
                "the world answers differently: what the robot touches moves unlike in its data (friction, mass)")
        return Verdict(self.name, Level.ALERT, f"{what}; {signal} residual z {worst:.3g} > {self.q:.3g} in a familiar "
                       f"state, task {self._task}", values)

    def reset(self) -> None:
        self._state: np.ndarray | None = None
        self._hist[:] = 0.0
        self._rows = 0
        self._recent = [deque() for _ in self.model.names]
        self._sums = [0.0 for _ in self.model.names]
        self._t = 0
        self._last = self.ok()
        self._task = POOLED
        self._band = [self.bands[POOLED][name] for name in self.model.names]


def dynamics_monitor(policy: Any) -> DynamicsMonitor | None:
    """A robot's dynamics monitor for a loaded policy (policies.bundle.Policy: its model is shared), or None when
    the bundle's dynamics block was never calibrated."""
    block = policy.manifest.monitor.get("dynamics")
    if block is None or policy.dynamics is None:
        return None
    return DynamicsMonitor.from_block(block, policy.dynamics)


# ------------------------------------------------------------------------------------------ calibration


def exceedances(bands: Mapping[str, Band], scores: Mapping[str, np.ndarray], window: int) -> dict[str, np.ndarray]:
    """z per step of each signal of one episode, as the monitor computes them."""
    return {s: bands[s].exceedance(running_mean(v, window)) for s, v in scores.items()}


def episode_statistic(bands: Mapping[str, Band], scores: Mapping[str, np.ndarray], window: int,
                      warmup: int = 3, horizon: int | None = None) -> float:
    """max over the episode's steps (after `warmup`, before `horizon`) of the largest z: the monitor alarms in the
    episode iff this exceeds q."""
    z = np.max(np.stack(list(exceedances(bands, scores, window).values())), axis=0)[warmup:horizon]
    return float(z.max()) if len(z) else -math.inf


def first_alarm(bands: Mapping[str, Band], scores: Mapping[str, np.ndarray], window: int, q: float,
                warmup: int = 3) -> tuple[int | None, str | None]:
    """(step index of the first alarm, its diagnosis) as the monitor would raise them, or (None, None)."""
    z = exceedances(bands, scores, window)
    if DISAGREEMENT not in z:
        raise ValueError("first_alarm needs the disagreement signal")
    for t in range(warmup, len(z[DISAGREEMENT])):
        found = diagnose({s: float(v[t]) for s, v in z.items()}, q)
        if found is not None:
            return t, found[0]
    return None, None


def calibrate_bands(episodes: Mapping[str, Sequence[Mapping[str, np.ndarray]]], window: int = 20, alpha: float = 0.10,
                    warmup: int = 3, length: int = 200) -> tuple[dict[str, dict[str, Band]], float]:
    """Per-task bands and one q from nominal episodes' per-step signals, by task.

    Split conformal, per episode: each task's bands (centre and scale of the running mean at each of the first
    `length` steps; the last holds after) come from half of its episodes (alternating); the episode statistic of
    the other half, pooled over tasks, gives q at level alpha, so that a nominal episode alarms with probability
    about alpha. The pooled band "*" (for tasks not calibrated) comes from every task's shape half."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    bands: dict[str, dict[str, Band]] = {}
    held: list[tuple[str, Mapping[str, np.ndarray]]] = []
    pooled: dict[str, list[np.ndarray]] = {}
    for task, eps in episodes.items():
        eps = [e for e in eps if len(next(iter(e.values())))]
        if len(eps) < 2:
            continue
        fit, test = split_halves(len(eps))
        bands[task] = {}
        for s in eps[0]:
            series = [running_mean(eps[i][s], window)[:length] for i in fit]
            bands[task][s] = fit_shape(series, smooth=2, scale_floor=0.2)
            pooled.setdefault(s, []).extend(series)
        held += [(task, eps[i]) for i in test]
    if not bands:
        raise ValueError("need at least two nominal episodes of some task to calibrate the dynamics monitor")
    bands[POOLED] = {s: fit_shape(v, smooth=2, scale_floor=0.2) for s, v in pooled.items()}
    stats = [episode_statistic(bands[task], e, window, warmup) for task, e in held]
    return bands, conformal_quantile(stats, alpha)


def bands_block(bands: Mapping[str, Mapping[str, Band]], q: float, window: int, alpha: float,
                instructions: Mapping[str, str] | None = None, warmup: int = 3, n_episodes: int = 0,
                every: int = 4) -> dict:
    """The calibration keys of `monitor.dynamics` (merged into the model's block by `vigil calibrate`)."""
    return {"window": int(window), "alpha": float(alpha), "q": q if math.isfinite(q) else None,
            "warmup": int(warmup), "every": int(every), "episodes": int(n_episodes),
            "bands": {t: {k: b.to_dict() for k, b in v.items()} for t, v in bands.items()},
            "instructions": dict(instructions or {})}
