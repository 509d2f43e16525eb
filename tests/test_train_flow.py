"""`vigil train flow` (training/train_flow.py): the [flow] config loader, the training examples built from
a demonstration dataset, and the command end to end as a child process on a recorded dataset.

The instruction-encoder bundle is exported once per session (as tests/test_instructions.py does) and
passed to the command with --encoder, so the command reuses it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_vigil

from vigil.runtime.config import ConfigError
from vigil.training.demos import DemoSet, DemoWriter, Episode
from vigil.training.flow import FlowConfig
from vigil.training.train_flow import dataset_tensors, flow_config_from_dict, load_checkpoint, load_flow_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "flow-tiny.toml"


@pytest.fixture(scope="session")
def flow_encoder_bundle(encoder_bundle) -> Path:
    return encoder_bundle  # one export per session (tests/conftest.py)


@pytest.fixture(scope="session")
def flow_encoder(flow_encoder_bundle):
    from vigil.policies.instructions import InstructionEncoder

    return InstructionEncoder.load(flow_encoder_bundle, prefer_gpu=False)


# ------------------------------------------------------------------------------------------------ config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_shipped_configs_load():
    assert load_flow_config(ROOT / "configs" / "flow-mt10.toml") == FlowConfig()  # the defaults, spelled out
    tiny = load_flow_config(TINY)
    assert (tiny.hidden, tiny.members) == (32, 2) and tiny.steps <= 1000


def test_config_overrides_and_int_for_float(tmp_path):
    cfg = load_flow_config(write(tmp_path, "[flow]\nlr = 1\nmembers = 3\n"), seed=9, members=None)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.members == 3 and cfg.seed == 9


@pytest.mark.parametrize("text, words", [
    ("[flow]\nhiden = 32\n", ["'flow.hiden'", "unknown"]),
    ("[flow]\nhidden = 32.5\n", ["'flow.hidden'", "int"]),
    ("[flow]\nhidden = true\n", ["'flow.hidden'", "int"]),
    ("[flow]\nlr = \"fast\"\n", ["'flow.lr'", "float"]),
    ("[flow]\nshared_encoder = 1\n", ["'flow.shared_encoder'", "bool"]),
    ("[flow]\nvfd_pairs = 2\n", ["'flow.vfd_pairs'", "str"]),
    ("[flow]\nvfd_pairs = \"all\"\n", ["'flow.vfd_pairs'", "one of"]),
    ("[flow]\nmembers = 0\n", ["'flow.members'", ">= 1"]),
    ("[flow]\ntime_features = 7\n", ["'flow.time_features'", "even"]),
    ("[flow]\nlr = -1e-3\n", ["'flow.lr'", "> 0"]),
    ("[train]\nsteps = 3\n", ["'train'", "[flow]"]),
    ("steps = 3\n", ["'steps'", "[flow]"]),
    ("", ["'flow'", "table"]),
    ("[flow\n", ["not valid TOML"]),
])
def test_config_errors_name_the_key(tmp_path, text, words):
    with pytest.raises(ConfigError) as err:
        load_flow_config(write(tmp_path, text))
    for w in words:
        assert w in str(err.value), str(err.value)


def test_override_types_are_checked():
    with pytest.raises(ConfigError, match="'flow.seed' must be a int"):
        flow_config_from_dict({"flow": {}}, seed="1")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_flow_config(tmp_path / "nope.toml")


# -------------------------------------------------------------------------------------------------- data


def episode(task: str, instruction: str, T: int, base: float, success: bool = True) -> Episode:
    state = (base + np.arange((T + 1) * 39, dtype=np.float32).reshape(T + 1, 39) / 1000).astype(np.float32)
    actions = (base + np.arange(T * 4, dtype=np.float32).reshape(T, 4) / 100).astype(np.float32)
    ok = np.zeros(T, bool)
    ok[-1] = success
    return Episode(task=task, instruction=instruction, seed=0, observations={"state": state}, actions=actions,
                   rewards=np.zeros(T, np.float32), success=ok, meta={"control_rate_hz": 80.0})


@pytest.fixture
def tiny_set(tmp_path) -> DemoSet:
    w = DemoWriter(tmp_path / "demos")
    w.add(episode("reach-v3", "reach the red target", T=5, base=0.0))
    w.add(episode("push-v3", "push the puck to the goal", T=3, base=10.0))
    w.add(episode("push-v3", "push the puck to the goal", T=4, base=20.0, success=False))
    return DemoSet(tmp_path / "demos")


def test_dataset_tensors_shapes_values_and_padding(tiny_set, flow_encoder):
    cfg = FlowConfig(horizon=4)
    stats: dict = {}
    obs, instr, chunks = dataset_tensors(tiny_set, cfg, flow_encoder, stats=stats)
    n = 5 + 3  # the failed episode is left out
    assert obs.shape == (n, 39) and instr.shape == (n, 384) and chunks.shape == (n, 4, 4)
    assert obs.dtype == instr.dtype == chunks.dtype == np.float32
    eps = [tiny_set.load(e.id) for e in tiny_set.episodes(success=True)]
    reach, push = eps  # index order
    # obs_t is the observation the action was taken on; the final observation is not used
    np.testing.assert_array_equal(obs[:5], reach.observations["state"][:5])
    np.testing.assert_array_equal(obs[5:], push.observations["state"][:3])
    # chunk t = actions t..t+H-1, the last action repeated past the end
    a = reach.actions
    np.testing.assert_array_equal(chunks[0], a[0:4])
    np.testing.assert_array_equal(chunks[3], np.stack([a[3], a[4], a[4], a[4]]))
    np.testing.assert_array_equal(chunks[4], np.stack([a[4]] * 4))
    b = push.actions
    np.testing.assert_array_equal(chunks[5], np.stack([b[0], b[1], b[2], b[2]]))
    np.testing.assert_array_equal(chunks[7], np.stack([b[2]] * 4))
    # instructions map to the onboard encoder's embeddings, one per episode
    expected = flow_encoder.embed(["reach the red target", "push the puck to the goal"])
    np.testing.assert_array_equal(instr[:5], np.repeat(expected[:1], 5, 0))
    np.testing.assert_array_equal(instr[5:], np.repeat(expected[1:], 3, 0))
    assert not np.allclose(expected[0], expected[1])
    assert stats["reach-v3"]["episodes"] == 1 and stats["reach-v3"]["steps"] == 5
    assert stats["push-v3"]["episodes"] == 1 and stats["push-v3"]["steps"] == 3


def test_dataset_tensors_task_filter_and_failed_episodes(tiny_set, flow_encoder):
    cfg = FlowConfig(horizon=2)
    obs, instr, chunks = dataset_tensors(tiny_set, cfg, flow_encoder, tasks=["push-v3"], successful_only=False)
    assert obs.shape == (3 + 4, 39) and chunks.shape == (7, 2, 4)
    with pytest.raises(ValueError, match="not in"):
        dataset_tensors(tiny_set, cfg, flow_encoder, tasks=["door-open-v3"])
    with pytest.raises(ValueError, match="obs_dim"):
        dataset_tensors(tiny_set, FlowConfig(obs_dim=12), flow_encoder)
    with pytest.raises(ValueError, match="instr_dim"):
        dataset_tensors(tiny_set, FlowConfig(instr_dim=16), flow_encoder)


# ---------------------------------------------------------------------------------------------- end to end


def test_onboard_cli_does_not_import_torch():
    code = "import sys, vigil.runtime.cli; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_vigil_train_flow_end_to_end(tmp_path, flow_encoder_bundle):
    demos, out = tmp_path / "demos", tmp_path / "run"
    r = run_vigil("demos", "record", "--tasks", "reach-v3", "--episodes", "2", "--out", str(demos))
    assert r.returncode == 0, r.stderr
    r = run_vigil("train", "flow", "--config", str(TINY), "--demos", str(demos), "--out", str(out),
                  "--encoder", str(flow_encoder_bundle), "--seed", "3", "--tasks", "reach-v3",
                  "--dynamics-steps", "200", timeout=300)
    assert r.returncode == 0, f"{r.stdout}\n{r.stderr[-3000:]}"
    assert "reusing" in r.stdout
    assert "flow M=2" in r.stderr  # the progress bar
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out / "ensemble.pt").is_file() and (out / "learning_curve.png").stat().st_size > 1000
    with open(out / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    cfg = load_flow_config(TINY)
    assert len(rows) == cfg.steps and set(rows[0]) == {"step", "loss", "member_0", "member_1"}
    loss = np.array([float(r["loss"]) for r in rows])
    k = len(loss) // 10
    assert loss[-k:].mean() < 0.8 * loss[:k].mean()
    assert summary["loss_last"] < summary["loss_first"]

    ens, ck_cfg, ck = load_checkpoint(out / "ensemble.pt")  # weights_only=True
    assert ck_cfg.seed == 3 and ck_cfg.hidden == 32 and ck_cfg.members == 2
    prov = json.loads((out / "provenance.json").read_text())
    ds = DemoSet(demos)
    steps = sum(e.steps for e in ds.episodes(success=True))
    assert prov["seed"] == 3 and prov["demos"] == str(demos.resolve()) and prov["steps"] == steps
    assert prov["tasks"]["reach-v3"]["episodes"] == len(ds.episodes(success=True)) >= 1
    assert ck["provenance"]["config"] == prov["config"]
    np.testing.assert_allclose(np.asarray(ck["normalisation"]["obs_mean"]), ens.obs_mean.numpy())

    try:
        import vigil.training.flow_export  # noqa: F401
    except ModuleNotFoundError:
        assert summary["bundle"] is None and "not available yet" in r.stdout
        return
    from vigil.policies.bundle import load_policy

    assert summary["bundle"] is not None
    policy = load_policy(out / "bundle")
    assert policy.manifest.kind == "flow_ensemble"
    # the dynamics monitor's ensemble rides in the bundle (uncalibrated until `vigil calibrate`)
    assert summary["dynamics"]["model"] == "dynamics.onnx" and policy.dynamics is not None
    assert "bands" not in policy.manifest.monitor["dynamics"]

    # a run whose export failed can be exported later from its checkpoint alone
    import shutil

    from vigil.training.train_flow import export_run

    shutil.rmtree(out / "bundle")
    (out / "provenance.json").unlink()
    export_run(out, log=lambda _: None)
    again = load_policy(out / "bundle")
    assert again.manifest.provenance["seed"] == 3 and again.manifest.name == policy.manifest.name
    assert json.loads((out / "provenance.json").read_text())["bundle"] == str((out / "bundle").resolve())
    from vigil.training import dynamics  # a re-exported bundle gets its dynamics ensemble again (vigil train dynamics)

    dynamics.add_to_bundle(out / "bundle", dynamics.from_demos([demos]), dynamics.DynamicsConfig(steps=100),
                           progress=False, log=lambda _: None)

    # calibrate the VFD monitor on nominal rollouts of unseen variants, as a deployment would
    r = run_vigil("calibrate", "--bundle", str(out / "bundle"), "--episodes", "3", "--seed", "40",
                  "--max-steps", "60", "--stop", "0.05", "--all-episodes", "--no-progress", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    block = json.loads(r.stdout)
    policy = load_policy(out / "bundle")  # the graph's sha256 still matches: only the manifest changed
    vfd = policy.manifest.monitor["vfd"]
    failure = block.pop("failure")  # the failure monitor, from the same rollouts (the RND head is on by default)
    dyn = block.pop("dynamics")  # and the dynamics monitor, from every rollout's states and actions
    assert dyn["episodes"] == 3 and dyn["window"] == 20
    assert set(policy.manifest.monitor["dynamics"]["bands"]["reach-v3"]) == {"robot", "object", "disagreement"}
    from vigil.monitors.dynamics import dynamics_monitor

    assert dynamics_monitor(policy) is not None
    assert vfd == block and vfd["tasks"] == ["reach-v3"] and vfd["window"] == 3 and vfd["episodes"] == 3
    assert policy.manifest.onnx_scores == ("vfd", "rnd") and failure["episodes"] == 3
    assert "will not alarm" in failure["note"]  # 3 episodes cannot set a 10% per-episode rate
    assert policy.manifest.monitor["failure"]["bands"]["*"]["logit"]["q"] is None
    t = vfd["thresholds"]  # a tiny ensemble may fail every rollout, hence --all-episodes
    assert 0 < t["warn"] <= t["alert"] <= t["stop"] < float("inf")
    from vigil.monitors.vfd import VFDMonitor

    assert VFDMonitor.from_manifest(vfd).thresholds


def test_vigil_train_flow_reports_config_errors(tmp_path):
    bad = write(tmp_path, "[flow]\nmembrs = 2\n")
    (tmp_path / "demos").mkdir()
    r = run_vigil("train", "flow", "--config", str(bad), "--demos", str(tmp_path / "demos"), "--out",
                  str(tmp_path / "run"))
    assert r.returncode == 2 and "'flow.membrs'" in r.stderr and "Traceback" not in r.stderr
