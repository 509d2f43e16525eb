"""SAVE (training/save.py): the acquisition rule on synthetic uncertainties, the half-and-half replay of a
fine-tuning round, and a miniature `vigil train save-round` end to end (tiny ensemble, a request answered
by the scripted expert, a new calibrated bundle with provenance).

Frequencies are checked with a chi-square statistic against the 0.999 quantile, on a fixed rng: the
outcome is deterministic, the threshold only says how far from the prediction a correct rule may land."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_vigil
from scipy.stats import chi2

from vigil.training import flow
from vigil.training.save import acquire, by_task, finetune, replay_groups, task_probabilities

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "flow-tiny.toml"


def chi_square_ok(counts: Sequence[int], p: np.ndarray) -> bool:
    counts = np.asarray(counts, np.float64)
    expected = counts.sum() * np.asarray(p, np.float64)
    stat = float(((counts - expected) ** 2 / expected).sum())
    return stat < chi2.ppf(0.999, len(p) - 1)


def task_counts(picks, tasks) -> list[int]:
    c = Counter(t for t, _ in picks)
    return [c[t] for t in tasks]


# ------------------------------------------------------------------------------------------ acquisition


def test_tau_zero_is_uniform_over_tasks_whatever_the_uncertainty():
    rng = np.random.default_rng(0)
    u = {f"t{k}": rng.normal(loc=k * 3.0 - 4.0, scale=1.0, size=3000) for k in range(5)}  # some below 0
    picks = acquire(u, 2500, tau=0.0, rng=np.random.default_rng(1))
    counts = task_counts(picks, list(u))
    assert sum(counts) == 2500 and chi_square_ok(counts, np.full(5, 0.2)), counts
    assert not chi_square_ok(counts, np.array([0.1, 0.15, 0.2, 0.25, 0.3]))  # the test can tell


def test_slots_follow_u_to_the_tau():
    tau = 2.5
    u = {"a": np.full(5000, 0.5), "b": np.full(5000, 1.0), "c": np.full(5000, 2.0)}
    picks = acquire(u, 3000, tau=tau, rng=np.random.default_rng(2))
    p = np.array([0.5, 1.0, 2.0]) ** tau
    counts = task_counts(picks, ["a", "b", "c"])
    assert chi_square_ok(counts, p / p.sum()), counts
    assert not chi_square_ok(counts, np.array([0.5, 1.0, 2.0]) / 3.5)  # tau = 1 would be another split
    # the task uncertainty is the mean over the task's candidates, not its maximum
    u2 = {"a": np.array([4.0, 0.0, 0.0, 0.0] * 1000), "b": np.full(4000, 1.0)}
    counts = task_counts(acquire(u2, 2000, tau=tau, rng=np.random.default_rng(3)), ["a", "b"])
    assert chi_square_ok(counts, np.array([0.5, 0.5])), counts


@pytest.mark.parametrize("rule", ["save", "uniform", "random"])
def test_caps_and_a_budget_beyond_the_pool(rule):
    u = {"tiny": [9.0], "small": [5.0, 4.0], "big": list(np.linspace(0.1, 0.2, 50))}
    for seed in range(20):
        picks = acquire(u, 10, rng=np.random.default_rng(seed), rule=rule)
        c = Counter(t for t, _ in picks)
        assert len(picks) == 10 and c["tiny"] <= 1 and c["small"] <= 2 and len(set(picks)) == 10
        assert all(0 <= i < len(u[t]) for t, i in picks)
    everything = acquire(u, 1000, rng=np.random.default_rng(0), rule=rule)
    assert sorted(everything) == sorted((t, i) for t, s in u.items() for i in range(len(s)))
    assert acquire(u, 0, rng=np.random.default_rng(0), rule=rule) == []
    assert acquire({"none": []}, 3, rng=np.random.default_rng(0), rule=rule) == []


def test_save_takes_the_most_uncertain_candidates_of_a_task_first():
    rng = np.random.default_rng(4)
    u = {t: rng.gamma(2.0, size=n) for t, n in (("a", 30), ("b", 12), ("c", 7))}
    picks = acquire(u, 25, rng=np.random.default_rng(5))
    for t, s in u.items():
        mine = [i for task, i in picks if task == t]
        assert mine == list(np.argsort(-s, kind="stable")[:len(mine)]), t
    # the most uncertain task is drawn first and most, with these numbers
    assert Counter(t for t, _ in picks).most_common(1)[0][0] == max(u, key=lambda t: u[t].mean())


def test_negative_or_zero_uncertainty_gets_no_slot_while_a_positive_task_has_candidates():
    u = {"neg": [-1.0, -2.0], "zero": [0.0], "pos": [0.1, 0.3, 0.2, 0.05, 0.4]}
    picks = acquire(u, 8, rng=np.random.default_rng(0))
    assert [t for t, _ in picks[:5]] == ["pos"] * 5
    assert [i for _, i in picks[:5]] == [4, 1, 2, 0, 3]
    assert sorted(t for t, _ in picks[5:]) == ["neg", "neg", "zero"]  # then uniform over what is left
    p = task_probabilities(np.array([-1.0, 0.0, 0.2]), np.array([2, 1, 5]), 2.5)
    np.testing.assert_array_equal(p, [0.0, 0.0, 1.0])
    np.testing.assert_allclose(task_probabilities(np.array([-1.0, 0.0]), np.array([2, 1]), 2.5), [0.5, 0.5])
    np.testing.assert_allclose(task_probabilities(np.array([1.0, 2.0]), np.array([0, 1]), 2.5), [0.0, 1.0])


def test_random_draws_from_the_pool_not_per_task():
    u = {"big": np.zeros(90), "small": np.full(10, 5.0)}
    rng = np.random.default_rng(6)
    big = [sum(t == "big" for t, _ in acquire(u, 10, rng=rng, rule="random")) for _ in range(2000)]
    assert abs(np.mean(big) / 10 - 0.9) < 0.01  # uniform over tasks would give 0.5, SAVE ~0
    counts = task_counts(acquire(u, 2000, rng=np.random.default_rng(7), rule="uniform"), ["big", "small"])
    assert counts == [90, 10]  # the whole pool
    counts = task_counts(acquire({"big": np.zeros(4000), "small": np.full(4000, 5.0)}, 2000,
                                 rng=np.random.default_rng(8), rule="uniform"), ["big", "small"])
    assert chi_square_ok(counts, np.array([0.5, 0.5])), counts


def test_uniform_takes_a_task_candidates_in_random_order():
    s = np.arange(100.0)
    picks = [i for _, i in acquire({"a": s}, 100, rng=np.random.default_rng(9), rule="uniform")]
    assert sorted(picks) == list(range(100)) and picks != list(range(99, -1, -1))
    firsts = {acquire({"a": s}, 1, rng=np.random.default_rng(k), rule="uniform")[0][1] for k in range(30)}
    assert len(firsts) > 10


def test_acquire_refuses_bad_arguments():
    with pytest.raises(ValueError, match="rule"):
        acquire({"a": [1.0]}, 1, rule="diversity")
    with pytest.raises(ValueError, match="tau"):
        acquire({"a": [1.0]}, 1, tau=-1)
    with pytest.raises(ValueError, match="finite"):
        acquire({"a": [1.0, float("nan")]}, 1)


def test_by_task_maps_picks_back_to_candidates():
    scores, index = by_task(["b", "a", "b", "c", "a"], [1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_array_equal(scores["b"], [1.0, 3.0])
    assert index == {"b": [0, 2], "a": [1, 4], "c": [3]}
    picks = acquire(scores, 2, rng=np.random.default_rng(0))
    assert all(index[t][i] in range(5) for t, i in picks)


class Encoder:
    """Stands in for the onboard InstructionEncoder: a fixed 3-d embedding per instruction."""

    def embed(self, texts):
        return np.stack([np.array([len(t), t.count("e"), 1.0], np.float32) / 10 for t in texts])


def candidate(task: str, instruction: str, state0: np.ndarray):
    from vigil.training.demos import Episode

    states = np.stack([state0, state0 + 1]).astype(np.float32)
    return Episode(task, instruction, 0, {"state": states}, np.zeros((1, 4), np.float32), np.zeros(1, np.float32),
                   np.ones(1, bool))


def test_candidate_scores_are_the_ensemble_scores_at_the_initial_observation():
    from vigil.training.save import candidate_scores

    torch.manual_seed(0)
    cfg = tiny_cfg()
    ens = flow.Ensemble(cfg).eval()
    rng = np.random.default_rng(0)
    cands = [candidate("a" if k % 2 else "b", "push it" if k % 2 else "reach", rng.normal(size=5)) for k in range(7)]
    vfd = candidate_scores(ens, cands, Encoder(), "vfd", seed=3, batch=3)  # batches of 3: 3 + 3 + 1
    assert vfd.shape == (7,) and np.all(vfd > 0)
    np.testing.assert_allclose(vfd, candidate_scores(ens, cands, Encoder(), "vfd", seed=3), rtol=1e-5)
    obs = torch.from_numpy(np.stack([c.observations["state"][0] for c in cands]))
    instr = torch.from_numpy(Encoder().embed([c.instruction for c in cands]))
    noise = torch.randn(cfg.vfd_samples, 7, cfg.horizon, cfg.action_dim, generator=torch.Generator().manual_seed(3))
    np.testing.assert_allclose(vfd, flow.vfd_one_way(ens, obs, instr, noise).numpy(), rtol=1e-5)
    for score in ("action_l2", "gu"):
        assert candidate_scores(ens, cands, Encoder(), score).shape == (7,)
    ens.copy_member(0, 1)  # identical members: no disagreement
    np.testing.assert_allclose(candidate_scores(ens, cands, Encoder(), "vfd"), 0, atol=1e-10)
    assert candidate_scores(ens, [], Encoder()).shape == (0,)
    with pytest.raises(ValueError, match="score"):
        candidate_scores(ens, cands, Encoder(), "ace")


def test_rollout_scores_play_the_policy_from_each_candidates_reset():
    """save_rollout's score: the mean VFD of the policy's own first plans in a real Meta-World episode from
    the candidate's reset; its first plan is the plan at the reset observation."""
    from types import SimpleNamespace

    from vigil.sim.envs import make_env
    from vigil.training.save import rollout_scores

    torch.manual_seed(0)
    cfg = flow.FlowConfig(obs_dim=39, instr_dim=3, hidden=16, depth=1, members=2, horizon=4)
    ens = flow.Ensemble(cfg).eval()
    cands = [SimpleNamespace(task="reach-v3", seed=s, instruction="reach the goal") for s in (3, 4)]
    envs: dict = {}
    three = rollout_scores(ens, cands, Encoder(), plans=3, seed=5, envs=envs, max_steps=50)
    assert three.shape == (2,) and np.all(three > 0) and list(envs) == ["reach-v3"]
    np.testing.assert_array_equal(three, rollout_scores(ens, cands, Encoder(), plans=3, seed=5, envs=envs))
    one = rollout_scores(ens, cands[:1], Encoder(), plans=1, seed=5, envs=envs)
    env = make_env("reach-v3")
    state = torch.as_tensor(env.reset(seed=3)["state"], dtype=torch.float32)[None]
    noise = torch.from_numpy(np.random.default_rng([5, 3, 7]).standard_normal((1, 1, 4, 4), dtype=np.float32))
    np.testing.assert_allclose(one[0], float(flow.plan(ens, state, torch.from_numpy(Encoder().embed(
        ["reach the goal"])), noise)[1][0]), rtol=1e-6)
    env.close()
    ens.copy_member(0, 1)  # identical members: no disagreement anywhere on the way
    np.testing.assert_allclose(rollout_scores(ens, cands, Encoder(), plans=3, seed=5, envs=envs), 0, atol=1e-10)


