"""`vigil serve --execution async` over real sockets: a real runtime process, robots in the test process.

The chunked test bundle (tests/conftest.py `chunk_bundle`: action[h] = state + h, H = 4, execute 2, 20 Hz)
says in every action which plan made it: with state[1] = 0.1 t at tick t, the action of tick t from the plan
started at tick c is 0.1 c + (t - c). Lockstep runs use a constant delay model, so where each plan is adopted
is exact (their deadline is 2 s: a lockstep tick at which a modelled plan is due waits for the worker, and on a
loaded 2-core machine that wait can pass the default 50 ms); the realtime run asserts only on what happened,
never on times.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from conftest import run_vigil, tcp_endpoint

from vigil.runtime.client import RobotLink
from vigil.wire.protocol import ArraySpec, Message

SPEC = ((ArraySpec("state", "float32", (2,)),), ArraySpec("action", "float32", (2,)))


def obs(t: int, base: float = 0.0) -> dict[str, np.ndarray]:
    return {"state": np.array([0.0, base + 0.1 * t], np.float32)}


def hello(link: RobotLink) -> dict:
    """Say hello with the chunked spec; the raw reply's keys (the client's Hello has no `execution`)."""
    link.hello(*SPEC)
    spec = {"observation": [s.to_dict() for s in SPEC[0]], "action": SPEC[1].to_dict()}
    return link.request(Message("hello", link.robot, link.next_seq(), 0, {}, {"spec": spec})).meta


def run(link: RobotLink, ticks: range, base: float = 0.0, pace_s: float = 0.0) -> list[Message]:
    replies = []
    for t in ticks:
        replies.append(link.act(obs(t, base), timeout_s=5.0))
        if pace_s:
            time.sleep(pace_s)
    return replies


def check_actions(replies: list[Message], base: float = 0.0) -> None:
    """Every action that is not the safe action came from the plan started plan_age ticks before its tick."""
    for t, r in enumerate(replies):
        assert r.kind == "act", r.meta
        if r.meta["safe"]:
            continue
        c = t - r.meta["plan_age"]
        assert 0 <= c <= t
        assert r.arrays["action"][1] == pytest.approx(base + 0.1 * c + (t - c), abs=1e-5), (t, r.meta)


@pytest.fixture
def robot():
    made = []

    def make(endpoint: str, name: str = "async-0") -> RobotLink:
        link = RobotLink(endpoint, name)
        made.append(link)
        return link

    yield make
    for link in made:
        link.close()


def test_lockstep_adoption_lines_up_with_the_delay_model(chunk_bundle, serve, robot):
    served = serve(chunk_bundle, execution="async", deadline_ms=2000, plan_delay="constant:100ms",
                   link_timeout_s=300)  # d = 2 ticks
    link = robot(served.robot_endpoint)
    assert hello(link)["execution"] == "async"
    replies = run(link, range(12))
    check_actions(replies)
    assert not any(r.meta["safe"] for r in replies)
    assert [t for t, r in enumerate(replies) if r.meta["replanned"]] == [0, 2, 4, 6, 8, 10]  # s = 2
    assert [t for t, r in enumerate(replies) if r.meta["adopted"]] == [0, 4, 6, 8, 10]  # started + d
    assert [r.meta["plan_age"] for r in replies[4:]] == [2, 3] * 4  # indices s .. s + d - 1 were committed
    assert {r.meta["delay"] for r in replies} == {2}


def test_realtime_replies_never_wait_for_a_plan(chunk_bundle, serve, robot):
    served = serve(chunk_bundle, execution="async", mode="realtime", deadline_ms=1000, plan_delay="constant:50ms",
                   link_timeout_s=300)
    link = robot(served.robot_endpoint)
    link.hello(*SPEC)
    replies = run(link, range(16), pace_s=0.05)
    assert len(replies) == 16 and all(r.kind == "act" for r in replies)  # every observation answered
    check_actions(replies)
    replanned = [t for t, r in enumerate(replies) if r.meta["replanned"]]
    adopted = [t for t, r in enumerate(replies) if r.meta["adopted"]]
    assert replanned[0] == 0 and len(replanned) >= 3
    assert adopted[0] == 0 and len(adopted) >= 2
    # a plan is never used for the observation it was started with: that observation did not wait for it
    assert all(replies[t].meta["plan_age"] >= 1 for t in adopted[1:])


def test_a_stalled_planner_gives_the_safe_action_and_a_chunk_exhausted_alert(chunk_bundle, serve, robot, subscriber):
    served = serve(chunk_bundle, execution="async", deadline_ms=2000, plan_delay="constant:100000ms",
                   link_timeout_s=300, telemetry_s=0.2)
    sub = subscriber(served.operator_endpoint)
    sub.ready()
    link = robot(served.robot_endpoint, "stalled")
    link.hello(*SPEC)
    replies = run(link, range(8))
    check_actions(replies[:4])
    assert [r.meta["safe"] for r in replies] == [False] * 4 + [True] * 4  # the chunk ends; no action past it
    assert all(r.arrays["action"].tolist() == [0.0, 0.5] for r in replies[4:])  # the bundle's safe action
    assert all(any(v[0] == "chunk_exhausted" for v in r.meta["verdicts"]) for r in replies[4:])
    _, alert = sub.wait_for(lambda t, m: m.kind == "alert" and m.meta["monitor"] == "chunk_exhausted")
    assert alert.robot == "stalled"
    _, tel = sub.wait_for(lambda t, m: t == "telemetry" and "stalled" in m.meta.get("robots", {})
                          and m.meta["robots"]["stalled"].get("async", {}).get("exhausted") == 4)
    stats = tel.meta["robots"]["stalled"]
    assert stats["chunk_exhausted"] == 4 and stats["async"]["delay"] == 2  # d capped at H / 2
    alerts = [m for t, m in sub.seen if m.kind == "alert" and m.meta["monitor"] == "chunk_exhausted"]
    assert len(alerts) == 1  # rate-limited: one alert for four exhausted ticks


def test_a_reset_mid_plan_discards_the_stale_plan(chunk_bundle, serve, robot, subscriber):
    served = serve(chunk_bundle, execution="async", deadline_ms=2000, plan_delay="constant:100ms", link_timeout_s=300,
                   telemetry_s=0.2)
    sub = subscriber(served.operator_endpoint)
    link = robot(served.robot_endpoint, "resetter")
    link.hello(*SPEC)
    first = run(link, range(3))  # a plan started at tick 2 is in flight
    assert first[2].meta["replanned"]
    link.reset(seed=1)
    replies = run(link, range(8), base=5.0)  # the new episode: every action from its own plans
    check_actions(replies, base=5.0)
    assert [t for t, r in enumerate(replies) if r.meta["adopted"]] == [0, 4, 6]
    sub.ready()
    _, tel = sub.wait_for(lambda t, m: t == "telemetry" and "resetter" in m.meta.get("robots", {}))
    assert tel.meta["robots"]["resetter"]["async"]["plans_discarded"] == 1


def test_a_hot_swap_takes_effect_at_the_next_plan_started(chunk_bundle, serve, robot, tmp_path):
    from vigil.policies.manifest import read_manifest, write_bundle

    d = json.loads((chunk_bundle / "manifest.json").read_text())
    d.update(name="chunked-async-v2")
    other = tmp_path / "chunked-async-v2"
    write_bundle(other, (chunk_bundle / "policy.onnx").read_bytes(), d)
    new_id = read_manifest(other).policy_id
    control = tcp_endpoint()
    served = serve(chunk_bundle, execution="async", deadline_ms=2000, plan_delay="constant:100ms",
                   control_endpoint=control, link_timeout_s=300)
    link = robot(served.robot_endpoint, "swapper")
    link.hello(*SPEC)
    before = run(link, range(3))  # plans started at 0 and 2 (in flight) by the old policy
    out = run_vigil("swap", "--connect", control, "--bundle", str(other))
    assert out.returncode == 0, (out.stdout, out.stderr)
    after = run(link, range(3, 10))
    replies = before + after
    check_actions(replies)
    old_id = before[0].meta["policy"]
    policies = [r.meta["policy"] for r in replies]
    # tick 4 adopts the plan started at 2 (old policy) and starts one with the new policy, adopted at 6
    assert policies == [old_id] * 6 + [new_id] * 4
    assert replies[6].meta["adopted"] and replies[6].meta["plan_age"] == 2


def test_a_resumed_session_drops_the_plan_in_flight(chunk_bundle, serve, robot):
    served = serve(chunk_bundle, execution="async", deadline_ms=2000, plan_delay="constant:100ms", link_timeout_s=300)
    link = robot(served.robot_endpoint, "reconnector")
    link.hello(*SPEC)
    before = run(link, range(3))  # a plan started at tick 2 is in flight
    link.reconnect()  # a new socket: the session resumes, the episode goes on
    after = run(link, range(3, 8))
    replies = before + after
    check_actions(replies)
    # tick 3 plans afresh (waiting, as an episode's first plan does); the plan of tick 2 is never adopted
    assert after[0].meta["replanned"] and after[0].meta["adopted"] and after[0].meta["plan_age"] == 0
    assert [r.meta["plan_age"] for r in after] == [0, 1, 2, 3, 2]  # tick 7: the plan of tick 5, adopted at d = 2


def test_a_duplicated_observation_is_answered_again_without_advancing_the_chunk(chunk_bundle, serve, robot):
    """A driver that retries an observation (same seq) gets the same action; the chunk's next action is kept for
    the next observation, so the run equals the run without the duplicates."""
    served = serve(chunk_bundle, execution="async", deadline_ms=2000, plan_delay="constant:100ms", link_timeout_s=300)
    ref = robot(served.robot_endpoint, "ref")
    hello(ref)
    reference = run(ref, range(10))
    assert not any(r.meta["safe"] for r in reference), [r.meta["verdicts"] for r in reference]
    link = robot(served.robot_endpoint, "dup")
    hello(link)
    replies = []
    for t in range(10):
        msg = Message("obs", link.robot, link.next_seq(), 0, obs(t))
        replies.append(link.request(msg, 5.0))
        if t in (1, 4, 5):
            again = link.request(msg, 5.0)
            assert again.seq == msg.seq
            assert again.arrays["action"].tolist() == replies[-1].arrays["action"].tolist()
    assert [r.arrays["action"].tolist() for r in replies] == [r.arrays["action"].tolist() for r in reference]
    check_actions(replies)


def test_a_lost_observation_delays_the_chunk_by_a_tick_and_skips_no_action(chunk_bundle, serve, robot):
    """An observation lost on the way never reaches the runtime: the robot applied its own fallback for that
    tick, and the next observation gets the chunk's next action (none is skipped, none is repeated)."""
    served = serve(chunk_bundle, execution="async", deadline_ms=2000, plan_delay="constant:100ms", link_timeout_s=300)
    link = robot(served.robot_endpoint)
    hello(link)
    replies = []
    for t in range(12):
        if t in (3, 7):  # lost: sent into the void (never delivered), the robot moves on
            link.next_seq()
            continue
        replies.append(link.act(obs(t), timeout_s=5.0))
    assert len(replies) == 10 and not any(r.meta["safe"] for r in replies)
    seen = [t for t in range(12) if t not in (3, 7)]  # the runtime's tick k is the robot's time seen[k]
    for k, r in enumerate(replies):  # the action of tick k is index k - c of the plan started at tick c
        c = k - r.meta["plan_age"]
        assert r.arrays["action"][1] == pytest.approx(0.1 * seen[c] + (k - c), abs=1e-5), (k, r.meta)


