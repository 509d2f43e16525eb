"""`vigil learn` (issue 22, item 2): an off-board SAC learner on a runtime's transition log, hot-swapping what it
serves with provenance; a restart resumes from the checkpoint and the durable log without reading a transition
twice; a swap whose episodes do worse than the policy before it is rolled back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_vigil

from vigil.runtime.client import RobotLink
from vigil.sim.envs import GymEnv

pytest.importorskip("gymnasium")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    from vigil.training.learn import pretrain

    out = tmp_path_factory.mktemp("sac")
    pretrain("Pendulum-v1", 1100, out, seed=0, progress=False)  # 1000 random steps, 100 updates: a start
    return out


def policy_served(endpoint: str) -> str:
    env = GymEnv("Pendulum-v1")
    link = RobotLink(endpoint, "probe")
    try:
        return link.hello(env.observation_spec, env.action_spec).policy
    finally:
        link.close()
        env.close()


def learn(*args: str):
    r = run_vigil("learn", *args, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r, json.loads(r.stdout.strip().splitlines()[-1])


class Background:
    """`vigil learn ARGS` running beside the test, its output in a file (not a pipe nobody reads while it runs)."""

    def __init__(self, tmp_path: Path, *args: str):
        import subprocess
        import sys

        self.path = tmp_path / "learn.out"
        self.printed = open(self.path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "vigil.runtime.cli", "learn", *args],
                                     stdout=self.printed, stderr=subprocess.STDOUT, text=True)

    def finish(self, timeout: float) -> dict:
        """Wait for it to stop by itself; its summary line."""
        self.proc.wait(timeout=timeout)
        self.printed.close()
        output = self.path.read_text()
        assert self.proc.returncode == 0, output[-2000:]
        return json.loads(output.strip().splitlines()[-1])

    def stop(self) -> None:
        """Kill it if it still runs (a test that failed on the way)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.printed.close()


def swaps_of(out: Path) -> list[dict]:
    path = out / "learn.jsonl"
    return [json.loads(line)["swap"] for line in path.read_text().splitlines()] if path.exists() else []


def test_learner_swaps_resumes_and_reads_each_transition_once(pretrained, serve, tmp_path):
    log, out = tmp_path / "transitions.db", tmp_path / "learner"
    served = serve(pretrained / "bundle", transitions=str(log), control_endpoint="tcp://127.0.0.1:0")
    first_policy = policy_served(served.robot_endpoint)
    sim = ["sim", "--connect", served.robot_endpoint, "--system", "Pendulum-v1", "--steps", "100", "--transitions"]
    assert run_vigil(*sim, "--episodes", "4", timeout=120).returncode == 0
    common = ["--transitions", str(log), "--bundle", str(pretrained / "bundle"), "--out", str(out),
              "--control", served.control_endpoint, "--warm-start", str(pretrained / "sac.pt"),
              "--learning-starts", "100", "--every", "100", "--poll-s", "0.05", "--rollback-episodes", "100"]
    _, summary = learn(*common, "--max-updates", "200")
    assert summary == {"updates": 200, "transitions": 400, "swaps": 2, "cursor": summary["cursor"]}
    now = policy_served(served.robot_endpoint)
    assert now != first_policy and now.startswith("sac-Pendulum-v1-s0-online-u200@")  # the runtime serves it
    manifest = json.loads((out / "bundles" / "u00000200" / "manifest.json").read_text())
    assert manifest["provenance"]["updates"] == 200 and manifest["provenance"]["transitions"] == 400

    # the learner stopped; the robot went on under the last swapped-in policy; a restart resumes
    assert run_vigil(*sim, "--episodes", "1", timeout=120).returncode == 0
    r, summary = learn(*common, "--max-updates", "300")
    assert "resumed at update 200" in r.stdout
    assert summary["updates"] == 300 and summary["transitions"] == 500 and summary["swaps"] == 3
    rows = [json.loads(line) for line in (out / "learn.jsonl").read_text().splitlines()]
    assert [row["swap"]["updates"] for row in rows] == [100, 200, 300] and all(row["swap"]["ok"] for row in rows)


