"""Action-chunk queue: a chunked policy plans H actions at once and executes the first k before replanning."""

from __future__ import annotations

import numpy as np


class ActionChunkQueue:
    """Holds the not-yet-executed actions of the current plan (rows of the chunk, no copies).

    `needs_plan()` is true when the k actions to execute from the last chunk are used up; `push(chunk)`
    replaces whatever is left (a fresh plan always wins over an older one).
    """

    def __init__(self, execute: int):
        if execute < 1:
            raise ValueError(f"execute must be >= 1, got {execute}")
        self.execute = execute
        self._chunk: np.ndarray | None = None
        self._next = 0

    def __len__(self) -> int:
        return self.execute - self._next if self._chunk is not None else 0

    def needs_plan(self) -> bool:
        return self._chunk is None

    def push(self, chunk: np.ndarray) -> None:
        if chunk.ndim != 2 or len(chunk) < self.execute:
            raise ValueError(f"chunk must be (H >= {self.execute}, m), got {chunk.shape}")
        self._chunk, self._next = chunk, 0

    def pop(self) -> np.ndarray:
        chunk, i = self._chunk, self._next
        if chunk is None:
            raise IndexError("pop from an empty action chunk queue")
        self._next = i + 1
        if self._next == self.execute:
            self._chunk = None
        return chunk[i]

    def clear(self) -> None:
        self._chunk, self._next = None, 0
