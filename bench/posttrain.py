"""Post-training without an expert (issue 19): every objective of training/posttrain.py against the pretrained
policy, on MT10, over training seeds. `make bench-posttrain`; the method is docs/posttrain.md.

Per seed: a pretrained ensemble (configs/flow-mt10-failure.toml on hold-40 demonstrations, trained here if
missing), then one job per arm, two in parallel:

    pretrained        no post-training (the reference every arm is paired with)
    mean (exp)        expected return, reward-weighted flow matching (weights exp(r~ / T))
    mean (top)        expected return, filtered self-imitation (the best 30% of episodes): the second machinery
    mean (ppo)        expected return, PPO's clipped surrogate on the likelihood of stochastic Euler steps
    mean (gbpo)       the same with GBPO's group-relative bounded-ratio loss (groups: a task's episodes)
    cvar-left         TFFT's left tail (alpha 0.2)
    constrained       CFO: return under a speed-limit budget (5% of steps above 1 m/s)
    expand (vfd)      ActFlow: attempts on positions 0.3 range widths out, situations chosen by VFD, verified
    expand (uniform)  the same with situations chosen uniformly (self-training without VFD guidance)
    expand 0.5 (...)  the same two at positions 0.5 range widths out
    SAVE 0.5 (expert) the same situations (VFD-chosen), played by the scripted expert instead: SAVE at the same
                      number of simulator episodes

Each arm gets 3 iterations of 10 episodes per task (300 simulator episodes), then is evaluated on the same 200
nominal episodes (20 seeds x 10 tasks, variants unseen in training) as the pretrained policy, and the expand arms
also on 200 shifted ones. Differences to the pretrained policy are paired by (task, seed), with 95% bootstrap
intervals. Raw results: bench-runs/posttrain/results.json; the section between the `posttrain` markers of
BENCHMARKS.md and docs/figures/posttrain_*.png are rendered from it (`--report-only`).

    PYTHONPATH=. .venv/bin/python -m bench.posttrain [--seeds 0 1] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

import numpy as np

from bench.common import (
    FIGURES,
    ROOT,
    add_fleet_args,
    fleet_backend,
    markers,
    pyplot,
    run_info,
    save_figure,
    write_benchmarks,
    written_by,
)
from vigil.sim.shard import shard

NAME = "posttrain"
BEGIN, END = markers(NAME)
OUT = ROOT / "bench-runs" / "posttrain"
ARMS = {
    "pretrained": None,
    "mean (exp)": {"objective": "mean", "weighting": "exp"},
    "mean (top)": {"objective": "mean", "weighting": "top"},
    "mean (ppo)": {"objective": "mean", "weighting": "ppo"},
    "mean (gbpo)": {"objective": "mean", "weighting": "gbpo"},
    "cvar-left": {"objective": "cvar-left"},
    "constrained": {"objective": "constrained"},
    "expand (vfd)": {"objective": "expand", "guide": "vfd"},
    "expand (uniform)": {"objective": "expand", "guide": "uniform"},
    "expand 0.5 (vfd)": {"objective": "expand", "guide": "vfd", "expand_shift": 0.5},
    "expand 0.5 (uniform)": {"objective": "expand", "guide": "uniform", "expand_shift": 0.5},
    "SAVE 0.5 (expert)": {"objective": "expand", "guide": "vfd", "expand_shift": 0.5, "teacher": "expert"},
}
EXPAND = {0.3: ("expand (vfd)", "expand (uniform)"),
          0.5: ("expand 0.5 (vfd)", "expand 0.5 (uniform)", "SAVE 0.5 (expert)")}
EVAL_EPISODES, SHIFT = 20, 0.3


def pretrained(seed: int) -> Path:
    """The seed's pretrained run (trained here once: ~40 s)."""
    run = OUT / f"pre-s{seed}"
    if (run / "ensemble.pt").exists():
        return run
    vigil = str(ROOT / ".venv" / "bin" / "vigil")
    demos = OUT / "demos"
    if not (demos / "index.jsonl").exists():
        subprocess.run([vigil, "demos", "record", "--tasks", "mt10", "--episodes", "20", "--seed", "0",
                        "--hold-steps", "40", "--out", str(demos)], check=True, capture_output=True)
    subprocess.run([vigil, "train", "flow", "--config", str(ROOT / "configs" / "flow-mt10-failure.toml"),
                    "--demos", str(demos), "--out", str(run), "--seed", str(seed), "--encoder", str(OUT / "encoder"),
                    "--no-progress"], check=True, capture_output=True)
    return run


