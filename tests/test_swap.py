"""Hot swap under load: a robot in lockstep keeps stepping while `vigil swap` makes the runtime load another
bundle; every observation gets an action, none is the runtime's safe action, no deadline is missed, the swap
is announced (stream and store), and the actions after it come from the new bundle. An incompatible bundle is
refused and the old one keeps serving. Real processes, sockets and store; no timing assertions."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_lqr_action, gain_of, pitch_specs, run_vigil, tcp_endpoint, wait_until

from vigil.runtime.client import RobotLink
from vigil.runtime.store import AlertStore


@pytest.fixture(scope="module")
def half_gain_bundle(lqr_bundle, tmp_path_factory) -> Path:
    """The aircraft-pitch LQR bundle with half the gain: same spec, rate, bounds and safe action."""
    from vigil.policies.manifest import read_manifest
    from vigil.training.export import export_linear_gain

    m = read_manifest(lqr_bundle)
    folder = tmp_path_factory.mktemp("swap") / "pitch-half-gain"
    export_linear_gain(folder, "pitch-half-gain", gain_of(lqr_bundle) / 2, m.control_rate_hz,
                       state_low=m.observation[0].low, state_high=m.observation[0].high)
    return folder


@pytest.fixture(scope="module")
def uav_bundle(tmp_path_factory) -> Path:
    from vigil.training.lqr import export_lqr

    folder = tmp_path_factory.mktemp("swap") / "uav"
    export_lqr("uav-2d", folder)
    return folder


class Stepper(threading.Thread):
    """A lockstep robot on its own thread (its socket lives and dies there): obs, act, repeat, until told to
    stop; every reply is kept with the observation it answered."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.replies: list[tuple[np.ndarray, object]] = []
        self.stop = threading.Event()
        self.failure: BaseException | None = None

    def run(self) -> None:
        link = RobotLink(self.endpoint, "stepper")
        rng = np.random.default_rng(0)
        try:
            link.hello(*pitch_specs())
            while not self.stop.is_set():
                x = (rng.standard_normal(3) * 0.2).astype(np.float32)
                self.replies.append((x, link.act({"state": x}, timeout_s=30)))
        except BaseException as exc:  # surfaced by the test
            self.failure = exc
        finally:
            link.close()

    def policies(self) -> list[str]:
        return [r.meta.get("policy") for _, r in list(self.replies)]


def test_hot_swap_under_load_misses_no_tick(lqr_bundle, half_gain_bundle, uav_bundle, serve, subscriber, links):
    control = tcp_endpoint()
    served = serve(lqr_bundle, control_endpoint=control, link_timeout_s=300, telemetry_s=0.1)
    sub = subscriber(served.operator_endpoint)
    sub.ready()
    old_id, new_id = (json.loads((b / "manifest.json").read_text()) for b in (lqr_bundle, half_gain_bundle))
    old_id, new_id = (f"{m['name']}@{m['onnx']['sha256'][:12]}" for m in (old_id, new_id))

    robot = Stepper(served.robot_endpoint)
    robot.start()
    try:
        wait_until(lambda: len(robot.replies) >= 20 or robot.failure, timeout_s=60)
        out = run_vigil("swap", "--connect", control, "--bundle", str(half_gain_bundle))
        assert out.returncode == 0, (out.stdout, out.stderr)
        answer = json.loads(out.stdout)
        assert answer["ok"] and answer["previous"] == old_id and answer["policy"] == new_id
        before = len(robot.replies)
        wait_until(lambda: robot.policies().count(new_id) >= 50 or robot.failure, timeout_s=60)
    finally:
        robot.stop.set()
        robot.join(timeout=60)
    assert robot.failure is None, robot.failure
    assert before > 20  # the robot kept stepping while the bundle loaded

    policies = robot.policies()
    switch = policies.index(new_id)
    assert policies[:switch] == [old_id] * switch and policies[switch:] == [new_id] * (len(policies) - switch)
    K_old, K_new = gain_of(lqr_bundle), gain_of(half_gain_bundle)
    for i, (x, reply) in enumerate(robot.replies):
        assert reply.kind == "act", reply.meta  # every observation got an action ...
        assert reply.meta["safe"] is False and reply.meta["verdicts"] == [], reply.meta  # ... the policy's, in time
        assert_lqr_action(reply.arrays["action"], K_new if i >= switch else K_old, x)

    _, event = sub.wait_for(lambda t, m: t == "telemetry" and m.meta.get("event") == "swapped")
    assert event.meta["values"]["policy"] == new_id and event.meta["values"]["previous"] == old_id
    topic, alert = sub.wait_for(lambda t, m: m.kind == "alert" and m.meta["monitor"] == "swap")
    assert topic == "alert.warn" and new_id in alert.meta["reason"]
    assert links(served.robot_endpoint, "late-comer").hello_reply.policy == new_id  # new robots get the new one

    # an incompatible bundle is refused; the current one keeps serving
    out = run_vigil("swap", "--connect", control, "--bundle", str(uav_bundle))
    assert out.returncode == 1, (out.stdout, out.stderr)
    refused = json.loads(out.stdout)
    assert not refused["ok"] and "observations differ" in refused["reason"] and refused["policy"] == new_id
    out = run_vigil("swap", "--connect", control, "--bundle", str(uav_bundle.parent / "no-such-bundle"))
    assert out.returncode == 1 and "manifest.json" in json.loads(out.stdout)["reason"]
    link = links(served.robot_endpoint, "after-refusal")
    x = np.array([0.1, -0.2, 0.05], np.float32)
    reply = link.act({"state": x})
    assert reply.meta["policy"] == new_id
    assert_lqr_action(reply.arrays["action"], K_new, x)

    counters = served.stop()
    assert counters["swaps"] == 1 and counters["swaps_refused"] == 2
    stored = AlertStore(served.store, readonly=True).since(0)
    assert not [a for a in stored if a.monitor == "deadline"]
    assert [(a.monitor, a.severity) for a in stored] == [("swap", "warn"), ("swap", "alert"), ("swap", "alert")]