# --------------------------------------------------------------------------------- half-and-half replay


def test_minibatches_hold_an_equal_share_of_each_group():
    old, acq = torch.arange(1000), torch.arange(1000, 1007)  # few acquired examples: repeated in the batch
    stream = flow.minibatches([old, acq], 65, torch.Generator().manual_seed(0))
    seen = Counter()
    for _ in range(40):
        b = next(stream)
        assert b.shape == (65,) and int((b < 1000).sum()) == 33 and int((b >= 1000).sum()) == 32
        seen.update(b[b >= 1000].tolist())
    assert set(seen) == set(range(1000, 1007)) and max(seen.values()) - min(seen.values()) <= 40
    # a large group is an epoch stream: no index twice before its epoch is over
    first = torch.cat([next(flow.minibatches([old, acq], 64, torch.Generator().manual_seed(1)))[:32]])
    assert len(set(first.tolist())) == 32
    stream = flow.minibatches([torch.arange(100)], 10, torch.Generator().manual_seed(2))
    epoch = torch.cat([next(stream) for _ in range(10)])
    assert sorted(epoch.tolist()) == list(range(100))


def tiny_cfg(**kw) -> flow.FlowConfig:
    return flow.FlowConfig(obs_dim=5, instr_dim=3, horizon=2, hidden=16, depth=2, members=2, batch_size=16,
                           steps=12, lr=1e-3, **kw)


