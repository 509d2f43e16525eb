"""The image-conditioned ("vision") flow ensemble: FlowConfig.image_size > 0 adds a per-member CNN over a
uint8 camera frame to `encode` (training/flow.py). Checked here: shapes and the observation forms the
functions accept, member independence of the stacked CNNs, training on a tiny image dataset where only
the image tells the answer, the demo dataset and checkpoint paths (training/train_flow.py), ONNX parity
of the exported graph (state + image inputs) and the bundle served by the runtime, over real sockets,
to a MetaWorldEnv(camera=True) robot.

Tiny sizes throughout (hidden 32, 4/8 conv channels, M = 3); nothing is downloaded (the instruction
encoder bundle is the session fixture of tests/conftest.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vigil.training.flow import (
    Ensemble,
    FlowConfig,
    ImageEncoder,
    StackedConv,
    conv_out,
    gu,
    plan,
    sample,
    sample_members,
    train_ensemble,
    vfd_two_way,
)
from vigil.wire.protocol import ArraySpec

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

S = 64
CFG = FlowConfig(horizon=4, hidden=32, depth=2, members=3, image_size=S, image_channels=4, image_features=8,
                 steps=250, batch_size=32, lr=3e-3, weight_decay=0.0, seed=0)
INSTRUCTION = "reach the goal position with the gripper"
CHUNK_ATOL, VFD_RTOL = 1e-5, 1e-4  # as tests/test_flow_export.py


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Autouse at module scope, so the module-scoped training fixture runs on one thread too."""


def observation(batch: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = torch.randn(batch, CFG.obs_dim, generator=g)
    image = torch.randint(0, 256, (batch, S, S, 3), dtype=torch.uint8, generator=g)
    return {"state": state, "image": image}, torch.randn(batch, CFG.instr_dim, generator=g)


def square_images(side: np.ndarray, seed: int = 0) -> np.ndarray:
    """Grey noisy frames with a bright red 16 x 16 square in the left (side 0) or right (side 1) half."""
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 130, (len(side), S, S, 3), dtype=np.uint8)
    rows = rng.integers(8, S - 24, len(side))
    for i, (s, r) in enumerate(zip(side, rows)):
        c = 8 if s == 0 else S - 24
        img[i, r:r + 16, c:c + 16] = (230, 30, 30)
    return img


def image_dataset(n: int = 192, seed: int = 0):
    """The answer is in the image only: state is noise, one instruction; chunk = +0.5 (square left) or
    -0.5 (square right) everywhere. A state-only model can do no better than the bimodal mixture."""
    rng = np.random.default_rng(seed)
    side = rng.integers(0, 2, n)
    state = rng.standard_normal((n, CFG.obs_dim)).astype(np.float32)
    instr = np.repeat(rng.standard_normal((1, CFG.instr_dim)).astype(np.float32), n, 0)
    chunks = np.where(side[:, None, None] == 0, 0.5, -0.5) * np.ones((n, CFG.horizon, CFG.action_dim), np.float32)
    return {"state": state, "image": square_images(side, seed)}, instr, chunks.astype(np.float32), side


@pytest.fixture(scope="module")
def trained():
    obs, instr, chunks, side = image_dataset()
    ens, hist = train_ensemble(CFG, obs, instr, chunks, progress=False)
    return ens, hist, (obs, instr, chunks, side)


# ---------------------------------------------------------------------------------------------- model


