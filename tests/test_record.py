"""Recordings (`vigil serve --record DIR`, `--foxglove-ws PORT`): a real `vigil serve` process, a simulated robot
(aircraft pitch) on a real ZeroMQ link, files read back with the `mcap` package.

What is checked: one file per robot and episode with the Foxglove schemas and topics docs/recording.md lists, one
message per tick on each per-tick topic, values equal to what the robot sent and received; rotation into parts;
a SIGKILL loses at most the chunk that was open; a full disk stops the recording with a stored alert and a
telemetry event while every tick is still answered; the live websocket advertises the topics; the configuration
and a missing extra are refused with clear messages.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import VIGIL, child_env, free_port, run_vigil, wait_until

from vigil.record.files import Layout, safe_name
from vigil.record.read import Recording, read_recording, recordings
from vigil.runtime.client import RobotLink
from vigil.runtime.store import AlertStore
from vigil.sim.envs import LinearEnv
from vigil.sim.linear import aircraft_pitch

ROBOT = "arm-1"
PER_TICK = {"observation/state": "foxglove.JointStates", "action": "foxglove.JointStates",
            "monitors": "foxglove.JointStates", "tick": "foxglove.JointStates"}
MONITORS = {"observation", "action", "saturation", "deadline"}


class Robot:
    """The simulated aircraft-pitch robot on a real link, keeping what it sent and what it got back."""

    def __init__(self, endpoint: str, robot: str = ROBOT):
        self.env = LinearEnv(aircraft_pitch(), horizon=100_000)
        self.link = RobotLink(endpoint, robot)
        self.link.hello(self.env.observation_spec, self.env.action_spec, env=self.env.name)
        self.episode: list[tuple[int, np.ndarray, np.ndarray]] = []  # (seq, state sent, action received)
        self.obs = None

    def reset(self, seed: int) -> None:
        self.obs = self.env.reset(seed=seed)
        self.link.reset(task="aircraft-pitch", seed=seed, episode=seed)
        self.episode = []

    def tick(self) -> None:
        reply = self.link.step(self.obs, 5.0)
        assert reply.fallback is None and not reply.safe, reply  # every tick answered by the policy
        self.episode.append((reply.seq, self.obs["state"].copy(), reply.action.copy()))
        self.obs = self.env.step(reply.action).obs

    def close(self) -> None:
        self.link.bye()


def positions(msg) -> np.ndarray:
    return np.array([j.position for j in msg.joints], np.float64)


def tick_seqs(rec: Recording, robot: str = ROBOT) -> list[int]:
    """The observation seq of every tick on the robot's `tick` topic."""
    return [int(next(j.position for j in t.joints if j.name == "seq")) for t in rec.topic(f"/{robot}/tick")]


def assert_ticks(rec: Recording, sent: list[tuple[int, np.ndarray, np.ndarray]], robot: str = ROBOT) -> None:
    """The file's per-tick topics hold exactly the ticks `sent`, in order, with the values sent and received."""
    prefix = f"/{robot}/"
    counts, schemas = rec.counts(), rec.schemas()
    for suffix, schema in PER_TICK.items():
        assert counts[prefix + suffix] == len(sent), (suffix, counts)
        assert schemas[prefix + suffix] == schema
    assert tick_seqs(rec, robot) == [s for s, _, _ in sent]
    for obs, action, (_, state, act) in zip(rec.topic(prefix + "observation/state"), rec.topic(prefix + "action"),
                                            sent):
        assert [j.name for j in obs.joints] == ["state[0]", "state[1]", "state[2]"]
        assert np.array_equal(positions(obs), state.astype(np.float64))  # float32 -> double is exact
        assert [j.name for j in action.joints] == ["action[0]"]
        assert np.array_equal(positions(action), act.astype(np.float64))
    monitors = rec.topic(prefix + "monitors")[0]
    assert MONITORS <= {j.name for j in monitors.joints}
    times = [m.log_time for m in rec.messages if m.topic == prefix + "tick"]
    assert times == sorted(times) and times[0] > 1.6e18  # wall-clock nanoseconds


# -- the files ------------------------------------------------------------------------------------------------