def job(seed: int, arm: str) -> dict:
    import torch

    from vigil.policies.instructions import InstructionEncoder
    from vigil.sim.shifts import Shift
    from vigil.training import posttrain as P
    from vigil.training.demos import DemoSet
    from vigil.training.train_flow import dataset_tensors, load_checkpoint

    torch.set_num_threads(1)
    run = OUT / f"pre-s{seed}"
    ens, cfg, ck = load_checkpoint(run / "ensemble.pt")
    encoder = InstructionEncoder.load(run / "bundle" / "encoder", prefer_gpu=False)
    tasks = sorted(ck["provenance"]["tasks"])
    pc = P.PosttrainConfig(**{**(ARMS[arm] or {}), "seed": seed}).check()
    t0 = time.perf_counter()
    rows: list[dict] = []
    if ARMS[arm] is not None:
        replay = dataset_tensors(DemoSet(OUT / "demos"), cfg, encoder, tasks) if pc.objective == "expand" else None
        ens, rows = P.run(ens, pc, encoder, tasks, replay, progress=False, log=lambda _: None)
    seconds = time.perf_counter() - t0

    def episodes(shift=None):
        eps = P.collect(ens, tasks, list(range(20, 20 + EVAL_EPISODES)), encoder, pc, shift=shift, evaluation=True)
        return [{"task": a.task, "seed": a.seed, "success": a.success, "ret": a.ret, "cost": a.cost,
                 "vfd0": a.vfd0} for a in eps]

    out = {"seed": seed, "arm": arm, "rows": rows, "train_seconds": seconds, "nominal": episodes()}
    for shift in EXPAND:  # each expand arm on its own shift; the pretrained policy on every one
        if arm == "pretrained" or (pc.objective == "expand" and pc.expand_shift == shift):
            out["shifted" if shift == SHIFT else f"shifted@{shift}"] = episodes(Shift(positions=shift))
    if arm == "pretrained" and "shifted@0.5" not in out:
        out["shifted@0.5"] = episodes(Shift(positions=0.5))
    out["sim_episodes"] = int(sum(r.get("episodes", 0) for r in rows))
    return out


# ------------------------------------------------------------------------------------------- analysis


def zscores(eps: list[dict], ref: list[dict]) -> np.ndarray:
    """Returns standardised with the pretrained policy's per-task mean and std (comparable across arms)."""
    stats = {}
    for t in {e["task"] for e in ref}:
        r = np.array([e["ret"] for e in ref if e["task"] == t])
        stats[t] = (r.mean(), r.std() + 1e-8)
    return np.array([(e["ret"] - stats[e["task"]][0]) / stats[e["task"]][1] for e in eps])


def metrics(eps: list[dict], ref: list[dict]) -> dict:
    from vigil.training.posttrain import left_cvar

    z = zscores(eps, ref)
    return {"success": float(np.mean([e["success"] for e in eps])), "return_z": float(z.mean()),
            "cvar10_z": left_cvar(z, 0.1), "cost": float(np.mean([e["cost"] for e in eps])),
            "vfd0": float(np.mean([e["vfd0"] for e in eps]))}


def paired_delta(eps: list[dict], ref: list[dict], key: str, reps: int = 2000) -> tuple[float, float, float]:
    """Arm minus pretrained on the same (task, seed) episodes: the difference and a 95% bootstrap interval."""
    by = {(e["task"], e["seed"]): e for e in ref}
    pairs = [(e, by[(e["task"], e["seed"])]) for e in eps if (e["task"], e["seed"]) in by]
    rng = np.random.default_rng(0)

    def stat(idx):
        a = [pairs[i][0] for i in idx]
        b = [pairs[i][1] for i in idx]
        return metrics(a, ref)[key] - metrics(b, ref)[key]

    n = len(pairs)
    point = stat(range(n))
    boots = [stat(rng.integers(0, n, n)) for _ in range(reps)]
    return point, float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))


