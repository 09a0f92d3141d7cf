"""Plan specs: a Schedule, a schedule JSON path, or a short name ("full", "fora-N"), resolved to a Plan."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from .arch import ArchitectureMap
from .deciders import Decider, ScheduleDecider
from .schedule import Schedule


class Plan:
    """A recipe for deciders: checked against the model once, then asked for a decider at each pipeline call."""

    name: str = "plan"
    default_num_steps: int | None = None
    cache_history: int = 1  # outputs kept per component (2 for Taylor forecasts)

    def observed_blocks(self, arch: ArchitectureMap) -> tuple[int, ...]:
        """Blocks whose inputs/outputs the deciders watch (dynamic policies); none for static schedules."""
        return ()

    def check(self, arch: ArchitectureMap) -> None:
        """Raise before any work if this plan cannot drive `arch`."""

    def decider(self, arch: ArchitectureMap, num_steps: int) -> Decider:
        raise NotImplementedError


class RulePlan(Plan):
    """A schedule rule that fits any step count (full, FORA-N, intervals): built afresh for each step count."""

    def __init__(self, name: str, build: Callable[[ArchitectureMap, int], Schedule]):
        self.name, self._build, self._built = name, build, {}

    def schedule(self, arch: ArchitectureMap, num_steps: int) -> Schedule:
        key = (arch.model_class, arch.num_blocks, num_steps)
        if key not in self._built:
            self._built[key] = self._build(arch, num_steps)
        return self._built[key]

    def decider(self, arch: ArchitectureMap, num_steps: int) -> Decider:
        return ScheduleDecider(self.schedule(arch, num_steps))


class SchedulePlan(Plan):
    """A fixed schedule; resampled by normalised time when the call uses another step count."""

    def __init__(self, schedule: Schedule, name: str | None = None):
        self.schedule = schedule
        self.name = name or schedule.provenance.get("name") or schedule.provenance.get("rule") or "schedule"
        self.default_num_steps = schedule.num_steps

    def check(self, arch: ArchitectureMap) -> None:
        self.schedule.check_fits(arch)

    def decider(self, arch: ArchitectureMap, num_steps: int) -> Decider:
        return ScheduleDecider(self.schedule.resample(num_steps))


def _fora(m: re.Match) -> Plan:
    n = int(m.group(1))
    if n < 1:
        raise ValueError(f"fora-N needs N >= 1, got {n}.")
    return RulePlan(f"fora-{n}", lambda arch, steps: Schedule.fora(arch, steps, n))


# Name patterns -> plan factories. Later features register more (dynamic policies, shipped schedules).
PLAN_NAMES: dict[str, Callable[[re.Match], Plan]] = {
    r"full": lambda m: RulePlan("full", Schedule.full),
    r"fora-(\d+)": _fora,
}
PLAN_HELP: dict[str, str] = {"full": "compute everything", "fora-N": "compute every N-th step, reuse in between"}
# Concrete names a user interface offers in its plan picker.
PLAN_EXAMPLES: list[str] = ["full", "fora-2", "fora-3", "fora-4"]


def register_plan(pattern: str, factory: Callable[[re.Match], Plan], display: str, help: str = "", examples=()) -> None:
    """Make a plan name (a regular expression matched whole) resolvable everywhere plans are accepted;
    `display` is how help texts show it (e.g. "fbcache-T")."""
    PLAN_NAMES[pattern] = factory
    PLAN_HELP[display] = help
    PLAN_EXAMPLES.extend(e for e in examples if e not in PLAN_EXAMPLES)


def known_plan_names() -> list[str]:
    return list(PLAN_HELP)


def resolve_plan(spec) -> Plan:
    """Turn a Plan, Schedule, schedule JSON path or plan name into a Plan, or say clearly why not."""
    if isinstance(spec, Plan):
        return spec
    if isinstance(spec, Schedule):
        return SchedulePlan(spec)
    if isinstance(spec, Path) or (isinstance(spec, str) and (spec.endswith(".json") or Path(spec).is_file())):
        return SchedulePlan(Schedule.load(spec), name=Path(spec).stem)
    if isinstance(spec, str):
        for pattern, factory in PLAN_NAMES.items():
            m = re.fullmatch(pattern, spec.strip())
            if m:
                return factory(m)
        names = ", ".join(f"{k} ({v})" if v else k for k, v in PLAN_HELP.items())
        raise ValueError(f"Unknown plan {spec!r}. Known plans: {names}; or give a path to a schedule JSON file.")
    raise TypeError(f"A plan must be a name, a schedule JSON path, a Schedule or a Plan; got {type(spec).__name__}.")