def test_image_encoder_shapes_and_observation_forms():
    ens = Ensemble(CFG)
    assert conv_out(64) == 6 and ens.image_encoder.proj.weight.shape == (3, 2 * 4 * 36, 8)
    assert ens.image_encoder.conv1.weight.shape == (3, 4, 3, 8, 8)      # (M, out, in, k, k)
    assert ens.encoder[0].weight.shape == (3, CFG.obs_dim + CFG.instr_dim + CFG.image_features, CFG.hidden)
    obs, instr = observation(2)
    assert ens.image_encoder(obs["image"]).shape == (3, 2, 8)
    ctx = ens.encode(obs, instr)
    assert ctx.shape == (3, 2, CFG.hidden)
    # member subsets and member-major inputs (training) agree with the shared-input path
    torch.testing.assert_close(ens.encode(obs, instr, members=[2])[0], ctx[2], rtol=0, atol=0)
    mm = {"state": obs["state"][None].expand(3, -1, -1), "image": obs["image"][None].expand(3, -1, -1, -1, -1)}
    torch.testing.assert_close(ens.encode(mm, instr[None].expand(3, -1, -1)), ctx, atol=1e-6, rtol=1e-5)
    # numpy inputs work as tensors do
    np_obs = {"state": obs["state"].numpy(), "image": obs["image"].numpy()}
    torch.testing.assert_close(ens.encode(np_obs, instr.numpy()), ctx)
    # every score takes the mapping
    g = torch.Generator().manual_seed(1)
    z, zm = torch.randn(5, 2, 4, 4, generator=g), torch.randn(3, 5, 2, 4, 4, generator=g)
    chunk, vfd = plan(ens, obs, instr, z)
    assert chunk.shape == (2, 4, 4) and vfd.shape == (2,) and torch.all(vfd > 0)
    assert sample(ens, obs, instr, z[0]).shape == (2, 4, 4)
    assert sample_members(ens, obs, instr, z).shape == (3, 5, 2, 4, 4)
    assert vfd_two_way(ens, obs, instr, zm).shape == gu(ens, obs, instr, z).shape == (2,)
    # refusals: a bare state, a missing image, a float image, a wrong size
    with pytest.raises(ValueError, match="image-conditioned"):
        plan(ens, obs["state"], instr, z)
    with pytest.raises(ValueError, match="'image'"):
        ens.encode({"state": obs["state"]}, instr)
    with pytest.raises(ValueError, match="uint8"):
        ens.encode({**obs, "image": obs["image"].float()}, instr)
    with pytest.raises(ValueError, match="uint8"):
        ens.encode({**obs, "image": obs["image"][:, :32, :32]}, instr)


def test_state_only_ensemble_accepts_a_mapping_and_ignores_the_image():
    cfg = FlowConfig(horizon=4, hidden=32, depth=2, members=2)
    ens = Ensemble(cfg)
    assert ens.image_encoder is None
    obs, instr = observation(3)
    z = torch.randn(5, 3, 4, 4)
    a, b = plan(ens, obs["state"], instr, z), plan(ens, obs, instr, z)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_shared_encoder_has_one_cnn():
    ens = Ensemble(FlowConfig(**{**CFG.__dict__, "shared_encoder": True}))
    assert ens.image_encoder.conv1.weight.shape[0] == 1 and ens.image_encoder.proj.weight.shape[0] == 1
    obs, instr = observation(2)
    ctx = ens.encode(obs, instr)
    assert ctx.shape == (3, 2, CFG.hidden)
    mm = {"state": obs["state"][None].expand(3, -1, -1), "image": obs["image"][None].expand(3, -1, -1, -1, -1)}
    torch.testing.assert_close(ens.encode(mm, instr[None].expand(3, -1, -1)), ctx, atol=1e-6, rtol=1e-5)


def test_members_cnns_are_independent():
    """Perturbing member 1's CNN changes member 1's velocity only; members' CNNs come from their own seeds
    (the first two members of M = 3 are the members of M = 2)."""
    ens = Ensemble(CFG)
    obs, instr = observation(2)
    x, t = torch.randn(1, 1, 2, CFG.chunk_dim, generator=torch.Generator().manual_seed(2)), 0.3
    before, f_before = ens.velocity(ens.encode(obs, instr), x, t), ens.image_encoder(obs["image"])
    w = ens.image_encoder.conv1.weight
    with torch.no_grad():
        w[1] += torch.randn(w[1].shape, generator=torch.Generator().manual_seed(3))
    after, f_after = ens.velocity(ens.encode(obs, instr), x, t), ens.image_encoder(obs["image"])
    assert torch.equal(before[0], after[0]) and torch.equal(before[2], after[2])
    assert torch.equal(f_before[0], f_after[0]) and torch.equal(f_before[2], f_after[2])
    assert (f_before[1] - f_after[1]).abs().max() > 1e-2 and (before[1] - after[1]).abs().max() > 1e-5
    e2 = Ensemble(FlowConfig(**{**CFG.__dict__, "members": 2}))
    for (k, p2), p3 in zip(e2.named_parameters(), Ensemble(CFG).parameters()):
        assert torch.equal(p2, p3[:2]), k
    conv = Ensemble(CFG).image_encoder.conv1.weight
    assert not torch.equal(conv[0], conv[1])
    ens.copy_member(0, 1)
    assert torch.equal(ens.image_encoder.conv1.weight[0], ens.image_encoder.conv1.weight[1])
    assert isinstance(ens.image_encoder, ImageEncoder) and isinstance(ens.image_encoder.conv2, StackedConv)


