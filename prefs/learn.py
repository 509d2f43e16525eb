"""`vigil prefs collect | ask | annotate | train`: the learning half of the preference loop (docs/preferences.md).

    vigil prefs collect --bundle runs/mt10/bundle --tasks reach-v3,push-v3 --episodes 40 --out pools/mt10
    vigil prefs ask --pool pools/mt10 --run runs/mt10 --rule random --batch 10      # the first queries
    (operators answer in `vigil console`, or with `vigil prefs answer`)
    vigil prefs train --pool pools/mt10 --run runs/mt10 --out rewards/r1            # a reward model from the answers
    vigil prefs ask --pool pools/mt10 --run runs/mt10 --rule drts --model rewards/r1 --batch 10
    vigil train posttrain --run runs/mt10 --reward rewards/r1 --out runs/mt10-pref  # then vigil swap

These need the training extra (torch, the simulator); their handlers import it only when they run, so `vigil
prefs list | show | answer` stay numpy only. `annotate` is the simulated operator, for rehearsals and benchmarks.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

from vigil.runtime.config import add_flags, check_fields, config_from_args

STORE = "the runtime's store (SQLite file) that holds the preference queries"
POOL = "the pool: a dataset folder of the policy's recorded attempts (vigil prefs collect)"
RUN = "the run folder of the policy (ensemble.pt and bundle/): its encoder summarises the attempts"


@dataclass(frozen=True)
class CollectConfig:
    bundle: str = field(metadata={"help": "the bundle whose attempts to record (a flow ensemble's)"})
    out: str = field(metadata={"help": "the pool folder to record into (created; appended to if it exists)"})
    tasks: str = field(default="reach-v3", metadata={"help": "comma-separated Meta-World tasks"})
    episodes: int = field(default=20, metadata={"help": "attempts per task (seeds seed..)"})
    seed: int = field(default=100, metadata={"help": "seed of each task's first attempt"})
    max_steps: int = field(default=500, metadata={"help": "steps per attempt (at most)"})
    workers: int = field(default=1, metadata={"help": "worker processes (or CPUs of a local Ray)"})
    ray: bool = field(default=False, metadata={"help": "play the attempts on a local Ray"})
    address: str | None = field(default=None, metadata={"help": "play the attempts on this Ray cluster"})

    def __post_init__(self) -> None:
        check_fields(self, [("episodes", self.episodes >= 1, "an integer >= 1"),
                            ("max_steps", self.max_steps >= 1, "an integer >= 1"),
                            ("workers", self.workers >= 1, "an integer >= 1")])


def _collect_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Record the bundle's own attempts (played as the runtime plays them, seeded) into a pool that "
                     "preference queries are drawn from. The simulator's rewards are kept for evaluation and for "
                     "the simulated operator; a learned reward never reads them.")
    add_flags(p, CollectConfig)


def cmd_collect(args: argparse.Namespace) -> int:
    """record the policy's attempts into a pool (needs vigil[train])"""
    from vigil.sim.shard import backend_from_args
    from vigil.training.prefs import collect_pool

    c = config_from_args(CollectConfig, args)
    tasks = [t.strip() for t in c.tasks.split(",") if t.strip()]
    ids = collect_pool(c.bundle, tasks, c.episodes, c.seed, c.max_steps, c.out,
                       backend_from_args(c.ray, c.workers, c.address))
    print(json.dumps({"pool": c.out, "recorded": len(ids), "tasks": tasks}), flush=True)
    return 0


@dataclass(frozen=True)
class AskConfig:
    pool: str = field(metadata={"help": POOL})
    run: str = field(metadata={"help": RUN})
    store: str = field(default="vigil-alerts.db", metadata={"help": STORE})
    rule: str = field(default="random", metadata={
        "help": "pair selection (training/pairs.py)", "choices": ("random", "uncertainty", "drts", "deltaucb", "dts")})
    batch: int = field(default=10, metadata={"help": "queries to file"})
    model: str | None = field(default=None, metadata={
        "help": "the current reward model (vigil prefs train); every rule but random needs one", "metavar": "DIR"})
    seed: int = field(default=0, metadata={"help": "seed of the rule's draws"})

    def __post_init__(self) -> None:
        check_fields(self, [("batch", self.batch >= 1, "an integer >= 1")])


