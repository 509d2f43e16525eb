"""policies/manifest.py: every malformed manifest field is refused with an error naming its key; a manifest
round-trips; a bundle's graph is checked against its checksum."""

from __future__ import annotations

import copy
import json

import pytest

from vigil.policies.bundle import load_policy
from vigil.policies.manifest import Manifest, ManifestError, read_manifest, write_bundle
from vigil.wire.protocol import ArraySpec


@pytest.fixture(scope="module")
def good_manifest(lqr_bundle) -> dict:
    return json.loads((lqr_bundle / "manifest.json").read_text())


def _set(d: dict, path: str, value) -> None:
    keys = path.split(".")
    for k in keys[:-1]:
        d = d[k]
    if value is _DELETE:
        del d[keys[-1]]
    else:
        d[keys[-1]] = value


_DELETE = object()
SHA = "0" * 64

# (path to change, new value, text the error must contain: the key)
MANIFEST_ERRORS = [
    ("format", 2, "'format'"),
    ("kind", _DELETE, "'kind'"),
    ("kind", "mystery", "'kind'"),
    ("kind", 3, "'kind'"),
    ("name", _DELETE, "'name'"),
    ("name", ["x"], "'name'"),
    ("observation", _DELETE, "'observation'"),
    ("observation", [], "'observation'"),
    ("observation", {"state": 1}, "'observation'"),
    ("observation", [{"name": "state", "dtype": "float16", "shape": [3]}], "observation[0].dtype"),
    ("observation", [{"name": "state", "dtype": ["float32"], "shape": [3]}], "observation[0].dtype"),
    ("observation", [{"name": "state", "dtype": "float32", "shape": [-3]}], "observation[0].shape"),
    ("observation", [{"name": "state", "dtype": "float32", "shape": [3], "low": [0.0]}], "observation[0].low"),
    ("action", _DELETE, "'action'"),
    ("action", {"name": "action", "dtype": "float32", "shape": [1, 1]}, "'action.shape'"),
    ("action", {"dtype": "float32", "shape": [1]}, "action.name"),
    ("safe_action", _DELETE, "'safe_action'"),
    ("safe_action", [0.0, 0.0], "'safe_action'"),
    ("safe_action", ["stop"], "'safe_action'"),
    ("control_rate_hz", 0, "'control_rate_hz'"),
    ("control_rate_hz", -20.0, "'control_rate_hz'"),
    ("control_rate_hz", "fast", "'control_rate_hz'"),
    ("control_rate_hz", True, "'control_rate_hz'"),
    ("onnx", _DELETE, "'onnx'"),
    ("onnx.sha256", "abc", "'onnx.sha256'"),
    ("onnx.sha256", _DELETE, "'onnx.sha256'"),
    ("onnx.inputs", {"state": "velocity"}, "'onnx.inputs.state'"),
    ("onnx.inputs", ["state"], "'onnx.inputs'"),
    ("chunk", {"length": 2, "execute": 3}, "'chunk'"),
    ("chunk", {"length": 0}, "'chunk'"),
    ("chunk", {"length": "two"}, "'chunk"),
    ("chunk", 4, "'chunk"),
    ("normalisation", {"velocity": {"mean": [0.0] * 3, "std": [1.0] * 3}}, "'normalisation.velocity'"),
    ("normalisation", {"state": {"std": [1.0] * 3}}, "'normalisation.state.mean'"),
    ("normalisation", {"state": {"mean": [0.0] * 2, "std": [1.0] * 3}}, "'normalisation.state.mean'"),
    ("normalisation", {"state": {"mean": [0.0] * 3, "std": [1.0, 0.0, 1.0]}}, "'normalisation.state.std'"),
    ("normalisation", {"state": [0.0, 1.0]}, "'normalisation.state"),
]
def _manifest_params():
    return [pytest.param(path, value, key, id=f"{path}-{'deleted' if value is _DELETE else value!r}")
            for path, value, key in MANIFEST_ERRORS]


@pytest.mark.parametrize("path, value, key", _manifest_params())
def test_manifest_errors_name_the_key(good_manifest, path, value, key):
    d = copy.deepcopy(good_manifest)
    _set(d, path, value)
    with pytest.raises(ManifestError) as exc:
        Manifest.from_dict(d)
    assert key in str(exc.value), str(exc.value)


def test_manifest_roundtrip_and_policy_id(good_manifest):
    m = Manifest.from_dict(good_manifest)
    assert m.to_dict() == good_manifest
    assert m.policy_id == f"aircraft-pitch-lqr@{good_manifest['onnx']['sha256'][:12]}"
    assert m.kind == "linear_gain" and m.observation[0] == ArraySpec("state", "float32", (3,), (-10.0,) * 3,
                                                                        (10.0,) * 3)


def test_read_manifest_checks_the_onnx_file(lqr_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    write_bundle(bundle, (lqr_bundle / "policy.onnx").read_bytes(),
                 json.loads((lqr_bundle / "manifest.json").read_text()))
    assert read_manifest(bundle).sha256 == json.loads((lqr_bundle / "manifest.json").read_text())["onnx"]["sha256"]
    # one flipped byte in the graph: caught on load, by the key that holds the checksum
    onnx_bytes = bytearray((bundle / "policy.onnx").read_bytes())
    onnx_bytes[len(onnx_bytes) // 2] ^= 0x01
    (bundle / "policy.onnx").write_bytes(bytes(onnx_bytes))
    with pytest.raises(ManifestError, match="onnx.sha256"):
        read_manifest(bundle)
    with pytest.raises(ManifestError, match="onnx.sha256"):
        load_policy(bundle)
    (bundle / "policy.onnx").unlink()
    with pytest.raises(ManifestError, match="onnx.file"):
        read_manifest(bundle)
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(bundle)
    with pytest.raises(ManifestError, match="manifest.json"):
        read_manifest(tmp_path / "nowhere")