def test_a_swap_that_does_worse_is_rolled_back(pretrained, tmp_path):
    """A policy is judged by its first K episodes against the last accepted policy's last K, once; a rollback
    returns to the accepted bundle and to the actor that made it; a policy swapped out before it played K
    episodes is neither accepted nor a baseline."""
    import torch

    from vigil.training.learn import LearnConfig, Learner

    learner = Learner(LearnConfig(transitions=str(tmp_path / "none.db"), bundle=str(pretrained / "bundle"),
                                  out=str(tmp_path / "l"), rollback_episodes=3, rollback_drop=0.2), log=lambda _: None)
    old_bundle = learner.current
    start_actor = {k: v.clone() for k, v in learner.sac.actor.state_dict().items()}

    def export(updates: int) -> str:  # a bundle folder of its own per number of updates
        learner.sac.updates = updates
        return learner.export()

    new_bundle = export(100)
    learner.swap_in(new_bundle)  # no control channel: recorded as swapped
    old, new = learner.policy_of[old_bundle], learner.policy_of[new_bundle]
    learner.episodes.by_policy = {old: [-100.0, -110.0, -105.0], new: [-150.0, -160.0]}
    learner.judge()
    assert learner.current == new_bundle  # two episodes: not judged yet
    learner.episodes.by_policy[new].append(-155.0)
    with torch.no_grad():  # the learner's actor moved on since: a rollback puts back the one that made the bundle
        for p in learner.sac.actor.parameters():
            p.add_(1.0)
    learner.judge()
    assert learner.current == old_bundle and learner.swaps[-1]["why"].startswith("rollback")
    assert all(torch.equal(v, start_actor[k]) for k, v in learner.sac.actor.state_dict().items())
    learner.judge()  # judged once: no swapping back and forth
    assert len(learner.swaps) == 2
    good = export(200)
    learner.swap_in(good)
    learner.episodes.by_policy[learner.policy_of[good]] = [-90.0, -95.0, -99.0]
    learner.judge()
    assert learner.current == learner.accepted == good  # better than before: kept, and the new baseline
    # swapped out before it played K episodes (the learner swaps faster than episodes end): not a baseline; the next
    # policy is judged against the accepted one, and a collapse returns to it
    brief = export(300)
    learner.swap_in(brief)
    learner.episodes.by_policy[learner.policy_of[brief]] = [-400.0]
    bad = export(400)
    learner.swap_in(bad)
    learner.episodes.by_policy[learner.policy_of[bad]] = [-1000.0, -1100.0, -1200.0]
    learner.judge()
    assert learner.current == good and learner.swaps[-1]["why"].startswith("rollback")
    assert np.isfinite(list(learner.returns().values())).all()


def test_a_killed_learner_resumes_and_a_missing_runtime_keeps_its_policy(pretrained, serve, tmp_path):
    """SIGKILL mid-run: the restart resumes from the last checkpoint and the durable log, reads every transition
    once; with the runtime gone, swaps fail (recorded) and learning goes on."""
    from conftest import wait_until

    log, out = tmp_path / "transitions.db", tmp_path / "learner"
    served = serve(pretrained / "bundle", transitions=str(log))
    assert run_vigil("sim", "--connect", served.robot_endpoint, "--system", "Pendulum-v1", "--steps", "100",
                     "--episodes", "3", "--transitions", "--disconnect-at", "40", "--disconnect-s", "0.3",
                     timeout=120).returncode == 0
    served.stop()  # the runtime is gone for the rest of the test
    rows_total = 0
    from vigil.runtime.transitions import read_after

    rows = read_after(log)
    rows_total = len(rows["id"])
    for ep in np.unique(rows["episode"]):  # the outage left a gap: nothing pairs across it
        m = rows["episode"] == ep
        steps, obs, nxt = rows["step"][m], rows["obs"][m], rows["next_obs"][m]
        consecutive = np.flatnonzero(np.diff(steps) == 1)
        np.testing.assert_array_equal(nxt[consecutive], obs[consecutive + 1])
    assert 0 < rows_total < 300
    common = ["--transitions", str(log), "--bundle", str(pretrained / "bundle"), "--out", str(out),
              "--control", "tcp://127.0.0.1:9", "--swap-timeout-s", "0.5", "--learning-starts", "50",
              "--every", "50", "--poll-s", "0.05", "--warm-start", str(pretrained / "sac.pt")]
    learner = Background(tmp_path, *common, "--max-updates", "100000")
    try:
        wait_until(lambda: (out / "checkpoint.pt").exists(), 120)
    finally:
        learner.stop()  # SIGKILL mid-run
    r, summary = learn(*common, "--max-updates", str(min(rows_total, 150)))
    assert "resumed at update" in r.stdout
    assert summary["transitions"] == rows_total and summary["cursor"] == int(rows["id"][-1])  # each read once
    swaps = swaps_of(out)
    assert swaps and not any(s["ok"] for s in swaps)  # no runtime: nothing swapped, nothing stopped
    # a new trial that does not keep the earlier trials' data (the ablation): the networks resume, the replay not
    r, _ = learn(*common, "--max-updates", str(min(rows_total, 150)), "--forget-replay")
    assert "replay 0 (earlier trials' data not replayed)" in r.stdout and f"replay {rows_total}" not in r.stdout


