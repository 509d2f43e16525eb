"""LeRobot v3 datasets: vigil demonstrations out (`export_lerobot`) and back in (`import_lerobot`).

docs/datasets.md ("LeRobot v3") describes the mapping; docs/decisions.md (item 118) why this module writes and
reads the v3 layout itself instead of calling LeRobot's `LeRobotDataset.create/add_frame/save_episode`: that
code cannot be imported beside the project's CPU build of torch (it imports torchvision, and no CPU build of
torchvision is reachable), and it only encodes lossy video. The real LeRobot loader reads what this writes, and
this reads what LeRobot writes: tests/test_lerobot.py checks both, frame by frame, in a second environment
(`.venv-lerobot`, Makefile).

Frames. A vigil episode has T actions and T+1 observations; a LeRobot frame is one observation with the action
taken at it. The export writes T+1 frames: frame t < T is (o_t, a_t, r_t, success_t), frame T holds the final
observation o_T, repeats a_{T-1} (vigil's own padding past an episode's end) and is flagged `vigil.terminal`.
The import drops that frame's action again. A dataset without `vigil.terminal` (written by anyone else) has one
step per frame, so its T = frames and the final observation, which it does not hold, repeats the last one
(the episode's meta says so).

Only numpy, pyarrow, pandas (tasks.parquet is a pandas frame with the task strings as its index) and PyAV here.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from vigil.training.demos import DemoSet, DemoWriter, Episode, EpisodeInfo

CODEBASE_VERSION = "v3.0"
VIDEO_CODEC = "libx264rgb"  # lossless H.264 in RGB: images come back bit for bit (decisions.md item 118)
VIDEO_OPTIONS = {"crf": "0", "g": "2", "preset": "veryfast"}  # crf 0: lossless; g 2: LeRobot's key-frame spacing
CHUNKS_SIZE = 1000  # files per chunk folder (LeRobot's default)
DATA_FILES_SIZE_MB = 100
VIDEO_FILES_SIZE_MB = 200
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-000/file-000.parquet"
SIDECAR = "meta/vigil/episodes.jsonl"  # one vigil index line per LeRobot episode: ids, seeds, request provenance
STATE, ACTION, TERMINAL = "observation.state", "action", "vigil.terminal"
REWARD, SUCCESS, DONE = "next.reward", "next.success", "next.done"
INDEX_FEATURES = ("timestamp", "frame_index", "episode_index", "index", "task_index")
QUANTILES = (0.01, 0.10, 0.50, 0.90, 0.99)
TOLERANCE_S = 1e-4  # a video frame matches a timestamp this close (LeRobotDataset's default tolerance_s)
METAWORLD_DIMS = {STATE: 39, ACTION: 4}


@dataclass(frozen=True)
class ExportSummary:
    out: str
    episodes: int
    frames: int
    tasks: int
    fps: int
    video_keys: tuple[str, ...]


@dataclass(frozen=True)
class ImportSummary:
    out: str
    episodes: int
    steps: int
    ids: tuple[str, ...]
    vigil_meta: bool  # the dataset carried vigil's sidecar (ids, seeds, provenance came back)


# ------------------------------------------------------------------------------------------------ names


def lerobot_key(name: str, camera: bool) -> str:
    """vigil observation name -> LeRobot feature: state -> observation.state, image -> observation.image,
    image_<cam> -> observation.images.<cam>, any other x -> observation.x."""
    if camera and name == "image":
        return "observation.image"
    if camera and name.startswith("image_"):
        return f"observation.images.{name[6:]}"
    return f"observation.{name}"


def vigil_name(key: str) -> str:
    """The inverse of `lerobot_key` for an `observation.*` feature (dots and dashes become underscores)."""
    rest = key[len("observation."):]
    if rest.startswith("images."):
        rest = "image_" + rest[len("images."):]
    name = re.sub(r"[^A-Za-z0-9_]", "_", rest)
    if not name:
        raise ValueError(f"feature {key!r}: no observation name after 'observation.'")
    return name


def task_name(instruction: str) -> str:
    """A vigil task name for a LeRobot task string: the Meta-World task whose instruction it is, else a slug."""
    from vigil.sim.metaworld_env import ALL_INSTRUCTIONS

    for name, text in ALL_INSTRUCTIONS.items():
        if text == instruction:
            return name
    slug = re.sub(r"[^a-z0-9]+", "-", instruction.lower()).strip("-")[:60].strip("-")
    return slug or "task"


def _is_camera(spec: Mapping[str, Any]) -> bool:
    shape = tuple(spec["shape"])
    return spec["dtype"] == "uint8" and len(shape) == 3 and shape[2] == 3


# ------------------------------------------------------------------------------------------------ stats


def _stats(x: np.ndarray, image: bool) -> dict[str, np.ndarray]:
    """LeRobot's per-episode statistics of one feature: min, max, mean, std, count and quantiles q01..q99.
    Vectors per dimension; images per channel in [0, 1], shaped (3, 1, 1)."""
    if image:  # (n, H, W, 3) uint8
        flat = x.reshape(-1, x.shape[-1]).astype(np.float64) / 255.0
        count = x.shape[0]
    else:
        flat = x.reshape(x.shape[0], -1).astype(np.float64)
        count = x.shape[0]
    out = {"min": flat.min(0), "max": flat.max(0), "mean": flat.mean(0), "std": flat.std(0),
           "count": np.array([count])}
    for q in QUANTILES:
        out[f"q{round(q * 100):02d}"] = np.quantile(flat, q, axis=0)
    if image:
        out = {k: v if k == "count" else v.reshape(-1, 1, 1) for k, v in out.items()}
    return out


def _aggregate(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Dataset statistics from episode statistics, as LeRobot aggregates them (count-weighted mean and
    quantiles, pooled variance)."""
    counts = np.stack([p["count"] for p in parts]).astype(np.float64)
    total = counts.sum(0)
    means = np.stack([p["mean"] for p in parts])
    w = counts.reshape(counts.shape + (1,) * (means.ndim - counts.ndim))
    mean = (means * w).sum(0) / total.reshape(total.shape + (1,) * (means.ndim - 1 - total.ndim))
    var = ((np.stack([p["std"] for p in parts]) ** 2 + (means - mean) ** 2) * w).sum(0) / total.reshape(
        total.shape + (1,) * (means.ndim - 1 - total.ndim))
    out = {"min": np.min(np.stack([p["min"] for p in parts]), 0), "max": np.max(np.stack([p["max"] for p in parts]), 0),
           "mean": mean, "std": np.sqrt(var), "count": total.astype(np.int64)}
    for k in parts[0]:
        if k.startswith("q"):
            out[k] = (np.stack([p[k] for p in parts]) * w).sum(0) / total.reshape(
                total.shape + (1,) * (means.ndim - 1 - total.ndim))
    return out


