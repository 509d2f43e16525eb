"""Simulated plan delays for evaluating asynchronous execution (stdlib only: the config validates with it).

A model is parsed from a config string: "constant:50ms", "jitter:50ms,10ms" (normal, clipped at 0),
"spikes:50ms,p=0.05,x=10" (with probability p the delay is x times the median). Draws are seeded, so a
lockstep run with a model is reproducible (runtime/planner.py applies it in ticks there).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

_MS = r"(\d+(?:\.\d+)?)ms"
KINDS = ("constant", "jitter", "spikes")


@dataclass(frozen=True)
class DelayModel:
    """A plan's simulated inference delay: "constant:50ms", "jitter:50ms,10ms" (normal, clipped at 0),
    "spikes:50ms,p=0.05,x=10" (with probability p, x times the median). Seeded: `sampler(seed)` gives a
    reproducible sequence. `ticks(ms, rate)` converts to control ticks (ceil)."""

    kind: str
    median_ms: float
    jitter_ms: float = 0.0
    p: float = 0.0
    x: float = 1.0
    text: str = ""

    @classmethod
    def parse(cls, text: str, key: str = "plan_delay") -> DelayModel:
        def bad(why: str) -> ValueError:
            return ValueError(f"config key {key!r} must be 'constant:50ms', 'jitter:50ms,10ms' or "
                              f"'spikes:50ms,p=0.05,x=10' ({why}), got {text!r}")

        kind, _, rest = str(text).strip().partition(":")
        if kind not in KINDS:
            raise bad(f"kind must be one of {KINDS}")
        parts = [p.strip() for p in rest.split(",")] if rest else []
        if not parts or not (m := re.fullmatch(_MS, parts[0])):
            raise bad("the first value is the median in ms, e.g. 50ms")
        median = float(m.group(1))
        if kind == "constant":
            if len(parts) != 1:
                raise bad("constant takes one value")
            return cls("constant", median, text=text)
        if kind == "jitter":
            if len(parts) != 2 or not (j := re.fullmatch(_MS, parts[1])):
                raise bad("jitter takes the median and the standard deviation, both in ms")
            return cls("jitter", median, float(j.group(1)), text=text)
        values: dict[str, float] = {}
        for part in parts[1:]:
            name, eq, value = part.partition("=")
            try:
                values[name] = float(value) if eq and name in ("p", "x") else math.nan
            except ValueError:
                values[name] = math.nan
        if set(values) != {"p", "x"} or any(math.isnan(v) for v in values.values()):
            raise bad("spikes takes the median, p=PROBABILITY and x=FACTOR")
        if not 0.0 <= values["p"] <= 1.0 or values["x"] < 0:
            raise bad("p must be in [0, 1] and x >= 0")
        return cls("spikes", median, p=values["p"], x=values["x"], text=text)

    def sampler(self, seed: int = 0) -> DelaySampler:
        return DelaySampler(self, seed)

    @staticmethod
    def ticks(ms: float, control_rate_hz: float) -> int:
        return int(math.ceil(ms * control_rate_hz / 1000.0 - 1e-9))


class DelaySampler:
    """Draws delays (ms) from a model with its own seeded generator: the same seed, the same sequence."""

    def __init__(self, model: DelayModel, seed: int = 0):
        self.model = model
        self._rng = random.Random(seed)

    def draw(self) -> float:
        m = self.model
        if m.kind == "constant":
            return m.median_ms
        if m.kind == "jitter":
            return max(0.0, self._rng.gauss(m.median_ms, m.jitter_ms))
        return m.median_ms * m.x if self._rng.random() < m.p else m.median_ms
