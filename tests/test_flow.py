"""Flow-matching ensemble and VFD (vigil.training.flow): the OT path, Euler sampling, the VFD grid and
pair conventions, VFD's behaviour under member disagreement, the baselines, and a short training run on
a synthetic multitask dataset."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from vigil.training.flow import (
    Ensemble,
    FlowConfig,
    StackedLinear,
    action_l2,
    euler,
    gu,
    make_chunks,
    member_pairs,
    ot_path,
    plan,
    sample,
    sample_members,
    sample_variance,
    train_ensemble,
    vfd_grid,
    vfd_one_way,
    vfd_two_way,
)

SMALL = FlowConfig(horizon=4, hidden=32, depth=2, members=3, seed=7)


def inputs(cfg: FlowConfig, batch: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.obs_dim, generator=g), torch.randn(batch, cfg.instr_dim, generator=g)


def noise(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def permuted(ens: Ensemble, order: list[int]) -> Ensemble:
    """The same ensemble with its members reordered: new member i is old member order[i]."""
    out = Ensemble(ens.cfg)
    out.load_state_dict(ens.state_dict())
    with torch.no_grad():
        for mod in out.modules():
            if isinstance(mod, StackedLinear) and not mod.shared:
                mod.weight.copy_(mod.weight[order])
                if mod.bias is not None:
                    mod.bias.copy_(mod.bias[order])
    return out


# ----------------------------------------------------------------------------- path, sampler, grid


def test_ot_path_and_velocity_target_by_hand():
    x0, a, t = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 4.0]), torch.tensor(0.25)
    xt, target = ot_path(x0, a, t)
    assert torch.equal(xt, torch.tensor([1.5, -0.5]))  # 0.75 * x0 + 0.25 * a
    assert torch.equal(target, torch.tensor([2.0, 6.0]))  # a - x0
    assert torch.equal(ot_path(x0, a, torch.tensor(0.0))[0], x0)
    assert torch.equal(ot_path(x0, a, torch.tensor(1.0))[0], a)


def test_euler_recovers_the_target_of_the_conditional_field():
    """The OT path's conditional field v(x, t) = (a - x) / (1 - t) is a - x0 all along the straight
    path, so 10 Euler steps land exactly on a."""
    a = torch.tensor([[0.3, -0.7, 1.2, 0.0]])
    x0 = noise(5, 4)
    x1 = euler(lambda x, t: (a - x) / (1 - t), x0, 10)
    torch.testing.assert_close(x1, a.expand_as(x1), atol=1e-5, rtol=0)


def test_member_with_constant_velocity_samples_x0_plus_it():
    cfg = SMALL
    ens = Ensemble(cfg)
    c = torch.linspace(-1, 1, cfg.chunk_dim)
    with torch.no_grad():
        ens.out.weight.zero_()
        ens.out.bias.zero_()
        ens.out.bias[1, 0] = c
    obs, instr = inputs(cfg)
    z = noise(4, cfg.horizon, cfg.action_dim)
    torch.testing.assert_close(sample(ens, obs, instr, z, member=1), z + c.reshape(cfg.horizon, cfg.action_dim))
    torch.testing.assert_close(sample(ens, obs, instr, z, member=0), z)  # member 0: v = 0


def test_vfd_grid_times_steps_and_weights():
    ts, dts, ws = vfd_grid(10)
    np.testing.assert_allclose(ts, [0, .1, .2, .3, .4, .5, .6, .7, .8, .9, .95], atol=1e-12)
    np.testing.assert_allclose(dts, [.1] * 9 + [.05, .05], atol=1e-12)
    np.testing.assert_allclose(ws, [t / (1 - t) for t in ts])
    assert ws[0] == 0 and ws[-1] == pytest.approx(19.0) and ws[9] == pytest.approx(9.0)
    assert sum(dts) == pytest.approx(1.0)


def test_plan_chunk_is_the_ordinary_euler_sample():
    """The VFD grid's first 10 points are the sampler's states: the plan's chunk is member 0's sample."""
    ens = Ensemble(SMALL)
    obs, instr = inputs(SMALL)
    z = noise(5, 4, SMALL.horizon, SMALL.action_dim)
    chunk, score = plan(ens, obs, instr, z)
    torch.testing.assert_close(chunk, sample(ens, obs, instr, z[0]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score, vfd_one_way(ens, obs, instr, z))
    assert chunk.shape == (4, SMALL.horizon, SMALL.action_dim) and score.shape == (4,)


def test_make_chunks_repeats_the_last_action():
    actions = np.arange(10, dtype=np.float32).reshape(5, 2)
    chunks = make_chunks(actions, 3)
    assert chunks.shape == (5, 3, 2)
    np.testing.assert_array_equal(chunks[0], actions[0:3])
    np.testing.assert_array_equal(chunks[3], actions[[3, 4, 4]])
    np.testing.assert_array_equal(chunks[4], actions[[4, 4, 4]])
    torch.testing.assert_close(make_chunks(torch.from_numpy(actions), 3), torch.from_numpy(chunks))


# ------------------------------------------------------------------------------------------- VFD


def test_member_pairs_conventions():
    assert member_pairs(3, "lower") == [(0, 1), (0, 2), (1, 2)]
    assert member_pairs(3, "anchor") == [(0, 1), (0, 2)]
    assert member_pairs(3, "ordered") == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    assert member_pairs(2, "lower") == member_pairs(2, "anchor") == [(0, 1)]
    with pytest.raises(ValueError):
        member_pairs(3, "bogus")


def test_vfd_is_zero_for_identical_members():
    ens = Ensemble(SMALL)
    ens.copy_member(0, 1)
    ens.copy_member(0, 2)
    obs, instr = inputs(SMALL)
    z = noise(5, 4, SMALL.horizon, SMALL.action_dim)
    for pairs in ("lower", "anchor", "ordered"):
        assert torch.equal(vfd_one_way(ens, obs, instr, z, pairs), torch.zeros(4))
    assert torch.equal(vfd_two_way(ens, obs, instr, noise(3, 5, 4, SMALL.horizon, SMALL.action_dim)), torch.zeros(4))
    assert vfd_one_way(Ensemble(SMALL), obs, instr, z).min() > 0  # distinct seeds disagree


def test_vfd_grows_monotonically_with_member_disagreement():
    cfg = FlowConfig(horizon=4, hidden=32, depth=2, members=2, seed=3)
    base = Ensemble(cfg)
    base.copy_member(0, 1)
    direction = {k: torch.randn_like(p[1], generator=torch.Generator().manual_seed(i)) if p.shape[0] == 2 else None
                 for i, (k, p) in enumerate(base.named_parameters())}
    obs, instr = inputs(cfg)
    z = noise(5, 4, cfg.horizon, cfg.action_dim)
    scores = []
    for eps in (0.0, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1):
        ens = Ensemble(cfg)
        ens.load_state_dict(base.state_dict())
        with torch.no_grad():
            for k, p in ens.named_parameters():
                if direction[k] is not None:
                    p[1] += eps * direction[k]
        scores.append(vfd_one_way(ens, obs, instr, z))
    s = torch.stack(scores)  # (eps, B)
    assert torch.all(s[0] == 0)
    assert torch.all(s[1:] > s[:-1]), s


def test_two_way_is_symmetric_in_members_and_ordered_averages_both_directions():
    cfg = SMALL
    ens = Ensemble(cfg)
    obs, instr = inputs(cfg)
    z2 = noise(3, 5, 4, cfg.horizon, cfg.action_dim)
    ref = vfd_two_way(ens, obs, instr, z2)
    for order in itertools.permutations(range(3)):
        torch.testing.assert_close(vfd_two_way(permuted(ens, list(order)), obs, instr, z2[list(order)]), ref)
    # one-way over ordered pairs from shared noise = two-way with every member given that same noise
    z = z2[0]
    torch.testing.assert_close(vfd_one_way(ens, obs, instr, z, "ordered"),
                               vfd_two_way(ens, obs, instr, z[None].expand(3, *z.shape)))
    # M = 2: one-way is member 0 integrating, and swapping members gives member 1 integrating
    cfg2 = FlowConfig(horizon=4, hidden=32, depth=2, members=2, seed=5)
    e2 = Ensemble(cfg2)
    both = (vfd_one_way(e2, obs, instr, z) + vfd_one_way(permuted(e2, [1, 0]), obs, instr, z)) / 2
    torch.testing.assert_close(vfd_two_way(e2, obs, instr, z[None].expand(2, *z.shape)), both)


def test_baselines_shapes_and_identical_members():
    cfg = SMALL
    ens = Ensemble(cfg)
    obs, instr = inputs(cfg)
    z = noise(5, 4, cfg.horizon, cfg.action_dim)
    zm = noise(3, 5, 4, cfg.horizon, cfg.action_dim)
    for score in (action_l2(ens, obs, instr, zm), gu(ens, obs, instr, z), sample_variance(ens, obs, instr, z),
                  vfd_one_way(ens, obs, instr, z), vfd_two_way(ens, obs, instr, zm)):
        assert score.shape == (4,) and torch.isfinite(score).all()
    assert sample_members(ens, obs, instr, z).shape == (3, 5, 4, cfg.horizon, cfg.action_dim)
    ens.copy_member(0, 1)
    ens.copy_member(0, 2)
    assert torch.allclose(action_l2(ens, obs, instr, z[None].expand(3, *z.shape)), torch.zeros(4), atol=1e-6)
    assert action_l2(ens, obs, instr, zm).min() > 0  # independent noise: Action-L2 sees sampling spread too
    assert torch.all(gu(ens, obs, instr, z) < cfg.chunk_dim * np.log(1e-8) + 1)
    assert torch.equal(sample_variance(ens, obs, instr, z[:1].expand(5, *z.shape[1:])), torch.zeros(4))


def test_shared_encoder_variant():
    full, shared = Ensemble(SMALL), Ensemble(FlowConfig(**{**SMALL.__dict__, "shared_encoder": True}))
    assert shared.encoder[0].weight.shape[0] == 1 and full.encoder[0].weight.shape[0] == 3
    assert shared.context_proj.weight.shape[0] == 3  # each head projects the shared features its own way
    n = lambda e: sum(p.numel() for p in e.parameters())  # noqa: E731
    assert n(shared) < n(full)
    obs, instr = inputs(SMALL, batch=2)
    assert shared.encode(obs, instr).shape == (3, 2, SMALL.hidden)
    z = noise(5, 2, SMALL.horizon, SMALL.action_dim)
    chunk, score = plan(shared, obs, instr, z)
    assert chunk.shape == (2, SMALL.horizon, SMALL.action_dim) and torch.all(score > 0)
    assert vfd_two_way(shared, obs, instr, noise(3, 5, 2, SMALL.horizon, SMALL.action_dim)).shape == (2,)


def test_member_seeds_do_not_depend_on_ensemble_size():
    e2, e3 = Ensemble(FlowConfig(**{**SMALL.__dict__, "members": 2})), Ensemble(SMALL)
    for (k, p2), p3 in zip(e2.named_parameters(), e3.parameters()):
        assert torch.equal(p2, p3[:2]), k
    assert not torch.equal(e3.out.weight[0], e3.out.weight[1])


# ------------------------------------------------------------------------------------------ training


def synthetic(cfg: FlowConfig, tasks: int = 3, per_task: int = 256, seed: int = 0):
    """Multitask data: each task has its own unit instruction vector and its own map obs -> chunk,
    chunk = tanh(obs @ W_task) (deterministic given obs and task); obs ~ N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    instr = torch.nn.functional.normalize(torch.randn(tasks, cfg.instr_dim, generator=g), dim=-1)
    W = torch.randn(tasks, cfg.obs_dim, cfg.chunk_dim, generator=g) / cfg.obs_dim ** 0.5
    obs = torch.randn(tasks, per_task, cfg.obs_dim, generator=g)
    chunks = torch.tanh(torch.einsum("tnd,tdk->tnk", obs, W))
    return (obs.reshape(-1, cfg.obs_dim), instr[:, None].expand(tasks, per_task, -1).reshape(-1, cfg.instr_dim),
            chunks.reshape(-1, cfg.horizon, cfg.action_dim))


