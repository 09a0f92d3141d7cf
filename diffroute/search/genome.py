"""Genomes <-> schedules, the seeds of the initial population, and mutations that move whole rows and columns.

A genome has two bits per searchable cell (step >= 1, block, present component): a compute bit and, read only where
the cell does not compute, a forecast bit (forecast from the last two computed outputs instead of reusing the last).
So each cell is compute, reuse or forecast: hybrids no fixed policy expresses. Step 0 always computes. With
`whole_blocks`, one more bit per (step >= 1, block), read only where every cell of that block reuses: reuse the block
whole from its residual (nothing of it runs) instead of reusing its components inside it; with `whole_always`, no
such bit: every block whose cells all reuse is reused whole (`PLAN+blocks`'s rule, for a fitted search: fitted
whole, such a block fits as well as component by component and runs no norms or modulation). With `thresholds`,
three more bits per step >= 1: a first-block check threshold (Gray-coded index into THRESHOLD_LEVELS, so one bit flip
moves to a neighbouring level), under which each image takes that step's reuses and above which it computes the
step (`policies/checked.py`): the searched plan is then dynamic per image, the schedule saying where an image may
reuse and its own first block whether it does now. Where some step is checked, block 0 computes at every step (the
check reads it); a genome with every step unchecked is the static schedule its other bits say. The thresholds are
per step, not per (step, block): the check decides a whole step for an image, both of its CFG rows together (decided
row by row, the rows of one image go stale apart and guidance amplifies the difference: FBCache 0.2 per row lost
3.4 dB mean PSNR against per prompt at equal FLOPs on the emoji model), or with `check_per="batch"` for the whole
batch at once, as diffusers' FirstBlockCache does (no split batches, whose sub-batch runs cost wall-clock that the
FLOP count does not show).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import numpy as np
import torch
from pymoo.core.mutation import Mutation

from diffroute.core.arch import ArchitectureMap
from diffroute.core.schedule import Schedule

# First-block check thresholds a genome may pick per step (relative L1 change of block 0's residual; inf: the step
# is unchecked, every image takes its reuses). FBCache's usual settings are 0.1-0.3.
THRESHOLD_LEVELS = (math.inf, 0.5, 0.3, 0.2, 0.15, 0.1, 0.06, 0.03)
THRESHOLD_BITS = 3


def _gray_to_index(bits: np.ndarray) -> int:
    value = 0
    for b in bits:
        value = (value << 1) | (int(b) ^ (value & 1))
    return value


def _index_to_gray(index: int) -> np.ndarray:
    g = index ^ (index >> 1)
    return np.array([(g >> k) & 1 for k in reversed(range(THRESHOLD_BITS))], dtype=bool)


def nearest_level(threshold: float) -> int:
    """The index of the level nearest `threshold` on a log scale (inf to inf)."""
    if math.isinf(threshold):
        return 0
    finite = [(abs(math.log(max(threshold, 1e-6) / t)), i) for i, t in enumerate(THRESHOLD_LEVELS) if i]
    return min(finite)[1]


class GenomeSpace:
    """Compute bits for every (step >= 1, block, present component), then as many forecast bits (if `forecast`),
    whole-block bits (if `whole_blocks` and not `whole_always`) and threshold bits (if `thresholds`)."""

    def __init__(
        self,
        arch: ArchitectureMap,
        num_steps: int,
        forecast: bool = True,
        whole_blocks: bool = False,
        thresholds: bool = False,
        check_per: str = "prompt",
        whole_always: bool = False,
    ):
        # (with whole_always, no whole-block genes: the rule decides)
        self.arch, self.num_steps, self.forecast = arch, num_steps, forecast
        self.whole_blocks, self.whole_always = whole_blocks and not whole_always, whole_always
        self.thresholds, self.check_per = thresholds, check_per
        self.present = arch.present()
        self.n_cells = (num_steps - 1) * int(self.present.sum())
        self.n_whole = (num_steps - 1) * arch.num_blocks if self.whole_blocks else 0
        self.n_thresholds = (num_steps - 1) * THRESHOLD_BITS if thresholds else 0
        self.whole_at = self.n_cells * (2 if forecast else 1)  # where each group of bits starts
        self.thresholds_at = self.whole_at + self.n_whole
        self.n_var = self.thresholds_at + self.n_thresholds

    def _cells(self, bits: np.ndarray) -> torch.Tensor:
        full = torch.zeros(self.num_steps, *self.present.shape, dtype=torch.bool)
        full[1:, self.present] = torch.from_numpy(np.asarray(bits, dtype=bool).reshape(self.num_steps - 1, -1))
        return full

    def to_schedule(self, bits: np.ndarray, provenance: dict | None = None) -> Schedule:
        bits = np.asarray(bits, dtype=bool)
        compute = self._cells(bits[: self.n_cells])
        compute[0] = True
        compute[:, ~self.present] = True  # absent components: nothing to decide
        forecast = self._cells(bits[self.n_cells : 2 * self.n_cells]) & ~compute if self.forecast else None
        check = None
        if self.thresholds:
            genes = bits[self.thresholds_at :].reshape(self.num_steps - 1, THRESHOLD_BITS)
            check = [math.inf] + [THRESHOLD_LEVELS[_gray_to_index(g)] for g in genes]
            if all(math.isinf(t) for t in check):  # nothing checked: the static schedule
                check = None
        s = Schedule(compute, self.arch.model_class, self.arch.components, dict(provenance or {}), forecast)
        if self.whole_blocks:
            wanted = torch.zeros(self.num_steps, self.arch.num_blocks, dtype=torch.bool)
            wanted[1:] = torch.from_numpy(bits[self.whole_at : self.thresholds_at].reshape(self.num_steps - 1, -1))
            keep = s.with_block_reuse(self.present).block_reuse & wanted  # where every cell of a block reuses
            s = replace(s, compute=s.compute & ~keep[..., None], block_reuse=keep)
        elif self.whole_always:
            s = s.with_block_reuse(self.present)
        # with a check, block 0 computes at every step: the check reads it
        return s if check is None else replace(s.with_block_computed(0), check=check, check_per=self.check_per)

    def from_schedule(self, schedule: Schedule) -> np.ndarray:
        parts = [schedule.compute[1:][:, self.present].reshape(-1).numpy().astype(bool)]
        if self.forecast:
            parts.append(schedule.forecast[1:][:, self.present].reshape(-1).numpy().astype(bool))
        if self.whole_blocks:
            parts.append(schedule.block_reuse[1:].reshape(-1).numpy().astype(bool))
        if self.thresholds:
            check = schedule.check or [math.inf] * schedule.num_steps
            parts += [_index_to_gray(nearest_level(t)) for t in check[1:]]
        return np.concatenate(parts)

    @staticmethod
    def key(bits: np.ndarray) -> str:
        return hashlib.sha1(np.packbits(np.asarray(bits, dtype=bool)).tobytes()).hexdigest()[:16]

    def seed_schedules(self, extra: list[Schedule] = ()) -> list[Schedule]:
        """`extra` (BAC, L2C and shipped schedules), then hand-made ones: FORA-N, TaylorSeer-N (with and without a
        warm-up), FORA/TaylorSeer caching only the late steps (long warm-ups), attention-only and MLP-only
        intervals, middle-step ranges; with `whole_blocks`, each followed by its whole-block variant."""
        a, s = self.arch, self.num_steps
        attn = [c for c in a.components if "attn" in c]
        made = [Schedule.fora(a, s, n) for n in (2, 3, 4, 5)]
        if self.forecast:
            made += [Schedule.fora(a, s, n, warmup=min(w, s)).with_forecasts() for n in (2, 3, 4) for w in (0, 2)]
        made += [Schedule.fora(a, s, n, warmup=min(2, s)) for n in (3, 4)]
        # the gentle end of the front: every early step computes, caching only the late (low-noise) steps
        made += [Schedule.fora(a, s, n, warmup=w) for n in (2, 3) for w in (s // 4, s // 2, 3 * s // 4) if 0 < w < s]
        if self.forecast:
            made += [Schedule.fora(a, s, 2, warmup=w).with_forecasts() for w in (s // 4, s // 2) if 0 < w < s]
        made += [Schedule.intervals(a, s, {c: n for c in attn}) for n in (2, 3)]
        made += [Schedule.intervals(a, s, {c: 2 for c in a.components if c not in attn})]
        nb = a.num_blocks
        if s > 4:  # the middle steps of inner blocks (needs steps left at both ends)
            rule = {"blocks": (1, max(nb - 1, 2)), "steps": (2, s - 2)}
            made += [Schedule.ranges(a, s, [dict(rule, every=n)]) for n in (2, 3)]
        # `extra` first: a population smaller than the seeds keeps the routers' and an earlier front's schedules
        made = [m for m in [*(x for x in extra if x.num_steps == s), *made] if m.num_blocks == nb]
        if self.thresholds:  # before all: FBCache at its usual thresholds (every block but the first reused whole
            # after step 0, each image checked by block 0), and plain checked rhythms, then the rest unchecked
            fbcache = Schedule.fora(a, s, s).with_block_reuse(self.present)
            rhythms = [Schedule.fora(a, s, n).with_block_reuse(self.present) for n in (2, 3)]
            checked = [_checked(fbcache, t, self.check_per) for t in (0.1, 0.2, 0.3)]
            checked += [_checked(r, 0.3, self.check_per) for r in rhythms]
            made = checked + made
        if self.whole_blocks:  # each also with its fully reused blocks reused whole (FORA so: FBCache's mechanism
            # on a fixed rhythm; an earlier front's members so: where the last search ended, with cheaper skips)
            made = [v for m in made for v in (m, m.with_block_reuse(self.present))]
        return made

    def seeds(self, rng: np.random.Generator, size: int, extra: list[Schedule] = ()) -> np.ndarray:
        """Hand-made schedules first, then random ones of varied density, `size` in all, no duplicates."""
        out, keys = [], set()
        for bits in [self.from_schedule(m) for m in self.seed_schedules(extra)]:
            if self.key(bits) not in keys and len(out) < size:
                out.append(bits)
                keys.add(self.key(bits))
        while len(out) < size:
            bits = rng.random(self.n_var) < rng.uniform(0.2, 0.9)
            if self.key(bits) not in keys:
                out.append(bits)
                keys.add(self.key(bits))
        return np.stack(out)


def _checked(schedule: Schedule, threshold: float, per: str) -> Schedule:
    """`schedule` checked at one threshold at every step, decided `per` sample, prompt or batch."""
    prov = dict(schedule.provenance, check=threshold)
    return replace(schedule, provenance=prov, check=[threshold] * schedule.num_steps, check_per=per)


class StructuredMutation(Mutation):
    """Bit flips, plus (with probability `structured`) one structural move that sets a whole group of cells to
    compute or to skip: every cell of one step, every component of one block at one step, or one component in every
    block at one step. Single-bit flips alone rarely find such coordinated moves in a genome of thousands of bits."""

    def __init__(self, space: GenomeSpace, prob_var: float = 0.02, structured: float = 0.5):
        super().__init__(prob=1.0, prob_var=prob_var)
        self.space, self.bit_prob, self.structured = space, prob_var, structured
        steps, nb, nc = space.num_steps - 1, *space.present.shape
        # index of each searchable cell in the compute half, as [step-1, block, component] (-1 where absent)
        index = -np.ones((steps, nb, nc), dtype=np.int64)
        index[:, space.present.numpy()] = np.arange(space.n_cells).reshape(steps, -1)
        self.index = index

    def _group(self, rng: np.random.Generator) -> np.ndarray:
        steps, nb, nc = self.index.shape
        s = rng.integers(steps)
        kind = rng.integers(3)
        if kind == 0:
            cells = self.index[s]
        elif kind == 1:
            cells = self.index[s, rng.integers(nb)]
        else:
            cells = self.index[s, :, rng.integers(nc)]
        cells = np.asarray(cells).reshape(-1)
        return cells[cells >= 0]

    def _do(self, problem, X, *args, random_state=None, **kwargs):
        rng = random_state if random_state is not None else np.random.default_rng()
        X = X.astype(bool).copy()
        X ^= rng.random(X.shape) < self.bit_prob
        for row in X:
            if rng.random() < self.structured:
                cells = self._group(rng)
                row[cells] = rng.random() < 0.5  # the whole group computes, or the whole group skips
                if self.space.forecast and not row[cells[0]]:
                    row[self.space.n_cells + cells] = rng.random() < 0.5  # ... by reuse or by forecast
                if self.space.whole_blocks and not row[cells[0]]:  # ... and the blocks touched reused whole or not
                    steps_blocks = np.argwhere(np.isin(self.index, cells))[:, :2]
                    flags = self.space.whole_at + steps_blocks[:, 0] * self.index.shape[1]
                    row[np.unique(flags + steps_blocks[:, 1])] = rng.random() < 0.5
            if self.space.thresholds and rng.random() < self.structured:  # one level over a run of steps
                steps = self.index.shape[0]
                first = rng.integers(steps)
                last = rng.integers(first, steps) + 1
                level = _index_to_gray(int(rng.integers(len(THRESHOLD_LEVELS))))
                at = self.space.thresholds_at
                row[at + first * THRESHOLD_BITS : at + last * THRESHOLD_BITS] = np.tile(level, last - first)
        return X
