"""Taylor forecasting (TaylorSeer-style, first order): compute every N-th step; in between, each component's output
is extrapolated from its last two computed outputs, y(s) = y1 + (y1 - y0)(s - s1)/(s1 - s0), instead of reused.
Deviation from TaylorSeer: first order only (its higher orders need more history and did not pay off at our sizes);
until two outputs exist, the one output is reused."""

from __future__ import annotations

import re

from diffroute.deciders import FORECAST, ScheduleDecider
from diffroute.plans import RulePlan, interval_arg, register_plan
from diffroute.schedule import Schedule


class TaylorDecider(ScheduleDecider):
    """A schedule whose skipped cells are forecast rather than reused; every computed output is kept."""

    def decide(self, ctx, block, comp):
        return True if super().decide(ctx, block, comp) else FORECAST

    def must_store(self, ctx, block, comp) -> bool:
        return True

    def info(self) -> dict:
        return dict(super().info(), policy="taylor forecast (first order)")


class TaylorPlan(RulePlan):
    cache_history = 2

    def decider(self, arch, num_steps):
        return TaylorDecider(self.schedule(arch, num_steps))


def _taylor(m: re.Match) -> TaylorPlan:
    n = interval_arg(m.group(1), "taylor-N")
    return TaylorPlan(f"taylor-{n}", lambda arch, steps: Schedule.fora(arch, steps, n))


register_plan(r"taylor-(\d+)", _taylor, "taylor-N", "compute every N-th step, forecast in between", ["taylor-3"])
