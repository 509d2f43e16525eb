"""LeRobot v3 interoperability (training/lerobot.py, `vigil demos export-lerobot / import-lerobot`).

Real scripted-expert episodes with camera frames go out as a LeRobot v3 dataset and come back bit for bit. The
interoperability tests run LeRobot's own dataset code (lerobot-dataset, `LeRobotDataset`) in its environment
(`.venv-lerobot`, made by `make test-lerobot`; LeRobot needs torchvision, which cannot live beside the project's
CPU torch): it reads vigil's export and every frame is compared, and it writes a dataset that vigil imports. Where
that environment is missing they are skipped with that reason; `make test-lerobot` runs them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vigil.training.demos import DemoSet, DemoWriter, Episode, record_expert
from vigil.training.lerobot import export_lerobot, import_lerobot

pytest.importorskip("pyarrow")
pytest.importorskip("av")

ROOT = Path(__file__).resolve().parents[1]
LOADER = ROOT / "tests" / "lerobot_loader.py"
LEROBOT_PYTHON = Path(os.environ.get("VIGIL_LEROBOT_PYTHON", ROOT / ".venv-lerobot" / "bin" / "python"))
needs_lerobot = pytest.mark.skipif(not LEROBOT_PYTHON.exists(),
                                   reason=f"LeRobot's environment {LEROBOT_PYTHON} is missing: `make test-lerobot`")


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> Path:
    """Three scripted-expert episodes of two tasks with the corner camera (32 x 32), cut short to stay quick."""
    folder = tmp_path_factory.mktemp("lerobot") / "demos"
    writer = DemoWriter(folder)
    record_expert("reach-v3", 2, 0, True, writer, max_steps=60, image_size=32)
    record_expert("push-v3", 1, 5, True, writer, max_steps=40, image_size=32)
    return folder


def _episodes(folder: Path) -> list[tuple[str, Episode]]:
    ds = DemoSet(folder)
    return [(info.id, ds.load(info.id)) for info in ds.index]


def _loader(jobs: list[dict], tmp_path: Path) -> None:
    path = tmp_path / "jobs.json"
    path.write_text(json.dumps(jobs))
    r = subprocess.run([str(LEROBOT_PYTHON), str(LOADER), str(path)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr[-3000:]


def test_export_is_a_v3_dataset(demos, tmp_path):
    out = tmp_path / "lr"
    s = export_lerobot(demos, out)
    assert (s.episodes, s.tasks, s.video_keys) == (3, 2, ("observation.image",))
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 3 and info["fps"] == 80
    assert info["features"]["observation.image"]["dtype"] == "video"
    assert info["features"]["observation.state"]["shape"] == [39] and info["features"]["action"]["shape"] == [4]
    for rel in ("data/chunk-000/file-000.parquet", "meta/episodes/chunk-000/file-000.parquet", "meta/tasks.parquet",
                "meta/stats.json", "videos/observation.image/chunk-000/file-000.mp4"):
        assert (out / rel).is_file(), rel
    eps = _episodes(demos)
    assert s.frames == info["total_frames"] == sum(ep.steps + 1 for _, ep in eps)  # T + 1 frames an episode


def test_round_trip_is_exact(demos, tmp_path):
    export_lerobot(demos, tmp_path / "lr")
    s = import_lerobot(tmp_path / "lr", tmp_path / "back")
    assert s.vigil_meta and s.episodes == 3
    before, after = _episodes(demos), _episodes(tmp_path / "back")
    assert [i for i, _ in after] == [i for i, _ in before] == list(s.ids)
    for (_, a), (_, b) in zip(before, after, strict=True):
        assert (b.task, b.instruction, b.seed, b.source) == (a.task, a.instruction, a.seed, a.source)
        assert set(b.observations) == set(a.observations) == {"state", "image"}
        for name in a.observations:  # the video is lossless: camera frames come back bit for bit
            np.testing.assert_array_equal(b.observations[name], a.observations[name], err_msg=name)
        np.testing.assert_array_equal(b.actions, a.actions)
        np.testing.assert_array_equal(b.rewards, a.rewards)
        np.testing.assert_array_equal(b.success, a.success)
        assert b.meta.get("variant") == a.meta.get("variant")


def test_bad_input_is_named(demos, tmp_path):
    with pytest.raises(FileNotFoundError, match="info.json"):
        import_lerobot(demos, tmp_path / "x")  # a vigil dataset is not a LeRobot one
    assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        export_lerobot(demos, tmp_path / "full")
    assert (tmp_path / "full" / "f").read_text() == "keep me"
    r = subprocess.run([sys.executable, "-m", "vigil.runtime.cli", "demos", "import-lerobot", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "y")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("vigil demos:") and "nope: no such dataset folder" in r.stderr


@needs_lerobot
def test_lerobot_loader_reads_every_frame(demos, tmp_path):
    """LeRobotDataset (its own parquet and video decoding) reads vigil's export: every frame equals the source."""
    out = tmp_path / "lr"
    export_lerobot(demos, out)
    _loader([{"read": str(out), "out": str(tmp_path / "read.npz")}], tmp_path)
    z = np.load(tmp_path / "read.npz")
    meta = json.loads(str(z["meta"]))
    assert meta["fps"] == 80 and meta["num_episodes"] == 3 and meta["camera_keys"] == ["observation.image"]
    eps = _episodes(demos)
    start = 0
    for e, (_, ep) in enumerate(eps):
        T = ep.steps
        rows = slice(start, start + T + 1)
        assert (z["episodes/from"][e], z["episodes/to"][e]) == (start, start + T + 1)
        np.testing.assert_array_equal(z["frame/episode_index"][rows], e)
        np.testing.assert_array_equal(z["frame/frame_index"][rows], np.arange(T + 1))
        np.testing.assert_array_equal(z["frame/observation.state"][rows], ep.observations["state"])
        np.testing.assert_array_equal(z["frame/observation.image"][rows], ep.observations["image"])
        np.testing.assert_array_equal(z["frame/action"][rows][:T], ep.actions)
        np.testing.assert_array_equal(z["frame/next.reward"][rows][:T], ep.rewards)
        np.testing.assert_array_equal(z["frame/next.success"][rows][:T], ep.success)
        np.testing.assert_array_equal(z["frame/vigil.terminal"][rows], np.arange(T + 1) == T)
        assert set(z["frame/task"][rows]) == {ep.instruction}
        start += T + 1
    assert start == len(z["frame/index"])


