"""The executor: diffusers hooks on a transformer and its components that carry out a plan's decisions.

Compile-friendly by construction: everything the executor does in Python (step tracking, decisions, the cache,
stats) sits in methods marked `torch.compiler.disable`, so a compiled transformer (`transformer.compile()` or
diffusers' `compile_repeated_blocks()`) breaks its graph around them instead of tracing them and recompiling at
every step. The component hook's own frame is skipped by dynamo (`recursive=False`): it stays Python, and the
component's forward it calls compiles as a graph of its own. One opaque call per component call (`stand_in`), two
when the output must be kept (`keep`). Components a plan computes at every step and never stores (all of them under
`full`) get no hook at all, so `full` compiles to vanilla's graph with two breaks (the step hook's start and end).
"""

from __future__ import annotations

import contextlib

import torch
from diffusers.hooks import HookRegistry

from diffroute.core import width
from diffroute.core.arch import ArchitectureMap, architecture_map
from diffroute.core.block_level import BlockDecisions
from diffroute.core.cache import FeatureCache, rebuild, tensors_of
from diffroute.core.call_context import hidden_states_of, rows_of, sub_batch
from diffroute.core.context import StepContext, StepTracker, scheduler_step_source
from diffroute.core.decisions import (
    COMPUTE,
    FORECAST,
    REUSE,
    Compute,
    Fit,
    Fitted,
    Forecast,
    Reuse,
    Rows,
    Skip,
    SkipRows,
    Soft,
    SoftReuse,
    SoftWidth,
    Width,
    handler,
    settled,
    typed,
)
from diffroute.core.fitted import FittedDecisions
from diffroute.core.foreign import foreign_cache_hooks, refuse_foreign_caches
from diffroute.core.hooks import (
    BLOCK_HOOK,
    BLOCK_REUSE_HOOK,
    COMPONENT_HOOK,
    KEEP,
    STEP_HOOK,
    BlockHook,
    BlockReuseHook,
    ComponentHook,
    StepHook,
)
from diffroute.core.invariant import attach_invariant, detach_invariant, invariant_modules
from diffroute.core.soft import SoftDecisions
from diffroute.core.stats import CallStats, StatsRecorder
from diffroute.utils.unhook import remove_hook

# The version of the executor's arithmetic: bumped when a change alters the values a plan produces (not only its
# speed), so that resumable runs (`eval compare` images, search evaluations) refuse results made before it.
# 2: reused blocks laid out as their own output (later blocks' matmuls and norms then round as in vanilla).
NUMERICS = 2

# Keyword arguments of component forwards that carry one row per sample (sliced when only some samples compute).
BATCHED_KWARGS = ("hidden_states", "encoder_hidden_states", "attention_mask", "encoder_attention_mask", "temb")

__all__ = ["Executor", "foreign_cache_hooks", "refuse_foreign_caches"]


