"""Shipped plans by name: `MODEL:NAME` is the schedule `zoo/weights/MODEL/schedules/NAME.json` (e.g. `emoji:fast`)
or the trained router `zoo/weights/MODEL/routers/NAME/` (e.g. `emoji:l2c`)."""

from __future__ import annotations

import re
from pathlib import Path

from .plans import PLAN_EXAMPLES, Plan, SchedulePlan, register_plan
from .schedule import Schedule

WEIGHTS = Path(__file__).parent / "zoo" / "weights"


def shipped_schedules() -> dict[str, Path]:
    return {f"{p.parent.parent.name}:{p.stem}": p for p in sorted(WEIGHTS.glob("*/schedules/*.json"))}


def shipped_routers() -> dict[str, Path]:
    return {
        f"{p.parent.parent.parent.name}:{p.parent.name}": p.parent
        for p in sorted(WEIGHTS.glob("*/routers/*/config.json"))
    }


def install_schedule(source: Path, model: str, name: str) -> Path:
    """Copy a schedule JSON into the zoo as `MODEL:NAME` (atomically), recording the name in its provenance."""
    schedule = Schedule.load(source)  # validated before anything is written into the zoo
    schedule.provenance["shipped_as"] = f"{model}:{name}"
    dest = WEIGHTS / model / "schedules" / f"{name}.json"
    schedule.save(dest)
    return dest


def install_router(folder: Path, model: str, name: str) -> str:
    """Copy a trained router folder into the zoo as `MODEL:NAME` (written beside, then renamed into place)."""
    import shutil

    from .routing import load_router

    load_router(folder)  # validated before anything is written into the zoo
    dest = WEIGHTS / model / "routers" / name
    tmp = dest.with_name(f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return f"{model}:{name}"


def _shipped(m: re.Match) -> Plan:
    name = m.group(0)
    routers = shipped_routers()
    if name in routers:
        from .routing import router_plan  # the routing package imports plans: import it late

        return router_plan(routers[name], name)
    found = shipped_schedules()
    if name not in found:
        shipped = ", ".join([*found, *routers]) or "none"
        raise ValueError(f"No shipped schedule or router {name!r}; shipped: {shipped}.")
    return SchedulePlan(Schedule.load(found[name]), name=name)


register_plan(
    r"[a-z0-9-]+:[a-z0-9_-]+", _shipped, "MODEL:NAME", "a shipped schedule or router, e.g. emoji:fast, emoji:l2c"
)
PLAN_EXAMPLES.extend(n for n in [*shipped_schedules(), *shipped_routers()] if n not in PLAN_EXAMPLES)
