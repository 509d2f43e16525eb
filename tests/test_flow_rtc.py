"""Real-time chunking in the flow_ensemble graph (docs/rtc.md): the hand-written VJP of the velocity head against
torch autograd and a finite difference; the guided and trained graphs against their torch reference
(`flow.plan_rtc`); W = 0 giving the plain graph bit for bit; guidance pulling the committed actions towards the
prefix; training-time RTC (prefix kept, config key checked); the manifest's `extra.rtc` and FlowEnsemblePolicy's
zero prefix. Untrained or briefly trained tiny ensembles, so the file runs in seconds; bundles carry no
instruction encoder (the test feeds the embedding)."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from vigil.policies.rtc import prefix_weights
from vigil.training.flow import Ensemble, FlowConfig, plan, plan_guided, plan_trained, train_ensemble

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# "lower" pairs at N = 2: several integrators, each guided with its own member's VJP, and several noise samples;
# 4 Euler steps keep the unrolled graphs' exports short
CFG = FlowConfig(hidden=32, depth=3, members=3, vfd_pairs="lower", vfd_samples=2, euler_steps=4, seed=3)
TRAINED_CFG = dataclasses.replace(CFG, rtc_max_delay=3, steps=60, batch_size=32, lr=2e-3)
H, M_ACT = CFG.horizon, CFG.action_dim
EXECUTE, DELAY = 4, 2  # s and d of the tests' prefix weights
CHUNK_ATOL, VFD_RTOL = 2e-5, 1e-4


def inputs(cfg: FlowConfig, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """Random state, instruction, noise (N, B, H, m) and a prefix Y (B, H, m) of plausible actions."""
    g = torch.Generator().manual_seed(seed)
    return {"state": torch.randn(batch, cfg.obs_dim, generator=g),
            "instruction": torch.randn(batch, cfg.instr_dim, generator=g),
            "noise": torch.randn(cfg.vfd_samples, batch, cfg.horizon, cfg.action_dim, generator=g),
            "prefix": torch.rand(batch, cfg.horizon, cfg.action_dim, generator=g) * 2 - 1}


def soft_weights(batch: int) -> torch.Tensor:
    return torch.as_tensor(prefix_weights(H, EXECUTE, DELAY, "exp")).expand(batch, H).contiguous()


def hard_weights(batch: int, delay: int = DELAY) -> torch.Tensor:
    return torch.as_tensor(prefix_weights(H, EXECUTE, delay, "zeros")).expand(batch, H).contiguous()


def session(onnx_bytes: bytes):
    import onnxruntime as ort

    return ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])


def run_graph(sess, x: dict[str, torch.Tensor], weight: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    feed = {"state": x["state"].numpy(), "instruction": x["instruction"].numpy(),
            "noise": x["noise"].transpose(0, 1).contiguous().numpy()}
    if weight is not None:
        feed.update(prefix=x["prefix"].numpy(), prefix_weight=weight.numpy())
    return tuple(sess.run(["action", "vfd"], feed))


@pytest.fixture(scope="module")
def ens() -> Ensemble:
    return Ensemble(CFG).eval()


@pytest.fixture(scope="module")
def graphs(ens) -> dict[str, object]:
    from vigil.training.flow_export import export_onnx

    plain = export_onnx(ens, CFG)
    return {"plain": session(plain), "guided": session(export_onnx(ens, CFG, rtc="guided")), "plain_bytes": plain}


@pytest.fixture(scope="module")
def trained():
    """An ensemble trained for a few steps with training-time RTC (d ~ U{0..3}) on a synthetic smooth task, its
    plain and trained-RTC graphs' sessions, and the plain graph's bytes."""
    from vigil.training.flow_export import export_onnx

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = 256
    obs = torch.randn(n, CFG.obs_dim, generator=g)
    instr = torch.randn(1, CFG.instr_dim, generator=g).expand(n, -1)
    base = torch.tanh(obs[:, :M_ACT])                               # the action depends on the state
    chunks = base[:, None, :] * torch.linspace(1.0, 0.5, H)[None, :, None]
    trained_ens, hist = train_ensemble(TRAINED_CFG, obs, instr, chunks, progress=False)
    assert np.isfinite(hist["loss"]).all() and hist["loss"][-10:].mean() < hist["loss"][:10].mean()
    plain = export_onnx(trained_ens, TRAINED_CFG)
    return trained_ens, session(plain), session(export_onnx(trained_ens, TRAINED_CFG, rtc="trained")), plain


# -- 1. the hand-written VJP ----------------------------------------------------------------------------------


def test_hand_vjp_matches_autograd_and_finite_difference(ens):
    """PlanGraph.vjp (the exported backward pass) == torch.autograd's VJP of each integrator's own velocity head,
    and its directional derivative == a central finite difference (float64, random states and cotangents)."""
    from vigil.training.flow_export import PlanGraph

    e64 = copy.deepcopy(ens).double()
    graph = PlanGraph(e64, "lower", rtc="guided")
    I, S, B, D = len(graph.integrators), 2, 3, CFG.chunk_dim
    g = torch.Generator().manual_seed(11)
    x_in = torch.randn(I, S, B, D, generator=g, dtype=torch.float64)
    cot = torch.randn(I, S, B, D, generator=g, dtype=torch.float64)
    obs, instr = torch.randn(B, CFG.obs_dim, generator=g), torch.randn(B, CFG.instr_dim, generator=g)
    ctx = e64.encode(obs.double(), instr.double())
    cond = e64.condition(ctx, 0.3)                                   # (M, 1, B, h)
    for i, a in enumerate(graph.integrators):
        def head(x: torch.Tensor, a: int = a) -> torch.Tensor:
            return e64.velocity_from(cond[a:a + 1], x[None], members=[a])[0]

        # the own rows' pre-activations, as PlanGraph.plan hands them to vjp
        pre = [e64.x_in(x_in[i][None], [a]) + cond[a:a + 1]]
        for layer in e64.head:
            pre.append(layer(torch.nn.functional.silu(pre[-1]), [a]))
        pre = [p.reshape(1, S * B, -1) for p in pre]
        with torch.no_grad():
            hand = graph.vjp([p.expand(I, -1, -1) for p in pre], cot[i].reshape(1, S * B, D).expand(I, -1, -1))[i]
        xi = x_in[i].clone().requires_grad_(True)
        (auto,) = torch.autograd.grad(head(xi), xi, grad_outputs=cot[i])
        torch.testing.assert_close(hand.reshape(S, B, D), auto, rtol=1e-10, atol=1e-12)
        u = torch.randn(S, B, D, generator=g, dtype=torch.float64)
        eps = 1e-5
        with torch.no_grad():
            fd = ((head(x_in[i] + eps * u) - head(x_in[i] - eps * u)) * cot[i]).sum() / (2 * eps)
        assert abs(float(fd) - float((hand.reshape(S, B, D) * u).sum())) < 1e-6 * max(1.0, abs(float(fd)))


# -- 2. the guided graph ------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
def test_guided_graph_matches_torch_reference(ens, graphs, batch):
    x = inputs(CFG, batch, seed=batch)
    w = soft_weights(batch)
    chunk, vfd = plan_guided(ens, x["state"], x["instruction"], x["noise"], x["prefix"], w, beta=5.0)
    got_chunk, got_vfd = run_graph(graphs["guided"], x, w)
    assert got_chunk.shape == (batch, H, M_ACT) and got_vfd.shape == (batch,)
    np.testing.assert_allclose(got_chunk, chunk.numpy(), rtol=0, atol=CHUNK_ATOL)
    np.testing.assert_allclose(got_vfd, vfd.numpy(), rtol=VFD_RTOL, atol=1e-7)


def test_zero_weight_is_the_plain_plan_exactly(ens, graphs):
    """W = 0: the guidance term is 0 * finite, so the guided graph's chunk and VFD are the plain graph's, bit
    for bit (and the torch reference's are `plan`'s)."""
    x = inputs(CFG, 4, seed=7)
    w = torch.zeros(4, H)
    plain = run_graph(graphs["plain"], x, None)
    guided = run_graph(graphs["guided"], x, w)
    np.testing.assert_array_equal(guided[0], plain[0])
    np.testing.assert_array_equal(guided[1], plain[1])
    ref = plan_guided(ens, x["state"], x["instruction"], x["noise"], x["prefix"], w)
    base = plan(ens, x["state"], x["instruction"], x["noise"])
    torch.testing.assert_close(ref[0], base[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(ref[1], base[1], rtol=1e-5, atol=1e-8)


def test_guidance_pulls_the_committed_actions_towards_the_prefix(ens, graphs):
    """With the soft mask (d = 2 committed actions), the planned chunk's committed positions end much closer to
    Y than the unguided plan's; the positions past the overlap (weight 0) are still free to differ from Y."""
    x = inputs(CFG, 8, seed=21)
    w = soft_weights(8)
    guided = run_graph(graphs["guided"], x, w)[0]
    plain = run_graph(graphs["plain"], x, None)[0]
    y = x["prefix"].numpy()
    err = lambda chunk, sl: float(np.abs(chunk[:, sl] - y[:, sl]).mean())  # noqa: E731
    committed = slice(0, DELAY)
    print(f"\nmean |chunk - Y| on the {DELAY} committed positions: unguided {err(plain, committed):.4f}, "
          f"guided {err(guided, committed):.4f}")
    assert err(guided, committed) < 0.5 * err(plain, committed)
    assert err(guided, slice(H - EXECUTE, H)) > 0.1 * err(plain, slice(H - EXECUTE, H))  # not inpainted


