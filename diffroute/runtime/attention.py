"""Attention back-ends: choose how a pipeline's attention is computed; diffroute's hooks work under any of them.

The executor hooks attention *modules*, never their processors, so a plan behaves the same whichever kernel
computes the attention. This file only maps a back-end name to diffusers' own switches.
"""

from __future__ import annotations

from diffroute.errors import InputError

ATTENTION_HELP = {
    "default": "keep the processors the model was loaded with (SDPA in diffusers)",
    "classic": "diffusers' AttnProcessor: explicit softmax(QK^T)V instead of SDPA (models with plain attention)",
    "xformers": "xformers memory-efficient attention (needs the xformers package; GPU)",
    "dispatch:NAME": "a diffusers attention-dispatch back-end (native, _native_math, flash, sage, ...) for models "
    "whose processors dispatch (FLUX, ...)",
}


def attention_names() -> str:
    return ", ".join(ATTENTION_HELP)


def check_attention_name(name: str) -> None:
    """Refuse a name that is no attention back-end (before any model loads): InputError saying the known ones."""
    if name.startswith("dispatch:"):
        from diffusers.models.attention_dispatch import AttentionBackendName

        known = sorted(b.value for b in AttentionBackendName)
        if name.split(":", 1)[1] not in known:
            raise InputError(f"Unknown diffusers attention back-end in {name!r}; known: {known}")
    elif name not in ATTENTION_HELP:
        raise InputError(f"Unknown attention back-end {name!r}; known: {attention_names()}.")


def set_attention(pipe, name: str) -> None:
    """Switch the pipeline's transformer to attention back-end `name` (see ATTENTION_HELP); InputError if it cannot."""
    check_attention_name(name)
    transformer = pipe.transformer
    if name == "default":
        return
    if name == "classic":
        from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

        modules = [m for m in transformer.modules() if isinstance(getattr(m, "processor", None), AttnProcessor2_0)]
        if not modules:
            hint = "try --attention dispatch:_native_math" if _dispatches(transformer) else "keep --attention default"
            raise InputError(
                f"--attention classic: {type(transformer).__name__} has no plain SDPA attention to replace; {hint}."
            )
        for m in modules:
            m.set_processor(AttnProcessor())
        return
    if name == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise InputError("--attention xformers needs the xformers package (pip install xformers).") from None
        pipe.enable_xformers_memory_efficient_attention()
        return
    if name.startswith("dispatch:"):
        backend = name.split(":", 1)[1]
        if not _dispatches(transformer):
            raise InputError(
                f"--attention {name}: {type(transformer).__name__}'s attention processors do not dispatch; "
                "use default, classic or xformers."
            )
        try:
            transformer.set_attention_backend(backend)
        except (ValueError, RuntimeError, ImportError) as e:
            raise InputError(f"--attention {name}: {e}") from None


def _dispatches(transformer) -> bool:
    """Whether the model's attention processors go through diffusers' attention dispatcher."""
    return any(hasattr(getattr(m, "processor", None), "_attention_backend") for m in transformer.modules())
