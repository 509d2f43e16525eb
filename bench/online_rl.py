"""Simulation to "real" through the runtime (issue 22): pretrain in simulation, deploy into a changed world driven by
a simulated robot in real time through `vigil serve`, learn online with `vigil learn`, and compare.

    PYTHONPATH=. .venv/bin/python -m bench.online_rl                 # make bench-online-rl
    PYTHONPATH=. .venv/bin/python -m bench.online_rl --ablations     # the study's choices, seeds x arms

1. Pretrain SAC on nominal Hopper-v5 (in process); its checkpoint, bundle and transitions (sim.db).
2. Reference: SAC trained as long in the "real" variant (the policy trained in that variant; the gap's top).
3. Arms, each a real deployment: `vigil serve --transitions --control-endpoint` serving the start bundle, a
   simulated robot in the "real" variant at the task's control rate (realtime, 125 Hz) reporting transitions,
   and `vigil learn` swapping every `every` updates. The learning curve is every episode's return from the log,
   against robot time and environment steps. Arms: online (warm start, replay seeded with simulation data),
   from scratch (a random start, nothing seeded), and with --ablations one change at a time.
4. The pretrained policy without learning, evaluated in the "real" variant (in process).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import BENCH_RUNS, FIGURES, markers, pyplot, run_info, save_figure, write_benchmarks, written_by

NAME = "online-rl"
BEGIN, END = markers(NAME)
OUT = BENCH_RUNS / "online_rl"
ENV = "Hopper-v5"
REAL = {"mass": 1.3, "friction": 0.7, "gain": 0.8, "latency": 1}  # heavier, slipperier, weaker, one step late
DEFAULTS = {"warm_start": True, "seed_replay": True, "utd": 1.0, "critic_warmup": 0, "truncation_terminal": False,
            "trials": 1, "keep": True, "algo": "sac"}
# the on-policy option: BPO pretrained in nominal simulation (vigil train bpo), learning through an exploring bundle;
# its critic refits to one rollout (10 epochs x 32 minibatches) before the actor moves
BPO_ARM = {"algo": "bpo", "seed_replay": False, "critic_warmup": 320}
BPO_PRETRAIN_STEPS = 200_000
# the long deployments' reference: SAC trained 200k steps in the real variant (seed 0)
LONG_REFERENCE = "real-200k-s0"
# the long deployments: `vigil learn`'s defaults (SAC), and the on-policy option
LONG_ARMS = {"critic warm-up 2000 updates": {"critic_warmup": 2000}, "BPO on-policy": BPO_ARM}
ABLATIONS = {
    "online (defaults)": {},  # the ablations' baseline; `vigil learn`'s defaults are now this + critic warm-up 2000
    "no warm start": {"warm_start": False},
    "no simulation data in the replay": {"seed_replay": False},
    "UTD 4": {"utd": 4.0},
    "UTD 8": {"utd": 8.0},
    "critic warm-up 2000 updates": {"critic_warmup": 2000},
    "truncation as terminal": {"truncation_terminal": True},
    # two trials: the learner stopped half way and restarted, replaying the first trial's data or not
    "two trials (data kept)": {"trials": 2},
    "two trials (data not kept)": {"trials": 2, "keep": False},
}


LABELS = {"online (defaults)": "baseline: warm start, simulation data in the replay, UTD 1, no critic warm-up",
          "critic warm-up 2000 updates": "critic warm-up 2000 updates (`vigil learn`'s default since)"}


def dynamics():
    from vigil.sim.envs import Dynamics

    return Dynamics(REAL["mass"], REAL["friction"], REAL["gain"], REAL["latency"])


def pretrained(seed: int, steps: int, real: bool = False) -> Path:
    from vigil.training.learn import pretrain

    out = OUT / f"{'real' if real else 'sim'}-s{seed}"
    if not (out / "returns.json").exists():
        pretrain(ENV, steps, out, seed=seed, dynamics=dynamics() if real else None, log_transitions=not real)
    return out


def bpo_pretrained(seed: int, steps: int) -> Path:
    """`vigil train bpo` on nominal Hopper-v5: actor.pt (actor, critic, normalisation) and its bundle."""
    from vigil.training.rl import config_for, run

    out = OUT / f"bpo-sim-s{seed}"
    if not (out / "provenance.json").exists():
        run(config_for("bpo", env=ENV, total_steps=steps, seed=seed), out)
    return out


def evaluate(bundle: Path, episodes: int = 10, seed: int = 1000) -> list[float]:
    """The bundle in the "real" variant, in process (as the runtime plays a gaussian bundle: its mean action; an
    exploring bundle with zero noise: its mean too)."""
    from vigil.policies.bundle import load_policy
    from vigil.sim.envs import GymEnv

    policy = load_policy(bundle, prefer_gpu=False)
    env = GymEnv(ENV, dynamics())
    out = []
    for k in range(episodes):
        obs, ret = env.reset(seed=seed + k), 0.0
        zero = {name: np.zeros_like(x) for name, x in policy.plan_inputs(np.random.default_rng(0)).items()}
        for _ in range(1000):
            action = np.clip(policy.infer(obs, zero).actions[0], -1, 1)
            r = env.step(action)
            ret += r.reward
            obs = r.obs
            if r.terminated or r.truncated:
                break
        out.append(ret)
    env.close()
    return out


def deploy(arm: str, change: dict, seed: int, sim_dir: Path, robot_steps: int, every: int, root: str = "arms"
           ) -> dict:
    """One deployment: runtime + learner + robot in the "real" variant for `robot_steps` steps at 125 Hz."""
    from vigil.runtime.launch import serving
    from vigil.sim.envs import GymEnv
    from vigil.sim.robot import SimConfig, run_episodes

    opts = {**DEFAULTS, **change}
    work = OUT / root / f"{arm.replace(' ', '_')}-s{seed}"
    if (work / "result.json").exists():  # a deployment of an earlier run: its summary from its files, as now made
        return {**json.loads((work / "result.json").read_text()), **summarise(work)}
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    start = sim_dir / "bundle"
    if opts["algo"] != "sac":
        sim_dir = bpo_pretrained(seed, BPO_PRETRAIN_STEPS)
        start = sim_dir / "bundle"
    if not opts["warm_start"]:  # a random actor: what a from-scratch learner would serve first
        from vigil.training.learn import pretrain

        pretrain(ENV, 1, work / "random", seed=seed, progress=False, log_transitions=False)
        start = work / "random" / "bundle"
    log = work / "transitions.db"
    t0 = time.monotonic()
    with serving(start, work / "serve", transitions=str(log), control_endpoint="tcp://127.0.0.1:0") as served:
        cmd = [sys.executable, "-m", "vigil.runtime.cli", "learn", "--transitions", str(log), "--bundle", str(start),
               "--out", str(work / "learner"), "--control", served.control_endpoint, "--every", str(every),
               "--utd", str(opts["utd"]), "--critic-warmup", str(opts["critic_warmup"]), "--seed", str(seed),
               "--learning-starts", "1000", "--algo", opts["algo"]]
        if opts["warm_start"]:
            cmd += ["--warm-start", str(sim_dir / ("sac.pt" if opts["algo"] == "sac" else "actor.pt"))]
        if opts["seed_replay"]:
            cmd += ["--seed-replay", str(sim_dir / "sim.db")]
        if opts["truncation_terminal"]:
            cmd += ["--truncation-terminal"]
        with open(work / "learn.out", "w") as fh:
            learner = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        env, steps, k = GymEnv(ENV, dynamics()), 0, 0
        late, second_trial = 0, opts["trials"] == 1
        try:
            while steps < robot_steps:
                if not second_trial and steps >= robot_steps // 2:  # a new trial: the learner stops and restarts
                    second_trial = True
                    learner.send_signal(signal.SIGINT)
                    learner.wait(120)
                    with open(work / "learn.out", "a") as fh:
                        learner = subprocess.Popen(cmd + ([] if opts["keep"] else ["--forget-replay"]), stdout=fh,
                                                   stderr=subprocess.STDOUT)
                stats = run_episodes(env, SimConfig(served.robot_endpoint, "hopper-real", 1, 1000, seed * 10_000 + k,
                                                    "realtime", 125.0, 1.0, transitions=True))
                steps += stats[0].steps
                late += stats[0].robot_safe  # replies that came after the robot's tick (it applied its fallback)
                k += 1
        finally:
            env.close()
            learner.send_signal(signal.SIGINT)
            try:
                learner.wait(120)
            except subprocess.TimeoutExpired:
                learner.kill()
        counters = served.stop()
    summary = summarise(work)
    final = {}
    if opts["algo"] != "sac" and summary["swaps"]:  # the last policy swapped in, by its mean (the deployment explored)
        final = {"final_mean": evaluate(Path(summary["last_bundle"])), "start_mean": evaluate(start)}
    result = {"arm": arm, "seed": seed, "wall_s": time.monotonic() - t0, **final, **summary,
              "late_replies": late, "runtime": {k: counters.get(k) for k in ("ticks",)}}
    (work / "result.json").write_text(json.dumps(result))
    return result


def summarise(work: Path) -> dict:
    """A deployment's record from its files: every episode's return and length from the transition log (all of
    it), the learner's swaps, and the runtime's deadline verdicts from its alert store (the robot's own count
    misses them: a late reply comes after its tick)."""
    import sqlite3

    from vigil.runtime.transitions import read_after

    returns, lengths, acc, running, after = [], [], 0.0, 0, 0
    while True:
        rows = read_after(work / "transitions.db", after, 100_000)
        if not len(rows["id"]):
            break
        after = int(rows["id"][-1])
        for rew, term, trunc in zip(rows["reward"], rows["terminated"], rows["truncated"], strict=True):
            acc += float(rew)
            running += 1
            if term or trunc:
                returns.append(acc)
                lengths.append(running)
                acc, running = 0.0, 0
    path = work / "learner" / "learn.jsonl"
    swaps = [json.loads(line)["swap"] for line in path.read_text().splitlines()] if path.exists() else []
    ok = [s for s in swaps if s["ok"]]
    db = sqlite3.connect(f"file:{work / 'serve' / 'alerts.db'}?mode=ro", uri=True)
    try:
        deadline = db.execute("SELECT count(*) FROM alerts WHERE monitor = 'deadline'").fetchone()[0]
    finally:
        db.close()
    return {"returns": returns, "lengths": lengths, "swaps": len(ok),
            "rollbacks": len([s for s in swaps if s["why"].startswith("rollback")]),
            "last_bundle": ok[-1]["bundle"] if ok else "", "deadline_verdicts": deadline}


def ms(v) -> str:
    """Mean ± std (over seeds) of a table cell."""
    v = np.asarray(v, float)
    return f"{np.nanmean(v):.0f} ± {np.nanstd(v):.0f}" if len(v) else "–"


def curve(result: dict, bins: np.ndarray) -> np.ndarray:
    """Mean return of the episodes ending in each bin of environment steps."""
    ends = np.cumsum(result["lengths"])
    rets = np.asarray(result["returns"])
    out = np.full(len(bins) - 1, np.nan)
    for i in range(len(bins) - 1):
        m = (ends > bins[i]) & (ends <= bins[i + 1])
        if m.any():
            out[i] = rets[m].mean()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrain-steps", type=int, default=50_000)
    ap.add_argument("--robot-steps", type=int, default=20_000, help="environment steps per deployment (125 Hz)")
    ap.add_argument("--every", type=int, default=2000, help="updates between swaps")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--ablations", action="store_true", help="every ablation arm too")
    ap.add_argument("--arms", help="comma-separated ablation arms to run besides the defaults (names as in the "
                    "table, e.g. 'critic warm-up 2000 updates')")
    ap.add_argument("--bpo", action="store_true", help="the on-policy arm too (BPO, pretrained with vigil train bpo)")
    ap.add_argument("--long", type=float, default=0.0, metavar="MINUTES",
                    help="also long deployments (seed 0) of `vigil learn`'s defaults (and BPO with --bpo): MINUTES "
                         "of robot time each")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    names = list(ABLATIONS) if args.ablations else ["online (defaults)", "critic warm-up 2000 updates"]
    arms = {name: ABLATIONS[name] for name in names}
    for name in (args.arms.split(",") if args.arms else []):
        if name not in ABLATIONS:
            raise SystemExit(f"--arms: unknown arm {name!r}; expected some of {list(ABLATIONS)}")
        arms[name] = ABLATIONS[name]
    arms = {**arms, "from scratch": {"warm_start": False, "seed_replay": False}}
    if args.bpo:
        arms["BPO on-policy"] = BPO_ARM
    results, refs = [], {}
    for seed in range(args.seeds):
        sim = pretrained(seed, args.pretrain_steps)
        real = pretrained(seed, args.pretrain_steps, real=True)
        refs[seed] = {"pretrained in the real variant": evaluate(sim / "bundle"),
                      "trained in the real variant": evaluate(real / "bundle"),
                      "pretrained, nominal simulation": json.loads((sim / "returns.json").read_text())[-10:]}
        for arm, change in arms.items():
            results.append(deploy(arm, change, seed, sim, args.robot_steps, args.every))
            print(f"{arm} s{seed}: last 10 episodes {np.mean(results[-1]['returns'][-10:]):.0f}", flush=True)
    long: dict[str, dict] = {}  # arm -> its long deployment (seed 0), run now or by an earlier run
    for arm, change in LONG_ARMS.items():
        if args.long and (arm != "BPO on-policy" or args.bpo):
            long[arm] = deploy(arm, change, 0, pretrained(0, args.pretrain_steps), int(args.long * 60 * 125),
                               args.every, root="long")
        elif (OUT / "long" / f"{arm.replace(' ', '_')}-s0" / "result.json").exists():
            work = OUT / "long" / f"{arm.replace(' ', '_')}-s0"
            long[arm] = {**json.loads((work / "result.json").read_text()), **summarise(work)}
    if args.long and not (OUT / LONG_REFERENCE / "bundle").exists():  # about 40 min on one core
        from vigil.training.learn import pretrain

        pretrain(ENV, 200_000, OUT / LONG_REFERENCE, seed=0, dynamics=dynamics(), log_transitions=False)
    if long and (OUT / LONG_REFERENCE / "bundle").exists():  # the long runs' reference
        refs[0]["trained longer in the real variant"] = evaluate(OUT / LONG_REFERENCE / "bundle")
    text = report(results, refs, args, run_info(), time.monotonic() - t0, long)
    print(text)
    if not args.no_write:
        plot(results, refs, args)
        if long:
            plot_long(long, refs)
        write_benchmarks(text, BEGIN, END)
    return 0


def report(results: list[dict], refs: dict, args, run: dict, seconds: float, long: dict[str, dict] | None = None
           ) -> str:
    pre = [np.mean(r["pretrained in the real variant"]) for r in refs.values()]
    top = [np.mean(r["trained in the real variant"]) for r in refs.values()]
    nominal = [np.mean(r["pretrained, nominal simulation"]) for r in refs.values()]
    minutes = args.robot_steps / 125 / 60
    lines = [BEGIN, "## Online RL through the runtime: simulation to a changed \"real\" Hopper (issue 22)", "",
             written_by(run, seconds=seconds),
             f"- \"Real\" Hopper-v5: mass x{REAL['mass']}, friction x{REAL['friction']}, actuator gain "
             f"x{REAL['gain']}, actions one step late. SAC pretrained {args.pretrain_steps} steps in nominal "
             f"simulation; deployments of {args.robot_steps} robot steps ({minutes:.1f} min of robot time at 125 Hz, "
             f"realtime) through `vigil serve`, `vigil learn` swapping every {args.every} updates. Seeds: "
             f"{args.seeds}.", "",
             "| policy | return (last 10 episodes) | gap closed |", "|---|---:|---:|",
             f"| pretrained, in nominal simulation | {ms(nominal)} | |",
             f"| pretrained, in the real variant (no learning) | {ms(pre)} | 0% |",
             f"| trained {args.pretrain_steps} steps in the real variant (reference) | {ms(top)} | 100% |"]
    gap = np.mean(top) - np.mean(pre)
    for arm in dict.fromkeys(r["arm"] for r in results if r["arm"] != "BPO on-policy"):
        rs = [r for r in results if r["arm"] == arm]
        last = [np.mean(r["returns"][-10:]) for r in rs]
        closed = f"{(np.mean(last) - np.mean(pre)) / gap:.0%}" if gap > 0 else "– (the reference is not better)"
        lines.append(f"| {LABELS.get(arm, arm)}: swaps {sum(r['swaps'] for r in rs)}, "
                     f"rollbacks {sum(r['rollbacks'] for r in rs)}, "
                     f"deadline verdicts {sum(r['deadline_verdicts'] for r in rs)} | {ms(last)} | {closed} |")
    lines += ["", f"Mean ± std over {args.seeds} seed(s) of each arm's mean return over its last 10 episodes. Each "
              "ablation changes one choice of the baseline. The seeds were played over two sessions in which other "
              "heavy work (tests, other benchmarks) often shared the 2 cores with a deployment. An "
              f"arm's swaps count its updates / {args.every}: with UTD 4 the learner could not keep up with the robot "
              "on two cores, so it made fewer updates than asked. Deadline verdicts are counted in the runtime's alert "
              "store (until this run the table counted the robot's replies, which missed the late ones: 3 then).",
              "", "Figure: docs/figures/online_rl.png (return against robot time)."]
    bpo = [r for r in results if r["arm"] == "BPO on-policy"]
    if bpo:
        lines += bpo_table(bpo, minutes)
    if long:
        lines += long_table(long, refs)
    lines.append(END)
    return "\n".join(lines)


def windows(result: dict, minutes: float = 5.0) -> list[tuple[float, float, float, int]]:
    """(start, end) minutes of robot time and the mean return of the episodes that ended in each window."""
    ends = np.cumsum(result["lengths"]) / 125 / 60
    rets = np.asarray(result["returns"])
    out, t = [], 0.0
    while t + 0.9 * minutes <= ends[-1]:  # whole windows (the last episode may end just past the deployment)
        m = (ends > t) & (ends <= t + minutes)
        out.append((t, t + minutes, float(rets[m].mean()) if m.any() else float("nan"), int(m.sum())))
        t += minutes
    return out


def long_table(long: dict[str, dict], refs: dict) -> list[str]:
    """The long deployments (seed 0): return in 5-minute windows of robot time."""
    pre, top = np.mean(refs[0]["pretrained in the real variant"]), np.mean(refs[0]["trained in the real variant"])
    longer = refs[0].get("trained longer in the real variant")
    best = max(top, np.mean(longer)) if longer else top
    sac, bpo = long.get("critic warm-up 2000 updates"), long.get("BPO on-policy")
    total = max(sum(r["lengths"]) for r in long.values()) / 125 / 60
    lines = ["", f"### Long deployments: seed 0, {total:.0f} min of robot time", "",
             f"SAC with `vigil learn`'s defaults (warm start, simulation data in the replay, critic warm-up 2000 "
             f"updates, UTD 1, a swap every 2000 updates){' and BPO on-policy (as above)' if bpo else ''}. Seed 0's "
             f"pretrained SAC scores {pre:.0f} in the real variant without learning (10 episodes, mean action); SAC "
             f"trained 50k steps in the real variant {top:.0f}" + (f", 200k steps {np.mean(longer):.0f}" if longer
                                                                  else "")
             + f". Gap closed is against the best of these ({best:.0f}); the gap is {best - pre:.0f} points, less than "
             "the spread of 10-episode evaluations, so read the returns rather than the percentages. An episode's "
             "return is about 1 per step for staying upright plus the forward speed: 1000-step episodes returning "
             "about 1000 stand still."]
    for name, r in long.items():
        lines.append(f"- {name}: swaps {r['swaps']}, rollbacks {r['rollbacks']}, deadline verdicts "
                     f"{r['deadline_verdicts']}"
                     + (f"; mean action before {np.mean(r['start_mean']):.0f}, after {np.mean(r['final_mean']):.0f}"
                        if "final_mean" in r else "") + ".")
    head = "| robot time (min) | SAC episodes | SAC mean return | SAC gap closed |"
    rule = "|---|---:|---:|---:|"
    if bpo:
        head, rule = head + " BPO episodes | BPO mean return (exploring) |", rule + "---:|---:|"
    lines += ["", head, rule]
    ws = windows(sac) if sac else []
    wb = windows(bpo) if bpo else []
    for i in range(max(len(ws), len(wb))):
        a, b = (ws[i] if i < len(ws) else wb[i])[:2]
        row = f"| {a:.0f}–{b:.0f} |"
        if i < len(ws):
            r, n = ws[i][2], ws[i][3]
            row += f" {n} | {r:.0f} | " + (f"{(r - pre) / (best - pre):.0%}" if best > pre else "–") + " |"
        else:
            row += " | | |"
        if bpo:
            row += f" {wb[i][3]} | {wb[i][2]:.0f} |" if i < len(wb) else " | |"
        lines.append(row)
    lines += ["", "Figure: docs/figures/online_rl_long.png."]
    return lines


def plot_long(long: dict[str, dict], refs: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, r) in enumerate(long.items()):
        ends = np.cumsum(r["lengths"]) / 125 / 60
        ax.plot(ends, r["returns"], lw=0.4, alpha=0.3, color=f"C{i}")
        w = windows(r, 2.0)
        ax.plot([(a + b) / 2 for a, b, _, _ in w], [x for _, _, x, _ in w], color=f"C{i}", marker=".",
                label=f"{'SAC, vigil learn defaults' if name.startswith('critic') else name}: 2-minute means")
    ax.axhline(np.mean(refs[0]["pretrained in the real variant"]), ls="--", c="k", lw=0.8,
               label="SAC pretrained, no learning")
    ax.axhline(np.mean(refs[0]["trained in the real variant"]), ls=":", c="g", lw=0.8,
               label="SAC trained 50k steps in the real variant")
    if refs[0].get("trained longer in the real variant"):
        ax.axhline(np.mean(refs[0]["trained longer in the real variant"]), ls="-.", c="g", lw=0.8,
                   label="SAC trained 200k steps in the real variant")
    ax.set_xlabel("robot time (min, 125 Hz)")
    ax.set_ylabel("episode return")
    ax.set_title("long deployments through vigil serve + vigil learn (seed 0)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, FIGURES / "online_rl_long.png", dpi=100)


def bpo_table(rs: list[dict], minutes: float) -> list[str]:
    """The on-policy option against its own start: BPO's pretraining is not SAC's, so it has its own baseline."""
    start = [np.mean(r["start_mean"]) for r in rs if "start_mean" in r]
    final = [np.mean(r["final_mean"]) for r in rs if "final_mean" in r]
    first = [np.mean(r["returns"][:10]) for r in rs]
    last = [np.mean(r["returns"][-10:]) for r in rs]
    return ["", f"### The on-policy option: `vigil learn --algo bpo` ({len(rs)} seed(s), {minutes:.1f} min each)", "",
            f"BPO pretrained {BPO_PRETRAIN_STEPS} steps on nominal Hopper-v5 (`vigil train bpo`), deployed into the "
            "same \"real\" Hopper through an exploring bundle (the runtime samples and logs each action's "
            "log-probability), one BPO update per 2048 transitions, swapped in after each; the critic refits to one "
            "rollout before the actor moves.", "",
            "| BPO policy | return |", "|---|---:|",
            f"| pretrained, its mean action in the real variant (no learning; 10 episodes) | {ms(start)} |",
            f"| deployment's first 10 episodes (exploring) | {ms(first)} |",
            f"| deployment's last 10 episodes (exploring) | {ms(last)} |",
            f"| the last policy swapped in, its mean action in the real variant (10 episodes) | {ms(final)} |",
            "", f"Swaps {sum(r['swaps'] for r in rs)}, rollbacks {sum(r['rollbacks'] for r in rs)}, deadline verdicts "
            f"{sum(r['deadline_verdicts'] for r in rs)}. The deployment's episodes explore (sampled actions), so they "
            "are compared with each other; the mean-action rows compare the policy before and after."]


def plot(results: list[dict], refs: dict, args) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, args.robot_steps, 21)
    t = (bins[1:] / 125 / 60)
    colours = plt.get_cmap("tab20").colors
    for i, arm in enumerate(dict.fromkeys(r["arm"] for r in results)):
        c = np.array([curve(r, bins) for r in results if r["arm"] == arm])
        bpo = arm == "BPO on-policy"
        ax.plot(t, np.nanmean(c, 0), label=arm + (" (its own start, exploring)" if bpo else ""),
                color="k" if bpo else colours[2 * i % 20 + (2 * i // 20)], ls="-." if bpo else "-", lw=1.2)
    ax.axhline(np.mean([np.mean(r["pretrained in the real variant"]) for r in refs.values()]), ls="--", c="k",
               lw=0.8, label="pretrained, no learning")
    ax.axhline(np.mean([np.mean(r["trained in the real variant"]) for r in refs.values()]), ls=":", c="g",
               lw=0.8, label="trained in the real variant")
    ax.set_xlabel("robot time (min, 125 Hz)")
    ax.set_ylabel("episode return")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, FIGURES / "online_rl.png", dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
