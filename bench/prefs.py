"""Preferences as a training signal (issue 21): reward models with uncertainty, pair-selection rules, simulated
operators, and post-training with the learned reward.

    PYTHONPATH=. .venv/bin/python -m bench.prefs            # make bench-prefs

1. A pool of the demo's pretrained policy's own attempts on MT10 (a selection pool and a held-out pool per task),
   recorded once into bench-runs/prefs/ (the demonstration format, `source = "policy"`).
2. Learning curves: for every selection rule x uncertainty method x seed, a simulated operator answers batches of
   queries (after a shared warm start of random ones); after each batch the reward model is refitted and scored on
   held-out pairs: accuracy against the true order of dense returns, NLL and ECE against the operator's answers.
3. One ranking on accuracy and calibration together, as RewardUQ ranks its methods.
4. Downstream: post-training (`mean`) with the learned reward after 50 / 100 / 200 answers, against the true reward
   and against no post-training, on the tasks where the pretrained policy is weak.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from bench.common import (
    BENCH_RUNS,
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

NAME = "prefs"
BEGIN, END = markers(NAME)
OUT = BENCH_RUNS / "prefs"
SELECT_SEED, HELDOUT_SEED = 100, 300


def workdir_run() -> Path:
    """The demo's shipped run (ensemble.pt + bundle) with the packaged encoder exported into its bundle."""
    from vigil.training.encoder_export import export_encoder

    run = OUT / "run"
    if not (run / "bundle" / "encoder" / "encoder.json").exists():
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(ROOT / "sim" / "assets" / "mt10" / "run", run)
        export_encoder(run / "bundle" / "encoder")
    return run


def pools(args) -> tuple[Path, Path]:
    from vigil.sim.metaworld_env import MT10_TASKS
    from vigil.training.prefs import collect_pool

    run = workdir_run()
    sel, held = OUT / "pool", OUT / "heldout"
    for folder, seed, n in ((sel, SELECT_SEED, args.pool), (held, HELDOUT_SEED, args.heldout)):
        if not (folder / "index.jsonl").exists():
            tmp = folder.with_suffix(".part")
            shutil.rmtree(tmp, ignore_errors=True)
            collect_pool(run / "bundle", list(MT10_TASKS), n, seed, args.max_steps, tmp, fleet_backend(args))
            tmp.rename(folder)
    return sel, held


WEAK = ("door-open-v3", "peg-insert-side-v3", "pick-place-v3", "push-v3", "reach-v3")  # pretrained success < 95%
WARM, BATCH, BUDGET = 10, 10, 200


def summaries_of(folder: Path) -> dict:
    """The pool's summaries and truth, cached as npz next to it."""
    from vigil.training.prefs import load_pool

    cache = folder.with_suffix(".npz")
    if not cache.exists():
        p = load_pool(folder, workdir_run(), tasks=WEAK)
        np.savez(cache, ids=np.array(p.ids), tasks=p.tasks, x=p.x, ret=p.ret, steps=p.steps, success=p.success)
    d = np.load(cache)
    return {k: d[k] for k in d.files}


def heldout_pairs(tasks: np.ndarray) -> np.ndarray:
    return np.array([(i, j) for t in np.unique(tasks) for k, i in enumerate(np.flatnonzero(tasks == t))
                     for j in np.flatnonzero(tasks == t)[k + 1:]])


