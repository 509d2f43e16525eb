"""Demonstration datasets: exact round trips, durability under SIGKILL, torn index lines, expert recording, and
`vigil demos record|list` as a user runs them. Real files, real Meta-World."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import child_env, run_vigil

from vigil.training.demos import INDEX, DemoSet, DemoWriter, Episode, read_index


def synthetic(task: str = "push-v3", T: int = 7, seed: int = 0, image: bool = True) -> Episode:
    rng = np.random.default_rng(seed)
    obs = {"state": rng.normal(size=(T + 1, 39)).astype(np.float32)}
    if image:
        obs["image"] = rng.integers(0, 256, (T + 1, 8, 8, 3), dtype=np.uint8)
    success = np.zeros(T, bool)
    success[T - 3:] = True
    return Episode(task=task, instruction="push the puck to the goal", seed=seed, observations=obs,
                   actions=rng.uniform(-1, 1, (T, 4)).astype(np.float32), rewards=rng.normal(size=T).astype(np.float32),
                   success=success, source="expert", meta={"variant": seed % 50})


def test_round_trip_is_exact(tmp_path):
    writer = DemoWriter(tmp_path / "ds")
    episodes = [synthetic("push-v3", 7, 0), synthetic("reach-v3", 4, 1, image=False), synthetic("push-v3", 9, 2)]
    ids = [writer.add(e) for e in episodes]
    assert len(set(ids)) == 3
    ds = DemoSet(tmp_path / "ds")
    assert [i.id for i in ds.index] == ids and len(ds) == 3
    assert ds.tasks() == ["push-v3", "reach-v3"]
    assert [i.id for i in ds.episodes("push-v3")] == [ids[0], ids[2]]
    assert [i.id for i in ds.episodes(success=False)] == []
    for episode_id, original in zip(ids, episodes):
        info = ds._by_id[episode_id]
        assert (info.task, info.seed, info.steps, info.success, info.success_step, info.source) == \
            (original.task, original.seed, original.steps, True, original.steps - 3, "expert")
        assert info.observations["state"] == {"dtype": "float32", "shape": [39]}
        assert (tmp_path / "ds" / info.file).is_file()
        loaded = ds.load(episode_id)
        assert set(loaded.observations) == set(original.observations)
        for k, v in original.observations.items():
            assert loaded.observations[k].dtype == v.dtype
            np.testing.assert_array_equal(loaded.observations[k], v)
        for name in ("actions", "rewards", "success"):
            got, want = getattr(loaded, name), getattr(original, name)
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got, want)
        assert loaded.instruction == original.instruction and loaded.meta == dict(original.meta)
        with np.load(tmp_path / "ds" / info.file, allow_pickle=False) as z:  # the file describes itself
            assert json.loads(str(z["record"]))["id"] == episode_id
    with pytest.raises(KeyError):
        ds.load("nope")


def test_bad_episodes_are_refused(tmp_path):
    writer = DemoWriter(tmp_path)
    e = synthetic()
    bad = [Episode(e.task, e.instruction, 0, {"state": e.observations["state"][:-1]}, e.actions, e.rewards, e.success),
           Episode(e.task, e.instruction, 0, e.observations, e.actions.astype(np.float64), e.rewards, e.success),
           Episode("../x", e.instruction, 0, e.observations, e.actions, e.rewards, e.success)]
    for episode in bad:
        with pytest.raises(ValueError):
            writer.add(episode)
    assert read_index(tmp_path / INDEX) == []


def test_torn_last_line_is_ignored_and_repaired_by_the_next_writer(tmp_path):
    writer = DemoWriter(tmp_path)
    first = writer.add(synthetic(seed=0))
    second = writer.add(synthetic(seed=1))
    index = tmp_path / INDEX
    whole = index.read_bytes()
    index.write_bytes(whole[:-40])  # the second line lost its end (and its newline)
    assert [i.id for i in DemoSet(tmp_path).index] == [first]
    third = DemoWriter(tmp_path).add(synthetic(seed=2))
    assert [i.id for i in DemoSet(tmp_path).index] == [first, third]  # the torn line is gone, not glued to
    assert index.read_bytes().endswith(b"\n") and second not in index.read_text()
    index.write_bytes(index.read_bytes() + b"{not json}\n" + whole.splitlines(keepends=True)[0])
    with pytest.raises(ValueError, match=f"{INDEX}:3"):  # a bad line that is not the last: an error
        DemoSet(tmp_path)


WRITER = textwrap.dedent("""
    import sys, numpy as np
    from vigil.training.demos import DemoWriter, Episode
    writer, rng, i = DemoWriter(sys.argv[1]), np.random.default_rng(0), 0
    while True:
        T = 20 + i % 30
        img = rng.integers(0, 256, (T + 1, 64, 64, 3), dtype=np.uint8)  # incompressible: slow, big writes
        ep = Episode("push-v3", "push the puck to the goal", i, {"state": np.full((T + 1, 39), i, np.float32),
                     "image": img}, np.full((T, 4), i / 1000, np.float32), np.zeros(T, np.float32), np.zeros(T, bool))
        print(writer.add(ep), flush=True)
        i += 1
