"""SAVE data requests end to end: a real runtime process files them on VFD alerts (store first, then the
`request` topic, rate-limited per task), their lifecycle survives a kill -9 of the runtime, `vigil expert`
answers them with Meta-World scripted-expert demonstrations, and a teleoperation tool can use the same API.

The policy is a hand-written graph (kind gaussian, Meta-World's 39-d state, zero actions) whose `vfd` score
is 1 + |state|^2 and whose manifest's monitor.vfd alert threshold is tiny: every plan alerts, through the
same VFD monitor and request path a flow ensemble uses, without training one.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import VIGIL, child_env, graph_bundle, run_vigil, wait_until

from vigil.runtime.client import RobotLink
from vigil.runtime.requests import RequestError, RequestStore, demo_meta
from vigil.runtime.store import AlertStore
from vigil.wire.protocol import ArraySpec

THRESHOLD = 1e-6
SPEC = ((ArraySpec("state", "float32", (39,)),), ArraySpec("action", "float32", (4,), (-1.0,) * 4, (1.0,) * 4))


@pytest.fixture(scope="module")
def vfd_bundle(tmp_path_factory) -> Path:
    from onnx.helper import make_node

    folder = tmp_path_factory.mktemp("vfd") / "always-unsure"
    graph_bundle(folder, [make_node("MatMul", ["state", "W"], ["action"]),
                          make_node("ReduceSumSquare", ["state"], ["sq"], axes=[1], keepdims=0),
                          make_node("Add", ["sq", "one"], ["vfd"])],
                 obs_dim=39, act_dim=4, outputs={"action": ["batch", 4], "vfd": ["batch"]},
                 initializers={"W": np.zeros((39, 4)), "one": np.array(1.0)},
                 action={"name": "action", "dtype": "float32", "shape": [4], "low": [-1.0] * 4, "high": [1.0] * 4},
                 onnx={"inputs": {"state": "state"}, "action": "action", "scores": ["vfd"]},
                 monitor={"vfd": {"score": "vfd", "window": 1, "thresholds": {"alert": THRESHOLD}}})
    return folder


def reset_state(task: str, seed: int) -> tuple[np.ndarray, dict]:
    """The observation of Meta-World's reset(seed) for `task`, and the recipe a simulated robot sends."""
    from vigil.sim.metaworld_env import MetaWorldEnv

    env = MetaWorldEnv(task)
    try:
        return env.reset(seed=seed)["state"], env.reset_recipe(seed)
    finally:
        env.close()


def trigger(link: RobotLink, task: str | None, state: np.ndarray, **reset) -> None:
    """One episode start and one observation: the VFD alert of its plan files a request (if the task is due)."""
    info = {"task": task, **reset} if task is not None else dict(reset)
    assert link.reset(**info).kind == "reset"
    reply = link.act({"state": np.asarray(state, np.float32)}, timeout_s=10)
    assert reply.kind == "act" and ["vfd", "alert"] in [v[:2] for v in reply.meta["verdicts"]], reply.meta


