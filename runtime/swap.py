"""Hot swap: load a new policy bundle while the runtime keeps serving, then hand it to the loop.

Everything slow happens on a background thread: reading and verifying the bundle (manifest, sha256 of the
graph), creating the onnxruntime session, loading the instruction encoder (shared with the serving policy
when the bundles' encoders are identical, as a SAVE round's are), embedding the instructions the connected
robots are using, and one warm-up inference (onnxruntime's first
run allocates; paid here, it is not paid by a robot's tick).  The loop only polls `BundleLoader.result()`
from its timers and, when a policy is ready, swaps a reference between ticks (runtime/server.py).

A bundle the connected robots could not use is refused and the old one keeps serving: it must take the
same observation arrays (names, dtypes, shapes), give the same action shape, run at the same control rate
(robots were told the deadline) and have the same safe action (robots keep the one from their hello reply).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vigil.policies.bundle import Policy, load_policy
from vigil.policies.manifest import Manifest
from vigil.wire.protocol import DTYPES


@dataclass(frozen=True)
class Loaded:
    """What a load produced: the policy ready to serve, or why there is none."""

    bundle: str
    policy: Policy | None
    reason: str = ""


def incompatibility(old: Manifest, new: Manifest) -> str | None:
    """Why robots served by `old` cannot be switched to `new` without a new hello, or None if they can."""
    def specs(m: Manifest) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {s.name: (s.dtype, s.shape) for s in m.observation}

    if specs(old) != specs(new):
        return f"observations differ: serving {specs(old)}, new bundle takes {specs(new)}"
    if old.action.shape != new.action.shape:
        return f"action shapes differ: serving {list(old.action.shape)}, new bundle gives {list(new.action.shape)}"
    if old.control_rate_hz != new.control_rate_hz:
        return f"control rates differ: serving {old.control_rate_hz} Hz, new bundle {new.control_rate_hz} Hz"
    if list(old.safe_action) != list(new.safe_action):
        return f"safe actions differ: serving {list(old.safe_action)}, new bundle {list(new.safe_action)}"
    return None


def warm_up(policy: Policy, instructions: Sequence[str]) -> None:
    """Embed the robots' instructions (cached by the encoder) and run one inference on a zero observation."""
    episode: dict[str, np.ndarray] = {}
    for instruction in instructions:
        episode = policy.episode_inputs(instruction)
    if not episode:
        episode = policy.episode_inputs("warm up") if policy.manifest.kind == "flow_ensemble" else {}
    obs = {s.name: np.zeros(s.shape, DTYPES[s.dtype]) for s in policy.manifest.observation}
    extra = {**episode, **policy.plan_inputs(np.random.default_rng(0))}
    plan = policy.infer(obs, extra or None)
    if not np.all(np.isfinite(plan.actions)):
        raise ValueError("the warm-up inference on a zero observation returned non-finite actions")


class BundleLoader:
    """One load at a time, on a daemon thread; `result()` is polled by the loop and never blocks."""

    def __init__(self, on_done: Callable[[], None] | None = None) -> None:
        self._thread: threading.Thread | None = None
        self._result: Loaded | None = None
        self.on_done = on_done  # called on the loader's thread when a load finishes (the runtime's `wake`)

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def start(self, bundle: str | Path, serving: Policy, threads: int, instructions: Sequence[str]) -> None:
        """Begin loading `bundle` to replace the `serving` policy."""
        if self.busy:
            raise RuntimeError("a bundle is already loading")
        self._result = None
        self._thread = threading.Thread(target=self._load, args=(str(bundle), serving, threads, tuple(instructions)),
                                        name="vigil-bundle-loader", daemon=True)
        self._thread.start()

    def _load(self, bundle: str, serving: Policy, threads: int, instructions: tuple[str, ...]) -> None:
        try:
            policy = load_policy(bundle, threads=threads, previous=serving)
            reason = incompatibility(serving.manifest, policy.manifest)
            if reason is None:
                warm_up(policy, instructions)
            result = Loaded(bundle, None if reason else policy, reason or "")
        except Exception as exc:  # any failure to load is a refusal, never a crash of the runtime
            result = Loaded(bundle, None, f"{type(exc).__name__}: {exc}")
        self._result = result  # one reference assignment: the loop sees all of it or nothing
        if self.on_done is not None:
            self.on_done()

    def result(self) -> Loaded | None:
        """The finished load, once (then the loader is free again); None while loading or idle."""
        if self._thread is None or self._result is None:  # the result is set last thing before the thread ends
            return None
        self._thread.join()
        self._thread, result, self._result = None, self._result, None
        return result
