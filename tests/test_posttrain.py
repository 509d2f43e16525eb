"""Post-training without an expert (training/posttrain.py, docs/posttrain.md): the CVaR threshold and pseudo-reward on
known distributions, the dual update, the weights, the verifier, reward-weighted flow matching, and the
command end to end on a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import norm

from vigil.training import posttrain as P

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_cvar_threshold_and_value_on_known_distributions():
    rng = np.random.default_rng(0)
    u = rng.random(20000)
    assert P.cvar_threshold(u, 0.2) == pytest.approx(0.2, abs=0.01)  # the alpha-quantile
    assert P.left_cvar(u, 0.2) == pytest.approx(0.1, abs=0.01)       # mean of the lowest 20%
    x = rng.normal(1.0, 2.0, 40000)
    want = 1.0 - 2.0 * norm.pdf(norm.ppf(0.1)) / 0.1                  # closed form for a Gaussian
    assert P.left_cvar(x, 0.1) == pytest.approx(want, abs=0.05)
    assert P.cvar_threshold(x, 0.1) == pytest.approx(1.0 + 2.0 * norm.ppf(0.1), abs=0.05)


def test_cvar_pseudo_reward_penalises_only_the_lower_tail():
    r = np.array([-3.0, -1.0, 0.0, 2.0, 5.0])
    p = P.cvar_pseudo_reward(r, eta=0.0, alpha=0.5)
    np.testing.assert_allclose(p, [-6.0, -2.0, 0.0, 0.0, 0.0])
    w = P.episode_weights(p, temperature=1.0, weighting="exp", top_fraction=0.3)
    assert w.max() == 1.0 and w[2] == w[3] == w[4] == 1.0 and w[0] < w[1] < 1.0  # above the threshold: alike


def test_constrained_pseudo_reward_and_dual_update():
    r, g = np.array([1.0, 1.0]), np.array([-0.5, 2.0])
    np.testing.assert_allclose(P.lagrangian_reward(r, g, lam=1.0, rho=2.0), [1.5, 1.0 - 2.0 - 4.0])
    assert P.dual_update(0.0, 0.3, 2.0) == pytest.approx(0.6)  # violated: the price rises
    assert P.dual_update(0.5, -1.0, 2.0) == 0.0                # met with room: it falls, never below 0
    lam, history = 0.0, []
    for g_mean in (0.4, 0.2, 0.0, -0.1, -0.1):
        lam = P.dual_update(lam, g_mean, 1.0)
        history.append(lam)
    assert history == pytest.approx([0.4, 0.6, 0.6, 0.5, 0.4])


def test_weights_and_the_verifier():
    z = np.array([0.0, 1.0, 2.0, 3.0])
    w = P.episode_weights(z, 0.5, "exp", 0.3)
    np.testing.assert_allclose(w, np.exp((z - 3.0) / 0.5))
    np.testing.assert_array_equal(P.episode_weights(z, 0.5, "top", 0.5), [0, 0, 1, 1])
    attempts = [P.Attempt("t", k, success=k % 2 == 0) for k in range(5)]
    assert [a.seed for a in P.verified(attempts)] == [0, 2, 4]
    np.testing.assert_allclose(P.standardise_per_task([1.0, 3.0, 10.0, 30.0], ["a", "a", "b", "b"]), [-1, 1, -1, 1])


def test_config_errors_name_the_key(tmp_path):
    from vigil.runtime.config import ConfigError

    with pytest.raises(ConfigError, match="posttrain.objective"):
        P.PosttrainConfig(objective="max").check()
    with pytest.raises(ConfigError, match="posttrain.cvar_alpha"):
        P.PosttrainConfig(cvar_alpha=0.0).check()
    bad = tmp_path / "c.toml"
    bad.write_text("[posttrain]\nbudget = 0.1\n")
    with pytest.raises(ConfigError, match="posttrain.budget"):
        P.load_config(str(bad))
    shipped = P.load_config(str(ROOT / "configs" / "posttrain.toml"))
    assert shipped == P.PosttrainConfig()  # the shipped file spells out the defaults


def test_reward_weighted_flow_matching_moves_towards_the_weighted_samples():
    """Same observation, two kinds of chunk; all weight on one: the fine-tuned policy samples that one."""
    import torch

    from vigil.training.flow import FlowConfig, sample, train_ensemble

    cfg = FlowConfig(obs_dim=3, instr_dim=2, action_dim=2, horizon=2, hidden=32, depth=2, members=2, steps=400,
                     batch_size=64, lr=2e-3, density_steps=0)
    n = 200
    obs, instr = np.zeros((n, 3), np.float32), np.zeros((n, 2), np.float32)
    chunks = np.where(np.arange(n)[:, None, None] % 2 == 0, 0.8, -0.8).astype(np.float32) * np.ones((n, 2, 2))
    weights = (np.arange(n) % 2 == 0).astype(float)
    ens, _ = train_ensemble(cfg, obs, instr, chunks, progress=False, weights=weights)
    noise = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    got = sample(ens, torch.zeros(1, 3), torch.zeros(1, 2), noise).numpy()
    assert np.mean(got > 0) > 0.9, got.mean()
    with pytest.raises(ValueError, match="groups or weights"):
        train_ensemble(cfg, obs, instr, chunks, progress=False, weights=weights, groups=np.zeros(n, int))
    with pytest.raises(ValueError, match="non-negative"):
        train_ensemble(cfg, obs, instr, chunks, progress=False, weights=-weights)


def test_stochastic_euler_paths_have_the_likelihood_they_were_drawn_with():
    """Each step of member 0's stochastic path is x + v dt + sigma sqrt(dt) e, so its log-density under member 0
    is -|e|^2 / 2 (mean -D/2 per step); another member, whose velocity differs, gives the path less."""
    import torch

    from vigil.training.flow import Ensemble, FlowConfig

    cfg = FlowConfig(obs_dim=3, instr_dim=2, action_dim=2, horizon=4, hidden=32, depth=2, members=3, density_steps=0)
    ens = Ensemble(cfg).eval()
    gen = torch.Generator().manual_seed(0)
    obs, instr = torch.randn(256, 3, generator=gen), torch.randn(256, 2, generator=gen)
    x0 = torch.randn(256, cfg.chunk_dim, generator=gen)
    paths = P.stochastic_path(ens, obs, instr, x0, sigma=0.1, gen=gen)
    assert paths.shape == (256, cfg.euler_steps + 1, cfg.chunk_dim)
    with torch.no_grad():
        logp = P.path_logp(ens, obs, instr, paths, 0.1)  # (M, n, B)
    assert logp.shape == (3, cfg.euler_steps, 256)
    assert logp[0].mean().item() == pytest.approx(-cfg.chunk_dim / 2, rel=0.05)
    assert (logp[1:].mean(dim=(1, 2)) < logp[0].mean() - 0.3).all()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, encoder_bundle):
    """`vigil train flow` on two reach-v3 demonstrations: the parent every post-training objective starts from."""
    from conftest import run_vigil

    tmp = tmp_path_factory.mktemp("tiny-run")
    demos, run = tmp / "demos", tmp / "run"
    assert run_vigil("demos", "record", "--tasks", "reach-v3", "--episodes", "2", "--out", str(demos)).returncode == 0
    tiny = (ROOT / "configs" / "flow-tiny.toml").read_text() + "density_steps = 100\n"
    (tmp / "tiny.toml").write_text(tiny)
    r = run_vigil("train", "flow", "--config", str(tmp / "tiny.toml"), "--demos", str(demos), "--out", str(run),
                  "--encoder", str(encoder_bundle), "--tasks", "reach-v3", "--no-progress", "--dynamics-steps", "0",
                  timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return run


@pytest.mark.parametrize("objective", ["cvar-left", "expand", "gbpo"])
def test_vigil_train_posttrain_end_to_end(tmp_path, tiny_run, objective):
    """A tiny run post-trained from the command line: a bundle that can replace its parent, recalibrated,
    provenance naming the parent, the per-iteration CSV and plot."""
    from conftest import run_vigil

    from vigil.policies.bundle import load_policy

    run, out = tiny_run, tmp_path / "pt"
    cfg = tmp_path / "pt.toml"
    weighting = "gbpo" if objective == "gbpo" else "exp"  # gbpo: the policy-gradient machinery, on `mean`
    objective = "mean" if objective == "gbpo" else objective
    cfg.write_text("[posttrain]\niterations = 2\nepisodes = 2\nmax_steps = 40\nsteps = 20\ncandidates = 2\n"
                   f"weighting = \"{weighting}\"\npg_epochs = 1\n")
    r = run_vigil("train", "posttrain", "--run", str(run), "--out", str(out), "--config", str(cfg), "--objective",
                  objective, "--calibration-episodes", "2", "--calibration-all-episodes", "--no-progress",
                  *(["--workers", "2"] if weighting == "gbpo" else []), timeout=400)  # gbpo: rollouts on 2 workers
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["last"]["iteration"] == 1
    if weighting == "gbpo":
        assert summary["last"]["plans"] > 0 and np.isfinite(summary["last"]["ratio"])
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["posttrain"]["parent"]["run"] == str(run.resolve())
    assert prov["posttrain"]["config"]["objective"] == objective
    assert len(prov["posttrain"]["iterations"]) == 2 and prov["posttrain"]["episodes"] == 4
    assert (out / "posttrain.csv").read_text().count("\n") == 3 and (out / "posttrain.png").stat().st_size > 1000
    parent, child = load_policy(run / "bundle"), load_policy(out / "bundle")
    assert child.manifest.observation == parent.manifest.observation  # hot-swappable for the parent
    assert child.manifest.control_rate_hz == parent.manifest.control_rate_hz
    assert "vfd" in child.manifest.monitor and child.manifest.onnx_scores == ("vfd", "rnd")
    assert child.manifest.name.endswith(objective)
    r = run_vigil("train", "posttrain", "--run", str(run), "--out", str(out), "--objective", "maximise")
    assert r.returncode != 0 and "objective" in r.stderr


def test_rollouts_on_worker_processes_are_the_serial_ones(tiny_run, encoder_bundle):
    """collect() sharded over processes (sim/shard.py, as on Ray) plays the serial loop's episodes, stochastic
    Euler paths included (each episode seeded by itself)."""
    from vigil.policies.instructions import InstructionEncoder
    from vigil.sim.shard import Backend
    from vigil.training.train_flow import load_checkpoint

    ens, _, _ = load_checkpoint(tiny_run / "ensemble.pt")
    encoder = InstructionEncoder.load(encoder_bundle, prefer_gpu=False)
    cfg = P.PosttrainConfig(max_steps=16, weighting="gbpo").check()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting: the same float arithmetic
    try:
        serial = P.collect(ens, ["reach-v3", "push-v3"], [3, 4], encoder, cfg)
        sharded = P.collect(ens, ["reach-v3", "push-v3"], [3, 4], encoder, cfg, backend=Backend("processes", 2))
    finally:
        torch.set_num_threads(threads)
    assert [(a.task, a.seed, a.ret, a.steps) for a in sharded] == [(a.task, a.seed, a.ret, a.steps) for a in serial]
    assert all(np.array_equal(x, y) for a, b in zip(serial, sharded) for x, y in zip(a.paths, b.paths))
    assert len(serial[0].paths) > 0


def test_expert_teacher_plays_the_chosen_situation():
    """`teacher = "expert"` (SAVE at the same simulator budget): the scripted expert's episode, every step an
    example with its chunk of the next H actions."""
    from vigil.sim.envs import make_env
    from vigil.sim.shifts import Shift

    env = make_env("reach-v3", horizon=200, shift=Shift(positions=0.3))
    try:
        a = P.expert_attempt(env, 7, horizon=8)  # this one the expert fails too: the verifier drops it
        env.shift = Shift()
        b = P.expert_attempt(env, 7, horizon=8)
    finally:
        env.close()
    assert not a.success and not P.verified([a]) and b.success and P.verified([b]) == [b]
    assert a.steps == len(a.obs) == len(a.chunks) == 200 and a.chunks[0].shape == (8, 4)
    np.testing.assert_allclose(a.chunks[1][0], a.chunks[0][1])  # chunk t holds actions t .. t+7
    with pytest.raises(Exception, match="posttrain.teacher"):
        P.PosttrainConfig(teacher="human").check()