def test_chunked_robot_finishes_its_chunk_before_switching(chunk_bundle, serve, tmp_path):
    """A chunked policy: the swap takes effect at the robot's next plan boundary, never inside a chunk."""
    from vigil.policies.manifest import read_manifest, write_bundle

    # the same graph, renamed (another policy id), and one more action executed per chunk
    d = json.loads((chunk_bundle / "manifest.json").read_text())
    d.update(name="chunked-v2", chunk={"length": 4, "execute": 4})
    other = tmp_path / "chunked-v2"
    write_bundle(other, (chunk_bundle / "policy.onnx").read_bytes(), d)
    new_id = read_manifest(other).policy_id
    control = tcp_endpoint()
    served = serve(chunk_bundle, control_endpoint=control, link_timeout_s=300)
    link = RobotLink(served.robot_endpoint, "chunky")
    try:
        from vigil.wire.protocol import ArraySpec

        link.hello((ArraySpec("state", "float32", (2,)),), ArraySpec("action", "float32", (2,)))
        x = np.array([0.1, 0.2], np.float32)
        first = link.act({"state": x})  # plan 1, action 1 of 2: the chunk has one action left
        assert first.meta["plan"] == 1
        out = run_vigil("swap", "--connect", control, "--bundle", str(other))
        assert out.returncode == 0, (out.stdout, out.stderr)
        replies = [link.act({"state": x}) for _ in range(6)]
    finally:
        link.close()
    assert replies[0].meta["plan"] == 1 and replies[0].meta["policy"] != new_id  # the old chunk is finished
    assert [r.meta["policy"] for r in replies[1:]] == [new_id] * 5
    assert [r.meta["plan"] for r in replies[1:]] == [2, 2, 2, 2, 3]  # the new bundle executes 4 per chunk