def _sample(n: int) -> np.ndarray:
    """The frames LeRobot samples for image statistics: about n^0.75 of them, 100 at least (or all)."""
    k = min(n, max(100, min(int(n ** 0.75), 10_000)))
    return np.round(np.linspace(0, n - 1, k)).astype(int)


# ------------------------------------------------------------------------------------------------ writing


class _RollingParquet:
    """The data files: a new file once the current one holds DATA_FILES_SIZE_MB (uncompressed estimate)."""

    def __init__(self, root: Path, schema):
        self.root, self.schema = root, schema
        self.chunk, self.file, self.bytes, self.writer = 0, 0, 0, None

    def write(self, table) -> tuple[int, int]:
        import pyarrow.parquet as pq

        if self.writer is not None and self.bytes + table.nbytes > DATA_FILES_SIZE_MB * 2**20:
            self.close()
            self.chunk, self.file = _next_file(self.chunk, self.file)
            self.bytes = 0
        if self.writer is None:
            path = self.root / DATA_PATH.format(chunk_index=self.chunk, file_index=self.file)
            path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(path, self.schema, compression="snappy")
        self.writer.write_table(table)
        self.bytes += table.nbytes
        return self.chunk, self.file

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class _RollingVideo:
    """One camera's video files: episodes one after another in a file (LeRobot's v3 layout), a new file once
    the current one holds VIDEO_FILES_SIZE_MB. Frame k of a file is at k / fps seconds."""

    def __init__(self, root: Path, key: str, fps: int, height: int, width: int):
        self.root, self.key, self.fps, self.height, self.width = root, key, fps, height, width
        self.chunk, self.file, self.frames, self.bytes = 0, 0, 0, 0
        self.container = self.stream = None
        self.first: Path | None = None

    def _open(self) -> None:
        import av

        path = self.root / VIDEO_PATH.format(video_key=self.key, chunk_index=self.chunk, file_index=self.file)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.first = self.first or path
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream(VIDEO_CODEC, self.fps, options=dict(VIDEO_OPTIONS))
        self.stream.pix_fmt, self.stream.width, self.stream.height = "rgb24", self.width, self.height
        self.frames = self.bytes = 0

    def _mux(self, packets) -> None:
        for packet in packets:
            self.bytes += packet.size
            self.container.mux(packet)

    def write(self, frames: np.ndarray) -> dict[str, Any]:
        """Append an episode's frames (n, H, W, 3) uint8; returns its meta/episodes columns."""
        import av

        if self.container is not None and self.bytes >= VIDEO_FILES_SIZE_MB * 2**20:
            self.close()
            self.chunk, self.file = _next_file(self.chunk, self.file)
        if self.container is None:
            self._open()
        start = self.frames
        for img in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            frame.pts, frame.time_base = self.frames, Fraction(1, self.fps)
            self._mux(self.stream.encode(frame))
            self.frames += 1
        p = f"videos/{self.key}/"
        return {p + "chunk_index": self.chunk, p + "file_index": self.file, p + "from_timestamp": start / self.fps,
                p + "to_timestamp": self.frames / self.fps}

    def close(self, flush: bool = True) -> None:
        if self.container is not None:
            try:
                if flush:
                    self._mux(self.stream.encode())
            finally:
                self.container.close()
                self.container = self.stream = None


