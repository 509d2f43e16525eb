"""The IR-LQR study (issue 6): trials of every learner on common random numbers, regret, summaries, plots.

One trial = one prior draw (A0, B0) and one noise sequence, shared by every method and by the oracle, so
methods are compared pairwise on the same luck (common random numbers). Per method and trial:

    costs          x'Qx + u'Ru per step (NaN after a divergence)
    regret         sum_t (cost_t - J*)                   (against the optimal average cost)
    regret_crn     sum_t (cost_t - cost_t of the oracle on the same noise)   (far smaller spread)
    diverged       ||x|| rose above `bound`: the trial stops there and counts as diverged
    fallbacks, guarded, epochs, update_s (seconds of every gain recomputation)

`vigil train lqr` (runtime/cli.py) runs `run_cli`; `bench/lqr.py` builds the benchmark on the same
functions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from vigil.sim.linear import SYSTEMS, LinearSystem, oracle, stage_cost
from vigil.training.irlqr import IRLQR, PUBLISHED, IRLQRConfig, dlqr_cross, is_stabilising
from vigil.training.lqr_baselines import CEC, CECPE, OSLO, Oracle, Thompson

METHODS = ("ir-lqr", "cec", "cec-pe", "thompson", "oslo", "oracle", "ir-lqr-noguard")
DEFAULT_METHODS = METHODS[:6]  # ir-lqr-noguard: the published fallback without the stability guard


@dataclass(frozen=True)
class StudyConfig:
    """One study on one system. `irlqr` holds lam, g1, g2, the prior's perturbation and the guard."""

    system: str = "uav-2d"
    trials: int = 40
    steps: int = 200
    seed: int = 0
    methods: tuple[str, ...] = DEFAULT_METHODS
    irlqr: IRLQRConfig = field(default_factory=IRLQRConfig)
    bound: float = 1e3          # a trial diverges when ||x|| exceeds this
    pe_std: float = 0.1         # CEC+PE's initial action-noise std
    ts_beta: float = 1e-3       # Thompson sampling's scale
    oslo_mu: float | None = None  # OSLO's confidence width (default 0.01 sigma_w^2, lqr_baselines.OSLO)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)} (known: {', '.join(METHODS)})")
        if self.system not in SYSTEMS:
            raise ValueError(f"unknown system {self.system!r} (known: {', '.join(SYSTEMS)})")
        if self.trials < 1 or self.steps < 1:
            raise ValueError("trials and steps must be positive")


def published(system: str, **overrides) -> StudyConfig:
    """The published settings for one system (docs/algorithms.md#ir-lqr-optimistic-online-lqr-by-intrinsic-rewards);
    keyword overrides of StudyConfig fields, and of IRLQRConfig fields (lam, g1, g2, prior_std,
    relative_prior, stability_guard, ...)."""
    ir_fields = set(IRLQRConfig.__dataclass_fields__)
    ir = replace(PUBLISHED[system], **{k: v for k, v in overrides.items() if k in ir_fields})
    return StudyConfig(system=system, irlqr=ir, **{k: v for k, v in overrides.items() if k not in ir_fields})


# ------------------------------------------------------------------------------------------------------
# Priors, learners, one trial
# ------------------------------------------------------------------------------------------------------

