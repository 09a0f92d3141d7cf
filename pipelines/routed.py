"""Routed*Pipeline: subclasses of the real diffusers pipelines that bracket each call for the executor."""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path

from diffroute.api import apply, get_executor, last_stats, remove
from diffroute.executor import Executor
from diffroute.quiet import quiet_loading
from diffroute.stats import CallStats

with quiet_loading():  # FLUX/SD3 pipelines import image processors that warn about torchvision on CPU installs
    from diffusers import (
        DiffusionPipeline,
        DiTPipeline,
        FluxPipeline,
        PixArtAlphaPipeline,
        PixArtSigmaPipeline,
        SanaPipeline,
        StableDiffusion3Pipeline,
    )


CALL_DEFAULTS_FILE = "diffroute.json"  # beside model_index.json: call defaults a saved model needs (e.g. tiny sizes)


class RoutedPipelineMixin:
    """Adds compute plans to a diffusers pipeline; without a plan it is the vanilla pipeline, call for call.

    Each subclass gets a `__call__` that wraps the vanilla one with `functools.wraps`, so `inspect.signature` and
    the docstring are the vanilla pipeline's (diffusers' tooling and Gradio read them). `call_defaults` fills
    arguments the caller did not pass (a model trained at 32x32 needs `use_resolution_binning=False`, say).
    """

    call_defaults: dict = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "__call__" not in cls.__dict__:
            cls.__call__ = _routed_call(_vanilla_class(cls).__call__)

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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        if Path(str(pretrained_model_name_or_path)).is_dir():
            pipe.call_defaults = read_call_defaults(pretrained_model_name_or_path)
        return pipe

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.call_defaults:
            path = Path(save_directory) / CALL_DEFAULTS_FILE
            path.write_text(json.dumps({"call_defaults": self.call_defaults}, indent=2) + "\n")

    def to_json_string(self) -> str:
        # Save under the vanilla class name so that plain diffusers can load what a routed pipeline saves.
        config = json.loads(super().to_json_string())
        config["_class_name"] = _vanilla_class(type(self)).__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _vanilla_class(cls: type) -> type:
    return next(c for c in cls.__mro__ if c.__module__.startswith("diffusers.") and issubclass(c, DiffusionPipeline))


def _routed_call(vanilla_call):
    """The vanilla `__call__` bracketed by the executor (when a plan is on) and given the pipeline's call defaults."""
    signature = inspect.signature(vanilla_call)

    @functools.wraps(vanilla_call)
    def __call__(self, *args, **kwargs):
        if self.call_defaults:
            given = signature.bind_partial(self, *args, **kwargs).arguments
            kwargs.update({k: v for k, v in self.call_defaults.items() if k not in given})
        executor = get_executor(self)
        if executor is None:
            return vanilla_call(self, *args, **kwargs)
        with executor.pipeline_call():
            return vanilla_call(self, *args, **kwargs)

    return __call__


def read_call_defaults(folder) -> dict:
    """The call defaults saved beside a pipeline folder ({} when there are none)."""
    path = Path(folder) / CALL_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text())["call_defaults"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a valid diffroute.json ({err}); delete it or fix it.") from err


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