def test_vfd_alert_files_a_request_stored_before_published_and_rate_limited(vfd_bundle, serve, subscriber):
    from vigil.sim.metaworld_env import INSTRUCTIONS, MetaWorldEnv
    from vigil.sim.robot import SimConfig, run_episodes

    served = serve(vfd_bundle, request_interval_s=3600, link_timeout_s=300, telemetry_s=0.05)
    sub = subscriber(served.operator_endpoint)
    sub.ready()
    checked: dict[int, bool] = {}

    def request_in_store(topic, msg) -> bool:
        """Runs as each message arrives: a published request must already be in the store."""
        if topic != "request" or msg.seq in checked:
            return False
        store = RequestStore(served.store, readonly=True)
        try:
            stored = store.get(msg.meta["id"])
        finally:
            store.close()
        np.testing.assert_array_equal(stored.observation["state"], msg.arrays["state"])
        checked[msg.seq] = stored.task == msg.meta["task"] and stored.status == "open"
        return False

    # two episodes of push-v3 and one of reach-v3, 6 steps each: every plan alerts, one request per task
    runs = [("push-v3", 7, 2), ("reach-v3", 3, 1)]
    for task, seed, episodes in runs:
        env = MetaWorldEnv(task)
        try:
            [ep.steps for ep in run_episodes(env, SimConfig(served.robot_endpoint, f"arm-{task}", episodes, 6, seed))]
        finally:
            env.close()
    sub.wait_for(lambda t, m: (request_in_store(t, m), len(checked) == 2)[1], timeout_s=20)
    assert all(checked.values()), checked

    store = RequestStore(served.store, readonly=True)
    requests = store.list()
    store.close()
    assert [r.task for r in requests] == ["push-v3", "reach-v3"]  # 18 alerting plans, 2 tasks, 2 requests
    alerts = [a for a in AlertStore(served.store, readonly=True).since(0) if a.monitor == "vfd"]
    assert alerts and all(a.severity == "alert" for a in alerts)
    for r, (task, seed, _) in zip(requests, runs):
        state, recipe = reset_state(task, seed)
        assert r.robot == f"arm-{task}" and r.instruction == INSTRUCTIONS[task] and r.status == "open"
        assert (r.episode, r.step) == (1, 0)  # the first plan of the first episode
        assert r.sim == recipe and r.sim["variant"] == seed % 50
        np.testing.assert_array_equal(r.observation["state"], state)
        assert r.score > r.threshold == THRESHOLD and r.policy.startswith("always-unsure@")
    # a telemetry message already on its way may predate the last ticks' filing (done after each reply), so
    # wait for one that has seen them all, then check the counts exactly
    telemetry = sub.wait_new(lambda t, m: t == "telemetry" and m.meta.get("requests", {}).get("limited", 0) >= 16)[1]
    assert telemetry.meta["requests"]["filed"] == 2 and telemetry.meta["requests"]["limited"] == 16

    out = run_vigil("requests", "--store", str(served.store), "--json")
    assert out.returncode == 0, out.stderr
    listed = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(x["id"], x["task"], x["state"]) for x in listed] == [(1, "push-v3", "open"), (2, "reach-v3", "open")]
    assert listed[0]["observation"] == {"state": {"dtype": "float32", "shape": [39]}}
    text = run_vigil("requests", "--store", str(served.store), "--task", "reach-v3").stdout.splitlines()
    assert len(text) == 1 and text[0].startswith("#2") and "open" in text[0]