def test_each_episode_is_a_file_with_foxglove_schemas_and_every_tick_as_sent(serve, lqr_bundle, tmp_path):
    folder = tmp_path / "rec"
    served = serve(lqr_bundle, record=str(folder), deadline_ms=2000)
    robot = Robot(served.robot_endpoint)
    sent = []
    for seed, steps in ((1, 60), (2, 45)):
        robot.reset(seed)
        for _ in range(steps):
            robot.tick()
        sent.append(robot.episode)
    robot.close()
    counters = served.stop()
    assert counters["record_ticks"] == counters["ticks"] == 105
    assert counters["record_files"] == 2 and counters["record_dropped"] == 0

    files = recordings(folder)
    assert [f.name for f in files] == ["episode-00001-p001.mcap", "episode-00002-p001.mcap"]
    assert {f.parent.name for f in files} == {ROBOT}
    for path, episode, ticks in zip(files, (1, 2), sent):
        rec = read_recording(path)
        assert rec.complete and not rec.stopped  # closed with its summary
        meta = rec.metadata["vigil.episode"]
        assert meta["robot"] == ROBOT and meta["episode"] == str(episode) and meta["task"] == "aircraft-pitch"
        assert meta["policy"] == served.policy and meta["robot_episode"] == str(episode)
        assert_ticks(rec, ticks)
        events = rec.topic(f"/{ROBOT}/events")
        assert rec.schemas()[f"/{ROBOT}/events"] == "foxglove.Log"
        assert any(e.name == "reset" and f"episode {episode}" in e.message for e in events)
    first, last = (read_recording(f).topic(f"/{ROBOT}/events") for f in files)
    assert {"hello", "policy"} <= {e.name for e in first}  # what came before the first reset opens the first file
    assert {"forget", "disconnected"} <= {e.name for e in last}  # and the bye closes the last


def test_a_robot_that_connects_again_records_beside_its_first_session(serve, lqr_bundle, tmp_path):
    """A new session of the same robot id counts its episodes from 1 again: its files go to connection-02/,
    and nothing is written over (the demo's robots connect once for nominal and once for shifted episodes)."""
    folder = tmp_path / "rec"
    served = serve(lqr_bundle, record=str(folder), deadline_ms=2000)
    for seed in (1, 2):
        robot = Robot(served.robot_endpoint)
        robot.reset(seed)
        for _ in range(30):
            robot.tick()
        robot.close()
    counters = served.stop()
    assert counters.get("record_failed", 0) == 0 and counters["record_files"] == 2
    files = recordings(folder)
    run = files[-1].parents[1]  # DIR/<run>/<robot>/episode-...
    assert [f.relative_to(run).as_posix() for f in files] == [
        f"{ROBOT}/connection-02/episode-00001-p001.mcap", f"{ROBOT}/episode-00001-p001.mcap"]
    for f in files:
        assert read_recording(f).complete and len(read_recording(f).topic(f"/{ROBOT}/action")) == 30


def test_a_long_episode_goes_on_in_parts(serve, lqr_bundle, tmp_path):
    folder = tmp_path / "rec"
    served = serve(lqr_bundle, record=str(folder), record_rotate_mb=0.002, record_flush_s=0.02, deadline_ms=2000)
    robot = Robot(served.robot_endpoint)
    robot.reset(7)
    parts: list[Path] = []
    while len(parts) < 3:  # until the episode has filled two parts and started a third
        for _ in range(20):
            robot.tick()
        parts = recordings(folder)
    robot.close()
    served.stop()
    parts = recordings(folder)
    assert [p.name for p in parts] == [f"episode-00001-p{i:03d}.mcap" for i in range(1, len(parts) + 1)]
    read = [read_recording(p) for p in parts]
    assert all(r.complete for r in read)
    assert [r.metadata["vigil.episode"]["part"] for r in read] == [str(i) for i in range(1, len(parts) + 1)]
    joined = replace(read[0], messages=tuple(m for r in read for m in r.messages))
    assert_ticks(joined, robot.episode)  # every tick once, in order, across the parts


def test_sigkill_loses_at_most_the_open_chunk(serve, lqr_bundle, tmp_path):
    folder = tmp_path / "rec"
    served = serve(lqr_bundle, record=str(folder), record_flush_s=0.1, deadline_ms=2000)
    robot = Robot(served.robot_endpoint)
    robot.reset(3)
    for _ in range(150):
        robot.tick()
    # the writer flushes every 0.1 s: wait until the running file reads back with all 150 ticks...
    path = wait_until(lambda: recordings(folder))[0]
    wait_until(lambda: read_recording(path).counts().get(f"/{ROBOT}/tick", 0) >= 150)
    for _ in range(300):  # ...then 300 more as fast as the link goes, and kill the runtime right after the last
        robot.tick()
    served.kill()
    robot.link.close()

    rec = read_recording(path)
    assert not rec.complete  # no summary: the file was cut short
    counts = rec.counts()
    n = min(counts[f"/{ROBOT}/{suffix}"] for suffix in PER_TICK)
    assert 150 <= n <= 450
    # a tick's messages may straddle the chunk that was lost: at most one tick more on some topics
    assert max(counts[f"/{ROBOT}/{suffix}"] for suffix in PER_TICK) - n <= 1
    assert_ticks(first_ticks(rec, n), robot.episode[:n])  # exactly what was sent, from the first tick, no gaps