def _next_file(chunk: int, file: int) -> tuple[int, int]:
    return (chunk + 1, 0) if file == CHUNKS_SIZE - 1 else (chunk, file + 1)


def _video_info(path: Path) -> dict[str, Any]:
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return {"video.height": s.codec_context.height, "video.width": s.codec_context.width,
                "video.codec": s.codec_context.name, "video.pix_fmt": s.codec_context.pix_fmt,
                "video.is_depth_map": False, "video.fps": int(round(float(s.average_rate or s.base_rate))),
                "video.channels": 3, "has_audio": len(c.streams.audio) > 0}


def _json_default(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _export_fps(infos: Sequence[EpisodeInfo], fps: int | None) -> int:
    if fps is not None:
        if fps < 1:
            raise ValueError(f"fps must be >= 1, got {fps}")
        return fps
    rates = {e.meta.get("control_rate_hz") for e in infos}
    if len(rates) != 1 or None in rates:
        raise ValueError(f"the episodes' control rates differ or are missing ({sorted(map(str, rates))}): pass --fps")
    rate = float(rates.pop())
    if not math.isfinite(rate) or rate < 1 or abs(rate - round(rate)) > 1e-6:
        raise ValueError(f"control rate {rate} Hz is not a whole number of frames per second (LeRobot's fps is an "
                         "integer): pass --fps")
    return int(round(rate))


def export_lerobot(demos: str | Path, out: str | Path, repo_id: str | None = None, fps: int | None = None,
                   robot_type: str | None = None,
                   log: Callable[[str], None] = lambda line: None) -> ExportSummary:
    """Write the episodes of vigil dataset DEMOS, in index order, as a LeRobot v3 dataset in OUT (a new folder).
    Cameras (uint8 H x W x 3 observations) become losslessly encoded video. `fps` defaults to the episodes'
    control rate; `robot_type` to "sawyer" when every task is Meta-World's. A failed export leaves no folder."""
    import pyarrow as pa

    ds = DemoSet(demos)
    infos = list(ds.index)
    if not infos:
        raise ValueError(f"{ds.folder}: no episodes to export")
    out = Path(out)
    existed = _new_folder(out, "export")
    rate = _export_fps(infos, fps)
    spec = {name: dict(s) for name, s in infos[0].observations.items()}
    if "state" not in spec:
        raise ValueError(f"episode {infos[0].id} has no 'state' observation (LeRobot's {STATE})")
    for e in infos[1:]:
        if {k: dict(v) for k, v in e.observations.items()} != spec:
            raise ValueError(f"episode {e.id}: observations {dict(e.observations)} differ from episode {infos[0].id}'s "
                             f"{spec} (a LeRobot dataset has one set of features)")
    cameras = {n: lerobot_key(n, True) for n, s in spec.items() if _is_camera(s)}
    numeric = {n: lerobot_key(n, False) for n in spec if n not in cameras}
    for n, key in numeric.items():
        if len(spec[n]["shape"]) != 1:
            raise ValueError(f"observation {n!r} ({key}) has shape {spec[n]['shape']}: only vectors and "
                             "H x W x 3 uint8 images are exported")
    first = ds.load(infos[0].id)
    act_dim = int(first.actions.shape[1])

    features: dict[str, dict[str, Any]] = {}
    for n, key in numeric.items():
        features[key] = {"dtype": spec[n]["dtype"], "shape": list(spec[n]["shape"]), "names": None}
    features[ACTION] = {"dtype": "float32", "shape": [act_dim], "names": None}
    for n, key in cameras.items():
        features[key] = {"dtype": "video", "shape": list(spec[n]["shape"]), "names": ["height", "width", "channels"]}
    features[REWARD] = {"dtype": "float32", "shape": [1], "names": None}
    features[SUCCESS] = {"dtype": "bool", "shape": [1], "names": None}
    features[DONE] = {"dtype": "bool", "shape": [1], "names": None}
    features[TERMINAL] = {"dtype": "bool", "shape": [1], "names": None}
    features["timestamp"] = {"dtype": "float32", "shape": [1], "names": None}
    for k in INDEX_FEATURES[1:]:
        features[k] = {"dtype": "int64", "shape": [1], "names": None}
    columns = [k for k, f in features.items() if f["dtype"] != "video"]
    schema = pa.schema([_arrow_field(k, features[k]) for k in columns],
                       metadata={"huggingface": json.dumps({"info": {"features": {
                           k: _hf_feature(features[k]) for k in columns}}})})

    if robot_type is None:
        from vigil.sim.metaworld_env import ALL_INSTRUCTIONS

        robot_type = "sawyer" if all(e.task in ALL_INSTRUCTIONS for e in infos) else None  # Meta-World's arm
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _export(ds, infos, first, out, features, schema, columns, numeric, cameras, spec, rate, act_dim,
                       robot_type, repo_id, log)
    except BaseException:
        _clean(out, existed)
        raise


def _export(ds: DemoSet, infos: Sequence[EpisodeInfo], first: Episode, out: Path, features: dict, schema,
            columns: Sequence[str], numeric: Mapping[str, str], cameras: Mapping[str, str], spec: Mapping[str, Any],
            rate: int, act_dim: int, robot_type: str | None, repo_id: str | None,
            log: Callable[[str], None]) -> ExportSummary:
    import pyarrow as pa

    data = _RollingParquet(out, schema)
    videos = {key: _RollingVideo(out, key, rate, *spec[n]["shape"][:2]) for n, key in cameras.items()}
    tasks: dict[str, int] = {}
    rows: list[dict[str, Any]] = []
    sidecar: list[str] = []
    all_stats: list[dict[str, dict[str, np.ndarray]]] = []
    total = 0
    try:
        for i, info in enumerate(infos):
            ep = first if i == 0 else ds.load(info.id)
            T = ep.steps
            if ep.actions.shape[1:] != (act_dim,):
                raise ValueError(f"episode {info.id}: {ACTION} has {ep.actions.shape[1:]} dimensions, the dataset "
                                 f"{act_dim} (from episode {infos[0].id})")
            n = T + 1
            pad = ep.actions[-1:] if T else np.zeros((1, act_dim), np.float32)
            task_index = tasks.setdefault(ep.instruction, len(tasks))
            terminal = np.zeros(n, bool)
            terminal[-1] = True
            frame = np.arange(n, dtype=np.int64)
            cols: dict[str, np.ndarray] = {key: ep.observations[name] for name, key in numeric.items()}
            cols[ACTION] = np.concatenate([ep.actions, pad]).astype(np.float32)
            cols[REWARD] = np.concatenate([ep.rewards, [0.0]]).astype(np.float32)
            cols[SUCCESS] = np.concatenate([ep.success, ep.success[-1:] if T else [False]]).astype(bool)
            cols[DONE] = terminal
            cols[TERMINAL] = terminal
            cols["timestamp"] = (frame / rate).astype(np.float32)
            cols["frame_index"] = frame
            cols["episode_index"] = np.full(n, i, np.int64)
            cols["index"] = frame + total
            cols["task_index"] = np.full(n, task_index, np.int64)
            for key, arr in cols.items():
                want = tuple(features[key]["shape"]) if features[key]["shape"] != [1] else ()
                if arr.shape != (n, *want):
                    raise ValueError(f"episode {info.id}: {key} has shape {arr.shape[1:]}, the dataset {want}")
            chunk, file = data.write(pa.table({k: _arrow_column(cols[k], features[k]) for k in columns},
                                              schema=schema))
            stats = {k: _stats(v, False) for k, v in cols.items()}
            row: dict[str, Any] = {"episode_index": i, "tasks": [ep.instruction], "length": n,
                                   "data/chunk_index": chunk, "data/file_index": file,
                                   "dataset_from_index": total, "dataset_to_index": total + n}
            for name, key in cameras.items():
                images = ep.observations[name]
                row.update(videos[key].write(images))
                stats[key] = _stats(images[_sample(n)], True)
            for key, st in stats.items():
                for s, v in st.items():
                    row[f"stats/{key}/{s}"] = v.tolist()
            row["meta/episodes/chunk_index"] = row["meta/episodes/file_index"] = 0
            rows.append(row)
            all_stats.append(stats)
            sidecar.append(json.dumps({"episode_index": i, "length": n, "record": info.to_json()},
                                      separators=(",", ":")))
            total += n
            log(f"episode {i}: {info.id} ({n} frames)")
    except BaseException:
        for v in videos.values():
            v.close(flush=False)
        raise
    finally:
        data.close()
    for v in videos.values():
        v.close()

    for key, v in videos.items():
        features[key]["info"] = _video_info(v.first)
    info_json = {"codebase_version": CODEBASE_VERSION, "robot_type": robot_type, "total_episodes": len(infos),
                 "total_frames": total, "total_tasks": len(tasks), "chunks_size": CHUNKS_SIZE,
                 "data_files_size_in_mb": DATA_FILES_SIZE_MB, "video_files_size_in_mb": VIDEO_FILES_SIZE_MB,
                 "fps": rate, "splits": {"train": f"0:{len(infos)}"}, "data_path": DATA_PATH,
                 "video_path": VIDEO_PATH if cameras else None, "features": features}
    _write_meta(out, info_json, rows, tasks, all_stats, sidecar, repo_id or f"vigil/{ds.folder.resolve().name}")
    return ExportSummary(str(out), len(infos), total, len(tasks), rate, tuple(cameras.values()))


def _arrow_field(key: str, feature: Mapping[str, Any]):
    import pyarrow as pa

    t = pa.from_numpy_dtype(np.dtype(feature["dtype"]))
    return pa.field(key, t if list(feature["shape"]) == [1] else pa.list_(t, int(feature["shape"][0])))


def _arrow_column(values: np.ndarray, feature: Mapping[str, Any]):
    import pyarrow as pa

    dtype = np.dtype(feature["dtype"])
    if list(feature["shape"]) == [1]:
        return pa.array(values.astype(dtype, copy=False))
    flat = pa.array(np.ascontiguousarray(values.astype(dtype, copy=False)).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, int(feature["shape"][0]))


def _hf_feature(feature: Mapping[str, Any]) -> dict[str, Any]:
    """How Hugging Face `datasets` describes the column in the parquet schema's metadata (as LeRobot writes it)."""
    value = {"dtype": feature["dtype"], "_type": "Value"}
    if list(feature["shape"]) == [1]:
        return value
    return {"feature": value, "length": int(feature["shape"][0]), "_type": "List"}


def _write_meta(out: Path, info: dict, rows: list[dict], tasks: Mapping[str, int],
                stats: Sequence[Mapping[str, Mapping[str, np.ndarray]]], sidecar: Sequence[str], repo_id: str) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = out / "meta"
    (meta / "vigil").mkdir(parents=True, exist_ok=True)
    path = out / EPISODES_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, compression="snappy")
    pd.DataFrame({"task_index": list(tasks.values())}, index=list(tasks)).to_parquet(meta / "tasks.parquet")
    dataset_stats = {k: _aggregate([s[k] for s in stats]) for k in stats[0]}
    (meta / "stats.json").write_text(json.dumps(dataset_stats, indent=4, default=_json_default) + "\n")
    (meta / "info.json").write_text(json.dumps(info, indent=4) + "\n")
    (out / SIDECAR).write_text("".join(line + "\n" for line in sidecar))
    (out / "README.md").write_text(
        f"---\nlicense: apache-2.0\ntags:\n- LeRobot\n- vigil\nconfigs:\n- config_name: default\n"
        f"  data_files: data/*/*.parquet\n---\n\n# {repo_id}\n\nA LeRobot {CODEBASE_VERSION} dataset exported by "
        f"`vigil demos export-lerobot`: {info['total_episodes']} episodes, {info['total_frames']} frames at "
        f"{info['fps']} fps. The last frame of each episode (`{TERMINAL}`) holds the final observation; its "
        f"action repeats the one before. `{SIDECAR}` keeps vigil's episode records (ids, seeds, request "
        "provenance).\n")