""")


def test_sigkill_mid_dataset_leaves_an_index_whose_every_line_loads(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    folder = tmp_path / "ds"
    for kill_after in (3, 6):  # twice into the same folder: the second writer appends after the first one's kill
        proc = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, text=True,
                                env=child_env())
        acked = []
        try:
            while len(acked) < kill_after:
                line = proc.stdout.readline()
                assert line, f"writer exited {proc.poll()}"
                acked.append(line.strip())
            time.sleep(0.01 * kill_after)  # somewhere inside the next add()
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL
        ds = DemoSet(folder)
        ids = [i.id for i in ds.index]
        assert set(acked) <= set(ids)  # everything acknowledged is indexed
        for info in ds.index:  # and every indexed episode loads, complete
            ep = ds.load(info.id)
            assert ep.steps == info.steps and ep.observations["image"].shape == (info.steps + 1, 64, 64, 3)
            assert np.all(ep.observations["state"] == ep.seed)
    files = sorted(p.name for p in (folder / "episodes" / "push-v3").glob("*.npz"))
    assert len(files) >= len(DemoSet(folder))  # a file may lack its line (killed in between), never the reverse


def test_record_expert_keeps_every_episode(tmp_path):
    from vigil.training.demos import record_expert

    seen = []
    writer = DemoWriter(tmp_path)
    ids = record_expert("reach-v3", 2, 5, False, writer, seen.append, max_steps=30)  # 30 steps: too short to succeed
    ids += record_expert("reach-v3", 1, 0, True, writer, seen.append)
    ds = DemoSet(tmp_path)
    assert [i.id for i in ds.index] == ids and len(seen) == 3
    short = [ds._by_id[i] for i in ids[:2]]
    assert [(i.seed, i.steps, i.success, i.success_step) for i in short] == [(5, 30, False, None), (6, 30, False, None)]
    assert all(i.meta["terminated"] is False and i.meta["max_steps"] == 30 for i in short)
    full = ds.load(ids[2])
    assert full.succeeded and full.steps == full.success_step + 10 and full.meta["terminated"]
    assert full.observations["image"].shape == (full.steps + 1, 64, 64, 3)
    assert full.observations["image"].dtype == np.uint8 and full.observations["state"].dtype == np.float32
    assert np.all(np.abs(full.actions) <= 1.0)
    # what was recorded is what the environment produces: replaying the actions gives the same observations
    from vigil.sim.metaworld_env import MetaWorldEnv

    env = MetaWorldEnv("reach-v3")
    try:
        replay = [env.reset(seed=0)["state"]] + [env.step(a).obs["state"] for a in full.actions]
    finally:
        env.close()
    np.testing.assert_array_equal(np.stack(replay), full.observations["state"])


def test_vigil_demos_record_and_list(tmp_path):
    out = tmp_path / "demos"
    r = run_vigil("demos", "record", "--tasks", "reach-v3,push-v3", "--episodes", "2", "--seed", "3",
                  "--out", str(out), timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    table = r.stdout.splitlines()
    assert any(ln.split()[:4] == ["reach-v3", "2", "2", "100%"] for ln in table), r.stdout
    assert any(ln.split()[:4] == ["push-v3", "2", "2", "100%"] for ln in table), r.stdout
    ds = DemoSet(out)
    assert ds.tasks() == ["push-v3", "reach-v3"]
    assert sorted(i.seed for i in ds.episodes("push-v3")) == [3, 4]
    for info in ds.index:
        ep = ds.load(info.id)
        assert set(ep.observations) == {"state"} and ep.observations["state"].shape == (ep.steps + 1, 39)
    listed = run_vigil("demos", "list", str(out), "--json")
    assert listed.returncode == 0, listed.stderr
    assert {t: s["episodes"] for t, s in json.loads(listed.stdout).items()} == {"push-v3": 2, "reach-v3": 2}
    bad = run_vigil("demos", "record", "--tasks", "reach-v9", "--out", str(out))
    assert bad.returncode == 2 and "unknown task" in bad.stderr and "Traceback" not in bad.stderr
    missing = run_vigil("demos", "list", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "no such dataset" in missing.stderr
