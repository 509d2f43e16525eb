"""IR-LQR for the offline study: the onboard implementation (`vigil.policies.irlqr`), re-exported.

The algorithm -- ridge estimate centred on a prior, log-det doubling epochs, the optimistic cost
modification, the Riccati equation with a cross term, the fallback and its stability guard, the learner
driven one transition at a time -- lives in `policies/irlqr.py`, numpy only, because the runtime runs it on
board (runtime/learning.py). The study, the baselines (`lqr_baselines`) and the tests import it from here,
so what is studied is what flies; python-control stays the independent reference in the tests.
Docstrings: `vigil.policies.irlqr`; the algorithm and the study: docs/lqr.md.
"""

from __future__ import annotations

from vigil.policies.irlqr import (
                                  IRLQR,
                                  GainUpdate,
                                  IRLQRConfig,
                                  LearnerSpec,
                                  compute_gain,
                                  dare,
                                  dlqr_cross,
                                  is_stabilising,
                                  optimism,
                                  ridge_estimate,
                                  spectral_radius,
                                  sym,
)

__all__ = ["IRLQR", "GainUpdate", "IRLQRConfig", "LearnerSpec", "PUBLISHED", "compute_gain", "dare", "dlqr_cross",
           "is_stabilising", "optimism", "ridge_estimate", "spectral_radius", "sym"]

# The published settings per system (docs/algorithms.md#ir-lqr-optimistic-online-lqr-by-intrinsic-rewards).
PUBLISHED = {
    "aircraft-pitch": IRLQRConfig(lam=20.0, g1=0.01, g2=0.001, prior_std=0.01),
    "uav-2d": IRLQRConfig(lam=5.0, g1=0.01, g2=0.01, prior_std=0.1),
}