# ------------------------------------------------------------------------------------------- training


def test_training_learns_what_only_the_image_shows(trained):
    ens, hist, (obs, instr, chunks, side) = trained
    first, last = hist["loss"][:20].mean(), hist["loss"][-20:].mean()
    assert last < 0.6 * first, (first, last)
    # the image decides the chunk: new frames, each member's sample has the square's sign
    test_side = np.array([0, 1] * 8)
    g = torch.Generator().manual_seed(5)
    o = {"state": torch.randn(16, CFG.obs_dim, generator=g), "image": torch.as_tensor(square_images(test_side, 5))}
    z = torch.randn(1, 16, 4, 4, generator=g)
    a = sample_members(ens, o, torch.as_tensor(instr[:16]), z)[:, 0].mean(dim=(-1, -2))  # (M, 16)
    want = torch.as_tensor(np.where(test_side == 0, 1.0, -1.0), dtype=torch.float32)
    assert torch.all(a * want > 0.15), a
    with pytest.raises(ValueError, match="mapping"):
        train_ensemble(CFG, obs["state"], instr, chunks, progress=False)
    with pytest.raises(ValueError, match="uint8"):
        train_ensemble(CFG, {**obs, "image": obs["image"].astype(np.float32)}, instr, chunks, progress=False)


def test_dataset_tensors_and_checkpoint(tmp_path, trained, encoder_bundle):
    from vigil.policies.instructions import InstructionEncoder
    from vigil.runtime.config import ConfigError
    from vigil.training.demos import DemoSet, DemoWriter, Episode
    from vigil.training.train_flow import (
        check_flow_config,
        dataset_tensors,
        load_checkpoint,
        load_flow_config,
        save_checkpoint,
    )

    def episode(T: int, image: np.ndarray | None) -> Episode:
        obs = {"state": np.arange((T + 1) * 39, dtype=np.float32).reshape(T + 1, 39)}
        if image is not None:
            obs["image"] = image
        ok = np.zeros(T, bool)
        ok[-1] = True
        return Episode(task="reach-v3", instruction=INSTRUCTION, seed=0, observations=obs,
                       actions=np.ones((T, 4), np.float32), rewards=np.zeros(T, np.float32), success=ok)

    frames = np.random.default_rng(0).integers(0, 256, (6, S, S, 3), dtype=np.uint8)
    w = DemoWriter(tmp_path / "demos")
    w.add(episode(5, frames))
    enc = InstructionEncoder.load(encoder_bundle, prefer_gpu=False)
    obs, instr, chunks = dataset_tensors(DemoSet(tmp_path / "demos"), CFG, enc)
    assert set(obs) == {"state", "image"} and obs["image"].dtype == np.uint8
    assert obs["state"].shape == (5, 39) and obs["image"].shape == (5, S, S, 3) and chunks.shape == (5, 4, 4)
    np.testing.assert_array_equal(obs["image"], frames[:5])  # image t goes with state t and action t
    state_only, _, _ = dataset_tensors(DemoSet(tmp_path / "demos"), FlowConfig(horizon=4), enc)
    assert isinstance(state_only, np.ndarray) and state_only.shape == (5, 39)

    w2 = DemoWriter(tmp_path / "blind")
    w2.add(episode(3, None))
    with pytest.raises(ValueError, match=r"episode .* has no 'image'.*--camera"):
        dataset_tensors(DemoSet(tmp_path / "blind"), CFG, enc)
    w3 = DemoWriter(tmp_path / "small")
    w3.add(episode(3, frames[:4, :32, :32]))
    with pytest.raises(ValueError, match="image_size"):
        dataset_tensors(DemoSet(tmp_path / "small"), CFG, enc)
    for bad, key in ((dict(image_size=8), "'flow.image_size'"), (dict(image_channels=0), "'flow.image_channels'"),
                     (dict(image_features=0), "'flow.image_features'")):
        with pytest.raises(ConfigError, match=key):
            check_flow_config(FlowConfig(**{**CFG.__dict__, **bad}))
    vision = load_flow_config(Path(__file__).resolve().parents[1] / "configs" / "flow-vision.toml")
    assert vision.image_size == 64 and vision.members >= 2

    ens, hist, _ = trained
    save_checkpoint(tmp_path / "ensemble.pt", ens, CFG, {"test": True}, hist)
    back, cfg, _ = load_checkpoint(tmp_path / "ensemble.pt")
    assert cfg == CFG
    o, ins = observation(2)
    z = torch.randn(5, 2, 4, 4)
    for x, y in zip(plan(ens, o, ins, z), plan(back, o, ins, z)):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------------------- export, runtime