def draw_prior(system: LinearSystem, std: float, relative: bool,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(A0, B0) = truth + Gaussian noise. Absolute: std per entry (as published). Relative: each entry
    times (1 + std e), e ~ N(0, 1): every coefficient known to within `std` of itself, structural zeros
    kept (aircraft pitch's B is ~0.013 after ZOH, so an absolute std of 0.01 is as large as B itself)."""
    eA, eB = rng.standard_normal(system.A.shape), rng.standard_normal(system.B.shape)
    if relative:
        return system.A * (1.0 + std * eA), system.B * (1.0 + std * eB)
    return system.A + std * eA, system.B + std * eB


def prior_destabilises(system: LinearSystem, A0: np.ndarray, B0: np.ndarray) -> bool:
    """Whether the LQR of the prior fails to stabilise the true system (or the prior has no LQR at all)."""
    try:
        K = dlqr_cross(A0, B0, system.Q, system.R)
    except (ValueError, np.linalg.LinAlgError):
        return True
    return not is_stabilising(system.A, system.B, K)


def make_learner(method: str, system: LinearSystem, A0: np.ndarray, B0: np.ndarray, cfg: StudyConfig,
                 rng: np.random.Generator) -> IRLQR:
    Q, R, ir = system.Q, system.R, cfg.irlqr
    if method == "ir-lqr":
        return IRLQR(A0, B0, Q, R, ir)
    if method == "ir-lqr-noguard":
        return IRLQR(A0, B0, Q, R, replace(ir, stability_guard=False))
    if method == "cec":
        return CEC(A0, B0, Q, R, ir)
    if method == "cec-pe":
        return CECPE(A0, B0, Q, R, ir, pe_std=cfg.pe_std)
    if method == "thompson":
        return Thompson(A0, B0, Q, R, ir, beta=cfg.ts_beta, rng=rng)
    if method == "oslo":
        return OSLO(A0, B0, Q, R, ir, noise_std=system.noise_std, mu=cfg.oslo_mu)
    if method == "oracle":
        return Oracle(system.A, system.B, Q, R, ir)
    raise ValueError(f"unknown method {method!r} (known: {', '.join(METHODS)})")


@dataclass(frozen=True)
class Trial:
    costs: np.ndarray             # (steps,), NaN after a divergence
    diverged: bool
    epochs: int
    fallbacks: int
    guarded: int
    update_s: tuple[float, ...]   # every gain recomputation (the initial one excluded)
    K_final: np.ndarray


def run_trial(system: LinearSystem, learner: IRLQR, noise: np.ndarray, excitation: np.ndarray,
              bound: float) -> Trial:
    """Close the loop for len(noise) steps: u = -K x + s_t e_t, x' = A x + B u + w_t, feeding each
    transition to the learner; stop when ||x|| > bound (diverged)."""
    steps = len(noise)
    costs = np.full(steps, np.nan)
    x = system.x0.astype(float).copy()
    diverged = False
    for t in range(steps):
        u = -learner.gain() @ x
        s = learner.exploration_std(t)
        if s:
            u = u + s * excitation[t]
        costs[t] = stage_cost(system, x, u)
        x_next = system.A @ x + system.B @ u + noise[t]
        learner.step(x, u, x_next)
        if not np.all(np.isfinite(x_next)) or np.linalg.norm(x_next) > bound:
            diverged = True
            break
        x = x_next
    return Trial(costs, diverged, learner.epoch, learner.fallbacks, learner.guarded,
                 tuple(learner.update_seconds), learner.gain().copy())


# ------------------------------------------------------------------------------------------------------
# A study: every method on the same trials
# ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MethodResult:
    method: str
    costs: np.ndarray        # (trials, steps)
    diverged: np.ndarray     # (trials,) bool
    epochs: np.ndarray
    fallbacks: np.ndarray
    guarded: np.ndarray
    update_s: np.ndarray     # every recomputation of every trial, pooled
    K_final: np.ndarray      # (trials, m, n)


@dataclass(frozen=True)
class StudyResult:
    config: StudyConfig
    J_star: float
    oracle_costs: np.ndarray  # (trials, steps): the oracle on each trial's noise
    methods: dict[str, MethodResult]
    prior_unstable: np.ndarray  # (trials,) bool: the prior's LQR destabilises the true system

    def regret(self, method: str, crn: bool = False) -> np.ndarray:
        """Cumulative regret curves (trials, steps); NaN after a divergence."""
        costs = self.methods[method].costs
        ref = self.oracle_costs if crn else self.J_star
        return np.cumsum(costs - ref, axis=1)

    def final_regret(self, method: str, crn: bool = False) -> np.ndarray:
        """Regret at the last step, +inf for a diverged trial."""
        r = self.regret(method, crn)[:, -1]
        return np.where(self.methods[method].diverged, np.inf, r)


def run_study(cfg: StudyConfig, progress: bool = False,
              on_trial: Callable[[int], None] | None = None) -> StudyResult:
    """Every method of `cfg.methods` on `cfg.trials` common-random-number trials."""
    system = SYSTEMS[cfg.system]()
    K_star, J_star = oracle(system)
    per: dict[str, list[Trial]] = {m: [] for m in cfg.methods}
    oracle_costs = np.zeros((cfg.trials, cfg.steps))
    prior_unstable = np.zeros(cfg.trials, bool)
    bar = _progress(cfg.trials, f"{cfg.system} T={cfg.steps}", progress)
    for i in range(cfg.trials):
        streams = np.random.default_rng([cfg.seed, i]).spawn(4)
        A0, B0 = draw_prior(system, cfg.irlqr.prior_std, cfg.irlqr.relative_prior, streams[0])
        prior_unstable[i] = prior_destabilises(system, A0, B0)
        noise = system.noise_std * streams[1].standard_normal((cfg.steps, system.n))
        excitation = streams[2].standard_normal((cfg.steps, system.m))
        oracle_costs[i] = run_trial(system, Oracle(system.A, system.B, system.Q, system.R, cfg.irlqr),
                                    noise, excitation, np.inf).costs
        for method in cfg.methods:
            rng = np.random.default_rng([cfg.seed, i, 1 + METHODS.index(method)])
            learner = make_learner(method, system, A0, B0, cfg, rng)
            per[method].append(run_trial(system, learner, noise, excitation, cfg.bound))
        if bar is not None:
            bar.update(1)
        if on_trial is not None:
            on_trial(i)
    if bar is not None:
        bar.close()
    methods = {m: MethodResult(
        m, np.stack([t.costs for t in ts]), np.array([t.diverged for t in ts]),
        np.array([t.epochs for t in ts]), np.array([t.fallbacks for t in ts]), np.array([t.guarded for t in ts]),
        np.array([s for t in ts for s in t.update_s]), np.stack([t.K_final for t in ts])) for m, ts in per.items()}
    return StudyResult(cfg, J_star, oracle_costs, methods, prior_unstable)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="trial", leave=False)


# ------------------------------------------------------------------------------------------------------
# Summaries
# ------------------------------------------------------------------------------------------------------

def paired_interval(d: np.ndarray, stat: Callable[[np.ndarray], float], rng: np.random.Generator,
                    n_boot: int = 2000) -> tuple[float, float, float]:
    """stat(d) and its 95% bootstrap interval over trials (d: per-trial paired differences, finite)."""
    if len(d) == 0:
        return (float("nan"),) * 3
    boots = np.array([stat(d[rng.integers(0, len(d), len(d))]) for _ in range(n_boot)])
    return float(stat(d)), float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))