def test_request_lifecycle_survives_a_runtime_kill_and_the_expert_answers(vfd_bundle, serve, tmp_path):
    from vigil.sim.metaworld_env import INSTRUCTIONS
    from vigil.training.demos import DemoSet, DemoWriter, Episode

    store_path = tmp_path / "shared.db"
    served = serve(vfd_bundle, store=store_path, request_interval_s=3600, link_timeout_s=300)
    link = RobotLink(served.robot_endpoint, "arm-1")
    link.hello(*SPEC)
    reach, reach_recipe = reset_state("reach-v3", 3)
    push, push_recipe = reset_state("push-v3", 12)
    trigger(link, "reach-v3", reach, instruction=INSTRUCTIONS["reach-v3"], seed=3, sim=reach_recipe)  # 1
    trigger(link, "push-v3", push, instruction=INSTRUCTIONS["push-v3"], seed=12, sim=push_recipe)  # 2
    trigger(link, "moon-v3", push, sim={**push_recipe, "task": "moon-v3"})  # 3: no expert knows this task
    trigger(link, "wipe-table", np.zeros(39))  # 4: a real robot (no simulator recipe): left for teleoperation
    link.close()
    writer = RequestStore(store_path, timeout=5.0)
    wait_until(lambda: len(writer.list()) == 4)
    crashed = writer.claim("crashed-expert", lease_s=0.5, request_id=1)
    teleop = writer.claim("teleop-1", lease_s=3600, request_id=4)
    assert crashed.status == teleop.status == "claimed"
    with pytest.raises(RequestError, match="claimed by 'teleop-1'"):
        writer.fulfil(4, "someone-else", tmp_path, "x")

    served.kill()  # kill -9: nothing is flushed at exit
    served = serve(vfd_bundle, store=store_path, request_interval_s=3600, link_timeout_s=300)
    assert [(r.id, r.status, r.claimed_by) for r in writer.list()] == [
        (1, "claimed", "crashed-expert"), (2, "open", None), (3, "open", None), (4, "claimed", "teleop-1")]
    link = RobotLink(served.robot_endpoint, "arm-2")
    link.hello(*SPEC)
    trigger(link, "wipe-table", np.ones(39))  # the restarted runtime appends: ids go on
    link.close()
    wait_until(lambda: len(writer.list()) == 5)
    assert writer.get(5).robot == "arm-2" and writer.get(5).status == "open"
    wait_until(lambda: writer.get(1).state() == "expired")  # the crashed expert's lease runs out

    demos = tmp_path / "acquired"
    out = run_vigil("expert", "--store", str(store_path), "--demos", str(demos), "--once", "--name", "sim-expert",
                    timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    answers = {a["request"]: a for a in map(json.loads, out.stdout.splitlines())}
    assert sorted(answers) == [1, 2, 3]  # only requests with a simulator recipe; 4 and 5 wait for a teleoperator
    assert answers[1]["fulfilled"] and answers[2]["fulfilled"] and not answers[3]["fulfilled"]

    r1, r2, r3 = writer.get(1), writer.get(2), writer.get(3)
    assert (r1.status, r1.resolved_by, r1.attempts) == ("fulfilled", "sim-expert", 2)
    assert r2.status == "fulfilled" and r2.dataset == str(demos.resolve())
    assert r3.status == "rejected" and "unknown task 'moon-v3'" in r3.reason
    dataset = DemoSet(r1.dataset)
    acquired = dataset.episodes(source="request")
    assert sorted(e.meta["request"] for e in acquired) == [1, 2] and all(e.success for e in acquired)
    for r, state in ((r1, reach), (r2, push)):
        episode = dataset.load(r.demo)
        assert episode.meta["request"] == r.id and episode.meta["expert"] == "scripted"
        assert episode.task == r.task and episode.seed == r.sim["seed"] and episode.meta["variant"] == r.sim["variant"]
        np.testing.assert_array_equal(episode.observations["state"][0], state)  # started from the requested state

    # the teleoperation hand-off, as docs/operator.md describes it: claim, record, fulfil
    request = writer.get(4)
    steps = 3
    episode = Episode(task=request.task, instruction="wipe the table", seed=None,
                      observations={"state": np.repeat(request.observation["state"][None], steps + 1, 0)},
                      actions=np.zeros((steps, 4), np.float32), rewards=np.zeros(steps, np.float32),
                      success=np.array([False, False, True]), source="request",
                      meta=demo_meta(request, "teleop"))
    episode_id = DemoWriter(demos).add(episode)
    done = writer.fulfil(4, "teleop-1", demos, episode_id)
    assert done.status == "fulfilled" and done.demo == episode_id
    dataset.refresh()
    assert sorted(e.meta["request"] for e in dataset.episodes(source="request")) == [1, 2, 4]
    assert [r.id for r in writer.list(status="open")] == [5]
    writer.close()


def test_expert_wakes_on_the_request_topic(vfd_bundle, serve, tmp_path):
    """`vigil expert --connect` started before any request exists answers the one filed later (its store
    polling interval is long, so it is the `request` message that wakes it; the test only waits for it)."""
    from vigil.sim.metaworld_env import INSTRUCTIONS

    served = serve(vfd_bundle, request_interval_s=3600, link_timeout_s=300)
    demos = tmp_path / "woken"
    proc = subprocess.Popen([*VIGIL, "expert", "--store", str(served.store), "--demos", str(demos), "--connect",
                             served.operator_endpoint, "--max", "1", "--poll-s", "0.5", "--timeout", "300"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        time.sleep(0.5)  # let it subscribe (a missed message only costs it one poll of the store)
        state, recipe = reset_state("reach-v3", 21)
        link = RobotLink(served.robot_endpoint, "arm-3")
        link.hello(*SPEC)
        trigger(link, "reach-v3", state, instruction=INSTRUCTIONS["reach-v3"], seed=21, sim=recipe)
        link.close()
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    [answer] = [json.loads(line) for line in out.splitlines()]
    assert answer["request"] == 1 and answer["fulfilled"]
    store = RequestStore(served.store, readonly=True)
    assert store.get(1).status == "fulfilled"
    store.close()


def test_a_locked_store_queues_the_request_and_the_rate_limit_holds(tmp_path):
    """The control loop's side in process: with the store locked by another process's transaction the request
    waits in the shared outbox (nothing published, nothing lost, the loop not blocked), and is filed by the
    retry once the lock is gone; meanwhile the task's slot is taken, other tasks are not."""
    import sqlite3

    from vigil.monitors.base import Level, Verdict
    from vigil.runtime.outbox import Outbox
    from vigil.runtime.requests import Requester

    store = RequestStore(tmp_path / "store.db")
    outbox = Outbox()
    requester = Requester(store, None, outbox, interval_s=10.0)
    verdict = Verdict("vfd", Level.ALERT, "unsure", {"vfd": 2.0, "threshold": 1.0})
    obs = {"state": np.arange(39, dtype=np.float32)}
    info = {"task": "push-v3", "instruction": "push the puck to the goal", "sim": {"env": "metaworld", "seed": 4}}
    lock = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        assert requester.request("r1", info, "p@1", 1, 5, obs, verdict, now=100.0)
        assert len(outbox.pending) == 1 and requester.filed == 0
        assert not requester.request("r1", info, "p@1", 1, 6, obs, verdict, now=105.0)  # same task: limited
        assert requester.request("r2", {"task": "reach-v3"}, "p@1", 3, 0, obs, verdict, now=105.0)
        assert len(outbox.pending) == 2 and outbox.retry() == []
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    filed = outbox.retry()
    assert [(r.id, r.task, r.step) for r in filed] == [(1, "push-v3", 5), (2, "reach-v3", 0)]
    assert requester.filed == 2 and requester.limited == 1 and not outbox.pending
    stored = store.get(1)
    assert stored.sim == info["sim"] and stored.instruction == info["instruction"] and stored.score == 2.0
    np.testing.assert_array_equal(stored.observation["state"], obs["state"])
    assert store.get(2).instruction is None and store.get(2).sim is None
    assert requester.request("r1", info, "p@1", 2, 0, obs, verdict, now=110.0)  # the interval has passed
    store.close()


def test_no_data_request_in_an_episode_whose_robot_the_dynamics_monitor_diagnosed(tmp_path):
    """Demonstrations do not fix a worn gearbox: once the dynamics monitor has said `robot` in an episode, VFD
    alerts of that episode file no request (counted); the next episode files again."""
    from collections import Counter
    from types import SimpleNamespace

    from vigil.monitors.base import Level, Verdict
    from vigil.runtime.outbox import Outbox
    from vigil.runtime.requests import Requester, RequestHook
    from vigil.runtime.session import Decision
    from vigil.wire.protocol import Message

    store = RequestStore(tmp_path / "store.db")
    counters: Counter = Counter()
    hook = RequestHook(Requester(store, None, Outbox(), interval_s=0.0), counters)
    session = SimpleNamespace(robot="arm", info={"task": "push-v3"}, episode=1, step=3, state={})
    obs = Message("obs", "arm", 3, 0, {"state": np.zeros(39, np.float32)}, {})
    vfd = Verdict("vfd", Level.ALERT, "unsure", {"vfd": 2.0, "threshold": 1.0})
    robot = Verdict("dynamics", Level.ALERT, "maintenance: ...", {"diagnosis": "robot"})
    world = Verdict("dynamics", Level.ALERT, "the world answers differently", {"diagnosis": "world"})

    def decide(*verdicts: Verdict) -> None:
        hook.on_decision(session, obs, Decision(np.zeros(4, np.float32), False, verdicts, verdicts, {}, 1, "p@1",
                                                0.0, 0.0, 0.0))

    decide(world, vfd)  # the world changed (friction, mass): the policy may well need data for it
    decide(robot)
    decide(vfd)
    assert [r.episode for r in store.list()] == [1] and counters["requests_held_maintenance"] == 1
    session.episode = 2
    decide(vfd)
    assert [r.episode for r in store.list()] == [1, 2]
    store.close()
