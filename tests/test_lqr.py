"""training/lqr.py: the optimal gain (python-control) equals the independent scipy oracle of sim/linear.py,
and the exported LQR bundle records the optimum."""

from __future__ import annotations

import numpy as np
import pytest

from vigil.policies.manifest import read_manifest
from vigil.sim.linear import SYSTEMS, oracle
from vigil.training.lqr import lqr_gain


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_lqr_gain_matches_scipy_oracle(name):
    system = SYSTEMS[name]()
    K_control, P = lqr_gain(system)  # python-control (training side)
    K_scipy, J = oracle(system)  # scipy DARE (the independent reference)
    np.testing.assert_allclose(K_control, K_scipy, rtol=1e-7, atol=1e-9)
    assert J == pytest.approx(system.noise_std**2 * np.trace(P), rel=1e-7)
    assert max(abs(np.linalg.eigvals(system.A - system.B @ K_scipy))) < 1  # the optimum stabilises


def test_lqr_bundle_records_the_optimum(lqr_bundle):
    m = read_manifest(lqr_bundle)
    K, J = oracle(SYSTEMS["aircraft-pitch"]())
    np.testing.assert_allclose(m.extra["gain"], K, rtol=1e-7)
    assert m.extra["optimal_average_cost"] == pytest.approx(J, rel=1e-7)
    assert m.control_rate_hz == 20.0