def test_swap_between_flow_ensembles_keeps_the_episode_going(encoder_bundle, serve, links, tmp_path):
    """A language-conditioned flow ensemble swapped for another (a SAVE round's successor): the robot's
    episode goes on without a new reset, the new bundle plans with the instruction embedded by its own
    encoder, and its VFD score reaches the monitors."""
    import torch

    from vigil.policies.manifest import read_manifest
    from vigil.training.flow import Ensemble, FlowConfig, plan
    from vigil.training.flow_export import export_flow_ensemble
    from vigil.wire.protocol import ArraySpec

    cfg = FlowConfig(hidden=16, depth=2, members=2)
    ids, ensembles = [], []
    for seed in (0, 1):
        ens = Ensemble(FlowConfig(**{**cfg.__dict__, "seed": seed})).eval()
        export_flow_ensemble(tmp_path / f"flow-{seed}", ens, ens.cfg, encoder_bundle, f"flow-{seed}")
        ids.append(read_manifest(tmp_path / f"flow-{seed}").policy_id)
        ensembles.append(ens)
    control = tcp_endpoint()
    # a generous deadline: this test is about what is served, not how fast (a loaded CI machine is slow)
    served = serve(tmp_path / "flow-0", control_endpoint=control, link_timeout_s=300, deadline_ms=10000)
    link = links(served.robot_endpoint, "arm", hello=False)
    link.hello((ArraySpec("state", "float32", (39,)),), ArraySpec("action", "float32", (4,)))
    instruction = "push the puck to the goal"
    assert link.reset(instruction=instruction, seed=3).kind == "reset"
    x = np.linspace(-0.5, 0.5, 39).astype(np.float32)
    before = [link.act({"state": x}, timeout_s=30) for _ in range(8)]
    out = run_vigil("swap", "--connect", control, "--bundle", str(tmp_path / "flow-1"))
    assert out.returncode == 0 and json.loads(out.stdout)["policy"] == ids[1], (out.stdout, out.stderr)
    after = [link.act({"state": x}, timeout_s=30) for _ in range(12)]  # no reset in between
    for r in before + after:
        assert r.kind == "act" and r.meta["safe"] is False and r.meta["scores"]["vfd"] > 0, r.meta
    assert {r.meta["policy"] for r in before} == {ids[0]}
    switched = [r for r in after if r.meta["policy"] == ids[1]]
    assert switched and after[-1].meta["policy"] == ids[1]  # at the next plan boundary, then for good

    # the new plans are the new ensemble's: same instruction embedding, same noise stream, its VFD
    from vigil.policies.instructions import InstructionEncoder

    instr = torch.as_tensor(InstructionEncoder.load(tmp_path / "flow-1" / "encoder").embed([instruction]))
    scores = [r.meta["scores"]["vfd"] for r in switched]
    rng = np.random.default_rng(3)  # the robot's plan noise, seeded by reset: replay every plan of the episode
    plans = before[-1].meta["plan"] + len({r.meta["plan"] for r in after})
    expected = []
    for _ in range(plans):
        noise = torch.from_numpy(rng.standard_normal((1, cfg.vfd_samples, cfg.horizon, cfg.action_dim),
                                                     dtype=np.float32)).transpose(0, 1)
        expected.append(float(plan(ensembles[1], torch.as_tensor(x)[None], instr, noise)[1][0]))
    for score in scores:  # each served score is one of the new ensemble's plans (float32 graph vs torch)
        assert min(abs(score - e) / e for e in expected) < 1e-4, (score, expected)
    served.stop()


def test_swap_shares_an_identical_encoder_and_loads_a_different_one(encoder_bundle, tmp_path):
    """A SAVE round's bundle carries the same encoder as its parent: the hot swap's load shares the serving
    encoder (no second onnxruntime session, a warm cache) instead of loading it again; a bundle whose
    encoder differs gets its own."""
    from vigil.policies.bundle import load_policy
    from vigil.training.flow import Ensemble, FlowConfig
    from vigil.training.flow_export import export_flow_ensemble

    for seed in (0, 1):
        ens = Ensemble(FlowConfig(hidden=16, depth=2, members=2, seed=seed)).eval()
        export_flow_ensemble(tmp_path / f"flow-{seed}", ens, ens.cfg, encoder_bundle, f"flow-{seed}")
    serving = load_policy(tmp_path / "flow-0", prefer_gpu=False)
    first = serving.encoder.embed(["open the drawer"])
    same = load_policy(tmp_path / "flow-1", prefer_gpu=False, previous=serving)
    assert same.encoder is serving.encoder
    assert same.encoder.embed(["open the drawer"]) is not None and same.encoder.cache_info()["hits"] == 1
    np.testing.assert_array_equal(same.episode_inputs("open the drawer")[same.instruction_input][0], first[0])

    meta_path = tmp_path / "flow-1" / "encoder" / "encoder.json"
    meta = json.loads(meta_path.read_text())
    meta["max_length"] -= 1  # another encoder: it truncates differently (a short instruction is unaffected)
    meta_path.write_text(json.dumps(meta))
    other = load_policy(tmp_path / "flow-1", prefer_gpu=False, previous=serving)
    assert other.encoder is not serving.encoder
    np.testing.assert_allclose(other.encoder.embed(["open the drawer"]), first, atol=1e-5)
