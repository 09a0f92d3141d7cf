"""Routed*Pipeline: subclasses of the real diffusers pipelines that bracket each call for the executor."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import json
from pathlib import Path

from diffroute.api import apply, get_executor, last_stats, remove
from diffroute.core.call_context import guidance_pairs
from diffroute.core.executor import Executor
from diffroute.core.stats import CallStats
from diffroute.errors import InputError
from diffroute.utils.quiet import quiet_loading

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


# Set while `from_pipe` builds a pipeline with no dtype asked for: its closing `.to(dtype=float32)` is skipped.
_KEEP_DTYPES = contextvars.ContextVar("diffroute_keep_dtypes", default=False)
CALL_DEFAULTS_FILE = "diffroute.json"  # beside model_index.json: call defaults a saved model needs (e.g. tiny sizes)


class RoutedPipelineMixin:
    """Adds compute plans to a diffusers pipeline; without a plan it is the vanilla pipeline, call for call.

    Each subclass gets a `__call__` that wraps the vanilla one with `functools.wraps`, so `inspect.signature` and
    the docstring are the vanilla pipeline's (diffusers' tooling and Gradio read them). `call_defaults` fills
    arguments the caller did not pass (a model trained at 32x32 needs `use_resolution_binning=False`, say).
    """

    call_defaults: dict = {}
    # Classifier-free guidance batches [unconditional rows; conditional rows] in one transformer call when the
    # guidance scale exceeds 1 (False: the pipeline has no batched CFG of that order, e.g. FLUX, or DiT's [cond;
    # uncond]); per-sample modules read it through `core.call_context.paired_rows`.
    batched_guidance: bool = True

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

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """diffusers' `from_pipe`, except that with no `torch_dtype`/`dtype` every component keeps its dtype.

        diffusers ends `from_pipe` with `.to(float32)` by default; the components are shared, so that would also
        cast the caller's own fp16/bf16 pipeline (doubling its memory on a GPU). Asking for a dtype still casts."""
        if kwargs.get("torch_dtype") is not None or kwargs.get("dtype") is not None:
            return super().from_pipe(pipeline, **kwargs)
        token = _KEEP_DTYPES.set(True)
        try:
            return super().from_pipe(pipeline, **kwargs)
        finally:
            _KEEP_DTYPES.reset(token)

    def to(self, *args, **kwargs):
        if _KEEP_DTYPES.get() and not args and set(kwargs) == {"dtype"}:
            return self  # from_pipe's default cast (see from_pipe)
        return super().to(*args, **kwargs)

    def call_with_grad(self, *args, **kwargs):
        """The call with autograd on through the whole sampling loop, scheduler steps included, for training that
        backpropagates through it: diffusers wraps every `__call__` in torch.no_grad, so this runs the undecorated
        vanilla call, bracketed as a routed call is."""
        import torch

        raw = inspect.unwrap(_vanilla_class(type(self)).__call__)
        with torch.enable_grad():
            return _routed_call(raw)(self, *args, **kwargs)

    @contextlib.contextmanager
    def _one_step_call(self):
        """Adjustments a one-step call of this pipeline needs (none, except for PixArt-α)."""
        yield

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
    """The vanilla `__call__` given the pipeline's call defaults, its step count checked before any work, and
    bracketed by the executor when a plan is on."""
    signature = inspect.signature(vanilla_call)

    @functools.wraps(vanilla_call)
    def __call__(self, *args, **kwargs):
        given = signature.bind_partial(self, *args, **kwargs).arguments
        if self.call_defaults:
            kwargs.update({k: v for k, v in self.call_defaults.items() if k not in given})
        steps = None
        if "num_inference_steps" in signature.parameters and not any(given.get(k) for k in ("timesteps", "sigmas")):
            steps = kwargs.get("num_inference_steps", given.get("num_inference_steps"))
            if steps is None:
                steps = signature.parameters["num_inference_steps"].default
            check_num_steps(self.scheduler, steps)
        executor = get_executor(self)
        if executor is not None:
            executor.check_call(steps)
        paired = False
        if self.batched_guidance and "guidance_scale" in signature.parameters:
            scale = kwargs.get(
                "guidance_scale", given.get("guidance_scale", signature.parameters["guidance_scale"].default)
            )
            paired = isinstance(scale, (int, float)) and scale > 1
        with contextlib.ExitStack() as stack:
            stack.enter_context(guidance_pairs(paired))
            if steps == 1:
                stack.enter_context(self._one_step_call())
            if executor is not None:
                stack.enter_context(executor.pipeline_call())
            return vanilla_call(self, *args, **kwargs)

    return __call__


