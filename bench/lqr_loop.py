"""The onboard IR-LQR learner with the simulator in the loop, against the offline learner (issue 6 item 4).

Each trial draws one prior model (the bundle `vigil bundle lqr --learner irlqr --seed S` writes) and one
noise sequence (the sim robot's: `LinearEnv.reset(seed)`), and runs the same learner twice on them:

    offline   the training learner (`vigil.training.irlqr.IRLQR`, the study's `run_trial`) in process
    loop      `vigil serve` (a child process) with the learner bundle, the sim robot (sim/robot.py
              run_episodes, lockstep) over real ZeroMQ sockets; the runtime learns per session, computes
              each gain on its worker thread and swaps it in between ticks

Both are scored against the oracle LQR on the same noise (regret against the same-noise oracle, the
study's `regret_crn`), together with the prior's fixed LQR (offline) for reference. Reported: final regret
of both side by side and their paired difference, gain swaps, fallbacks and stability stops counted on the
operator stream, the learner's update time off the hot path and how many ticks each new gain took to be
adopted, and the loop's tick latency.

Raw results: bench/out/lqr_loop_<system>.json; the section between the `lqr-loop-<system>` markers of
BENCHMARKS.md and docs/figures/lqr_loop_regret_<system>.png are rendered from them (`--report-only` renders
them again without measuring).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.lqr_loop           # make bench-lqr-loop (about a minute)
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.lqr_loop --trials 3 --no-write   # smoke check
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from bench.common import (
    FIGURES,
    OUT,
    as_numbers,
    markers,
    pyplot,
    raw_copy,
    read_raw,
    run_info,
    save_figure,
    section,
    write_benchmarks,
    write_raw,
    written_by,
)
from vigil.policies.irlqr import dlqr_cross
from vigil.runtime.launch import LaunchError, start_serve
from vigil.runtime.stream import subscribe
from vigil.sim.envs import LinearEnv
from vigil.sim.linear import SYSTEMS, stage_cost
from vigil.sim.robot import SimConfig, run_episodes
from vigil.training.irlqr import IRLQR, PUBLISHED, LearnerSpec
from vigil.training.lqr import export_prior_lqr, prior_of
from vigil.training.lqr_baselines import Oracle
from vigil.training.lqr_study import paired_interval, run_trial
from vigil.wire.protocol import STREAM_KINDS, decode


def raw_path(system: str) -> Path:
    return OUT / f"lqr_loop_{system}.json"


def section_name(system: str) -> str:
    """One BENCHMARKS.md section per system."""
    return f"lqr-loop-{system}"


NOISE_SEED = 1000  # trial i plays noise seed NOISE_SEED + i (the prior is seed + i)


class Fixed(IRLQR):
    """The prior controller: the LQR of the prior model, never updated."""

    def observe(self, x, u, x_next) -> bool:
        return False


def onboard_schedule(system, spec: LearnerSpec, noise: np.ndarray, lag: int = 1) -> np.ndarray:
    """The training learner on the runtime's schedule, in process: it sees float32 observations and actions
    (the wire's), and a gain computed from the snapshot of tick t is first used at tick t + lag (the runtime
    adopts between ticks; lag 1 when the computation ends before the next observation arrives)."""
    learner = spec.learner()
    x, costs, pending = system.x0.astype(float).copy(), np.zeros(len(noise)), None
    for t in range(len(noise)):
        if pending is not None and t >= pending[0]:
            learner.adopt(pending[1], pending[2])
            pending = None
        x32 = x.astype(np.float32).astype(float)
        u = (-learner.gain() @ x32).astype(np.float32).astype(float)
        costs[t] = stage_cost(system, x, u)
        x_next = system.A @ x + system.B @ u + noise[t]
        if learner.observe(x32, u, x_next.astype(np.float32).astype(float)) and pending is None:
            V, S, K, logdet = learner.snapshot()
            pending = (t + 1 + lag, learner.compute(V, S, K), logdet)
        x = x_next
    return costs


def offline(system, spec: LearnerSpec, noise: np.ndarray) -> dict:
    steps = len(noise)
    zeros = np.zeros((steps, system.m))
    learner = spec.learner()
    trial = run_trial(system, learner, noise, zeros, np.inf)
    oracle = run_trial(system, Oracle(system.A, system.B, system.Q, system.R, spec.config), noise, zeros, np.inf)
    prior = Fixed(spec.A0, spec.B0, system.Q, system.R, spec.config)
    prior._K = dlqr_cross(spec.A0, spec.B0, system.Q, system.R)
    fixed = run_trial(system, prior, noise, zeros, np.inf)
    return {"costs": trial.costs, "oracle": oracle.costs, "prior": fixed.costs, "epochs": trial.epochs,
            "lag1": onboard_schedule(system, spec, noise),
            "fallbacks": trial.fallbacks, "guarded": trial.guarded}


def in_the_loop(system_name: str, bundle: Path, noise_seed: int, steps: int, workdir: Path, mode: str) -> dict:
    """`vigil serve` with the bundle, the sim robot over tcp, the operator stream watched throughout."""
    served = start_serve(bundle, workdir, env={"OMP_NUM_THREADS": "1"}, telemetry_s=0.2, log_level="WARNING",
                         mode=mode)
    sub = subscribe(zmq.Context.instance(), served.operator_endpoint)
    events: list[tuple[str, dict, str]] = []

    def pump(timeout_ms: int) -> bool:
        if not sub.poll(timeout_ms):
            return False
        frames = sub.recv_multipart()
        msg = decode(frames[1:], kinds=STREAM_KINDS)
        events.append((frames[0].decode(), dict(msg.meta), msg.robot))
        return True

    try:
        deadline = time.monotonic() + 60
        while not any(t == "telemetry" for t, _, _ in events):  # subscribed: the stream reaches us
            if not served.alive() or time.monotonic() > deadline:
                raise LaunchError(f"no telemetry from vigil serve\n{served.log()}")
            pump(200)
        env_ = LinearEnv(SYSTEMS[system_name](), horizon=steps)
        cumulative: list[float] = []
        stats = run_episodes(env_, SimConfig(served.robot_endpoint, "sim-0", 1, steps, noise_seed, mode),
                             on_step=lambda s: cumulative.append(s.cost))[0]
        while not any(m.get("event") == "disconnected" for t, m, _ in events if t == "telemetry"):
            if not pump(5000):
                break
        while pump(100):
            pass
        counters = served.stop(timeout_s=30)
    finally:
        if served.alive():
            served.kill()
        sub.close(linger=0)
    gains = [m["values"] for t, m, _ in events if t == "telemetry" and m.get("event") == "gain"]
    alerts = [m for t, m, _ in events if t.startswith("alert.")]
    costs = np.diff(np.concatenate([[0.0], cumulative]))
    lat = np.asarray(stats.latency_us)
    return {"costs": costs, "epochs": len(gains), "fallbacks": sum(bool(g["fallback"]) for g in gains),
            "guarded": sum(bool(g["guarded"]) for g in gains),
            "fallback_alerts": sum(a.get("monitor") == "learner" for a in alerts),
            "stability_stops": sum(a.get("monitor") == "stability" for a in alerts),
            "runtime_safe": stats.runtime_safe, "robot_safe": stats.robot_safe,
            "update_ms": [g["update_ms"] for g in gains], "delay_ticks": [g["delay_ticks"] for g in gains],
            "latency_us": lat.tolist(), "gain_swaps_counter": counters.get("gain_swaps", 0),
            "oracle_cost": stats.oracle_cost}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every trial offline and in the loop; the raw results the section and the figure are rendered from."""
    run, t0 = run_info(env="OMP_NUM_THREADS=1"), time.monotonic()
    system = SYSTEMS[args.system]()
    config = PUBLISHED[args.system]
    relative = (args.system == "aircraft-pitch") if args.prior is None else args.prior == "relative"
    std = config.prior_std if args.prior_std is None else args.prior_std
    trials = []
    with tempfile.TemporaryDirectory(prefix="lqr-loop-") as tmp:
        for i in range(args.trials):
            seed, noise_seed = args.seed + i, NOISE_SEED + args.seed + i
            A0, B0 = prior_of(system, std, relative, seed)
            spec = LearnerSpec("irlqr", A0, B0, system.Q, system.R, config)
            env = LinearEnv(system, horizon=args.steps)
            env.reset(noise_seed)  # the sim robot's noise sequence, drawn the way the robot draws it
            off = offline(system, spec, env.noise.copy())
            workdir = Path(tmp) / f"trial{i}"
            workdir.mkdir()
            bundle = workdir / "bundle"
            export_prior_lqr(args.system, bundle, std, relative, seed, learner=True)
            loop = in_the_loop(args.system, bundle, noise_seed, args.steps, workdir, args.mode)
            if abs(loop["oracle_cost"] - off["oracle"].sum()) > 1e-6 * max(1.0, off["oracle"].sum()):
                raise AssertionError("the robot's noise is not the offline noise")  # same sequence, by construction
            trials.append({"trial": i, "prior_seed": seed, "noise_seed": noise_seed, "offline": off, "loop": loop})
            r_off = np.sum(off["costs"] - off["oracle"])
            r_lag = np.sum(off["lag1"] - off["oracle"])
            r_loop = np.sum(loop["costs"] - off["oracle"])
            print(f"trial {i}: regret offline {r_off:10.4g}  offline, onboard schedule {r_lag:10.4g}  "
                  f"loop {r_loop:10.4g}  epochs {off['epochs']}/{loop['epochs']}  "
                  f"fallbacks {off['fallbacks']}/{loop['fallbacks']}  safe {loop['runtime_safe']}", flush=True)
    return {"run": run, "seconds": time.monotonic() - t0, "system": args.system, "steps": args.steps,
            "seed": args.seed, "trials": trials, "mode": args.mode, "prior": "relative" if relative else "absolute",
            "prior_std": std, "config": {k: getattr(config, k) for k in ("lam", "g1", "g2", "fallback_ratio",
                                                                         "epoch_factor", "stability_guard")}}