def test_delay_spikes_are_adopted_late_or_give_the_safe_action_never_an_action_past_the_chunk(chunk_bundle, serve,
                                                                                           robot):
    """Heavy-tailed planner delays (a spike of 10x the median, lockstep so where it lands is reproducible): every
    observation is answered; a late plan is adopted at the index of the elapsed ticks; when the chunk runs out
    before it, the safe action with a chunk_exhausted verdict; never an action a chunk does not cover."""
    served = serve(chunk_bundle, execution="async", deadline_ms=2000, plan_delay="spikes:50ms,p=0.3,x=10",
                   link_timeout_s=300)
    link = robot(served.robot_endpoint)
    hello(link)
    link.reset(seed=3)
    replies = run(link, range(40))
    assert len(replies) == 40 and all(r.kind == "act" for r in replies)
    check_actions(replies)
    safe = [r for r in replies if r.meta["safe"]]
    assert safe, "a 10x spike (500 ms = 10 ticks at 20 Hz) outlasts a 4-action chunk"
    assert all(any(v[0] == "chunk_exhausted" for v in r.meta["verdicts"]) for r in safe)
    first = replies.index(safe[0])
    assert any(not r.meta["safe"] and r.meta["adopted"] for r in replies[first:]), "plans are adopted again after it"