class Executor(BlockDecisions, FittedDecisions, SoftDecisions):
    """Attaches to one transformer, owns the step tracker, the feature cache and per-call stats."""

    def __init__(self, transformer: torch.nn.Module, plan, scheduler=None, num_inference_steps: int | None = None):
        self.transformer = transformer
        self.arch: ArchitectureMap = architecture_map(transformer)
        self._timestep_scale = self.arch.spec.timestep_scale if self.arch.spec is not None else 1.0
        if not hasattr(plan, "decider"):
            raise TypeError(f"Executor needs a resolved Plan (diffroute.resolve_plan(...)); got {type(plan).__name__}.")
        self.plan = plan  # a diffroute.plans.Plan: plans build on core, core never imports them
        self.plan.check(self.arch)  # refuse a schedule that does not fit, before any work
        self.plan.check_model(transformer)
        refuse_foreign_caches(transformer)
        source = scheduler_step_source(scheduler) if scheduler is not None else None
        default_steps = num_inference_steps or self.plan.default_num_steps
        if scheduler is None and default_steps is None:
            raise ValueError(
                f"Plan {self.plan.name!r} needs to know the step count: apply it to a pipeline, or pass "
                "num_inference_steps=... when applying it to a bare transformer."
            )
        self.scheduler = scheduler
        self.tracker = StepTracker(source, default_steps)
        self.default_num_steps = default_steps
        self.cache = FeatureCache(history=self.plan.cache_history, keep_graph=self.plan.cache_keeps_graph)
        self.present = self.arch.present()
        # Computed at every step and never stored: no hook needed (stats count them once per transformer call).
        self.always = self.plan.always_computed(self.arch) & self.present
        components = [m for row in self.arch.modules for m in row if m is not None]
        self._watched = [transformer, *self.arch.blocks, *components]  # where diffusers' caches put their hooks
        # Blocks decided as a whole (their components get no hooks; stats count them per block call).
        self.block_level = self.plan.block_level(self.arch)
        if not self.plan.decides_components_in_blocks:  # (else `always` means: computed whenever the block runs)
            self.block_level &= ~self.always.all(1)
        self.decider = None
        # components with a hook of their own (they count their own calls when their block computes in full)
        self._hooked = self.present & ~self.always
        if not self.plan.decides_components_in_blocks:
            self._hooked &= ~self.block_level[:, None]
        self._quiet_components = False  # True while a block runs for some rows under its own record
        self._block_forms: dict[int, tuple[bool, bool]] = {}  # per block: its output's form (see blocks.form_of)
        self._span_until: int | None = None  # the last block of a run reused as one residual, while inside it
        self.stats: StatsRecorder | None = None
        self.last_stats: CallStats | None = None
        # the text projection, once per call: only under plans that skip something (`full` keeps vanilla's graph)
        skips = bool(self._hooked.any() or self.block_level.any())
        spec = self.arch.spec
        self._invariant = invariant_modules(transformer, spec.call_invariant if spec and skips else ())
        self._invariant_hooks = []
        self._attached = False

    # ---- attaching ------------------------------------------------------------------------------------------------
    def attach(self) -> Executor:
        HookRegistry.check_if_exists_or_initialize(self.transformer).register_hook(StepHook(self), STEP_HOOK)
        self._observed = sorted(self.plan.observed_blocks(self.arch))
        for b in self._observed:
            HookRegistry.check_if_exists_or_initialize(self.arch.blocks[b]).register_hook(
                BlockHook(self, b), BLOCK_HOOK
            )
        for b in self.block_level.nonzero().flatten().tolist():
            HookRegistry.check_if_exists_or_initialize(self.arch.blocks[b]).register_hook(
                BlockReuseHook(self, b), BLOCK_REUSE_HOOK
            )
        for b, row in enumerate(self.arch.modules):
            for c, module in enumerate(row):
                if module is not None and self._hooked[b, c]:
                    registry = HookRegistry.check_if_exists_or_initialize(module)
                    registry.register_hook(ComponentHook(self, b, c), COMPONENT_HOOK)
        self._invariant_hooks = attach_invariant(self._invariant)
        self._invalidate()
        self._attached = True
        return self

    def detach(self) -> None:
        self.end_call()
        remove_hook(self.transformer, STEP_HOOK)
        for b in self._observed:
            remove_hook(self.arch.blocks[b], BLOCK_HOOK)
        for b in self.block_level.nonzero().flatten().tolist():
            remove_hook(self.arch.blocks[b], BLOCK_REUSE_HOOK)
        for row in self.arch.modules:
            for module in row:
                if module is not None:
                    remove_hook(module, COMPONENT_HOOK)
        detach_invariant(self._invariant)
        self._invariant_hooks = []
        self._invalidate()
        self._attached = False

    def _invalidate(self) -> None:
        HookRegistry.check_if_exists_or_initialize(self.transformer).invalidate_child_registries_cache()

    # ---- the call lifecycle -----------------------------------------------------------------------------------------
    @property
    def ctx(self) -> StepContext:
        return self.tracker.ctx

    @torch.compiler.disable
    def on_transformer_start(self, timestep, hidden: torch.Tensor, name: str | None = None) -> None:
        if timestep is not None and self._timestep_scale != 1.0:  # the scheduler's units, as in the call context
            timestep = timestep * self._timestep_scale
        ctx, new_call = self.tracker.advance(timestep, hidden.shape[0], name)
        self._span_until = None
        if new_call or self.stats is None:
            self._start_call(ctx.num_steps or self.default_num_steps, hidden.device)
        self.stats.transformer_start(ctx.step, hidden.device)
        self.stats.record_always(ctx.step, ctx.batch_size)

    @torch.compiler.disable
    def on_transformer_end(self) -> None:
        if self.stats is not None:
            self.stats.transformer_stop()

    def _start_call(self, num_steps: int, device: torch.device) -> None:
        self.end_call(reset_tracker=False)
        # enabled after the plan: refused at its first call, nothing changed. Only where diffusers' caches hook (the
        # transformer, its blocks and their attention/FFN modules): walking every submodule cost ~1 ms per call.
        refuse_foreign_caches(self.transformer, self._watched)
        self.decider = self.plan.decider(self.arch, num_steps)
        for hook in self._invariant_hooks:
            hook.clear()
        # inside blocks decided as a whole, the block's record counts its components (`always` there means "whenever
        # the block runs"), so only the other always-computed components are counted once per call
        counted_always = self.always & ~self.block_level[:, None]
        self.stats = StatsRecorder(num_steps, self.present, counted_always, device)
        self.cache.reset_peak()

    def end_call(self, reset_tracker: bool = True) -> None:
        """Close the current pipeline call: publish its stats and free the cache."""
        if self.stats is not None:
            info = dict(self.decider.info(), plan=self.plan.name)
            self.last_stats = self.stats.finish(
                self.plan.name,
                self.arch.block_names,
                self.arch.components,
                self.cache.peak_bytes,
                info,
                cache_bound_bytes=self.cache.bound_bytes(),
                invariant_runs=max((h.misses for h in self._invariant_hooks), default=None),
            )
        self.stats, self.decider = None, None
        self.cache.clear()
        for hook in self._invariant_hooks:  # (frees the outputs; the call's counts stay readable)
            hook.forget()
        if reset_tracker:
            self.tracker.reset()

    # ---- one block / component call ------------------------------------------------------------------------------
    @torch.compiler.disable
    def on_block_start(self, b: int, module, args: tuple, kwargs: dict) -> None:
        if self.decider is not None:
            self.decider.on_block_start(self.ctx, b, module, args, kwargs)

    @torch.compiler.disable
    def on_block_end(self, b: int, output) -> None:
        if self.decider is not None:
            self.decider.on_block_end(self.ctx, b, output)

    @torch.compiler.disable
    def stand_in(self, forward, b: int, c: int, args: tuple, kwargs: dict):
        """Carry out the decider's decision where it is not a plain compute: the cached or forecast output, or the
        cached output with some samples computed afresh. None: compute (also outside a transformer forward, where
        there is nothing to decide); KEEP: compute, then hand the output to `keep` (a later step reuses it)."""
        if self.decider is None or self._compute_all:
            return None
        if self.decider.reads_component_inputs:  # per-image gates read what the component is about to read
            self.decider.component_inputs(self.ctx, b, c, hidden_states_of(args, kwargs))
        decision = typed(self.decider.decide(self.ctx, b, c))
        # one handler per decision type (the training ones, Soft and SoftWidth, live in core.soft)
        return handler(self._component_handlers, decision, "component")(self, forward, b, c, decision, args, kwargs)

    def _compute(self, forward, b, c, decision, args, kwargs):
        n = self.ctx.batch_size
        self._record_component(b, c, n, n)
        return KEEP if self.decider.must_store(self.ctx, b, c) else None

    def _reuse(self, forward, b, c, decision, args, kwargs):
        """The cached output (FORECAST: extrapolated from the last two); computed when nothing usable is cached."""
        key, n = (self.ctx.branch, b, c), self.ctx.batch_size
        out = self.cache.forecast(key, self.ctx.step, n) if decision is FORECAST else None
        forecast = n if out is not None else 0
        out = out if out is not None else self.cache.get(key, n)  # one output so far: reuse it
        if out is None:
            return self._compute(forward, b, c, COMPUTE, args, kwargs)
        self._record_component(b, c, 0, n, forecast)
        return out

    def _rows(self, forward, b, c, decision, args, kwargs):
        """Per sample: the computing rows as one sub-batch, merged into the others' cached outputs."""
        decision = settled(decision, FORECAST if decision.forecast else REUSE)
        if not isinstance(decision, Rows):
            return handler(self._component_handlers, decision, "component")(self, forward, b, c, decision, args, kwargs)
        store = self.decider.must_store(self.ctx, b, c)
        mixed = self._compute_rows(forward, (self.ctx.branch, b, c), decision, args, kwargs, store)
        if mixed is None:  # nothing cached yet: every row computes
            return self._compute(forward, b, c, COMPUTE, args, kwargs)
        n, computed = self.ctx.batch_size, int(decision.compute.sum())
        self._record_component(b, c, computed, n, n - computed if decision.forecast else 0)
        return mixed

    def _width(self, forward, b, c, decision, args, kwargs):
        """The FFN at a fraction of its hidden units, really sliced; counted as the share of units it ran."""
        n = self.ctx.batch_size
        self._record_component(b, c, n, n)
        hidden, fraction = hidden_states_of(args, kwargs), decision.fraction
        if isinstance(fraction, torch.Tensor):
            fraction = rows_of(fraction)  # the block may run for some samples only
        rows = hidden.shape[0]
        done = float(fraction.float().sum()) if isinstance(fraction, torch.Tensor) else fraction * rows
        self.stats.discount(self.ctx.step, b, c, rows - done)
        return width.sliced_ffn_rows(self.arch.modules[b][c], hidden, fraction)

    def _record_component(self, b: int, c: int, n_computed: int, n: int, n_forecast: int = 0) -> None:
        """Count a component call, except inside a block that runs for some samples only: the block's own record
        counts its components there (a second count inflated `computed_fraction` of per-sample block routers)."""
        if not self._quiet_components:
            self.stats.record(self.ctx.step, b, c, n_computed, n, n_forecast)

    @torch.compiler.disable
    def keep(self, b: int, c: int, out) -> None:
        """Store a computed output that a later step may reuse."""
        self.cache.put((self.ctx.branch, b, c), out, self.ctx.step)

    def _compute_rows(self, forward, key, decision: Rows, args: tuple, kwargs: dict, store: bool = True):
        """Compute the component for the computing samples only and merge them into the others' cached (or, under
        `forecast`, forecast) outputs; the merged output is cached when `store` (the decider's `must_store`)."""
        n = self.ctx.batch_size
        cached = self.cache.forecast(key, self.ctx.step, n) if decision.forecast else None
        cached = cached if cached is not None else self.cache.get(key, n)
        if cached is None:
            return None
        rows = decision.compute.nonzero().squeeze(1)

        def take(x):
            return x.index_select(0, rows) if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == n else x

        args = (take(args[0]), *args[1:]) if args else args
        kwargs = {k: take(v) if k in BATCHED_KWARGS else v for k, v in kwargs.items()}
        with sub_batch(rows, n):
            fresh = tensors_of(forward(*args, **kwargs))
        merged = [None if c is None else c.clone().index_copy_(0, rows, f) for c, f in zip(tensors_of(cached), fresh)]
        out = rebuild(type(cached), merged)
        if store:
            self.cache.put(key, out, self.ctx.step)
        return out

    def check_call(self, num_steps: int | None) -> None:
        """Raise before a pipeline call starts if the plan cannot run it (a router trained for another step count)."""
        self.plan.check_call(num_steps, self.scheduler)

    @contextlib.contextmanager
    def at_step(self, step: int, branch: int = 0, num_steps: int | None = None):
        """Run the transformer calls inside as step `step` (and CFG branch `branch`) of one call: for training and
        calibration, which replay recorded steps out of order. `end_call()` starts a fresh call (empty cache).
        Cached outputs and decider state are kept per branch, so a caller that runs the transformer on changing
        subsets of its samples gives each subset a branch of its own (see `core.parts`)."""
        self.tracker.pin(step, branch, num_steps)
        try:
            yield self
        finally:
            self.tracker.unpin()

    @contextlib.contextmanager
    def pipeline_call(self):
        """Bracket one pipeline call: fresh state at entry, stats and a clean slate at exit, even on error."""
        self.end_call()
        try:
            yield self
        finally:
            self.end_call()

    # ---- dispatch: one handler per decision type --------------------------------------------------------------------
    _component_handlers = {
        Compute: _compute,
        Reuse: _reuse,
        Forecast: _reuse,
        Fitted: FittedDecisions._fitted,
        Fit: FittedDecisions._fit,
        Rows: _rows,
        Width: _width,
        Soft: SoftDecisions._soft_component,
        SoftWidth: SoftDecisions._soft_width,
    }
    _block_handlers = {
        Compute: BlockDecisions._compute_block,
        Reuse: BlockDecisions._reuse_block,
        Fitted: FittedDecisions._fitted_block,
        Fit: FittedDecisions._fit_block,
        Skip: BlockDecisions._skip_block,
        Rows: BlockDecisions._rows_block,
        SkipRows: BlockDecisions._skip_rows_block,
        Soft: SoftDecisions._soft_block,
        SoftReuse: SoftDecisions._soft_reuse_block,
    }
