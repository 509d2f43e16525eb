"""The real LeRobot side of tests/test_lerobot.py, run by `.venv-lerobot/bin/python` (Makefile): LeRobot's dataset
code needs torchvision, which cannot be installed beside the project's CPU build of torch, so it lives in an
environment of its own and this script is its only user. It imports lerobot-dataset (module `ledataset`), never
vigil.

    python tests/lerobot_loader.py JOBS.json

JOBS.json is a list of jobs:
    {"read": ROOT, "out": NPZ}    load ROOT with LeRobotDataset and save every frame (all features, images as
                                  uint8 H x W x 3, task strings) plus the episode table, tasks and stats keys
    {"write": ROOT, "source": NPZ, "camera": "video" | "image" | null, "vcodec": NAME, "success": bool}
                                  write a dataset with LeRobotDataset.create / add_frame / save_episode from the
                                  episodes in NPZ (state_<i>, image_<i>, actions_<i>, rewards_<i>, success_<i>,
                                  instruction_<i>)
"""

from __future__ import annotations

import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # everything is local: never ask the Hub

import numpy as np  # noqa: E402


def read(root: str, out: str) -> None:
    from ledataset.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset("vigil/test", root=root)
    cameras = set(ds.meta.camera_keys)
    frames: dict[str, list] = {}
    for i in range(len(ds)):
        item = ds[i]
        for key, value in item.items():
            if key in cameras:  # (3, H, W) float in [0, 1] -> (H, W, 3) uint8
                value = (value.numpy() * 255.0).round().astype(np.uint8).transpose(1, 2, 0)
            elif hasattr(value, "numpy"):
                value = value.numpy()
            frames.setdefault(key, []).append(value)
    arrays = {f"frame/{k}": np.stack(v) if k != "task" else np.array(v) for k, v in frames.items()}
    eps = ds.meta.episodes
    arrays["episodes/from"] = np.array(eps["dataset_from_index"])
    arrays["episodes/to"] = np.array(eps["dataset_to_index"])
    arrays["episodes/tasks"] = np.array([json.dumps(list(t)) for t in eps["tasks"]])
    arrays["tasks"] = np.array(list(ds.meta.tasks.index))
    stats = {k: {s: list(np.shape(v)) for s, v in st.items()} for k, st in ds.meta.stats.items()}
    arrays["meta"] = np.array(json.dumps({"fps": ds.fps, "num_episodes": ds.num_episodes, "stats": stats,
                                          "camera_keys": sorted(cameras), "video_backend": ds.video_backend,
                                          "robot_type": ds.meta.robot_type}))
    np.savez(out, **arrays)


def write(root: str, source: str, camera: str | None, vcodec: str, success: bool) -> None:
    from ledataset.datasets.lerobot_dataset import LeRobotDataset

    src = np.load(source)
    n = len([k for k in src.files if k.startswith("actions_")])
    state = src["state_0"]
    features = {"observation.state": {"dtype": "float32", "shape": (state.shape[1],), "names": None},
                "action": {"dtype": "float32", "shape": (src["actions_0"].shape[1],), "names": None},
                "next.reward": {"dtype": "float32", "shape": (1,), "names": None}}
    if success:
        features["next.success"] = {"dtype": "bool", "shape": (1,), "names": None}
    if camera:
        features["observation.images.corner"] = {"dtype": camera, "shape": tuple(src["image_0"].shape[1:]),
                                                 "names": ["height", "width", "channels"]}
    ds = LeRobotDataset.create("vigil/native", fps=80, features=features, root=root, robot_type="sawyer",
                               use_videos=camera == "video", vcodec=vcodec)
    for e in range(n):
        actions = src[f"actions_{e}"]
        for t in range(len(actions)):  # LeRobot's convention: a frame per step, no frame for the final observation
            frame = {"observation.state": src[f"state_{e}"][t], "action": actions[t],
                     "next.reward": np.array([src[f"rewards_{e}"][t]], np.float32),
                     "task": str(src[f"instruction_{e}"])}
            if success:
                frame["next.success"] = np.array([src[f"success_{e}"][t]])
            if camera:
                frame["observation.images.corner"] = src[f"image_{e}"][t]
            ds.add_frame(frame)
        ds.save_episode()
    ds.finalize()


def main() -> None:
    with open(sys.argv[1]) as f:
        jobs = json.load(f)
    for job in jobs:
        if "read" in job:
            read(job["read"], job["out"])
        else:
            write(job["write"], job["source"], job.get("camera"), job.get("vcodec", "libsvtav1"), job["success"])
        print("done", json.dumps(job), flush=True)


if __name__ == "__main__":
    main()