def test_guided_vfd_is_scored_on_the_guided_trajectory(ens, graphs):
    """The score with guidance differs from the unguided one (members evaluated where the guided chunk goes) and
    stays finite and positive."""
    x = inputs(CFG, 3, seed=5)
    vfd_g = run_graph(graphs["guided"], x, soft_weights(3))[1]
    vfd_p = run_graph(graphs["plain"], x, None)[1]
    assert np.all(np.isfinite(vfd_g)) and np.all(vfd_g > 0) and not np.allclose(vfd_g, vfd_p)


# -- 3. training-time RTC -------------------------------------------------------------------------------------


def test_rtc_example_gives_the_clean_prefix():
    """Training-time RTC's minibatch: per example a delay d in 0..rtc_max_delay, the first d positions of x_t
    replaced by the clean actions and out of the loss, the rest untouched; the mask reaches the context."""
    from vigil.training.flow import rtc_example

    e = Ensemble(TRAINED_CFG)
    g = torch.Generator().manual_seed(0)
    M, bs, D = TRAINED_CFG.members, 64, TRAINED_CFG.chunk_dim
    xt, clean = torch.randn(M, bs, D, generator=g), torch.randn(M, bs, D, generator=g)
    ctx = torch.randn(M, bs, TRAINED_CFG.hidden, generator=g)
    gens = [torch.Generator().manual_seed(i) for i in range(M)]
    out, ctx2, free = rtc_example(e, xt, clean, ctx, gens)
    given = (1 - free).reshape(M, bs, H, M_ACT)
    d = given[..., 0].sum(-1).long()                                     # given positions per example
    assert set(d.flatten().tolist()) == {0, 1, 2, 3}
    assert torch.equal(given, (torch.arange(H) < d[..., None]).float()[..., None].expand(-1, -1, -1, M_ACT))
    torch.testing.assert_close(out, torch.where(free > 0, xt, clean), rtol=0, atol=0)
    assert torch.equal(ctx2[d == 0], ctx[d == 0]) and not torch.equal(ctx2[d > 0], ctx[d > 0])


