"""Peers for benchmarks: diffusers' built-in caches applied to the same transformer, in the same runs as our plans.

PixArt's transformer has no CacheMixin and its pipeline sets no cache context, so a hook of ours on the transformer
supplies diffusers' `CacheContext` at every call and resets the caches' state at the start of every pipeline call.
Executed component calls are counted by inner hooks, so the computed fraction is measured the same way as ours.
Names: `diffusers:fbc-T`, `diffusers:pab-N`, `diffusers:faster[-N]`, `diffusers:taylorseer-N`, `diffusers:mag-T`
(MagCache, ratios calibrated on the model: see `eval/magcache.py`); with the optional
`bench` extra (cache-dit from PyPI), `cachedit:dbcache-F<n>B<n>-T` and `cachedit:dbcache-taylor-F<n>B<n>-T`.
"""

from __future__ import annotations

import re

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import CacheContext, _set_cache_context

import diffroute
from diffroute.core.call_context import hidden_states_of
from diffroute.core.context import NamedCallHook, StepTracker, scheduler_step_source

CONTEXT_HOOK, COUNT_HOOK = "diffroute_peer_context", "diffroute_peer_count"
PEER_PREFIXES = ("diffusers:", "cachedit:")


class _Context(NamedCallHook):
    """Sets diffusers' cache context per transformer call (the pipeline's own name for the call where it gives one,
    else "cond"); resets the caches at each new pipeline call."""

    def __init__(self, run: PeerRun):
        super().__init__()
        self.run = run

    def pre_forward(self, module, *args, **kwargs):
        name = self.call_name.name
        ctx, new_call = self.run.tracker.advance(kwargs.get("timestep"), hidden_states_of(args, kwargs).shape[0], name)
        if new_call:
            registry = HookRegistry.check_if_exists_or_initialize(module)
            if self.run.per_call is not None:  # caches that must know the step count are (re)applied here
                self.run.per_call(ctx.num_steps)
                registry.invalidate_child_registries_cache()
            registry.reset_stateful_hooks(recurse=True)
            self.run.new_call()
        self.run.calls += 1
        self.run.batch = ctx.batch_size
        t = kwargs.get("timestep")
        self.run.timestep = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else t
        _set_cache_context(module, CacheContext(name or "cond", ctx.step, ctx.num_steps, t))
        return args, kwargs


class _Count(ModelHook):
    """Counts executed *rows* (samples) of one (block, component), as our stats do: a call on half the batch
    (FasterCache computing only the conditional rows) counts one half, not one."""

    def __init__(self, run: PeerRun, block: int, comp: int):
        super().__init__()
        self.run, self.cell = run, (block, comp)

    def pre_forward(self, module, *args, **kwargs):
        hidden = hidden_states_of(args, kwargs)
        rows = hidden.shape[0] if isinstance(hidden, torch.Tensor) and hidden.ndim else self.run.batch
        share = rows / self.run.batch if self.run.batch else 1
        self.run.executed += share
        self.run.executed_map[self.cell] += share
        return args, kwargs


