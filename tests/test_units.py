"""Unit tests with real parts (onnxruntime sessions on real bundles, real SQLite, real sockets where a part
publishes): manifest, config, action chunks, agent, alerter, monitors, linear systems and oracle, faults."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import scipy.signal
import zmq

from vigil.monitors.base import Level, Tick, Verdict
from vigil.monitors.safety import DeadlineMonitor, LinkMonitor, ObservationMonitor, SaturationMonitor
from vigil.policies.agent import Agent
from vigil.policies.bundle import load_policy
from vigil.policies.chunks import ActionChunkQueue
from vigil.policies.manifest import Manifest, ManifestError, read_manifest, write_bundle
from vigil.runtime.alerts import Alerter
from vigil.runtime.config import ConfigError, ServeConfig, describe, is_local, load_config
from vigil.runtime.store import AlertStore
from vigil.runtime.stream import OperatorStream, receive, subscribe
from vigil.sim.envs import LinearEnv, make_env
from vigil.sim.faults import Faults
from vigil.sim.linear import SYSTEMS, oracle, rollout_cost, stage_cost, zero_order_hold
from vigil.training.lqr import lqr_gain
from vigil.wire.protocol import ArraySpec, Message

# -- manifest ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_manifest(lqr_bundle) -> dict:
    return json.loads((lqr_bundle / "manifest.json").read_text())


def _set(d: dict, path: str, value) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        d = d[k]
    if value is _DELETE:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value


_DELETE = object()
SHA = "0" * 64

# (path to change, new value, text the error must contain: the key)
MANIFEST_ERRORS = [
    ("format", 2, "'format'"),
    ("kind", _DELETE, "'kind'"),
    ("kind", "mystery", "'kind'"),
    ("kind", 3, "'kind'"),
    ("name", _DELETE, "'name'"),
    ("name", ["x"], "'name'"),
    ("observation", _DELETE, "'observation'"),
    ("observation", [], "'observation'"),
    ("observation", {"state": 1}, "'observation'"),
    ("observation", [{"name": "state", "dtype": "float16", "shape": [3]}], "observation[0].dtype"),
    ("observation", [{"name": "state", "dtype": ["float32"], "shape": [3]}], "observation[0].dtype"),
    ("observation", [{"name": "state", "dtype": "float32", "shape": [-3]}], "observation[0].shape"),
    ("observation", [{"name": "state", "dtype": "float32", "shape": [3], "low": [0.0]}], "observation[0].low"),
    ("action", _DELETE, "'action'"),
    ("action", {"name": "action", "dtype": "float32", "shape": [1, 1]}, "'action.shape'"),
    ("action", {"dtype": "float32", "shape": [1]}, "action.name"),
    ("safe_action", _DELETE, "'safe_action'"),
    ("safe_action", [0.0, 0.0], "'safe_action'"),
    ("safe_action", ["stop"], "'safe_action'"),
    ("control_rate_hz", 0, "'control_rate_hz'"),
    ("control_rate_hz", -20.0, "'control_rate_hz'"),
    ("control_rate_hz", "fast", "'control_rate_hz'"),
    ("control_rate_hz", True, "'control_rate_hz'"),
    ("onnx", _DELETE, "'onnx'"),
    ("onnx.sha256", "abc", "'onnx.sha256'"),
    ("onnx.sha256", _DELETE, "'onnx.sha256'"),
    ("onnx.inputs", {"state": "velocity"}, "'onnx.inputs.state'"),
    ("onnx.inputs", ["state"], "'onnx.inputs'"),
    ("chunk", {"length": 2, "execute": 3}, "'chunk'"),
    ("chunk", {"length": 0}, "'chunk'"),
    ("chunk", {"length": "two"}, "'chunk"),
    ("chunk", 4, "'chunk"),
    ("normalisation", {"velocity": {"mean": [0.0] * 3, "std": [1.0] * 3}}, "'normalisation.velocity'"),
    ("normalisation", {"state": {"std": [1.0] * 3}}, "'normalisation.state.mean'"),
    ("normalisation", {"state": {"mean": [0.0] * 2, "std": [1.0] * 3}}, "'normalisation.state.mean'"),
    ("normalisation", {"state": {"mean": [0.0] * 3, "std": [1.0, 0.0, 1.0]}}, "'normalisation.state.std'"),
    ("normalisation", {"state": [0.0, 1.0]}, "'normalisation.state"),
]
def _manifest_params():
    return [pytest.param(path, value, key, id=f"{path}-{'deleted' if value is _DELETE else value!r}")
            for path, value, key in MANIFEST_ERRORS]


@pytest.mark.parametrize("path, value, key", _manifest_params())
def test_manifest_errors_name_the_key(good_manifest, path, value, key):
    d = copy.deepcopy(good_manifest)
    _set(d, path, value)
    with pytest.raises(ManifestError) as exc:
        Manifest.from_dict(d)
    assert key in str(exc.value), str(exc.value)


def test_manifest_roundtrip_and_policy_id(good_manifest):
    m = Manifest.from_dict(good_manifest)
    assert m.to_dict() == good_manifest
    assert m.policy_id == f"aircraft-pitch-lqr@{good_manifest['onnx']['sha256'][:12]}"
    assert m.kind == "linear_gain" and m.observation[0] == ArraySpec("state", "float32", (3,), (-10.0,) * 3,
                                                                        (10.0,) * 3)


def test_read_manifest_checks_the_onnx_file(lqr_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    write_bundle(bundle, (lqr_bundle / "policy.onnx").read_bytes(), json.loads((lqr_bundle / "manifest.json").read_text()))
    assert read_manifest(bundle).sha256 == json.loads((lqr_bundle / "manifest.json").read_text())["onnx"]["sha256"]
    # one flipped byte in the graph: caught on load, by the key that holds the checksum
    onnx_bytes = bytearray((bundle / "policy.onnx").read_bytes())
    onnx_bytes[len(onnx_bytes) // 2] ^= 0x01
    (bundle / "policy.onnx").write_bytes(bytes(onnx_bytes))
    with pytest.raises(ManifestError, match="onnx.sha256"):
        read_manifest(bundle)
    with pytest.raises(ManifestError, match="onnx.sha256"):
        load_policy(bundle)
    (bundle / "policy.onnx").unlink()
    with pytest.raises(ManifestError, match="onnx.file"):
        read_manifest(bundle)
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(bundle)
    with pytest.raises(ManifestError, match="manifest.json"):
        read_manifest(tmp_path / "nowhere")


def test_load_policy_checks_graph_names(lqr_bundle, tmp_path):
    d = json.loads((lqr_bundle / "manifest.json").read_text())
    onnx_bytes = (lqr_bundle / "policy.onnx").read_bytes()
    wrong_input = copy.deepcopy(d)
    wrong_input["onnx"]["inputs"] = {"x": "state"}
    write_bundle(tmp_path / "a", onnx_bytes, wrong_input)
    with pytest.raises(ManifestError, match="onnx.inputs"):
        load_policy(tmp_path / "a")
    wrong_output = copy.deepcopy(d)
    wrong_output["onnx"]["action"] = "u"
    write_bundle(tmp_path / "b", onnx_bytes, wrong_output)
    with pytest.raises(ManifestError, match="'onnx'"):
        load_policy(tmp_path / "b")
    # a linear-gain graph declared as a flow ensemble lacks what that kind needs, and the error names it
    wrong_kind = copy.deepcopy(d)
    wrong_kind["kind"] = "flow_ensemble"
    write_bundle(tmp_path / "c", onnx_bytes, wrong_kind)
    with pytest.raises(ManifestError, match="'extra.instruction_input'"):
        load_policy(tmp_path / "c")


# -- config ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, expected", [
    ("mode", "fast", "lockstep"),
    ("deadline_ms", -1.0, ">= 0"),
    ("busy_poll_us", -5.0, ">= 0"),
    ("link_timeout_s", 0.0, "> 0"),
    ("link_timeout_s", float("nan"), "> 0"),
    ("heartbeat_s", -1.0, "> 0"),
    ("telemetry_s", 0.0, "> 0"),
    ("alert_repeat_s", 0.0, "> 0"),
    ("saturation_window", 0, ">= 1"),
    ("threads", 0, ">= 1"),
    ("robot_endpoint", "127.0.0.1:5555", "ZeroMQ endpoint"),
    ("operator_endpoint", "", "ZeroMQ endpoint"),
    ("deadline_ms", float("nan"), ">= 0"),  # a NaN deadline would silently disable the deadline monitor
])
def test_config_errors_name_key_and_expected_value(key, value, expected):
    with pytest.raises(ConfigError) as exc:
        ServeConfig(**{key: value})
    assert f"'{key}'" in str(exc.value) and expected in str(exc.value), str(exc.value)


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:5555",
                                      "tcp://192.168.0.7:5555", "tcp://eth0:5555", "tcp://example.com:5555",
                                      "tcp://[::]:5555", "tcp://[2001:db8::1]:5555"])
@pytest.mark.parametrize("key", ["robot_endpoint", "operator_endpoint"])
def test_non_loopback_bind_refused_without_allow_remote(key, endpoint):
    assert not is_local(endpoint)
    with pytest.raises(ConfigError) as exc:
        ServeConfig(**{key: endpoint})
    assert f"'{key}'" in str(exc.value) and "allow_remote" in str(exc.value)
    assert getattr(ServeConfig(**{key: endpoint}, allow_remote=True), key) == endpoint


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5555", "tcp://127.0.0.2:7", "tcp://localhost:5555",
                                      "tcp://[::1]:5555", "ipc:///tmp/vigil.sock", "inproc://vigil"])
def test_loopback_endpoints_accepted(endpoint):
    assert is_local(endpoint)
    assert ServeConfig(robot_endpoint=endpoint).robot_endpoint == endpoint


def test_deadline_defaults_to_one_control_period():
    assert ServeConfig().deadline_s(20.0) == pytest.approx(0.05)
    assert ServeConfig(deadline_ms=2.5).deadline_s(20.0) == pytest.approx(0.0025)


def test_load_config_from_toml(tmp_path):
    path = tmp_path / "vigil.toml"
    path.write_text('[serve]\nbundle = "b"\nmode = "realtime"\ndeadline_ms = 5\nthreads = 2\nallow_remote = true\n'
                    'robot_endpoint = "tcp://0.0.0.0:6000"\n[other]\nignored = 1\n')
    cfg = load_config(path)
    assert (cfg.bundle, cfg.mode, cfg.deadline_ms, cfg.threads, cfg.allow_remote) == ("b", "realtime", 5.0, 2, True)
    assert isinstance(cfg.deadline_ms, float)
    # flags override the file; None means "not given"
    cfg = load_config(path, mode="lockstep", threads=None)
    assert cfg.mode == "lockstep" and cfg.threads == 2
    assert load_config(None, bundle="x").bundle == "x"


@pytest.mark.parametrize("body, expected", [
    ('[serve]\nnope = 1\n', ["'serve.nope'", "expected one of"]),
    ('[serve]\nthreads = "2"\n', ["'serve.threads'", "int"]),
    ('[serve]\nthreads = true\n', ["'serve.threads'", "int"]),
    ('[serve]\ndeadline_ms = "5"\n', ["'serve.deadline_ms'", "float"]),
    ('[serve]\nallow_remote = 1\n', ["'serve.allow_remote'", "bool"]),
    ('[serve]\nmode = "fast"\n', ["'mode'", "lockstep"]),
    ('[serve]\nlink_timeout_s = 0\n', ["'link_timeout_s'", "> 0"]),
    ('[serve]\nrobot_endpoint = "tcp://0.0.0.0:1"\n', ["'robot_endpoint'", "allow_remote"]),
    ('[serve\nmode = 1\n', ["not valid TOML"]),
])
def test_load_config_errors(tmp_path, body, expected):
    path = tmp_path / "vigil.toml"
    path.write_text(body)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    for text in expected:
        assert text in str(exc.value), str(exc.value)


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_describe_lists_every_option():
    keys = [k for k, _, _ in describe()]
    assert keys == list(ServeConfig.__dataclass_fields__)
    assert all(text for _, _, text in describe())


# -- action chunks and the agent ---------------------------------------------------------------------------


def test_chunk_queue_executes_k_of_h_then_replans():
    q = ActionChunkQueue(execute=2)
    assert q.needs_plan() and len(q) == 0
    chunk = np.arange(10, dtype=np.float32).reshape(5, 2)  # H = 5 actions of m = 2
    q.push(chunk)
    assert len(q) == 2 and not q.needs_plan()
    np.testing.assert_array_equal(q.pop(), chunk[0])
    np.testing.assert_array_equal(q.pop(), chunk[1])
    assert q.needs_plan()  # only k = 2 of H = 5 are executed
    q.push(chunk)
    q.pop()
    q.push(chunk + 100)  # a fresh plan replaces what is left of the old one
    np.testing.assert_array_equal(q.pop(), chunk[0] + 100)
    q.clear()
    assert q.needs_plan()
    with pytest.raises(ValueError):
        q.push(np.zeros((1, 2), np.float32))  # H < k
    with pytest.raises(ValueError):
        q.push(np.zeros(4, np.float32))  # not (H, m)
    with pytest.raises(ValueError):
        ActionChunkQueue(0)


def test_agent_replans_every_k_and_clips_to_bounds(chunk_bundle):
    agent = Agent(load_policy(chunk_bundle))
    np.testing.assert_array_equal(agent.safe_action, np.array([0.0, 0.5], np.float32))

    def act(x):
        return agent.act({"state": np.asarray(x, np.float32)})

    s1 = act([0.2, -0.3])
    assert s1.replanned
    np.testing.assert_allclose(s1.raw, [0.2, -0.3], rtol=1e-6)
    np.testing.assert_allclose(s1.action, [0.2, -0.3], rtol=1e-6)
    assert s1.scores["vfd"] == pytest.approx(0.13, rel=1e-6)
    s2 = act([5.0, 5.0])  # second action of the same plan: this observation is not even looked at
    assert not s2.replanned
    np.testing.assert_allclose(s2.raw, [1.2, 0.7], rtol=1e-6)
    assert s2.scores["vfd"] == pytest.approx(0.13, rel=1e-6)
    s3 = act([0.9, 0.0])  # k = 2 used up: a new plan from this observation
    assert s3.replanned
    np.testing.assert_allclose(s3.raw, [0.9, 0.0], atol=1e-6)
    s4 = act([0.0, 0.0])
    assert not s4.replanned
    np.testing.assert_allclose(s4.raw, [1.9, 1.0], rtol=1e-6)  # the policy asked for more than allowed ...
    np.testing.assert_allclose(s4.action, [1.5, 1.0], rtol=1e-6)  # ... and gets the bound
    assert s4.action.dtype == np.float32
    s5 = act([-3.0, -20.0])
    np.testing.assert_allclose(s5.action, [-1.0, -10.0])  # lower bounds too
    agent.reset()  # a new episode replans at once
    assert act([0.0, 0.0]).replanned


def test_linear_gain_policy_and_online_gain_swap(lqr_bundle):
    policy = load_policy(lqr_bundle)
    K = np.asarray(policy.manifest.extra["gain"])
    x = np.array([0.1, -0.2, 0.3], np.float32)
    np.testing.assert_allclose(policy.infer({"state": x}).actions, (-K @ x)[None], rtol=1e-5)
    K2 = 0.5 * K
    policy.set_gain(K2)
    np.testing.assert_allclose(policy.infer({"state": x}).actions, (-K2 @ x)[None], rtol=1e-5)
    with pytest.raises(ValueError):
        policy.set_gain(np.zeros((2, 3)))


# -- alerter -----------------------------------------------------------------------------------------------


def test_alerter_dedup_stores_then_publishes(tmp_path):
    ctx = zmq.Context.instance()
    store = AlertStore(tmp_path / "alerts.db")
    stream = OperatorStream(ctx, "inproc://alerter-test")
    sub = subscribe(ctx, "inproc://alerter-test", ["alert.", "sync"])
    try:
        for _ in range(100):  # wait until the subscription is in place
            stream.publish("sync", Message("telemetry"))
            if list(receive(sub, timeout_ms=20)):
                break
        alerter = Alerter(store, stream, repeat_s=10.0)
        warn, alert, ok = (Verdict("saturation", lvl, "saturated", {"fraction": np.float64(0.5)})
                           for lvl in (Level.WARN, Level.ALERT, Level.OK))
        observed = [(t, r, alerter.observe("r1", v, now=t)) for t, r, v in [
            (0.0, "r1", warn),     # rises from ok: filed
            (1.0, "r1", warn),     # same level within repeat_s: counted
            (2.0, "r1", warn),     # counted
            (3.0, "r1", alert),    # rises: filed, carrying the 2 suppressed occurrences
            (4.0, "r1", warn),     # lower level within repeat_s: counted
            (13.5, "r1", warn),    # still above ok repeat_s after the last alert: repeated
            (14.0, "r1", ok),      # back to ok: re-armed
            (14.5, "r1", warn),    # rises again at once
        ]]
        filed = [rec for _, _, rec in observed if rec is not None]
        assert [rec is not None for *_, rec in observed] == [True, False, False, True, False, True, False, True]
        assert [(r.severity, r.count) for r in filed] == [("warn", 1), ("alert", 3), ("warn", 2), ("warn", 1)]
        # pairs are independent: another robot, and another monitor of the same robot
        other = alerter.observe("r2", warn, now=14.6)
        deadline = alerter.observe("r1", Verdict("deadline", Level.STOP, "late"), now=14.7)
        assert other is not None and deadline is not None
        assert alerter.observe("r3", ok, now=15.0) is None  # ok for a pair never raised: nothing
        assert alerter.filed == 6 and alerter.suppressed == 3
        stored_ = store.since(0)
        assert [r.id for r in stored_] == [r.id for r in filed] + [other.id, deadline.id]
        assert stored_[0].values == {"fraction": 0.5}
        published = [(t, m) for t, m in receive(sub, timeout_ms=500) if m.kind == "alert"]
        assert [(t, m.seq, m.robot) for t, m in published] == [
            (f"alert.{r.severity}", r.id, r.robot) for r in stored_]
        assert [m.meta for _, m in published] == [r.to_meta() for r in stored_]
    finally:
        sub.close(0)
        stream.close()
        store.close()


# -- monitors ----------------------------------------------------------------------------------------------


def tick(obs=None, action=(0.0,), raw=None, compute_s=0.0) -> Tick:
    action = np.asarray(action, np.float32)
    return Tick("r", 1, obs or {}, action, action if raw is None else np.asarray(raw, np.float32), {}, compute_s)


def test_observation_monitor():
    m = ObservationMonitor([ArraySpec("state", "float32", (3,), (-1.0,) * 3, (1.0,) * 3),
                            ArraySpec("free", "float64", (2,))])
    free = np.zeros(2)

    def judge(x, f=free):
        return m.update(tick({"state": np.asarray(x, np.float32), "free": np.asarray(f)}))

    assert judge([0.0, 1.0, -1.0]).level == Level.OK  # bounds are inclusive
    v = judge([0.0, 1.5, 0.0])
    assert (v.monitor, v.level) == ("observation", Level.ALERT) and "state[1]" in v.reason and "above" in v.reason
    assert v.values == {"index": 1, "value": 1.5, "high": 1.0}
    v = judge([-3.0, 0.0, -2.0])
    assert v.level == Level.ALERT and "below" in v.reason and v.values["index"] == 0 and v.values["low"] == -1.0
    assert judge([np.nan, 0.0, 0.0]).level == Level.STOP
    assert judge([0.0, 0.0, 0.0], [1e30, -1e30]).level == Level.OK  # no bounds declared: any finite value
    assert judge([0.0, 0.0, 0.0], [np.inf, 0.0]).level == Level.STOP


def test_observation_monitor_one_sided_bounds():
    m = ObservationMonitor([ArraySpec("x", "float32", (2,), low=(0.0, 0.0))])
    assert m.update(tick({"x": np.array([1e6, 0.0], np.float32)})).level == Level.OK
    assert m.update(tick({"x": np.array([-1.0, 0.0], np.float32)})).level == Level.ALERT
    h = ObservationMonitor([ArraySpec("x", "float32", (2,), high=(0.0, 0.0))])
    assert h.update(tick({"x": np.array([-1e6, 0.0], np.float32)})).level == Level.OK
    assert h.update(tick({"x": np.array([0.0, 1.0], np.float32)})).level == Level.ALERT


@pytest.mark.parametrize("low, high, value", [((0.0, 0.0), None, np.inf), (None, (0.0, 0.0), -np.inf)])
def test_observation_monitor_stops_on_infinity_with_one_sided_bounds(low, high, value):
    m = ObservationMonitor([ArraySpec("x", "float32", (2,), low, high)])
    assert m.update(tick({"x": np.array([value, 0.0], np.float32)})).level == Level.STOP


def test_observation_monitor_checks_integer_ranges():
    enc = ObservationMonitor([ArraySpec("enc", "int32", (2,), (0.0, 0.0), (100.0, 100.0))])
    assert enc.update(tick({"enc": np.array([5, 100], np.int32)})).level == Level.OK
    v = enc.update(tick({"enc": np.array([5, 101], np.int32)}))
    assert v.level == Level.ALERT and v.values["index"] == 1


def test_saturation_monitor():
    m = SaturationMonitor(window=4, warn_fraction=0.5)
    sat = dict(action=(1.0,), raw=(3.0,))  # clipping changed the action
    free = dict(action=(0.5,), raw=(0.5,))
    assert [m.update(tick(**sat)).level for _ in range(3)] == [Level.OK] * 3  # window not full yet
    assert m.update(tick(**sat)).level == Level.ALERT  # 4 of 4
    v = m.update(tick(**free))
    assert v.level == Level.WARN and v.values["fraction"] == 0.75
    assert m.update(tick(**free)).level == Level.WARN  # 2 of 4
    assert m.update(tick(**free)).level == Level.OK  # 1 of 4
    m.reset()
    assert [m.update(tick(**sat)).level for _ in range(4)] == [Level.OK] * 3 + [Level.ALERT]


def test_deadline_monitor():
    m = DeadlineMonitor(0.01)
    assert m.update(tick(compute_s=0.01)).level == Level.OK
    v = m.update(tick(compute_s=0.02))
    assert v.level == Level.STOP and v.values["compute_ms"] == pytest.approx(20) and v.values["deadline_ms"] == 10


def test_link_monitor():
    m = LinkMonitor(0.5, now=100.0)
    assert m.check(100.5) is None  # silence == timeout is not yet a loss
    v = m.check(100.7)
    assert (v.monitor, v.level) == ("link", Level.STOP) and v.values["silence_s"] == pytest.approx(0.7)
    assert m.lost and m.check(101.5) is None  # reported once
    assert m.seen(102.0) == pytest.approx(2.0)  # the outage, ended
    assert not m.lost and m.seen(102.1) is None
    assert m.check(102.5) is None and m.check(102.7) is not None  # re-armed


# -- linear systems and the oracle -------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_lqr_gain_matches_scipy_oracle(name):
    system = SYSTEMS[name]()
    K_control, P = lqr_gain(system)  # python-control (training side)
    K_scipy, J = oracle(system)  # scipy DARE (the independent reference)
    np.testing.assert_allclose(K_control, K_scipy, rtol=1e-7, atol=1e-9)
    assert J == pytest.approx(system.noise_std**2 * np.trace(P), rel=1e-7)
    assert max(abs(np.linalg.eigvals(system.A - system.B @ K_scipy))) < 1  # the optimum stabilises


def test_lqr_bundle_records_the_optimum(lqr_bundle):
    m = read_manifest(lqr_bundle)
    K, J = oracle(SYSTEMS["aircraft-pitch"]())
    np.testing.assert_allclose(m.extra["gain"], K, rtol=1e-7)
    assert m.extra["optimal_average_cost"] == pytest.approx(J, rel=1e-7)
    assert m.control_rate_hz == 20.0


def test_zero_order_hold_matches_scipy():
    Ac, Bc = np.array([[0.0, 1.0], [-2.0, -0.3]]), np.array([[0.0], [1.0]])
    A, B = zero_order_hold(Ac, Bc, 0.1)
    Ad, Bd, *_ = scipy.signal.cont2discrete((Ac, Bc, np.eye(2), np.zeros((2, 1))), 0.1, method="zoh")
    np.testing.assert_allclose(A, Ad, rtol=1e-12)
    np.testing.assert_allclose(B, Bd, rtol=1e-12)


def test_linear_env_replays_noise_and_matches_rollout_cost():
    system = SYSTEMS["aircraft-pitch"]()
    env = make_env("aircraft-pitch", horizon=30)
    assert isinstance(env, LinearEnv) and env.control_rate_hz == 20.0
    assert env.observation_spec == (ArraySpec("state", "float32", (3,)),)
    K, _ = oracle(system)
    obs = env.reset(seed=5)
    noise = env.noise.copy()
    assert obs["state"].dtype == np.float32
    np.testing.assert_array_equal(obs["state"], system.x0.astype(np.float32))
    total, x = 0.0, system.x0.copy()
    for t in range(30):
        u = -K @ x
        r = env.step(u)
        assert r.info["cost"] == pytest.approx(stage_cost(system, x, u)) and r.reward == -r.info["cost"]
        total += r.info["cost"]
        x = system.A @ x + system.B @ u + noise[t]
        np.testing.assert_allclose(r.obs["state"], x.astype(np.float32))
        assert r.truncated == (t == 29)
    assert total == pytest.approx(rollout_cost(system, K, noise), rel=1e-12)
    env.reset(seed=5)
    np.testing.assert_array_equal(env.noise, noise)  # same seed, same disturbances
    env.reset(seed=6)
    assert not np.array_equal(env.noise, noise)
    assert np.std(noise) == pytest.approx(system.noise_std, rel=0.3)


# -- fault injection (unit) --------------------------------------------------------------------------------


def test_faults_corrupt_drop_delay_and_validation():
    f = Faults(obs_noise=0.1, drop=1.0, delay_ms=20, start=2, stop=4)
    obs = {"state": np.ones(3, np.float32), "count": np.array([7], np.int32)}
    rng = np.random.default_rng(0)
    assert f.corrupt(obs, 1, rng) is obs and not f.dropped(1, rng) and f.delay_s(1) == 0.0  # before the window
    noisy = f.corrupt(obs, 2, rng)
    assert noisy["state"].dtype == np.float32 and not np.array_equal(noisy["state"], obs["state"])
    assert np.abs(noisy["state"] - 1).max() < 1.0  # std 0.1
    np.testing.assert_array_equal(noisy["count"], obs["count"])  # integers are left alone
    assert f.dropped(3, rng) and f.delay_s(3) == pytest.approx(0.02)
    assert not f.dropped(4, rng) and f.corrupt(obs, 4, rng) is obs  # the window is [start, stop)
    assert "observation noise" in f.describe() and "dropped" in f.describe() and Faults().describe() == "none"
    half = Faults(drop=0.5)
    rng = np.random.default_rng(1)
    drops = [half.dropped(t, rng) for t in range(2000)]
    assert 800 < sum(drops) < 1200
    for bad in [dict(obs_noise=-1), dict(drop=1.5), dict(drop=-0.1), dict(delay_ms=-1), dict(disconnect_s=-1)]:
        with pytest.raises(ValueError):
            Faults(**bad)


def test_onboard_path_imports_no_heavy_dependency():
    """Standing rule: runtime/, policies/ and monitors/ run on numpy, onnxruntime, pyzmq and msgpack only."""
    code = (
        "import sys, importlib, pkgutil\n"
        "import vigil.runtime, vigil.policies, vigil.monitors\n"
        "for pkg in (vigil.runtime, vigil.policies, vigil.monitors):\n"
        "    for m in pkgutil.iter_modules(pkg.__path__):\n"
        "        importlib.import_module(f'{pkg.__name__}.{m.name}')\n"
        "heavy = ('torch', 'scipy', 'metaworld', 'mujoco', 'gymnasium', 'transformers', 'tokenizers',\n"
        "         'sentence_transformers', 'control', 'cvxpy', 'onnx', 'matplotlib')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_alerter_forget_clears_a_robots_raised_pairs(tmp_path):
    store = AlertStore(tmp_path / "alerts.db")
    try:
        alerter = Alerter(store, None, repeat_s=10.0)
        warn = Verdict("saturation", Level.WARN, "saturated")
        assert alerter.observe("gone", warn, now=0.0) is not None
        assert alerter.observe("stays", warn, now=0.0) is not None
        alerter.forget("gone")
        assert alerter.raised  # "stays" is still raised
        assert alerter.observe("gone", warn, now=1.0) is not None  # a robot of that name starts afresh
        alerter.forget("gone")
        alerter.forget("stays")
        assert not alerter.raised  # nothing raised any more: the tick path skips the alerter again
    finally:
        store.close()
