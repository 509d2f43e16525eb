"""Issue 8, authentication: `vigil keys`, CURVE on the robot link, the operator stream and the control channel,
allow-listed client keys only, encrypted traffic, loopback by default."""

from __future__ import annotations

import socket
import stat
import threading
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import assert_lqr_action, gain_of, pitch_specs, run_vigil, start_serve, tcp_endpoint

from vigil.runtime.auth import ClientKeys, KeyFileError, create_keys
from vigil.runtime.client import LinkError, RobotLink
from vigil.runtime.config import ConfigError, ServeConfig
from vigil.runtime.stream import subscribe
from vigil.wire.protocol import Message

X = np.array([0.3, -0.2, 0.1], np.float32)
# A value whose float32 bytes are easy to look for in captured traffic.
MARKER = np.array([1234.5678, -8765.4321, 1111.1111], np.float32)


@pytest.fixture(scope="module")
def keyring(tmp_path_factory) -> Path:
    """runtime (server), robot and operator (allowed), intruder (not allowed), made with `vigil keys`."""
    d = tmp_path_factory.mktemp("keys")
    for name, folder in (("runtime", "server"), ("robot", "allowed"), ("operator", "allowed"),
                         ("intruder", "other")):
        r = run_vigil("keys", name, "--dir", str(d / folder))
        assert r.returncode == 0, r.stderr
    return d


def keys_of(keyring: Path, client: str, folder: str = "allowed", server: str = "runtime") -> ClientKeys:
    return ClientKeys.load(keyring / folder / f"{client}.key_secret", keyring / "server" / f"{server}.key")


@pytest.fixture
def secured(tmp_path, lqr_bundle, keyring):
    """A runtime with authentication on (robot link, operator stream, control channel)."""
    served = start_serve(tmp_path / "serve", lqr_bundle, curve_secret=keyring / "server" / "runtime.key_secret",
                         curve_allow=keyring / "allowed", control_endpoint=tcp_endpoint(), link_timeout_s=300,
                         telemetry_s=0.1)
    yield served
    if served.alive():
        served.stop()


def control_endpoint(served) -> str:
    args = served.proc.args
    return args[args.index("--control-endpoint") + 1]


def test_vigil_keys_writes_a_pair_and_refuses_to_overwrite(tmp_path, keyring):
    public, secret = keyring / "server" / "runtime.key", keyring / "server" / "runtime.key_secret"
    assert public.exists() and secret.exists()
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "secret-key" not in public.read_text() and "secret-key" in secret.read_text()
    r = run_vigil("keys", "runtime", "--dir", str(keyring / "server"))
    assert r.returncode == 2 and "exists already" in r.stderr
    with pytest.raises(KeyFileError, match="no secret key"):  # the public file where the secret one is needed
        ClientKeys.load(public, public)
    with pytest.raises(KeyFileError, match="plain file name"):
        create_keys(tmp_path, "../escape")


def test_allowed_robot_is_served_and_its_alerts_reach_an_allowed_operator(secured, keyring, lqr_bundle):
    sub = subscribe(zmq.Context.instance(), secured.operator_endpoint, ["alert."], keys_of(keyring, "operator"))
    link = RobotLink(secured.robot_endpoint, "trusted", keys=keys_of(keyring, "robot"))
    try:
        link.hello(*pitch_specs(), timeout_s=10)
        reply = link.act({"state": X})
        assert reply.kind == "act" and reply.meta["safe"] is False
        assert_lqr_action(reply.arrays["action"], gain_of(lqr_bundle), X)
        # an alert reaches the allowed subscriber (retry: the subscription takes a moment to arrive)
        got = None
        for i in range(50):
            link.send(Message("error", "trusted", link.next_seq(), 0, {}, {"code": f"note{i}", "message": "hi"}))
            if sub.poll(200):
                got = sub.recv_multipart()
                break
        assert got is not None and got[0].startswith(b"alert.")
    finally:
        sub.close()
        link.bye()


