"""IR-LQR against its baselines on aircraft pitch and the 2-D UAV (issue 6; docs/lqr.md, docs/algorithms.md).

Every method runs on the same trials (one prior draw + one noise sequence each: common random numbers), so
differences are paired. Parts of the output, all from one run:

    priors    how often the prior's own LQR destabilises the true system (1000 draws), absolute against
              relative perturbation: the aircraft pitfall of issue 6
    main      40 trials x 200 steps, published settings, both prior modes, every baseline, plus IR-LQR
              without the stability guard (the published fallback alone)
    long      10 trials x 10^4 steps: growth exponent of regret against the same-noise oracle over
              T in [1e2, 1e4] (least squares on log-log of the mean curve)
    sweep     g1, g2 over 1e-5 .. 1: where the intrinsic reward starts to change the gain and the regret

Raw results: bench/out/lqr.json (with the regret bands the figures draw); the section between the `lqr`
markers of BENCHMARKS.md and docs/figures/lqr_*.png are rendered from them (`--report-only` renders them
again without measuring).

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.lqr            # make bench-lqr (a few minutes on 2 cores)
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.lqr --quick --no-write      # smoke check
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

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
from vigil.sim.linear import SYSTEMS
from vigil.training.lqr_study import (
    METHODS,
    StudyConfig,
    StudyResult,
    draw_prior,
    gain_gap,
    growth_exponent,
    prior_destabilises,
    published,
    run_study,
    summarize,
)

NAME = "lqr"
RAW = OUT / "lqr.json"

SYSTEM_NAMES = ("aircraft-pitch", "uav-2d")
# The prior perturbation chosen per system after the `priors` section (docs/decisions.md 73): relative on
# aircraft pitch (an absolute 0.01 is as large as B), the published absolute one on the UAV.
CHOSEN_RELATIVE = {"aircraft-pitch": True, "uav-2d": False}
BASELINES = ("cec", "cec-pe", "thompson", "oslo")
SWEEP = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
TARGET_EXPONENT, TARGET_UPDATE_MS = 0.6, 5.0


def mode(relative: bool) -> str:
    return "relative" if relative else "absolute"


# ------------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------------

def prior_check(draws: int, seed: int) -> list[dict]:
    """Fraction of priors whose LQR destabilises the true system, per system, mode and std."""
    rows = []
    for name in SYSTEM_NAMES:
        system = SYSTEMS[name]()
        for relative in (False, True):
            for std in (0.001, 0.01, 0.1):
                rng = np.random.default_rng([seed, 99])
                bad = sum(prior_destabilises(system, *draw_prior(system, std, relative, rng)) for _ in range(draws))
                rows.append({"system": name, "mode": mode(relative), "std": std, "destabilising": bad / draws})
    return rows


def study(name: str, relative: bool, trials: int, steps: int, seed: int, methods=METHODS,
          **overrides) -> StudyResult:
    return run_study(published(name, trials=trials, steps=steps, seed=seed, relative_prior=relative,
                               methods=tuple(methods), **overrides), progress=True)


def sweep(name: str, relative: bool, trials: int, steps: int, seed: int, cec: StudyResult) -> list[dict]:
    """IR-LQR over a g1 x g2 grid on the trials of `cec` (same seed and prior): paired against CEC."""
    from tqdm import tqdm

    ce_final = cec.final_regret("cec", crn=True)
    K_ce = cec.methods["cec"].K_final
    rows = []
    for g1, g2 in tqdm([(a, b) for a in SWEEP for b in SWEEP], desc=f"sweep {name}", leave=False):
        r = run_study(published(name, trials=trials, steps=steps, seed=seed, relative_prior=relative,
                                methods=("ir-lqr",), g1=g1, g2=g2))
        final = r.final_regret("ir-lqr", crn=True)
        both = np.isfinite(final) & np.isfinite(ce_final)
        K = r.methods["ir-lqr"].K_final
        gap = np.linalg.norm(K - K_ce, axis=(1, 2)) / np.linalg.norm(K_ce, axis=(1, 2))
        rows.append({"g1": g1, "g2": g2, "diverged": int(r.methods["ir-lqr"].diverged.sum()),
                     "fallbacks": int(r.methods["ir-lqr"].fallbacks.sum()),
                     "guarded": int(r.methods["ir-lqr"].guarded.sum()),
                     "regret_crn_median": float(np.median(final)),
                     "diff_median_vs_cec": float(np.median(final[both] - ce_final[both])),
                     "diff_mean_vs_cec": float(np.mean(final[both] - ce_final[both])),
                     "gain_gap_median": float(np.median(gap))})
    return rows


def regret_bands(result: StudyResult, methods: Sequence[str], crn: bool = True) -> dict[str, Any]:
    """What a regret figure draws: per method the median and IQR of the regret curves (a diverged trial counts
    as +inf from its stop on) and the number of diverged trials."""
    bands = {}
    for m in methods:
        curves = result.regret(m, crn)
        curves = np.where(np.isnan(curves), np.inf, curves)
        q1, med, q3 = np.percentile(curves, [25, 50, 75], axis=0)
        bands[m] = {"median": short(med), "q1": short(q1), "q3": short(q3),
                    "diverged": int(result.methods[m].diverged.sum())}
    ir = result.config.irlqr
    return {"system": result.config.system, "trials": result.config.trials, "J_star": result.J_star, "crn": crn,
            "settings": f"lam {ir.lam:g}, g1 {ir.g1:g}, g2 {ir.g2:g}, prior "
                        f"{'relative' if ir.relative_prior else 'absolute'} std {ir.prior_std:g}",
            "methods": bands}


def short(x: np.ndarray) -> list[float]:
    """Six significant digits: enough for a figure, and a 10^4-step band stays small in the raw JSON."""
    return [float(f"{v:.6g}") for v in x]


# ------------------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------------------

def settings() -> dict[str, Any]:
    """The published settings every method runs with (training/irlqr.py PUBLISHED, StudyConfig)."""
    base = StudyConfig()
    out: dict[str, Any] = {"pe_std": base.pe_std, "ts_beta": base.ts_beta}
    for name in SYSTEM_NAMES:
        ir = published(name).irlqr
        out[name] = {"lam": ir.lam, "g1": ir.g1, "g2": ir.g2, "prior_std": ir.prior_std}
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every part of the study; the raw results the section and the figures are rendered from."""
    t0 = time.perf_counter()
    data: dict[str, Any] = {
        "run": run_info(env="OMP_NUM_THREADS=1"), "settings": settings(),
        "sizes": {k: getattr(args, k) for k in ("trials", "steps", "long_trials", "long_steps", "sweep_trials",
                                                 "prior_draws", "seed")},
        "priors": prior_check(args.prior_draws, args.seed), "main": {}, "long": {}, "sweep": {},
        "figures": {}}
    results: dict[str, StudyResult] = {}
    for name in SYSTEM_NAMES:
        for relative in (False, True):
            key = f"{name}/{mode(relative)}"
            r = study(name, relative, args.trials, args.steps, args.seed)
            results[key] = r
            data["main"][key] = {"J_star": r.J_star, "prior_std": r.config.irlqr.prior_std,
                                 "prior_unstable": int(r.prior_unstable.sum()), "rows": summarize(r),
                                 "gain_gap": gain_gap(r)}
            if CHOSEN_RELATIVE[name] == relative:
                data["figures"][f"lqr_regret_{name}"] = regret_bands(r, METHODS)
            print(f"main {key}: done", flush=True)
    for name in SYSTEM_NAMES:
        for relative in (False, True):
            key = f"{name}/{mode(relative)}"
            r = study(name, relative, args.long_trials, args.long_steps, args.seed + 1)
            exps = {m: {"crn": growth_exponent(r.regret(m, True)), "J": growth_exponent(r.regret(m, False))}
                    for m in r.methods}
            data["long"][key] = {"J_star": r.J_star, "rows": summarize(r), "exponents": exps}
            if CHOSEN_RELATIVE[name] == relative:
                data["figures"][f"lqr_regret_long_{name}"] = {**regret_bands(r, list(r.methods)), "log": True}
            print(f"long {key}: done", flush=True)
    for name in SYSTEM_NAMES:
        relative = CHOSEN_RELATIVE[name]
        cec = results[f"{name}/{mode(relative)}"]
        if args.sweep_trials != args.trials:
            cec = study(name, relative, args.sweep_trials, args.steps, args.seed, methods=("cec",))
        data["sweep"][name] = sweep(name, relative, args.sweep_trials, args.steps, args.seed, cec)
    data["seconds"] = time.perf_counter() - t0
    return data