def _ms(v, fmt="{:.2f}") -> str:
    v = np.asarray([x for x in v if x is not None and np.isfinite(x)], float)
    if not len(v):
        return "–"
    return fmt.format(v.mean()) if len(v) == 1 else f"{fmt.format(v.mean())} ± {fmt.format(v.std(ddof=1))}"


def report(res: list[dict], run: dict, seconds: float) -> str:
    seeds = sorted({r["seed"] for r in res})
    get = {(r["seed"], r["arm"]): r for r in res}
    ref = {s: get[(s, "pretrained")] for s in seeds}
    lines = [BEGIN, "## Post-training without an expert: expected return, left-CVaR, constrained, expansion "
             "(issue 19)", "", written_by(run, seconds=seconds),
             f"- Seeds {', '.join(map(str, seeds))} (a pretrained 3-member ensemble each, configs/flow-mt10-failure"
             f".toml); every arm 3 iterations x 10 episodes per task (300 simulator episodes), then the same "
             f"{EVAL_EPISODES * 10} nominal evaluation episodes per seed (variants 20..39), the expand arms also "
             f"{EVAL_EPISODES * 10} with positions moved out by their arm's shift (0.3 or 0.5 range widths). "
             "Returns are standardised per task with the pretrained policy's statistics (z); CVaR10 is the mean "
             "of the worst 10% of z. Spread: mean "
             "± std over seeds; Δ: arm minus pretrained on the same (task, seed) episodes, pooled over seeds, with "
             "a 95% bootstrap interval.", "",
             "| arm | success | Δ success [95% CI] | return (z) | CVaR10 (z) | Δ CVaR10 [95% CI] | speed cost | "
             "train s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    pooled_ref = [e for s in seeds for e in ref[s]["nominal"]]
    for arm in ARMS:
        rs = [get[(s, arm)] for s in seeds if (s, arm) in get]
        m = [metrics(r["nominal"], ref[r["seed"]]["nominal"]) for r in rs]
        eps = [dict(e, seed=(r["seed"], e["seed"])) for r in rs for e in r["nominal"]]
        ref_eps = [dict(e, seed=(s, e["seed"])) for s in seeds for e in ref[s]["nominal"]]
        ds = paired_delta(eps, ref_eps, "success") if arm != "pretrained" else None
        dc = paired_delta(eps, ref_eps, "cvar10_z") if arm != "pretrained" else None
        fmt = lambda d, f="{:+.1%}": "–" if d is None else f"{f.format(d[0])} [{f.format(d[1])}, {f.format(d[2])}]"  # noqa: E731
        lines.append(f"| {arm} | {_ms([x['success'] for x in m], '{:.1%}')} | {fmt(ds)} | "
                     f"{_ms([x['return_z'] for x in m])} | {_ms([x['cvar10_z'] for x in m])} | "
                     f"{fmt(dc, '{:+.2f}')} | {_ms([x['cost'] for x in m], '{:.3f}')} | "
                     f"{_ms([r['train_seconds'] for r in rs], '{:.0f}')} |")
    del pooled_ref
    lines += ["", "Expansion: success and first-plan VFD under the position shift (the region post-training reached "
              "for), before (pretrained) and after:", "",
              "| arm | shifted success | Δ [95% CI] | mean first-plan VFD, shifted | VFD, nominal |",
              "|---|---:|---:|---:|---:|"]
    for shift, arms in EXPAND.items():
        key = "shifted" if shift == SHIFT else f"shifted@{shift}"
        for arm in ("pretrained", *arms):
            rs = [get[(s, arm)] for s in seeds if (s, arm) in get and key in get[(s, arm)]]
            if not rs or any(key not in ref[s] for s in seeds):
                continue
            eps = [dict(e, seed=(r["seed"], e["seed"])) for r in rs for e in r[key]]
            ref_eps = [dict(e, seed=(s, e["seed"])) for s in seeds for e in ref[s][key]]
            d = paired_delta(eps, ref_eps, "success") if arm != "pretrained" else None
            lines.append(f"| {arm}, shift {shift} | {_ms([metrics(r[key], r[key])['success'] for r in rs], '{:.1%}')} "
                         "| " + ("–" if d is None else f"{d[0]:+.1%} [{d[1]:+.1%}, {d[2]:+.1%}]") + " | "
                         f"{_ms([np.mean([e['vfd0'] for e in r[key]]) for r in rs], '{:.1f}')} | "
                         f"{_ms([np.mean([e['vfd0'] for e in r['nominal']]) for r in rs], '{:.1f}')} |")
    lines += ["", "Constrained (CFO): the collected episodes' speed cost and the dual variable per iteration "
              "(budget 0.05):", "", "| seed | " + " | ".join(f"iteration {i}: cost / λ" for i in range(3)) + " |",
              "|---|---:|---:|---:|"]
    for s in seeds:
        rows = get[(s, "constrained")]["rows"] if (s, "constrained") in get else []
        lines.append(f"| {s} | " + " | ".join(f"{r['cost']:.3f} / {r['lam']:.2f}" for r in rows) + " |")
    lines += ["", f"![post-training]({(FIGURES / 'posttrain.png').relative_to(ROOT)})", "", END]
    return "\n".join(lines)


def plots(res: list[dict]) -> None:
    plt = pyplot()
    seeds = sorted({r["seed"] for r in res})
    get = {(r["seed"], r["arm"]): r for r in res}
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.5))
    for arm in ARMS:
        if arm == "pretrained":
            continue
        curves = [[row["success"] for row in get[(s, arm)]["rows"]] for s in seeds if (s, arm) in get]
        if curves:
            a.plot(np.arange(len(curves[0])), np.mean(curves, 0), marker="o", label=arm)
    a.set_xlabel("iteration")
    a.set_ylabel("success of the collected episodes")
    a.set_title("learning curves (expand: on shifted situations)", fontsize=10)
    a.legend(fontsize=8)
    for s in seeds:
        rows = get[(s, "constrained")]["rows"] if (s, "constrained") in get else []
        b.plot([r["cost"] for r in rows], marker="o", label=f"cost, seed {s}")
        b.plot([r["lam_next"] for r in rows], ls="--", label=f"λ after, seed {s}")
    b.axhline(0.05, color="k", ls=":", lw=0.8, label="budget")
    b.set_xlabel("iteration")
    b.set_title("constrained: speed cost and the dual variable", fontsize=10)
    b.legend(fontsize=8)
    arms = list(ARMS)
    ref = {s: get[(s, "pretrained")]["nominal"] for s in seeds}
    for k, (key, label) in enumerate((("success", "success"), ("cvar10_z", "CVaR10 (z)"))):
        vals = [[metrics(get[(s, arm)]["nominal"], ref[s])[key] for s in seeds if (s, arm) in get] for arm in arms]
        c.bar(np.arange(len(arms)) + 0.4 * k, [np.mean(v) for v in vals], width=0.4, label=label)
    c.set_xticks(np.arange(len(arms)) + 0.2, arms, rotation=30, ha="right", fontsize=8)
    c.axhline(0, color="k", lw=0.8)
    c.set_title("nominal evaluation (200 episodes per seed)", fontsize=10)
    c.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, FIGURES / "posttrain.png", dpi=100)


def _job(seed_arm: tuple[int, str]) -> dict:
    return job(*seed_arm)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    add_fleet_args(ap)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    run, t0 = run_info(), time.monotonic()
    raw = OUT / "results.json"
    if not args.report_only:
        OUT.mkdir(parents=True, exist_ok=True)
        for s in args.seeds:
            pretrained(s)
        done = json.loads(raw.read_text()) if raw.exists() else []
        have = {(r["seed"], r["arm"]) for r in done}
        todo = [(s, a) for s in args.seeds for a in ARMS if (s, a) not in have]
        from tqdm import tqdm

        with tqdm(total=len(todo), desc="arms") as bar:
            for out in shard(_job, todo, fleet_backend(args)):
                if out.error is not None:
                    raise out.error
                done.append(out.value)
                raw.write_text(json.dumps(done, default=float))  # resumable: every finished arm is kept
                bar.update()
                bar.set_postfix(last=f"{out.item}")
    res = json.loads(raw.read_text())
    text = report(res, run, time.monotonic() - t0)
    print(text)
    if not args.no_write:
        plots(res)
        write_benchmarks(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
