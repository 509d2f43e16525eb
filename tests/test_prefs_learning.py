"""Preference learning (issue 21): Bradley–Terry reward models recover a known reward, each pair-selection rule
picks what its definition says on a toy pool, the exported model scores on board as torch does, and the
simulated operators answer as specified."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vigil.sim.annotator import Annotator, spreads
from vigil.training import pairs as PR
from vigil.training import reward_model as RM


def bt_data(rng, n_eps=120, dim=6, n_pairs=300):
    x = rng.normal(size=(n_eps, dim)).astype(np.float32)
    w = np.array([2.0, -1.0, 0.5, 0, 0, 0])
    r = x @ w
    P = rng.integers(0, n_eps, size=(n_pairs, 2))
    P = P[P[:, 0] != P[:, 1]]
    y = (rng.random(len(P)) < 1 / (1 + np.exp(-(r[P[:, 0]] - r[P[:, 1]])))).astype(np.float32)
    return x, r, P, y


@pytest.mark.parametrize("method", RM.METHODS)
def test_bradley_terry_recovers_a_known_reward(method):
    rng = np.random.default_rng(0)
    x, r, P, y = bt_data(rng)
    fitted = RM.fit(x, P, y, RM.RewardConfig(method=method, prior=1.0, steps=300, members=3, samples=16))
    mean, std = fitted.mean_std(x)
    assert np.corrcoef(mean, r)[0, 1] > 0.9  # the learned reward orders episodes as the true one (up to scale)
    hp = np.array([(i, i + 1) for i in range(0, len(x) - 1, 2)])
    prob = fitted.prob(x, hp)
    truth = (r[hp[:, 0]] > r[hp[:, 1]]).astype(float)
    assert RM.accuracy(prob, truth) > 0.85
    assert (std > 0).all() if method != "single" else (std == 0).all()


def test_labels_calibration_metrics_and_config_errors():
    keep, y = RM.labels_of(["a", "b", "tie", "unsure"])
    assert keep.tolist() == [True, True, True, False] and y.tolist() == [1.0, 0.0, 0.5]
    p = np.full(1000, 0.7)
    y = (np.random.default_rng(1).random(1000) < 0.7).astype(float)
    assert RM.ece(p, y) < 0.05 and RM.ece(np.full(1000, 0.99), y) > 0.2
    assert RM.nll(p, y) < RM.nll(np.full(1000, 0.99), y)
    with pytest.raises(ValueError, match="reward.method"):
        RM.RewardConfig(method="gp").check()


def toy(mean, std, s=64, seed=0):
    """Posterior samples with the given per-episode mean and std (S, N)."""
    z = np.random.default_rng(seed).standard_normal((s, len(mean)))
    z = (z - z.mean(0)) / z.std(0)
    return np.asarray(mean) + z * np.asarray(std)


def test_each_rule_picks_what_it_says():
    rng = np.random.default_rng(0)
    cand = np.arange(5)
    # no uncertainty: DRTS is the best against the worst; DeltaUCB the largest gap
    flat = toy([0.0, 3.0, 1.0, -2.0, 0.5], [0, 0, 0, 0, 0])
    assert PR.select("drts", flat, cand, rng) == (1, 3)
    assert PR.select("deltaucb", flat, cand, rng) == (1, 3)
    # DeltaUCB is optimistic: a wide episode's upper bound wins over a slightly higher, certain mean
    wide = toy([2.0, 2.5, 0.0, 0.0, 0.0], [2.0, 0.0, 0.1, 0.1, 0.1])
    assert PR.select("deltaucb", wide, cand, rng)[0] == 0
    # uncertainty: the pair whose difference the posterior is least sure of
    s = toy([0, 0, 0, 0, 0], [0.1, 0.1, 3.0, 0.1, 3.0], seed=3)
    assert set(PR.select("uncertainty", s, cand, rng)) == {2, 4}
    # one sample: uncertainty asks the closest pair
    assert set(PR.select("uncertainty", np.array([[0.0, 5.0, 0.1, 9.0, -4.0]]), cand, rng)) == {0, 2}
    # DTS: two plausible winners (both near the top), DRTS: a winner and a loser
    top = toy([5.0, 4.9, 0.0, -1.0, -1.2], [0.3] * 5)
    for _ in range(20):
        assert set(PR.select("dts", top, cand, rng)) == {0, 1}
        a, b = PR.select("drts", top, cand, rng)
        assert a in (0, 1) and b in (3, 4)


def test_pairs_are_never_repeated_and_stay_within_a_task():
    rng = np.random.default_rng(0)
    groups = {"push": np.arange(0, 4), "reach": np.arange(4, 7)}
    samples = toy(np.arange(7.0), [0.5] * 7)
    asked: set = set()
    got = []
    for rule in PR.RULES:
        got += PR.select_batch(rule, samples, groups, 2, rng, asked)
    got += PR.select_batch("random", samples, groups, 20, rng, asked)  # what is left
    keys = [tuple(sorted((a, b))) for _, a, b in got]
    assert len(keys) == len(set(keys)) == 6 + 3  # every within-task pair exactly once
    assert all((a in groups[t]) and (b in groups[t]) for t, a, b in got)
    assert PR.select_batch("drts", samples, groups, 3, rng, asked) == []
    with pytest.raises(ValueError, match="pair rule"):
        PR.select("best", samples, np.arange(3), rng)


def test_simulated_operators():
    rng = np.random.default_rng(0)
    ret = np.array([10.0, 0.0] * 2000)
    steps = np.array([500, 100] * 2000)
    tasks = np.array(["t"] * 4000)
    spread = spreads(ret, tasks)["t"]
    bt = Annotator("bt", temperature=0.1)
    a = bt.answer(ret[0::2], ret[1::2], spread, rng)
    assert a.mean() > 0.99  # a clear difference: always the better one
    noisy = Annotator("noisy", temperature=0.1, flip=0.15).answer(ret[0::2], ret[1::2], spread, rng)
    assert abs((1 - noisy.mean()) - 0.15) < 0.03
    biased = Annotator("biased", temperature=0.1)
    u = biased.utility(ret, steps)
    b = biased.answer(u[0::2], u[1::2], spreads(u, tasks)["t"], rng)
    assert b.mean() < 0.01  # prefers the shorter episode, although its return is lower
    assert Annotator("bt", temperature=1.0).prob(np.array([1.0]), np.array([0.0]), 1.0)[0] == \
        pytest.approx(1 / (1 + np.exp(-1)))
    with pytest.raises(ValueError, match="kind"):
        Annotator("oracle")


@pytest.mark.parametrize("method", RM.METHODS)
def test_exported_reward_scores_on_board_as_in_torch(tmp_path, method):
    """reward.onnx (the frozen encoder and the heads) through onnxruntime gives the torch model's posterior mean
    and std of an episode's return."""
    from vigil.policies.reward import RewardScorer
    from vigil.training.flow import Ensemble, FlowConfig

    torch.manual_seed(0)
    cfg = FlowConfig(hidden=16, depth=2, members=2, vfd_samples=2, euler_steps=2)
    ens = Ensemble(cfg).eval()
    rng = np.random.default_rng(0)
    eps = [(rng.normal(size=(41, cfg.obs_dim)).astype(np.float32), rng.normal(size=cfg.instr_dim).astype(np.float32),
            rng.uniform(-1, 1, size=(40, cfg.action_dim)).astype(np.float32)) for _ in range(12)]
    x = RM.summaries(ens, eps)
    assert x.shape == (12, 2 * cfg.hidden + cfg.action_dim)
    P = np.array([(i, (i + 1) % 12) for i in range(12)])
    fitted = RM.fit(x, P, (np.arange(12) % 2).astype(np.float32),
                    RM.RewardConfig(method=method, steps=30, members=3, samples=8))
    RM.export_onnx(ens, fitted, tmp_path / "rm", cfg.obs_dim, cfg.instr_dim, cfg.action_dim)
    scorer = RewardScorer(tmp_path / "rm")
    mean, std = fitted.mean_std(x)
    for k, (states, instr, actions) in enumerate(eps[:4]):
        got = scorer.score(states, instr, actions)
        assert got.ret == pytest.approx(mean[k], abs=1e-4) and got.std == pytest.approx(std[k], abs=1e-4)
    with pytest.raises(FileNotFoundError, match="reward.onnx"):
        RewardScorer(tmp_path)