def summarize(result: StudyResult, reference: str = "ir-lqr") -> list[dict]:
    """One row per method: final regret (mean over finished trials, median with diverged trials as +inf,
    IQR) against T J* and against the same-noise oracle; diverged, fallbacks, guarded, epochs; update time
    (ms); and, for every method but `reference`, the paired difference reference - method on the
    same-noise regret (mean and median with 95% bootstrap intervals, trials where both finished)."""
    rows = []
    ref_final = result.final_regret(reference, crn=True) if reference in result.methods else None
    for m, mr in result.methods.items():
        row: dict = {"method": m, "trials": int(len(mr.diverged)), "diverged": int(mr.diverged.sum()),
                     "fallbacks": int(mr.fallbacks.sum()), "guarded": int(mr.guarded.sum()),
                     "epochs_mean": float(mr.epochs.mean())}
        for crn, key in ((False, "regret"), (True, "regret_crn")):
            final = result.final_regret(m, crn)
            finite = final[np.isfinite(final)]
            row[f"{key}_mean"] = float(finite.mean()) if len(finite) else float("nan")
            row[f"{key}_median"] = float(np.median(final))
            q1, q3 = np.percentile(final, [25, 75], method="nearest")  # +inf (diverged) stays +inf
            row[f"{key}_iqr"] = [float(q1), float(q3)]
        ms = mr.update_s * 1e3
        row["update_ms_median"] = float(np.median(ms)) if len(ms) else float("nan")
        row["update_ms_p99"] = float(np.percentile(ms, 99)) if len(ms) else float("nan")
        row["update_ms_max"] = float(ms.max()) if len(ms) else float("nan")
        if ref_final is not None and m != reference:
            final = result.final_regret(m, crn=True)
            both = np.isfinite(ref_final) & np.isfinite(final)
            d = ref_final[both] - final[both]
            rng = np.random.default_rng(0)
            row["diff_mean"] = paired_interval(d, np.mean, rng)
            row["diff_median"] = paired_interval(d, np.median, rng)
        rows.append(row)
    return rows


