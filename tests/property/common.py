"""Settings shared by the property tests."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# ATTNHOOKS_MAX_EXAMPLES raises the number of examples for a deeper run (e.g. 3000).
SETTINGS = settings(
    max_examples=int(os.environ.get("ATTNHOOKS_MAX_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TOL = 1e-5
NEG_INF = float("-inf")
