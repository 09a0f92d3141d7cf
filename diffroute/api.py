"""Functional entry points: apply a plan to any supported pipeline or transformer, remove it, read its stats."""

from __future__ import annotations

import torch

from diffroute.core.executor import Executor
from diffroute.core.parts import PartsExecutor
from diffroute.core.stats import CallStats
from diffroute.plans import resolve_plan

_ATTR = "_diffroute_executor"


def _split(target) -> tuple[torch.nn.Module, object | None]:
    """(transformer, scheduler) of a pipeline, or (module, None) of a bare transformer."""
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return _unwrap(transformer), getattr(target, "scheduler", None)
    if isinstance(target, torch.nn.Module):
        return _unwrap(target), None
    raise TypeError(
        f"diffroute.apply needs a diffusers pipeline with a transformer, or a transformer; got {type(target)}."
    )


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module itself under `torch.compile(module)` (hooks go on it; the compiled wrapper calls it)."""
    return getattr(module, "_orig_mod", module)


def apply(target, plan="full", num_inference_steps: int | None = None) -> Executor:
    """Route `target` (pipeline or transformer) by `plan`; replaces any plan already applied. Returns the executor."""
    transformer, scheduler = _split(target)
    # a transformer made of whole transformers (an expert ensemble) gets one executor per part
    kind = PartsExecutor if hasattr(transformer, "diffroute_parts") else Executor
    executor = kind(transformer, resolve_plan(plan), scheduler=scheduler, num_inference_steps=num_inference_steps)
    remove(target)
    setattr(transformer, _ATTR, executor.attach())
    return executor


def remove(target) -> None:
    """Detach diffroute from `target`; the model computes exactly as vanilla diffusers again."""
    transformer, _ = _split(target)
    executor = getattr(transformer, _ATTR, None)
    if executor is not None:
        executor.detach()
        delattr(transformer, _ATTR)


def get_executor(target) -> Executor | None:
    transformer, _ = _split(target)
    return getattr(transformer, _ATTR, None)


def last_stats(target) -> CallStats | None:
    """Stats of the last finished (or interrupted) call routed through `target`."""
    executor = get_executor(target)
    if executor is None:
        return None
    if executor.stats is not None and executor.ctx.num_steps and executor.ctx.step >= executor.ctx.num_steps - 1:
        executor.end_call()  # a pipeline we do not bracket: close the call once its last step has run
    return executor.last_stats