def test_members_train_independently(one_torch_thread):
    """Member 0 of a 2-member ensemble ends where a 1-member ensemble with the same seed does: its own
    data stream, its own gradient, per-parameter AdamW."""
    cfg = FlowConfig(horizon=4, hidden=32, depth=2, members=2, steps=20, batch_size=32, seed=11)
    obs, instr, chunks = synthetic(cfg, per_task=32)
    e2, _ = train_ensemble(cfg, obs, instr, chunks, progress=False)
    e1, _ = train_ensemble(FlowConfig(**{**cfg.__dict__, "members": 1}), obs, instr, chunks, progress=False)
    for p1, p2 in zip(e1.parameters(), e2.parameters()):
        torch.testing.assert_close(p2[:1], p1, atol=1e-5, rtol=1e-4)


def test_training_on_synthetic_multitask_data(one_torch_thread):
    cfg = FlowConfig(horizon=4, hidden=64, depth=2, members=3, steps=1000, batch_size=128, lr=2e-3,
                     weight_decay=0.0, seed=0)
    obs, instr, chunks = synthetic(cfg)
    ens, hist = train_ensemble(cfg, obs, instr, chunks, progress=False)
    assert hist["loss"].shape == (cfg.steps,) and hist["member_loss"].shape == (cfg.steps, 3)
    first, last = hist["loss"][:20].mean(), hist["loss"][-50:].mean()
    assert last < 0.3 * first

    g = torch.Generator().manual_seed(1)
    idx = torch.arange(0, len(obs), 8)  # 96 training inputs, 32 per task
    B, N = len(idx), cfg.vfd_samples
    o_id, i_id = obs[idx], instr[idx]
    noise = torch.randn(B, cfg.horizon, cfg.action_dim, generator=g)
    mse = (sample(ens, o_id, i_id, noise) - chunks[idx]).square().mean()
    assert mse < 0.25 * chunks.var()

    z = torch.randn(N, B, cfg.horizon, cfg.action_dim, generator=g)
    far_obs = o_id + 4.0  # every dimension 4 training stds away
    new_instr = torch.nn.functional.normalize(torch.randn(B, cfg.instr_dim, generator=g), dim=-1)
    v_id = vfd_one_way(ens, o_id, i_id, z)
    v_obs = vfd_one_way(ens, far_obs, i_id, z)
    v_instr = vfd_one_way(ens, o_id, new_instr, z)
    print(f"\nloss {first:.3f} -> {last:.3f}; sample MSE {mse:.4f} (target var {chunks.var():.3f}); "
          f"VFD median: in-distribution {v_id.median():.2f}, far obs {v_obs.median():.2f}, "
          f"unseen instruction {v_instr.median():.2f}")
    assert v_obs.median() > 5 * v_id.median() and v_instr.median() > 2 * v_id.median()
    assert (v_obs > v_id).float().mean() > 0.95 and (v_instr > v_id).float().mean() > 0.9

    # warm start: a few more steps from the trained ensemble start near where it ended, and the
    # original is left untouched
    before = [p.clone() for p in ens.parameters()]
    warm_cfg = FlowConfig(**{**cfg.__dict__, "steps": 20, "seed": 1})
    warm, wh = train_ensemble(warm_cfg, obs, instr, chunks, progress=False, ensemble=ens)
    assert wh["loss"][:10].mean() < 0.5 * first
    assert all(torch.equal(a, b) for a, b in zip(before, ens.parameters()))
    torch.testing.assert_close(warm.obs_mean, ens.obs_mean)
    with pytest.raises(ValueError):
        train_ensemble(FlowConfig(**{**warm_cfg.__dict__, "members": 2}), obs, instr, chunks, progress=False,
                       ensemble=ens)


@pytest.mark.parametrize("image_size", [0, 24])
def test_subset_is_the_smaller_ensemble_of_the_same_seed(image_size):
    from vigil.training.flow import Ensemble, FlowConfig

    cfg = FlowConfig(hidden=16, depth=2, members=3, seed=7, image_size=image_size, image_channels=2, image_features=4)
    big = Ensemble(cfg)
    big.set_normalisation(torch.randn(50, cfg.obs_dim) * 3 + 1)
    sub = big.subset(2)
    small = Ensemble(FlowConfig(**{**cfg.__dict__, "members": 2}))
    ref = small.state_dict()
    for k, v in sub.state_dict().items():
        if k in ("obs_mean", "obs_std"):
            torch.testing.assert_close(v, big.state_dict()[k])  # the trained normalisation comes along
        else:
            torch.testing.assert_close(v, ref[k], rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="members must be in 1..3"):
        big.subset(4)
