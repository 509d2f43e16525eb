"""`vigil learn`: an off-board learner that trains on the runtime's transitions and hot-swaps the policy it serves.

    vigil serve --bundle runs/hopper/bundle --transitions transitions.db --control-endpoint tcp://127.0.0.1:5557
    vigil sim --system Hopper-v5 --mode realtime --transitions --episodes 1000
    vigil learn --transitions transitions.db --control tcp://127.0.0.1:5557 --bundle runs/hopper/bundle \\
        --warm-start runs/hopper/sac.pt --out runs/hopper-online

The loop, one pass per poll:
  1. read the transitions after the cursor (runtime/transitions.py: each once, in order) into the replay;
  2. make `utd` SAC updates per new transition (training/sac.py), once the replay holds `learning_starts`;
  3. every `every` updates: export the actor as a gaussian bundle (provenance: updates, transitions, parent) and
     swap it in through the runtime's control channel; checkpoint everything, cursor included (atomically);
  4. watch the returns of the episodes each policy played: when the first K episodes of the policy swapped in
     average less than the last K of the last *accepted* policy (the start, or one that passed this test) by more
     than `rollback_drop` of its magnitude, swap the accepted bundle back and go on learning from the networks
     that made it. A policy swapped out before it played K episodes is neither accepted nor judged.

`--algo bpo|ppo` is the on-policy option (training/onpolicy.py): the learner first swaps in an *exploring*
bundle of its warm start (the runtime samples the action and logs its log-probability), makes one BPO (or PPO)
update per `rollout` such transitions, and swaps in the next exploring bundle after each; `every` does not apply.

The runtime keeps its monitors and its deadline safe action whatever the learner does. A learner that dies leaves
the robot under the last policy it swapped in (the runtime holds it); restarted, it loads its checkpoint and
reads the durable log from the start into its replay, then goes on from its cursor: nothing read twice.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vigil.runtime.transitions import read_after
from vigil.training.onpolicy import OnPolicy, export_exploring
from vigil.training.rl import RLConfig
from vigil.training.sac import SAC, Replay, SACConfig

ALGOS = ("sac", "bpo", "ppo")


@dataclass(frozen=True)
class LearnConfig:
    """What `vigil learn` reads, where it swaps, and the study's knobs (docs/online_rl.md)."""

    transitions: str = field(metadata={"help": "the runtime's transition log (vigil serve --transitions)"})
    bundle: str = field(metadata={"help": "the bundle the runtime starts with (its spec and action bounds)"})
    out: str = field(metadata={"help": "the learner's folder: checkpoint.pt, bundles/, learn.jsonl"})
    algo: str = field(default="sac", metadata={
        "help": "sac (off-policy, the default) or bpo / ppo (on-policy: the runtime serves an exploring bundle)"})
    control: str = field(default="", metadata={
        "help": "the runtime's control endpoint to swap on (empty: export bundles, swap nothing)"})
    warm_start: str = field(default="", metadata={
        "help": "a checkpoint (vigil learn, or a simulation pretraining) whose actor starts the learner"})
    seed_replay: str = field(default="", metadata={
        "help": "another transition log (simulation data, or earlier trials) loaded into the replay first"})
    utd: float = field(default=1.0, metadata={"help": "SAC updates per new transition (update-to-data ratio)"})
    every: int = field(default=1000, metadata={"help": "SAC updates between swaps (on-policy: a swap per update)"})
    rollout: int = field(default=2048, metadata={
        "help": "bpo/ppo: transitions per update (sampled by the exploring policy; safe actions do not count)"})
    learning_starts: int = field(default=1000, metadata={"help": "transitions in the replay before updates begin"})
    critic_warmup: int = field(default=2000, metadata={
        "help": "updates with the actor frozen while the critics learn the new data (after a warm start; chosen "
                "from the ablations, docs/online_rl.md; 0: none)"})
    forget_replay: bool = field(default=False, metadata={
        "help": "on a restart, do not replay the log up to the cursor: earlier trials' robot data is not kept (an "
                "ablation; --seed-replay is still loaded)"})
    truncation_terminal: bool = field(default=False, metadata={
        "help": "treat a truncated episode (time limit) as terminal: no bootstrap (an ablation; off is right)"})
    rollback_episodes: int = field(default=5, metadata={"help": "episodes after a swap that judge it (K)"})
    rollback_drop: float = field(default=0.2, metadata={
        "help": "roll back when the K episodes after a swap average below the last accepted policy's last K by "
                "more than this share of its magnitude"})
    max_updates: int = field(default=0, metadata={
        "help": "stop after this many updates (SAC: gradient steps; bpo/ppo: rollouts) (0: run until stopped)"})
    poll_s: float = field(default=0.2, metadata={"help": "seconds between reads of the log when idle"})
    swap_timeout_s: float = field(default=60.0, metadata={
        "help": "seconds a swap may take (the runtime loads and checks the bundle) before it counts as failed"})
    seed: int = field(default=0, metadata={"help": "seed of the learner"})
    threads: int = field(default=1, metadata={
        "help": "torch threads of `vigil learn` (1: a learner beside the runtime never starves its control loop; "
                "torch's spinning worker threads do when the cores are shared)"})

    def __post_init__(self) -> None:
        from vigil.runtime.config import check_fields

        check_fields(self, [("algo", self.algo in ALGOS, f"one of {', '.join(ALGOS)}"),
                            ("seed_replay", not self.seed_replay or self.algo == "sac",
                             "empty with --algo bpo/ppo (an on-policy learner replays nothing)"),
                            ("rollout", self.rollout >= 2, "an integer >= 2"),
                            ("utd", 0 < self.utd < math.inf, "a finite number > 0"),
                            ("threads", self.threads >= 1, "an integer >= 1"),
                            ("every", self.every >= 1, "an integer >= 1"),
                            ("learning_starts", self.learning_starts >= 1, "an integer >= 1"),
                            ("rollback_episodes", self.rollback_episodes >= 1, "an integer >= 1"),
                            ("rollback_drop", self.rollback_drop >= 0, "a number >= 0"),
                            ("max_updates", self.max_updates >= 0, "an integer >= 0")])


class Episodes:
    """Returns of finished episodes, by the policy that played them (from the transitions' policy column)."""

    def __init__(self) -> None:
        self.running: dict[tuple[str, int], float] = {}
        self.by_policy: dict[str, list[float]] = {}

    def add(self, rows: dict[str, np.ndarray]) -> None:
        for r, e, rew, term, trunc, pol in zip(rows["robot"], rows["episode"], rows["reward"], rows["terminated"],
                                               rows["truncated"], rows["policy"], strict=True):
            key = (str(r), int(e))
            self.running[key] = self.running.get(key, 0.0) + float(rew)
            if term or trunc:
                self.by_policy.setdefault(str(pol), []).append(self.running.pop(key))


class Learner:
    def __init__(self, cfg: LearnConfig, sac_cfg: SACConfig | None = None, log: Callable[[str], None] = print,
                 rl_cfg: RLConfig | None = None):
        from vigil.policies.manifest import read_manifest

        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        (self.out / "bundles").mkdir(parents=True, exist_ok=True)
        m = read_manifest(Path(cfg.bundle))
        self.manifest = m
        self.obs_dim = int(np.prod(m.observation[0].shape))
        self.act_dim = int(np.prod(m.action.shape))
        low = np.asarray(m.action.low if m.action.low is not None else [-1.0] * self.act_dim, np.float32)
        high = np.asarray(m.action.high if m.action.high is not None else [1.0] * self.act_dim, np.float32)
        self.sac: SAC | None = None
        self.onpolicy: OnPolicy | None = None
        if cfg.algo == "sac":
            self.sac = SAC(self.obs_dim, self.act_dim, low, high,
                           sac_cfg or SACConfig(seed=cfg.seed, critic_warmup=cfg.critic_warmup))
            self.replay = Replay(self.obs_dim, self.act_dim)
        else:
            norm = m.normalisation.get(m.observation[0].name)
            mean = np.asarray(norm.mean if norm else np.zeros(self.obs_dim))
            std = np.asarray(norm.std if norm else np.ones(self.obs_dim))
            self.onpolicy = OnPolicy(self.obs_dim, self.act_dim, low, high,
                                     rl_cfg or RLConfig(loss=cfg.algo, seed=cfg.seed, rollout_steps=cfg.rollout,
                                                        minibatch=min(64, cfg.rollout)),
                                     mean, std, critic_warmup=cfg.critic_warmup)
        self.rng = np.random.default_rng(cfg.seed)
        self.episodes = Episodes()
        self.cursor, self.read, self.credit = 0, 0, 0.0
        self.rollout_cursor, self.rollout_read = 0, 0  # on-policy: where the rollout being gathered began
        # the bundle served, the last one that proved itself (a rollback returns to it), and the networks that made
        # each of the two (a rollback restores them)
        self.current = self.accepted = str(Path(cfg.bundle).resolve())
        self.snapshots: dict[str, dict[str, Any]] = {}
        self.policy_of: dict[str, str] = {self.current: m.policy_id}
        self.swaps: list[dict[str, Any]] = []
        self.judged: set[str] = set()
        self.exploring = False  # on-policy: an exploring bundle of ours is in the runtime
        self._retry_at = 0.0
        self._resume_or_start()

    @property
    def updates(self) -> int:
        """SAC gradient steps, or on-policy updates (one per rollout)."""
        return self.sac.updates if self.sac is not None else self.onpolicy.updates

    # -- state ------------------------------------------------------------------------------------------

    def _resume_or_start(self) -> None:
        ck = self.out / "checkpoint.pt"
        if ck.exists():  # a restart: the checkpoint, then the durable log up to its cursor into the replay
            state = torch.load(ck, weights_only=False)  # our own file
            saved = state.get("config", {}).get("algo", "sac")
            if saved != self.cfg.algo:
                raise ValueError(f"--out {self.out} holds the checkpoint of a {saved} learner, not {self.cfg.algo}: "
                                 "resume it with the same --algo, or give another --out")
            self.cursor, self.read = int(state["cursor"]), int(state["read"])
            self.credit = float(state.get("credit", 0.0))  # updates owed to what was read before the restart
            self.current, self.accepted = state["current"], state["accepted"]
            self.policy_of, self.swaps, self.judged = state["policy_of"], state["swaps"], set(state["judged"])
            if self.onpolicy is not None:  # the rollout being gathered was not saved: read it again
                self.onpolicy.load(state["onpolicy"])
                self.exploring = bool(state.get("exploring"))
                self.rollout_cursor, self.rollout_read = self.cursor, self.read
                self._load_log(self.cfg.transitions, self.cursor)  # the episodes' returns, for rollback
                self.log(f"resumed at update {self.updates}, cursor {self.cursor}")
                return
            self.sac.load(state["sac"])
            self._load_log(self.cfg.seed_replay, None)
            if not self.cfg.forget_replay:  # earlier trials' data kept (the study's advice)
                self._load_log(self.cfg.transitions, self.cursor)
            self.log(f"resumed at update {self.updates}, cursor {self.cursor}, replay {self.replay.size}"
                     + (" (earlier trials' data not replayed)" if self.cfg.forget_replay else ""))
            return
        if self.cfg.warm_start:
            ckpt = torch.load(self.cfg.warm_start, weights_only=False)
            if self.sac is not None:
                if "sac" not in ckpt:
                    raise ValueError("--warm-start for --algo sac must be a checkpoint of `vigil train sac` or "
                                     "`vigil learn` (key sac)")
                self.sac.load(ckpt["sac"], actor_only=True)
            else:
                self.onpolicy.warm_start(ckpt)
        if self.sac is not None:
            self._load_log(self.cfg.seed_replay, None)
        self.snapshots[self.current] = self.networks()  # what the learner starts from, for the start bundle

    def _load_log(self, path: str, upto: int | None) -> None:
        if not path or not Path(path).exists():
            return
        after = 0
        while True:
            rows = read_after(path, after, 50_000)
            if upto is not None:
                keep = rows["id"] <= upto
                rows = {k: v[keep] for k, v in rows.items()}
            if not len(rows["id"]):
                return
            if self.sac is not None:
                self.replay.add(rows["obs"], rows["action"], rows["reward"], rows["next_obs"], self._done(rows))
            if path == self.cfg.transitions:
                self.episodes.add(rows)
            after = int(rows["id"][-1])

    def _done(self, rows: dict[str, np.ndarray]) -> np.ndarray:
        """No bootstrap past these: terminated transitions (and truncated ones, in the ablation)."""
        return rows["terminated"] | rows["truncated"] if self.cfg.truncation_terminal else rows["terminated"]

    def checkpoint(self) -> None:
        tmp = self.out / "checkpoint.pt.tmp"
        if self.sac is not None:
            algo: dict[str, Any] = {"sac": self.sac.state(), "cursor": self.cursor, "read": self.read}
        else:  # a restart gathers the current rollout again from where it began
            algo = {"onpolicy": self.onpolicy.state(), "cursor": self.rollout_cursor, "read": self.rollout_read,
                    "exploring": self.exploring}
        torch.save({**algo, "credit": self.credit, "current": self.current,
                    "accepted": self.accepted, "policy_of": self.policy_of, "swaps": self.swaps,
                    "judged": sorted(self.judged), "config": asdict(self.cfg)}, tmp)
        os.replace(tmp, self.out / "checkpoint.pt")  # a crash mid-write leaves the previous checkpoint whole

    # -- the loop ---------------------------------------------------------------------------------------

    def step(self) -> int:
        """One pass: read, update, maybe swap, maybe roll back. Returns how many transitions were new."""
        rows = read_after(self.cfg.transitions, self.cursor, 10_000)
        n = len(rows["id"])
        if n:
            if self.sac is not None:
                self.replay.add(rows["obs"], rows["action"], rows["reward"], rows["next_obs"], self._done(rows))
            else:
                self.onpolicy.add(rows)
            self.episodes.add(rows)
            self.cursor, self.read = int(rows["id"][-1]), self.read + n
        if self.sac is not None:
            self._step_sac(n)
        else:
            self._step_onpolicy()
        self.judge()
        return n

    def _step_sac(self, n: int) -> None:
        if self.replay.size >= self.cfg.learning_starts:
            self.credit += self.cfg.utd * n
            while self.credit >= 1 and not self.done():
                self.sac.update(self.replay.sample(self.sac.cfg.batch_size, self.rng))
                self.credit -= 1
                if self.sac.updates % self.cfg.every == 0:
                    self.swap_in(self.export())
                    return  # read the robot's new episodes and judge before the next swap (the credit stays)

    def _step_onpolicy(self) -> None:
        if not self.exploring:  # the runtime must serve an exploring bundle of ours before there is data
            if time.monotonic() >= self._retry_at:
                self._retry_at = time.monotonic() + 5.0
                bundle = self.export()
                self.swap_in(bundle, why="exploring start")
                self.exploring = self.swaps[-1]["ok"]
                if self.exploring:  # the same actor, sampling: accepted as it is, not judged against the
                    self.accepted = bundle  # deterministic bundle (the noise costs some return; a rollback to it
                    self.judged.add(self.policy_of[bundle])  # would leave the learner without data)
            return
        if self.onpolicy.ready() and not self.done():
            stats = self.onpolicy.update()
            self.rollout_cursor, self.rollout_read = self.cursor, self.read
            self.log(json.dumps({"update": self.updates, **{k: round(v, 5) for k, v in stats.items()}}))
            self.swap_in(self.export())

    def done(self) -> bool:
        return bool(self.cfg.max_updates) and self.updates >= self.cfg.max_updates

    def export(self) -> str:
        from vigil.training.export import export_gaussian

        folder = self.out / "bundles" / f"u{self.updates:08d}"
        prov = {"method": f"{self.cfg.algo} (vigil learn)", "updates": self.updates, "transitions": self.read,
                "cursor": self.cursor, "parent": self.current, "config": asdict(self.cfg)}
        m = self.manifest
        name = f"{m.name.split('@')[0]}-online-u{self.updates}"
        if self.sac is not None:
            manifest = export_gaussian(folder, name, copy_actor(self.sac.actor), self.obs_dim, m.action.low,
                                       m.action.high, m.control_rate_hz, prov=prov)
        else:
            op = self.onpolicy
            manifest = export_exploring(folder, name, op.actor, self.obs_dim, m.action.low, m.action.high,
                                        m.control_rate_hz, op.obs_mean, op.obs_std, op.cfg.obs_clip, prov=prov)
        self.snapshots[str(folder.resolve())] = self.networks()
        self.policy_of[str(folder.resolve())] = manifest.policy_id
        return str(folder.resolve())

    def swap_in(self, bundle: str, why: str = "update") -> None:
        answer: dict[str, Any] = {"ok": True}
        if self.cfg.control:
            from vigil.runtime.client import ControlLink, LinkError

            try:
                answer = ControlLink(self.cfg.control).swap(bundle, timeout_s=self.cfg.swap_timeout_s)
            except LinkError as exc:  # the runtime is away: it keeps its policy; try again at the next swap
                answer = {"ok": False, "reason": str(exc)}
        record = {"t": time.time(), "updates": self.updates, "bundle": bundle, "why": why,
                  "ok": bool(answer.get("ok")), "reason": answer.get("reason", "")}
        self.swaps.append(record)
        if record["ok"]:
            self.current = bundle
            if why.startswith("rollback") and bundle in self.snapshots:
                self.restore(self.snapshots[bundle])  # learning goes on from what made the bundle now served
            self.snapshots = {k: v for k, v in self.snapshots.items() if k in (self.current, self.accepted)}
        self.log(json.dumps({"swap": record}))
        with open(self.out / "learn.jsonl", "a") as fh:
            fh.write(json.dumps({"swap": record, "returns": self.returns()}) + "\n")
        self.checkpoint()

    def returns(self) -> dict[str, float]:
        return {p: float(np.mean(r[-self.cfg.rollback_episodes:])) for p, r in self.episodes.by_policy.items() if r}

    def judge(self) -> None:
        """Accept the policy served once its first K episodes did not do worse than the last accepted policy's
        last K; roll back to the accepted one if they did."""
        cur, base = self.policy_of.get(self.current), self.policy_of.get(self.accepted)
        K = self.cfg.rollback_episodes
        now = self.episodes.by_policy.get(cur, [])
        if self.current == self.accepted or cur in self.judged or len(now) < K:
            return
        self.judged.add(cur)
        before = self.episodes.by_policy.get(base, [])
        new = float(np.mean(now[:K]))
        old = float(np.mean(before[-K:])) if before else -math.inf  # nothing to compare with: accepted
        if new < old - self.cfg.rollback_drop * abs(old):
            self.log(f"rollback: {cur} averaged {new:.1f} over {K} episodes against {old:.1f} for {base}")
            self.swap_in(self.accepted, why=f"rollback: {new:.1f} < {old:.1f}")
        else:
            self.accepted = self.current
            self.snapshots = {k: v for k, v in self.snapshots.items() if k == self.current}

    def networks(self) -> dict[str, Any]:
        """A copy of what makes the actor (a rollback restores it): for SAC the actor, its optimiser and the
        temperature (the critics keep what they learnt from the data), on-policy the actor and critic."""
        if self.sac is not None:
            sac = self.sac
            return copy_state({"actor": sac.actor.state_dict(), "actor_opt": sac.actor_opt.state_dict(),
                               "log_alpha": sac.log_alpha.detach(), "alpha_opt": sac.alpha_opt.state_dict()})
        return copy_state({k: v for k, v in self.onpolicy.state().items() if k in ("actor", "critic", "opt")})

    def restore(self, snap: dict[str, Any]) -> None:
        if self.sac is not None:
            self.sac.actor.load_state_dict(snap["actor"])
            self.sac.actor_opt.load_state_dict(snap["actor_opt"])
            self.sac.alpha_opt.load_state_dict(snap["alpha_opt"])
            with torch.no_grad():
                self.sac.log_alpha.copy_(snap["log_alpha"])
            return
        self.onpolicy.actor.load_state_dict(snap["actor"])
        self.onpolicy.critic.load_state_dict(snap["critic"])
        self.onpolicy.opt.load_state_dict(snap["opt"])

    def run(self, stop: Callable[[], bool] = lambda: False) -> None:
        while not stop() and not self.done():
            if not self.step():
                time.sleep(self.cfg.poll_s)
        self.checkpoint()


