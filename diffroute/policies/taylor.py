"""Taylor forecasting (TaylorSeer-style, first order): compute every N-th step; in between, each component's output
is extrapolated from its last two computed outputs, y(s) = y1 + (y1 - y0)(s - s1)/(s1 - s0), instead of reused.
Deviation from TaylorSeer: first order only (its higher orders need more history and did not pay off at our sizes);
until two outputs exist, the one output is reused. `taylor-N-wK` computes the first K steps (TaylorSeer's
`disable_cache_before_step`; K=2 gives the forecast two outputs from the start), then every N-th step."""

from __future__ import annotations

import re

from diffroute.core.schedule import Schedule
from diffroute.plans import RulePlan, interval_arg, register_plan, warmup_arg


def _taylor(m: re.Match) -> RulePlan:
    """FORA-N's compute cells, every skipped cell forecast: a three-valued schedule like any other."""
    n, w = interval_arg(m.group(1), "taylor-N"), warmup_arg(m.group(2))
    name = f"taylor-{n}" + (f"-w{w}" if w else "")

    def build(arch, steps):
        return Schedule.fora(arch, steps, n, warmup=min(w, steps)).with_forecasts()

    return RulePlan(name, build, forecasts=True)


register_plan(
    r"taylor-(\d+)(?:-w(\d+))?",
    _taylor,
    "taylor-N[-wK]",
    "compute every N-th step, forecast in between (-wK: the first K steps all compute)",
    ["taylor-3"],
)
