"""The SAVE experiment (issue 5 item 5; docs/save.md, docs/algorithms.md): which acquisition of expert
demonstrations makes a multitask flow policy succeed with the fewest of them?

Per seed: pretrain a small flow ensemble on `pretrain` demonstrations per MT10 task (drawn at random from a
pool of expert demonstrations), then `rounds` rounds of `budget` demonstrations acquired from the rest of
the pool by each rule below, fine-tuning every member warm-started from the previous round on old and
acquired data half and half (training/save.py `finetune`), and evaluating after every round on task
variants that no demonstration uses. Every rule starts from the same pretrained ensemble of its seed and
is evaluated on the same episodes, so the rules are compared pairwise, seed by seed.

Rules (training/save.py `acquire`):
  save       VFD of each candidate at its initial observation; tasks drawn with p ∝ max(u_T, 0)^2.5,
             the most uncertain candidates of a drawn task first;
  action_l2  the same rule with the Action-L2 score (spread of the members' sampled chunks);
  uniform    tasks uniformly, a random candidate inside the task;
  random     candidates uniformly from the whole pool.
  save_rollout  the save rule with each candidate scored by the mean VFD of the policy's own first
             `rollout_plans` plans, played from the candidate's reset: what the onboard monitor sees in
             deployment, instead of the initial observation only.

Variants: Meta-World has 50 per task. Variants 0..`pool_variants`-1 have expert demonstrations (the
pretraining sets and the candidate pool); evaluation plays variants from `pool_variants` on.

Raw results (bench-runs/save, resumable: finished (seed, rule) chains are kept): demos/ (the pool),
results.jsonl (one line per evaluation), runs.jsonl (one line per invocation), diagnosis.json,
pretrained-s<seed>.pt. The section between the `save` markers of BENCHMARKS.md and docs/figures/save_curves.png,
save_tasks.png are rendered from them (`--report-only` renders them again without training; `--section` names
another section and its figures).

    make bench-save                       # the sizes below, about 1.5 h on 2 cores
    .venv/bin/python -m bench.save --seeds 2 --rounds 2 --eval-variants 3   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
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
    section,
    utc_now,
    write_benchmarks,
    written_by,
)
from vigil.sim.shard import shard

RULE_OF = {"save": ("save", "vfd"), "action_l2": ("save", "action_l2"), "uniform": ("uniform", None),
           "random": ("random", None), "save_rollout": ("save", "rollout")}  # name -> (acquire rule, score)
RULES = tuple(RULE_OF)


@dataclass(frozen=True)
class Sizes:
    """The experiment's sizes: every figure in the report is for these."""

    seeds: int = 10
    first_seed: int = 0          # seeds first_seed .. first_seed + seeds - 1
    rounds: int = 5
    budget: int = 10             # demonstrations acquired per round (all tasks together)
    pretrain: int = 2            # demonstrations per task before the first round
    pool_variants: int = 32      # variants 0..31 have expert demonstrations: pretraining + candidate pool
    eval_variants: int = 10      # evaluation variants per task, from 50 - eval_variants .. 49
    max_steps: int = 300         # per evaluation episode (it stops at the first success)
    members: int = 3
    hidden: int = 128
    depth: int = 2
    batch_size: int = 128
    lr: float = 1e-3
    pretrain_steps: int = 4000
    round_steps: int = 1000
    tau: float = 2.5
    score_samples: int = 5       # noise samples per candidate score
    rollout_plans: int = 8       # save_rollout: plans of the policy's own rollout per candidate score

    def flow_config(self, seed: int):
        from vigil.training.flow import FlowConfig

        return FlowConfig(members=self.members, hidden=self.hidden, depth=self.depth, batch_size=self.batch_size,
                          lr=self.lr, steps=self.pretrain_steps, seed=seed, vfd_samples=self.score_samples)


# ------------------------------------------------------------------------------------------------ pool