@pytest.fixture(scope="module")
def bundle(trained, encoder_bundle, tmp_path_factory) -> Path:
    from vigil.training.flow_export import export_flow_ensemble

    folder = tmp_path_factory.mktemp("vision_bundle") / "reach-vision"
    export_flow_ensemble(folder, trained[0], CFG, encoder_bundle, "reach-vision", prov={"test": "vision"})
    return folder


@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_matches_torch_plan(trained, bundle, batch):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle / "policy.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in sess.get_inputs()] == [
        ("state", "tensor(float)"), ("image", "tensor(uint8)"), ("instruction", "tensor(float)"),
        ("noise", "tensor(float)")]
    obs, instr = observation(batch, seed=batch)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(CFG.vfd_samples, batch, CFG.horizon, CFG.action_dim, generator=g)
    chunk, vfd = plan(trained[0], obs, instr, noise)
    got_chunk, got_vfd = sess.run(["action", "vfd"], {
        "state": obs["state"].numpy(), "image": obs["image"].numpy(), "instruction": instr.numpy(),
        "noise": noise.transpose(0, 1).contiguous().numpy()})
    np.testing.assert_allclose(got_chunk, chunk.numpy(), rtol=0, atol=CHUNK_ATOL)
    np.testing.assert_allclose(got_vfd, vfd.numpy(), rtol=VFD_RTOL, atol=1e-7)
    assert np.all(got_vfd > 0)


def test_manifest_and_agent(bundle):
    from vigil.policies.agent import Agent
    from vigil.policies.bundle import FlowEnsemblePolicy, load_policy

    policy = load_policy(bundle, prefer_gpu=False)
    assert isinstance(policy, FlowEnsemblePolicy)
    m = policy.manifest
    assert [s.to_dict() for s in m.observation] == [ArraySpec("state", "float32", (39,)).to_dict(),
                                                     ArraySpec("image", "uint8", (S, S, 3)).to_dict()]
    assert m.onnx_inputs == {"state": "state", "image": "image"} and m.normalisation == {}
    assert m.provenance["config"]["image_size"] == S
    agent = Agent(policy)
    agent.reset(instruction=INSTRUCTION, seed=0)
    obs, _ = observation(1)
    for _ in range(3):
        step = agent.act({"state": obs["state"][0].numpy(), "image": obs["image"][0].numpy()})
        assert step.action.shape == (4,) and np.isfinite(step.scores["vfd"]) and step.scores["vfd"] > 0


def test_end_to_end_episode_with_camera(bundle, serve, links):
    """`vigil serve` hosts the vision bundle; a MetaWorldEnv(camera=True) robot sends state + uint8 image
    over real sockets and gets actions and VFD verdicts back."""
    from vigil.sim.metaworld_env import MetaWorldEnv

    served = serve(bundle)
    env = MetaWorldEnv("reach-v3", camera=True, image_size=S)
    try:
        link = links(served.robot_endpoint, "cam-1", hello=False)
        link.hello(env.observation_spec, ArraySpec("action", "float32", (4,)))
        assert link.reset(instruction=env.instruction, seed=0).kind == "reset"
        o = env.reset(seed=3)
        assert o["image"].dtype == np.uint8 and o["image"].shape == (S, S, 3)
        for _ in range(6):
            reply = link.act(o, timeout_s=10)
            assert reply.kind == "act", reply.meta
            action = np.asarray(reply.arrays["action"])
            assert action.shape == (4,) and np.all(np.abs(action) <= 1)
            o = env.step(action).obs
        reply = link.act({"state": o["state"]}, timeout_s=10)  # the image is declared: it must come
        assert reply.kind == "error" and reply.meta["code"] == "bad_shape", reply.meta
    finally:
        env.close()
