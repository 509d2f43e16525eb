"""The flow_ensemble bundle (training/flow_export.py): ONNX against torch `plan`, the bundle under the
runtime's Agent, and an end-to-end episode over real sockets with a tiny trained ensemble.

Fixtures: the instruction-encoder bundle once per session (through the CLI, as tests/test_instructions.py
does); per module a tiny ensemble (hidden 32, M = 3) trained for a few hundred steps on scripted-expert
demonstrations of Meta-World reach-v3, and its exported bundle with a VFD monitor whose `alert`
threshold sits between the nominal scores and the score of an out-of-distribution observation.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vigil.training.flow import FlowConfig, make_chunks, plan, train_ensemble
from vigil.wire.protocol import ArraySpec

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

INSTRUCTION = "push the puck to the goal"
# "lower" pairs at N = 5 exercise the most of the graph (several integrators, several samples); the shipped
# default (anchor, N = 1) has its own parity test below
CFG = FlowConfig(hidden=32, members=3, steps=300, batch_size=128, seed=0, vfd_pairs="lower", vfd_samples=5)
OOD_SHIFT = 3.0  # added to every state dimension: far outside the demonstrations (positions in metres)
# float32 parity: the graph runs the same products and sums as torch, in a possibly different order.
CHUNK_ATOL, VFD_RTOL = 1e-5, 1e-4


@pytest.fixture(scope="session")
def flow_encoder_bundle(encoder_bundle) -> Path:
    return encoder_bundle  # one export per session (tests/conftest.py)


def expert_demos(episodes: int = 2, steps: int = 120) -> tuple[np.ndarray, np.ndarray]:
    from vigil.sim.metaworld_env import MetaWorldEnv

    env = MetaWorldEnv("reach-v3")
    obs, chunks = [], []
    try:
        for ep in range(episodes):
            o, states, actions = env.reset(seed=ep), [], []
            for _ in range(steps):
                a = env.expert_action(o["state"])
                states.append(o["state"])
                actions.append(a)
                o = env.step(a).obs
            obs.append(np.stack(states))
            chunks.append(make_chunks(np.stack(actions).astype(np.float32), CFG.horizon))
    finally:
        env.close()
    return np.concatenate(obs), np.concatenate(chunks)


@pytest.fixture(scope="module")
def trained(flow_encoder_bundle):
    """(ensemble, nominal observations, instruction embedding (1, 384))."""
    from vigil.policies.instructions import InstructionEncoder

    torch.manual_seed(0)
    instr = InstructionEncoder.load(flow_encoder_bundle).embed([INSTRUCTION])
    obs, chunks = expert_demos()
    ens, hist = train_ensemble(CFG, obs, np.repeat(instr, len(obs), 0), chunks, progress=False)
    assert hist["loss"][-20:].mean() < hist["loss"][:20].mean()
    return ens, obs, instr


@pytest.fixture(scope="module")
def bundle(trained, flow_encoder_bundle, tmp_path_factory) -> Path:
    """The exported bundle, monitor.vfd calibrated on nominal plans (window 1: one plan decides)."""
    from vigil.training.flow_export import export_flow_ensemble

    ens, obs, instr = trained
    g = torch.Generator().manual_seed(1)
    nominal = torch.as_tensor(obs[::4])
    noise = torch.randn(CFG.vfd_samples, len(nominal), CFG.horizon, CFG.action_dim, generator=g)
    _, vfd_nom = plan(ens, nominal, torch.as_tensor(instr).expand(len(nominal), -1), noise)
    _, vfd_ood = plan(ens, nominal + OOD_SHIFT, torch.as_tensor(instr).expand(len(nominal), -1), noise)
    hi, lo = float(vfd_nom.max()), float(vfd_ood.min())
    assert lo > 4 * hi, (hi, lo)  # the tiny ensemble does tell the shift apart
    alert = float(np.sqrt(hi * lo))
    folder = tmp_path_factory.mktemp("flow_bundle") / "reach-flow"
    export_flow_ensemble(folder, ens, CFG, flow_encoder_bundle, "reach-flow", prov={"test": "flow_export"},
                         monitor={"vfd": {"score": "vfd", "window": 1,
                                          "thresholds": {"warn": alert / 2, "alert": alert}}})
    return folder


# -- 1. ONNX parity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 4])
def test_onnx_matches_torch_plan(trained, bundle, batch):
    """onnxruntime == torch `plan` (member 0's chunk from noise sample 0, one-way VFD) on random inputs:
    chunk within 1e-5 absolute, VFD within 1e-4 relative."""
    import onnxruntime as ort

    ens, _, _ = trained
    sess = ort.InferenceSession(str(bundle / "policy.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(batch)
    obs = torch.as_tensor(trained[1][:batch]) + torch.randn(batch, CFG.obs_dim, generator=g) * 0.1
    instr = torch.randn(batch, CFG.instr_dim, generator=g)
    noise = torch.randn(CFG.vfd_samples, batch, CFG.horizon, CFG.action_dim, generator=g)
    chunk, vfd = plan(ens, obs, instr, noise)
    got_chunk, got_vfd = sess.run(["action", "vfd"], {"state": obs.numpy(), "instruction": instr.numpy(),
                                                      "noise": noise.transpose(0, 1).contiguous().numpy()})
    assert got_chunk.shape == (batch, CFG.horizon, CFG.action_dim) and got_vfd.shape == (batch,)
    np.testing.assert_allclose(got_chunk, chunk.numpy(), rtol=0, atol=CHUNK_ATOL)
    np.testing.assert_allclose(got_vfd, vfd.numpy(), rtol=VFD_RTOL, atol=1e-7)
    assert np.all(got_vfd > 0)


def test_onnx_matches_torch_plan_with_the_default_pairs_and_samples(trained, flow_encoder_bundle, tmp_path):
    """The shipped default, anchor pairs at N = 1 (decision 71), exported from the same ensemble."""
    import dataclasses

    import onnxruntime as ort

    from vigil.training.flow_export import export_flow_ensemble

    ens, obs, _ = trained
    cfg = dataclasses.replace(CFG, vfd_pairs=FlowConfig().vfd_pairs, vfd_samples=FlowConfig().vfd_samples)
    assert (cfg.vfd_pairs, cfg.vfd_samples) == ("anchor", 1)
    export_flow_ensemble(tmp_path, ens, cfg, flow_encoder_bundle, "anchor-n1")
    sess = ort.InferenceSession(str(tmp_path / "policy.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(5)
    state = torch.as_tensor(obs[:3]) + torch.randn(3, CFG.obs_dim, generator=g) * 0.1
    instr = torch.randn(3, CFG.instr_dim, generator=g)
    noise = torch.randn(1, 3, CFG.horizon, CFG.action_dim, generator=g)
    chunk, vfd = plan(ens, state, instr, noise, pairs="anchor")
    got_chunk, got_vfd = sess.run(["action", "vfd"], {"state": state.numpy(), "instruction": instr.numpy(),
                                                      "noise": noise.transpose(0, 1).contiguous().numpy()})
    np.testing.assert_allclose(got_chunk, chunk.numpy(), rtol=0, atol=CHUNK_ATOL)
    np.testing.assert_allclose(got_vfd, vfd.numpy(), rtol=VFD_RTOL, atol=1e-7)
    assert np.all(got_vfd > 0)


def test_manifest_and_provenance(bundle):
    from vigil.policies.manifest import read_manifest

    m = read_manifest(bundle)
    assert m.kind == "flow_ensemble" and m.chunk_length == 8 and m.chunk_execute == 4
    assert m.normalisation == {}  # standardisation is inside the graph
    assert m.extra["encoder"] == "encoder" and (bundle / "encoder" / "encoder.json").is_file()
    assert m.extra["noise_shape"] == [CFG.vfd_samples, CFG.horizon, CFG.action_dim]
    p = m.provenance
    assert p["members"] == 3 and p["vfd_pairs"] == "lower" and p["config"]["hidden"] == 32
    assert p["parameters"] > 0 and p["test"] == "flow_export" and "git_commit" in p


# -- 2. the bundle under the runtime's Agent -----------------------------------------------------------------


def test_agent_runs_bundle(bundle, trained):
    from vigil.policies.agent import Agent
    from vigil.policies.bundle import FlowEnsemblePolicy, load_policy

    policy = load_policy(bundle, prefer_gpu=False)
    assert isinstance(policy, FlowEnsemblePolicy)
    obs = trained[1]

    def episode(seed: int) -> np.ndarray:
        agent = Agent(policy)
        agent.reset(instruction=INSTRUCTION, seed=seed)
        actions = []
        for t in range(12):
            step = agent.act({"state": obs[t]})
            assert step.replanned == (t % 4 == 0) and step.plan == t // 4 + 1
            assert np.isfinite(step.scores["vfd"]) and step.scores["vfd"] >= 0
            assert np.all(step.action >= -1) and np.all(step.action <= 1)
            actions.append(step.action)
        return np.stack(actions)

    a, b, c = episode(0), episode(0), episode(1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# -- 3. end to end over real sockets --------------------------------------------------------------------------


def test_end_to_end_episode(bundle, serve, links):
    from vigil.runtime.store import AlertStore
    from vigil.sim.metaworld_env import MetaWorldEnv

    served = serve(bundle)
    link = links(served.robot_endpoint, "arm-1", hello=False)
    link.hello((ArraySpec("state", "float32", (39,)),), ArraySpec("action", "float32", (4,)))

    env = MetaWorldEnv("reach-v3")
    try:
        assert link.reset(instruction=INSTRUCTION, seed=0).kind == "reset"
        o = env.reset(seed=5)
        for _ in range(40):
            reply = link.act({"state": o["state"]}, timeout_s=10)
            assert reply.kind == "act", reply.meta
            action = np.asarray(reply.arrays["action"])
            assert action.shape == (4,) and np.all(np.abs(action) <= 1)
            assert not [v for v in reply.meta["verdicts"] if v[0] == "vfd"], reply.meta["verdicts"]
            o = env.step(action).obs
        state = o["state"]
    finally:
        env.close()

    # no instruction: the language-conditioned policy refuses to plan
    assert link.reset(seed=1).kind == "reset"
    reply = link.act({"state": state}, timeout_s=10)
    assert reply.kind == "error" and reply.meta["code"] == "no_instruction", reply.meta

    # out of distribution: the VFD score of the new plan crosses `alert`
    assert link.reset(instruction=INSTRUCTION, seed=2).kind == "reset"
    reply = link.act({"state": (state + OOD_SHIFT).astype(np.float32)}, timeout_s=10)
    assert reply.kind == "act"
    assert ["vfd", "alert"] == reply.meta["verdicts"][0][:2] or any(
        v[:2] == ["vfd", "alert"] for v in reply.meta["verdicts"]), reply.meta["verdicts"]
    served.stop()
    alerts = AlertStore(served.store, readonly=True).since(0)
    assert any(a.monitor == "vfd" and a.severity == "alert" for a in alerts), alerts