def copy_state(state: Any) -> Any:
    """A deep copy of a state dict (tensors cloned), so later training does not change a snapshot."""
    import copy

    return copy.deepcopy(state)


def copy_actor(actor):
    import copy

    return copy.deepcopy(actor).cpu().eval()


def pretrain(env_id: str, steps: int, out: str | Path, seed: int = 0, sac_cfg: SACConfig | None = None,
             dynamics=None, progress: bool = True, log_transitions: bool = True) -> dict[str, Any]:
    """SAC in simulation (in process): the checkpoint a learner warm-starts from (sac.pt), a gaussian bundle the
    runtime serves first (bundle/), and the simulation's own transitions (sim.db, the runtime's log format) to
    seed a learner's replay. `dynamics` (sim.envs.Dynamics) trains in a changed world instead (a reference).
    Returns every episode's return."""
    from tqdm import tqdm

    from vigil.runtime.transitions import Transition, TransitionLog
    from vigil.sim.envs import GymEnv
    from vigil.training.export import export_gaussian

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = GymEnv(env_id, dynamics)
    low, high = np.asarray(env.action_spec.low, np.float32), np.asarray(env.action_spec.high, np.float32)
    obs_dim, act_dim = int(np.prod(env.observation_spec[0].shape)), int(np.prod(env.action_spec.shape))
    sac = SAC(obs_dim, act_dim, low, high, sac_cfg or SACConfig(seed=seed))
    replay, rng = Replay(obs_dim, act_dim), np.random.default_rng(seed)
    tlog = TransitionLog(out / "sim.db") if log_transitions else None
    obs = env.reset(seed=seed)["state"]
    ret, returns, episode, step = 0.0, [], 0, 0
    for t in tqdm(range(steps), desc=f"sac {env_id}", disable=not progress):
        if t < 1000:
            a = rng.uniform(low, high).astype(np.float32)
        else:
            with torch.no_grad():
                a = sac.actor.sample(torch.as_tensor(obs)[None])[0][0].numpy()
        res = env.step(a)
        nxt = res.obs["state"]
        replay.add([obs], [a], [res.reward], [nxt], [res.terminated])
        if tlog is not None:
            while not tlog.offer(Transition("sim", episode, step, "sim", obs, a, res.reward, nxt, res.terminated,
                                            res.truncated)):
                time.sleep(0.01)  # pretraining may wait for its own log
        ret += res.reward
        obs, step = nxt, step + 1
        if res.terminated or res.truncated:
            returns.append(ret)
            ret, episode, step = 0.0, episode + 1, 0
            obs = env.reset()["state"]
        if t >= 1000:
            sac.update(replay.sample(sac.cfg.batch_size, rng))
    rate = env.control_rate_hz
    env.close()
    if tlog is not None:
        tlog.close(timeout_s=60)
    torch.save({"sac": sac.state(), "env": env_id, "steps": steps}, out / "sac.pt")
    export_gaussian(out / "bundle", f"sac-{env_id}-s{seed}", copy_actor(sac.actor), obs_dim, low, high, rate,
                    prov={"method": "sac (simulation pretraining)", "env": env_id, "steps": steps, "seed": seed})
    (out / "returns.json").write_text(json.dumps(returns))
    return {"returns": returns, "final": float(np.mean(returns[-10:])) if returns else float("nan")}
