"""Load a policy bundle into an onnxruntime session and run it: observation arrays in, action chunk out.

One `Policy` per bundle is shared by every robot the runtime serves (the session is stateless); the
per-robot state of executing it (the chunk queue) lives in `vigil.policies.agent.Agent`.
Kinds differ only in small ways, so each is a small subclass registered in `POLICY_KINDS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from vigil.policies.manifest import Manifest, ManifestError, read_manifest
from vigil.wire.protocol import ProtocolError


class Plan(NamedTuple):
    """One policy evaluation: an action chunk (H, m), unclipped, and the scalar scores for the monitors."""

    actions: np.ndarray
    scores: Mapping[str, float]


def session_options(threads: int = 1) -> ort.SessionOptions:
    """One intra-op thread, sequential, all graph optimisations: fastest for small policies at batch 1."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # warnings such as "initializer in graph inputs" are by design here
    return opts


def providers(prefer_gpu: bool = True) -> list[str]:
    """CUDA when onnxruntime has it (the `vigil[gpu]` extra), CPU otherwise."""
    available = ort.get_available_providers()
    chosen = ["CUDAExecutionProvider"] if prefer_gpu and "CUDAExecutionProvider" in available else []
    return chosen + ["CPUExecutionProvider"]


_NO_SCORES: Mapping[str, float] = {}
# manifest `extra.rtc.mode` values (docs/rtc.md); training.flow.RTC_MODES, which onboard code cannot import
RTC_MODES = ("guided", "trained")


def _fast_run(session: ort.InferenceSession) -> Callable:
    """`session.run` without the Python wrapper's per-call checks of input names and value ownership (about 5 us
    of a 13 us call on a small MLP): the runtime feeds only the inputs the manifest names, checked against the
    graph when the bundle loads. Falls back to the public `run` where this onnxruntime has no `_sess`."""
    inner = getattr(session, "_sess", None)
    if inner is not None and callable(getattr(inner, "run", None)):
        return inner.run
    return lambda names, feed, options: session.run(names, feed, options)