# ------------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------------

def plot_bands(fig_data: dict[str, Any], path: Path) -> None:
    """Median regret curve and IQR band per method, from `regret_bands`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for m, band in fig_data["methods"].items():
        med, q1, q3 = (np.asarray(band[k], float) for k in ("median", "q1", "q3"))
        t = np.arange(1, len(med) + 1)
        nd = band["diverged"]
        line, = ax.plot(t, med, label=m + (f" ({nd} diverged)" if nd else ""), lw=1.4)
        ax.fill_between(t, q1, q3, color=line.get_color(), alpha=0.18, lw=0)
    ax.set_xlabel("step T")
    ax.set_ylabel(f"regret against {'the oracle on the same noise' if fig_data['crn'] else 'T J*'}")
    if fig_data.get("log"):
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=max(1e-3, abs(fig_data["J_star"]) * 0.1))
    ax.set_title(f"{fig_data['system']}: {fig_data['trials']} trials, median and IQR\n{fig_data['settings']}",
                 fontsize=9)
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def plot_sweep(sweeps: dict[str, list[dict]], path: Path) -> None:
    """Heat maps over (g1, g2): the gain's gap to CEC's, and the paired regret difference."""
    plt = pyplot()
    fig, axes = plt.subplots(len(sweeps), 2, figsize=(10, 4.2 * len(sweeps)), squeeze=False)
    k = len(SWEEP)
    for row, (name, rows) in zip(axes, sweeps.items()):
        gap = np.array([r["gain_gap_median"] for r in rows], float).reshape(k, k) * 100
        diff = np.array([r["diff_median_vs_cec"] for r in rows], float).reshape(k, k)
        for ax, data, title, fmt in ((row[0], np.log10(np.maximum(gap, 1e-6)), "log10 median gain gap to CEC (%)",
                                      "{:.2g}"),
                                     (row[1], diff, "median paired regret IR-LQR - CEC (same-noise)", "{:.3g}")):
            shown = gap if ax is row[0] else diff
            lim = np.nanmax(np.abs(data[np.isfinite(data)])) if ax is row[1] else None
            im = ax.imshow(data, origin="lower", cmap="viridis" if ax is row[0] else "coolwarm",
                           vmin=None if lim is None else -lim, vmax=lim)
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, fmt.format(shown[i, j]), ha="center", va="center", fontsize=6)
            ax.set_xticks(range(k), [f"{g:g}" for g in SWEEP], fontsize=7)
            ax.set_yticks(range(k), [f"{g:g}" for g in SWEEP], fontsize=7)
            ax.set_xlabel("g2")
            ax.set_ylabel("g1")
            ax.set_title(f"{name}: {title}", fontsize=9)
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    save_figure(fig, path)


def plots(data: dict[str, Any]) -> None:
    for stem, fig_data in data["figures"].items():
        plot_bands(fig_data, FIGURES / f"{stem}.png")
    plot_sweep(data["sweep"], FIGURES / "lqr_sweep.png")


# ------------------------------------------------------------------------------------------------------
# Text
# ------------------------------------------------------------------------------------------------------

def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or np.isnan(x):
        return "–"
    if np.isinf(x):
        return "∞"
    return f"{x:.{digits}g}"


def fmt_iqr(iqr: Sequence[float]) -> str:
    return f"[{fmt(iqr[0])}, {fmt(iqr[1])}]"


def fmt_ci(t) -> str:
    if t is None:
        return ""
    v, lo, hi = t
    return "–" if v is None or np.isnan(v) else f"{fmt(v)} [{fmt(lo)}, {fmt(hi)}]"


def method_table(rows: list[dict]) -> list[str]:
    out = ["| method | diverged | fallbacks (guarded) | regret vs T·J*: mean | median [IQR] | "
           "vs same-noise oracle: mean | median [IQR] | IR-LQR − method, paired: Δmean [95% CI] | "
           "Δmedian [95% CI] | update ms: median / p99 |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        med, p99 = r["update_ms_median"], r["update_ms_p99"]
        ms = "–" if med is None or np.isnan(med) else f"{med:.2f} / {p99:.2f}"
        out.append(f"| {r['method']} | {r['diverged']}/{r['trials']} | {r['fallbacks']} ({r['guarded']}) | "
                   f"{fmt(r['regret_mean'])} | {fmt(r['regret_median'])} {fmt_iqr(r['regret_iqr'])} | "
                   f"{fmt(r['regret_crn_mean'])} | {fmt(r['regret_crn_median'])} {fmt_iqr(r['regret_crn_iqr'])} | "
                   f"{fmt_ci(r.get('diff_mean'))} | {fmt_ci(r.get('diff_median'))} | {ms} |")
    return out


def not_worse(row: dict) -> bool:
    """IR-LQR's mean and median (same-noise) regret at most the baseline's within spread: the 95% interval of
    the paired difference IR-LQR - baseline reaches 0 or below, for the mean and for the median; and the
    baseline has at least as many diverged trials as IR-LQR (checked by the caller)."""
    return row["diff_mean"][1] <= 0 and row["diff_median"][1] <= 0


def settings_line(data: dict[str, Any]) -> str:
    st = data["settings"]
    systems = "; ".join(f"{n} lam {st[n]['lam']:g}, g1 {st[n]['g1']:g}, g2 {st[n]['g2']:g}" for n in SYSTEM_NAMES)
    return f"- Settings: {systems}; CEC+PE noise std {st['pe_std']:g}; Thompson beta {st['ts_beta']:g}."


def render(data: dict[str, Any]) -> str:
    """The section, from the raw results alone."""
    z = data["sizes"]
    L = ["## IR-LQR: optimistic online LQR against its baselines (issue 6)", "",
         written_by(data["run"], seconds=data["seconds"]), settings_line(data), ""]
    L += ["### The prior: absolute or relative perturbation", "",
          f"Fraction of {z['prior_draws']} prior draws whose LQR destabilises the true system "
          "(absolute: A0 = A + std·e; relative: A0 = A ⊙ (1 + std·e), structural zeros kept; same for B):", "",
          "| system | mode | std 0.001 | std 0.01 | std 0.1 |", "|---|---|---:|---:|---:|"]
    for name in SYSTEM_NAMES:
        for m in ("absolute", "relative"):
            vals = {r["std"]: r["destabilising"] for r in data["priors"] if r["system"] == name and r["mode"] == m}
            L.append(f"| {name} | {m} | " + " | ".join(f"{vals[s]:.1%}" for s in (0.001, 0.01, 0.1)) + " |")
    L.append("")
    for name in SYSTEM_NAMES:
        for relative in (False, True):
            d = data["main"][f"{name}/{mode(relative)}"]
            chosen = " — **the chosen prior**" if CHOSEN_RELATIVE[name] == relative else ""
            L += [f"### {name}, {mode(relative)} prior std {d['prior_std']:g}: {z['trials']} trials × {z['steps']} "
                  f"steps{chosen}", "",
                  f"J* = {d['J_star']:.4g}; the prior's LQR destabilises the true system in {d['prior_unstable']} of "
                  f"{z['trials']} trials; median relative gap ‖K_IR − K_CEC‖/‖K_CEC‖ at the end: "
                  f"{d['gain_gap']:.2%}.", ""]
            L += method_table(d["rows"]) + [""]
    L += ["Regret curves (same-noise oracle, median and IQR band, chosen prior): "
          + ", ".join(f"`docs/figures/lqr_regret_{n}.png`" for n in SYSTEM_NAMES) + ".", ""]
    L += [f"### Long horizon: {z['long_trials']} trials × {z['long_steps']} steps", "",
          "| system | prior | method | diverged | fallbacks (guarded) | exponent vs same-noise oracle | "
          f"exponent vs T·J* | regret vs oracle at T = {z['long_steps']}: mean | median |",
          "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for key, d in data["long"].items():
        name, m = key.split("/")
        for r in d["rows"]:
            if r["method"] == "oracle":
                continue
            e = d["exponents"][r["method"]]
            L.append(f"| {name} | {m} | {r['method']} | {r['diverged']}/{r['trials']} | {r['fallbacks']} "
                     f"({r['guarded']}) | {fmt(e['crn'], 2)} | {fmt(e['J'], 2)} | {fmt(r['regret_crn_mean'])} | "
                     f"{fmt(r['regret_crn_median'])} |")
    L += ["", "Curves on log axes: " + ", ".join(f"`docs/figures/lqr_regret_long_{n}.png`" for n in SYSTEM_NAMES)
          + ".", ""]
    L += [f"### Sweep of g1, g2 ({z['sweep_trials']} trials × {z['steps']} steps, chosen prior; paired "
          "against CEC on the same trials)", "",
          "Cell: median gap ‖K_IR − K_CEC‖/‖K_CEC‖ at the end / median paired same-noise regret IR-LQR − CEC / "
          "fallbacks (guarded) summed over trials. Heat maps: `docs/figures/lqr_sweep.png`.", ""]
    for name, rows in data["sweep"].items():
        L += [f"**{name}** (rows g1, columns g2)", "",
              "| g1 \\ g2 | " + " | ".join(f"{g:g}" for g in SWEEP) + " |",
              "|---|" + "---:|" * len(SWEEP)]
        for g1 in SWEEP:
            cells = []
            for g2 in SWEEP:
                r = next(r for r in rows if r["g1"] == g1 and r["g2"] == g2)
                div = f", {r['diverged']} div" if r["diverged"] else ""
                cells.append(f"{r['gain_gap_median']:.2%} / {fmt(r['diff_median_vs_cec'], 2)} / "
                             f"{r['fallbacks']} ({r['guarded']}){div}")
            L.append(f"| {g1:g} | " + " | ".join(cells) + " |")
        L.append("")
    L += sweep_lines(data) + [""]
    L += ["### Targets (issue 6)", ""] + [f"- {line}" for line in assess(data)] + [""]
    return section(NAME, L)


def sweep_lines(data: dict[str, Any]) -> list[str]:
    """Per system: the published cell, the first cell whose gain moves by more than 1%, the best and worst."""
    lines = []
    for name, rows in data["sweep"].items():
        changed = [r for r in rows if r["gain_gap_median"] > 0.01]
        first = min(changed, key=lambda r: (r["g1"] + r["g2"])) if changed else None
        best = min(rows, key=lambda r: r["diff_median_vs_cec"])
        worst = max(rows, key=lambda r: r["diff_median_vs_cec"])
        g1, g2 = data["settings"][name]["g1"], data["settings"][name]["g2"]
        pub = next(r for r in rows if r["g1"] == g1 and r["g2"] == g2)
        moved = (f"by more than 1% first at g1 = {first['g1']:g}, g2 = {first['g2']:g} ({first['gain_gap_median']:.1%})"
                 if first else "by more than 1% nowhere")
        lines.append(f"- {name}: at the published (g1, g2) the gain ends {pub['gain_gap_median']:.2%} from CEC's "
                     f"(Δmedian {fmt(pub['diff_median_vs_cec'], 2)}); the gain moves {moved}; best cell g1 = "
                     f"{best['g1']:g}, g2 = {best['g2']:g} (Δmedian {fmt(best['diff_median_vs_cec'], 2)}); worst g1 = "
                     f"{worst['g1']:g}, g2 = {worst['g2']:g} (Δmedian {fmt(worst['diff_median_vs_cec'], 2)}, "
                     f"{worst['fallbacks']} fallbacks).")
    return lines


def assess(data: dict[str, Any]) -> list[str]:
    """The issue's four targets, met or not, with the numbers."""
    lines = []
    div = {k: next(r["diverged"] for r in d["rows"] if r["method"] == "ir-lqr")
           for part in ("main", "long") for k, d in ((f"{part} {k}", v) for k, v in data[part].items())}
    nodiv = {k: next(r["diverged"] for r in d["rows"] if r["method"] == "ir-lqr-noguard")
             for part in ("main", "long") for k, d in ((f"{part} {k}", v) for k, v in data[part].items())}
    total = sum(div.values())
    lines.append(f"No diverged IR-LQR trial with its guard: **{'met' if total == 0 else 'not met'}** "
                 f"({total} diverged over every run of this bench; without the guard: {sum(nodiv.values())}).")
    for name in SYSTEM_NAMES:
        d = data["main"][f"{name}/{mode(CHOSEN_RELATIVE[name])}"]
        ir = next(r for r in d["rows"] if r["method"] == "ir-lqr")
        verdicts = []
        for r in d["rows"]:
            if r["method"] in BASELINES:
                ok = not_worse(r) and r["diverged"] >= ir["diverged"]
                verdicts.append((r["method"], ok, r))
        met = all(ok for _, ok, _ in verdicts)
        worse = [f"{m} (Δmean {fmt_ci(r['diff_mean'])}, Δmedian {fmt_ci(r['diff_median'])})"
                 for m, ok, r in verdicts if not ok]
        lines.append(f"IR-LQR's mean and median regret at most every baseline's within spread on {name} "
                     f"({mode(CHOSEN_RELATIVE[name])} prior, T = {data['sizes']['steps']}): "
                     f"**{'met' if met else 'not met'}**"
                     + (f"; significantly worse than {'; '.join(worse)}" if worse else "") + ".")
    for name in SYSTEM_NAMES:
        e = data["long"][f"{name}/{mode(CHOSEN_RELATIVE[name])}"]["exponents"]["ir-lqr"]["crn"]
        lines.append(f"Growth exponent of IR-LQR's regret against the same-noise oracle on {name}: {fmt(e, 2)} "
                     f"(target ≤ {TARGET_EXPONENT}): **{'met' if e <= TARGET_EXPONENT else 'not met'}**.")
    ms = [r["update_ms_p99"] for part in ("main", "long") for d in data[part].values() for r in d["rows"]
          if r["method"] == "ir-lqr"]
    worst = max(ms)
    lines.append(f"IR-LQR's controller update: worst p99 over the runs {worst:.2f} ms (target ≤ {TARGET_UPDATE_MS} "
                 f"ms): **{'met' if worst <= TARGET_UPDATE_MS else 'not met'}**.")
    return lines