class PeerRun:
    """One diffusers cache on one pipeline, with our step context and counters."""

    def __init__(self, pipe, name: str):
        self.pipe, self.name = pipe, name
        self.arch = diffroute.architecture_map(pipe.transformer)
        self.tracker = StepTracker(scheduler_step_source(pipe.scheduler))
        self.timestep, self.calls, self.executed, self.last, self.batch = None, 0, 0, None, 0
        self.executed_map = torch.zeros(self.arch.num_blocks, len(self.arch.components), dtype=torch.float64)
        self.per_call = None  # f(num_steps), for a cache configured per pipeline call (MagCache)

    def new_call(self) -> None:
        if self.calls:
            self.last = self.fraction()
        self.calls = self.executed = 0
        self.executed_map = torch.zeros_like(self.executed_map)

    def fraction(self) -> float:
        total = self.calls * int(self.arch.present().sum())
        return self.executed / total if total else 1.0

    def apply(self) -> PeerRun:
        t = self.pipe.transformer
        t._diffroute_peer = self  # first, so that a failed apply (e.g. a missing calibration) is undone in full
        try:
            for b, row in enumerate(self.arch.modules):  # counters first: innermost, they see only executions
                for c, m in enumerate(row):
                    if m is not None:
                        HookRegistry.check_if_exists_or_initialize(m).register_hook(_Count(self, b, c), COUNT_HOOK)
            if self.name.startswith("cachedit:"):
                self.adapter = _apply_cachedit(self.pipe, self.name)
            else:
                _apply_diffusers_cache(t, self.name, self)
            HookRegistry.check_if_exists_or_initialize(t).register_hook(_Context(self), CONTEXT_HOOK)
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        """Our hooks and diffusers' go first; cache-dit, which patched forwards before them, restores last."""
        t = self.pipe.transformer
        registry = HookRegistry.check_if_exists_or_initialize(t)
        for name in list(registry.hooks):
            registry.remove_hook(name, recurse=False)
        for _, m in t.named_modules():
            if hasattr(m, "_diffusers_hook"):
                for name in list(m._diffusers_hook.hooks):
                    m._diffusers_hook.remove_hook(name, recurse=False)
        registry.invalidate_child_registries_cache()
        if getattr(self, "adapter", None) is not None:
            import cache_dit

            cache_dit.disable_cache(self.adapter)
        del t._diffroute_peer


def _apply_diffusers_cache(transformer, name: str, run: PeerRun) -> None:
    from diffusers.hooks import (
        FasterCacheConfig,
        FirstBlockCacheConfig,
        PyramidAttentionBroadcastConfig,
        TaylorSeerCacheConfig,
        apply_faster_cache,
        apply_first_block_cache,
        apply_pyramid_attention_broadcast,
        apply_taylorseer_cache,
    )

    spec = name.removeprefix("diffusers:")

    def now():
        return run.timestep if run.timestep is not None else 1000

    if m := re.fullmatch(r"fbc-([0-9.]+)", spec):
        apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=float(m.group(1))))
    elif m := re.fullmatch(r"pab-(\d+)", spec):
        n = int(m.group(1))
        cfg = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=n,
            cross_attention_block_skip_range=n + 1,
            spatial_attention_timestep_skip_range=(100, 800),
            cross_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=now,
        )
        apply_pyramid_attention_broadcast(transformer, cfg)
    elif m := re.fullmatch(r"faster(?:-(\d+))?", spec):
        # diffusers' defaults (timestep ranges, unconditional skip 5 in (-1, 641)); the attention weight grows from
        # 0 to 1 over the denoising run, as the FasterCache paper recommends (diffusers' fallback is a flat 0.5).
        cfg = FasterCacheConfig(
            spatial_attention_block_skip_range=int(m.group(1) or 2),
            spatial_attention_block_identifiers=("transformer_blocks.*attn1",),
            attention_weight_callback=lambda _: 1.0 - now() / 1000.0,
            tensor_format="BCHW",
            is_guidance_distilled=False,
            current_timestep_callback=now,
        )
        apply_faster_cache(transformer, cfg)
    elif m := re.fullmatch(r"mag-([0-9.]+)", spec):
        # MagCache at its authors' defaults (max 3 consecutive skips, first 20% of the steps always computed); its
        # ratios depend on the step count, known only when a call starts, so it is applied per call.
        from diffusers.hooks import MagCacheConfig, apply_mag_cache

        from diffroute.eval.magcache import load_ratios

        ratios, threshold = load_ratios(transformer), float(m.group(1))
        run.per_call = lambda steps: apply_mag_cache(
            transformer, MagCacheConfig(threshold=threshold, num_inference_steps=steps, mag_ratios=list(ratios))
        )
    elif m := re.fullmatch(r"taylorseer-(\d+)", spec):
        ids = [rf"transformer_blocks\.\d+\.{c}" for c in run.arch.components]  # identifiers that match PixArt
        cfg = TaylorSeerCacheConfig(
            cache_interval=int(m.group(1)),
            disable_cache_before_step=2,
            max_order=1,
            taylor_factors_dtype=torch.float32,
            cache_identifiers=ids,
        )
        apply_taylorseer_cache(transformer, cfg)
    else:
        check_spec(name)