def test_a_runtime_restarted_during_learning_gets_the_learners_policy_back(pretrained, serve, tmp_path):
    """The runtime is SIGKILLed while the learner runs and started again on the same endpoints and log: the
    learner's swaps fail while it is down (recorded), every transition of both lives is read once, and its next
    swap puts the learned policy back into the new runtime."""
    import signal
    import time

    from conftest import tcp_endpoint, wait_until

    log, out = tmp_path / "transitions.db", tmp_path / "learner"
    robot, control = tcp_endpoint(), tcp_endpoint()
    flags = dict(transitions=str(log), robot_endpoint=robot, control_endpoint=control)
    first = serve(pretrained / "bundle", **flags)
    sim = ["sim", "--connect", robot, "--system", "Pendulum-v1", "--steps", "100", "--transitions", "--episodes", "2"]
    learner = Background(
        tmp_path, "--transitions", str(log), "--bundle", str(pretrained / "bundle"), "--out", str(out), "--control",
        control, "--warm-start", str(pretrained / "sac.pt"), "--learning-starts", "100", "--every", "100",
        "--poll-s", "0.05", "--rollback-episodes", "100", "--swap-timeout-s", "1", "--max-updates", "400")
    try:
        assert run_vigil(*sim, timeout=120).returncode == 0
        wait_until(lambda: any(s["ok"] and s["updates"] == 200 for s in swaps_of(out)), 120)
        first.proc.send_signal(signal.SIGKILL)  # the runtime dies under the learner
        first.proc.wait(10)
        time.sleep(0.5)
        second = serve(pretrained / "bundle", **flags)  # restarted with its command line's bundle
        assert run_vigil(*sim, timeout=120).returncode == 0
        summary = learner.finish(180)
    finally:
        learner.stop()
    from vigil.runtime.transitions import read_after

    assert summary["updates"] == 400 and summary["transitions"] == len(read_after(log)["id"]) == 400  # each once
    done = swaps_of(out)
    assert [s["updates"] for s in done if s["ok"]][-1] == 400
    assert policy_served(second.robot_endpoint).startswith("sac-Pendulum-v1-s0-online-u400@")  # back in the new one


# -- the on-policy option: BPO (and PPO) through the runtime --------------------------------------------------


@pytest.fixture(scope="module")
def bpo_pretrained(tmp_path_factory) -> Path:
    """`vigil train bpo` for one rollout of Pendulum: an actor, a critic and their normalisation to start from."""
    out = tmp_path_factory.mktemp("bpo")
    r = run_vigil("train", "bpo", "--env", "Pendulum-v1", "--steps", "2048", "--out", str(out), "--no-progress",
                  timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_censored_log_prob_is_the_density_inside_and_the_tail_mass_at_the_bounds():
    import torch
    from scipy.stats import norm

    from vigil.training.onpolicy import censored_log_prob, log_ndtr

    z = torch.linspace(-12, 6, 181)
    np.testing.assert_allclose(log_ndtr(z).numpy(), norm.logcdf(z.numpy()), rtol=5e-3, atol=1e-5)
    mean, log_std = torch.tensor([[0.3, -0.5]]), torch.tensor([[np.log(0.5), np.log(2.0)]], dtype=torch.float32)
    low, high = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0])
    inside = torch.tensor([[0.1, 0.7]])
    expect = norm.logpdf([0.1, 0.7], [0.3, -0.5], [0.5, 2.0]).sum()
    assert censored_log_prob(mean, log_std, inside, low, high).item() == pytest.approx(expect, abs=1e-5)
    at_bounds = torch.tensor([[1.0, -1.0]])  # mass beyond the upper bound of the first, below the lower of the second
    expect = norm.logsf(1.0, 0.3, 0.5) + norm.logcdf(-1.0, -0.5, 2.0)
    assert censored_log_prob(mean, log_std, at_bounds, low, high).item() == pytest.approx(expect, abs=1e-4)