@needs_lerobot
@pytest.mark.parametrize("camera", ["image", "video"])
def test_vigil_imports_what_lerobot_writes(demos, tmp_path, camera):
    """A dataset written by LeRobotDataset.create / add_frame / save_episode (a frame per step, no final
    observation) comes in: states, actions, rewards and success exactly; camera frames exactly as PNG images,
    and within the lossy codec's error as AV1 video."""
    eps = _episodes(demos)
    source = {}
    for e, (_, ep) in enumerate(eps):
        T = ep.steps
        source.update({f"state_{e}": ep.observations["state"][:T], f"image_{e}": ep.observations["image"][:T],
                       f"actions_{e}": ep.actions, f"rewards_{e}": ep.rewards, f"success_{e}": ep.success,
                       f"instruction_{e}": np.array(ep.instruction)})
    np.savez(tmp_path / "source.npz", **source)
    native = tmp_path / "native"
    _loader([{"write": str(native), "source": str(tmp_path / "source.npz"), "camera": camera, "success": True}],
            tmp_path)
    s = import_lerobot(native, tmp_path / "back")
    assert not s.vigil_meta and s.episodes == 3
    back = _episodes(tmp_path / "back")
    for (_, a), (_, b) in zip(eps, back, strict=True):
        T = a.steps
        assert b.steps == T and (b.task, b.instruction) == (a.task, a.instruction)
        np.testing.assert_array_equal(b.observations["state"][:T], a.observations["state"][:T])
        np.testing.assert_array_equal(b.observations["state"][T], a.observations["state"][T - 1])  # repeated
        np.testing.assert_array_equal(b.actions, a.actions)
        np.testing.assert_array_equal(b.rewards, a.rewards)
        np.testing.assert_array_equal(b.success, a.success)
        images = b.observations["image_corner"][:T].astype(int)
        if camera == "image":
            np.testing.assert_array_equal(images, a.observations["image"][:T])
        else:  # lossy: close on average, the same picture
            assert np.abs(images - a.observations["image"][:T]).mean() < 8.0
