"""runtime/config.py: ServeConfig refuses bad values with errors that name the key and the expected value,
binds loopback only unless allowed, and loads from TOML with flags overriding the file."""

from __future__ import annotations

import pytest

from vigil.runtime.config import ConfigError, ServeConfig, describe, is_local, load_config


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
