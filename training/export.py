"""Write policy bundles: the ONNX graph plus its manifest (see vigil.policies.manifest).

Graphs take a leading batch axis on every input and output, so one session can serve several robots.
"""

from __future__ import annotations

import datetime
import io
import platform
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vigil.policies.manifest import Manifest, write_bundle
from vigil.wire.protocol import ArraySpec

OPSET = 17


def provenance(**extra: Any) -> dict[str, Any]:
    """Who made this bundle, when, from which commit, with what settings."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "git_commit": commit or "unknown", "python": platform.python_version(), **extra}


def linear_gain_graph(K: np.ndarray, offset: np.ndarray | None = None) -> onnx.ModelProto:
    """u = offset - x K^T for a batch of states x (b, n). `gain` (m, n) is an input whose default is K,
    so the runtime can feed a new gain (online LQR) without a new graph."""
    K = np.asarray(K, np.float32)
    m, n = K.shape
    offset = np.zeros(m, np.float32) if offset is None else np.asarray(offset, np.float32)
    nodes = [
        helper.make_node("Transpose", ["gain"], ["gain_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["state", "gain_t"], ["kx"]),
        helper.make_node("Sub", ["offset", "kx"], ["action"]),
    ]
    graph = helper.make_graph(
        nodes, "linear_gain",
        inputs=[helper.make_tensor_value_info("state", TensorProto.FLOAT, ["batch", n]),
                helper.make_tensor_value_info("gain", TensorProto.FLOAT, [m, n])],
        outputs=[helper.make_tensor_value_info("action", TensorProto.FLOAT, ["batch", m])],
        initializer=[numpy_helper.from_array(K, "gain"), numpy_helper.from_array(offset, "offset")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="vigil")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def export_linear_gain(folder: str | Path, name: str, K: np.ndarray, control_rate_hz: float,
                       offset: np.ndarray | None = None, action_low: Sequence[float] | None = None,
                       action_high: Sequence[float] | None = None, state_low: Sequence[float] | None = None,
                       state_high: Sequence[float] | None = None, prov: Mapping[str, Any] | None = None,
                       extra: Mapping[str, Any] | None = None, learner: Mapping[str, Any] | None = None,
                       monitor: Mapping[str, Any] | None = None) -> Manifest:
    """`learner`: an online learner block (policies/irlqr.py LearnerSpec.to_dict), `monitor`: monitor settings
    (e.g. `stability`); both validated by write_bundle like every other key."""
    K = np.asarray(K, np.float64)
    m, n = K.shape
    model = linear_gain_graph(K, offset)
    return write_bundle(folder, model.SerializeToString(), {
        **({"learner": dict(learner)} if learner else {}), **({"monitor": dict(monitor)} if monitor else {}),
        "name": name, "kind": "linear_gain",
        "observation": [ArraySpec("state", "float32", (n,), _tup(state_low), _tup(state_high)).to_dict()],
        "action": ArraySpec("action", "float32", (m,), _tup(action_low), _tup(action_high)).to_dict(),
        "safe_action": [0.0] * m, "control_rate_hz": control_rate_hz,
        "onnx": {"inputs": {"state": "state"}, "action": "action"},
        "provenance": dict(prov or provenance()),
        "extra": {"gain": K.tolist(), "offset": [0.0] * m if offset is None else list(map(float, offset)),
                  **(extra or {})},
    })


def export_gaussian(folder: str | Path, name: str, actor, obs_dim: int, action_low: Sequence[float],
                    action_high: Sequence[float], control_rate_hz: float,
                    obs_mean: Sequence[float] | None = None, obs_std: Sequence[float] | None = None,
                    prov: Mapping[str, Any] | None = None) -> Manifest:
    """Export a torch actor whose forward(obs) returns the Gaussian mean (b, m). Observation
    normalisation, if given, is recorded in the manifest and applied by the runtime."""
    import torch

    actor = actor.eval()
    buf = io.BytesIO()
    example = torch.zeros(1, obs_dim)
    torch.onnx.export(actor, (example,), buf, input_names=["obs"], output_names=["action"],
                      dynamic_axes={"obs": {0: "batch"}, "action": {0: "batch"}}, opset_version=OPSET, dynamo=False)
    m = len(action_low)
    manifest: dict[str, Any] = {
        "name": name, "kind": "gaussian",
        "observation": [ArraySpec("state", "float32", (obs_dim,)).to_dict()],
        "action": ArraySpec("action", "float32", (m,), _tup(action_low), _tup(action_high)).to_dict(),
        "safe_action": [0.0] * m, "control_rate_hz": control_rate_hz,
        "onnx": {"inputs": {"obs": "state"}, "action": "action"},
        "provenance": dict(prov or provenance()),
    }
    if obs_mean is not None and obs_std is not None:
        manifest["normalisation"] = {"state": {"mean": list(map(float, obs_mean)), "std": list(map(float, obs_std))}}
    return write_bundle(folder, buf.getvalue(), manifest)


def _tup(x: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if x is None else tuple(float(v) for v in np.asarray(x).ravel())
