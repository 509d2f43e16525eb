"""Reading a recording back, with the `mcap` package: also a file that a killed runtime left without its summary.

A finished file ends with a summary (the chunk index, statistics) that seeking readers use; a file whose runtime
was killed ends instead in the middle of its open chunk. `read_recording` reads records front to back (mcap's
StreamReader, no seeking), keeps every message of every complete chunk, and stops at the first incomplete record,
saying so (`complete`, `stopped`): what a crash costs is the chunk that was open.

Messages are decoded with the schema each file carries (a protobuf FileDescriptorSet; protobuf comes with
onnxruntime), so this needs nothing of Foxglove's SDK.

    python -m vigil.record.read DIR/<run>/<robot>/episode-00001-p001.mcap   # topics, schemas, counts
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from mcap.exceptions import McapError
from mcap.records import Channel, Footer, Message, Metadata, Schema
from mcap.stream_reader import StreamReader


@dataclass(frozen=True)
class Recorded:
    """One message: its topic, schema name (e.g. foxglove.JointStates), log time (ns) and decoded protobuf."""

    topic: str
    schema: str
    log_time: int
    message: Any


@dataclass(frozen=True)
class Recording:
    path: Path
    messages: tuple[Recorded, ...]
    metadata: dict[str, dict[str, str]]  # metadata records by name (vigil.episode: robot, episode, policy, ...)
    complete: bool  # the file ends with its footer: it was closed, not cut short
    stopped: str  # why reading stopped early ("" when complete)

    def topic(self, name: str) -> list[Any]:
        """The decoded messages of one topic, in order."""
        return [m.message for m in self.messages if m.topic == name]

    def counts(self) -> dict[str, int]:
        return dict(Counter(m.topic for m in self.messages))

    def schemas(self) -> dict[str, str]:
        return {m.topic: m.schema for m in self.messages}


class _Decoders:
    """Protobuf message classes built from the schemas a file carries, one per schema id."""

    def __init__(self) -> None:
        self._classes: dict[int, Any] = {}

    def add(self, schema: Schema) -> None:
        if schema.encoding != "protobuf":
            return
        files = descriptor_pb2.FileDescriptorSet.FromString(schema.data)
        pool = descriptor_pool.DescriptorPool()
        for f in files.file:
            pool.Add(f)
        self._classes[schema.id] = message_factory.GetMessageClass(pool.FindMessageTypeByName(schema.name))

    def decode(self, schema_id: int, data: bytes) -> Any:
        cls = self._classes.get(schema_id)
        return cls.FromString(data) if cls is not None else data


def _records(path: Path) -> Iterator[Any]:
    with open(path, "rb") as f:
        yield from StreamReader(f, record_size_limit=1 << 30).records


def read_recording(path: str | Path) -> Recording:
    """Every message that can be read from `path`, in file order (a file is written in time order)."""
    path = Path(path)
    decoders, schemas, channels = _Decoders(), {}, {}
    messages: list[Recorded] = []
    metadata: dict[str, dict[str, str]] = {}
    complete, stopped = False, ""
    try:
        for rec in _records(path):
            if isinstance(rec, Schema):
                schemas[rec.id] = rec
                decoders.add(rec)
            elif isinstance(rec, Channel):
                channels[rec.id] = rec
            elif isinstance(rec, Message):
                ch = channels[rec.channel_id]
                messages.append(Recorded(ch.topic, schemas[ch.schema_id].name if ch.schema_id else "",
                                         rec.log_time, decoders.decode(ch.schema_id, rec.data)))
            elif isinstance(rec, Metadata):
                metadata[rec.name] = dict(rec.metadata)
            elif isinstance(rec, Footer):
                complete = True
    except (McapError, Exception) as exc:  # noqa: BLE001 - a record cut short by the crash (zstd, struct, ...)
        stopped = f"{type(exc).__name__}: {exc}"
    return Recording(path, tuple(messages), metadata, complete, stopped)


def recordings(folder: str | Path) -> list[Path]:
    """Every MCAP file under a recording folder, in name order (run, robot, episode, part)."""
    return sorted(Path(folder).rglob("*.mcap"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vigil.record.read",
                                description="Summarise recordings (also ones cut short): topics, schemas, counts.")
    p.add_argument("paths", nargs="+", help="MCAP files or recording folders")
    args = p.parse_args(argv)
    for given in args.paths:
        for path in recordings(given) if Path(given).is_dir() else [Path(given)]:
            r = read_recording(path)
            schemas = r.schemas()
            print(json.dumps({"file": str(path), "complete": r.complete, "stopped": r.stopped,
                              "episode": r.metadata.get("vigil.episode", {}),
                              "topics": {t: {"schema": schemas[t], "messages": n} for t, n in r.counts().items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