def record_pool(folder: Path, tasks: list[str], variants: int) -> None:
    """Expert demonstrations of variants 0..variants-1 of every task (skips those already recorded)."""
    from tqdm import tqdm

    from vigil.training.demos import DemoSet, DemoWriter, record_expert

    have = {(e.task, e.seed) for e in DemoSet(folder).index} if (folder / "index.jsonl").exists() else set()
    todo = {t: [s for s in range(variants) if (t, s) not in have] for t in tasks}
    if not any(todo.values()):
        return
    writer = DemoWriter(folder)
    with tqdm(total=sum(map(len, todo.values())), desc="expert pool") as bar:
        for task, seeds in todo.items():
            for s in seeds:  # one at a time: an interrupted recording resumes where it stopped
                record_expert(task, 1, s, False, writer, progress=lambda _: bar.update())


# ------------------------------------------------------------------------------------------- one seed

_WORKER: dict = {}


def _init_worker(demos: str) -> None:
    import torch

    from vigil.policies.instructions import InstructionEncoder
    from vigil.training.demos import DemoSet

    torch.set_num_threads(1)
    encoder = InstructionEncoder.load(Path(demos).parent / "encoder", prefer_gpu=False)
    _WORKER.update(demos=DemoSet(demos), encoder=encoder, envs={}, episodes={})


def _episode(eid: str):
    eps = _WORKER["episodes"]
    if eid not in eps:
        eps[eid] = _WORKER["demos"].load(eid)
    return eps[eid]


def _data(cfg, ids: list[str]):
    from vigil.training.train_flow import dataset_tensors

    return dataset_tensors(_WORKER["demos"], cfg, _WORKER["encoder"], episode_ids=ids)


