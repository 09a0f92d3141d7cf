"""First-block residual caching (FBCache; DBCache with Fn/Bn), decided per sample, per prompt or per batch.

The first `Fn` blocks always compute. After block Fn-1, each sample's residual (output of block Fn-1 minus the
input of block 0) is compared with that sample's residual at its last full computation; if the relative L1 change
is below the threshold, the middle blocks are skipped for that sample: each returns its input plus the residual it
added at its last computation (the sum of these per-block residuals is the span residual FBCache/DBCache reuse, so
this is their mechanism, with one add per block instead of one for the span). The last `Bn` blocks always compute.

Fast paths (so that bookkeeping never costs more than it skips): the Fn/Bn blocks and every component carry no hooks
(the middle blocks are decided as whole blocks), and with threshold 0 nothing does; the per-sample mask is read once
per step and, when all samples agree, handed to the executor as one Python bool. A batch whose samples disagree runs
the middle blocks on the computing samples only. `-prompt` decides both CFG rows of an image on their mean change;
`-batch` decides the whole batch on one change over all its rows (diffusers' FirstBlockCache and cache-dit's DBCache
measure so): the batch never splits, at the price of an image's decisions depending on its batch-mates.
"""

from __future__ import annotations

import re

import torch

from diffroute.core.arch import ArchitectureMap
from diffroute.core.call_context import hidden_states_of
from diffroute.core.deciders import Decider
from diffroute.core.schedule import MAX_BLOCKS
from diffroute.errors import PlanError
from diffroute.plans import Plan, register_plan
from diffroute.policies.common import PER_SUFFIX, check_per, main_tensor, per_of_suffix, relative_change


class FirstBlockDecider(Decider):
    """Per-sample reuse of the middle blocks when the first blocks' residual barely changed."""

    def __init__(
        self, arch: ArchitectureMap, fn: int, bn: int, threshold: float, every: int | None = None, per="sample"
    ):
        self.nb, self.fn, self.bn, self.threshold, self.per = arch.num_blocks, fn, bn, threshold, per
        self.every = every  # benchmarks: measure as usual, but compute the middle blocks every `every`-th step
        self._x0: dict[int, torch.Tensor] = {}
        self._prev: dict[int, torch.Tensor] = {}  # residual at each sample's last full computation, per branch
        self._compute: dict[int, torch.Tensor | bool] = {}

    def on_block_start(self, ctx, block, module, args, kwargs) -> None:
        if block == 0:
            self._x0[ctx.branch] = main_tensor(hidden_states_of(args, kwargs)).detach()

    def on_block_end(self, ctx, block, output) -> None:
        if block != self.fn - 1:
            return
        residual = main_tensor(output).detach() - self._x0.pop(ctx.branch)
        prev = self._prev.get(ctx.branch)
        if prev is None or prev.shape != residual.shape:  # first step of this branch: everything computes
            compute = torch.ones(residual.shape[0], dtype=torch.bool, device=residual.device)
            self._prev[ctx.branch] = residual
        else:
            compute = relative_change(residual, prev, self.per) >= self.threshold
            if self.every:  # (random weights decide nothing meaningful: the pattern is fixed, the work is the same)
                compute = torch.full_like(compute, ctx.step % self.every == 0)
            self._prev[ctx.branch] = torch.where(compute.view(-1, *[1] * (residual.ndim - 1)), residual, prev)
        n = int(compute.sum())  # one read per step; the components then get a plain bool when all rows agree
        self._compute[ctx.branch] = True if n == compute.numel() else False if n == 0 else compute

    def decide(self, ctx, block, comp):
        return True  # components are never decided one by one: the middle blocks are decided as whole blocks

    def decide_block(self, ctx, block):
        return self._compute.get(ctx.branch, True)

    def must_store(self, ctx, block, comp) -> bool:
        return False

    def must_store_block(self, ctx, block) -> bool:
        return True

    def info(self) -> dict:
        return {
            "policy": "first-block residual",
            "Fn": self.fn,
            "Bn": self.bn,
            "threshold": self.threshold,
            "per": self.per,
        }


class FirstBlockPlan(Plan):
    """FBCache (Fn=1, Bn=0) or DBCache; `every=N` fixes the decisions to every N-th step (for timing its mechanics
    on random weights, where the measured change means nothing)."""

    def __init__(self, fn: int, bn: int, threshold: float, name: str, every: int | None = None, per="sample"):
        if fn < 1 or bn < 0 or threshold < 0:
            raise ValueError(f"{name}: need Fn >= 1, Bn >= 0 and a threshold >= 0.")
        self.fn, self.bn, self.threshold, self.name, self.every = fn, bn, threshold, name, every
        self.per = check_per(name, per)  # what one decision covers: a row, an image's CFG pair, the batch

    def check(self, arch: ArchitectureMap) -> None:
        if self.fn + self.bn >= arch.num_blocks:
            raise ValueError(
                f"{self.name}: Fn + Bn = {self.fn + self.bn} leaves no block to cache in a "
                f"{arch.num_blocks}-block model."
            )

    def observed_blocks(self, arch):
        return tuple(sorted({0, self.fn - 1}))

    def always_computed(self, arch: ArchitectureMap) -> torch.Tensor:
        present = arch.present()
        if self.threshold == 0:  # a change is never below 0: everything computes
            return present
        outer = torch.zeros(arch.num_blocks, dtype=torch.bool)
        outer[: self.fn] = True
        outer[arch.num_blocks - self.bn :] = True
        return present & outer[:, None]

    def block_level(self, arch: ArchitectureMap) -> torch.Tensor:
        middle = torch.zeros(arch.num_blocks, dtype=torch.bool)
        if self.threshold > 0:
            middle[self.fn : arch.num_blocks - self.bn] = True
        return middle

    def decider(self, arch, num_steps):
        return FirstBlockDecider(arch, self.fn, self.bn, self.threshold, self.every, self.per)


def _fbcache(m: re.Match) -> Plan:
    return FirstBlockPlan(1, 0, float(m.group(1)), m.group(0), per=per_of_suffix(m.group(2)))


def _dbcache(m: re.Match) -> Plan:
    fn, bn = int(m.group(1)), int(m.group(2))
    if max(fn, bn) > MAX_BLOCKS:
        raise PlanError(f"{m.group(0)}: Fn and Bn count blocks; at most {MAX_BLOCKS}.")
    return FirstBlockPlan(fn, bn, float(m.group(3)), m.group(0), per=per_of_suffix(m.group(4)))


register_plan(
    r"fbcache-([0-9]*\.?[0-9]+)" + PER_SUFFIX,
    _fbcache,
    "fbcache-T[-prompt|-batch]",
    "first-block residual cache, decided per sample (-prompt: both CFG rows of a sample together; -batch: the "
    "whole batch at once, as diffusers' FirstBlockCache)",
    ["fbcache-0.1"],
)
register_plan(
    r"dbcache-F(\d+)B(\d+)-([0-9]*\.?[0-9]+)" + PER_SUFFIX,
    _dbcache,
    "dbcache-F<n>B<n>-T[-prompt|-batch]",
    "Fn/Bn computed blocks",
    ["dbcache-F1B1-0.1"],
)
