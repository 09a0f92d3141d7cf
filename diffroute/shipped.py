"""Shipped schedules by name: `MODEL:NAME` (e.g. `emoji:fast`) is `zoo/weights/MODEL/schedules/NAME.json`."""

from __future__ import annotations

import re
from pathlib import Path

from .plans import PLAN_EXAMPLES, Plan, SchedulePlan, register_plan
from .schedule import Schedule

WEIGHTS = Path(__file__).parent / "zoo" / "weights"


def shipped_schedules() -> dict[str, Path]:
    return {f"{p.parent.parent.name}:{p.stem}": p for p in sorted(WEIGHTS.glob("*/schedules/*.json"))}


def install_schedule(source: Path, model: str, name: str) -> Path:
    """Copy a schedule JSON into the zoo as `MODEL:NAME` (atomically), recording the name in its provenance."""
    schedule = Schedule.load(source)  # validated before anything is written into the zoo
    schedule.provenance["shipped_as"] = f"{model}:{name}"
    dest = WEIGHTS / model / "schedules" / f"{name}.json"
    schedule.save(dest)
    return dest


def _shipped(m: re.Match) -> Plan:
    name = m.group(0)
    found = shipped_schedules()
    if name not in found:
        raise ValueError(f"No shipped schedule {name!r}; shipped: {', '.join(found) or 'none'}.")
    return SchedulePlan(Schedule.load(found[name]), name=name)


register_plan(r"[a-z0-9-]+:[a-z0-9_-]+", _shipped, "MODEL:NAME", "a shipped schedule, e.g. emoji:fast")
PLAN_EXAMPLES.extend(n for n in shipped_schedules() if n not in PLAN_EXAMPLES)
