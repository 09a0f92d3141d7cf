"""Plans: the base classes, the name registry and its resolution. Built-in plugins (policies, shipped schedules and
routers) register their names through the `diffroute.plans` entry-point group, loaded on first resolution."""

from diffroute.plans.base import (
    PLAN_EXAMPLES,
    Plan,
    RulePlan,
    SchedulePlan,
    interval_arg,
    load_plugins,
    plan_examples,
    register_plan,
    register_suffix,
    resolve_plan,
    schedule_plan,
    warmup_arg,
)

__all__ = [
    "PLAN_EXAMPLES",
    "Plan",
    "RulePlan",
    "SchedulePlan",
    "interval_arg",
    "load_plugins",
    "plan_examples",
    "register_plan",
    "register_suffix",
    "resolve_plan",
    "schedule_plan",
    "warmup_arg",
]