def loop(job: tuple[str, str, int, str], sel: dict, held: dict):
    """The preference loop for one (rule, method, seed, annotator): `rule` chooses a batch, the simulated operator
    answers it, `method` is refitted; yields (answers so far, the fitted model, held-out metrics) per batch."""
    from vigil.sim.annotator import Annotator, spreads
    from vigil.training import pairs as PR
    from vigil.training import reward_model as RM

    rule, method, seed, kind = job
    ann = Annotator(kind)
    cfg = RM.RewardConfig(method=method, seed=seed)
    u_sel = ann.utility(sel["ret"], sel["steps"])
    spread = spreads(u_sel, sel["tasks"])
    sp = np.array([spread[t] for t in sel["tasks"]])
    groups = {t: np.flatnonzero(sel["tasks"] == t) for t in np.unique(sel["tasks"])}
    hp = heldout_pairs(held["tasks"])
    true_u = held["ret"]  # accuracy is always against the true order of returns, whoever answered
    truth = (true_u[hp[:, 0]] > true_u[hp[:, 1]]).astype(float)
    true_spread = spreads(held["ret"], held["tasks"])
    held_gap = np.abs(true_u[hp[:, 0]] - true_u[hp[:, 1]]) / np.array([true_spread[t] for t in held["tasks"][hp[:, 0]]])
    decisive = held_gap > 0.5  # pairs whose true returns differ by more than half the task's spread
    sel_spread = spreads(sel["ret"], sel["tasks"])
    u_h = ann.utility(held["ret"], held["steps"])
    held_spread = spreads(u_h, held["tasks"])  # once, not once per pair
    hs = np.array([held_spread[t] for t in held["tasks"][hp[:, 0]]])
    y_held = ann.answer(u_h[hp[:, 0]], u_h[hp[:, 1]], hs, np.random.default_rng([seed, 5]))
    warm_rng, rng, arng = (np.random.default_rng([seed, k]) for k in (1, 2, 3))
    asked: set = set()
    chosen = PR.select_batch("random", np.zeros((1, len(sel["x"]))), groups, WARM, warm_rng, asked)
    y = np.zeros(0, np.float32)
    while True:
        P = np.array([(a, b) for _, a, b in chosen])
        new = P[len(y):]  # the operator answers only the new batch
        y = np.concatenate([y, ann.answer(u_sel[new[:, 0]], u_sel[new[:, 1]], sp[new[:, 0]], arng)])
        fitted = RM.fit(sel["x"], P, y, cfg)
        prob = fitted.prob(held["x"], hp)
        scale = np.array([sel_spread[t] for t in sel["tasks"][P[:, 0]]])
        gap = np.abs(sel["ret"][P[:, 0]] - sel["ret"][P[:, 1]]) / scale  # how far apart the asked pairs truly are
        yield len(P), fitted, {"queries": len(P), "accuracy": RM.accuracy(prob, truth),
                               "decisive": RM.accuracy(prob[decisive], truth[decisive]),
                               "nll": RM.nll(prob, y_held), "ece": RM.ece(prob, y_held),
                               "asked_gap": float(np.median(gap))}
        if len(P) >= BUDGET:
            return
        chosen += PR.select_batch(rule, fitted.samples(sel["x"]), groups, BATCH, rng, asked, start=len(chosen))


def curve(job: tuple[str, str, int, str], sel: dict, held: dict) -> dict:
    """One learning curve (every batch's held-out metrics)."""
    import torch

    torch.set_num_threads(1)
    rows = [row for _, _, row in loop(job, sel, held)]
    return {"rule": job[0], "method": job[1], "seed": job[2], "annotator": job[3], "rows": rows}


def curves(args, sel: dict, held: dict) -> list[dict]:

    from vigil.training.pairs import RULES
    from vigil.training.reward_model import METHODS

    raw = OUT / "curves.jsonl"
    done = [json.loads(line) for line in raw.read_text().splitlines()] if raw.exists() else []
    have = {(d["rule"], d["method"], d["seed"], d["annotator"]) for d in done}
    jobs = [(r, m, s, "bt") for s in range(args.seeds) for m in METHODS for r in RULES]
    jobs += [("drts", "ensemble", s, k) for s in range(args.seeds) for k in ("noisy", "biased")]
    jobs += [("random", "ensemble", s, k) for s in range(args.seeds) for k in ("noisy", "biased")]
    return resumable(raw, done, [j for j in jobs if j not in have], curve, args, (sel, held), "curves")


DOWNSTREAM = (50, 100, 200)  # answers behind each learned reward
DOWN_RULE, DOWN_METHOD = "drts", "ensemble"


