"""Real-time chunking (RTC): the pieces shared by the bundle graph's exporter, the runtime and the bench.

Symbols (docs/rtc.md): chunk length H, execution horizon s (actions executed between the starts of two plans),
inference delay d in control ticks, d <= s <= H - d. While the next chunk is planned, the robot executes d more
actions of the current one; those are committed, and the new chunk should agree with them and, softly, with the
rest of the overlap.
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("exp", "linear", "ones", "zeros")


def prefix_weights(horizon: int, execute: int, delay: int, schedule: str = "exp") -> np.ndarray:
    """The soft mask W over the new chunk's indices (float32, shape (H,)): 1 for the d committed actions
    (i < d), decaying over the rest of the overlap (d <= i < H - s), 0 beyond it (i >= H - s).

    With c_i = (H - s - i) / (H - s - d + 1): "linear" is c_i, "exp" (the paper's) is c_i (e^{c_i} - 1) / (e - 1),
    "ones" keeps the whole overlap at 1 and "zeros" only the committed prefix (a hard mask).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if horizon < 1 or not 0 <= execute <= horizon or delay < 0:
        raise ValueError(f"need H >= 1, 0 <= s <= H and d >= 0, got H={horizon}, s={execute}, d={delay}")
    end = horizon - execute  # first index past the overlap with the executing chunk
    start = min(delay, end)
    i = np.arange(horizon, dtype=np.float64)
    if schedule == "ones":
        w = np.ones(horizon)
    elif schedule == "zeros":
        w = (i < start).astype(np.float64)
    else:
        w = np.clip((end - i) / (end - start + 1), 0.0, 1.0)
        w[:start] = 1.0
        if schedule == "exp":
            w = w * np.expm1(w) / (math.e - 1.0)
    w[int(end):] = 0.0
    return w.astype(np.float32)


def guidance_weight(tau: float, max_weight: float) -> float:
    """The guidance weight at flow time tau (0 noise, 1 action): min(beta, (1 - tau) / (tau r^2)) with
    r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2); beta at tau = 0 (where the formula diverges), 0 at tau = 1."""
    if tau <= 0.0:
        return float(max_weight)
    if tau >= 1.0:
        return 0.0
    r2 = (1.0 - tau) ** 2 / (tau ** 2 + (1.0 - tau) ** 2)
    return float(min(max_weight, (1.0 - tau) / (tau * r2)))