# ------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class _Source:
    """A LeRobot dataset folder, opened: info.json, tasks, episode rows (by episode_index), the frame table."""

    root: Path
    info: Mapping[str, Any]
    tasks: Mapping[int, str]
    episodes: Sequence[Mapping[str, Any]]
    frames: Any  # pyarrow Table, sorted by index


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing (not a LeRobot dataset folder?)") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _read_parquet(paths: Iterable[Path], what: str, columns: Sequence[str] | None = None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for p in paths:
        try:
            tables.append(pq.read_table(p, columns=columns))
        except (OSError, pa.ArrowException) as exc:  # ArrowInvalid: a corrupt or truncated file
            raise ValueError(f"{p}: unreadable {what} ({exc})") from exc
    if not tables:
        raise FileNotFoundError(f"no {what} files")
    return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]


def _open_source(root: Path) -> _Source:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset folder")
    info = _read_json(root / "meta" / "info.json")
    if not isinstance(info, dict) or not isinstance(info.get("features"), dict):
        raise ValueError(f"{root / 'meta/info.json'}: no 'features' object")
    version = str(info.get("codebase_version", ""))
    if not version.startswith("v3."):
        raise ValueError(f"{root}: codebase_version {version or '(none)'}; this reads LeRobot v3 datasets "
                         "(convert v2.1 with LeRobot's convert_dataset_v21_to_v30 first)")
    features = info["features"]
    missing = [k for k in (STATE, ACTION, "task_index") if k not in features]
    if missing:
        raise ValueError(f"{root}: features {missing} missing (vigil needs {STATE}, {ACTION} and a task per frame; "
                         f"the dataset has {sorted(features)})")
    for key in ("fps", "total_episodes"):
        if not isinstance(info.get(key), int | float) or info[key] <= 0:
            raise ValueError(f"{root / 'meta/info.json'}: {key} must be a positive number, got {info.get(key)!r}")
    tasks_path = root / "meta" / "tasks.parquet"
    if not tasks_path.exists():
        raise FileNotFoundError(f"{tasks_path}: missing: the dataset has no task strings (task)")
    try:
        df = pd.read_parquet(tasks_path)
    except Exception as exc:  # pyarrow's and pandas' errors for a bad file
        raise ValueError(f"{tasks_path}: unreadable tasks ({exc})") from exc
    if "task_index" not in df.columns:
        raise ValueError(f"{tasks_path}: no task_index column")
    names = df["task"] if "task" in df.columns else df.index
    tasks = {int(i): str(t) for i, t in zip(df["task_index"], names)}
    ep_paths = sorted((root / "meta" / "episodes").glob("*/*.parquet"))
    if not ep_paths:
        raise FileNotFoundError(f"{root / 'meta/episodes'}: no episode metadata files")
    eps = _read_parquet(ep_paths, "episode metadata")
    need = ["episode_index", "length", "dataset_from_index", "dataset_to_index"]
    video_keys = [k for k, f in features.items() if f.get("dtype") == "video"]
    need += [f"videos/{k}/{c}" for k in video_keys for c in ("chunk_index", "file_index", "from_timestamp")]
    lost = [c for c in need if c not in eps.column_names]
    if lost:
        raise ValueError(f"{root / 'meta/episodes'}: columns {lost} missing")
    keep = need + (["tasks"] if "tasks" in eps.column_names else [])
    episodes = sorted(eps.select(keep).to_pylist(), key=lambda r: r["episode_index"])
    data_paths = sorted((root / "data").glob("*/*.parquet"))
    if not data_paths:
        raise FileNotFoundError(f"{root / 'data'}: no data files")
    columns = [k for k, f in features.items() if f.get("dtype") != "video"]
    try:
        schema_names = pq.read_schema(data_paths[0]).names
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{data_paths[0]}: unreadable data ({exc})") from exc
    absent = [c for c in columns if c not in schema_names]
    if absent:
        raise ValueError(f"{data_paths[0]}: columns {absent} declared in meta/info.json are missing")
    frames = _read_parquet(data_paths, "data", columns)
    frames = frames.sort_by("index") if "index" in frames.column_names else frames
    return _Source(root, info, tasks, episodes, frames)