def learned_rewards(seed: int, sel: dict, held: dict) -> dict[int, Path]:
    """The reward models after 50 / 100 / 200 answers of one downstream loop (DRTS, deep ensemble, the BT
    operator), each exported as the runtime loads it (training/prefs.save_model); one pass of the loop for all."""
    from vigil.training.prefs import save_model
    from vigil.training.train_flow import load_checkpoint

    folders = {n: OUT / "rewards" / f"s{seed}-n{n}" for n in DOWNSTREAM}
    todo = {n for n, f in folders.items() if not (f / "reward.onnx").exists()}
    if todo:
        ens, _, _ = load_checkpoint(workdir_run() / "ensemble.pt")
        for n, fitted, _ in loop((DOWN_RULE, DOWN_METHOD, seed, "bt"), sel, held):
            for target in sorted(t for t in todo if n >= t):  # the first fit with at least that many answers
                save_model(fitted, folders[target], ens, {"answers": n})
                todo.discard(target)
            if not todo:
                break
    return folders


def posttrain_arm(job: tuple[int, str, str], max_steps: int, eval_episodes: int) -> dict:
    """Post-train the pretrained run with `mean` on the weak tasks with one reward (or none); evaluate on the
    simulator's success."""
    import torch

    from vigil.policies.instructions import InstructionEncoder
    from vigil.training import posttrain as P
    from vigil.training.prefs import encoder_folder
    from vigil.training.train_flow import load_checkpoint

    torch.set_num_threads(1)
    seed, arm, reward = job
    run = workdir_run()
    ens, _, _ = load_checkpoint(run / "ensemble.pt")
    encoder = InstructionEncoder.load(encoder_folder(run), prefer_gpu=False)
    pc = P.PosttrainConfig(objective="mean", seed=seed, tasks=WEAK, max_steps=max_steps, reward=reward,
                           pad_success=arm == "true reward").check()
    t0 = time.perf_counter()
    rows: list[dict] = []
    if arm != "no post-training":
        ens, rows = P.run(ens, pc, encoder, list(WEAK), progress=False, log=lambda _: None)
    eps = P.collect(ens, list(WEAK), list(range(20, 20 + eval_episodes)), encoder, pc, evaluation=True)
    return {"seed": seed, "arm": arm, "rows": rows, "seconds": time.perf_counter() - t0,
            "success": float(np.mean([a.success for a in eps])),
            "per_task": {t: float(np.mean([a.success for a in eps if a.task == t])) for t in WEAK}}


def downstream(args, sel: dict, held: dict) -> list[dict]:


    raw = OUT / "downstream.jsonl"
    done = [json.loads(line) for line in raw.read_text().splitlines()] if raw.exists() else []
    have = {(d["seed"], d["arm"]) for d in done}
    jobs = []
    for seed in range(args.downstream_seeds):
        jobs += [(seed, "no post-training", ""), (seed, "true reward", "")]
        rewards = learned_rewards(seed, sel, held)
        jobs += [(seed, f"learned, {n} answers", str(rewards[n])) for n in DOWNSTREAM]
    return resumable(raw, done, [j for j in jobs if (j[0], j[1]) not in have], posttrain_arm, args,
                     (args.max_steps, args.eval_episodes), "post-training")


def resumable(raw: Path, done: list[dict], jobs: list, fn, args, shared: tuple, desc: str) -> list[dict]:
    """Run the jobs on the fleet, appending each result to `raw` as it comes (a rerun skips what is there)."""
    from tqdm import tqdm

    from vigil.sim.shard import shard

    with tqdm(total=len(jobs), desc=desc) as bar:
        for out in shard(fn, jobs, fleet_backend(args), shared):
            if out.error is not None:
                raise out.error
            done.append(out.value)
            with open(raw, "a") as fh:
                fh.write(json.dumps(out.value) + "\n")
            bar.update()
    return done


def _curve(res: list[dict], rule: str, method: str, kind: str = "bt", key: str = "accuracy") -> np.ndarray:
    """(seeds, batches) of one metric."""
    return np.array([[r[key] for r in d["rows"]] for d in res
                     if (d["rule"], d["method"], d["annotator"]) == (rule, method, kind)])


def queries_to(res: list[dict], rule: str, method: str, level: float) -> float:
    """Answers the rule's mean accuracy curve needs to first reach `level` (nan: never)."""
    acc = _curve(res, rule, method)
    q = [r["queries"] for r in next(d for d in res if d["rule"] == rule)["rows"]]
    hits = np.flatnonzero(acc.mean(0) >= level - 1e-9)
    return float(q[hits[0]]) if hits.size else float("nan")


