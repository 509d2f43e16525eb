"""Which two recorded episodes to show the operator next: pair-selection rules over a reward model's posterior.

Every rule picks a pair among the candidate episodes of one task (a pair compares attempts at the same thing),
from the reward model's posterior samples of each episode's return, `samples` (S, N) (S = 1 for a model
without uncertainty). mean and std are taken over the samples. `beta` scales the confidence width, as in
ActiveUltraFeedback (arXiv 2603.09692). The rules were checked against that paper's code
(lasgroup/ActiveUltraFeedback, acquisition_function/):

  random       two distinct episodes uniformly.
  uncertainty  the pair whose return difference R(A) - R(B) the posterior is least sure of (largest sample std
               of the difference); with one sample, the pair the model finds closest (|mean difference| least).
  drts         Double Reverse Thompson Sampling: A = argmax of mean + beta z std, B = argmin of mean + beta z' std,
               with z, z' ~ U(-1, 1) per episode (the paper's draw); redraw B up to 30 times if it equals A.
               A large predicted quality gap, with exploration.
  deltaucb     DeltaUCB: the pair maximising the optimistic gap UCB(A) - LCB(B) = (mean_A + beta std_A) -
               (mean_B - beta std_B).
  dts          Double Thompson Sampling (Wu & Liu 2016), the dueling-bandit baseline as the paper runs it: A and
               B are both the argmax of an independent draw mean + beta z std (redrawn until distinct): two
               plausible winners, a close duel.

Pairs already asked are excluded (`asked`): no query is shown twice. All rules are numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import numpy as np

RULES = ("random", "uncertainty", "drts", "deltaucb", "dts")
MAX_REDRAWS = 30


def _key(i: int, j: int) -> tuple[int, int]:
    return (i, j) if i < j else (j, i)


def _best_pair(score: np.ndarray, cand: np.ndarray, asked: Collection[tuple[int, int]]) -> tuple[int, int] | None:
    """The (i, j) with the highest score[a, b] over candidate positions, i != j, not asked yet."""
    s = score.copy()
    np.fill_diagonal(s, -np.inf)
    for a, b in np.ndindex(*s.shape):
        if np.isfinite(s[a, b]) and _key(int(cand[a]), int(cand[b])) in asked:
            s[a, b] = -np.inf
    if not np.isfinite(s).any():
        return None
    a, b = np.unravel_index(int(np.argmax(s)), s.shape)
    return int(cand[a]), int(cand[b])


def _draw(mean: np.ndarray, std: np.ndarray, beta: float, rng: np.random.Generator) -> np.ndarray:
    return mean + beta * rng.uniform(-1.0, 1.0, size=mean.shape) * std


def select(rule: str, samples: np.ndarray, candidates: np.ndarray, rng: np.random.Generator,
           asked: Collection[tuple[int, int]] = (), beta: float = 1.0) -> tuple[int, int] | None:
    """One pair (episode indices into the samples' columns) among `candidates`, or None when every pair of them
    has been asked."""
    cand = np.asarray(candidates, int)
    if len(cand) < 2:
        return None
    s = np.asarray(samples, np.float64)[:, cand]
    mean, std = s.mean(0), s.std(0)
    if rule == "random":
        return _random(cand, rng, asked)
    if rule == "uncertainty":
        if s.shape[0] > 1:
            diff = s[:, :, None] - s[:, None, :]
            return _best_pair(diff.std(0), cand, asked)
        return _best_pair(-np.abs(mean[:, None] - mean[None, :]), cand, asked)
    if rule == "deltaucb":
        return _best_pair((mean + beta * std)[:, None] - (mean - beta * std)[None, :], cand, asked)
    if rule in ("drts", "dts"):
        first = _draw
        second: Callable = (lambda m, sd, b, r: -_draw(-m, sd, b, r)) if rule == "drts" else _draw
        for _ in range(MAX_REDRAWS):
            a = int(np.argmax(first(mean, std, beta, rng)))
            pick = second(mean, std, beta, rng)
            b = int(np.argmin(pick)) if rule == "drts" else int(np.argmax(pick))
            if a != b and _key(int(cand[a]), int(cand[b])) not in asked:
                return int(cand[a]), int(cand[b])
        return _random(cand, rng, asked)  # the paper falls back to a random second episode
    raise ValueError(f"pair rule {rule!r}: expected one of {RULES}")


def _random(cand: np.ndarray, rng: np.random.Generator, asked: Collection[tuple[int, int]]) -> tuple[int, int] | None:
    free = [(int(a), int(b)) for k, a in enumerate(cand) for b in cand[k + 1:] if _key(int(a), int(b)) not in asked]
    if not free:
        return None
    i, j = free[int(rng.integers(len(free)))]
    return (i, j) if rng.random() < 0.5 else (j, i)


def select_batch(rule: str, samples: np.ndarray, groups: dict[str, np.ndarray], size: int, rng: np.random.Generator,
                 asked: set[tuple[int, int]], beta: float = 1.0, start: int = 0) -> list[tuple[str, int, int]]:
    """`size` pairs from the same posterior, taking the tasks (`groups`: task -> episode indices) in turn from
    position `start`; each pair is added to `asked` as it is chosen, so a batch never repeats itself."""
    tasks = sorted(groups)
    out: list[tuple[str, int, int]] = []
    for k in range(size * len(tasks)):
        if len(out) == size:
            break
        task = tasks[(start + k) % len(tasks)]
        pair = select(rule, samples, groups[task], rng, asked, beta)
        if pair is not None:
            asked.add(_key(*pair))
            out.append((task, *pair))
    return out
