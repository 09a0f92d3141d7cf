"""Routed*Pipeline: subclasses of the real diffusers pipelines that bracket each call for the executor."""

from __future__ import annotations

import json

from diffusers import (
    DiffusionPipeline,
    DiTPipeline,
    FluxPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    SanaPipeline,
    StableDiffusion3Pipeline,
)

from diffroute.api import apply, get_executor, last_stats, remove
from diffroute.executor import Executor
from diffroute.stats import CallStats


class RoutedPipelineMixin:
    """Adds compute plans to a diffusers pipeline; without a plan it is the vanilla pipeline, call for call."""

    def enable_cache(self, plan="full") -> Executor:
        """Route the transformer by `plan` (a name such as "fora-3", a schedule JSON path, a Schedule or a Plan)."""
        return apply(self, plan)

    def disable_cache(self) -> None:
        remove(self)

    @property
    def plan(self):
        executor = get_executor(self)
        return None if executor is None else executor.plan

    @property
    def last_stats(self) -> CallStats | None:
        """What the last call computed and reused (None before the first routed call)."""
        return last_stats(self)

    def __call__(self, *args, **kwargs):
        executor = get_executor(self)
        if executor is None:
            return super().__call__(*args, **kwargs)
        with executor.pipeline_call():
            return super().__call__(*args, **kwargs)

    def to_json_string(self) -> str:
        # Save under the vanilla class name so that plain diffusers can load what a routed pipeline saves.
        config = json.loads(super().to_json_string())
        config["_class_name"] = _vanilla_class(type(self)).__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _vanilla_class(cls: type) -> type:
    return next(c for c in cls.__mro__ if c.__module__.startswith("diffusers.") and issubclass(c, DiffusionPipeline))


class RoutedPixArtAlphaPipeline(RoutedPipelineMixin, PixArtAlphaPipeline):
    """PixArt-α with compute plans."""


class RoutedPixArtSigmaPipeline(RoutedPipelineMixin, PixArtSigmaPipeline):
    """PixArt-Σ with compute plans."""


class RoutedDiTPipeline(RoutedPipelineMixin, DiTPipeline):
    """DiT (class-conditional) with compute plans."""


class RoutedStableDiffusion3Pipeline(RoutedPipelineMixin, StableDiffusion3Pipeline):
    """Stable Diffusion 3 with compute plans."""


class RoutedFluxPipeline(RoutedPipelineMixin, FluxPipeline):
    """FLUX.1 with compute plans."""


class RoutedSanaPipeline(RoutedPipelineMixin, SanaPipeline):
    """Sana with compute plans."""


ROUTED_PIPELINES: dict[str, type] = {
    _vanilla_class(cls).__name__: cls
    for cls in (
        RoutedPixArtAlphaPipeline,
        RoutedPixArtSigmaPipeline,
        RoutedDiTPipeline,
        RoutedStableDiffusion3Pipeline,
        RoutedFluxPipeline,
        RoutedSanaPipeline,
    )
}


def to_routed(pipe: DiffusionPipeline) -> DiffusionPipeline:
    """The routed twin of a vanilla pipeline, sharing its components (no copies)."""
    if isinstance(pipe, RoutedPipelineMixin):
        return pipe
    cls = ROUTED_PIPELINES.get(type(pipe).__name__)
    if cls is None:
        raise TypeError(
            f"No routed pipeline for {type(pipe).__name__}; routed: {sorted(ROUTED_PIPELINES)}. "
            "Any pipeline with a supported transformer still works with diffroute.apply(pipe, plan)."
        )
    return cls.from_pipe(pipe)