def first_ticks(rec: Recording, n: int) -> Recording:
    """`rec` with only the first `n` messages of each per-tick topic."""
    seen: dict[str, int] = {}
    kept = []
    for m in rec.messages:
        i = seen[m.topic] = seen.get(m.topic, 0) + 1
        if m.topic.removeprefix(f"/{ROBOT}/") not in PER_TICK or i <= n:
            kept.append(m)
    return replace(rec, messages=tuple(kept))


# -- a disk that fills up ---------------------------------------------------------------------------------------


@pytest.fixture(params=["tmpfs", "rlimit"])
def small_disk(request, tmp_path):
    """A recording folder that fills up after 64 KiB: a tmpfs of that size (needs root and mount), or a file-size
    limit (RLIMIT_FSIZE, SIGXFSZ ignored: writes past it fail with EFBIG) on the runtime process."""
    folder = tmp_path / "small"
    folder.mkdir()
    if request.param == "tmpfs":
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
        try:
            yield folder, sys.executable
        finally:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        return
    wrapper = tmp_path / "python-fsize"
    wrapper.write_text(f"#!{sys.executable}\nimport os, resource, signal, sys\n"
                       "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                       "resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))\n"
                       f"os.execv({sys.executable!r}, [{sys.executable!r}, *sys.argv[1:]])\n")
    wrapper.chmod(0o755)
    yield folder, str(wrapper)


def test_a_full_disk_stops_the_recording_not_the_loop(small_disk, serve, lqr_bundle, subscriber):
    folder, python = small_disk
    served = serve(lqr_bundle, record=str(folder), record_flush_s=0.02, deadline_ms=2000, python=python)
    sub = subscriber(served.operator_endpoint)
    sub.ready()
    robot = Robot(served.robot_endpoint)
    robot.reset(5)

    def record_alert(topic, msg) -> bool:
        return topic.startswith("alert.") and msg.meta.get("monitor") == "record"

    ticks = 0
    while not any(record_alert(*s) for s in sub.seen):  # every tick is answered while the disk fills up
        robot.tick()
        ticks += 1
        sub.pump(0)
        assert ticks < 200_000, "the recording never failed"
    after = 300
    for _ in range(after):  # and after the recording stopped
        robot.tick()
    event = sub.wait_for(lambda t, m: t == "telemetry" and m.meta.get("event") == "record_failed")
    robot.close()
    counters = served.stop()

    _, alert = next(s for s in sub.seen if record_alert(*s))
    assert alert.meta["severity"] == "alert" and alert.meta["id"] > 0  # a stored alert, with its id
    assert "recording stopped" in alert.meta["reason"] and "bytes free" in alert.meta["reason"]
    assert event[1].meta["values"]["folder"] == str(folder.resolve())
    assert counters["ticks"] == ticks + after and counters["record_failed"] == 1
    assert counters["record_dropped"] >= after  # the ticks after the failure are counted, not written
    assert counters.get("hook_failed", 0) == 0 and counters.get("errors", 0) == 0
    store = AlertStore(served.store, readonly=True)
    try:
        assert any(a.monitor == "record" and "recording stopped" in a.reason for a in store.since(0))
    finally:
        store.close()
    [path] = recordings(folder)
    rec = read_recording(path)  # what reached the disk before it filled reads back, from the first tick
    n = rec.counts().get(f"/{ROBOT}/tick", 0)
    assert 0 < n < ticks
    assert tick_seqs(rec) == [s for s, _, _ in robot.episode[:n]]


# -- live, and what is refused ----------------------------------------------------------------------------------