def _column(table, key: str, feature: Mapping[str, Any]) -> np.ndarray:
    """A data column as (rows, *shape) numpy, checked against the feature's declared shape."""
    import pyarrow as pa

    col = table.column(key).combine_chunks()
    shape = tuple(int(s) for s in feature["shape"])
    dtype = np.dtype(feature["dtype"]) if feature["dtype"] not in ("image", "video", "string") else None
    if feature["dtype"] == "image":
        return _decode_images(col, key, shape, feature.get("names"))
    if pa.types.is_fixed_size_list(col.type):
        if col.type.list_size != math.prod(shape):
            raise ValueError(f"{key}: rows of {col.type.list_size} values, meta/info.json declares shape "
                             f"{list(shape)}")
    elif pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        if not np.all(lengths == math.prod(shape)):
            raise ValueError(f"{key}: rows of {sorted(set(lengths.tolist()))} values, meta/info.json declares "
                             f"shape {list(shape)}")
    if pa.types.is_fixed_size_list(col.type) or pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        if col.null_count:
            raise ValueError(f"{key}: {col.null_count} missing rows")
        values = col.flatten().to_numpy(zero_copy_only=False)
        return values.astype(dtype, copy=False).reshape(len(col), *shape)
    if shape != (1,):
        raise ValueError(f"{key}: a single value per row, meta/info.json declares shape {list(shape)}")
    if col.null_count:
        raise ValueError(f"{key}: {col.null_count} missing values")
    return col.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def _decode_images(col, key: str, shape: tuple[int, ...], names: Any) -> np.ndarray:
    """An `image` feature: PNG (or JPEG) bytes in the parquet, decoded to (rows, H, W, 3) uint8."""
    import io

    from PIL import Image

    out = []
    for i, cell in enumerate(col.to_pylist()):
        data = (cell or {}).get("bytes")
        if not data:
            raise ValueError(f"{key}: row {i} has no embedded image bytes")
        with Image.open(io.BytesIO(data)) as im:
            out.append(np.asarray(im.convert("RGB")))
    arr = np.stack(out)
    _check_image_shape(arr, key, shape, names)
    return arr


