"""The `vigil` command line as an operator uses it: help, serve's refusals, alerts replay and follow, bundle, demo."""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
from conftest import VIGIL, child_env, free_port, run_vigil

from vigil.runtime.config import ConfigError, add_flags, check_fields, config_from_args, describe
from vigil.runtime.store import AlertStore
from vigil.sim.linear import SYSTEMS, oracle
from vigil.wire.protocol import Message

SUBCOMMANDS = {
    "serve": ["--config", *(("--no-" if d is True else "--") + k.replace("_", "-") for k, d, _ in describe()),
              "--log-level"],  # a switch that is on by default is turned off by --no-<key>
    "sim": ["--connect", "--system", "--robot", "--episodes", "--steps", "--seed", "--mode", "--rate", "--act-timeout",
            "--obs-noise", "--drop", "--delay-ms", "--disconnect-at", "--disconnect-s", "--fault-start",
            "--fault-stop", "--noise-dims", "--shift-positions", "--friction", "--mass", "--instruction", "--gain",
            "--action-latency", "--transitions", "--summary", "--key", "--server-key"],
    "alerts": ["--connect", "--store", "--since", "--follow", "--telemetry", "--json", "--timeout", "--key",
               "--server-key"],
    "requests": ["--store", "--status", "--task", "--since", "--json"],
    "expert": ["--store", "--demos", "--connect", "--name", "--lease-s", "--tasks", "--once", "--max", "--timeout",
               "--poll-s"],
    "swap": ["--bundle", "--connect", "--timeout", "--key", "--server-key"],
    "keys": ["name", "--dir"],
    "demo": ["--workdir", "--tasks", "--nominal-episodes", "--shifted-episodes", "--shift", "--eval-episodes",
             "--worn-episodes", "--max-steps", "--save-steps", "--calibration-episodes", "--console-port",
             "--no-record", "--screenshots", "--realtime"],
    "demo-lqr": ["--workdir", "--steps", "--rate", "--outage-s"],
    "console": ["--connect", "--store", "--control", "--bind", "--token-file", "--lease-s", "--poll-s", "--silence-s",
                "--swap-timeout", "--key", "--server-key"],
    "bundle": ["{lqr,encoder}", "--system", "--out", "--learner", "--prior", "--prior-std", "--seed", "--lam", "--g1",
               "--g2"],  # {lqr,encoder}: the positional `kind` with its choices
    "eval": ["--bundle", "--tasks", "--conditions", "--episodes", "--seed", "--max-steps", "--ray", "--address",
             "--workers", "--served", "--runtimes-per-node", "--out"],
    "calibrate": ["--bundle", "--tasks", "--episodes", "--seed", "--window", "--warn", "--alert", "--stop",
                  "--max-steps", "--ray", "--address", "--workers", "--failure", "--all-episodes", "--dynamics",
                  "--dynamics-window", "--no-progress"],
}

TRAIN_SUBCOMMANDS = {  # `vigil train <kind> --help`
    "posttrain": ["--run", "--out", "--config", "--objective", "--iterations", "--episodes", "--seed", "--demos",
                  "--calibration-episodes", "--calibration-all-episodes", "--no-progress", "--reward", "--workers",
                  "--ray", "--address"],
    "flow": ["--config", "--demos", "--out", "--encoder", "--seed", "--tasks", "--rtc", "--no-progress",
             "--dynamics-steps"],
    "dynamics": ["--bundle", "--demos", "--tasks", "--members", "--steps", "--history", "--seed", "--no-progress"],
    "save-round": ["--run", "--old-demos", "--acquired", "--requests", "--out", "--config", "--steps", "--seed",
                   "--calibration-episodes", "--calibration-seed", "--calibration-max-steps",
                   "--calibration-all-episodes", "--encoder", "--no-progress"],
    "bpo": ["--env", "--steps", "--seed", "--out", "--envs", "--no-progress"],
    "ppo": ["--env", "--steps", "--seed", "--out", "--envs", "--no-progress"],
}


