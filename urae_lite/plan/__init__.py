"""Memory planner: the peak device memory of `generate` and `train` per phase, before anything runs, and the
fastest configuration that fits a card (`urae-lite plan`, `best_config`)."""

from .estimate import Estimate, estimate
from .job import PlanConfig
from .search import Candidate, PlanResult, best_config, expected_seconds

__all__ = [
    "Candidate",
    "Estimate",
    "PlanConfig",
    "PlanResult",
    "best_config",
    "estimate",
    "expected_seconds",
]