def check_num_steps(scheduler, steps) -> None:
    """Refuse a step count the scheduler cannot run (0, negative, more than its training timesteps)."""
    top = int(getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000) or 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= top:
        raise InputError(
            f"num_inference_steps must be an integer from 1 to {top} ({type(scheduler).__name__} is trained on "
            f"{top} timesteps); got {steps!r}."
        )


class _FinalStepAsOriginal:
    """Scheduler view for PixArt-α's one-step call, which reads `step(...)[1]` (the predicted clean sample, as
    one-step DMD-style schedulers return it). Multistep solvers return only the previous sample, which at the last
    step (sigma 0) is their clean-sample estimate, so it is returned in both places. Everything else delegates."""

    def __init__(self, scheduler):
        self._scheduler = scheduler

    def __getattr__(self, name):
        return getattr(self._scheduler, name)

    def step(self, *args, **kwargs):
        out = self._scheduler.step(*args, **kwargs)
        if isinstance(out, tuple) and len(out) == 1:
            return (out[0], out[0])
        return out


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

    @contextlib.contextmanager
    def _one_step_call(self):
        # Set in __dict__: DiffusionPipeline.__setattr__ would re-register the module in the pipeline config.
        scheduler = self.__dict__["scheduler"]
        self.__dict__["scheduler"] = _FinalStepAsOriginal(scheduler)
        try:
            yield
        finally:
            self.__dict__["scheduler"] = scheduler


class RoutedPixArtSigmaPipeline(RoutedPipelineMixin, PixArtSigmaPipeline):
    """PixArt-Σ with compute plans."""


class RoutedDiTPipeline(RoutedPipelineMixin, DiTPipeline):
    """DiT (class-conditional) with compute plans."""

    batched_guidance = False  # DiT batches [conditional; unconditional]


class RoutedStableDiffusion3Pipeline(RoutedPipelineMixin, StableDiffusion3Pipeline):
    """Stable Diffusion 3 with compute plans."""


class RoutedFluxPipeline(RoutedPipelineMixin, FluxPipeline):
    """FLUX.1 with compute plans."""

    batched_guidance = False  # guidance-distilled; true CFG runs as separate calls


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
    """The routed twin of a vanilla pipeline, sharing its components (no copies, no casts: see `from_pipe`)."""
    if isinstance(pipe, RoutedPipelineMixin):
        return pipe
    cls = ROUTED_PIPELINES.get(type(pipe).__name__)
    if cls is None:
        raise TypeError(
            f"No routed pipeline for {type(pipe).__name__}; routed: {sorted(ROUTED_PIPELINES)}. "
            "Any pipeline with a supported transformer still works with diffroute.apply(pipe, plan)."
        )
    # The transformer goes in by name: from_pipe drops a component whose type is not the signature's (an
    # ExpertEnsemble stands where a PixArtTransformer2DModel is expected).
    parts = {"transformer": pipe.transformer} if getattr(pipe, "transformer", None) is not None else {}
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # (its "expected types" warning for an ensemble: intended here)
    try:
        routed = cls.from_pipe(pipe, **parts)
    finally:
        diffusers_logging.set_verbosity(level)
    routed.call_defaults = dict(getattr(pipe, "call_defaults", {}) or {}) or model_call_defaults(pipe)
    return routed


# Latent sample sizes for which PixArt-α/Σ and Sana have aspect-ratio bins (their `use_resolution_binning`).
_BINNED_SAMPLE_SIZES = {
    "PixArtAlphaPipeline": (32, 64, 128),
    "PixArtSigmaPipeline": (32, 64, 128, 256),
    "SanaPipeline": (16, 32, 64, 128),
}


def model_call_defaults(pipe) -> dict:
    """Call defaults that follow from the model's own configuration, for a pipeline built from its parts.

    A transformer trained at a size the pipeline has no aspect-ratio bins for (the embedded emoji model: 8×8
    latents) makes the vanilla PixArt call fail with "Invalid sample size": such a model is called at its own
    size without binning. Anything the configuration does not tell (a trained text length, say) is not guessed.
    """
    bins = next((v for k, v in _BINNED_SAMPLE_SIZES.items() if k in {c.__name__ for c in type(pipe).__mro__}), None)
    sample = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "sample_size", None)
    if bins is None or not isinstance(sample, int) or sample in bins:
        return {}
    side = sample * int(getattr(pipe, "vae_scale_factor", 8))
    return {"height": side, "width": side, "use_resolution_binning": False}