def _ask_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Choose the next pairs of attempts to show the operator (both of one task, never a pair asked "
                     "before) and file them as open queries in the store, where the console shows them.")
    add_flags(p, AskConfig)


def cmd_ask(args: argparse.Namespace) -> int:
    """choose pairs with a selection rule and file them as open queries (needs vigil[train])"""
    from vigil.prefs.cli import Refused
    from vigil.training.prefs import ask

    c = config_from_args(AskConfig, args)
    try:
        ids = ask(c.store, c.pool, c.run, c.rule, c.batch, c.model, c.seed)
    except (ValueError, FileNotFoundError) as exc:
        raise Refused(str(exc).replace("(--model;", "(--model DIR;")) from None
    print(json.dumps({"filed": ids, "rule": c.rule}), flush=True)
    return 0


@dataclass(frozen=True)
class AnnotateConfig:
    pool: str = field(metadata={"help": POOL})
    store: str = field(default="vigil-alerts.db", metadata={"help": STORE})
    kind: str = field(default="bt", metadata={
        "help": "bt: Bradley-Terry over the dense return; noisy: bt with flipped answers; biased: prefers shorter "
                "attempts (sim/annotator.py)", "choices": ("bt", "noisy", "biased")})
    temperature: float = field(default=0.1, metadata={"help": "in units of the task's return spread"})
    flip: float = field(default=0.15, metadata={"help": "noisy: probability of a flipped answer"})
    by: str = field(default="simulated-operator", metadata={"help": "who the answers are recorded as"})
    seed: int = field(default=0, metadata={"help": "seed of the operator's draws"})


def _annotate_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Answer every open query on the pool as a simulated operator would (a rehearsal of the loop, "
                     "or a benchmark); each answer is given exactly once, as an operator's.")
    add_flags(p, AnnotateConfig)


def cmd_annotate(args: argparse.Namespace) -> int:
    """answer the open queries as a simulated operator (rehearsals, benchmarks)"""
    from vigil.training.prefs import annotate

    c = config_from_args(AnnotateConfig, args)
    n = annotate(c.store, c.pool, c.kind, c.by, c.seed, c.temperature, c.flip)
    print(f"answered {n} open queries as {c.by} ({c.kind})", flush=True)
    return 0


@dataclass(frozen=True)
class TrainConfig:
    pool: str = field(metadata={"help": POOL})
    run: str = field(metadata={"help": RUN})
    out: str = field(metadata={"help": "the reward model folder to write (reward.onnx, reward.json, reward.pt)"})
    store: str = field(default="vigil-alerts.db", metadata={"help": STORE})
    method: str = field(default="ensemble", metadata={
        "help": "uncertainty: a deep ensemble, last-layer Laplace, MC dropout, or a single model",
        "choices": ("ensemble", "laplace", "dropout", "single")})
    seed: int = field(default=0, metadata={"help": "seed of the fit"})


def _train_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Fit a Bradley-Terry reward model with uncertainty on every answered query of the pool and "
                     "export it: `vigil serve --reward OUT` scores finished episodes with it, and `vigil train "
                     "posttrain --reward OUT` optimises it.")
    add_flags(p, TrainConfig)


def cmd_train(args: argparse.Namespace) -> int:
    """fit and export a reward model from the answered queries (needs vigil[train])"""
    from vigil.prefs.cli import Refused
    from vigil.training.prefs import train_reward

    c = config_from_args(TrainConfig, args)
    try:
        out = train_reward(c.store, c.pool, c.run, c.out, c.method, c.seed)
    except (ValueError, FileNotFoundError) as exc:
        raise Refused(str(exc)) from None
    print(json.dumps(out), flush=True)
    return 0


LEARNING = {"collect": (_collect_parser, cmd_collect), "ask": (_ask_parser, cmd_ask),
            "annotate": (_annotate_parser, cmd_annotate), "train": (_train_parser, cmd_train)}