# ------------------------------------------------------------------------------------------------------

def curves(data: dict, which: str) -> np.ndarray:
    out = []
    for t in data["trials"]:
        oracle = t["offline"]["oracle"]
        costs = t["loop"]["costs"] if which == "loop" else t["offline"][{"offline": "costs"}.get(which, which)]
        out.append(np.cumsum(np.asarray(costs, float) - np.asarray(oracle, float)))
    return np.array(out)


def summary(data: dict) -> dict:
    off, loop, prior = curves(data, "offline")[:, -1], curves(data, "loop")[:, -1], curves(data, "prior")[:, -1]
    lag = curves(data, "lag1")[:, -1]
    d = loop - off
    rng = np.random.default_rng(0)
    T = data["trials"]
    upd = np.concatenate([t["loop"]["update_ms"] for t in T]) if T else np.zeros(0)
    delay = np.concatenate([t["loop"]["delay_ticks"] for t in T]) if T else np.zeros(0)
    lat = np.concatenate([t["loop"]["latency_us"] for t in T])
    rel = np.abs(d) / np.maximum(np.abs(off), 1e-9)
    return {
        "regret_offline": {"mean": float(off.mean()), "median": float(np.median(off)),
                           "iqr": np.percentile(off, [25, 75]).tolist()},
        "regret_loop": {"mean": float(loop.mean()), "median": float(np.median(loop)),
                        "iqr": np.percentile(loop, [25, 75]).tolist()},
        "regret_prior": {"mean": float(prior.mean()), "median": float(np.median(prior))},
        "diff_mean": paired_interval(d, np.mean, rng), "diff_median": paired_interval(d, np.median, rng),
        "regret_lag1": {"mean": float(lag.mean()), "median": float(np.median(lag)),
                        "iqr": np.percentile(lag, [25, 75]).tolist()},
        "lag_diff_mean": paired_interval(lag - off, np.mean, rng),
        "lag_diff_median": paired_interval(lag - off, np.median, rng),
        "loop_vs_lag_rel": [float(v) for v in np.percentile(np.abs(loop - lag) / np.maximum(np.abs(lag), 1e-9),
                                                            [50, 100])],
        "loop_vs_lag_within_1pct": int((np.abs(loop - lag) <= 0.01 * np.maximum(np.abs(lag), 1e-9)).sum()),
        "rel_diff_median": float(np.median(rel)), "rel_diff_max": float(rel.max()),
        "within_1pct": int((rel <= 0.01).sum()),
        "epochs": [int(sum(t["offline"]["epochs"] for t in T)), int(sum(t["loop"]["epochs"] for t in T))],
        "fallbacks": [int(sum(t["offline"]["fallbacks"] for t in T)), int(sum(t["loop"]["fallbacks"] for t in T))],
        "guarded": [int(sum(t["offline"]["guarded"] for t in T)), int(sum(t["loop"]["guarded"] for t in T))],
        "fallback_alerts": int(sum(t["loop"]["fallback_alerts"] for t in T)),
        "stability_stops": int(sum(t["loop"]["stability_stops"] for t in T)),
        "runtime_safe": int(sum(t["loop"]["runtime_safe"] for t in T)),
        "robot_safe": int(sum(t["loop"]["robot_safe"] for t in T)),
        "update_ms": {"median": float(np.median(upd)), "p99": float(np.percentile(upd, 99)), "max": float(upd.max())}
        if len(upd) else None,
        "delay_ticks": {"median": float(np.median(delay)), "max": int(delay.max()),
                        "one": int((delay == 1).sum()), "n": int(len(delay))} if len(delay) else None,
        "latency_us": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                       "max": float(lat.max())},
    }


