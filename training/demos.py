"""Demonstration datasets: a durable on-disk episode format with a small index, and expert recording.

Format (docs/datasets.md has the full description):

    DIR/index.jsonl                  one JSON object per line, one line per episode
    DIR/episodes/<task>/<id>.npz     obs_<name> (T+1, ...), actions (T, A) float32, rewards (T,) float32,
                                     success (T,) bool, record (the index line, as a JSON string)

Durability: an episode file is written to a temporary file in its folder, flushed and fsynced, renamed into
place, and the folder is fsynced; only then is its index line appended (one write, under an exclusive lock,
then fsync). So every index line refers to a complete file, whatever moment a writer dies at.  A writer
killed mid-line leaves a torn last line without its newline: readers ignore it, and the next writer cuts it
off before appending.  Leftover `*.tmp` files are from writers that died mid-file; nothing refers to them.

Only numpy and the standard library here; `record_expert` imports the simulator lazily.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "vigil-demos/1"
INDEX = "index.jsonl"


@dataclass(frozen=True, eq=False)
class Episode:
    """One episode: T steps, T actions, T+1 observations (the first is the reset observation)."""

    task: str
    instruction: str
    seed: int | None
    observations: Mapping[str, np.ndarray]  # name -> (T+1, ...) in the runtime's dtypes
    actions: np.ndarray  # (T, A) float32
    rewards: np.ndarray  # (T,) float32
    success: np.ndarray  # (T,) bool: the environment's success flag after each step
    source: str = "expert"
    meta: Mapping[str, Any] = field(default_factory=dict)  # JSON-serialisable extras (variant, max_steps...)

    @property
    def steps(self) -> int:
        return int(self.actions.shape[0])

    @property
    def succeeded(self) -> bool:
        return bool(np.any(self.success))

    @property
    def success_step(self) -> int | None:
        """Index of the first step after which the success flag was set, or None."""
        hits = np.flatnonzero(self.success)
        return int(hits[0]) if hits.size else None

    def validate(self) -> None:
        T = self.steps
        if self.actions.ndim != 2 or self.actions.dtype != np.float32:
            raise ValueError(f"actions must be (T, A) float32, got {self.actions.shape} {self.actions.dtype}")
        if self.rewards.shape != (T,) or self.success.shape != (T,):
            raise ValueError(f"rewards and success must be ({T},), got {self.rewards.shape} and {self.success.shape}")
        if not self.observations:
            raise ValueError("an episode needs at least one observation array")
        for name, arr in self.observations.items():
            if not name or not name.replace("_", "").isalnum():
                raise ValueError(f"observation name {name!r}: letters, digits and underscores only")
            if arr.shape[:1] != (T + 1,):
                raise ValueError(f"observation {name!r} must have T+1 = {T + 1} rows, got shape {arr.shape}")
        if not self.task or "/" in self.task or self.task.startswith("."):
            raise ValueError(f"bad task name {self.task!r}")


@dataclass(frozen=True)
class EpisodeInfo:
    """One index line."""

    id: str
    task: str
    instruction: str
    seed: int | None
    steps: int
    success: bool
    success_step: int | None
    source: str
    file: str  # relative to the dataset folder
    created: str  # ISO 8601, UTC
    observations: Mapping[str, Mapping[str, Any]]  # name -> {"dtype": ..., "shape": [...]} (per step)
    meta: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> EpisodeInfo:
        return cls(id=d["id"], task=d["task"], instruction=d["instruction"], seed=d["seed"], steps=int(d["steps"]),
                   success=bool(d["success"]), success_step=d["success_step"], source=d["source"], file=d["file"],
                   created=d["created"], observations=d["observations"], meta=d.get("meta", {}))

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "id": self.id, "task": self.task, "instruction": self.instruction,
                "seed": self.seed, "steps": self.steps, "success": self.success, "success_step": self.success_step,
                "source": self.source, "file": self.file, "created": self.created,
                "observations": {k: dict(v) for k, v in self.observations.items()}, "meta": dict(self.meta)}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: Path) -> None:
    """mkdir -p, fsyncing each parent whose entries changed."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            pass
        _fsync_dir(d.parent)