def report(res: list[dict], down: list[dict], run: dict, seconds: float) -> str:
    from vigil.training.pairs import RULES
    from vigil.training.reward_model import METHODS

    seeds = sorted({d["seed"] for d in res})
    rows = []
    for m in METHODS:
        for r in RULES:
            acc, ece_, nll_ = (_curve(res, r, m, key=k) for k in ("accuracy", "ece", "nll"))
            if not len(acc):
                continue
            dec, gap = (_curve(res, r, m, key=k) for k in ("decisive", "asked_gap"))
            rows.append({"rule": r, "method": m, "acc": acc[:, -1], "ece": ece_[:, -1], "nll": nll_[:, -1],
                         "auc": acc.mean(1), "dec": dec[:, -1], "gap": gap[:, -1]})
    order_acc = np.argsort(np.argsort([-x["acc"].mean() for x in rows]))
    order_nll = np.argsort(np.argsort([x["nll"].mean() for x in rows]))
    for x, a, b in zip(rows, order_acc, order_nll, strict=True):
        x["rank"] = (a + b) / 2 + 1
    rows.sort(key=lambda x: x["rank"])

    def ms(v, f="{:.3f}"):
        return f"{f.format(np.mean(v))} ± {f.format(np.std(v))}"

    lines = [BEGIN, "## Preferences: reward models with uncertainty, active pair selection, simulated operators "
             "(issue 21)", "", written_by(run, seconds=seconds),
             f"- Pool: the demo's pretrained MT10 policy's own attempts on its {len(WEAK)} weakest tasks "
             f"({', '.join(WEAK)}), 40 per task to choose from and 20 per task held out (every held-out pair "
             "within a task scored). The true order is Meta-World's dense return over the whole horizon "
             "(an episode ended by a held success keeps its last reward: training/prefs.horizon_return).",
             f"- Loop: {WARM} random queries to start, then batches of {BATCH} chosen by the rule, refitted after "
             f"every batch, up to {BUDGET}; the operator is Bradley–Terry over the true return (temperature 0.1 "
             f"of the task's return spread). Seeds: {len(seeds)}. Accuracy: held-out pairs ordered as the true "
             "return orders them; NLL and ECE: the stated P(A better) against the simulated operator's answers on "
             "the held-out pairs. Decisive pairs: held-out pairs whose true returns differ by more than half the "
             "task's spread. True gap: median |R(A) - R(B)| of the pairs asked, in task spreads.", "",
             f"### Ranking at {BUDGET} answers (accuracy and NLL ranks averaged; mean ± std over seeds)", "",
             "| rank | rule | uncertainty | accuracy | accuracy, mean over the curve | accuracy, decisive pairs | "
             "NLL | ECE | asked pairs' true gap |",
             "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for x in rows:
        lines.append(f"| {x['rank']:.1f} | {x['rule']} | {x['method']} | {ms(x['acc'])} | {ms(x['auc'])} | "
                     f"{ms(x['dec'])} | {ms(x['nll'])} | {ms(x['ece'])} | {ms(x['gap'], '{:.2f}')} |")
    lines += ["", "### Target: reach random selection's final accuracy with a third of its queries", "",
              "| uncertainty | random's accuracy at 200 | DRTS needs | DeltaUCB needs | uncertainty sampling needs |"
              " DTS needs |", "|---|---:|---:|---:|---:|---:|"]
    for m in METHODS:
        if not len(_curve(res, "random", m)):
            continue
        level = float(_curve(res, "random", m)[:, -1].mean())
        cells = [f"{queries_to(res, r, m, level):.0f}" for r in ("drts", "deltaucb", "uncertainty", "dts")]
        lines.append(f"| {m} | {level:.3f} | " + " | ".join(c.replace("nan", "never") for c in cells) + " |")
    lines += ["", "Queries: answers after which the rule's mean curve first reaches that accuracy (a third of "
              f"random's is {BUDGET // 3}).", "", "### What mis-specified operators do (deep ensemble; accuracy "
              "against the true order)", "", "| operator | random | DRTS |", "|---|---:|---:|"]
    for kind in ("bt", "noisy", "biased"):
        cells = [ms(_curve(res, r, "ensemble", kind)[:, -1]) if len(_curve(res, r, "ensemble", kind)) else "–"
                 for r in ("random", "drts")]
        lines.append(f"| {kind} | {cells[0]} | {cells[1]} |")
    if down:
        arms = list(dict.fromkeys(d["arm"] for d in down))
        lines += ["", f"### Downstream: post-training (`mean`) on the {len(WEAK)} weak tasks with each reward "
                  "(DRTS + deep ensemble rewards; success of the simulator, 20 episodes per task, mean ± std over "
                  f"{len({d['seed'] for d in down})} seeds)", "",
                  "| reward | success | " + " | ".join(WEAK) + " |", "|---|---:|" + "---:|" * len(WEAK)]
        for arm in arms:
            ds = [d for d in down if d["arm"] == arm]
            lines.append(f"| {arm} | {ms([d['success'] for d in ds], '{:.2f}')} | "
                         + " | ".join(f"{np.mean([d['per_task'][t] for d in ds]):.2f}" for t in WEAK) + " |")
    lines += ["", "Figures: docs/figures/prefs_curves.png (accuracy and ECE against answers), "
              "docs/figures/prefs_downstream.png.", END]
    return "\n".join(lines)


def plots(res: list[dict], down: list[dict]) -> None:
    from vigil.training.pairs import RULES
    from vigil.training.reward_model import METHODS

    plt = pyplot()
    fig, axes = plt.subplots(2, len(METHODS), figsize=(4 * len(METHODS), 6.5), sharex=True)
    q = [r["queries"] for r in res[0]["rows"]]
    for j, m in enumerate(METHODS):
        for r in RULES:
            for i, key in enumerate(("accuracy", "ece")):
                c = _curve(res, r, m, key=key)
                if len(c):
                    axes[i, j].plot(q, c.mean(0), label=r)
                    axes[i, j].fill_between(q, c.min(0), c.max(0), alpha=0.12)
        axes[0, j].set_title(m, fontsize=10)
        axes[1, j].set_xlabel("answers")
    axes[0, 0].set_ylabel("held-out accuracy")
    axes[1, 0].set_ylabel("ECE")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, FIGURES / "prefs_curves.png", dpi=90)
    if down:
        arms = list(dict.fromkeys(d["arm"] for d in down))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        vals = [[d["success"] for d in down if d["arm"] == a] for a in arms]
        ax.bar(range(len(arms)), [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals], capsize=3)
        ax.set_xticks(range(len(arms)), arms, rotation=20, fontsize=8)
        ax.set_ylabel("success (weak tasks)")
        fig.tight_layout()
        save_figure(fig, FIGURES / "prefs_downstream.png", dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=int, default=40, help="attempts per task in the selection pool")
    ap.add_argument("--heldout", type=int, default=20, help="attempts per task in the held-out pool")
    ap.add_argument("--max-steps", type=int, default=500)
    add_fleet_args(ap)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--downstream-seeds", type=int, default=2)
    ap.add_argument("--eval-episodes", type=int, default=20, help="post-training evaluation episodes per task")
    ap.add_argument("--stage", default="all", choices=("pools", "curves", "downstream", "all", "report"))
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    if args.stage == "report":
        args.stage = "none"
    sel_dir, held_dir = pools(args)
    print(f"pools ready in {time.monotonic() - t0:.0f} s")
    if args.stage == "pools":
        return 0
    sel, held = summaries_of(sel_dir), summaries_of(held_dir)
    if args.stage in ("curves", "all"):
        res = curves(args, sel, held)
        print(f"curves ready in {time.monotonic() - t0:.0f} s ({len(res)})")
    if args.stage in ("downstream", "all"):
        down = downstream(args, sel, held)
        print(f"downstream ready in {time.monotonic() - t0:.0f} s ({len(down)})")
    res = [json.loads(line) for line in (OUT / "curves.jsonl").read_text().splitlines()]
    down_file = OUT / "downstream.jsonl"
    down = [json.loads(line) for line in down_file.read_text().splitlines()] if down_file.exists() else []
    text = report(res, down, run_info(), time.monotonic() - t0)
    print(text)
    if not args.no_write:
        plots(res, down)
        write_benchmarks(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
