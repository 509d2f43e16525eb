"""policies/bundle.py: the loader checks a graph's names against its manifest; a linear-gain policy acts
-Kx and takes a new gain online (real onnxruntime sessions on real bundles)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from vigil.policies.bundle import load_policy
from vigil.policies.manifest import ManifestError, write_bundle


def test_load_policy_checks_graph_names(lqr_bundle, tmp_path):
    d = json.loads((lqr_bundle / "manifest.json").read_text())
    onnx_bytes = (lqr_bundle / "policy.onnx").read_bytes()
    wrong_input = copy.deepcopy(d)
    wrong_input["onnx"]["inputs"] = {"x": "state"}
    write_bundle(tmp_path / "a", onnx_bytes, wrong_input)
    with pytest.raises(ManifestError, match="onnx.inputs"):
        load_policy(tmp_path / "a")
    wrong_output = copy.deepcopy(d)
    wrong_output["onnx"]["action"] = "u"
    write_bundle(tmp_path / "b", onnx_bytes, wrong_output)
    with pytest.raises(ManifestError, match="'onnx'"):
        load_policy(tmp_path / "b")
    # a linear-gain graph declared as a flow ensemble lacks what that kind needs, and the error names it
    wrong_kind = copy.deepcopy(d)
    wrong_kind["kind"] = "flow_ensemble"
    write_bundle(tmp_path / "c", onnx_bytes, wrong_kind)
    with pytest.raises(ManifestError, match="'extra.instruction_input'"):
        load_policy(tmp_path / "c")


def test_linear_gain_policy_and_online_gain_swap(lqr_bundle):
    policy = load_policy(lqr_bundle)
    K = np.asarray(policy.manifest.extra["gain"])
    x = np.array([0.1, -0.2, 0.3], np.float32)
    np.testing.assert_allclose(policy.infer({"state": x}).actions, (-K @ x)[None], rtol=1e-5)
    K2 = 0.5 * K
    policy.set_gain(K2)
    np.testing.assert_allclose(policy.infer({"state": x}).actions, (-K2 @ x)[None], rtol=1e-5)
    with pytest.raises(ValueError):
        policy.set_gain(np.zeros((2, 3)))
