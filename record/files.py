"""Where a recording goes: one MCAP file per robot and episode, in parts when an episode grows large.

    DIR/<run>/<robot>/episode-<episode:05d>-p<part:03d>.mcap
    DIR/<run>/<robot>/connection-<k:02d>/episode-...     the robot's k-th new session in this runtime's life

`<run>` is one runtime's life (UTC start time and process id), so a restarted runtime, whose episodes count from
1 again, never writes over an earlier one; `<robot>` is the robot id made safe for a file name. Episode 0 holds
what a robot does before its first reset. A file is closed at the robot's next reset, when it leaves, when the
runtime stops, or (the next part opens) once it passes the size limit.

Each file is a sink of the recorder's foxglove Context that takes only its robot's channels (by the channel
metadata `robot`, topics.py). Chunks are zstd-compressed and closed at every `flush` (the writer flushes every
`record_flush_s`), so a killed runtime leaves a file whose complete chunks read back (read.py): it loses at most
the chunk still open.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import foxglove
from foxglove import Context
from foxglove.mcap import MCAPCompression, MCAPWriteOptions

CHUNK_BYTES = 1 << 20  # a chunk closes at this much uncompressed data, or at the next flush if sooner
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def run_name(t: float | None = None, pid: int | None = None) -> str:
    """One runtime's folder: its UTC start time and process id."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t)) + f"-{os.getpid() if pid is None else pid}"


def safe_name(robot: str) -> str:
    """The robot id as a folder name: itself when it is plain; otherwise its plain characters and a hash of the
    id, so two ids never share a folder."""
    plain = _UNSAFE.sub("_", robot)
    if plain == robot and robot not in ("", ".", "..") and not robot.startswith("."):
        return robot
    return f"{plain.lstrip('.')[:64]}-{hashlib.sha256(robot.encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class Layout:
    root: Path
    run: str

    def path(self, robot: str, episode: int, part: int, connection: int = 1) -> Path:
        """A robot's first connection records into its folder; when it connects again as a new session (its
        episodes count from 1 again), into `connection-<k>/` below it, so nothing is written over."""
        folder = self.root / self.run / safe_name(robot)
        if connection > 1:
            folder = folder / f"connection-{connection:02d}"
        return folder / f"episode-{episode:05d}-p{part:03d}.mcap"


def write_options() -> MCAPWriteOptions:
    # compression on the writer's own thread (compression_threads=0): the runtime has few cores to spare
    return MCAPWriteOptions(compression=MCAPCompression.Zstd, chunk_size=CHUNK_BYTES, compression_threads=0)


class EpisodeFile:
    """One open MCAP file of one robot. Every method may raise (OSError, or foxglove's RuntimeError for an I/O
    error underneath): the writer treats that as the end of the recording."""

    def __init__(self, context: Context, path: Path, robot: str, metadata: Mapping[str, str]):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = foxglove.open_mcap(path, context=context, writer_options=write_options(),
                                         channel_filter=lambda ch: ch.metadata.get("robot") == robot)
        self.writer.write_metadata("vigil.episode", {k: str(v) for k, v in metadata.items()})
        self.dirty = False  # messages since the last flush

    def flush(self) -> int:
        """Close the open chunk and hand it to the file; returns the file's size."""
        self.writer.flush()
        self.dirty = False
        return self.path.stat().st_size

    def close(self) -> None:
        """Write the last chunk and the summary (the index the readers seek with)."""
        self.writer.close()
