"""Shared fixtures: free ports, policy bundles, a real `vigil serve` process, robot links, stream subscribers.

Everything here is real: the runtime is a child process started with `python -m vigil.runtime.cli serve`,
robots are DEALER sockets (vigil.runtime.client.RobotLink) in the test process, the operator stream is a
real SUB socket, and the alert store is a real SQLite file in the test's tmp_path.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from vigil.runtime import launch
from vigil.runtime.client import RobotLink
from vigil.wire.protocol import STREAM_KINDS, ArraySpec, Message, decode

VIGIL = [sys.executable, "-m", "vigil.runtime.cli"]
EPS32 = float(np.finfo(np.float32).eps)


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}


def free_port() -> int:
    """A port free right now (for the few endpoints a test must know before the runtime starts; a runtime's
    own endpoints bind port 0 and are read from its ready line)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def run_vigil(*args: str, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run one `vigil ...` command to completion as a child process."""
    return subprocess.run([*VIGIL, *args], capture_output=True, text=True, timeout=timeout, env=child_env(),
                          cwd=cwd)


# -- bundles ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bundles_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="session")
def lqr_bundle(bundles_dir) -> Path:
    """The optimal LQR of aircraft pitch (python-control), exported as a linear_gain bundle."""
    from vigil.training.lqr import export_lqr

    folder = bundles_dir / "aircraft-pitch-lqr"
    export_lqr("aircraft-pitch", folder)
    return folder


@pytest.fixture(scope="session")
def chunk_bundle(bundles_dir) -> Path:
    """A chunked policy: action[h] = state + h for h < H = 4, executed 2 at a time, bounds [-1, 1.5] x [-10, 10],
    and one score `vfd` = |state|^2."""
    from onnx.helper import make_node as _node

    folder = bundles_dir / "chunked"
    graph_bundle(folder, [_node("Unsqueeze", ["state", "axis1"], ["s3"]),
                          _node("Add", ["s3", "steps"], ["action"]),
                          _node("ReduceSumSquare", ["state"], ["vfd"], axes=[1], keepdims=0)],
                 obs_dim=2, act_dim=2, outputs={"action": ["batch", 4, 2], "vfd": ["batch"]},
                 initializers={"axis1": np.array([1]), "steps": np.arange(4.0).reshape(4, 1)},
                 action={"name": "action", "dtype": "float32", "shape": [2], "low": [-1.0, -10.0],
                         "high": [1.5, 10.0]},
                 onnx={"inputs": {"state": "state"}, "action": "action", "scores": ["vfd"]},
                 chunk={"length": 4, "execute": 2}, safe_action=[0.0, 0.5])
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, encoder_bundle):
    """An untrained 3-member ensemble with the real instruction encoder: enough to exercise the rollouts."""
    from vigil.training.flow import Ensemble, FlowConfig
    from vigil.training.train_flow import save_checkpoint

    run = tmp_path_factory.mktemp("run")
    cfg = FlowConfig(hidden=16, depth=2, members=3, vfd_samples=2, euler_steps=4)
    save_checkpoint(run / "ensemble.pt", Ensemble(cfg).eval(), cfg, {}, {"loss": np.zeros(1)})
    shutil.copytree(encoder_bundle, run / "encoder")
    return run


def manifest_of(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "manifest.json").read_text())


def gain_of(bundle: Path) -> np.ndarray:
    """K of a linear_gain bundle, as recorded in the manifest (float64)."""
    return np.asarray(manifest_of(bundle)["extra"]["gain"], np.float64)


def pitch_specs() -> tuple[tuple[ArraySpec, ...], ArraySpec]:
    """What an aircraft-pitch robot declares in hello."""
    return (ArraySpec("state", "float32", (3,)),), ArraySpec("action", "float32", (1,))


def assert_lqr_action(action: np.ndarray, K: np.ndarray, x: np.ndarray) -> None:
    """action == -K x up to float32 arithmetic.

    The graph multiplies a float32 state by a float32 copy of K and sums n products: each rounding is at
    most eps32/2 relative to the magnitude involved, so |error| <= (n + 2) * eps32 * sum_j |K_ij x_j|.
    We allow 8 eps32 times that sum, which is still about 1e-6 of the action's scale."""
    action = np.asarray(action)
    assert action.dtype == np.float32, action.dtype
    expected = -K @ x.astype(np.float64)
    scale = np.abs(K) @ np.abs(x.astype(np.float64))
    assert action.shape == expected.shape
    assert np.all(np.abs(action - expected) <= 8 * EPS32 * scale + 1e-30), (action, expected)


# -- the runtime as a process ----------------------------------------------------------------------------

Served = launch.Served


def start_serve(workdir: Path, bundle: Path, **flags: Any) -> Served:
    """Start `vigil serve` (vigil.runtime.launch: free loopback ports unless robot_endpoint / operator_endpoint
    are given, store in workdir) and wait for its ready line. Flags use underscores (`link_timeout_s=0.2`
    becomes `--link-timeout-s 0.2`); True is a bare switch."""
    return launch.start_serve(bundle, workdir, env={"COLUMNS": "200"}, **flags)


@pytest.fixture
def serve(tmp_path) -> Iterator[Callable[..., Served]]:
    """Factory: `serve(bundle, **flags)` starts a runtime process; every one is stopped at teardown."""
    started: list[Served] = []

    def start(bundle: Path, **flags: Any) -> Served:
        served = start_serve(tmp_path / f"serve{len(started)}", bundle, **flags)
        started.append(served)
        return served

    yield start
    for served in started:
        if served.alive():
            served.proc.send_signal(signal.SIGINT)
            try:
                served.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                served.kill()


HANG_LIMIT_S = 180


@pytest.fixture(autouse=True)
def hang_guard(request):
    """A test that blocks (a send to a peer that is gone, a reply that never comes) fails after HANG_LIMIT_S
    instead of hanging the suite: SIGALRM interrupts the blocking call in the main thread."""
    marker = request.node.get_closest_marker("hang_limit")  # a test that is long by design says how long
    limit = int(marker.args[0]) if marker else HANG_LIMIT_S

    def on_alarm(signum, frame):
        raise TimeoutError(f"{request.node.nodeid} still running after {limit} s (hang guard)")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(limit)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# -- robots and operators in the test process --------------------------------------------------------------


@pytest.fixture
def links() -> Iterator[Callable[..., RobotLink]]:
    """Factory: `links(endpoint, robot, hello=True)` makes a RobotLink (helloed with the aircraft-pitch spec
    unless hello=False, in which case it is only connected); all are closed at teardown."""
    made: list[RobotLink] = []

    def make(endpoint: str, robot: str, hello: bool = True, **info: Any) -> RobotLink:
        link = RobotLink(endpoint, robot)
        made.append(link)
        if hello:
            obs, act = pitch_specs()
            link.hello(obs, act, **info)
        else:
            link.connect()
        return link

    yield make
    for link in made:
        link.close()


def recv_raw_reply(link: RobotLink, timeout_s: float = 5.0) -> Message:
    """The next message from the runtime on `link` (fails the test if none comes)."""
    msg = link.recv(timeout_s)
    assert msg is not None, f"no reply from the runtime within {timeout_s} s"
    return msg


@dataclass
class Subscriber:
    """A SUB socket on the operator stream, with helpers to wait for a message matching a predicate."""

    sock: zmq.Socket
    seen: list[tuple[str, Message]] = field(default_factory=list)

    def pump(self, timeout_ms: int) -> bool:
        """Receive one message into `seen` if one arrives within timeout_ms."""
        if not self.sock.poll(timeout_ms):
            return False
        frames = self.sock.recv_multipart()
        self.seen.append((frames[0].decode(), decode(frames[1:], kinds=STREAM_KINDS)))
        return True

    def wait_for(self, pred: Callable[[str, Message], bool], timeout_s: float = 10.0) -> tuple[str, Message]:
        """First message (already seen or new) for which pred(topic, msg) is true."""
        for item in self.seen:
            if pred(*item):
                return item
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if self.pump(max(1, int(left * 1000))) and pred(*self.seen[-1]):
                return self.seen[-1]
        topics = [(t, m.meta.get("monitor") or m.meta.get("event")) for t, m in self.seen[-20:]]
        raise AssertionError(f"no matching operator-stream message within {timeout_s} s; last seen: {topics}")

    def wait_new(self, pred: Callable[[str, Message], bool], timeout_s: float = 10.0) -> tuple[str, Message]:
        """Like wait_for, but only messages arriving from now on count."""
        self.seen.clear()
        return self.wait_for(pred, timeout_s)

    def ready(self, timeout_s: float = 10.0) -> None:
        """PUB/SUB joins late: wait until a telemetry message arrives, so the subscription is in place."""
        self.wait_new(lambda topic, msg: topic == "telemetry", timeout_s)


@pytest.fixture
def subscriber() -> Iterator[Callable[[str], Subscriber]]:
    from vigil.runtime.stream import subscribe

    made: list[Subscriber] = []

    def make(endpoint: str) -> Subscriber:
        sub = Subscriber(subscribe(zmq.Context.instance(), endpoint))
        made.append(sub)
        return sub

    yield make
    for sub in made:
        sub.sock.close(linger=0)


def wait_until(pred: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.02) -> Any:
    """Poll pred() until it returns something truthy; fail after timeout_s (an upper bound, never a claim)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)


def _initializer(v: Any) -> np.ndarray:
    a = np.asarray(v)
    return a.astype(np.float32) if a.dtype.kind == "f" else a.astype(np.int64)


def graph_bundle(folder: Path, nodes: list, *, obs_dim: int, act_dim: int, outputs: dict[str, list],
                 initializers: dict[str, np.ndarray] | None = None, **manifest: Any):
    """A bundle around a hand-written ONNX graph with one input `state` (batch, obs_dim): for policies whose
    output we want to control exactly (action chunks, scores, non-finite actions). `outputs` maps graph
    output names to their shapes; manifest keys override the defaults (kind gaussian, safe action 0)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from vigil.policies.manifest import write_bundle
    from vigil.training.export import OPSET

    graph = helper.make_graph(
        nodes, "test_policy",
        inputs=[helper.make_tensor_value_info("state", TensorProto.FLOAT, ["batch", obs_dim])],
        outputs=[helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs.items()],
        initializer=[numpy_helper.from_array(_initializer(v), k) for k, v in (initializers or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="vigil-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    d: dict[str, Any] = {
        "name": folder.name, "kind": "gaussian",
        "observation": [{"name": "state", "dtype": "float32", "shape": [obs_dim]}],
        "action": {"name": "action", "dtype": "float32", "shape": [act_dim]},
        "safe_action": [0.0] * act_dim, "control_rate_hz": 20.0,
        "onnx": {"inputs": {"state": "state"}, "action": "action"},
    }
    d.update(manifest)
    return write_bundle(folder, model.SerializeToString(), d)


@pytest.fixture(scope="session")
def encoder_bundle(tmp_path_factory) -> Path:
    """The onboard instruction-encoder bundle (an 87 MB export of the packaged MiniLM), written once per
    session through the CLI, in-process (`vigil bundle encoder --out DIR`). Tests must not modify it."""
    from vigil.runtime.cli import main

    folder = tmp_path_factory.mktemp("encoder")
    assert main(["bundle", "encoder", "--out", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Small torch ops on a busy 2-core machine run far faster on one thread than on two. Module scope, so
    module-scoped fixtures (a trained ensemble) run under it too; the thread count is restored after."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray (2 CPUs) per test module for the fleet and shard tests that run on Ray: sim/shard.py's
    ray_session joins it instead of starting its own (a start costs seconds). Started as ray_session starts one,
    and shut down after the module, so no Ray daemon outlives the tests that need it."""
    ray = pytest.importorskip("ray")
    from vigil.sim.shard import _import_path

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": _import_path()}})
    yield ray
    ray.shutdown()
