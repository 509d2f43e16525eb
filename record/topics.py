"""What a tick becomes in a recording: topics under `/<robot>/`, each with one of Foxglove's well-known schemas.

Foxglove has no plain vector schema, so every list of numbers (an observation array, the action, the monitors'
levels, the plan's scores, the tick's own numbers) is a `foxglove.JointStates` with one entry per element, named
`<array>[i]` (row-major for arrays of more than one axis) and valued in `position`: Foxglove's Plot panel reads it
as `/r/action.joints[0].position`, Rerun decodes it by protobuf reflection. A uint8 image (H x W, or H x W x 1, 3
or 4) is a `foxglove.RawImage`, which both tools show as an image. What a person reads -- a verdict's reason, a
plan boundary, an alert, a swap, an episode starting -- is a `foxglove.Log`.

Every channel carries the metadata `robot`, by which a robot's file takes exactly its own channels (files.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from foxglove import Context
from foxglove.channels import JointStatesChannel, LogChannel, RawImageChannel
from foxglove.messages import JointState, JointStates, Log, LogLevel, RawImage, Timestamp

from vigil.monitors.base import Level, Verdict

LOG_LEVEL = {Level.OK: LogLevel.Info, Level.WARN: LogLevel.Warning, Level.ALERT: LogLevel.Error,
             Level.STOP: LogLevel.Fatal}
SEVERITY = {level.label: log_level for level, log_level in LOG_LEVEL.items()}  # an alert's severity
IMAGE_ENCODINGS = {1: "mono8", 3: "rgb8", 4: "rgba8"}

# the topics of one robot, after its prefix `/<robot>`; the schema of each (docs/recording.md)
TOPICS = {
    "observation/<name>": "foxglove.JointStates (foxglove.RawImage for a uint8 image)",
    "action": "foxglove.JointStates",
    "monitors": "foxglove.JointStates",
    "scores": "foxglove.JointStates",
    "tick": "foxglove.JointStates",
    "verdicts": "foxglove.Log",
    "plan": "foxglove.Log",
    "alerts": "foxglove.Log",
    "events": "foxglove.Log",
}


def stamp(t_ns: int) -> Timestamp:
    return Timestamp(t_ns // 1_000_000_000, t_ns % 1_000_000_000)


def is_image(a: np.ndarray) -> bool:
    """A uint8 array shaped like a picture: H x W (both at least 8) or H x W x 1, 3 or 4."""
    if a.dtype != np.uint8:
        return False
    if a.ndim == 2:
        return min(a.shape) >= 8
    return a.ndim == 3 and a.shape[2] in IMAGE_ENCODINGS


class RobotTopics:
    """One robot's channels, made on first use, and what each event writes on them. Called on the writer
    thread only."""

    def __init__(self, context: Context, robot: str):
        self.context, self.robot = context, robot
        self.prefix = "/" + robot
        self._meta = {"robot": robot}
        self._channels: dict[tuple[type, str], Any] = {}
        self._names: dict[tuple[str, int], list[str]] = {}  # element names per (array, size): made once

    def _channel(self, kind: type, suffix: str) -> Any:
        ch = self._channels.get((kind, suffix))
        if ch is None:
            ch = self._channels[(kind, suffix)] = kind(f"{self.prefix}/{suffix}", metadata=self._meta,
                                                       context=self.context)
        return ch

    def element_names(self, name: str, size: int) -> list[str]:
        names = self._names.get((name, size))
        if names is None:
            names = self._names[(name, size)] = [f"{name}[{i}]" for i in range(size)]
        return names

    def numbers(self, suffix: str, t_ns: int, names: Sequence[str], values: Sequence[float]) -> None:
        joints = [JointState(name=n, position=v) for n, v in zip(names, values)]
        self._channel(JointStatesChannel, suffix).log(JointStates(timestamp=stamp(t_ns), joints=joints), log_time=t_ns)

    def array(self, suffix: str, name: str, t_ns: int, a: np.ndarray) -> None:
        """A numeric array as JointStates, a uint8 picture as RawImage."""
        if is_image(a):
            h, w = a.shape[:2]
            channels = 1 if a.ndim == 2 else a.shape[2]
            image = RawImage(timestamp=stamp(t_ns), frame_id=name, width=w, height=h,
                             encoding=IMAGE_ENCODINGS[channels], step=w * channels,
                             data=np.ascontiguousarray(a).tobytes())
            self._channel(RawImageChannel, suffix).log(image, log_time=t_ns)
            return
        values = np.asarray(a, np.float64).ravel().tolist()
        self.numbers(suffix, t_ns, self.element_names(name, len(values)), values)

    def log(self, suffix: str, t_ns: int, level: LogLevel, name: str, message: str) -> None:
        self._channel(LogChannel, suffix).log(Log(timestamp=stamp(t_ns), level=level, name=name, message=message),
                                              log_time=t_ns)

    def tick(self, t_ns: int, arrays: Mapping[str, np.ndarray], decision: Any, numbers: Mapping[str, float]) -> None:
        """One answered observation: what came in, what went out, how each monitor judged it, the plan's
        scores, and the tick's own numbers (seq, step, plan, safe, timings)."""
        for name, a in arrays.items():
            self.array(f"observation/{name}", name, t_ns, a)
        self.array("action", "action", t_ns, decision.action)
        judged = decision.judged
        self.numbers("monitors", t_ns, [v.monitor for v in judged], [float(v.level) for v in judged])
        if decision.scores:
            self.numbers("scores", t_ns, list(decision.scores), [float(v) for v in decision.scores.values()])
        self.numbers("tick", t_ns, list(numbers), list(numbers.values()))
        for v in decision.verdicts:
            self.verdict(t_ns, v)

    def verdict(self, t_ns: int, v: Verdict) -> None:
        self.log("verdicts", t_ns, LOG_LEVEL[v.level], v.monitor, v.reason or v.level.label)

    def event(self, t_ns: int, name: str, message: str, level: LogLevel = LogLevel.Info) -> None:
        self.log("events", t_ns, level, name, message)

    def alert(self, t_ns: int, meta: Mapping[str, Any]) -> None:
        """A filed alert, as the operator stream carried it (its store id, severity, monitor, reason, count)."""
        severity = str(meta.get("severity", ""))
        text = f"#{meta.get('id', 0)} {severity} {meta.get('monitor', '')}: {meta.get('reason', '')}"
        if meta.get("count", 1) != 1:
            text += f" (x{meta.get('count')})"
        self.log("alerts", t_ns, SEVERITY.get(severity, LogLevel.Unknown), str(meta.get("monitor", "")), text)
