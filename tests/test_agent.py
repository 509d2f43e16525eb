"""policies/agent.py: the agent replans every k actions and clips each action to the manifest's bounds (a real
chunked bundle on onnxruntime)."""

from __future__ import annotations

import numpy as np
import pytest

from vigil.policies.agent import Agent
from vigil.policies.bundle import load_policy


def test_agent_replans_every_k_and_clips_to_bounds(chunk_bundle):
    agent = Agent(load_policy(chunk_bundle))
    np.testing.assert_array_equal(agent.safe_action, np.array([0.0, 0.5], np.float32))

    def act(x):
        return agent.act({"state": np.asarray(x, np.float32)})

    s1 = act([0.2, -0.3])
    assert s1.replanned
    np.testing.assert_allclose(s1.raw, [0.2, -0.3], rtol=1e-6)
    np.testing.assert_allclose(s1.action, [0.2, -0.3], rtol=1e-6)
    assert s1.scores["vfd"] == pytest.approx(0.13, rel=1e-6)
    s2 = act([5.0, 5.0])  # second action of the same plan: this observation is not even looked at
    assert not s2.replanned
    np.testing.assert_allclose(s2.raw, [1.2, 0.7], rtol=1e-6)
    assert s2.scores["vfd"] == pytest.approx(0.13, rel=1e-6)
    s3 = act([0.9, 0.0])  # k = 2 used up: a new plan from this observation
    assert s3.replanned
    np.testing.assert_allclose(s3.raw, [0.9, 0.0], atol=1e-6)
    s4 = act([0.0, 0.0])
    assert not s4.replanned
    np.testing.assert_allclose(s4.raw, [1.9, 1.0], rtol=1e-6)  # the policy asked for more than allowed ...
    np.testing.assert_allclose(s4.action, [1.5, 1.0], rtol=1e-6)  # ... and gets the bound
    assert s4.action.dtype == np.float32
    s5 = act([-3.0, -20.0])
    np.testing.assert_allclose(s5.action, [-1.0, -10.0])  # lower bounds too
    agent.reset()  # a new episode replans at once
    assert act([0.0, 0.0]).replanned
