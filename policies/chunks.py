"""Action-chunk queue: a chunked policy plans H actions at once and executes the first k before replanning."""

from __future__ import annotations

from collections import deque

import numpy as np


class ActionChunkQueue:
    """Holds the not-yet-executed actions of the current plan.

    `needs_plan()` is true when the k actions to execute from the last chunk are used up; `push(chunk)`
    replaces whatever is left (a fresh plan always wins over an older one).
    """

    def __init__(self, execute: int):
        if execute < 1:
            raise ValueError(f"execute must be >= 1, got {execute}")
        self.execute = execute
        self._queue: deque[np.ndarray] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def needs_plan(self) -> bool:
        return not self._queue

    def push(self, chunk: np.ndarray) -> None:
        if chunk.ndim != 2 or len(chunk) < self.execute:
            raise ValueError(f"chunk must be (H >= {self.execute}, m), got {chunk.shape}")
        self._queue.clear()
        self._queue.extend(chunk[: self.execute])

    def pop(self) -> np.ndarray:
        return self._queue.popleft()

    def clear(self) -> None:
        self._queue.clear()