def plot(data: dict[str, Any], path: Path) -> None:
    """Median and IQR of the regret curves: offline, offline on the onboard schedule, loop, the prior's LQR."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    t = np.arange(1, data["steps"] + 1)
    for which, label, style in (("offline", "IR-LQR offline (training learner)", "-"),
                                ("lag1", "IR-LQR offline, onboard schedule (adopt 1 tick later)", "-."),
                                ("loop", "IR-LQR onboard: vigil serve + sim over ZeroMQ", "--"),
                                ("prior", "prior's LQR, fixed (offline)", ":")):
        c = curves(data, which)
        med = np.median(c, axis=0)
        q1, q3 = np.percentile(c, [25, 75], axis=0)
        line, = ax.plot(t, med, style, lw=1.5, label=label)
        ax.fill_between(t, q1, q3, color=line.get_color(), alpha=0.15, lw=0)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("step T")
    ax.set_ylabel("regret against the oracle on the same noise")
    ax.set_yscale("symlog", linthresh=10.0)
    ax.set_title(f"{data['system']}: {len(data['trials'])} trials (same prior and noise in both), median and IQR\n"
                 f"prior {data['prior']} std {data['prior_std']:g}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def fmt(x: float) -> str:
    return f"{x:.4g}"


def ci(t: Sequence[float]) -> str:
    """A paired difference and its 95% interval."""
    return f"{fmt(t[0])} [{fmt(t[1])}, {fmt(t[2])}]"


def med_iqr(r: dict[str, Any]) -> str:
    return f"{fmt(r['median'])} [{fmt(r['iqr'][0])}, {fmt(r['iqr'][1])}]"


def render(data: dict[str, Any]) -> str:
    """The section, from the raw results alone."""
    s, c, system, seed, n = summary(data), data["config"], data["system"], data["seed"], len(data["trials"])
    lines = [f"## IR-LQR on board, {system}: the simulator in the loop against the offline learner (issue 6 item 4)",
             "",
             written_by(data["run"], seconds=data["seconds"]),
             f"- {n} trials × {data['steps']} steps; trial i: prior `vigil bundle lqr --system {system} --learner "
             f"irlqr --prior {data['prior']} --prior-std {data['prior_std']:g} --seed {seed}+i`, noise seed "
             f"{NOISE_SEED + seed}+i; lam {c['lam']:g}, g1 {c['g1']:g}, g2 {c['g2']:g}, guard "
             f"{'on' if c['stability_guard'] else 'off'}; the sim robot in {data['mode']} mode over tcp.",
             "",
             "| | offline | offline, onboard schedule | loop | loop − offline, paired [95% CI] | "
             "schedule − offline, paired [95% CI] |",
             "|---|---:|---:|---:|---:|---:|",
             f"| final regret: mean | {fmt(s['regret_offline']['mean'])} | {fmt(s['regret_lag1']['mean'])} | "
             f"{fmt(s['regret_loop']['mean'])} | {ci(s['diff_mean'])} | {ci(s['lag_diff_mean'])} |",
             f"| median [IQR] | {med_iqr(s['regret_offline'])} | {med_iqr(s['regret_lag1'])} | "
             f"{med_iqr(s['regret_loop'])} | {ci(s['diff_median'])} | {ci(s['lag_diff_median'])} |",
             f"| epochs (gain swaps), all trials | {s['epochs'][0]} | | {s['epochs'][1]} | | |",
             f"| fallbacks (guarded) | {s['fallbacks'][0]} ({s['guarded'][0]}) | | {s['fallbacks'][1]} "
             f"({s['guarded'][1]}) | | |", "",
             f"- Per trial, the loop against the offline learner on the onboard schedule: |difference| / |regret| "
             f"median {s['loop_vs_lag_rel'][0]:.2g}, max {s['loop_vs_lag_rel'][1]:.2g}; "
             f"{s['loop_vs_lag_within_1pct']} of {n} trials within 1%. Against the offline learner as studied: "
             f"median {s['rel_diff_median']:.2%}, max {s['rel_diff_max']:.2%}.",
             f"- The prior's fixed LQR on the same noise: regret mean {fmt(s['regret_prior']['mean'])}, median "
             f"{fmt(s['regret_prior']['median'])}.",
             f"- On the operator stream (loop): {s['epochs'][1]} `gain` telemetry events, {s['fallback_alerts']} "
             f"stored `learner` warn alerts (one per fallback), {s['stability_stops']} `stability` stop alerts; "
             f"safe actions sent by the runtime {s['runtime_safe']}, applied by the robot on its own "
             f"{s['robot_safe']}."]
    if s["update_ms"]:
        lines += [f"- Learner update off the hot path (one gain computation on the worker thread): median "
                  f"{s['update_ms']['median']:.2f} ms, p99 {s['update_ms']['p99']:.2f} ms, max "
                  f"{s['update_ms']['max']:.2f} ms; {s['delay_ticks']['one']} of {s['delay_ticks']['n']} gains were "
                  f"first used at the tick after their snapshot (max {s['delay_ticks']['max']} ticks later).",
                  f"- Tick latency seen by the robot (obs sent to act received, every tick of every trial): p50 "
                  f"{s['latency_us']['p50']:.0f} µs, p99 {s['latency_us']['p99']:.0f} µs, max "
                  f"{s['latency_us']['max']:.0f} µs."]
    lines += ["", f"Regret curves (median and IQR band): `docs/figures/lqr_loop_regret_{system}.png`."]
    return section(section_name(system), lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--system", default="aircraft-pitch", choices=sorted(SYSTEMS))
    p.add_argument("--trials", type=int, default=10, help="trials (prior + noise sequence), each a vigil serve")
    p.add_argument("--steps", type=int, default=200, help="steps per trial")
    p.add_argument("--seed", type=int, default=0, help="trial i: prior seed seed+i, noise seed 1000+seed+i")
    p.add_argument("--prior", choices=("relative", "absolute"), help="default: the study's choice per system")
    p.add_argument("--prior-std", type=float, help="default: the published std")
    p.add_argument("--mode", choices=("realtime", "lockstep"), default="realtime",
                   help="realtime: the robot keeps the system's own rate (20 Hz aircraft), so each gain is adopted "
                        "at the next tick; lockstep: as fast as round trips go, gains land a few ticks later")
    p.add_argument("--report-only", action="store_true", help="render the system's raw results again; measure nothing")
    p.add_argument("--no-write", action="store_true", help="print only: no BENCHMARKS.md, figure or raw JSON")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raw = raw_path(args.system)
    # a fresh run goes through JSON too, so it renders exactly what --report-only renders later
    data = as_numbers(read_raw(raw)["data"] if args.report_only else raw_copy(measure(args)))
    text = render(data)
    print(text)
    if not args.no_write:
        if not args.report_only:
            write_raw(raw, {"data": data, "summary": summary(data)})
        plot(data, FIGURES / f"lqr_loop_regret_{args.system}.png")
        write_benchmarks(text, *markers(section_name(args.system)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