class DemoWriter:
    """Appends episodes to a dataset folder (created if needed). Several writers may share a folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        _makedirs_durable(self.folder / "episodes")
        self.index_path = self.folder / INDEX

    def add(self, episode: Episode, *, episode_id: str | None = None, created: str | None = None) -> str:
        """Write the episode durably, then index it; returns its id. `episode_id` and `created` (ISO 8601) are for
        copies of an episode that already has them (an import of an exported dataset keeps them)."""
        episode.validate()
        if episode_id is None:
            episode_id = f"{episode.task}-s{episode.seed}-{uuid.uuid4().hex[:10]}"
        elif not episode_id or "/" in episode_id or episode_id.startswith("."):
            raise ValueError(f"bad episode id {episode_id!r}")
        task_dir = self.folder / "episodes" / episode.task
        _makedirs_durable(task_dir)
        info = EpisodeInfo(
            id=episode_id, task=episode.task, instruction=episode.instruction,
            seed=None if episode.seed is None else int(episode.seed), steps=episode.steps,
            success=episode.succeeded, success_step=episode.success_step, source=episode.source,
            file=f"episodes/{episode.task}/{episode_id}.npz",
            created=created or datetime.now(UTC).isoformat(timespec="milliseconds"),
            observations={k: {"dtype": str(v.dtype), "shape": list(v.shape[1:])}
                          for k, v in episode.observations.items()},
            meta=dict(episode.meta))
        line = json.dumps(info.to_json(), separators=(",", ":"))
        arrays = {f"obs_{k}": np.ascontiguousarray(v) for k, v in episode.observations.items()}
        arrays.update(actions=episode.actions, rewards=episode.rewards.astype(np.float32, copy=False),
                      success=episode.success.astype(bool, copy=False), record=np.array(line))
        fd, tmp = tempfile.mkstemp(dir=task_dir, prefix=f".{episode_id}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)  # mkstemp makes it private
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.folder / info.file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(task_dir)
        self._append_index(line)
        return episode_id

    def _append_index(self, line: str) -> None:
        data = (line + "\n").encode()
        fd = os.open(self.index_path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # a writer that died mid-line left a torn tail: cut it off before appending
                start = size
                while start > 0:
                    chunk_start = max(0, start - 65536)
                    cut = os.pread(fd, start - chunk_start, chunk_start).rfind(b"\n")
                    if cut >= 0:
                        start = chunk_start + cut + 1
                        break
                    start = chunk_start
                os.ftruncate(fd, start)
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock
        if size == 0:
            _fsync_dir(self.folder)


def read_index(path: str | os.PathLike) -> list[EpisodeInfo]:
    """Parse index.jsonl. A torn last line (no newline, from a writer that died) is ignored; any other bad
    line is an error naming it."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = raw.split(b"\n")
    complete = lines[:-1]  # what follows the last newline is empty, or a torn line: ignored
    out: list[EpisodeInfo] = []
    for n, ln in enumerate(complete, 1):
        if not ln.strip():
            continue
        try:
            out.append(EpisodeInfo.from_json(json.loads(ln)))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}:{n}: bad index line ({exc})") from exc
    return out


