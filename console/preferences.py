"""What the Preferences panel shows of a query: its two attempts, read from the pool on this computer.

A query names a pool folder and two episode ids (runtime/preferences.py). For each attempt the page gets its
task, steps, success and return (the sum of its rewards), and what to look at: a strip of camera frames when
the episode recorded an `image` observation (encoded here as PNG with zlib and struct, no imaging library), and
otherwise the hand position over time (state[:, :3], Meta-World's end effector), which the page draws as
SVG. A missing pool, a missing episode or a file that cannot be read is a message in the panel, never an
error of the console: the store may name a pool that has since moved.

Blocking (SQLite, episode files): run on a worker thread.
"""

from __future__ import annotations

import base64
import sqlite3
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from vigil.runtime.preferences import PreferenceError, PreferenceRecord, PreferenceStore

FRAMES = 6  # frames per attempt in the strip
POINTS = 200  # hand positions per attempt at most (the page draws a line, not every step)


def png(image: np.ndarray) -> bytes:
    """An (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8 image as PNG bytes: 8 bits per channel, no
    interlacing, every row with filter type 0."""
    a = np.ascontiguousarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.dtype != np.uint8 or a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)) or 0 in a.shape:
        raise ValueError(f"a PNG frame must be a non-empty (H, W[, 1|3|4]) uint8 array, got {a.shape} {a.dtype}")
    h, w = a.shape[:2]
    color = {2: 0, 3: {3: 2, 4: 6}[a.shape[-1]]}[a.ndim]  # grey, RGB, RGBA
    rows = np.concatenate([np.zeros((h, 1), np.uint8), a.reshape(h, -1)], axis=1)  # a filter byte per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b""))


def spread(n: int, k: int) -> np.ndarray:
    """At most k indices into range(n), evenly spaced, first and last included."""
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int)) if n > 0 else np.zeros(0, int)


def attempt(pool: Any, episode_id: str) -> dict[str, Any]:
    """One attempt as the panel shows it; `pool` is an open DemoSet (training/demos.py)."""
    try:
        ep = pool.load(episode_id)
    except KeyError as exc:
        return {"id": episode_id, "error": f"episode {exc.args[0]}"}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        return {"id": episode_id, "error": f"episode {episode_id} of {pool.folder} cannot be read: {exc}"}
    out: dict[str, Any] = {"id": episode_id, "task": ep.task, "steps": ep.steps, "success": ep.succeeded,
                           "success_step": ep.success_step, "return": float(np.sum(ep.rewards, dtype=np.float64)),
                           "frames": [], "frame_steps": [], "hand": None, "hand_steps": [], "note": ""}
    image = ep.observations.get("image")
    if image is not None and image.dtype == np.uint8 and image.ndim in (3, 4):
        steps = spread(len(image), FRAMES)
        out["frames"] = ["data:image/png;base64," + base64.b64encode(png(image[i])).decode() for i in steps]
        out["frame_steps"] = steps.tolist()
        return out
    state = ep.observations.get("state")
    if state is None or state.ndim != 2 or state.shape[1] < 1:
        out["note"] = "no image and no state observation: nothing to draw"
        return out
    steps = spread(len(state), POINTS)
    out["hand"] = np.round(state[steps, :3].astype(np.float64), 4).tolist()
    out["hand_steps"] = steps.tolist()
    return out


def attempts(r: PreferenceRecord) -> dict[str, dict[str, Any]]:
    """{"a": ..., "b": ...} for query `r`; an attempt that cannot be read has an `error` instead."""
    from vigil.training.demos import DemoSet  # numpy and the standard library only

    try:
        pool = DemoSet(r.pool)
    except (OSError, ValueError) as exc:
        return {side: {"id": episode, "error": f"pool {exc}"}
                for side, episode in (("a", r.episode_a), ("b", r.episode_b))}
    return {"a": attempt(pool, r.episode_a), "b": attempt(pool, r.episode_b)}


def view(store_path: str, query_id: int) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) for GET /api/preferences/{id}: the query as stored and its two attempts."""
    if not Path(store_path).exists():
        return 503, {"ok": False, "error": f"store {store_path} does not exist (yet)"}
    try:
        store = PreferenceStore(store_path, readonly=True)
    except FileNotFoundError as exc:
        return 404, {"ok": False, "error": str(exc)}
    except sqlite3.Error as exc:
        return 503, {"ok": False, "error": f"store {store_path} cannot be read ({exc}); try again"}
    try:
        store.db.execute("PRAGMA busy_timeout = 2000")
        r = store.get(query_id)
    except PreferenceError as exc:
        return 404, {"ok": False, "error": str(exc)}
    except sqlite3.Error as exc:
        return 503, {"ok": False, "error": f"store {store_path} is busy ({exc}); try again"}
    finally:
        store.close()
    return 200, {"ok": True, "preference": r.to_json(), "attempts": attempts(r)}