def test_foxglove_websocket_advertises_the_robot_topics(serve, lqr_bundle):
    from websockets.sync.client import connect

    port = free_port()
    served = serve(lqr_bundle, foxglove_ws=port, deadline_ms=2000)  # live only: no files
    robot = Robot(served.robot_endpoint)
    robot.reset(1)
    for _ in range(5):
        robot.tick()
    advertised: dict[str, str] = {}
    with connect(f"ws://127.0.0.1:{port}", subprotocols=["foxglove.sdk.v1"], open_timeout=10) as ws:
        info = json.loads(ws.recv(timeout=10))
        assert info["op"] == "serverInfo" and info["name"] == "vigil"
        while not {f"/{ROBOT}/{s}" for s in PER_TICK} <= set(advertised):
            msg = ws.recv(timeout=10)
            if isinstance(msg, str) and json.loads(msg)["op"] == "advertise":
                advertised.update({c["topic"]: c["schemaName"] for c in json.loads(msg)["channels"]})
    robot.close()
    counters = served.stop()
    assert {t: advertised[f"/{ROBOT}/{t}"] for t in PER_TICK} == PER_TICK
    assert counters["record_files"] == 0 and counters["record_ticks"] == 5


def test_record_folder_and_keys_are_checked(tmp_path, lqr_bundle):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = {("--record", str(blocker / "rec")): "config key 'record' must be a folder vigil can write",
             ("--record-flush-s", "0"): "config key 'record_flush_s' must be a finite number > 0",
             ("--record-rotate-mb", "-1"): "config key 'record_rotate_mb' must be a finite number > 0",
             ("--foxglove-ws", "70000"): "config key 'foxglove_ws' must be a tcp port"}
    for args, text in cases.items():
        r = run_vigil("serve", "--bundle", str(lqr_bundle), "--robot-endpoint", "tcp://127.0.0.1:0",
                      "--operator-endpoint", "tcp://127.0.0.1:0", "--store", str(tmp_path / "a.db"), *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert text in r.stderr, (args, r.stderr)


BLOCK_FOXGLOVE = """
import sys
sys.modules["foxglove"] = None  # as if vigil[record] were not installed: `import foxglove` fails
from vigil.runtime.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_record_without_the_extra_names_the_install_command(tmp_path, lqr_bundle):
    r = subprocess.run([sys.executable, "-c", BLOCK_FOXGLOVE, "serve", "--bundle", str(lqr_bundle), "--record",
                        str(tmp_path / "rec"), "--robot-endpoint", "tcp://127.0.0.1:0", "--operator-endpoint",
                        "tcp://127.0.0.1:0", "--store", str(tmp_path / "a.db")],
                       capture_output=True, text=True, timeout=120, env=child_env())
    assert r.returncode == 2, r.stderr
    assert "config key 'record' needs the recording extra" in r.stderr
    assert "pip install 'vigil[record]'" in r.stderr


def test_without_record_the_runtime_loads_no_recording_code(tmp_path, lqr_bundle):
    """The base install serves: nothing of vigil.record or foxglove is loaded unless asked for."""
    code = ("import json, sys\nfrom vigil.runtime.cli import main\nrc = main(sys.argv[1:])\n"
            "print(json.dumps({'rc': rc, 'loaded': [m for m in sys.modules if m.startswith(('vigil.record', "
            "'foxglove', 'mcap'))]}))")
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--bundle", str(lqr_bundle), "--robot-endpoint",
                             "tcp://127.0.0.1:0", "--operator-endpoint", "tcp://127.0.0.1:0", "--store",
                             str(tmp_path / "a.db")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env())
    try:
        assert json.loads(proc.stdout.readline())["vigil"] == "ready"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {"rc": 0, "loaded": []}, err


# -- names ------------------------------------------------------------------------------------------------------


def test_robot_ids_become_distinct_folder_names():
    assert safe_name("arm-1") == "arm-1"
    odd = ["a/b", "a_b", "..", "", "robot 1", ".hidden", "ü"]
    names = [safe_name(r) for r in odd]
    assert len(set(names)) == len(odd)
    assert all(n and "/" not in n and not n.startswith(".") and os.sep not in n for n in names)
    path = Layout(Path("/r"), "20260101T000000Z-1").path("a/b", 12, 3)
    assert path.parent.parent == Path("/r/20260101T000000Z-1") and path.name == "episode-00012-p003.mcap"


def test_vigil_help_lists_the_recording_options():
    r = subprocess.run([*VIGIL, "serve", "--help"], capture_output=True, text=True, timeout=60, env=child_env())
    assert r.returncode == 0
    for flag in ("--record", "--record-flush-s", "--record-rotate-mb", "--foxglove-ws"):
        assert flag in r.stdout
