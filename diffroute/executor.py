"""The executor: diffusers hooks on a transformer and its components that carry out a plan's decisions."""

from __future__ import annotations

import contextlib

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .arch import ArchitectureMap, architecture_map
from .cache import FeatureCache, rebuild, tensors_of
from .context import StepContext, StepTracker, scheduler_step_source
from .deciders import FORECAST
from .plans import Plan, resolve_plan
from .stats import CallStats, StatsRecorder

STEP_HOOK = "diffroute_step"
BLOCK_HOOK = "diffroute_block"
COMPONENT_HOOK = "diffroute_component"
# Keyword arguments of component forwards that carry one row per sample (sliced when only some samples compute).
BATCHED_KWARGS = ("hidden_states", "encoder_hidden_states", "attention_mask", "encoder_attention_mask", "temb")


class _StepHook(ModelHook):
    """On the transformer: advances the step context and times each forward."""

    def __init__(self, executor: Executor):
        super().__init__()
        self.executor = executor

    def pre_forward(self, module, *args, **kwargs):
        hidden = args[0] if args else kwargs.get("hidden_states")
        self.executor.on_transformer_start(kwargs.get("timestep"), hidden)
        return args, kwargs

    def post_forward(self, module, output):
        self.executor.stats.transformer_stop()
        return output


class _BlockHook(ModelHook):
    """On a block a decider watches (dynamic policies): shows it the block's inputs and output."""

    def __init__(self, executor: Executor, block: int):
        super().__init__()
        self.executor, self.block = executor, block

    def pre_forward(self, module, *args, **kwargs):
        if self.executor.decider is not None:
            self.executor.decider.on_block_start(self.executor.ctx, self.block, module, args, kwargs)
        return args, kwargs

    def post_forward(self, module, output):
        if self.executor.decider is not None:
            self.executor.decider.on_block_end(self.executor.ctx, self.block, output)
        return output


class _ComponentHook(ModelHook):
    """On one component of one block: compute it, or stand in for it (the block's gates still apply)."""

    def __init__(self, executor: Executor, block: int, comp: int):
        super().__init__()
        self.executor, self.block, self.comp = executor, block, comp

    def new_forward(self, module, *args, **kwargs):
        if self.executor.decider is None:  # called outside a transformer forward: nothing to decide
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.executor.run_component(self.fn_ref.original_forward, self.block, self.comp, args, kwargs)