def _apply_cachedit(pipe, name: str):
    """cache-dit's DBCache (optionally with its TaylorSeer calibrator) through a BlockAdapter for our pipeline."""
    try:
        import cache_dit
    except ImportError as e:
        raise ImportError("cache-dit peers need the `bench` extra: pip install 'diffroute[bench]'.") from e
    m = re.fullmatch(r"cachedit:dbcache-(taylor-)?F(\d+)B(\d+)-([0-9.]+)", name)
    if m is None:
        check_spec(name)
    adapter = cache_dit.BlockAdapter(
        pipe=pipe,
        transformer=pipe.transformer,
        blocks=pipe.transformer.transformer_blocks,
        forward_pattern=cache_dit.ForwardPattern.Pattern_3,
        check_forward_pattern=True,
    )
    config = cache_dit.DBCacheConfig(
        Fn_compute_blocks=int(m.group(2)),
        Bn_compute_blocks=int(m.group(3)),
        residual_diff_threshold=float(m.group(4)),
        max_warmup_steps=2,
    )
    calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if m.group(1) else None
    cache_dit.disable_print()
    cache_dit.enable_cache(adapter, cache_config=config, calibrator_config=calibrator)
    return adapter


def is_peer(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PEER_PREFIXES)


def activate(pipe, spec) -> None:
    """Put `spec` in force on `pipe`: one of our plans, or a diffusers cache (peer)."""
    deactivate(pipe)
    if is_peer(spec):
        PeerRun(pipe, spec).apply()
    else:
        diffroute.apply(pipe, spec)


def deactivate(pipe) -> None:
    diffroute.remove(pipe)
    peer = getattr(pipe.transformer, "_diffroute_peer", None)
    if peer is not None:
        peer.remove()


def call_counts(pipe) -> tuple[int, int]:
    """(executed, all) component calls of the last call, for ours and peers alike."""
    peer = getattr(pipe.transformer, "_diffroute_peer", None)
    if peer is not None:
        return peer.executed, peer.calls * int(peer.arch.present().sum())
    stats = diffroute.last_stats(pipe)
    return stats.computed_calls, stats.component_calls


def flop_counts(pipe, cost) -> tuple[float, float]:
    """(computed, all) FLOPs of the last call, by `cost` (a search.cost.CostModel of this model): each component
    weighted by its FLOPs, not counted as one call (cross-attention is a fifth of a PixArt block's FLOPs but a third
    of its calls). Ours: what the stats say ran, whole-block reuse skipping the block's own norms and modulation;
    peers: what their counters saw, the rest of every block counted as run (their skips are per component)."""
    peer = getattr(pipe.transformer, "_diffroute_peer", None)
    if peer is not None:
        done = float((peer.executed_map * cost.component_flops.double()).sum())
        rest = float(cost.block_flops.sum()) + cost.other_flops
        return done + rest * peer.calls, cost.step_flops * peer.calls
    stats = diffroute.last_stats(pipe)
    return cost.realised_flops(stats), cost.step_flops * len(stats.compute_map)


def computed_fraction(pipe) -> float:
    executed, total = call_counts(pipe)
    return executed / total if total else 1.0


PEER_PATTERNS = (
    r"diffusers:fbc-[0-9.]+",
    r"diffusers:pab-\d+",
    r"diffusers:faster(-\d+)?",
    r"diffusers:taylorseer-\d+",
    r"diffusers:mag-[0-9.]+",
    r"cachedit:dbcache-(taylor-)?F\d+B\d+-[0-9.]+",
)


def check_spec(spec) -> None:
    """Resolve a plan or peer name before any work (peers: the name only; they are applied per run)."""
    if is_peer(spec):
        if not any(re.fullmatch(p, spec) for p in PEER_PATTERNS):
            raise ValueError(
                f"unknown peer {spec!r}; known: diffusers:fbc-T, diffusers:pab-N, diffusers:faster[-N], "
                "diffusers:taylorseer-N, diffusers:mag-T, cachedit:dbcache[-taylor]-F<n>B<n>-T"
            )
    else:
        diffroute.resolve_plan(spec)


def peer_timing() -> dict:
    """The `activate`, `deactivate` and `fraction` arguments of `metrics.timing.time_plans` that run peers too."""
    return {"activate": activate, "deactivate": deactivate, "fraction": computed_fraction}