def _check_image_shape(arr: np.ndarray, key: str, shape: tuple[int, ...], names: Any) -> None:
    hwc = shape if not (isinstance(names, list) and names[:1] == ["channels"]) else (*shape[1:], shape[0])
    if arr.shape[1:] != tuple(hwc):
        raise ValueError(f"{key}: frames of {arr.shape[1:]}, meta/info.json declares {list(shape)} ({names})")


def _decode_video(path: Path, timestamps: np.ndarray, key: str, shape: tuple[int, ...], names: Any) -> np.ndarray:
    """The frames of `path` at `timestamps` (seconds into the file), each within TOLERANCE_S, as (n, H, W, 3)."""
    import av

    if not path.exists():
        raise FileNotFoundError(f"{path}: missing video for {key}")
    start, stop = float(timestamps.min()), float(timestamps.max())
    got_t: list[float] = []
    got: list[np.ndarray] = []
    try:
        with av.open(str(path)) as c:
            s = c.streams.video[0]
            c.seek(max(0, int(math.floor((start - 1.0) / float(s.time_base)))), stream=s, backward=True)
            for frame in c.decode(s):
                t = float(frame.pts * s.time_base) if frame.pts is not None else float(frame.time)
                if t < start - TOLERANCE_S:
                    continue
                if t > stop + TOLERANCE_S:
                    break
                got_t.append(t)
                got.append(frame.to_ndarray(format="rgb24"))
    except av.error.FFmpegError as exc:
        raise ValueError(f"{path}: unreadable video for {key} ({exc})") from exc
    times = np.asarray(got_t)
    out = []
    for ts in timestamps:
        j = int(np.argmin(np.abs(times - ts))) if times.size else -1
        if j < 0 or abs(times[j] - ts) > TOLERANCE_S:
            raise ValueError(f"{path}: no frame of {key} at {ts:.6f} s (tolerance {TOLERANCE_S} s)")
        out.append(got[j])
    arr = np.stack(out)
    _check_image_shape(arr, key, shape, names)
    return arr