@pytest.mark.parametrize("who", ["no key", "key not allowed", "wrong runtime key"])
def test_clients_without_an_allowed_key_get_nothing(secured, keyring, tmp_path, who):
    if who == "no key":
        keys = None
    elif who == "key not allowed":
        keys = keys_of(keyring, "intruder", folder="other")
    else:  # an allowed client key, but it expects another runtime (a man in the middle would look like this)
        other = create_keys(tmp_path / "fake", "runtime")[0]
        keys = ClientKeys.load(keyring / "allowed" / "robot.key_secret", other)
    link = RobotLink(secured.robot_endpoint, "stranger", keys=keys)
    with pytest.raises(LinkError):
        link.hello(*pitch_specs(), timeout_s=1.5)
    link.close()
    # the operator stream: an outsider's subscription never completes, so it hears nothing, while an
    # allowed robot makes the runtime publish alerts and telemetry (every 0.1 s)
    sub = subscribe(zmq.Context.instance(), secured.operator_endpoint, [""], keys)
    friend = RobotLink(secured.robot_endpoint, "friend", keys=keys_of(keyring, "robot"))
    try:
        friend.hello(*pitch_specs(), timeout_s=10)
        for i in range(10):
            friend.send(Message("error", "friend", friend.next_seq(), 0, {}, {"code": f"c{i}", "message": "x"}))
        assert not sub.poll(1500)
    finally:
        sub.close()
        friend.bye()
    # the control channel: `vigil swap` without an allowed key gets no answer
    args = ["swap", "--bundle", str(secured.bundle), "--connect", control_endpoint(secured), "--timeout", "1.5"]
    if who == "key not allowed":
        args += ["--key", str(keyring / "other" / "intruder.key_secret"),
                 "--server-key", str(keyring / "server" / "runtime.key")]
    r = run_vigil(*args)
    assert r.returncode == 2 and "no answer" in r.stderr
    assert secured.alive()
    counters = secured.stop()
    assert counters.get("errors", 0) == 0  # outsiders never reached the handlers: nothing to reject


def test_allowed_operator_can_swap(secured, keyring):
    r = run_vigil("swap", "--bundle", str(secured.bundle), "--connect", control_endpoint(secured), "--timeout", "60",
                  "--key", str(keyring / "allowed" / "operator.key_secret"),
                  "--server-key", str(keyring / "server" / "runtime.key"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"ok": true' in r.stdout


class Tap:
    """A TCP relay between a client and the runtime that keeps a copy of every byte (a wiretap)."""

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("tcp://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.server.getsockname()[1]}"
        self.seen = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            up = socket.create_connection(self.upstream)
            for a, b in ((client, up), (up, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.seen += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()


def _marker_on_the_wire(robot_endpoint: str, keys: ClientKeys | None) -> tuple[bool, np.ndarray]:
    tap = Tap(robot_endpoint)
    link = RobotLink(tap.endpoint, "tapped", keys=keys)
    try:
        link.hello(*pitch_specs(), timeout_s=10)
        reply = link.act({"state": MARKER})
    finally:
        link.bye()
        tap.close()
    with tap.lock:
        return MARKER.tobytes() in bytes(tap.seen), reply.arrays["action"]


def test_traffic_is_encrypted(secured, keyring, tmp_path, lqr_bundle):
    """The same observation through a wiretap: in clear text without authentication, not with it (and the
    action that comes back is the same)."""
    plain = start_serve(tmp_path / "plain", lqr_bundle, link_timeout_s=300)
    try:
        seen_plain, act_plain = _marker_on_the_wire(plain.robot_endpoint, None)
    finally:
        plain.stop()
    seen_curve, act_curve = _marker_on_the_wire(secured.robot_endpoint, keys_of(keyring, "robot"))
    assert seen_plain, "the tap should see the observation in clear text without authentication"
    assert not seen_curve, "the observation's bytes crossed the wire in clear text with CURVE on"
    np.testing.assert_array_equal(act_plain, act_curve)


def test_loopback_by_default_and_remote_only_with_auth_or_an_explicit_flag(tmp_path, lqr_bundle, keyring):
    with pytest.raises(ConfigError, match="not loopback"):
        ServeConfig(bundle="b", robot_endpoint="tcp://0.0.0.0:5555")
    with pytest.raises(ConfigError, match="curve_allow"):
        ServeConfig(bundle="b", curve_secret="k")
    secured = ServeConfig(bundle="b", robot_endpoint="tcp://0.0.0.0:5555", curve_secret="k", curve_allow="d")
    assert secured.exposed() == []
    flagged = ServeConfig(bundle="b", operator_endpoint="tcp://0.0.0.0:5556", allow_remote=True)
    assert flagged.exposed() == ["tcp://0.0.0.0:5556"]
    # the runtime starts with --allow-remote and says loudly that it is exposed
    port = tcp_endpoint().rsplit(":", 1)[1]
    served = start_serve(tmp_path / "remote", lqr_bundle, robot_endpoint=f"tcp://0.0.0.0:{port}", allow_remote=True)
    try:
        assert "WARNING" in served.log() and "WITHOUT authentication" in served.log()
    finally:
        served.stop()
    # ... and without any warning when authentication is on
    served = start_serve(tmp_path / "remote-auth", lqr_bundle, robot_endpoint="tcp://0.0.0.0:0",
                         curve_secret=keyring / "server" / "runtime.key_secret", curve_allow=keyring / "allowed")
    try:
        assert "WARNING" not in served.log()
    finally:
        served.stop()
    r = run_vigil("serve", "--bundle", str(lqr_bundle), "--curve-secret", str(keyring / "server" / "runtime.key"),
                  "--curve-allow", str(keyring / "allowed"), "--robot-endpoint", tcp_endpoint(),
                  "--operator-endpoint", tcp_endpoint(), "--store", str(tmp_path / "x.db"))
    assert r.returncode == 2 and "no secret key" in r.stderr
