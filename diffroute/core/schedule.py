"""Compute schedules: per (step, block, component) compute, reuse or forecast, with metadata and JSON I/O.

A schedule is a boolean `compute` tensor [steps x blocks x components] (True = compute) and a boolean `forecast`
tensor of the same shape (True = a skipped cell is extrapolated from the component's last two computed outputs
instead of reusing the last one), and a boolean `block_reuse` [steps x blocks] (True = at that step the block is not
run at all: it returns its input plus the residual it added at its last computation, as FBCache/DBCache reuse
blocks; only where every component of the block is reused). In JSON each cell is one character: 1 compute, 0 reuse,
f forecast, r the block reused as a whole (all of a block's cells at that step).

A schedule may also carry a first-block `check`: one threshold per step under which each image takes the step's
reuses (above it, that image computes the step; `policies/checked.py`), decided per prompt (both CFG rows of an
image together, the default) or per sample. A threshold search's front members carry theirs; `plans.schedule_plan`
runs such a schedule checked. The transforms below keep it."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch

from diffroute.core.arch import ArchitectureMap
from diffroute.errors import InputError
from diffroute.utils.io import atomic_write_json, read_json
from diffroute.utils.limits import MAX_BLOCKS, MAX_STEPS

FORMAT = "diffroute.schedule/v1"
MAX_FILE_BYTES = 8 * 2**20  # 1000 steps x 1000 blocks x 3 components is ~4 MB of rows


def resample_index(n_from: int, n_to: int) -> list[int]:
    """For each of `n_to` steps, the step of `n_from` nearest in normalised time (step i -> i/(n-1))."""
    return [round(i * (n_from - 1) / max(n_to - 1, 1)) for i in range(n_to)]


def runs(row: list[bool]) -> list[tuple[int, int]]:
    """(first, last) of each run of consecutive True in `row` (a step's blocks reused whole)."""
    out, b = [], 0
    while b < len(row):
        if row[b]:
            e = b
            while e + 1 < len(row) and row[e + 1]:
                e += 1
            out.append((b, e))
            b = e
        b += 1
    return out


def run_starts(whole: torch.Tensor) -> list[list[int]]:
    """[steps][blocks]: for a block reused whole, the first block of the run of consecutive blocks reused whole that
    holds it at that step; for any other block, the block itself."""
    starts = []
    for row in whole.tolist():
        start = list(range(len(row)))
        for first, last in runs(row):
            start[first : last + 1] = [first] * (last + 1 - first)
        starts.append(start)
    return starts


def span_ends(whole: torch.Tensor) -> list[list[int]]:
    """[steps][blocks]: for a block reused whole that starts a run of consecutive blocks reused whole at that step,
    the run's last block; for any other block, the block itself."""
    ends = []
    for row in whole.tolist():
        end = list(range(len(row)))
        for first, last in runs(row):
            end[first] = last
        ends.append(end)
    return ends


# What one first-block check decides: each CFG row alone, both rows of an image together, or the whole batch at once.
CHECK_PER = ("sample", "prompt", "batch")


# A fitted reuse weight's bound: fitted ones lie within a few units of 0 and 1; a file with 1e300 would make inf images.
MAX_FIT_WEIGHT = 100.0


class ScheduleMismatchError(InputError):
    """Raised before any work when a schedule is malformed or does not fit the model it is applied to."""


@dataclass
class Schedule:
    """Which component of which block runs at which denoising step; a reused component returns its cached output."""

    compute: torch.Tensor  # bool [steps, blocks, components]
    model_class: str
    components: tuple[str, ...]
    provenance: dict = field(default_factory=dict)
    forecast: torch.Tensor | None = None  # bool, same shape; only where compute is False. None: no forecasts
    block_reuse: torch.Tensor | None = None  # bool [steps, blocks]; only where the block's cells all reuse
    check: tuple[float, ...] | None = None  # per step: first-block change threshold (inf: unchecked); None: none
    check_per: str = "prompt"  # what one check decides (CHECK_PER): a row, an image's CFG pair, or the batch
    # float [steps, blocks, components + 1, 2]: per reused cell (last index of dim 2: the block reused whole) the
    # weights (a, c) of its fitted stand-in `a * newest + c * previous` (`core/fitted.py`); None: plain reuse
    fit: torch.Tensor | None = None
    # each run of consecutive blocks reused whole at a step takes one fitted weight (its first block's; every block
    # of the run carries it) and runs as one stand-in: input + a * (summed newest residuals) + c * (summed previous)
    fit_spans: bool = False

    def __post_init__(self):
        self.compute = torch.as_tensor(self.compute, dtype=torch.bool).cpu()
        self.forecast = (
            torch.zeros_like(self.compute)
            if self.forecast is None
            else torch.as_tensor(self.forecast, dtype=torch.bool).cpu()
        )
        if self.forecast.shape != self.compute.shape:
            raise ScheduleMismatchError(f"forecast must have compute's shape {tuple(self.compute.shape)}.")
        if bool((self.forecast & self.compute).any()):
            raise ScheduleMismatchError("a cell cannot both compute and forecast: forecast marks skipped cells.")
        self.components = tuple(self.components)
        if self.compute.ndim != 3 or self.compute.shape[2] != len(self.components):
            raise ScheduleMismatchError(
                f"compute must be [steps, blocks, {len(self.components)} components]; got {tuple(self.compute.shape)}."
            )
        self.block_reuse = (
            torch.zeros(self.compute.shape[:2], dtype=torch.bool)
            if self.block_reuse is None
            else torch.as_tensor(self.block_reuse, dtype=torch.bool).cpu()
        )
        if self.block_reuse.shape != self.compute.shape[:2]:
            raise ScheduleMismatchError(f"block_reuse must be [steps, blocks] = {tuple(self.compute.shape[:2])}.")
        if bool((self.block_reuse & (self.compute | self.forecast).any(2)).any()):
            raise ScheduleMismatchError(
                "a block reused as a whole cannot compute or forecast any of its components at that step."
            )
        if self.compute.shape[0] < 1:
            raise ScheduleMismatchError("a schedule needs at least one step.")
        if self.check is not None:
            self.check = tuple(float(t) for t in self.check)
            if len(self.check) != self.compute.shape[0] or not all(t >= 0 for t in self.check):
                raise ScheduleMismatchError(
                    f"check must hold one threshold >= 0 (or inf) per step: {self.compute.shape[0]} of them."
                )
        if self.check_per not in CHECK_PER:
            raise ScheduleMismatchError(f"check_per must be one of {CHECK_PER}, got {self.check_per!r}.")
        if self.fit is not None:
            if self.check is not None:
                raise ScheduleMismatchError(
                    "a schedule carries a first-block check or fitted reuse weights, not both: the weights were "
                    "fitted for reuses that every image takes."
                )
            self.fit = torch.as_tensor(self.fit, dtype=torch.float64).cpu()
            want = (*self.compute.shape[:2], self.compute.shape[2] + 1, 2)
            if tuple(self.fit.shape) != want or not bool((self.fit.abs() <= MAX_FIT_WEIGHT).all()):
                raise ScheduleMismatchError(
                    f"fit must hold weights of shape {list(want)}, each a number in [-{MAX_FIT_WEIGHT:g}, "
                    f"{MAX_FIT_WEIGHT:g}] (fitted ones lie within a few units of 0 and 1)."
                )
            if self.fit_spans:
                self._check_tied()
        if not bool(self.compute[0].all()):
            raise ScheduleMismatchError(
                "step 0 of a schedule must compute every component: nothing is cached before the first step."
            )

    def _check_tied(self) -> None:
        """With `fit_spans`: every block of a run reused whole carries its first block's weights."""
        starts = run_starts(self.block_reuse)
        for t, row in enumerate(starts):
            for b, first in enumerate(row):
                if first != b and not torch.equal(self.fit[t, b, -1], self.fit[t, first, -1]):
                    raise ScheduleMismatchError(
                        f"fit_spans: block {b} at step {t} is in the run of blocks reused whole from block {first}, "
                        "so it must carry that block's weights (one weight per run); fix the file's fit entries or "
                        "drop fit_spans."
                    )

    def tied(self, fit: torch.Tensor) -> torch.Tensor:
        """`fit` with each run's first block's weights copied to every block of the run (`fit_spans`)."""
        fit = fit.clone()
        for t, row in enumerate(run_starts(self.block_reuse)):
            for b, first in enumerate(row):
                fit[t, b, -1] = fit[t, first, -1]
        return fit

    @property
    def num_steps(self) -> int:
        return self.compute.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.compute.shape[1]

    # ---- constructors -------------------------------------------------------------------------------------------
    @classmethod
    def full(cls, arch: ArchitectureMap, num_steps: int) -> Schedule:
        """Compute everything (the vanilla model)."""
        return cls._filled(arch, num_steps, {"rule": "full"})

    @classmethod
    def fora(cls, arch: ArchitectureMap, num_steps: int, n: int, warmup: int = 0) -> Schedule:
        """FORA: every component of every block computes every `n`-th step and is reused in between; with a warm-up,
        the first `warmup` steps all compute and the cycle counts from the last of them."""
        rule = f"fora-{n}" + (f"-w{warmup}" if warmup else "")
        return cls.intervals(arch, num_steps, {c: n for c in arch.components}, rule=rule, warmup=warmup)

    @classmethod
    def intervals(
        cls,
        arch: ArchitectureMap,
        num_steps: int,
        every: Mapping[str, int],
        rule: str | None = None,
        warmup: int = 0,
    ) -> Schedule:
        """Per-component intervals, e.g. {"attn1": 2, "attn2": 4, "ff": 2}; components not named compute always.
        Steps before `warmup` compute everything (a forecast needs two computed outputs: TaylorSeer computes its
        first two steps); after it, a component computes when (step - warmup + 1) is a multiple of its interval."""
        unknown = set(every) - set(arch.components)
        if unknown:
            raise ScheduleMismatchError(
                f"unknown components {sorted(unknown)}; {arch.model_class} has {arch.components}."
            )
        if not 0 <= int(warmup) <= num_steps:
            raise ValueError(f"warm-up must be 0 to {num_steps} steps, got {warmup}.")
        provenance = {"rule": rule or "intervals", "every": dict(every)}
        if warmup:
            provenance["warmup"] = int(warmup)
        s = cls._filled(arch, num_steps, provenance)
        steps = torch.arange(num_steps)
        phase = max(int(warmup) - 1, 0)
        for name, n in every.items():
            if int(n) < 1:
                raise ValueError(f"interval for {name!r} must be >= 1, got {n}.")
            s.compute[:, :, arch.components.index(name)] = ((steps < warmup) | ((steps - phase) % int(n) == 0))[:, None]
        return s

    @classmethod
    def ranges(cls, arch: ArchitectureMap, num_steps: int, rules: Iterable[Mapping]) -> Schedule:
        """Explicit ranges: each rule {"blocks": [a, b), "steps": [c, d), "components": [...], "every": n} makes those
        cells compute only every n-th step (default: never, i.e. reuse the last computed output)."""
        rules = [{k: list(v) if isinstance(v, tuple) else v for k, v in r.items()} for r in rules]  # JSON-ready
        s = cls._filled(arch, num_steps, {"rule": "ranges", "ranges": rules})
        for r in rules:
            b0, b1 = r.get("blocks", (0, arch.num_blocks))
            t0, t1 = r.get("steps", (1, num_steps))
            comps = r.get("components", arch.components)
            every = int(r.get("every", 0))
            if not (0 <= b0 < b1 <= arch.num_blocks) or not (0 <= t0 < t1 <= num_steps):
                raise ScheduleMismatchError(
                    f"range {r} is outside the model ({arch.num_blocks} blocks) or the steps ({num_steps})."
                )
            for name in comps:
                if name not in arch.components:
                    raise ScheduleMismatchError(
                        f"unknown component {name!r}; {arch.model_class} has {arch.components}."
                    )
                steps = torch.arange(t0, t1)
                keep = (steps % every == 0) if every > 0 else torch.zeros_like(steps, dtype=torch.bool)
                s.compute[t0:t1, b0:b1, arch.components.index(name)] = keep[:, None]
        s.compute[0] = True
        return s

    @classmethod
    def _filled(cls, arch: ArchitectureMap, num_steps: int, provenance: dict) -> Schedule:
        if int(num_steps) < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}.")
        compute = torch.ones(int(num_steps), arch.num_blocks, len(arch.components), dtype=torch.bool)
        return cls(compute, arch.model_class, arch.components, provenance)

    # ---- fitting a model and a step count -----------------------------------------------------------------------
    def check_fits(self, arch: ArchitectureMap) -> None:
        """Raise ScheduleMismatchError, saying what does not fit, unless this schedule fits `arch`."""
        problems = []
        if self.model_class != arch.model_class:
            problems.append(f"it was made for {self.model_class}, the model is {arch.model_class}")
        if self.num_blocks != arch.num_blocks:
            problems.append(f"it has {self.num_blocks} blocks, the model has {arch.num_blocks}")
        if self.components != arch.components:
            problems.append(f"its components are {list(self.components)}, the model's are {list(arch.components)}")
        if problems:
            raise ScheduleMismatchError(
                "This schedule does not fit the model: " + "; ".join(problems) + ". Build one for this model "
                "(e.g. diffroute.Schedule.fora(diffroute.architecture_map(pipe.transformer), steps, 3)) or search "
                "one with `diffroute search`."
            )

    def resample(self, num_steps: int) -> Schedule:
        """The same schedule for another step count, by nearest normalised time (step i -> i/(n-1))."""
        if num_steps == self.num_steps:
            return self
        if self.fit is not None:
            raise ScheduleMismatchError(
                f"this schedule's reuse weights were fitted at {self.num_steps} steps, not {num_steps}: run it at "
                f"{self.num_steps} steps, or fit it again with `diffroute calibrate --method fit --steps {num_steps}`."
            )
        src = resample_index(self.num_steps, num_steps)
        return replace(
            self,
            compute=self.compute[src].clone(),
            provenance=dict(self.provenance, resampled_from=self.num_steps),
            forecast=self.forecast[src].clone(),
            block_reuse=self.block_reuse[src].clone(),
            check=None if self.check is None else [self.check[i] for i in src],
        )

    @property
    def has_forecasts(self) -> bool:
        return bool(self.forecast.any())

    @property
    def has_block_reuse(self) -> bool:
        return bool(self.block_reuse.any())

    def with_forecasts(self) -> Schedule:
        """The same compute cells, every skipped cell forecast (TaylorSeer-style) instead of reused."""
        return replace(self, provenance=dict(self.provenance), forecast=~self.compute, block_reuse=None, fit=None)

    def with_block_reuse(self, present: torch.Tensor | None = None) -> Schedule:
        """The same decisions, with every block whose (present) components all reuse at a step reused as a whole:
        the block is not run, it returns its input plus its cached residual (no norms, modulation or gating run)."""
        mask = torch.ones_like(self.compute[0]) if present is None else present
        reused = ~(self.compute | self.forecast)
        whole = (reused | ~mask).all(2) & mask.any(1)
        compute = self.compute & ~whole[..., None]  # (absent components' cells say nothing)
        prov = dict(self.provenance, block_reuse=True)
        return replace(self, compute=compute, provenance=prov, block_reuse=whole)

    def with_block_computed(self, block: int) -> Schedule:
        """The same schedule with `block` computed at every step (a checked plan's block 0, which the check reads)."""
        compute, forecast, whole = self.compute.clone(), self.forecast.clone(), self.block_reuse.clone()
        compute[:, block], forecast[:, block], whole[:, block] = True, False, False
        return replace(self, compute=compute, provenance=dict(self.provenance), forecast=forecast, block_reuse=whole)

    def without_check(self) -> Schedule:
        """The same cells, taken by every image (no first-block check)."""
        return self if self.check is None else replace(self, provenance=dict(self.provenance), check=None)

    def block_pure(self, present: torch.Tensor | None = None) -> bool:
        """Whether every block, at every step, either computes all its (present) components or is reused whole."""
        mask = torch.ones_like(self.compute[0]) if present is None else present
        full = (self.compute | ~mask).all(2)
        return bool((full | self.block_reuse).all())

    def computed_fraction(self, present: torch.Tensor | None = None) -> float:
        """Executed component calls / all component calls (only components the blocks have, when `present` given)."""
        mask = torch.ones_like(self.compute[0]) if present is None else present
        return float(self.compute[:, mask].float().mean())

    # ---- JSON ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        # 0 reuse, 1 compute, 2 forecast, 3 block reused whole
        cells = self.compute.to(torch.uint8) + 2 * self.forecast.to(torch.uint8) + 3 * self.block_reuse[..., None]
        rows = [" ".join("".join("01fr"[c] for c in block) for block in step) for step in cells.tolist()]
        out = {
            "format": FORMAT,
            "model_class": self.model_class,
            "num_steps": self.num_steps,
            "num_blocks": self.num_blocks,
            "components": list(self.components),
            "provenance": self.provenance,
            "compute": rows,
        }
        if self.check is not None:  # JSON has no infinity: "inf" (unchecked step)
            out["check"] = ["inf" if math.isinf(t) else t for t in self.check]
            out["check_per"] = self.check_per
        if self.fit is not None:  # [steps][blocks][components + block]: [a, c]
            out["fit"] = self.fit.tolist()
        if self.fit_spans:
            out["fit_spans"] = True
        return out

    @classmethod
    def from_dict(cls, d, source: str = "schedule") -> Schedule:
        """Validate a schedule's JSON object field by field (see README, "schedule files") and build it."""

        def bad(msg: str) -> ScheduleMismatchError:
            return ScheduleMismatchError(f"{source}: {msg}")

        if not isinstance(d, Mapping):
            raise bad(f"must be a JSON object with the fields of {FORMAT}, got {type(d).__name__}.")
        if d.get("format") != FORMAT:
            raise ScheduleMismatchError(
                f"{source} is not a diffroute schedule (format {d.get('format')!r}, want {FORMAT!r})."
            )
        model_class, components, provenance = d.get("model_class"), d.get("components"), d.get("provenance", {})
        if not isinstance(model_class, str) or not model_class:
            raise bad(
                "'model_class' must be a non-empty string (the transformer class, e.g. PixArtTransformer2DModel)."
            )
        if (
            not isinstance(components, list)
            or not components
            or not all(isinstance(c, str) and c for c in components)
            or len(set(components)) != len(components)
        ):
            raise bad('\'components\' must be a list of distinct component names, e.g. ["attn1", "attn2", "ff"].')
        if not isinstance(provenance, Mapping):
            raise bad("'provenance' must be an object (or left out).")
        limits = {"num_steps": MAX_STEPS, "num_blocks": MAX_BLOCKS}
        for key, top in limits.items():
            v = d.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= top:
                raise bad(f"'{key}' must be an integer from 1 to {top}, got {v!r}.")
        rows = d.get("compute")
        if not isinstance(rows, list) or len(rows) != d["num_steps"]:
            got = len(rows) if isinstance(rows, list) else type(rows).__name__
            raise bad(f"'compute' must be a list of num_steps={d['num_steps']} rows, got {got}.")
        width, bits, fcast, whole = len(components), [], [], []
        for i, row in enumerate(rows):
            blocks = row.split() if isinstance(row, str) else None
            if blocks is None or len(blocks) != d["num_blocks"]:
                raise bad(f"compute row {i} must be a string of num_blocks={d['num_blocks']} space-separated groups.")
            for j, block in enumerate(blocks):
                if len(block) != width or set(block) - {"0", "1", "f", "r"}:
                    raise bad(
                        f"compute row {i}, block {j}: {block[:20]!r} must be {width} characters of 0/1/f "
                        "(reuse, compute, forecast), or all r (the block reused whole)."
                    )
                if "r" in block and set(block) != {"r"}:
                    raise bad(f"compute row {i}, block {j}: {block!r} mixes r with other cells; r marks a whole block.")
            bits.append([[ch == "1" for ch in block] for block in blocks])
            fcast.append([[ch == "f" for ch in block] for block in blocks])
            whole.append([block[0] == "r" for block in blocks])
        compute, forecast = torch.tensor(bits, dtype=torch.bool), torch.tensor(fcast, dtype=torch.bool)
        block_reuse = torch.tensor(whole, dtype=torch.bool)
        check = d.get("check")
        if check is not None:
            ok = isinstance(check, list) and len(check) == d["num_steps"]
            ok = ok and all(t == "inf" or (type(t) in (int, float) and math.isfinite(t) and t >= 0) for t in check)
            if not ok:
                raise bad(
                    f"'check' must be a list of num_steps={d['num_steps']} first-block thresholds, each a number "
                    '>= 0 or "inf" (that step unchecked), or left out.'
                )
            check = [math.inf if t == "inf" else float(t) for t in check]
        per = d.get("check_per", "prompt")
        if per not in CHECK_PER:
            allowed = ", ".join(map(repr, CHECK_PER))
            raise bad(f"'check_per' must be one of {allowed} (what one check decides), got {per!r}.")
        fit = d.get("fit")
        if fit is not None:
            shape = [d["num_steps"], d["num_blocks"], width + 1, 2]
            if not _nested_numbers(fit, shape):
                raise bad(
                    f"'fit' must be a {'x'.join(map(str, shape))} nested list of numbers in [-{MAX_FIT_WEIGHT:g}, "
                    f"{MAX_FIT_WEIGHT:g}] (per step, block and component, then the block as a whole: the weights a, c "
                    "of a fitted reuse), or left out."
                )
        spans = d.get("fit_spans", False)
        if not isinstance(spans, bool):
            raise bad(
                "'fit_spans' must be true or false (one fitted weight per run of blocks reused whole), or left out."
            )
        return cls(
            compute, model_class, tuple(components), dict(provenance), forecast, block_reuse, check, per, fit, spans
        )

    def save(self, path) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> Schedule:
        return cls.from_dict(read_json(path, "schedule", MAX_FILE_BYTES), source=f"schedule {str(path)!r}")


def _nested_numbers(value, shape: list[int]) -> bool:
    """Whether `value` is a nested list of this shape holding numbers within +-MAX_FIT_WEIGHT (no bools), checked
    before tensors."""
    if not shape:
        return type(value) in (int, float) and abs(value) <= MAX_FIT_WEIGHT
    return isinstance(value, list) and len(value) == shape[0] and all(_nested_numbers(v, shape[1:]) for v in value)
