"""Checked schedules: a searched (or any static) schedule whose reuses each image takes only while its first block
says little has changed (`<schedule plan>+fbT`, e.g. `emoji:faster+blocks+fb0.1`) — per-image adaptivity put into
searched plans (issue 25, item 3).

At every step block 0 computes for every sample, and its residual (output minus input) is compared with that
sample's residual at its last fully computed step, as FBCache does. A sample whose relative L1 change is below the
threshold of this step follows the schedule (its reuses, forecasts and whole-block reuses happen); a sample above
it computes the whole step, and its reference residual moves on. What the check makes a sample compute refreshes
that sample's cache (FBCache's "last computation") where the schedule reuses next, except in columns that forecast,
whose two-point history stays the schedule's own computed steps; no sample's cache depends on its batch-mates.
So the schedule says *where* an image may reuse, and the image's own first block says *whether* it does now: a
threshold of infinity is the static schedule (block 0 aside), 0 is full compute. Thresholds may differ per step
(`CheckedPlan(thresholds=[...])`, resampled by normalised time like the schedule's rows); `diffroute search
--thresholds` searches them with the schedule, and a schedule file carrying its thresholds (`check`) runs checked.

Decisions are per sample, per prompt with `-prompt` (both CFG rows of a sample take their mean change) or per batch
with `-batch` (one change over the whole batch, as diffusers' FirstBlockCache measures). Per sample or prompt, a
batch whose samples disagree runs the reused cells for the computing samples only (the executor's sub-batches), so a
sample's image never depends on its batch-mates; per batch the batch never splits (no sub-batch costs) and an
image's decisions depend on its batch-mates. Costs beyond the schedule: block 0 at every step, and one
relative-L1 read per step. This is our own combination of ECAD's schedules with FBCache's rule, not a published method.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffroute.core.arch import ArchitectureMap
from diffroute.core.call_context import hidden_states_of, rows_of
from diffroute.core.deciders import (
    FORECAST,
    Decider,
    ScheduleDecider,
    computed_at_next_run,
    reused_whole_next,
)
from diffroute.core.decisions import Rows
from diffroute.core.schedule import Schedule, resample_index
from diffroute.plans import Plan, register_suffix
from diffroute.plans.base import CHECKED_SCHEDULE, SPANS_SUFFIX, is_schedule_plan
from diffroute.policies.common import PER_SUFFIX, check_per, main_tensor, per_of_suffix, relative_change


class CheckedDecider(Decider):
    """A schedule's decisions, taken per sample only while that sample's first-block residual barely changed."""

    def __init__(self, schedule: Schedule, thresholds: Sequence[float], per: str = "sample", spans: bool = False):
        self.base = ScheduleDecider(schedule, spans=spans)
        self.thresholds, self.per = list(thresholds), per
        c, whole, f = schedule.compute, schedule.block_reuse, schedule.forecast
        self._all = (c.all(dim=(1, 2)) & ~whole.any(dim=1)).tolist()  # steps the schedule computes whole
        # What a sample computes because of the check refreshes its cache where the cell's next run reuses: for
        # components only while their block runs by the schedule (a block run for some samples only cannot write
        # the whole batch's cache, so it never does), never in a column that forecasts (its two-point history is the
        # schedule's own computed steps), and for blocks where the next step reuses the block whole.
        refresh = ~computed_at_next_run(schedule) & ~f.any(dim=0, keepdim=True) & ~whole[..., None]
        self._store = refresh.tolist()
        self._store_block = reused_whole_next(schedule).tolist()  # (holds the schedule's own block stores)
        self._x0: dict[int, torch.Tensor] = {}
        self._prev: dict[int, torch.Tensor] = {}  # each sample's residual at its last full step, per branch
        self._follow: dict[int, torch.Tensor | bool] = {}  # per branch: True / False / which samples follow
        self.checked = self.followed = self.mixed = 0  # rows checked, rows that followed, steps that split the batch

    def on_block_start(self, ctx, block, module, args, kwargs) -> None:
        if block == 0:
            self._x0[ctx.branch] = main_tensor(hidden_states_of(args, kwargs)).detach()

    def on_block_end(self, ctx, block, output) -> None:
        if block != 0:
            return
        residual = main_tensor(output).detach() - self._x0.pop(ctx.branch)
        prev = self._prev.get(ctx.branch)
        full_step = ctx.step >= len(self._all) or self._all[ctx.step]
        if prev is None or prev.shape != residual.shape or full_step:
            self._prev[ctx.branch], self._follow[ctx.branch] = residual, True
            return
        follow = relative_change(residual, prev, self.per) < self.thresholds[ctx.step]
        self._prev[ctx.branch] = torch.where(follow.view(-1, *[1] * (residual.ndim - 1)), prev, residual)
        n = int(follow.sum())  # one host read per step; plain bools when every sample agrees
        self.checked, self.followed, self.mixed = (
            self.checked + follow.numel(),
            self.followed + n,
            self.mixed + (0 < n < follow.numel()),
        )
        self._follow[ctx.branch] = True if n == follow.numel() else False if n == 0 else follow

    def _checked(self, ctx, planned):
        """`planned` (the schedule's reuse or forecast) for the samples that follow it, compute for the others."""
        follow = self._follow.get(ctx.branch, True)
        if follow is True:
            return planned
        if follow is False:
            return True
        if rows_of(follow).shape[0] != follow.shape[0]:  # inside a block run for the computing samples only
            return True
        return Rows(~follow, forecast=planned is FORECAST)

    def decide(self, ctx, block, comp):
        planned = self.base.decide(ctx, block, comp)
        return True if planned is True else self._checked(ctx, planned)

    def decide_block(self, ctx, block):
        planned = self.base.decide_block(ctx, block)
        return True if planned is True else self._checked(ctx, planned)

    def block_span(self, ctx, block):
        # runs of whole blocks add one residual only where the whole batch follows the schedule (a split batch
        # reuses per sample, block by block)
        return self.base.block_span(ctx, block) if self._follow.get(ctx.branch, True) is True else block

    def must_store(self, ctx, block, comp) -> bool:
        if self.base.must_store(ctx, block, comp):
            return True
        return ctx.step < len(self._store) and self._store[ctx.step][block][comp]

    def must_store_block(self, ctx, block) -> bool:
        return ctx.step < len(self._store_block) and self._store_block[ctx.step][block]

    def info(self) -> dict:
        return {
            **self.base.info(),
            "check": "first-block residual",
            "thresholds": self.thresholds,
            "per": self.per,
            "rows_checked": self.checked,  # (steps after the first that the schedule does not compute whole)
            "rows_followed": self.followed,
            "mixed_steps": self.mixed,
        }


class CheckedPlan(Plan):
    """A schedule plan (`base`) whose reuses each sample takes only below a first-block change threshold per step."""

    decides_components_in_blocks = True

    def __init__(self, base: Plan, thresholds: Sequence[float], name: str, per: str = "sample"):
        if not is_schedule_plan(base):
            raise ValueError(
                f"{base.name!r} is not a schedule: a first-block check (+fbT) applies to schedule plans only "
                "(fora-N, schedule files, searched and shipped schedules), not to policies or routers."
            )
        if not thresholds or any(not t >= 0 for t in thresholds):
            raise ValueError("the check's thresholds must be numbers >= 0 (inf: always follow the schedule).")
        self.base, self.thresholds, self.name = base, [float(t) for t in thresholds], name
        self.per = check_per(name, per)
        self.default_num_steps, self.cache_history = base.default_num_steps, base.cache_history
        self.collapse_spans = base.collapse_spans  # (`fora-3+spans+fb0.1`: the schedule's runs stay one residual)

    def check(self, arch: ArchitectureMap) -> None:
        self.base.check(arch)

    def check_model(self, transformer) -> None:
        self.base.check_model(transformer)

    def check_call(self, num_steps, scheduler=None) -> None:
        self.base.check_call(num_steps, scheduler)

    def observed_blocks(self, arch):
        return (0,)

    def always_computed(self, arch: ArchitectureMap) -> torch.Tensor:
        first = torch.zeros(arch.num_blocks, dtype=torch.bool)
        first[0] = True
        return (self.base.always_computed(arch) | first[:, None]) & arch.present()

    def block_level(self, arch: ArchitectureMap) -> torch.Tensor:
        level = self.base.block_level(arch).clone()
        level[0] = False  # block 0 computes at every step: the check reads it
        return level

    def step_thresholds(self, num_steps: int) -> list[float]:
        """The thresholds at `num_steps` steps: one for all, or per step resampled by normalised time."""
        t = self.thresholds
        if len(t) == 1:
            return t * num_steps
        return [t[i] for i in resample_index(len(t), num_steps)]

    def decider(self, arch: ArchitectureMap, num_steps: int) -> Decider:
        # block 0 computes at every step (so that a run of whole blocks reused after it starts at block 1)
        schedule = self.base.schedule_at(arch, num_steps).with_block_computed(0)
        return CheckedDecider(schedule, self.step_thresholds(num_steps), self.per, spans=self.collapse_spans)

    def with_spans(self) -> Plan:
        """The checked schedule with its runs of whole blocks reused as one residual (`emoji:hybrid-fast+spans`)."""
        return CheckedPlan(self.base.with_spans(), self.thresholds, self.name + SPANS_SUFFIX, self.per)

    def content(self, arch: ArchitectureMap | None = None) -> dict:
        return {**self.base.content(arch), "plan": self.name, "thresholds": self.thresholds, "per": self.per}


def _checked_schedule(base: Plan, thresholds, per: str) -> Plan:
    """A schedule file's own check (`plans.schedule_plan`): the plan keeps the file's name."""
    return CheckedPlan(base, thresholds, base.name, per)


CHECKED_SCHEDULE[:] = [_checked_schedule]


def _check_suffix(base: Plan, m) -> Plan:
    return CheckedPlan(base, [float(m.group(1))], f"{base.name}{m.group(0)}", per=per_of_suffix(m.group(2)))


register_suffix(
    r"\+fb([0-9]*\.?[0-9]+|inf)" + PER_SUFFIX,
    _check_suffix,
    "<schedule plan>+fbT[-prompt|-batch]",
    "each sample takes the schedule's reuses only while its first-block residual changed less than T since its "
    "last full step (e.g. emoji:faster+blocks+fb0.1)",
)
