"""The executor: diffusers hooks on a transformer and its components that carry out a plan's decisions."""

from __future__ import annotations

import contextlib

import torch
from diffusers.hooks import HookRegistry, ModelHook

from .arch import ArchitectureMap, architecture_map
from .cache import FeatureCache
from .context import StepContext, StepTracker, scheduler_step_source
from .plans import Plan, resolve_plan
from .stats import CallStats, StatsRecorder

STEP_HOOK = "diffroute_step"
COMPONENT_HOOK = "diffroute_component"


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


class _ComponentHook(ModelHook):
    """On one component of one block: compute, or return the cached output (the block's gates still apply)."""

    def __init__(self, executor: Executor, block: int, comp: int):
        super().__init__()
        self.executor, self.block, self.comp = executor, block, comp

    def new_forward(self, module, *args, **kwargs):
        ex, b, c = self.executor, self.block, self.comp
        if ex.decider is None:  # called outside a transformer forward: nothing to decide
            return self.fn_ref.original_forward(*args, **kwargs)
        ctx = ex.ctx
        key = (ctx.branch, b, c)
        if not ex.decider.decide(ctx, b, c):
            cached = ex.cache.get(key, like=args[0] if args else kwargs.get("hidden_states"))
            if cached is not None:
                ex.stats.record(ctx.step, b, c, 0, ctx.batch_size)
                return cached
        out = self.fn_ref.original_forward(*args, **kwargs)
        if ex.decider.must_store(ctx, b, c):
            ex.cache.put(key, out)
        ex.stats.record(ctx.step, b, c, ctx.batch_size, ctx.batch_size)
        return out


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
        self.cache = FeatureCache()
        self.present = self.arch.present()
        self.decider = None
        self.stats: StatsRecorder | None = None
        self.last_stats: CallStats | None = None
        self._attached = False

    # ---- attaching ------------------------------------------------------------------------------------------------
    def attach(self) -> Executor:
        HookRegistry.check_if_exists_or_initialize(self.transformer).register_hook(_StepHook(self), STEP_HOOK)
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

    @contextlib.contextmanager
    def pipeline_call(self):
        """Bracket one pipeline call: fresh state at entry, stats and a clean slate at exit, even on error."""
        self.end_call()
        try:
            yield self
        finally:
            self.end_call()
