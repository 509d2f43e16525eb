"""Jobs for tests/test_shard.py, importable by worker processes (spawned, or Ray's)."""

from __future__ import annotations

import os
from pathlib import Path

INIT: list[str] = []


def init(tag: str) -> None:
    INIT.append(tag)


def square(x: int, offset: int = 0) -> tuple[int, int, list[str]]:
    if x == 3:
        raise ValueError("three is bad")
    return x * x + offset, os.getpid(), list(INIT)


def die_once(x: int, marker: str) -> int:
    """The first call for 2 kills its worker process (a lost node, as far as the driver can tell)."""
    if x == 2 and not Path(marker).exists():
        Path(marker).write_text("died\n")
        os._exit(1)
    return x * 10