def test_trained_graph_keeps_the_prefix_and_matches_the_reference(trained):
    ens_t, plain_sess, trained_sess, _ = trained
    x = inputs(TRAINED_CFG, 4, seed=3)
    w = hard_weights(4)
    chunk, vfd = run_graph(trained_sess, x, w)
    np.testing.assert_array_equal(chunk[:, :DELAY], x["prefix"].numpy()[:, :DELAY])
    ref_chunk, ref_vfd = plan_trained(ens_t, x["state"], x["instruction"], x["noise"], x["prefix"], w)
    np.testing.assert_allclose(chunk, ref_chunk.numpy(), rtol=0, atol=CHUNK_ATOL)
    np.testing.assert_allclose(vfd, ref_vfd.numpy(), rtol=VFD_RTOL, atol=1e-7)
    assert np.all(np.isfinite(vfd)) and np.all(vfd > 0)
    # a soft mask is thresholded at 0.5: the exp schedule with d = 2 gives the same hard prefix
    np.testing.assert_array_equal(run_graph(trained_sess, x, soft_weights(4))[0][:, :DELAY], chunk[:, :DELAY])
    # no prefix (W = 0): the plain plan of the same ensemble, bit for bit
    zero = run_graph(trained_sess, x, torch.zeros(4, H))
    plain = run_graph(plain_sess, x, None)
    np.testing.assert_array_equal(zero[0], plain[0])
    np.testing.assert_array_equal(zero[1], plain[1])