class Executor:
    """Attaches to one transformer, owns the step tracker, the feature cache and per-call stats."""

    def __init__(self, transformer: torch.nn.Module, plan, scheduler=None, num_inference_steps: int | None = None):
        self.transformer = transformer
        self.arch: ArchitectureMap = architecture_map(transformer)
        self.plan: Plan = resolve_plan(plan)
        self.plan.check(self.arch)  # refuse a schedule that does not fit, before any work
        source = scheduler_step_source(scheduler) if scheduler is not None else None
        default_steps = num_inference_steps or self.plan.default_num_steps
        if scheduler is None and default_steps is None:
            raise ValueError(
                f"Plan {self.plan.name!r} needs to know the step count: apply it to a pipeline, or pass "
                "num_inference_steps=... when applying it to a bare transformer."
            )
        self.tracker = StepTracker(source, default_steps)
        self.default_num_steps = default_steps
        self.cache = FeatureCache(history=self.plan.cache_history)
        self.present = self.arch.present()
        self.decider = None
        self.stats: StatsRecorder | None = None
        self.last_stats: CallStats | None = None
        self._attached = False

    # ---- attaching ------------------------------------------------------------------------------------------------
    def attach(self) -> Executor:
        HookRegistry.check_if_exists_or_initialize(self.transformer).register_hook(_StepHook(self), STEP_HOOK)
        self._observed = sorted(self.plan.observed_blocks(self.arch))
        for b in self._observed:
            HookRegistry.check_if_exists_or_initialize(self.arch.blocks[b]).register_hook(
                _BlockHook(self, b), BLOCK_HOOK
            )
        for b, row in enumerate(self.arch.modules):
            for c, module in enumerate(row):
                if module is not None:
                    registry = HookRegistry.check_if_exists_or_initialize(module)
                    registry.register_hook(_ComponentHook(self, b, c), COMPONENT_HOOK)
        self._invalidate()
        self._attached = True
        return self

    def detach(self) -> None:
        self.end_call()
        HookRegistry.check_if_exists_or_initialize(self.transformer).remove_hook(STEP_HOOK, recurse=False)
        for b in self._observed:
            self.arch.blocks[b]._diffusers_hook.remove_hook(BLOCK_HOOK, recurse=False)
        for row in self.arch.modules:
            for module in row:
                if module is not None and hasattr(module, "_diffusers_hook"):
                    module._diffusers_hook.remove_hook(COMPONENT_HOOK, recurse=False)
        self._invalidate()
        self._attached = False

    def _invalidate(self) -> None:
        HookRegistry.check_if_exists_or_initialize(self.transformer).invalidate_child_registries_cache()

    # ---- the call lifecycle -----------------------------------------------------------------------------------------
    @property
    def ctx(self) -> StepContext:
        return self.tracker.ctx

    def on_transformer_start(self, timestep, hidden: torch.Tensor) -> None:
        ctx, new_call = self.tracker.advance(timestep, hidden.shape[0])
        if new_call or self.stats is None:
            self._start_call(ctx.num_steps or self.default_num_steps)
        self.stats.transformer_start(ctx.step, hidden.device)

    def _start_call(self, num_steps: int) -> None:
        self.end_call(reset_tracker=False)
        self.decider = self.plan.decider(self.arch, num_steps)
        self.stats = StatsRecorder(num_steps, self.present)
        self.cache.reset_peak()

    def end_call(self, reset_tracker: bool = True) -> None:
        """Close the current pipeline call: publish its stats and free the cache."""
        if self.stats is not None:
            info = dict(self.decider.info(), plan=self.plan.name)
            self.last_stats = self.stats.finish(
                self.plan.name, self.arch.block_names, self.arch.components, self.cache.peak_bytes, info
            )
        self.stats, self.decider = None, None
        self.cache.clear()
        if reset_tracker:
            self.tracker.reset()

    # ---- one component call ------------------------------------------------------------------------------------
    def run_component(self, forward, b: int, c: int, args: tuple, kwargs: dict):
        """Carry out the decider's decision: compute, reuse, forecast, or compute only some samples."""
        ctx, cache = self.ctx, self.cache
        key, n = (ctx.branch, b, c), ctx.batch_size
        decision = self.decider.decide(ctx, b, c)
        if isinstance(decision, torch.Tensor):  # per-sample: True rows compute, the others reuse
            if bool(decision.all()):
                decision = True
            elif not bool(decision.any()):
                decision = False
            else:
                mixed = self._compute_rows(forward, key, decision, args, kwargs)
                if mixed is not None:
                    self.stats.record(ctx.step, b, c, int(decision.sum()), n)
                    return mixed
                decision = True
        if decision is False or decision is FORECAST:
            out = cache.forecast(key, ctx.step, n) if decision is FORECAST else None
            out = out if out is not None else cache.get(key, n)  # one output so far: reuse it
            if out is not None:
                self.stats.record(ctx.step, b, c, 0, n)
                return out
        out = forward(*args, **kwargs)  # compute (also when nothing usable is cached)
        if self.decider.must_store(ctx, b, c):
            cache.put(key, out, ctx.step)
        self.stats.record(ctx.step, b, c, n, n)
        return out

    def _compute_rows(self, forward, key, rows_mask: torch.Tensor, args: tuple, kwargs: dict):
        """Compute the component for the masked samples only and merge them into the cached output."""
        cached = self.cache.get(key, self.ctx.batch_size)
        if cached is None:
            return None
        rows = rows_mask.nonzero().squeeze(1)
        n = self.ctx.batch_size

        def take(x):
            return x.index_select(0, rows) if isinstance(x, torch.Tensor) and x.ndim and x.shape[0] == n else x

        args = (take(args[0]), *args[1:]) if args else args
        kwargs = {k: take(v) if k in BATCHED_KWARGS else v for k, v in kwargs.items()}
        fresh = tensors_of(forward(*args, **kwargs))
        merged = [None if c is None else c.clone().index_copy_(0, rows, f) for c, f in zip(tensors_of(cached), fresh)]
        out = rebuild(type(cached), merged)
        self.cache.put(key, out, self.ctx.step)
        return out

    @contextlib.contextmanager
    def pipeline_call(self):
        """Bracket one pipeline call: fresh state at entry, stats and a clean slate at exit, even on error."""
        self.end_call()
        try:
            yield self
        finally:
            self.end_call()