def synthetic(n: int, shift: float, seed: int):
    rng = np.random.default_rng(seed)
    return (rng.normal(shift, 1, (n, 5)).astype(np.float32), rng.normal(size=(n, 3)).astype(np.float32),
            rng.normal(shift, 0.3, (n, 2, 4)).astype(np.float32))


def test_groups_of_one_label_train_exactly_as_without(monkeypatch):
    cfg = tiny_cfg()
    obs, instr, chunks = synthetic(40, 0.0, 0)
    _, h1 = flow.train_ensemble(cfg, obs, instr, chunks, progress=False)
    _, h2 = flow.train_ensemble(cfg, obs, instr, chunks, progress=False, groups=np.full(40, 3))
    np.testing.assert_array_equal(h1["loss"], h2["loss"])
    with pytest.raises(ValueError, match="groups"):
        flow.train_ensemble(cfg, obs, instr, chunks, progress=False, groups=np.zeros(39, int))


def test_finetune_minibatches_are_half_acquired_and_start_from_the_parent(monkeypatch):
    cfg = tiny_cfg()
    old, acq = synthetic(200, 0.0, 1), synthetic(9, 2.0, 2)
    parent, _ = flow.train_ensemble(cfg, *old, progress=False)
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    batches: list[torch.Tensor] = []
    real = flow.minibatches

    def recording(groups, batch_size, generator):
        for b in real(groups, batch_size, generator):
            batches.append(b)
            yield b

    monkeypatch.setattr(flow, "minibatches", recording)
    ens, hist = finetune(parent, cfg, old, acq, progress=False)
    assert len(batches) == cfg.steps * cfg.members and len(hist["loss"]) == cfg.steps
    for b in batches:  # indices >= 200 are the acquired examples (concatenated after the old ones)
        assert int((b >= 200).sum()) == int((b < 200).sum()) == cfg.batch_size // 2
    np.testing.assert_array_equal(replay_groups(3, 2), [0, 0, 0, 1, 1])
    for k, v in parent.state_dict().items():  # the parent is copied, not changed
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    torch.testing.assert_close(ens.obs_mean, parent.obs_mean)  # the parent's normalisation is kept
    with pytest.raises(ValueError, match="acquired"):
        finetune(parent, cfg, old, synthetic(0, 0.0, 3), progress=False)


