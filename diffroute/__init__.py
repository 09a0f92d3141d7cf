"""diffroute: timestep-aware routing (feature caching by compute plans) for diffusers DiT pipelines."""

from . import policies, shipped  # noqa: F401  (register the dynamic policies' and shipped schedules' names)
from .api import apply, get_executor, last_stats, remove
from .arch import (
    ARCHITECTURES,
    ArchitectureMap,
    ArchSpec,
    UnsupportedModelError,
    architecture_map,
    register_architecture,
)
from .plans import Plan, RulePlan, SchedulePlan, register_plan, resolve_plan
from .schedule import Schedule, ScheduleMismatchError
from .stats import CallStats

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "ArchitectureMap",
    "CallStats",
    "Plan",
    "RulePlan",
    "Schedule",
    "ScheduleMismatchError",
    "SchedulePlan",
    "UnsupportedModelError",
    "apply",
    "architecture_map",
    "get_executor",
    "last_stats",
    "register_architecture",
    "register_plan",
    "remove",
    "resolve_plan",
]