class Policy:
    """Runs the bundle's graph at batch 1. Subclasses adapt kind-specific inputs and outputs."""

    def __init__(self, folder: Path, manifest: Manifest, threads: int = 1, prefer_gpu: bool = True,
                 previous: Policy | None = None):
        self.folder = folder
        self.manifest = manifest
        self.session = ort.InferenceSession(str(folder / manifest.onnx_file), session_options(threads),
                                            providers=providers(prefer_gpu))
        graph_inputs = {i.name for i in self.session.get_inputs()}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        for name in manifest.onnx_inputs:
            if name not in graph_inputs:
                raise ManifestError(f"manifest key 'onnx.inputs' names graph input {name!r}, "
                                    f"but the graph's inputs are {sorted(graph_inputs)}")
        for name in (manifest.onnx_action, *manifest.onnx_scores):
            if name not in graph_outputs:
                raise ManifestError(f"manifest key 'onnx' names graph output {name!r}, "
                                    f"but the graph's outputs are {sorted(graph_outputs)}")
        self._fetch = [manifest.onnx_action, *manifest.onnx_scores]
        self._inputs = list(manifest.onnx_inputs.items())
        self._norm = {k: (np.asarray(n.mean, np.float32), np.asarray(n.std, np.float32), n.clip)
                      for k, n in manifest.normalisation.items()}
        self._chunk_shape = (manifest.chunk_length, manifest.action.shape[0])
        self._run = _fast_run(self.session)
        # graph inputs with a free leading (batch) axis: feeds of several robots can be stacked along it
        self.batch_inputs = frozenset(i.name for i in self.session.get_inputs()
                                      if i.shape and not isinstance(i.shape[0], int))
        # the forward-dynamics ensemble that rides with the bundle (monitors/dynamics.py): loaded and checked once
        # here, so that a bad block refuses the bundle, and shared by every robot's dynamics monitor
        self.dynamics = None
        if "dynamics" in manifest.monitor:
            from vigil.monitors.dynamics import DynamicsMonitor
            from vigil.policies.dynamics import DynamicsModel

            try:
                self.dynamics = DynamicsModel(folder, manifest.monitor["dynamics"])
                DynamicsMonitor.from_block(manifest.monitor["dynamics"], self.dynamics)
            except ValueError as exc:
                raise ManifestError(str(exc)) from None

    def feed(self, obs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Graph inputs for one observation: normalised where the manifest says, with a batch axis of 1."""
        feed = {}
        for graph_name, array in self._inputs:
            x = obs[array]
            norm = self._norm.get(array)
            if norm is not None:
                mean, std, clip = norm
                x = np.clip((x - mean) / std, -clip, clip).astype(np.float32, copy=False)
            feed[graph_name] = x[None]
        return feed

    def episode_inputs(self, instruction: str | None) -> dict[str, np.ndarray]:
        """Graph inputs fixed for a whole episode (the flow ensemble's instruction embedding)."""
        return {}

    def plan_inputs(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Graph inputs drawn afresh for every plan (the flow ensemble's noise, an exploring actor's)."""
        return {}

    @property
    def draws_inputs(self) -> bool:
        """Whether `plan_inputs` draws anything (the agent skips the call when not)."""
        return type(self).plan_inputs is not Policy.plan_inputs

    def infer(self, obs: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray] | None = None) -> Plan:
        feed = self.feed(obs)
        if extra:
            feed.update(extra)
        outputs = self._run(self._fetch, feed, None)
        actions = outputs[0]
        if actions.dtype != np.float32 or actions.shape != self._chunk_shape:
            actions = np.asarray(actions, dtype=np.float32).reshape(self._chunk_shape)
        if len(outputs) == 1:
            return Plan(actions, _NO_SCORES)
        scores = {name: float(np.asarray(v).reshape(-1)[0]) for name, v in zip(self._fetch[1:], outputs[1:])}
        return Plan(actions, scores)


    def can_batch(self, feed: Mapping[str, np.ndarray]) -> bool:
        """Whether this feed (one robot's, batch 1) can be stacked with others' into one call."""
        return all(k in self.batch_inputs and v.shape[:1] == (1,) for k, v in feed.items())

    def infer_batch(self, obs: list[Mapping[str, np.ndarray]],
                    extras: list[Mapping[str, np.ndarray] | None]) -> list[Plan]:
        """Several robots' plans in one onnxruntime call: their feeds stacked along the batch axis (each must
        pass `can_batch`, with the same inputs). Plan i is robot i's, as `infer` would have made it."""
        feeds = []
        for o, extra in zip(obs, extras):
            feed = self.feed(o)
            if extra:
                feed.update(extra)
            feeds.append(feed)
        self._check_batch(feeds)
        keys = feeds[0].keys()
        if any(f.keys() != keys or not self.can_batch(f) for f in feeds):
            raise ValueError("feeds of a batch must have the same inputs, each with a batch axis of 1")
        outputs = self._run(self._fetch, {k: np.concatenate([f[k] for f in feeds]) for k in keys}, None)
        actions = np.asarray(outputs[0], dtype=np.float32).reshape((len(feeds), *self._chunk_shape))
        scores = [np.asarray(v).reshape(len(feeds), -1)[:, 0].tolist() for v in outputs[1:]]
        names = self._fetch[1:]
        return [Plan(actions[i], {name: float(col[i]) for name, col in zip(names, scores)} if names else _NO_SCORES)
                for i in range(len(feeds))]

    def _check_batch(self, feeds: list[dict[str, np.ndarray]]) -> None:
        """Kind-specific checks of a batch's feeds (the flow ensemble needs an instruction in each)."""


class LinearGainPolicy(Policy):
    """u = offset - K x. The graph takes `gain` as an input with K as its default, so K can be replaced
    between ticks without rebuilding the session: for every robot by `set_gain`, or for one robot by
    feeding `gain` through `infer`'s extra inputs (the runtime's online learner does that, per session,
    through `Agent.inputs`)."""

    def __init__(self, folder: Path, manifest: Manifest, threads: int = 1, prefer_gpu: bool = True,
                 previous: Policy | None = None):
        super().__init__(folder, manifest, threads, prefer_gpu)
        self.gain: np.ndarray | None = None
        self.learner_spec = None  # the manifest's online learner (policies/irlqr.py), parsed once at load
        if manifest.learner:
            from vigil.policies.irlqr import LearnerSpec

            self.learner_spec = LearnerSpec.from_dict(manifest.learner, manifest.observation[0].shape[0],
                                                      manifest.action.shape[0])

    def set_gain(self, gain: np.ndarray) -> None:
        m, n = self.manifest.action.shape[0], self.manifest.observation[0].shape[0]
        gain = np.ascontiguousarray(gain, dtype=np.float32)
        if gain.shape != (m, n):
            raise ValueError(f"gain must have shape ({m}, {n}), got {gain.shape}")
        self.gain = gain

    def feed(self, obs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = super().feed(obs)
        if self.gain is not None:
            feed["gain"] = self.gain
        return feed


class GaussianPolicy(Policy):
    """A BPO/PPO actor. Deployed, the graph's action output is the Gaussian's mean, used deterministically.

    An *exploring* bundle (manifest `extra.exploration: {"noise_input": ...}`, written by `vigil learn --algo
    bpo|ppo`, docs/online_rl.md §5) samples instead: its graph takes a standard normal draw per plan, from the
    robot's own generator (so a seeded episode is reproducible), and reports the log-probability of the action
    the robot gets (clipped to the bounds: a censored Gaussian) as the score `logp`, which the transition log
    keeps for an on-policy learner.
    """

    def __init__(self, folder: Path, manifest: Manifest, threads: int = 1, prefer_gpu: bool = True,
                 previous: Policy | None = None):
        super().__init__(folder, manifest, threads, prefer_gpu)
        self.noise_input: str | None = None
        block = manifest.extra.get("exploration")
        if block is None:
            return
        names = {i.name for i in self.session.get_inputs()}
        if not isinstance(block, Mapping) or block.get("noise_input") not in names:
            raise ManifestError(f"manifest key 'extra.exploration.noise_input' must name a graph input (one of "
                                f"{sorted(names)}), got {block!r}")
        if "logp" not in manifest.onnx_scores:
            raise ManifestError("manifest key 'onnx.scores' must list 'logp' for an exploring gaussian bundle")
        self.noise_input = str(block["noise_input"])
        self._noise_shape = (1, manifest.action.shape[0])

    @property
    def draws_inputs(self) -> bool:
        return self.noise_input is not None

    def plan_inputs(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        if self.noise_input is None:
            return {}
        return {self.noise_input: rng.standard_normal(self._noise_shape, dtype=np.float32)}


class FlowEnsemblePolicy(Policy):
    """A flow-matching ensemble exported as one graph (training/flow_export.py): observation arrays, the
    instruction embedding and the noise in; the action chunk and the VFD score out, in one `run`.

    The instruction is embedded once per episode (`episode_inputs`, onboard encoder bundle named by the
    manifest's `extra.encoder`); the noise is drawn for every plan from the robot's own generator, so a
    seeded episode is reproducible.  Manifest `extra`: instruction_input, noise_input, noise_shape
    [N, H, m], encoder (folder inside the bundle), and for real-time chunking (docs/rtc.md) `rtc`:
    {"mode": "guided" | "trained", "prefix_input", "weight_input", "max_guidance" | "max_delay"}. An RTC
    graph takes the executing chunk's remaining actions (`rtc_inputs`); a plan without them gets zero
    weights, so synchronous execution of an RTC bundle is a plain plan.
    """

    def __init__(self, folder: Path, manifest: Manifest, threads: int = 1, prefer_gpu: bool = True,
                 previous: Policy | None = None):
        super().__init__(folder, manifest, threads, prefer_gpu)
        extra = manifest.extra
        for key in ("instruction_input", "noise_input", "noise_shape"):
            if key not in extra:
                raise ManifestError(f"manifest key 'extra.{key}' is required for kind flow_ensemble")
        self.instruction_input, self.noise_input = str(extra["instruction_input"]), str(extra["noise_input"])
        self.noise_shape = (1, *(int(s) for s in extra["noise_shape"]))
        self.rtc_mode: str | None = None
        self.prefix_input: str | None = None
        self.weight_input: str | None = None
        self.rtc_max_delay: int | None = None
        self.rtc_max_guidance: float | None = None
        self._rtc_zeros: dict[str, np.ndarray] = {}
        if extra.get("rtc") is not None:
            self._parse_rtc(extra["rtc"])
        self.encoder = None
        if extra.get("encoder"):
            from vigil.policies.instructions import InstructionEncoder

            # a hot swap to a bundle with the same encoder (a SAVE round's) shares the serving one: no second
            # session to create (onnxruntime holds the GIL while it builds one), and its cache stays warm
            self.encoder = InstructionEncoder.load(folder / str(extra["encoder"]),
                                                   reuse=getattr(previous, "encoder", None))

    def _parse_rtc(self, block: object) -> None:
        """Manifest `extra.rtc` -> attributes; the zero prefix fed when a plan comes without one."""
        if not isinstance(block, Mapping):
            raise ManifestError(f"manifest key 'extra.rtc' must be a map, got {block!r}")
        mode = block.get("mode")
        if mode not in RTC_MODES:
            raise ManifestError(f"manifest key 'extra.rtc.mode' must be one of {RTC_MODES}, got {mode!r}")
        names = {i.name for i in self.session.get_inputs()}
        for key in ("prefix_input", "weight_input"):
            if not isinstance(block.get(key), str) or block[key] not in names:
                raise ManifestError(f"manifest key 'extra.rtc.{key}' must name a graph input (one of "
                                    f"{sorted(names)}), got {block.get(key)!r}")
        self.rtc_mode, self.prefix_input, self.weight_input = mode, block["prefix_input"], block["weight_input"]
        if mode == "trained":
            self.rtc_max_delay = int(block.get("max_delay", 0))
        else:
            self.rtc_max_guidance = float(block.get("max_guidance", 5.0))
        H, m = self._chunk_shape
        self._rtc_zeros = {self.prefix_input: np.zeros((1, H, m), np.float32),
                           self.weight_input: np.zeros((1, H), np.float32)}

    def rtc_inputs(self, prefix: np.ndarray, weight: np.ndarray) -> dict[str, np.ndarray]:
        """The RTC graph inputs of one plan, with the batch axis: prefix (H, m) = the executing chunk's
        remaining actions on the new chunk's indices (zero-padded), weight (H,) = W (policies/rtc.py
        `prefix_weights`; for "trained" bundles a hard 0/1 mask). Pass them as `infer`'s extra inputs."""
        if self.rtc_mode is None:
            raise ValueError(f"bundle {self.manifest.name!r} has no real-time chunking (manifest key 'extra.rtc')")
        H, m = self._chunk_shape
        prefix = np.asarray(prefix, dtype=np.float32)
        weight = np.asarray(weight, dtype=np.float32)
        if prefix.shape != (H, m):
            raise ValueError(f"RTC prefix must have shape ({H}, {m}) (chunk length, action dims), got {prefix.shape}")
        if weight.shape != (H,):
            raise ValueError(f"RTC prefix weight must have shape ({H},) (one per chunk index), got {weight.shape}")
        return {self.prefix_input: prefix[None], self.weight_input: weight[None]}

    def _with_rtc(self, extra: Mapping[str, np.ndarray] | None) -> Mapping[str, np.ndarray] | None:
        """extra plus zero RTC inputs where it lacks them (W = 0: the plain plan)."""
        if not self._rtc_zeros or (extra and all(k in extra for k in self._rtc_zeros)):
            return extra
        return {**self._rtc_zeros, **(extra or {})}

    def episode_inputs(self, instruction: str | None) -> dict[str, np.ndarray]:
        if instruction is None:
            return {}
        if self.encoder is None:
            raise ManifestError("this flow_ensemble bundle has no instruction encoder (manifest key 'extra.encoder')")
        return {self.instruction_input: self.encoder.embed([instruction]).astype(np.float32)}

    def plan_inputs(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {self.noise_input: rng.standard_normal(self.noise_shape, dtype=np.float32)}

    def infer(self, obs: Mapping[str, np.ndarray], extra: Mapping[str, np.ndarray] | None = None) -> Plan:
        if not extra or self.instruction_input not in extra:
            raise _no_instruction()
        return super().infer(obs, self._with_rtc(extra))

    def infer_batch(self, obs: list[Mapping[str, np.ndarray]],
                    extras: list[Mapping[str, np.ndarray] | None]) -> list[Plan]:
        if self._rtc_zeros:
            extras = [self._with_rtc(e) for e in extras]
        return super().infer_batch(obs, extras)

    def _check_batch(self, feeds: list[dict[str, np.ndarray]]) -> None:
        if any(self.instruction_input not in f for f in feeds):
            raise _no_instruction()


def _no_instruction() -> ProtocolError:
    return ProtocolError("no_instruction", "this policy is language-conditioned: send reset with an "
                         "'instruction' before observations")


POLICY_KINDS: dict[str, type[Policy]] = {"linear_gain": LinearGainPolicy, "gaussian": GaussianPolicy,
                                         "flow_ensemble": FlowEnsemblePolicy}


def load_policy(folder: str | Path, threads: int = 1, prefer_gpu: bool = True,
                previous: Policy | None = None) -> Policy:
    """Read and verify a bundle folder and start its onnxruntime session. `previous`: the policy this one
    replaces (hot swap); parts that are byte-identical (the instruction encoder) are shared, not reloaded."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    cls = POLICY_KINDS.get(manifest.kind)
    if cls is None:
        raise ManifestError(f"manifest key 'kind' is {manifest.kind!r}; this runtime hosts {sorted(POLICY_KINDS)}")
    return cls(folder, manifest, threads, prefer_gpu, previous)