# ----------------------------------------------------------------------------------------- end to end


def flat(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten().float() for k, v in sorted(state.items()) if not k.startswith("obs_")
                      and k != "freqs"])


def test_save_round_end_to_end(tmp_path, encoder_bundle):
    from vigil.policies.bundle import load_policy
    from vigil.runtime.cli import main
    from vigil.runtime.requests import RequestStore
    from vigil.sim.expert import serve_requests
    from vigil.training.demos import DemoSet, DemoWriter, Episode
    from vigil.training.train_flow import load_checkpoint

    torch.set_num_threads(1)
    demos, run, acquired, out = tmp_path / "demos", tmp_path / "run", tmp_path / "acquired", tmp_path / "r1"
    config = tmp_path / "tiny.toml"
    config.write_text(TINY.read_text().replace("steps = 300", "steps = 150")
                      + "\n[save]\nsteps = 25\ncalibration_max_steps = 40\n")
    # the parent run, in process (the CLI's own function, without a child's start-up)
    assert main(["demos", "record", "--tasks", "reach-v3", "--episodes", "2", "--out", str(demos)]) == 0
    assert main(["train", "flow", "--config", str(config), "--demos", str(demos), "--out", str(run),
                 "--encoder", str(encoder_bundle), "--no-progress", "--dynamics-steps", "0"]) == 0
    parent = load_policy(run / "bundle").manifest

    # deployment: two requests, one answered by the scripted expert, one still open
    store = RequestStore(tmp_path / "alerts.db", timeout=5.0)
    recipe = {"env": "metaworld", "task": "reach-v3", "seed": 7, "max_steps": 500}
    answered = store.append("sim-0", "reach-v3", "reach", parent.policy_id, 1, 0, 3.0, 1.0,
                            {"state": np.zeros(39, np.float32)}, sim=recipe)
    answers = serve_requests(store, DemoWriter(acquired), "test-expert", once=True, max_requests=1)
    assert [a.request for a in answers] == [answered.id] and answers[0].fulfilled
    store.append("sim-0", "reach-v3", "reach", parent.policy_id, 2, 0, 3.0, 1.0, {"state": np.zeros(39, np.float32)},
                 sim=recipe)
    store.close()
    # a demonstration in the same folder that answers no request: left out with --requests
    T = 6
    DemoWriter(acquired).add(Episode("reach-v3", "reach", 0, {"state": np.zeros((T + 1, 39), np.float32)},
                                     np.zeros((T, 4), np.float32), np.zeros(T, np.float32), np.ones(T, bool)))

    r = run_vigil("train", "save-round", "--run", str(run), "--old-demos", str(demos), "--acquired", str(acquired),
                  "--requests", str(tmp_path / "alerts.db"), "--out", str(out), "--config", str(config),
                  "--seed", "5", "--calibration-episodes", "1", "--calibration-all-episodes", "--no-progress",
                  timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["round"] == 1 and summary["requests"] == [answered.id] and summary["acquired"] == 1

    policy = load_policy(out / "bundle")
    m = policy.manifest
    assert m.kind == "flow_ensemble" and m.name == f"{parent.name}-r1" and m.sha256 != parent.sha256
    save = m.provenance["save"]
    assert save["parent"]["run"] == str(run.resolve()) and save["parent"]["policy"] == parent.policy_id
    assert save["lineage"] == [parent.policy_id] and save["requests"] == [answered.id]
    assert [(a["episode"], a["request"]) for a in save["acquired"]] == [(answers[0].demo, answered.id)]
    assert save["acquired"][0]["dataset"] == str(acquired.resolve())
    assert save["steps"] == 25 and save["seed"] == 5 and m.provenance["seed"] == 5
    ds = DemoSet(demos)
    assert save["old"] == [{"dataset": str(demos.resolve()), "episodes": len(ds.episodes(success=True)),
                            "steps": sum(e.steps for e in ds.episodes(success=True))}]
    assert m.control_rate_hz == parent.control_rate_hz and m.observation == parent.observation  # swappable
    vfd = m.monitor["vfd"]
    assert vfd["episodes"] == 1 and vfd["tasks"] == ["reach-v3"] and 0 < vfd["thresholds"]["alert"] < float("inf")
    prov = json.loads((out / "provenance.json").read_text())
    calibration = dict(prov["calibration"])
    assert calibration.pop("failure")["episodes"] == 1  # the failure monitor, recalibrated with the round
    assert calibration == vfd and prov["save"]["requests"] == [answered.id]
    assert m.onnx_scores == ("vfd", "rnd") and "failure" in m.monitor  # RND fitted again on the round's encoder
    assert prov["density"]["config"]["steps"] == 2000

    # warm start: the weights moved a little from the parent's, far less than a different init is away
    ens_p, _, _ = load_checkpoint(run / "ensemble.pt")
    ens_n, cfg_n, ck = load_checkpoint(out / "ensemble.pt")
    assert cfg_n.steps == 25 and len(ck["loss"]) == 25
    p, n = flat(ens_p.state_dict()), flat(ens_n.state_dict())
    other = flat(flow.Ensemble(flow.FlowConfig(**{**ck["cfg"], "seed": 99})).state_dict())
    moved = float((n - p).norm() / p.norm())
    assert 0 < moved < 0.25 and float((n - p).norm()) < 0.25 * float((other - p).norm()), moved
    torch.testing.assert_close(ens_n.obs_mean, ens_p.obs_mean)
    torch.testing.assert_close(ens_n.obs_std, ens_p.obs_std)


def test_save_round_refusals(tmp_path, capsys):
    from vigil.runtime.cli import main

    args = ["train", "save-round", "--run", str(tmp_path / "none"), "--old-demos", str(tmp_path), "--acquired",
            str(tmp_path), "--out", str(tmp_path / "o")]
    assert main([*args, "--steps", "0"]) == 2
    assert "'save.steps' must be an integer >= 1" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[save]\nstep = 3\n")
    assert main([*args, "--config", str(bad)]) == 2
    assert "'save.step' is unknown" in capsys.readouterr().err
    assert main(args) == 2
    assert "ensemble.pt" in capsys.readouterr().err
