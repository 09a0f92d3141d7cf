"""Silence library log messages a diffroute user cannot act on (and only those, only while they would appear)."""

from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def quiet_loading():
    """Raise transformers' and diffusers' log level to ERROR for the duration of the block.

    Used around (a) importing diffusers' pipeline classes: on a CPU-only install transformers warns that its
    image processors fall back from torchvision to PIL, which is right here (torchvision has no CPU build);
    (b) loading the emoji model, whose text encoder is deliberately MiniLM, not the T5 that PixArt expects.
    """
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = tlog.get_verbosity(), dlog.get_verbosity()
    tlog.set_verbosity_error()
    dlog.set_verbosity_error()
    try:
        with loading_bars_off():
            yield
    finally:
        tlog.set_verbosity(saved[0])
        dlog.set_verbosity(saved[1])


@contextmanager
def loading_bars_off():
    """No per-file 'Loading weights' / 'Loading pipeline components' bars while a pipeline loads (the denoising
    progress bar is not affected)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = tlog.is_progress_bar_enabled(), dlog.is_progress_bar_enabled()
    tlog.disable_progress_bar()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        if saved[0]:
            tlog.enable_progress_bar()
        if saved[1]:
            dlog.enable_progress_bar()


def cast_model(model, dtype):
    """`model.to(dtype)`, without diffusers' warning about modules to keep in float32 when the model lists none
    (the warning then names an empty list, which no user can act on; it still shows for models that list some)."""
    import contextlib

    listed = getattr(model, "_keep_in_fp32_modules", None)
    with contextlib.nullcontext() if listed else quiet_loading():
        return model.to(dtype)


def cast_pipeline(pipe, dtype) -> None:
    """`pipe.to(dtype=dtype)`, without diffusers' warning about modules to keep in float32 when its models list none
    (the warning names an empty list then; it still shows for diffusers models that do list some)."""
    import contextlib

    from diffusers import ModelMixin

    models = [m for m in pipe.components.values() if isinstance(m, ModelMixin)]
    listed = any(getattr(m, "_keep_in_fp32_modules", None) for m in models)
    with contextlib.nullcontext() if listed else quiet_loading():
        pipe.to(dtype=dtype)