def test_trained_rtc_config_and_export_checks(ens, tmp_path):
    from vigil.runtime.config import ConfigError
    from vigil.training.flow_export import export_flow_ensemble
    from vigil.training.train_flow import check_rtc, flow_config_from_dict

    assert flow_config_from_dict({"flow": {"rtc_max_delay": 3}}).rtc_max_delay == 3
    with pytest.raises(ConfigError, match="config key 'flow.rtc_max_delay' must be an integer in 0..4"):
        flow_config_from_dict({"flow": {"rtc_max_delay": 5}})
    with pytest.raises(ConfigError, match="'flow.rtc_max_delay' must be a int"):
        flow_config_from_dict({"flow": {"rtc_max_delay": "2"}})
    with pytest.raises(ConfigError, match="flow.rtc_max_delay"):
        check_rtc("trained", CFG)
    with pytest.raises(ValueError, match="rtc_max_delay"):
        export_flow_ensemble(tmp_path, ens, CFG, None, "bad", rtc="trained")
    with pytest.raises(ValueError, match="rtc must be"):
        export_flow_ensemble(tmp_path, ens, CFG, None, "bad", rtc="inpaint")


# -- 4. manifest and onboard policy ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["guided", "trained"])
def test_manifest_round_trip_and_policy_zero_prefix(ens, graphs, trained, tmp_path, mode):
    """export_flow_ensemble's extra.rtc read back and parsed by FlowEnsemblePolicy; without a prefix the policy
    feeds zeros and plans exactly as the same bundle without RTC (its manifest minus extra.rtc, the plain graph)."""
    from vigil.policies.bundle import FlowEnsemblePolicy, load_policy
    from vigil.policies.manifest import read_manifest, write_bundle
    from vigil.training.flow_export import export_flow_ensemble

    if mode == "guided":
        e, cfg, plain_bytes = ens, CFG, graphs["plain_bytes"]
    else:
        e, cfg, plain_bytes = trained[0], TRAINED_CFG, trained[3]
    export_flow_ensemble(tmp_path / "rtc", e, cfg, None, f"rtc-{mode}", rtc=mode, rtc_beta=5.0)
    m = read_manifest(tmp_path / "rtc")
    want = {"mode": mode, "prefix_input": "prefix", "weight_input": "prefix_weight"}
    want.update({"max_guidance": 5.0} if mode == "guided" else {"max_delay": 3})
    assert m.extra["rtc"] == want and "encoder" not in m.extra
    plain_manifest = m.to_dict()
    del plain_manifest["extra"]["rtc"]
    write_bundle(tmp_path / "plain", plain_bytes, plain_manifest)

    policy = load_policy(tmp_path / "rtc", prefer_gpu=False)
    plain = load_policy(tmp_path / "plain", prefer_gpu=False)
    assert isinstance(policy, FlowEnsemblePolicy) and policy.rtc_mode == mode
    assert (policy.prefix_input, policy.weight_input) == ("prefix", "prefix_weight")
    assert policy.rtc_max_delay == (3 if mode == "trained" else None)
    assert plain.rtc_mode is None and plain.prefix_input is None

    rng = np.random.default_rng(0)
    obs = {"state": rng.standard_normal(cfg.obs_dim).astype(np.float32)}
    extra = {"instruction": rng.standard_normal((1, cfg.instr_dim)).astype(np.float32),
             **policy.plan_inputs(rng)}
    no_prefix = policy.infer(obs, extra)                             # zeros fed: the plain plan
    np.testing.assert_array_equal(no_prefix.actions, plain.infer(obs, extra).actions)
    assert no_prefix.scores["vfd"] == plain.infer(obs, extra).scores["vfd"]
    y = rng.uniform(-1, 1, (H, M_ACT)).astype(np.float32)
    w = prefix_weights(H, EXECUTE, DELAY, "exp" if mode == "guided" else "zeros")
    rtc = policy.rtc_inputs(y, w)
    assert rtc["prefix"].shape == (1, H, M_ACT) and rtc["prefix_weight"].shape == (1, H)
    with_prefix = policy.infer(obs, {**extra, **rtc})
    assert not np.array_equal(with_prefix.actions, no_prefix.actions)
    if mode == "trained":
        np.testing.assert_array_equal(with_prefix.actions[:DELAY], y[:DELAY])
    # batched: one robot with a prefix, one without (zeros filled in), as two single plans
    batch = policy.infer_batch([obs, obs], [{**extra, **rtc}, extra])
    np.testing.assert_allclose(batch[0].actions, with_prefix.actions, atol=1e-6)
    np.testing.assert_allclose(batch[1].actions, no_prefix.actions, atol=1e-6)

    with pytest.raises(ValueError, match=r"prefix must have shape \(8, 4\)"):
        policy.rtc_inputs(y[:4], w)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        policy.rtc_inputs(y, w[None])
    with pytest.raises(ValueError, match="no real-time chunking"):
        plain.rtc_inputs(y, w)