def evaluate(ens, tasks: list[str], variants: list[int], max_steps: int, seed: int) -> dict[str, list[bool]]:
    """Success of member 0's plans (what a flow_ensemble bundle executes: chunk of H, the first H // 2
    actions, then a fresh plan) on each task's evaluation variants; noise seeded per (seed, task, variant)
    so every rule's policy meets the same draws."""
    import torch

    from vigil.sim.envs import make_env
    from vigil.training.flow import sample

    cfg = ens.cfg
    H, m, execute = cfg.horizon, cfg.action_dim, max(1, cfg.horizon // 2)
    out: dict[str, list[bool]] = {}
    for k, task in enumerate(tasks):
        env = _WORKER["envs"].get(task)
        if env is None:
            env = _WORKER["envs"][task] = make_env(task, horizon=max_steps)
        instr = torch.as_tensor(_WORKER["encoder"].embed([env.instruction]), dtype=torch.float32)
        results = []
        for v in variants:
            rng = np.random.default_rng([seed, k, v])
            obs, queue, success = env.reset(seed=v), [], False
            for _ in range(max_steps):
                if not queue:
                    state = torch.as_tensor(obs["state"], dtype=torch.float32)[None]
                    noise = torch.from_numpy(rng.standard_normal((1, H, m), dtype=np.float32))
                    queue = list(np.clip(sample(ens, state, instr, noise)[0].numpy(), -1.0, 1.0)[:execute])
                r = env.step(queue.pop(0))
                obs = r.obs
                if float(r.info.get("success", 0.0)) >= 1.0:
                    success = True
                    break
                if r.terminated or r.truncated:
                    break
            results.append(success)
        out[task] = results
    return out


def run_seed(seed: int, sizes: Sizes, tasks: list[str], out: str, rules: list[str],
             evaluate_pretrained: bool = True) -> list[dict]:
    """Pretrain (or load) the seed's ensemble, then every rule's rounds. Returns the evaluation records
    (the pretrained ensemble's too, unless `evaluate_pretrained` is False: a later run adding a rule)."""
    from vigil.training.flow import train_ensemble
    from vigil.training.save import acquire, by_task, candidate_scores, finetune, rollout_scores
    from vigil.training.train_flow import load_checkpoint, save_checkpoint

    demos = _WORKER["demos"]
    variants = list(range(50 - sizes.eval_variants, 50))
    rng = np.random.default_rng([seed, 0])
    ok = {t: sorted((e for e in demos.episodes(task=t, success=True) if e.seed < sizes.pool_variants),
                    key=lambda e: e.seed) for t in tasks}
    pretrain_ids, pool = [], []
    for t in tasks:
        pick = set(rng.choice(len(ok[t]), size=sizes.pretrain, replace=False).tolist())
        pretrain_ids += [e.id for i, e in enumerate(ok[t]) if i in pick]
        pool += [e for i, e in enumerate(ok[t]) if i not in pick]
    task_of = {e.id: e.task for e in pool}
    cfg = sizes.flow_config(seed)
    records: list[dict] = []

    def record(rule: str, round_no: int, acquired: list[str], ens, wall: float) -> None:
        res = evaluate(ens, tasks, variants, sizes.max_steps, seed)
        records.append({"seed": seed, "rule": rule, "round": round_no, "acquired": len(acquired),
                        "total": len(pretrain_ids) + len(acquired), "success": float(np.mean(sum(res.values(), []))),
                        "by_task": {t: float(np.mean(r)) for t, r in res.items()},
                        "acquired_tasks": {t: sum(task_of[i] == t for i in acquired) for t in tasks},
                        "train_s": wall})

    ck = Path(out) / f"pretrained-s{seed}.pt"
    t0 = time.perf_counter()
    if ck.exists():
        ens0, _, _ = load_checkpoint(ck)
    else:
        ens0, hist = train_ensemble(cfg, *_data(cfg, pretrain_ids), progress=False)
        save_checkpoint(ck, ens0, cfg, {"seed": seed, "pretrain": pretrain_ids}, hist)
    if evaluate_pretrained:
        record("pretrained", 0, [], ens0, time.perf_counter() - t0)
    for rule in rules:
        how, score = RULE_OF[rule]
        arng = np.random.default_rng([seed, 1, list(RULE_OF).index(rule)])  # the same draws, run alone or not
        ens, left, acquired = ens0, list(pool), []
        for round_no in range(1, sizes.rounds + 1):
            t0 = time.perf_counter()
            if score == "rollout":
                scores = rollout_scores(ens, left, _WORKER["encoder"], sizes.rollout_plans, seed * 1000 + round_no,
                                        _WORKER["envs"], sizes.max_steps)
            elif score:
                scores = candidate_scores(ens, [_episode(e.id) for e in left], _WORKER["encoder"], score=score,
                                          samples=sizes.score_samples, seed=seed * 1000 + round_no)
            else:
                scores = np.zeros(len(left))
            grouped, index = by_task([e.task for e in left], scores)
            picks = [index[t][i] for t, i in acquire(grouped, sizes.budget, sizes.tau, arng, how)]
            new = [left[k].id for k in picks]
            left = [e for k, e in enumerate(left) if k not in set(picks)]
            round_cfg = dataclasses.replace(cfg, steps=sizes.round_steps, seed=seed * 100 + round_no)
            ens, _ = finetune(ens, round_cfg, _data(cfg, pretrain_ids + acquired), _data(cfg, new), progress=False)
            acquired += new
            record(rule, round_no, acquired, ens, time.perf_counter() - t0)
    return records


def _run_seed(job: tuple[int, list[str], bool], sizes: Sizes, tasks: list[str], out: str) -> list[dict]:
    seed, rules, evaluate_pretrained = job
    return run_seed(seed, sizes, tasks, out, rules, evaluate_pretrained)


def diagnose_seed(seed: int, sizes: Sizes, tasks: list[str], out: str) -> dict[str, dict[str, float]]:
    """How each score ranks the tasks for the seed's pretrained ensemble: {score: {task: mean over the
    task's successful pool demonstrations}} for the initial-observation VFD and Action-L2 and the rollout
    VFD (save_rollout's). Compared in the report with the pretrained success of each task."""
    from vigil.training.save import candidate_scores, rollout_scores
    from vigil.training.train_flow import load_checkpoint

    ens, _, _ = load_checkpoint(Path(out) / f"pretrained-s{seed}.pt")
    pool = [e for e in _WORKER["demos"].episodes(success=True) if e.task in tasks and e.seed < sizes.pool_variants]
    eps = [_episode(e.id) for e in pool]
    scores = {"vfd": candidate_scores(ens, eps, _WORKER["encoder"], "vfd", sizes.score_samples, seed),
              "action_l2": candidate_scores(ens, eps, _WORKER["encoder"], "action_l2", sizes.score_samples, seed),
              "rollout": rollout_scores(ens, pool, _WORKER["encoder"], sizes.rollout_plans, seed, _WORKER["envs"],
                                        sizes.max_steps)}
    return {name: {t: float(np.mean([v for e, v in zip(pool, vals) if e.task == t])) for t in tasks}
            for name, vals in scores.items()}


def diagnosis_text(diag: dict[str, dict], records: list[dict], tasks: list[str]) -> list[str]:
    """Spearman correlation, per seed, of each score's task uncertainty u_T with the pretrained failure rate:
    the premise of uncertainty-guided task sampling is that it is positive."""
    from scipy.stats import spearmanr

    pre = {r["seed"]: r["by_task"] for r in records if r["rule"] == "pretrained"}
    seeds = sorted(int(s) for s in diag if int(s) in pre)
    if not seeds:
        return []
    lines = ["Spearman correlation over tasks of u_T (the mean score of a task's candidates under the pretrained "
             f"ensemble) with the task's pretrained failure rate, mean ± std over {len(seeds)} seeds:", "",
             "| score | Spearman(u_T, failure) |", "|---|---:|"]
    for name in ("vfd", "action_l2", "rollout"):
        rho = [spearmanr([diag[str(s)][name][t] for t in tasks], [1 - pre[s][t] for t in tasks]).statistic
               for s in seeds]
        label = {"vfd": "VFD at the initial observation (save)", "action_l2": "Action-L2 at the initial observation",
                 "rollout": "VFD over the policy's first plans (save_rollout)"}[name]
        lines.append(f"| {label} | {np.nanmean(rho):+.2f} ± {np.nanstd(rho):.2f} |")
    return lines


# ---------------------------------------------------------------------------------------------- report


def demos_to_target(xs: np.ndarray, ys: np.ndarray, target: float) -> float:
    """The number of demonstrations at which the curve (xs increasing) first reaches `target`, linearly
    interpolated between evaluations; nan if it never does."""
    for k in range(len(xs)):
        if ys[k] >= target:
            if k == 0:
                return float(xs[0])
            x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
            return float(x0 + (target - y0) / (y1 - y0) * (x1 - x0))
    return float("nan")


def curves(records: list[dict], rules: list[str], seeds: list[int]) -> dict[str, np.ndarray]:
    """rule -> (seeds, rounds + 1) success, round 0 being the shared pretrained ensemble."""
    by = {(r["seed"], r["rule"], r["round"]): r["success"] for r in records}
    rounds = max(r["round"] for r in records)
    return {rule: np.array([[by[(s, "pretrained", 0)]] + [by[(s, rule, k)] for k in range(1, rounds + 1)]
                            for s in seeds]) for rule in rules}


def report(records: list[dict], sizes: Sizes, rules: list[str], tasks: list[str], run: dict,
           runs: list[dict], target_given: float | None, diagnosis: list[str] = (), section_name: str = "save"
           ) -> tuple[str, dict]:
    """The section and the figures' data, from the evaluation records (results.jsonl), the invocations
    (runs.jsonl) and the scores' task rankings (diagnosis.json)."""
    seeds = sorted({r["seed"] for r in records if r["rule"] == "pretrained"
                    and sizes.first_seed <= r["seed"] < sizes.first_seed + sizes.seeds})
    seeds = [s for s in seeds if all(any(r["seed"] == s and r["rule"] == rule and r["round"] == sizes.rounds
                                         for r in records) for rule in rules)]
    cur = curves(records, rules, seeds)
    xs = np.arange(sizes.rounds + 1) * sizes.budget
    means = {rule: c.mean(0) for rule, c in cur.items()}
    target = target_given
    if target is None:  # the highest success every rule's mean curve reaches
        target = float(min(m.max() for m in means.values()))
    auc = {rule: c[:, 1:].mean(1) for rule, c in cur.items()}  # mean success over the rounds, per seed
    to_target = {rule: demos_to_target(xs, means[rule], target) for rule in rules}
    per_seed = {rule: np.array([demos_to_target(xs, c, target) for c in cur[rule]]) for rule in rules}
    base = to_target.get("uniform", float("nan"))
    n_pre = sizes.pretrain * len(tasks)
    rows = ["| rule | " + " | ".join(f"{x} acquired" for x in xs) + " | AUC (mean success, rounds 1.."
            f"{sizes.rounds}) | AUC - uniform, paired | demos to {target:.0%} (acquired / total) | "
            "demos vs uniform | seeds reaching it |",
            "|---|" + "---:|" * (len(xs) + 5)]
    for rule in rules:
        c = cur[rule]
        d = auc[rule] - auc["uniform"] if "uniform" in auc else np.full(len(seeds), np.nan)
        change = to_target[rule] / base - 1 if np.isfinite(base) and base > 0 else float("nan")
        reached = np.isfinite(per_seed[rule])
        rows.append(f"| {rule} | " + " | ".join(f"{m:.1%} ± {s:.1%}" for m, s in zip(c.mean(0), c.std(0)))
                    + f" | {auc[rule].mean():.1%} ± {auc[rule].std():.1%} | {d.mean():+.1%} ± "
                    f"{d.std() / np.sqrt(len(d)):.1%} | {to_target[rule]:.1f} / {to_target[rule] + n_pre:.1f} | "
                    f"{change:+.0%} | {reached.sum()}/{len(seeds)} |")
    # where the demonstrations went: per task, acquired at the end, and pretrained success
    by = {(r["seed"], r["rule"], r["round"]): r for r in records}
    pre = {t: np.mean([by[(s, "pretrained", 0)]["by_task"][t] for s in seeds]) for t in tasks}
    fin = {rule: {t: np.mean([by[(s, rule, sizes.rounds)]["by_task"][t] for s in seeds]) for t in tasks}
           for rule in rules}
    got = {rule: {t: np.mean([by[(s, rule, sizes.rounds)]["acquired_tasks"][t] for s in seeds]) for t in tasks}
           for rule in rules}
    task_rows = ["| task | pretrained success | " + " | ".join(f"{r}: demos / final success" for r in rules) + " |",
                 "|---|---:|" + "---:|" * len(rules)]
    for t in sorted(tasks, key=lambda t: pre[t]):
        task_rows.append(f"| {t} | {pre[t]:.0%} | " + " | ".join(f"{got[r][t]:.1f} / {fin[r][t]:.0%}" for r in rules)
                         + " |")
    train_s = np.mean([r["train_s"] for r in records if r["round"] > 0])
    verdict = []
    for rule in [r for r in ("save", "save_rollout") if r in rules and "uniform" in rules]:
        change = to_target[rule] / base - 1 if np.isfinite(base) and base > 0 else float("nan")
        others = [r for r in rules if r not in ("save", "save_rollout")]
        beats_all = all(not np.isfinite(to_target[r]) or to_target[rule] < to_target[r] for r in others)
        verdict.append(f"Target (SAVE reaches the target with at least 22% fewer acquired demonstrations than "
                       f"uniform, and fewer than every baseline), `{rule}`: {change:+.0%} demonstrations against "
                       f"uniform ({'met' if change <= -0.22 else 'not met'}); fewer than every baseline: "
                       f"{'yes' if beats_all else 'no'}.")
    invocations = "; ".join(f"`{r['command'] or 'default'}` {r['minutes']:.0f} min" for r in runs)
    text = section(section_name, [
        "## SAVE: success against expert demonstrations, by acquisition rule"
        + (f" ({section_name.removeprefix('save-')}: seeds {seeds[0]}..{seeds[-1]})" if section_name != "save" else ""),
        "",
        written_by(run),
        f"- Runs: {sum(r['minutes'] for r in runs):.0f} min in {len(runs)} invocation(s) of `make bench-save` "
        f"(`OMP_NUM_THREADS=1 .venv/bin/python -m bench.save`, resumable) with these arguments: {invocations}.",
        f"- Sizes: {len(seeds)} seeds x {len(rules)} rules x {sizes.rounds} rounds of {sizes.budget} "
        f"demonstrations, after {sizes.pretrain} pretraining demonstrations per task ({n_pre} in all) on "
        f"{len(tasks)} MT10 tasks. Candidate pool: the other successful expert demonstrations of variants "
        f"0..{sizes.pool_variants - 1} (about {sizes.pool_variants - sizes.pretrain} per task). Ensemble: "
        f"{sizes.members} members, {sizes.hidden}x{sizes.depth} MLPs, lr {sizes.lr:g}, batch {sizes.batch_size}, "
        f"{sizes.pretrain_steps} pretraining steps, {sizes.round_steps} steps per round; {train_s:.0f} s per round "
        "on average (scoring and fine-tuning).",
        f"- Evaluation after every round: {sizes.eval_variants} held-out variants per task "
        f"({50 - sizes.eval_variants}..49), {len(tasks) * sizes.eval_variants} episodes of at most "
        f"{sizes.max_steps} steps.",
        f"- Target success: {target:.0%}" + (" (the highest success every rule's mean curve reaches)."
                                           if target_given is None else " (given)."),
        "",
        *rows,
        "",
        *[line for v in verdict for line in (v, "")],
        "Where the demonstrations went (mean over seeds after the last round), tasks by pretrained success:",
        "",
        *task_rows,
        "",
        *diagnosis,
        *([""] if diagnosis else []),
        f"![success against demonstrations]({(FIGURES / f'{section_name}_curves.png').relative_to(ROOT)})",
        f"![demonstrations per task]({(FIGURES / f'{section_name}_tasks.png').relative_to(ROOT)})",
    ])
    return text, {"cur": cur, "xs": xs, "n_pre": n_pre, "target": target, "pre": pre, "got": got, "tasks": tasks}


def plots(data: dict, rules: list[str], section_name: str = "save") -> None:
    """Success against acquired demonstrations per rule, and where each rule's demonstrations went."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for rule in rules:
        c = data["cur"][rule]
        m, se = c.mean(0), c.std(0) / np.sqrt(len(c))
        ax.plot(data["xs"], m, marker="o", label=rule)
        ax.fill_between(data["xs"], m - se, m + se, alpha=0.2)
    ax.axhline(data["target"], color="grey", ls=":", lw=1, label=f"target {data['target']:.0%}")
    ax.set_xlabel(f"acquired demonstrations (after {data['n_pre']} pretraining ones)")
    ax.set_ylabel("success on held-out variants")
    ax.set_title(f"SAVE vs baselines: mean ± standard error over {len(c)} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, FIGURES / f"{section_name}_curves.png")
    tasks = sorted(data["tasks"], key=lambda t: data["pre"][t])
    fig, ax = plt.subplots(figsize=(9, 4))
    x = np.arange(len(tasks))
    w = 0.8 / len(rules)
    for i, rule in enumerate(rules):
        ax.bar(x + (i - (len(rules) - 1) / 2) * w, [data["got"][rule][t] for t in tasks], w, label=rule)
    ax.set_xticks(x, [f"{t.replace('-v3', '')}\n({data['pre'][t]:.0%})" for t in tasks], fontsize=7)
    ax.set_ylabel("demonstrations acquired (mean over seeds)")
    ax.set_xlabel("task (pretrained success)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, FIGURES / f"{section_name}_tasks.png")


# ------------------------------------------------------------------------------------------------ main


def measure(args: argparse.Namespace, sizes: Sizes, rules: list[str], tasks: list[str], out: Path) -> None:
    """Every missing (seed, rule) chain into results.jsonl, the invocation into runs.jsonl, the scores' task
    rankings into diagnosis.json."""
    from tqdm import tqdm

    from vigil.training.train_flow import ensure_encoder

    (out / "sizes.json").write_text(json.dumps(asdict(sizes), indent=1))
    results = out / "results.jsonl"
    started, t0 = utc_now(), time.time()
    record_pool(out / "demos", tasks, sizes.pool_variants)
    ensure_encoder(out / "encoder")  # once, before the workers load it
    done = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    have = {(r["seed"], r["rule"]) for r in done if r["round"] == sizes.rounds}
    evaluated = {r["seed"] for r in done if r["rule"] == "pretrained"}
    todo = {s: [rule for rule in rules if (s, rule) not in have]
            for s in range(sizes.first_seed, sizes.first_seed + sizes.seeds)}
    todo = {s: missing for s, missing in todo.items() if missing}
    backend, init = fleet_backend(args), (str(out / "demos"),)
    with tqdm(total=len(todo), desc="seeds") as bar:
        jobs = [(s, missing, s not in evaluated) for s, missing in todo.items()]
        for done in shard(_run_seed, jobs, backend, (sizes, tasks, str(out)), _init_worker, init):
            if done.error is not None:
                raise done.error
            recs = done.value
            with open(results, "a") as fh:  # a seed's records land together: a resumed run redoes its rules
                fh.writelines(json.dumps(r) + "\n" for r in recs)
            bar.update()
            last = {r["rule"]: r["success"] for r in recs if r["round"] == sizes.rounds}
            bar.set_postfix(seed=done.item[0], **{k: f"{v:.0%}" for k, v in last.items()})
    if todo:  # what this invocation ran, for the report's account of the time it took
        with open(out / "runs.jsonl", "a") as fh:
            fh.write(json.dumps({"started": started, "minutes": (time.time() - t0) / 60, "command": " ".join(
                sys.argv[1:]), "ran": {str(k): v for k, v in todo.items()}}) + "\n")
    latest = latest_records(out)
    diag_file = out / "diagnosis.json"  # the scores' task rankings, once per pretrained seed
    diag = json.loads(diag_file.read_text()) if diag_file.exists() else {}
    in_range = range(sizes.first_seed, sizes.first_seed + sizes.seeds)
    missing = sorted({r["seed"] for r in latest if r["rule"] == "pretrained" and r["seed"] in in_range
                      and str(r["seed"]) not in diag})
    if missing:
        for done in shard(diagnose_seed, missing, backend, (sizes, tasks, str(out)), _init_worker, init):
            if done.error is not None:
                raise done.error
            diag[str(done.item)] = done.value
        diag_file.write_text(json.dumps(diag, indent=1))


def latest_records(out: Path) -> list[dict]:
    """The evaluation records; a seed run twice (an interrupted run redone) counts once: its last records."""
    latest = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        latest[(r["seed"], r["rule"], r["round"])] = r
    return list(latest.values())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(Sizes):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    ap.add_argument("--rules", default=",".join(RULES), help=f"comma-separated, of {RULES}")
    ap.add_argument("--tasks", help="comma-separated (default MT10)")
    ap.add_argument("--out", default=str(BENCH_RUNS / "save"))
    add_fleet_args(ap)
    ap.add_argument("--section", default="save", help="BENCHMARKS.md section and figure names (save-confirm: a "
                    "confirmation on fresh seeds, --first-seed 10 --rules uniform,save_rollout)")
    ap.add_argument("--target", type=float, help="target success (default: the highest every rule reaches)")
    ap.add_argument("--report-only", action="store_true", help="no new runs: render what results.jsonl holds")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md and figures alone")
    args = ap.parse_args(argv)
    from vigil.sim.metaworld_env import MT10_TASKS

    sizes = Sizes(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sizes)})
    rules = args.rules.split(",")
    if unknown := [r for r in rules if r not in RULE_OF]:
        raise SystemExit(f"--rules: unknown {unknown}; expected some of {RULES}")
    tasks = args.tasks.split(",") if args.tasks else list(MT10_TASKS)
    out = Path(args.out)
    run = run_info()
    if not args.report_only:
        out.mkdir(parents=True, exist_ok=True)
        measure(args, sizes, rules, tasks, out)
    elif not (out / "results.jsonl").exists():
        raise SystemExit(f"no raw results in {out}: run the benchmark without --report-only first")
    latest = latest_records(out)
    in_range = range(sizes.first_seed, sizes.first_seed + sizes.seeds)
    diag = json.loads((out / "diagnosis.json").read_text()) if (out / "diagnosis.json").exists() else {}
    diagnosis = diagnosis_text({k: v for k, v in diag.items() if int(k) in in_range}, latest, tasks)
    text, data = report(latest, sizes, rules, tasks, run, read_jsonl(out / "runs.jsonl"), args.target, diagnosis,
                        args.section)
    print(text)
    if not args.no_write:
        plots(data, rules, args.section)
        write_benchmarks(text, *markers(args.section))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
