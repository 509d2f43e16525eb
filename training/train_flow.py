"""`vigil train flow`: train a flow-matching ensemble (training/flow.py) on a demonstration dataset.

    run(config, demos_dir, out_dir, encoder_dir=None, seed=None, tasks=None)

1. the instruction encoder: the onboard encoder bundle (`vigil bundle encoder`), reused from
   `encoder_dir` if it holds one, otherwise exported there (or to OUT/encoder). Training embeds the
   instructions with the very same ONNX graph the runtime runs, so training and deployment embeddings are
   identical by construction (not merely "the same model");
2. the data (`dataset_tensors`): every step t of every chosen episode is one example: the state
   observation o_t (and, for vision configs, the camera image of the same step, kept uint8), the
   episode's instruction embedding, and the chunk of actions t .. t+H-1 (past the
   episode's end the last action repeats, `flow.make_chunks`). Only successful episodes by default;
3. training (`flow.train_ensemble`, with a progress bar); the observation normalisation is the training
   set's (decision 41);
4. outputs in OUT: `ensemble.pt` (a plain dict of tensors and JSON-like values, loadable with
   `torch.load(..., weights_only=True)`; `load_checkpoint` rebuilds the Ensemble), `loss.csv`,
   `learning_curve.png`, `provenance.json`, and — when `vigil.training.flow_export` exists — the
   `flow_ensemble` bundle in `OUT/bundle`.

The config file is TOML with one `[flow]` table whose keys are FlowConfig's fields (configs/flow-mt10.toml);
unknown keys and wrong types are errors that name the key and the expected type. `rtc_max_delay > 0` trains
with training-time real-time chunking; `run(..., rtc="guided" | "trained")` exports the bundle with RTC
inputs (docs/rtc.md).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import platform
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from vigil.runtime.config import ConfigError, check_table, read_toml
from vigil.training.demos import DemoSet
from vigil.training.flow import (
    IMAGE,
    MIN_IMAGE_SIZE,
    PAIR_CONVENTIONS,
    RTC_MODES,
    STATE,
    Ensemble,
    FlowConfig,
    make_chunks,
    train_ensemble,
)

CHECKPOINT_FORMAT = "vigil-flow-checkpoint/1"
OBS_NAME = STATE

# ------------------------------------------------------------------------------------------------ config

_POSITIVE_INTS = ("obs_dim", "instr_dim", "action_dim", "horizon", "hidden", "depth", "members", "euler_steps",
                  "vfd_samples", "batch_size", "steps", "image_channels", "image_features")


def check_flow_config(cfg: FlowConfig, section: str = "flow") -> FlowConfig:
    """Refuse values FlowConfig would accept but training cannot use; errors name the key."""
    def bad(key: str, expected: str) -> ConfigError:
        return ConfigError(f"config key '{section}.{key}' must be {expected}, got {getattr(cfg, key)!r}")

    for key in _POSITIVE_INTS:
        if getattr(cfg, key) < 1:
            raise bad(key, "an integer >= 1")
    if cfg.time_features < 2 or cfg.time_features % 2:
        raise bad("time_features", "an even integer >= 2")
    if cfg.vfd_pairs not in PAIR_CONVENTIONS:
        raise bad("vfd_pairs", f"one of {PAIR_CONVENTIONS}")
    if not 0 < cfg.lr < math.inf:
        raise bad("lr", "a finite number > 0")
    if not 0 <= cfg.weight_decay < math.inf:
        raise bad("weight_decay", "a finite number >= 0")
    if not 0 < cfg.min_obs_std < math.inf:
        raise bad("min_obs_std", "a finite number > 0")
    if cfg.seed < 0:
        raise bad("seed", "an integer >= 0")
    if not 0 <= cfg.rtc_max_delay <= cfg.horizon // 2:
        raise bad("rtc_max_delay", f"an integer in 0..{cfg.horizon // 2} (0: no training-time RTC; the delay d "
                                   "needs d <= s <= H - d, docs/rtc.md)")
    if cfg.density_steps < 0:
        raise bad("density_steps", "an integer >= 0 (0: no RND/logpZO heads in the bundle)")
    if cfg.image_size != 0 and cfg.image_size < MIN_IMAGE_SIZE:
        raise bad("image_size", f"0 (state only) or an integer >= {MIN_IMAGE_SIZE} (the camera image's side, 64 "
                                "for Meta-World demos recorded with --camera)")
    return cfg


def flow_config_from_dict(doc: Mapping[str, Any], **overrides: Any) -> FlowConfig:
    """FlowConfig from a parsed TOML document with a `[flow]` table, then non-None overrides."""
    extra = sorted(k for k in doc if k not in ("flow", "save"))
    if extra:
        raise ConfigError(f"config key {extra[0]!r} is unknown; a flow config has the table [flow] (and [save] "
                          "for `vigil train save-round`)")
    table = doc.get("flow")
    if not isinstance(table, Mapping):
        raise ConfigError("config key 'flow' must be a table ([flow]) of FlowConfig fields")
    values = check_table(FlowConfig, table, "flow")
    values.update(check_table(FlowConfig, {k: v for k, v in overrides.items() if v is not None}, "flow"))
    return check_flow_config(FlowConfig(**values))


def load_flow_config(path: str | Path, **overrides: Any) -> FlowConfig:
    """Read the `[flow]` table of a TOML file (configs/flow-mt10.toml), then apply non-None overrides."""
    return flow_config_from_dict(read_toml(path), **overrides)


# -------------------------------------------------------------------------------------------------- data


def choose_episodes(demoset: DemoSet, tasks: Sequence[str] | None = None, successful_only: bool = True) -> list:
    """EpisodeInfos of the chosen tasks (all the dataset's when None), successful ones only by default."""
    available = demoset.tasks()
    if tasks is not None:
        missing = [t for t in tasks if t not in available]
        if missing:
            raise ValueError(f"task(s) {missing} not in {demoset.folder} (it has {available})")
    chosen = set(available if tasks is None else tasks)
    infos = [e for e in demoset.episodes(success=True if successful_only else None) if e.task in chosen]
    if not infos:
        what = "successful episodes" if successful_only else "episodes"
        raise ValueError(f"no {what} of {sorted(chosen)} in {demoset.folder}")
    return infos


def dataset_tensors(demoset: DemoSet, cfg: FlowConfig, encoder, tasks: Sequence[str] | None = None,
                    successful_only: bool = True, stats: dict | None = None,
                    episode_ids: Collection[str] | None = None
                    ) -> tuple[np.ndarray | dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Training examples of the chosen episodes, in index order, one per step t of each episode:
    obs (n, obs_dim) float32 = state observation t (the observation the action was taken on; the final
    observation has no action and is not used), instr (n, instr_dim) float32 = the encoder's embedding of
    the episode's instruction, chunks (n, H, action_dim) float32 = actions t .. t+H-1 (last action repeated
    past the end). `encoder` is an InstructionEncoder (anything with `embed(texts) -> (k, dim)`): every
    distinct instruction is embedded once. `stats`, if given, receives per task {"episodes", "steps"}.
    `episode_ids`: only these of the chosen episodes (a SAVE round's old and acquired sets).
    Vision configs (cfg.image_size > 0): obs is {"state": (n, obs_dim) float32, "image": (n, S, S, 3)
    uint8}, image t being the camera frame of step t (uint8: 12 KiB a frame instead of 48 as float)."""
    infos = choose_episodes(demoset, tasks, successful_only)
    if episode_ids is not None:
        wanted = set(episode_ids)
        infos = [e for e in infos if e.id in wanted]
        if not infos:
            raise ValueError(f"none of the {len(wanted)} requested episode(s) is among the chosen ones of "
                             f"{demoset.folder}")
    texts = sorted({e.instruction for e in infos})
    table = np.asarray(encoder.embed(texts), np.float32)
    if table.shape != (len(texts), cfg.instr_dim):
        raise ValueError(f"the instruction encoder gives embeddings of shape {table.shape[1:]}, but config key "
                         f"'flow.instr_dim' is {cfg.instr_dim}")
    row = {t: i for i, t in enumerate(texts)}
    obs, images, instr, chunks = [], [], [], []
    for info in infos:
        ep = demoset.load(info.id)
        if OBS_NAME not in ep.observations:
            raise ValueError(f"episode {info.id} has no {OBS_NAME!r} observation (it has {sorted(ep.observations)})")
        state = np.asarray(ep.observations[OBS_NAME], np.float32)
        actions = np.asarray(ep.actions, np.float32)
        T = actions.shape[0]
        if state.shape[1:] != (cfg.obs_dim,):
            raise ValueError(f"episode {info.id}: state observations are {state.shape[1:]}, config key "
                             f"'flow.obs_dim' is {cfg.obs_dim}")
        if actions.shape[1:] != (cfg.action_dim,):
            raise ValueError(f"episode {info.id}: actions are {actions.shape[1:]}, config key 'flow.action_dim' "
                             f"is {cfg.action_dim}")
        if cfg.vision:
            images.append(_episode_images(info.id, ep.observations, cfg.image_size)[:T])
        if T == 0:
            continue
        obs.append(state[:T])
        instr.append(np.repeat(table[row[info.instruction]][None], T, axis=0))
        chunks.append(make_chunks(actions, cfg.horizon))
        if stats is not None:
            s = stats.setdefault(info.task, {"episodes": 0, "steps": 0, "instruction": info.instruction})
            s["episodes"] += 1
            s["steps"] += T
    if not obs:
        raise ValueError(f"the chosen episodes of {demoset.folder} have no steps")
    states = np.concatenate(obs)
    out_obs = {STATE: states, IMAGE: np.concatenate(images)} if cfg.vision else states
    return out_obs, np.concatenate(instr), np.concatenate(chunks).astype(np.float32)


def _episode_images(episode_id: str, observations: Mapping[str, np.ndarray], size: int) -> np.ndarray:
    """An episode's camera frames (T + 1, size, size, 3) uint8, or an error that says how to get them."""
    if IMAGE not in observations:
        raise ValueError(f"episode {episode_id} has no {IMAGE!r} observation (it has {sorted(observations)}), but "
                         f"config key 'flow.image_size' is {size}: record the demos with `vigil demos record "
                         f"--camera --image-size {size}`")
    image = np.asarray(observations[IMAGE])
    if image.dtype != np.uint8 or image.shape[1:] != (size, size, 3):
        raise ValueError(f"episode {episode_id}: images are {image.dtype} {image.shape[1:]}, config key "
                         f"'flow.image_size' is {size} (uint8 ({size}, {size}, 3) expected)")
    return image


# ------------------------------------------------------------------------------------------- checkpoint


def save_checkpoint(path: str | Path, ensemble: Ensemble, cfg: FlowConfig, provenance: Mapping[str, Any],
                    history: Mapping[str, np.ndarray]) -> None:
    """A dict of tensors, numbers, strings, lists and dicts only, so `torch.load(path, weights_only=True)`
    reads it (no pickled classes). The normalisation is in the state dict (buffers obs_mean, obs_std) and,
    for readers without torch modules, also as plain lists."""
    import torch

    state = {k: v.detach().cpu().clone() for k, v in ensemble.state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, "cfg": asdict(cfg), "state_dict": state,
                "normalisation": {"obs_mean": ensemble.obs_mean.tolist(), "obs_std": ensemble.obs_std.tolist()},
                "loss": torch.as_tensor(np.asarray(history["loss"], np.float32)),
                "provenance": json.loads(json.dumps(provenance))}, path)


def load_checkpoint(path: str | Path) -> tuple[Ensemble, FlowConfig, dict[str, Any]]:
    """(ensemble in eval mode, its config, the whole checkpoint dict), with weights_only=True."""
    import torch

    ck = torch.load(path, map_location="cpu", weights_only=True)
    if ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint (format {ck.get('format')!r})")
    cfg = FlowConfig(**ck["cfg"])
    ens = Ensemble(cfg)
    ens.load_state_dict(ck["state_dict"])
    ens.eval()
    return ens, cfg, ck


# --------------------------------------------------------------------------------------------- outputs


def write_run(out: Path, ens: Ensemble, cfg: FlowConfig, provenance: dict[str, Any],
              history: Mapping[str, np.ndarray], seconds: float, title: str, log: Callable[[str], None] = print
              ) -> bool:
    """What every training run leaves in its folder: the loss summary in `provenance` (train_seconds,
    loss_first, loss_last: means over the first and last tenth), ensemble.pt, loss.csv and the learning
    curve. Returns whether the PNG was written (matplotlib is optional)."""
    provenance["train_seconds"] = round(seconds, 3)
    loss = np.asarray(history["loss"])
    k = max(1, len(loss) // 10)
    provenance["loss_first"], provenance["loss_last"] = float(loss[:k].mean()), float(loss[-k:].mean())
    log(f"loss: {provenance['loss_first']:.4f} (first {k} steps) -> {provenance['loss_last']:.4f} (last {k})")
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "ensemble.pt", ens, cfg, provenance, history)
    write_loss_csv(out / "loss.csv", history)
    wrote_png = plot_learning_curve(out / "learning_curve.png", history, title)
    if not wrote_png:
        log("learning curve: matplotlib is not installed (pip install 'vigil[dev]'); no PNG written")
    return wrote_png


def write_loss_csv(path: str | Path, history: Mapping[str, np.ndarray]) -> None:
    member = np.asarray(history["member_loss"])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss"] + [f"member_{m}" for m in range(member.shape[1])])
        for step, (loss, row) in enumerate(zip(history["loss"], member)):
            w.writerow([step, f"{loss:.6g}"] + [f"{x:.6g}" for x in row])


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (shorter at the start)."""
    x = np.asarray(x, np.float64)
    c = np.cumsum(np.insert(x, 0, 0.0))
    i = np.arange(1, len(x) + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def plot_learning_curve(path: str | Path, history: Mapping[str, np.ndarray], title: str) -> bool:
    """Loss per step (faint) and its moving average, log scale; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    loss = np.asarray(history["loss"])
    window = max(1, len(loss) // 50)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(loss, lw=0.5, alpha=0.3, color="C0", label="mean over members")
    ax.plot(smooth(loss, window), lw=1.5, color="C0", label=f"moving average ({window} steps)")
    member = np.asarray(history["member_loss"])
    if member.shape[1] > 1:
        for m in range(member.shape[1]):
            ax.plot(smooth(member[:, m], window), lw=0.7, alpha=0.6, label=f"member {m}" if m < 8 else None)
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("flow-matching loss (MSE)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def ensure_encoder(encoder_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """The encoder bundle in encoder_dir: reused if it has an encoder.json, otherwise exported there."""
    encoder_dir = Path(encoder_dir)
    if (encoder_dir / "encoder.json").is_file():
        log(f"instruction encoder: reusing {encoder_dir}")
        return encoder_dir
    from vigil.training.encoder_export import export_encoder

    log(f"instruction encoder: exporting the packaged sentence encoder to {encoder_dir}")
    export_encoder(encoder_dir)
    return encoder_dir


def _control_rate(demoset: DemoSet, infos: Sequence) -> float:
    rates = {float(e.meta["control_rate_hz"]) for e in infos if e.meta.get("control_rate_hz")}
    if len(rates) > 1:
        raise ValueError(f"the chosen episodes were recorded at different control rates: {sorted(rates)}")
    return rates.pop() if rates else 80.0


def _git_commit() -> str | None:
    import subprocess

    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                           cwd=Path(__file__).resolve().parent)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def check_rtc(rtc: str | None, cfg: FlowConfig) -> None:
    """Refuse an RTC export the config cannot give, before any training: "trained" needs rtc_max_delay > 0."""
    if rtc not in (None, *RTC_MODES):
        raise ConfigError(f"rtc must be one of {RTC_MODES} (or absent), got {rtc!r}")
    if rtc == "trained" and cfg.rtc_max_delay < 1:
        raise ConfigError(f"rtc 'trained' needs config key 'flow.rtc_max_delay' >= 1 (training-time RTC), got "
                          f"{cfg.rtc_max_delay}")


def run(config: str | Path | FlowConfig, demos_dir: str | Path, out_dir: str | Path,
        encoder_dir: str | Path | None = None, seed: int | None = None, tasks: Sequence[str] | None = None,
        progress: bool = True, log: Callable[[str], None] = print, rtc: str | None = None) -> dict[str, Any]:
    """Train on demos_dir and write everything to out_dir (see the module docstring). Returns a summary:
    paths written, final loss, whether a bundle was exported. rtc: export the bundle with real-time
    chunking, "guided" or "trained" (docs/rtc.md)."""
    import torch

    cfg = load_flow_config(config) if not isinstance(config, FlowConfig) else check_flow_config(config)
    if seed is not None:
        cfg = check_flow_config(dataclasses.replace(cfg, seed=int(seed)))
    check_rtc(rtc, cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    demos = DemoSet(demos_dir)
    tasks = list(tasks) if tasks else None
    infos = choose_episodes(demos, tasks)
    encoder_path = ensure_encoder(encoder_dir if encoder_dir is not None else out / "encoder", log)

    from vigil.policies.instructions import InstructionEncoder

    encoder = InstructionEncoder.load(encoder_path, prefer_gpu=False)
    per_task: dict[str, dict] = {}
    obs, instr, chunks = dataset_tensors(demos, cfg, encoder, tasks, stats=per_task)
    n_steps = len(chunks)
    episodes = sum(s["episodes"] for s in per_task.values())
    log(f"data: {n_steps} steps{' (with camera images)' if cfg.vision else ''} from {episodes} successful episodes of "
        f"{len(per_task)} task(s) in {demos.folder}")
    provenance = {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "demos": str(demos.folder.resolve()),
        "tasks": per_task,
        "episodes": sum(s["episodes"] for s in per_task.values()),
        "steps": int(n_steps),
        "successful_only": True,
        "config": asdict(cfg),
        "config_file": None if isinstance(config, FlowConfig) else str(Path(config).resolve()),
        "seed": cfg.seed,
        "encoder": {"folder": str(encoder_path.resolve()), "name": encoder.meta.get("name"),
                    "onnx_sha256": encoder.meta.get("onnx", {}).get("sha256"), "dim": encoder.dim},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "git_commit": _git_commit(),
    }
    t0 = time.perf_counter()
    ens, history = train_ensemble(cfg, obs, instr, chunks, progress=progress)
    title = (f"flow M={cfg.members} hidden={cfg.hidden} H={cfg.horizon} seed={cfg.seed}: "
             f"{len(per_task)} task(s), {provenance['episodes']} episodes, {n_steps} steps"
             + (f", images {cfg.image_size}px" if cfg.vision else ""))
    wrote_png = write_run(out, ens, cfg, provenance, history, time.perf_counter() - t0, title, log)
    density = fit_density(out, ens, cfg, obs, instr, provenance, progress, log) if cfg.density_steps else None
    summary: dict[str, Any] = {"checkpoint": str(out / "ensemble.pt"), "loss_csv": str(out / "loss.csv"),
                               "learning_curve": str(out / "learning_curve.png") if wrote_png else None,
                               "loss_first": provenance["loss_first"], "loss_last": provenance["loss_last"],
                               "bundle": None}
    try:
        summary["bundle"] = export_run(out, ens, cfg, encoder_path, provenance, _control_rate(demos, infos), log,
                                       rtc=rtc, density=density)
    except ModuleNotFoundError as exc:
        if exc.name != "vigil.training.flow_export":
            raise  # flow_export exists but needs something missing: say so loudly
        log("bundle: export is not available yet (vigil.training.flow_export is missing); "
            f"the checkpoint {out / 'ensemble.pt'} can be exported later")
        provenance["bundle"] = None
    (out / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    summary["provenance"] = str(out / "provenance.json")
    return summary


def fit_density(out: Path, ens: Ensemble, cfg: FlowConfig, obs, instr, provenance: dict[str, Any],
                progress: bool = True, log: Callable[[str], None] = print):
    """Train the RND and logpZO heads on member 0's contexts of the training data (training/density.py) and
    write OUT/density.pt; the bundle export puts RND in the plan graph (docs/failure.md)."""
    from vigil.training import density

    t0 = time.perf_counter()
    dcfg = density.DensityConfig(dim=cfg.hidden, steps=cfg.density_steps, seed=cfg.seed)
    heads, hist = density.fit(density.member0_contexts(ens, obs, instr), dcfg, progress=progress)
    k = max(1, dcfg.steps // 10)
    info = {"rnd_loss_last": float(np.mean(hist["rnd"][-k:])), "flow_loss_last": float(np.mean(hist["flow"][-k:])),
            "seconds": round(time.perf_counter() - t0, 2)}
    density.save(out / "density.pt", heads, info)
    provenance["density"] = {"config": asdict(dcfg), **info}
    log(f"density heads (RND, logpZO): {info['seconds']:.0f} s, losses {info['rnd_loss_last']:.4f} / "
        f"{info['flow_loss_last']:.3f}")
    return heads


def export_run(out: str | Path, ens: Ensemble | None = None, cfg: FlowConfig | None = None,
               encoder_path: str | Path | None = None, provenance: dict[str, Any] | None = None,
               control_rate_hz: float = 80.0, log: Callable[[str], None] = print, name: str | None = None,
               rtc: str | None = None, density=None) -> str:
    """Export a training run's ensemble as OUT/bundle and record it in `provenance` (which `run` then
    writes). Called without the ensemble, it re-exports a finished run from OUT/ensemble.pt (and writes
    OUT/provenance.json from the checkpoint's): a run whose export failed, or a bundle to rebuild.
    name: the bundle's name; default flow-<tasks>-M<members>-s<seed> (a SAVE round appends -r<round>).
    rtc: None, "guided" or "trained": the bundle's real-time chunking (docs/rtc.md)."""
    from vigil.training.flow_export import export_flow_ensemble

    out = Path(out)
    standalone = ens is None
    if standalone:
        ens, cfg, ck = load_checkpoint(out / "ensemble.pt")
        provenance = dict(ck["provenance"])
        encoder_path = Path(provenance["encoder"]["folder"])
        if (out / "density.pt").exists():
            from vigil.training import density as density_mod

            density = density_mod.load(out / "density.pt")
    assert cfg is not None and provenance is not None and encoder_path is not None
    tasks = provenance["tasks"]
    what = "-".join(sorted(tasks)) if len(tasks) <= 2 else f"{len(tasks)}tasks"
    name = name or f"flow-{what}-M{cfg.members}-s{cfg.seed}"
    check_rtc(rtc, cfg)
    export_flow_ensemble(out / "bundle", ens, cfg, encoder_path, name, prov=provenance, control_rate_hz=control_rate_hz,
                         rtc=rtc, density=density)
    provenance["bundle"] = str((out / "bundle").resolve())
    provenance["bundle_rtc"] = rtc
    log(f"bundle: wrote {out / 'bundle'} ({name}{', RTC ' + rtc if rtc else ''})")
    if standalone:
        (out / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    return str(out / "bundle")