# ------------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--trials", type=int, default=40, help="trials of the main study")
    p.add_argument("--steps", type=int, default=200, help="steps per trial of the main study and the sweep")
    p.add_argument("--long-trials", type=int, default=10, help="trials of the long horizon")
    p.add_argument("--long-steps", type=int, default=10_000, help="steps of the long horizon")
    p.add_argument("--sweep-trials", type=int, default=40, help="trials per (g1, g2) of the sweep")
    p.add_argument("--prior-draws", type=int, default=1000, help="prior draws of the prior check")
    p.add_argument("--seed", type=int, default=0, help="seed of every trial's prior and noise")
    p.add_argument("--quick", action="store_true", help="smoke check: few trials, short horizons")
    p.add_argument("--report-only", action="store_true", help=f"render {RAW.name} again; measure nothing")
    p.add_argument("--no-write", action="store_true", help="print only: no BENCHMARKS.md, figures or raw JSON")
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.steps, args.long_trials, args.long_steps = 4, 100, 2, 1000
        args.sweep_trials, args.prior_draws = 2, 50
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        data = as_numbers(read_raw(RAW))
    else:
        data = as_numbers(raw_copy(measure(args)))  # rendered exactly as --report-only will render it
    text = render(data)
    print(text)
    if not args.no_write:
        if not args.report_only:
            write_raw(RAW, data)
        plots(data)
        write_benchmarks(text, *markers(NAME))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