def _read_sidecar(src: _Source) -> list[dict[str, Any]] | None:
    path = src.root / SIDECAR
    if not path.exists():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    try:
        recs = [json.loads(ln) for ln in lines]
    except ValueError as exc:
        raise ValueError(f"{path}: bad line ({exc})") from exc
    if [r.get("episode_index") for r in recs] != [e["episode_index"] for e in src.episodes]:
        raise ValueError(f"{path}: its episodes {[r.get('episode_index') for r in recs]} are not the dataset's "
                         f"{[e['episode_index'] for e in src.episodes]} (edited by another tool? delete it to "
                         "import as a foreign dataset)")
    for r, e in zip(recs, src.episodes):
        if r.get("length") != e["length"]:
            raise ValueError(f"{path}: episode {e['episode_index']} has {e['length']} frames, the sidecar says "
                             f"{r.get('length')}")
    return recs


def import_lerobot(dataset: str | Path, out: str | Path, assume_success: bool = False,
                   log: Callable[[str], None] = lambda line: None) -> ImportSummary:
    """Read LeRobot v3 dataset DATASET (vigil's export or anyone's) into vigil dataset OUT (a new folder; a
    failed import leaves none). Features map by name: observation.state -> state, observation.image -> image,
    observation.images.<cam> -> image_<cam>, other observation.<x> -> x; action; next.reward and next.success
    when present. Without
    next.success an episode counts as failed, or, with `assume_success`, as succeeded at its last step."""
    root = Path(dataset)
    src = _open_source(root)
    features = src.info["features"]
    fps = float(src.info["fps"])
    sidecar = _read_sidecar(src)
    obs_keys = [k for k in features if k.startswith("observation.")]
    names = {k: vigil_name(k) for k in obs_keys}
    if len(set(names.values())) != len(names):
        raise ValueError(f"{root}: observation features {obs_keys} map to clashing vigil names {names}")
    ignored = sorted(k for k in features if k not in obs_keys and k not in (ACTION, REWARD, SUCCESS, DONE, TERMINAL)
                     and k not in INDEX_FEATURES)
    if ignored:
        log(f"features not imported (vigil has no place for them): {ignored}")
    cols = {k: _column(src.frames, k, f) for k, f in features.items()
            if f.get("dtype") != "video" and k in src.frames.column_names}
    out = Path(out)
    existed = _new_folder(out, "import")
    writer = DemoWriter(out)
    try:
        return _import(src, out, writer, features, cols, obs_keys, names, sidecar, fps, assume_success, log)
    except BaseException:
        _clean(out, existed)
        raise