def help_entries(text: str) -> dict[str, str]:
    """Option name -> its help entry (the lines from the option to the next one) in argparse --help output."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (\{[\w,-]+\}|-{0,2}[a-z][\w-]*)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def test_top_level_help():
    r = run_vigil("--help")
    assert r.returncode == 0, r.stderr
    for sub in SUBCOMMANDS:
        assert re.search(rf"^\s+{sub}\s+\S", r.stdout, re.M), f"{sub} is not described in vigil --help"
    r = run_vigil()
    assert r.returncode == 2 and "required" in r.stderr  # no subcommand: usage error, not a traceback


@pytest.mark.parametrize("sub", sorted(SUBCOMMANDS))
def test_subcommand_help_documents_every_option(sub):
    r = run_vigil(sub, "--help")
    assert r.returncode == 0, r.stderr
    entries = help_entries(r.stdout)
    for option in SUBCOMMANDS[sub]:
        assert option in entries, f"vigil {sub} --help does not document {option}"
        words = entries[option].split()
        assert len(words) >= 3, f"{option} has no help text: {entries[option]!r}"
    documented = {o for o in entries if o.startswith("--")} - {"--help"}
    assert documented == {o for o in SUBCOMMANDS[sub] if o.startswith("--")}, "options the test does not know of"
    if sub == "serve":  # every serve option states its default, once
        for option in SUBCOMMANDS[sub]:
            if option != "--config":
                assert entries[option].count("default:") == 1, entries[option]


@pytest.mark.parametrize("kind", sorted(TRAIN_SUBCOMMANDS))
def test_train_help_documents_every_option(kind):
    r = run_vigil("train", "--help")
    assert r.returncode == 0 and re.search(rf"^\s+{kind}\s+\S", r.stdout, re.M), r.stdout
    r = run_vigil("train", kind, "--help")
    assert r.returncode == 0, r.stderr
    entries = help_entries(r.stdout)
    for option in TRAIN_SUBCOMMANDS[kind]:
        assert option in entries and len(entries[option].split()) >= 3, f"vigil train {kind}: {option}"
    assert {o for o in entries if o.startswith("--")} - {"--help"} == set(TRAIN_SUBCOMMANDS[kind])


# -- serve refuses what it must refuse ---------------------------------------------------------------------


@pytest.mark.parametrize("args, expected", [
    ([], "bundle"),
    (["--robot-endpoint", "tcp://0.0.0.0:{port}"], "allow_remote"),
    (["--operator-endpoint", "tcp://*:{port}"], "allow_remote"),
    (["--link-timeout-s", "0"], "link_timeout_s"),
    (["--deadline-ms", "-1"], "deadline_ms"),
    (["--request-interval-s", "0"], "request_interval_s"),
    (["--control-endpoint", "tcp://0.0.0.0:{port}"], "allow_remote"),
    (["--control-endpoint", "nowhere"], "control_endpoint"),
])
def test_serve_refuses_bad_configuration(lqr_bundle, tmp_path, args, expected):
    args = [a.format(port=free_port()) for a in args]
    if expected != "bundle":
        args = ["--bundle", str(lqr_bundle), *args]
    r = run_vigil("serve", "--store", str(tmp_path / "a.db"), *args, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert expected in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_serve_refuses_bad_config_file_and_bundle(lqr_bundle, tmp_path):
    cfg = tmp_path / "vigil.toml"
    cfg.write_text('[serve]\nthreads = "many"\n')
    r = run_vigil("serve", "--bundle", str(lqr_bundle), "--config", str(cfg), timeout=60)
    assert r.returncode == 2 and "'serve.threads'" in r.stderr and "int" in r.stderr, r.stderr
    r = run_vigil("serve", "--bundle", str(tmp_path / "no-such-bundle"), "--store", str(tmp_path / "a.db"), timeout=60)
    assert r.returncode == 2 and "manifest.json" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run_vigil("serve", "--bundle", str(lqr_bundle), "--mode", "fast", timeout=60)
    assert r.returncode == 2 and "--mode" in r.stderr


def test_serve_config_file_is_used(serve, lqr_bundle, tmp_path, links):
    cfg = tmp_path / "vigil.toml"
    cfg.write_text('[serve]\nmode = "realtime"\ndeadline_ms = 7\nheartbeat_s = 0.3\n')
    served = serve(lqr_bundle, config=cfg, heartbeat_s=0.2)  # flags override the file
    h = links(served.robot_endpoint, "r").hello_reply
    assert (h.mode, h.deadline_ms, h.heartbeat_s) == ("realtime", 7.0, 0.2)


def test_serve_reports_endpoint_in_use(serve, lqr_bundle, tmp_path):
    served = serve(lqr_bundle)
    r = run_vigil("serve", "--bundle", str(lqr_bundle), "--robot-endpoint", served.robot_endpoint,
                  "--operator-endpoint", f"tcp://127.0.0.1:{free_port()}", "--store", str(tmp_path / "b.db"),
                  timeout=60)
    assert r.returncode == 2 and "in use" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert served.alive()


# -- alerts ------------------------------------------------------------------------------------------------


@pytest.fixture
def filled_store(tmp_path):
    path = tmp_path / "alerts.db"
    store = AlertStore(path)
    for i, (sev, mon, count) in enumerate([("warn", "saturation", 1), ("stop", "link", 1), ("alert", "observation", 3),
                                            ("warn", "protocol", 1), ("stop", "deadline", 12)]):
        store.append(f"robot-{i % 2}", sev, mon, f"reason number {i + 1}", {"i": i}, count)
    store.close()
    return path


def test_alerts_since_replays_the_store(filled_store):
    r = run_vigil("alerts", "--store", str(filled_store), "--since", "2")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["#3", "#4", "#5"]
    assert "ALERT" in lines[0] and "robot-0" in lines[0] and "observation" in lines[0]
    assert "reason number 3" in lines[0] and "(x3)" in lines[0]
    assert "(x" not in lines[1]
    assert "STOP" in lines[2] and "deadline" in lines[2] and "(x12)" in lines[2]
    assert run_vigil("alerts", "--store", str(filled_store), "--since", "5").stdout == ""


def test_alerts_since_json(filled_store):
    r = run_vigil("alerts", "--store", str(filled_store), "--since", "0", "--json")
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["id"] for x in records] == [1, 2, 3, 4, 5]
    assert records[1] == {"topic": "alert.stop", "robot": "robot-1", "t_ns": records[1]["t_ns"], "id": 2,
                          "severity": "stop", "monitor": "link", "reason": "reason number 2", "values": {"i": 1},
                          "count": 1}


def test_alerts_since_missing_store(tmp_path):
    r = run_vigil("alerts", "--store", str(tmp_path / "none.db"), "--since", "0")
    assert r.returncode == 1 and "does not exist" in r.stderr


class LineReader:
    """Collect a child's stdout lines in a thread, so the test can wait for one without blocking forever."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self._t = threading.Thread(target=self._run, args=(proc,), daemon=True)
        self._t.start()

    def _run(self, proc):
        for line in proc.stdout:
            with self._cv:
                self.lines.append(line.rstrip("\n"))
                self._cv.notify_all()

    def wait_for(self, pred, timeout_s: float = 15.0) -> str:
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while True:
                for line in self.lines:
                    if pred(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no such line within {timeout_s} s; got {self.lines[-10:]}")
                self._cv.wait(left)


def test_alerts_follows_live_stream_and_fills_gaps_from_store(serve, lqr_bundle, links):
    served = serve(lqr_bundle, telemetry_s=0.05, link_timeout_s=300)  # no link-loss alert may take an id here
    proc = subprocess.Popen([*VIGIL, "alerts", "--connect", served.operator_endpoint, "--store", str(served.store),
                             "--json", "--telemetry"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env())
    try:
        out = LineReader(proc)
        out.wait_for(lambda line: '"topic": "telemetry"' in line)  # subscribed
        a, b = links(served.robot_endpoint, "robot-a"), links(served.robot_endpoint, "robot-b")
        a.send(Message("error", "robot-a", a.next_seq(), 0, {}, {"code": "e1", "message": "first"}))
        first = json.loads(out.wait_for(lambda line: '"topic": "alert.' in line))
        assert first["id"] == 1 and first["robot"] == "robot-a" and first["monitor"] == "robot"
        # two alerts that reach the store but not the stream (as if PUB had dropped them) ...
        store = AlertStore(served.store)
        missed = [store.append("robot-z", "alert", "vfd", f"missed {i}", {}).id for i in range(2)]
        store.close()
        assert missed == [2, 3]
        # ... are filled in from the store when the next published alert shows the gap
        b.send(Message("error", "robot-b", b.next_seq(), 0, {}, {"code": "e2", "message": "second"}))
        out.wait_for(lambda line: '"id": 4' in line)
        alerts = [json.loads(line) for line in out.lines if '"topic": "alert.' in line]
        assert [x["id"] for x in alerts] == [1, 2, 3, 4]
        assert [x["reason"] for x in alerts[1:3]] == ["missed 0", "missed 1"]
        assert alerts[3]["robot"] == "robot-b" and "e2: second" in alerts[3]["reason"]
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=10)
    assert rc == 0, proc.stderr.read()


# -- bundle and demo ---------------------------------------------------------------------------------------


def test_bundle_command_writes_the_optimal_lqr(tmp_path):
    r = run_vigil("bundle", "lqr", "--system", "uav-2d", "--out", str(tmp_path / "uav"))
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "uav" / "manifest.json").read_text())
    assert manifest["kind"] == "linear_gain" and r.stdout.startswith(f"wrote {tmp_path / 'uav'}")
    K, J = oracle(SYSTEMS["uav-2d"]())
    np.testing.assert_allclose(manifest["extra"]["gain"], K, rtol=1e-7)
    assert manifest["action"]["shape"] == [2] and manifest["observation"][0]["shape"] == [4]
    r = run_vigil("bundle", "lqr", "--system", "moon-lander", "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_demo_runs_end_to_end(tmp_path):
    workdir = tmp_path / "demo"
    r = run_vigil("demo-lqr", "--workdir", str(workdir), "--steps", "200", timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert re.search(r"^result\s+OK", r.stdout, re.M), r.stdout[-2000:]
    [ep] = json.loads((workdir / "sim-summary.json").read_text())
    assert ep["steps"] == 200 and ep["robot_safe"] > 0  # the outage: the robot held the safe action itself
    records = AlertStore(workdir / "alerts.db", readonly=True).since(0)
    assert any(r.monitor == "link" and r.severity == "stop" for r in records)


# -- flags from config dataclasses (runtime/config.py) -------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One field of every kind add_flags knows."""

    out: str = field(metadata={"help": "required: no default"})
    rate_hz: float = field(default=10.0, metadata={"help": "a renamed flag", "flag": "--rate"})
    since: int | None = field(default=None, metadata={"help": "optional, absent by default"})
    folders: tuple[str, ...] = field(default=(), metadata={"help": "one or more", "metavar": "DIR"})
    mode: str = field(default="a", metadata={"help": "a choice", "choices": ("a", "b")})
    verbose: bool = field(default=False, metadata={"help": "a switch on"})
    progress: bool = field(default=True, metadata={"help": "a switch off"})
    name: str = "fixed"  # no help: not a flag

    def __post_init__(self) -> None:
        check_fields(self, [("rate_hz", 0 < self.rate_hz < math.inf, "a finite number > 0 (Hz)")], "example")


def example_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="example")
    add_flags(p, Example)
    return p


def test_flags_from_a_config_dataclass():
    p = example_parser()
    defaults = config_from_args(Example, p.parse_args(["--out", "o"]))
    assert defaults == Example(out="o")
    given = config_from_args(Example, p.parse_args(["--out", "o", "--rate", "2", "--since", "3", "--folders", "x",
                                                    "y", "--mode", "b", "--verbose", "--no-progress"]), name="n")
    assert given == Example("o", 2.0, 3, ("x", "y"), "b", True, False, "n")
    text = p.format_help()
    assert "--rate RATE" in text and "--folders DIR [DIR ...]" in text and "--name" not in text
    assert "(default: 10.0)" in text and "(default: 'a')" in text and "(default: False)" in text
    with pytest.raises(SystemExit):
        p.parse_args([])  # --out is required


def test_toml_table_under_flags_and_one_error_style():
    p = example_parser()
    table = {"mode": "b", "rate_hz": 4, "folders": ["f"]}  # an int for a float, a list for a tuple
    config = config_from_args(Example, p.parse_args(["--out", "o", "--rate", "5"]), table, "example")
    assert (config.mode, config.rate_hz, config.folders) == ("b", 5.0, ("f",))  # flags over the table
    with pytest.raises(ConfigError, match=r"config key 'example.rate_hz' must be a finite number > 0 \(Hz\), got 0.0"):
        config_from_args(Example, p.parse_args(["--out", "o", "--rate", "0"]))
    with pytest.raises(ConfigError, match="'example.sinc' is unknown"):
        config_from_args(Example, p.parse_args(["--out", "o"]), {"sinc": 1}, "example")
    with pytest.raises(ConfigError, match="'example.since' must be a int"):
        config_from_args(Example, p.parse_args(["--out", "o"]), {"since": "1"}, "example")


@pytest.mark.parametrize("args, key", [
    (["sim", "--episodes", "0"], "'episodes'"),
    (["sim", "--drop", "1.5"], "'drop'"),
    (["sim", "--noise-dims", "a,b"], "'noise_dims'"),
    (["expert", "--demos", "d", "--lease-s", "0"], "'lease_s'"),
    (["demo-lqr", "--rate", "nan"], "'rate_hz'"),
    (["demo", "--tasks", "reach-v3,fly-v3"], "'tasks'"),
    (["demo", "--shift", "0"], "'shift'"),
    (["alerts", "--timeout", "-1"], "'timeout'"),
    (["requests", "--since", "-1"], "'since'"),
    (["swap", "--bundle", "b", "--timeout", "0"], "'timeout'"),
    (["keys", "k", "--dir", ""], "'dir'"),
    (["calibrate", "--bundle", "b", "--alert", "1"], "'alert'"),
    (["demos", "record", "--out", "o", "--max-steps", "0"], "'max_steps'"),
    (["bundle", "lqr", "--out", "o", "--learner", "irlqr", "--lam", "0"], "'lam'"),
    (["train", "lqr", "--trials", "0"], "'trials'"),
    (["train", "ppo", "--out", "o", "--envs", "0"], "'envs'"),
])
def test_config_errors_of_every_command(args, key):
    r = run_vigil(*args)
    command = " ".join(args[:2]) if args[0] == "train" else args[0]
    assert r.returncode == 2 and r.stderr.startswith(f"vigil {command}: config key {key} must be"), r.stderr


def test_a_command_whose_extra_is_missing_says_which_to_install():
    code = ("import sys\n"
            "sys.modules['scipy'] = None  # as on a base install: vigil[sim] brings scipy\n"
            "from vigil.runtime.cli import main\n"
            "sys.exit(main(['sim', '--help']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=child_env())
    assert r.returncode == 2 and "vigil sim: needs vigil[sim]" in r.stderr and "Traceback" not in r.stderr, r.stderr
