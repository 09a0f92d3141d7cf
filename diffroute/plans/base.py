"""Plan specs: a Schedule, a schedule JSON path, or a short name ("full", "fora-N"), resolved to a Plan."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path

import torch

from diffroute.core.arch import ArchitectureMap
from diffroute.core.deciders import Decider, ScheduleDecider
from diffroute.core.schedule import MAX_STEPS, Schedule
from diffroute.errors import InputError, PlanError


class Plan:
    """A recipe for deciders: checked against the model once, then asked for a decider at each pipeline call."""

    name: str = "plan"
    default_num_steps: int | None = None
    cache_history: int = 1  # outputs kept per component (2 for Taylor forecasts)
    cache_keeps_graph: bool = False  # training through the cached outputs (`core.cache.FeatureCache`)
    collapse_spans: bool = False  # `+spans`: a run of consecutive blocks reused whole adds one residual

    def observed_blocks(self, arch: ArchitectureMap) -> tuple[int, ...]:
        """Blocks whose inputs/outputs the deciders watch (dynamic policies); none for static schedules."""
        return ()

    def check(self, arch: ArchitectureMap) -> None:
        """Raise before any work if this plan cannot drive `arch`."""

    def check_model(self, transformer: torch.nn.Module) -> None:
        """Raise before any work if this plan cannot drive these weights (a trained router on another backbone)."""

    def check_call(self, num_steps: int | None, scheduler=None) -> None:
        """Raise before a pipeline call if this plan cannot run `num_steps` steps of `scheduler` (trained routers)."""

    def always_computed(self, arch: ArchitectureMap) -> torch.Tensor:
        """Bool [blocks, components]: components computed at every step of every call, never stored, never watched
        (the executor leaves them unhooked, so they cost nothing and compile as in vanilla). None by default."""
        return torch.zeros(arch.num_blocks, len(arch.components), dtype=torch.bool)

    def block_level(self, arch: ArchitectureMap) -> torch.Tensor:
        """Bool [blocks]: blocks decided as a whole (`Decider.decide_block`: compute, or input plus the block's cached
        residual) instead of per component. None by default."""
        return torch.zeros(arch.num_blocks, dtype=torch.bool)

    # Whether the components of block-level blocks are decided too (a router that picks an FFN width inside the
    # blocks it may skip); by default a block decided as a whole has no component hooks.
    decides_components_in_blocks: bool = False

    def decider(self, arch: ArchitectureMap, num_steps: int) -> Decider:
        raise NotImplementedError

    def with_block_reuse(self) -> Plan:
        """This plan with every block whose components all reuse at a step reused whole (`name+blocks`)."""
        raise PlanError(
            f"plan {self.name!r} does not take {BLOCKS_SUFFIX}: only schedule plans (full, fora-N, schedule files, "
            "searched and shipped schedules) can reuse whole blocks; policies and routers decide blocks themselves."
        )

    def with_spans(self) -> Plan:
        """This plan with each run of consecutive blocks reused whole at a step reused as one residual
        (`name+spans`); where the plan reuses no block whole of its own, with `+blocks` first."""
        raise PlanError(
            f"plan {self.name!r} does not take {SPANS_SUFFIX}: only schedule plans (full, fora-N, schedule files, "
            "searched and shipped schedules) can reuse runs of whole blocks."
        )

    def content(self, arch: ArchitectureMap | None = None) -> dict:
        """What this plan means (for fingerprints of resumable results): its name, plus the content of any schedule
        or calibration it reads, so that a changed file makes a different fingerprint."""
        return {"plan": self.name}


class RulePlan(Plan):
    """A schedule rule that fits any step count (full, FORA-N, intervals): built afresh for each step count."""

    def __init__(
        self,
        name: str,
        build: Callable[[ArchitectureMap, int], Schedule],
        computes_all: bool = False,
        forecasts: bool = False,
        whole_blocks: bool = False,
    ):
        self.name, self._build, self._built = name, build, {}
        self.computes_all = computes_all  # the rule computes every cell at any step count (`full`)
        self.forecasts = forecasts
        self.cache_history = 2 if forecasts else 1  # the rule's schedules forecast skipped cells
        # Whole-block reuse of a rule whose steps compute all or nothing (FORA): blocks decided as a whole, no
        # component hooks (so a reused step runs no norm, modulation or gate, and copies nothing).
        self.whole_blocks = whole_blocks

    def always_computed(self, arch: ArchitectureMap) -> torch.Tensor:
        return arch.present() if self.computes_all else super().always_computed(arch)

    def block_level(self, arch: ArchitectureMap) -> torch.Tensor:
        if self.whole_blocks and not self.computes_all:
            return arch.present().any(1)
        return super().block_level(arch)

    def with_block_reuse(self) -> Plan:
        if self.forecasts:
            raise PlanError(f"plan {self.name!r} forecasts every skipped cell: no block is reused whole.")

        def build(arch: ArchitectureMap, steps: int) -> Schedule:
            s = self._build(arch, steps).with_block_reuse(arch.present())
            if not s.block_pure(arch.present()):  # (full and FORA rules are: all of a step computes or reuses)
                raise PlanError(f"{self.name}{BLOCKS_SUFFIX}: the rule mixes computed and reused cells in a block.")
            return s

        return RulePlan(self.name + BLOCKS_SUFFIX, build, self.computes_all, whole_blocks=True)

    def with_spans(self) -> Plan:
        plan = copy.copy(self if self.whole_blocks else self.with_block_reuse())
        plan.name, plan.collapse_spans, plan._built = self.name + SPANS_SUFFIX, True, {}
        return plan

    def schedule_at(self, arch: ArchitectureMap, num_steps: int) -> Schedule:
        """The schedule this plan runs at `num_steps` steps on `arch`."""
        return self.schedule(arch, num_steps)

    def schedule(self, arch: ArchitectureMap, num_steps: int) -> Schedule:
        key = (arch.model_class, arch.num_blocks, num_steps)
        if key not in self._built:
            self._built[key] = self._build(arch, num_steps)
        return self._built[key]

    def decider(self, arch: ArchitectureMap, num_steps: int) -> Decider:
        return ScheduleDecider(self.schedule_at(arch, num_steps), spans=self.collapse_spans)


class SchedulePlan(Plan):
    """A fixed schedule; resampled by normalised time when the call uses another step count."""

    def __init__(self, schedule: Schedule, name: str | None = None, whole_blocks: bool = False):
        if schedule.check is not None:  # (its check would be silently dropped here)
            raise ValueError(
                "this schedule carries a first-block check: run it with diffroute.schedule_plan(schedule), or "
                "schedule.without_check() to take it unchecked."
            )
        self.schedule = schedule
        self.name = name or schedule.provenance.get("name") or schedule.provenance.get("rule") or "schedule"
        self.default_num_steps = schedule.num_steps
        # forecasts and fitted reuses (`core/fitted.py`) read the last two outputs
        self.cache_history = 2 if schedule.has_forecasts or schedule.fit is not None else 1
        self.whole_blocks = whole_blocks  # reuse whole every block whose cells all reuse (`+blocks`)
        self._fitted: dict = {}

    def check(self, arch: ArchitectureMap) -> None:
        self.schedule.check_fits(arch)

    def check_call(self, num_steps: int | None, scheduler=None) -> None:
        if self.schedule.fit is not None and num_steps is not None and num_steps != self.schedule.num_steps:
            self.schedule.resample(num_steps)  # (refuses, saying how to fit it again)

    def fitted(self, arch: ArchitectureMap) -> Schedule:
        """The schedule as it runs on `arch` (with `+blocks`, whole-block reuse marked where the present components
        of a block all reuse)."""
        key = (arch.model_class, arch.num_blocks, tuple(arch.present().flatten().tolist()))
        if key not in self._fitted:
            self._fitted[key] = self.schedule.with_block_reuse(arch.present()) if self.whole_blocks else self.schedule
        return self._fitted[key]

    @property
    def decides_components_in_blocks(self) -> bool:  # a block that runs still decides its components
        return True

    def always_computed(self, arch: ArchitectureMap) -> torch.Tensor:
        s = self.fitted(arch)  # computed whenever the block runs (resampling picks rows: still so)
        return (s.compute | s.block_reuse[..., None]).all(dim=0) & arch.present()

    def block_level(self, arch: ArchitectureMap) -> torch.Tensor:
        return self.fitted(arch).block_reuse.any(dim=0)

    def _refuse_fitted(self, suffix: str) -> None:
        if self.schedule.fit is None:
            return
        if suffix == BLOCKS_SUFFIX:
            why = (
                "its weights were fitted for its own cells: fit the plan with +blocks instead (`diffroute calibrate "
                "--method fit --plan PLAN+blocks`)"
            )
        elif self.schedule.fit_spans:
            why = "its runs of blocks reused whole already stand in as one (one weight per run): run it as it is"
        else:
            why = (
                "each of its fitted blocks has its own weight, so a run of them is not one stored residual: fit the "
                "plan with +spans instead (`diffroute calibrate --method fit --plan PLAN+spans`: one weight per run)"
            )
        raise PlanError(f"{self.name}{suffix}: this schedule carries fitted reuse weights; {why}.")

    def with_block_reuse(self) -> Plan:
        self._refuse_fitted(BLOCKS_SUFFIX)
        plan = copy.copy(self)  # (a subclass keeps its checks: an L2C router's schedule stays refused off its model)
        plan.name, plan.whole_blocks, plan._fitted = self.name + BLOCKS_SUFFIX, True, {}
        return plan

    def with_spans(self) -> Plan:
        self._refuse_fitted(SPANS_SUFFIX)
        plan = copy.copy(self)
        # a schedule with whole-block reuse of its own (a whole-block search's) keeps it; others take `+blocks`'s
        whole = self.whole_blocks or not self.schedule.has_block_reuse
        plan.name, plan.whole_blocks, plan.collapse_spans, plan._fitted = self.name + SPANS_SUFFIX, whole, True, {}
        return plan

    def content(self, arch: ArchitectureMap | None = None) -> dict:
        from diffroute.utils.fingerprint import digest

        whole = {"whole_blocks": True} if self.whole_blocks else {}  # (fingerprints of earlier results unchanged)
        if self.collapse_spans:
            whole["spans"] = True
        return {"plan": self.name, "schedule": digest(self.schedule.to_dict()), **whole}

    def schedule_at(self, arch: ArchitectureMap, num_steps: int) -> Schedule:
        """The schedule this plan runs at `num_steps` steps on `arch` (resampled by normalised time)."""
        return self.fitted(arch).resample(num_steps)

    def decider(self, arch: ArchitectureMap, num_steps: int) -> Decider:
        return ScheduleDecider(self.schedule_at(arch, num_steps), spans=self.collapse_spans)


def schedule_plan(schedule: Schedule, name: str | None = None) -> Plan:
    """A schedule as a plan: a SchedulePlan, checked per image (`policies/checked.py`) where the schedule carries a
    first-block check (a threshold search's front members do)."""
    if schedule.check is None:
        return SchedulePlan(schedule, name)
    load_plugins()  # (the checked plan is the policies plugin's)
    plan = SchedulePlan(schedule.without_check(), name)
    return CHECKED_SCHEDULE[0](plan, schedule.check, schedule.check_per)


def is_schedule_plan(plan: Plan) -> bool:
    """Whether `plan` runs a schedule (`schedule_at`): full, fora-N, schedule files, searched and shipped schedules,
    L2C routers; not a policy or a per-image router."""
    return isinstance(plan, (SchedulePlan, RulePlan))


# A plan-name suffix: the schedule with every block whose components all reuse at a step reused whole.
BLOCKS_SUFFIX = "+blocks"
# ... and each run of consecutive blocks reused whole at a step reused as one residual.
SPANS_SUFFIX = "+spans"


def interval_arg(text: str, name: str) -> int:
    """The N of a plan name like fora-N: an integer from 1 to MAX_STEPS."""
    n = int(text)
    if not 1 <= n <= MAX_STEPS:
        raise PlanError(f"{name} needs N from 1 to {MAX_STEPS}, got {text}.")
    return n


def warmup_arg(text: str | None) -> int:
    """The K of a `-wK` suffix (steps that all compute before a cycle starts); 0 without one."""
    return 0 if text is None else interval_arg(text, "-wK")


def _fora(m: re.Match) -> Plan:
    n, w = interval_arg(m.group(1), "fora-N"), warmup_arg(m.group(2))
    name = f"fora-{n}" + (f"-w{w}" if w else "")
    return RulePlan(name, lambda arch, steps: Schedule.fora(arch, steps, n, warmup=min(w, steps)))


# Plan-name suffixes -> how they change the plan named before them (`emoji:fast+blocks`, `fora-3+blocks+fb0.1`).
PLAN_SUFFIXES: dict[str, Callable[[Plan, re.Match], Plan]] = {
    re.escape(BLOCKS_SUFFIX): lambda plan, m: plan.with_block_reuse(),
    re.escape(SPANS_SUFFIX): lambda plan, m: plan.with_spans(),
}

# Name patterns -> plan factories. Later features register more (dynamic policies, shipped schedules).
PLAN_NAMES: dict[str, Callable[[re.Match], Plan]] = {
    r"full": lambda m: RulePlan("full", Schedule.full, computes_all=True),
    r"fora-(\d+)(?:-w(\d+))?": _fora,
}
PLAN_HELP: dict[str, str] = {
    "full": "compute everything",
    "fora-N[-wK]": "compute every N-th step, reuse in between (-wK: the first K steps all compute)",
    f"<schedule plan>{BLOCKS_SUFFIX}": "blocks whose components all reuse at a step are reused whole, from their "
    "residual (e.g. fora-3+blocks, emoji:fast+blocks)",
    f"<schedule plan>{SPANS_SUFFIX}": f"as {BLOCKS_SUFFIX}, and consecutive blocks reused whole at a step add one "
    "residual, their sum (DBCache's one residual for its middle blocks; rounds differently from block by block)",
}
# How a folder given as a plan becomes one (the routers plugin puts its loader here).
FOLDER_PLAN: list[Callable] = []
# How a schedule plan and per-step thresholds become a checked plan (the policies plugin puts it here).
CHECKED_SCHEDULE: list[Callable] = []
# Concrete names a user interface offers in its plan picker (read them with plan_examples(): plugins add theirs).
PLAN_EXAMPLES: list[str] = ["full", "fora-2", "fora-3", "fora-4"]


def register_plan(pattern: str, factory: Callable[[re.Match], Plan], display: str, help: str = "", examples=()) -> None:
    """Make a plan name (a regular expression matched whole) resolvable everywhere plans are accepted;
    `display` is how help texts show it (e.g. "fbcache-T")."""
    PLAN_NAMES[pattern] = factory
    PLAN_HELP[display] = help
    PLAN_EXAMPLES.extend(e for e in examples if e not in PLAN_EXAMPLES)


def register_suffix(pattern: str, modify: Callable[[Plan, re.Match], Plan], display: str, help: str = "") -> None:
    """Make a plan-name suffix (a regular expression matched at the end of a name) change the plan before it."""
    PLAN_SUFFIXES[pattern] = modify
    PLAN_HELP[display] = help


def known_plan_names() -> list[str]:
    load_plugins()
    return list(PLAN_HELP)


def resolve_plan(spec, allow_files: bool = True) -> Plan:
    """Turn a Plan, Schedule, plan name or schedule JSON path into a Plan, or raise PlanError saying why not.

    Names are matched first (so `teacache-0.3@calib.json` is a policy with a calibration file, not a schedule).
    With allow_files=False (specs from untrusted clients) no file is ever opened: names that name a file are
    refused with the same message whether or not the file exists.
    """
    if isinstance(spec, Plan):
        return spec
    load_plugins()
    if isinstance(spec, Schedule):
        return schedule_plan(spec)
    if isinstance(spec, str):
        text = spec.strip()
        if len(text) > 1000:
            raise PlanError(f"a plan name of {len(text)} characters is too long to be one.")
        for pattern, modify in PLAN_SUFFIXES.items():  # the outermost suffix is the last one
            m = re.fullmatch(rf"(.+?)({pattern})", text)
            if m:
                base = resolve_plan(m.group(1), allow_files)
                try:
                    return modify(base, re.fullmatch(pattern, m.group(2)))
                except ValueError as e:
                    raise PlanError(f"plan {text!r}: {e}") from e
        for pattern, factory in PLAN_NAMES.items():
            m = re.fullmatch(pattern, text)
            if m:
                if not allow_files and "@" in text:  # a policy's calibration file
                    break
                try:
                    return factory(m)
                except InputError:
                    raise
                except (ValueError, FileNotFoundError) as e:
                    raise PlanError(f"plan {text!r}: {e}") from e
    if allow_files and (isinstance(spec, Path) or (isinstance(spec, str) and spec.strip())):
        path = Path(spec)
        if path.is_dir() and (path / "config.json").is_file() and FOLDER_PLAN:  # a trained router's folder
            return FOLDER_PLAN[0](path, path.name)
        if path.suffix == ".json" or path.is_file():
            if not path.is_file():
                raise PlanError(f"schedule file {str(path)!r} does not exist.")
            return schedule_plan(Schedule.load(path), name=path.stem)
    if isinstance(spec, (str, Path)):
        names = ", ".join(f"{k} ({v})" if v else k for k, v in PLAN_HELP.items())
        files = "; or give a path to a schedule JSON file or a router folder" if allow_files else ""
        raise PlanError(f"Unknown plan {str(spec)[:100]!r}. Known plans: {names}{files}.")
    raise PlanError(f"A plan must be a name, a schedule JSON path, a Schedule or a Plan; got {type(spec).__name__}.")


# Where plan names come from besides the two above: modules that call register_plan when imported. Third parties
# add theirs to the entry-point group; the built-in ones are listed by name here too, for a source checkout that
# was never installed. Loaded on first use, so importing this module imports no plugin (no import circle).
ENTRY_POINT_GROUP = "diffroute.plans"
BUILTIN_PLUGINS = ("diffroute.policies", "diffroute.routers", "diffroute.zoo.shipped")
_plugins_loaded = False


def load_plugins() -> None:
    """Import every plan plugin once (idempotent)."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import importlib
    from importlib.metadata import entry_points

    names = [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)]
    for name in dict.fromkeys([*BUILTIN_PLUGINS, *names]):
        importlib.import_module(name)


def plan_examples() -> list[str]:
    """Concrete names a user interface offers in its plan picker (built-ins, policies, shipped plans)."""
    load_plugins()
    return list(PLAN_EXAMPLES)