def growth_exponent(curves: np.ndarray, t_min: float = 1e2, t_max: float = 1e4, points: int = 20) -> float:
    """Slope of log(mean regret) against log T over [t_min, t_max] (log-spaced T; steps where the mean
    cumulative regret is not positive are left out). curves: (trials, steps) cumulative regret."""
    mean = np.nanmean(curves, axis=0)
    T = np.unique(np.geomspace(t_min, min(t_max, curves.shape[1]), points).astype(int))
    y = mean[T - 1]
    ok = y > 0
    if ok.sum() < 3:
        return float("nan")
    return float(np.polyfit(np.log(T[ok]), np.log(y[ok]), 1)[0])


def gain_gap(result: StudyResult, method: str = "ir-lqr", reference: str = "cec") -> float:
    """Median over trials of ||K_method - K_reference|| / ||K_reference|| at the end of the run."""
    Km, Kr = result.methods[method].K_final, result.methods[reference].K_final
    gap = np.linalg.norm(Km - Kr, axis=(1, 2)) / np.linalg.norm(Kr, axis=(1, 2))
    return float(np.median(gap))


# ------------------------------------------------------------------------------------------------------
# Plots
# ------------------------------------------------------------------------------------------------------

def plot_regret(result: StudyResult, path: str | Path, crn: bool = True, log: bool = False,
                methods: Iterable[str] | None = None) -> None:
    """Median regret curve and IQR band per method (diverged trials count as +inf from their stop on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    steps = result.config.steps
    t = np.arange(1, steps + 1)
    for m in methods or result.methods:
        curves = result.regret(m, crn)
        curves = np.where(np.isnan(curves), np.inf, curves)
        med = np.median(curves, axis=0)
        q1, q3 = np.percentile(curves, [25, 75], axis=0)
        nd = int(result.methods[m].diverged.sum())
        line, = ax.plot(t, med, label=m + (f" ({nd} diverged)" if nd else ""), lw=1.4)
        ax.fill_between(t, q1, q3, color=line.get_color(), alpha=0.18, lw=0)
    ref = "the oracle on the same noise" if crn else "T J*"
    ax.set_xlabel("step T")
    ax.set_ylabel(f"regret against {ref}")
    if log:
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=max(1e-3, abs(result.J_star) * 0.1))
    ir = result.config.irlqr
    ax.set_title(f"{result.config.system}: {result.config.trials} trials, median and IQR\n"
                 f"lam {ir.lam:g}, g1 {ir.g1:g}, g2 {ir.g2:g}, prior "
                 f"{'relative' if ir.relative_prior else 'absolute'} std {ir.prior_std:g}", fontsize=9)
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------
# `vigil train lqr`
# ------------------------------------------------------------------------------------------------------

def format_table(rows: Sequence[dict], J_star: float) -> str:
    """A plain-text table of `summarize` rows."""
    head = (f"{'method':10} {'div':>4} {'fallb':>5} {'guard':>5} {'regret mean':>12} {'median':>10} "
            f"{'crn mean':>10} {'crn median':>10} {'update ms':>9}")
    lines = [f"J* = {J_star:.4g}", head]
    for r in rows:
        lines.append(f"{r['method']:10} {r['diverged']:4d} {r['fallbacks']:5d} {r['guarded']:5d} "
                     f"{r['regret_mean']:12.4g} {r['regret_median']:10.4g} {r['regret_crn_mean']:10.4g} "
                     f"{r['regret_crn_median']:10.4g} {r['update_ms_median']:9.3f}")
    return "\n".join(lines)


def run_cli(systems: Sequence[str], out: str | Path | None, progress: bool = True,
            log: Callable[[str], None] = print, **overrides) -> dict:
    """The study of `vigil train lqr`: every method on each system with the published settings (plus
    overrides); writes OUT/<system>.json and OUT/<system>_regret.png when `out` is given."""
    summary = {}
    for name in systems:
        cfg = published(name, **overrides)
        result = run_study(cfg, progress=progress)
        rows = summarize(result)
        log(f"{name}: " + format_table(rows, result.J_star))
        entry = {"config": _jsonable(asdict(cfg)), "J_star": result.J_star, "rows": rows,
                 "prior_unstable": int(result.prior_unstable.sum())}
        if "ir-lqr" in result.methods and "cec" in result.methods:
            entry["gain_gap_ir_vs_cec"] = gain_gap(result)
        if out is not None:
            folder = Path(out)
            folder.mkdir(parents=True, exist_ok=True)
            plot_regret(result, folder / f"{name}_regret.png")
            (folder / f"{name}.json").write_text(json.dumps(entry, indent=1, default=_jsonable))
        summary[name] = entry
    return summary


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj
