"""The manifest of a policy bundle: everything the runtime must know about a policy besides its graph.

A bundle is a folder holding `policy.onnx` and `manifest.json`.  The manifest names the policy kind,
what the robot must send (observation arrays), what comes back (the action and its bounds), how the
graph's inputs and outputs are named, normalisation, chunking, the control rate, the safe action, where
the policy came from, and the sha256 of the ONNX file (checked on load).  docs/bundles.md has an example.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vigil.wire.protocol import ArraySpec, ProtocolError

FORMAT = 1
KINDS = ("linear_gain", "gaussian", "flow_ensemble")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the key and what was expected."""


@dataclass(frozen=True)
class Normalisation:
    """obs' = clip((obs - mean) / std, -clip, clip) for one observation array."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    clip: float = 10.0


@dataclass(frozen=True)
class Manifest:
    name: str
    kind: str
    observation: tuple[ArraySpec, ...]
    action: ArraySpec
    safe_action: tuple[float, ...]
    control_rate_hz: float
    sha256: str
    onnx_file: str = "policy.onnx"
    onnx_inputs: Mapping[str, str] = field(default_factory=dict)  # graph input name -> observation array
    onnx_action: str = "action"  # graph output holding the (batch, [chunk,] action) result
    onnx_scores: tuple[str, ...] = ()  # graph outputs reported to the monitors as scalars
    chunk_length: int = 1
    chunk_execute: int = 1  # actions executed from each chunk before replanning
    normalisation: Mapping[str, Normalisation] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    monitor: Mapping[str, Any] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)
    learner: Mapping[str, Any] = field(default_factory=dict)  # online learner (linear_gain): policies/irlqr.py
    format: int = FORMAT

    @property
    def policy_id(self) -> str:
        return f"{self.name}@{self.sha256[:12]}"

    def for_wire(self) -> dict[str, Any]:
        """The manifest as the hello reply carries it: whole, except the monitors' calibration bands (per task and
        step, they run to hundreds of kB for the dynamics monitor, past the 64 KiB header limit, and a robot has no
        use for them); each block that had them says `bands_omitted` with the tasks it covers."""
        d = self.to_dict()
        for block in d["monitor"].values():
            if isinstance(block, dict) and isinstance(block.get("bands"), dict):
                block["bands_omitted"] = sorted(block.pop("bands"))
        return d

    def to_dict(self) -> dict[str, Any]:
        d = {
            "format": self.format, "name": self.name, "kind": self.kind,
            "observation": [s.to_dict() for s in self.observation], "action": self.action.to_dict(),
            "safe_action": list(self.safe_action), "control_rate_hz": self.control_rate_hz,
            "onnx": {"file": self.onnx_file, "sha256": self.sha256, "inputs": dict(self.onnx_inputs),
                     "action": self.onnx_action, "scores": list(self.onnx_scores)},
            "chunk": {"length": self.chunk_length, "execute": self.chunk_execute},
            "normalisation": {k: asdict(v) for k, v in self.normalisation.items()},
            "provenance": dict(self.provenance), "monitor": dict(self.monitor), "extra": dict(self.extra),
        }
        if self.learner:
            d["learner"] = dict(self.learner)
        return json.loads(json.dumps(d))  # tuples -> lists, a plain JSON tree

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        def need(key: str, typ: type | tuple, what: str) -> Any:
            if key not in d:
                raise ManifestError(f"manifest key {key!r} is missing; expected {what}")
            if not isinstance(d[key], typ) or isinstance(d[key], bool) and typ is not bool:
                raise ManifestError(f"manifest key {key!r} must be {what}, got {d[key]!r}")
            return d[key]

        fmt = d.get("format", FORMAT)
        if fmt != FORMAT:
            raise ManifestError(f"manifest key 'format' must be {FORMAT}, got {fmt!r}")
        kind = need("kind", str, f"one of {KINDS}")
        if kind not in KINDS:
            raise ManifestError(f"manifest key 'kind' must be one of {KINDS}, got {kind!r}")
        try:
            observation = tuple(ArraySpec.from_dict(s, f"observation[{i}]")
                                for i, s in enumerate(need("observation", list, "a list of array specs")))
            action = ArraySpec.from_dict(need("action", dict, "an array spec"), "action")
        except ProtocolError as exc:
            raise ManifestError(f"manifest {exc.message}") from None
        if not observation:
            raise ManifestError("manifest key 'observation' must list at least one array")
        if len(action.shape) != 1:
            raise ManifestError(f"manifest key 'action.shape' must be one-dimensional [m], got {list(action.shape)}")
        safe = need("safe_action", list, f"a list of {action.shape[0]} numbers")
        if len(safe) != action.shape[0] or not all(isinstance(x, (int, float)) for x in safe):
            raise ManifestError(f"manifest key 'safe_action' must be a list of {action.shape[0]} numbers, got {safe!r}")
        rate = need("control_rate_hz", (int, float), "a positive number (Hz)")
        if rate <= 0:
            raise ManifestError(f"manifest key 'control_rate_hz' must be a positive number (Hz), got {rate!r}")
        onnx = need("onnx", dict, "a map with file, sha256, inputs, action")
        sha = onnx.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64:
            raise ManifestError("manifest key 'onnx.sha256' must be the 64-hex-digit sha256 of the ONNX file")
        inputs = onnx.get("inputs") or {s.name: s.name for s in observation}
        if not isinstance(inputs, dict):
            raise ManifestError(f"manifest key 'onnx.inputs' must be a map of graph input name -> observation array, "
                                f"got {inputs!r}")
        names = {s.name for s in observation}
        for graph_name, array in inputs.items():
            if array not in names:
                raise ManifestError(f"manifest key 'onnx.inputs.{graph_name}' must name an observation array "
                                    f"({sorted(names)}), got {array!r}")
        chunk = d.get("chunk", {})
        if not isinstance(chunk, dict):
            raise ManifestError(f"manifest key 'chunk' must be a map {{length, execute}}, got {chunk!r}")
        length, execute = chunk.get("length", 1), chunk.get("execute", chunk.get("length", 1))
        if type(length) is not int or type(execute) is not int or length < 1 or not 1 <= execute <= length:
            raise ManifestError(f"manifest key 'chunk' must satisfy 1 <= execute <= length, got {chunk!r}")
        norms = {}
        shapes = {s.name: s.shape for s in observation}
        for key, n in (d.get("normalisation") or {}).items():
            if key not in names:
                raise ManifestError(f"manifest key 'normalisation.{key}' must name an observation array "
                                    f"({sorted(names)})")
            size = shapes[key][-1] if shapes[key] else 1
            for part in ("mean", "std"):
                v = n.get(part) if isinstance(n, dict) else None
                if not isinstance(v, list) or len(v) != size or not all(isinstance(x, (int, float)) for x in v):
                    raise ManifestError(f"manifest key 'normalisation.{key}.{part}' must be a list of {size} numbers")
            if not all(x > 0 for x in n["std"]):
                raise ManifestError(f"manifest key 'normalisation.{key}.std' must be positive")
            norms[key] = Normalisation(tuple(n["mean"]), tuple(n["std"]), float(n.get("clip", 10.0)))
        monitor = d.get("monitor", {})
        if not isinstance(monitor, dict):
            raise ManifestError(f"manifest key 'monitor' must be a map, got {monitor!r}")
        learner = d.get("learner")
        if learner is not None:
            _check_learner(learner, kind, observation, action, norms, d.get("extra", {}))
        if "stability" in monitor:
            from vigil.monitors.stability import check_block

            try:
                check_block(monitor["stability"], shapes)
            except ValueError as exc:
                raise ManifestError(str(exc)) from None
        return cls(
            name=need("name", str, "a string"), kind=kind, observation=observation, action=action,
            safe_action=tuple(float(x) for x in safe), control_rate_hz=float(rate), sha256=sha,
            onnx_file=onnx.get("file", "policy.onnx"), onnx_inputs=dict(inputs),
            onnx_action=onnx.get("action", "action"), onnx_scores=tuple(onnx.get("scores", ())),
            chunk_length=length, chunk_execute=execute, normalisation=norms,
            provenance=d.get("provenance", {}), monitor=monitor, extra=d.get("extra", {}),
            learner=learner or {},
        )


def _check_learner(block: Any, kind: str, observation: tuple[ArraySpec, ...], action: ArraySpec,
                   norms: Mapping[str, Normalisation], extra: Any) -> None:
    """A `learner` block (an online learner of the gain, runtime/learning.py) fits only a linear_gain
    policy acting u = -K x on one float32 state vector: no normalisation, no offset."""
    from vigil.policies.irlqr import LearnerError, LearnerSpec

    if kind != "linear_gain":
        raise ManifestError(f"manifest key 'learner' is for kind linear_gain only, this bundle is {kind!r}")
    if len(observation) != 1 or len(observation[0].shape) != 1 or observation[0].dtype != "float32":
        raise ManifestError("manifest key 'learner' needs exactly one observation array, a float32 vector [n] "
                            f"(the state), got {[f'{s.name} {s.dtype}{list(s.shape)}' for s in observation]}")
    if norms:
        raise ManifestError("manifest key 'learner' cannot be combined with 'normalisation': the learner models "
                            "the raw state")
    offset = extra.get("offset") if isinstance(extra, dict) else None
    if offset is not None and (not isinstance(offset, list) or any(v != 0 for v in offset)):
        raise ManifestError(f"manifest key 'learner' needs u = -K x: 'extra.offset' must be zeros, got {offset!r}")
    try:
        LearnerSpec.from_dict(block, observation[0].shape[0], action.shape[0])
    except LearnerError as exc:
        raise ManifestError(str(exc)) from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: str | Path) -> Manifest:
    """Load and validate `folder/manifest.json`, and check the ONNX file against its sha256."""
    folder = Path(folder)
    path = folder / "manifest.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path} not found: a bundle is a folder with policy.onnx and manifest.json") from None
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from None
    manifest = Manifest.from_dict(raw)
    onnx_path = folder / manifest.onnx_file
    if not onnx_path.is_file():
        raise ManifestError(f"manifest key 'onnx.file' names {onnx_path}, which does not exist")
    actual = sha256_file(onnx_path)
    if actual != manifest.sha256:
        raise ManifestError(f"{onnx_path} has sha256 {actual}, but manifest key 'onnx.sha256' says {manifest.sha256}: "
                            "the bundle was modified or is incomplete")
    return manifest


def write_bundle(folder: str | Path, onnx_bytes: bytes, manifest: Mapping[str, Any]) -> Manifest:
    """Write `policy.onnx` and `manifest.json` (sha256 filled in); returns the validated manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    d = json.loads(json.dumps(manifest))
    onnx = d.setdefault("onnx", {})
    onnx.setdefault("file", "policy.onnx")
    (folder / onnx["file"]).write_bytes(onnx_bytes)
    onnx["sha256"] = hashlib.sha256(onnx_bytes).hexdigest()
    d.setdefault("format", FORMAT)
    m = Manifest.from_dict(d)
    (folder / "manifest.json").write_text(json.dumps(m.to_dict(), indent=2) + "\n")
    return m