class DemoSet:
    """A dataset folder, read: its index and its episodes."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder}: no such dataset folder")
        self.refresh()

    def refresh(self) -> None:
        """Re-read the index (a writer may have added episodes)."""
        self.index: list[EpisodeInfo] = read_index(self.folder / INDEX)
        self._by_id = {e.id: e for e in self.index}

    def __len__(self) -> int:
        return len(self.index)

    def tasks(self) -> list[str]:
        return sorted({e.task for e in self.index})

    def episodes(self, task: str | None = None, success: bool | None = None,
                 source: str | None = None) -> list[EpisodeInfo]:
        return [e for e in self.index if (task is None or e.task == task) and (success is None or e.success == success)
                and (source is None or e.source == source)]

    def load(self, episode_id: str) -> Episode:
        info = self._by_id.get(episode_id)
        if info is None:
            raise KeyError(f"{episode_id}: not in {self.folder / INDEX}")
        with np.load(self.folder / info.file, allow_pickle=False) as z:
            obs = {k[4:]: z[k] for k in z.files if k.startswith("obs_")}
            return Episode(task=info.task, instruction=info.instruction, seed=info.seed, observations=obs,
                           actions=z["actions"], rewards=z["rewards"], success=z["success"], source=info.source,
                           meta=dict(info.meta))

    def summary(self) -> dict[str, dict[str, float]]:
        """Per task: episodes, successes, success rate, mean steps."""
        out: dict[str, dict[str, float]] = {}
        for task in self.tasks():
            eps = self.episodes(task)
            ok = sum(e.success for e in eps)
            out[task] = {"episodes": len(eps), "successes": ok, "success_rate": ok / len(eps),
                         "mean_steps": float(np.mean([e.steps for e in eps]))}
        return out


def rollout_expert(env, seed: int) -> Episode:
    """One episode of `env`'s scripted expert (a MetaWorldEnv), until terminated or truncated."""
    obs = env.reset(seed=seed)
    observations = {k: [v] for k, v in obs.items()}
    actions, rewards, success = [], [], []
    while True:
        action = env.expert_action(obs["state"])
        r = env.step(action)
        obs = r.obs
        for k, v in obs.items():
            observations[k].append(v)
        actions.append(action)
        rewards.append(r.reward)
        success.append(r.info.get("success", 0.0) >= 1.0)
        if r.terminated or r.truncated:
            break
    return Episode(task=env.task, instruction=env.instruction, seed=seed,
                   observations={k: np.stack(v) for k, v in observations.items()},
                   actions=np.stack(actions).astype(np.float32), rewards=np.asarray(rewards, np.float32),
                   success=np.asarray(success, bool), source="expert",
                   meta={"variant": env.variant, "max_steps": env.max_steps, "hold_steps": env.hold_steps,
                         "terminated": bool(r.terminated), "control_rate_hz": env.control_rate_hz})


def record_expert(task: str, n: int, seed: int, camera: bool, writer: DemoWriter,
                  progress: Callable[[Episode], None] | None = None, max_steps: int = 500,
                  image_size: int = 64, hold_steps: int = 10) -> list[str]:
    """Record n episodes of `task`'s scripted expert (seeds seed, seed+1, ...) into `writer`; failed episodes
    are kept, with success False. `progress(episode)` is called after each one. Returns the ids.
    hold_steps: an episode ends after the task has been done this many consecutive steps."""
    from vigil.sim.metaworld_env import MetaWorldEnv

    env = MetaWorldEnv(task, camera=camera, image_size=image_size, max_steps=max_steps, hold_steps=hold_steps)
    ids = []
    try:
        for i in range(n):
            episode = rollout_expert(env, seed + i)
            ids.append(writer.add(episode))
            if progress is not None:
                progress(episode)
    finally:
        env.close()
    return ids


def parse_tasks(spec: str) -> list[str]:
    """'mt10', 'heldout', or a comma-separated list of task names (which may include those words)."""
    from vigil.sim.metaworld_env import ALL_INSTRUCTIONS, HELDOUT_INSTRUCTIONS, MT10_TASKS

    tasks: list[str] = []
    for word in (w.strip() for w in spec.split(",")):
        if not word:
            continue
        names: Iterable[str] = {"mt10": MT10_TASKS, "heldout": HELDOUT_INSTRUCTIONS}.get(word.lower(), [word])
        for name in names:
            if name not in ALL_INSTRUCTIONS:
                raise ValueError(f"unknown task {name!r}: use mt10, heldout, or names from {sorted(ALL_INSTRUCTIONS)}")
            if name not in tasks:
                tasks.append(name)
    if not tasks:
        raise ValueError("no tasks given")
    return tasks