def test_an_exploring_bundle_samples_from_the_robots_generator_and_reports_its_log_prob(bpo_pretrained, tmp_path):
    """The runtime's agent draws the noise (seeded per episode: reproducible), the graph samples and reports the
    censored log-probability of the action the robot gets, which is the learner's own computation."""
    from vigil.policies.agent import Agent
    from vigil.policies.bundle import load_policy
    from vigil.training.learn import LearnConfig, Learner

    learner = Learner(LearnConfig(transitions=str(tmp_path / "none.db"), bundle=str(bpo_pretrained / "bundle"),
                                  out=str(tmp_path / "l"), algo="bpo", warm_start=str(bpo_pretrained / "actor.pt")),
                      log=lambda _: None)
    policy = load_policy(learner.export())
    obs = {"state": np.array([0.5, -0.2, 1.0], np.float32)}

    def episode(seed: int) -> tuple[np.ndarray, np.ndarray]:
        agent = Agent(policy)
        agent.reset(seed=seed)
        steps = [agent.act(obs) for _ in range(400)]
        return np.array([s.action for s in steps]), np.array([s.scores["logp"] for s in steps])

    actions, logp = episode(7)
    np.testing.assert_array_equal(episode(7)[0], actions)  # seeded: the same draws
    assert not np.array_equal(episode(8)[0], actions)
    deterministic = load_policy(bpo_pretrained / "bundle").infer(obs).actions[0]
    mean, std = actions.mean(0), actions.std(0)
    sigma = float(np.exp(learner.onpolicy.actor.log_std.detach().numpy())[0])
    assert abs(mean[0] - deterministic[0]) < 4 * sigma / np.sqrt(400) + 0.1 and 0.5 * sigma < std[0] < 1.5 * sigma
    assert (np.abs(actions) <= 2.0).all()  # clipped to Pendulum's bounds by the agent
    assert Agent(policy).act(obs).scores["mean_clipped"] == 0.0  # the mean is inside: saturation judges that
    np.testing.assert_allclose(learner.onpolicy.log_prob(np.repeat(obs["state"][None], 400, 0), actions), logp,
                               atol=1e-4)


@pytest.mark.hang_limit(300)
def test_bpo_learns_on_policy_through_the_runtime(bpo_pretrained, serve, tmp_path):
    """`vigil learn --algo bpo`: the exploring start is swapped in, the runtime logs each sampled action's
    log-probability, one update per rollout is swapped in with provenance; a restart gathers the interrupted
    rollout again from where it began."""

    from conftest import wait_until

    from vigil.runtime.transitions import read_after

    log, out = tmp_path / "transitions.db", tmp_path / "learner"
    served = serve(bpo_pretrained / "bundle", transitions=str(log), control_endpoint="tcp://127.0.0.1:0")
    common = ["--algo", "bpo", "--transitions", str(log), "--bundle", str(bpo_pretrained / "bundle"), "--out",
              str(out), "--control", served.control_endpoint, "--warm-start", str(bpo_pretrained / "actor.pt"),
              "--rollout", "150", "--critic-warmup", "0", "--poll-s", "0.05", "--rollback-episodes", "100"]
    learner = Background(tmp_path, *common, "--max-updates", "2")
    try:
        wait_until(lambda: any(s["why"] == "exploring start" and s["ok"] for s in swaps_of(out)), 120)
        start_policy = policy_served(served.robot_endpoint)
        assert start_policy.startswith("bpo-Pendulum-v1-s0-online-u0@")
        sim = ["sim", "--connect", served.robot_endpoint, "--system", "Pendulum-v1", "--steps", "100",
               "--transitions"]
        assert run_vigil(*sim, "--episodes", "4", timeout=120).returncode == 0
        summary = learner.finish(120)
    finally:
        learner.stop()
    assert summary["updates"] == 2 and summary["swaps"] == 3
    done = swaps_of(out)
    assert [(s["why"], s["updates"], s["ok"]) for s in done] == [("exploring start", 0, True), ("update", 1, True),
                                                                 ("update", 2, True)]
    assert policy_served(served.robot_endpoint).startswith("bpo-Pendulum-v1-s0-online-u2@")
    manifest = json.loads((out / "bundles" / "u00000002" / "manifest.json").read_text())
    assert manifest["provenance"]["method"] == "bpo (vigil learn)" and manifest["extra"]["exploration"]

    rows = read_after(log)
    assert len(rows["id"]) == 400 and np.isfinite(rows["logp"]).all()  # every action was the exploring policy's
    # the runtime's log-probabilities are the exploring start's own (the warm start's actor, the learner's function)
    from vigil.training.learn import LearnConfig, Learner

    check = Learner(LearnConfig(transitions=str(log), bundle=str(bpo_pretrained / "bundle"),
                                out=str(tmp_path / "check"), algo="bpo", warm_start=str(bpo_pretrained / "actor.pt")),
                    log=lambda _: None)
    first = rows["policy"] == start_policy
    assert first.sum() >= 150
    np.testing.assert_allclose(check.onpolicy.log_prob(rows["obs"][first], rows["action"][first]),
                               rows["logp"][first], atol=1e-3)

    # restarted, it resumes at update 2 from where that update's rollout ended (what the update-2 bundle's provenance
    # says): the rollout it was gathering when it stopped is read again, nothing before it
    r, summary = learn(*common, "--max-updates", "2")
    assert "resumed at update 2" in r.stdout and summary["updates"] == 2
    prov = manifest["provenance"]
    assert (summary["cursor"], summary["transitions"]) == (prov["cursor"], prov["transitions"])
    assert 300 <= prov["transitions"] <= 400
    r = run_vigil("learn", *common, "--algo", "sac", timeout=120)  # another algorithm on the same folder: refused
    assert r.returncode == 2 and "holds the checkpoint of a bpo learner" in r.stderr