def _import(src: _Source, out: Path, writer: DemoWriter, features: Mapping[str, Any], cols: Mapping[str, np.ndarray],
            obs_keys: Sequence[str], names: Mapping[str, str], sidecar: list[dict[str, Any]] | None, fps: float,
            assume_success: bool, log: Callable[[str], None]) -> ImportSummary:
    root = src.root
    ep_of = cols.get("episode_index")
    ids: list[str] = []
    steps = 0
    for n, ep in enumerate(src.episodes):
        e_idx, lo, hi = int(ep["episode_index"]), int(ep["dataset_from_index"]), int(ep["dataset_to_index"])
        if hi - lo != int(ep["length"]) or lo < 0 or hi > src.frames.num_rows:
            raise ValueError(f"{root}: episode {e_idx} spans frames [{lo}, {hi}) of {src.frames.num_rows}, length "
                             f"{ep['length']}")
        if ep_of is not None and not np.all(ep_of[lo:hi] == e_idx):
            raise ValueError(f"{root}: frames [{lo}, {hi}) are not all of episode {e_idx} (episode_index)")
        rows = slice(lo, hi)
        task_ids = sorted(set(cols["task_index"][rows].tolist()))
        if len(task_ids) != 1:
            raise ValueError(f"{root}: episode {e_idx} has {len(task_ids)} tasks {task_ids}; a vigil episode has one "
                             "instruction")
        if task_ids[0] not in src.tasks:
            raise ValueError(f"{root}: episode {e_idx}: task_index {task_ids[0]} is not in meta/tasks.parquet")
        instruction = src.tasks[task_ids[0]]
        obs: dict[str, np.ndarray] = {}
        for k in obs_keys:
            f = features[k]
            if f["dtype"] == "video":
                file = src.root / str(src.info["video_path"]).format(
                    video_key=k, chunk_index=int(ep[f"videos/{k}/chunk_index"]),
                    file_index=int(ep[f"videos/{k}/file_index"]))
                ts = float(ep[f"videos/{k}/from_timestamp"]) + (
                    cols["timestamp"][rows].astype(np.float64) if "timestamp" in cols
                    else np.arange(hi - lo) / fps)
                obs[names[k]] = _decode_video(file, ts, k, tuple(f["shape"]), f.get("names"))
            else:
                obs[names[k]] = cols[k][rows]
        action = cols[ACTION][rows].astype(np.float32, copy=False)
        reward = cols[REWARD][rows].astype(np.float32) if REWARD in cols else np.zeros(hi - lo, np.float32)
        success = cols[SUCCESS][rows].astype(bool) if SUCCESS in cols else None
        if TERMINAL in cols:
            flags = cols[TERMINAL][rows].astype(bool)
            if not flags[-1] or flags[:-1].any():
                raise ValueError(f"{root}: episode {e_idx}: {TERMINAL} must be set on its last frame only")
            T = hi - lo - 1
            action, reward = action[:T], reward[:T]
            success = success[:T] if success is not None else None
            final = "recorded"
        else:
            T = hi - lo
            obs = {k: np.concatenate([v, v[-1:]]) for k, v in obs.items()}
            final = "repeated"
        if success is None:
            success = np.zeros(T, bool)
            if assume_success and T:
                success[-1] = True
        if sidecar is not None:
            rec = EpisodeInfo.from_json(sidecar[n]["record"])
            if rec.instruction != instruction:
                raise ValueError(f"{root / SIDECAR}: episode {e_idx}'s instruction {rec.instruction!r} is not its "
                                 f"task string {instruction!r}")
            if set(rec.observations) != set(obs):
                raise ValueError(f"{root / SIDECAR}: episode {e_idx} records observations {sorted(rec.observations)}, "
                                 f"the dataset has {sorted(obs)}")
            obs = {k: obs[k].astype(rec.observations[k]["dtype"], copy=False) for k in rec.observations}
            episode = Episode(task=rec.task, instruction=rec.instruction, seed=rec.seed, observations=obs,
                              actions=np.ascontiguousarray(action), rewards=reward, success=success,
                              source=rec.source, meta=dict(rec.meta))
            episode_id, created = rec.id, rec.created
        else:
            meta = {"control_rate_hz": fps, "lerobot": {
                "dataset": str(root.resolve()), "episode_index": e_idx, "robot_type": src.info.get("robot_type"),
                "final_observation": final, "rewards": REWARD if REWARD in cols else "absent",
                "success": SUCCESS if SUCCESS in cols else ("assumed" if assume_success else "absent")}}
            episode = Episode(task=task_name(instruction), instruction=instruction, seed=None, observations=obs,
                              actions=np.ascontiguousarray(action), rewards=reward, success=success,
                              source="lerobot", meta=meta)
            episode_id, created = None, None
        _check_metaworld(episode, e_idx)
        ids.append(writer.add(episode, episode_id=episode_id, created=created))
        steps += T
        log(f"episode {e_idx}: {ids[-1]} ({T} steps)")
    return ImportSummary(str(out), len(ids), steps, tuple(ids), sidecar is not None)


def _check_metaworld(episode: Episode, e_idx: int) -> None:
    """A Meta-World task's episode must fit the Meta-World policies: 39-d state, 4-d action."""
    from vigil.sim.metaworld_env import ALL_INSTRUCTIONS

    if episode.task not in ALL_INSTRUCTIONS:
        return
    got = {STATE: episode.observations["state"].shape[1:], ACTION: episode.actions.shape[1:]}
    for key, dim in METAWORLD_DIMS.items():
        if got[key] != (dim,):
            raise ValueError(f"episode {e_idx} ({episode.task}): {key} has shape {list(got[key])}, a Meta-World "
                             f"task needs [{dim}]")


def _new_folder(out: Path, what: str) -> bool:
    """Check that `out` is absent or an empty folder; returns whether it existed (an empty folder)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder ({what} writes a new dataset)")
    return out.exists()


def _clean(out: Path, existed: bool) -> None:
    """Undo a failed export or import: remove what it wrote (the folder too if it made it)."""
    if existed:
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    else:
        shutil.rmtree(out, ignore_errors=True)
