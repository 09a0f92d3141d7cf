"""How a pipeline runs: device, dtype, attention back-end and torch.compile, set once for the CLI and the app."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from .errors import InputError

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Runtime:
    """Run options of one loaded pipeline (defaults: as the model loads, default attention, eager)."""

    device: str | None = None
    dtype: str | None = None  # one of DTYPES, None: as loaded
    attention: str = "default"  # see attention.ATTENTION_HELP
    compile: str = "none"  # see compiling.COMPILE_MODES

    def torch_dtype(self):
        import torch

        if self.dtype is None:
            return None
        if self.dtype not in DTYPES:
            raise InputError(f"Unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}.")
        return getattr(torch, self.dtype)

    def check(self) -> None:
        """Refuse unknown names before any model loads."""
        from .attention import check_attention_name
        from .compiling import COMPILE_MODES

        self.torch_dtype()
        if self.compile not in COMPILE_MODES:
            raise InputError(f"Unknown compile mode {self.compile!r}; known: {', '.join(COMPILE_MODES)}.")
        check_attention_name(self.attention)


def cast_pipeline(pipe, dtype) -> None:
    """`pipe.to(dtype=dtype)`, without diffusers' warning about modules to keep in float32 when its models list none
    (the warning names an empty list then; it still shows for diffusers models that do list some)."""
    from diffusers import ModelMixin

    from .quiet import quiet_loading

    models = [m for m in pipe.components.values() if isinstance(m, ModelMixin)]
    listed = any(getattr(m, "_keep_in_fp32_modules", None) for m in models)
    with contextlib.nullcontext() if listed else quiet_loading():
        pipe.to(dtype=dtype)


def load_with(model: str, runtime: Runtime):
    """`load_pipeline(model)` on the runtime's device and dtype, its attention back-end set and its transformer
    compiled as asked (compilation happens lazily, at the first call)."""
    from .attention import set_attention
    from .compiling import compile_transformer
    from .zoo import load_pipeline

    runtime.check()
    pipe = load_pipeline(model, device=runtime.device, dtype=runtime.torch_dtype())
    set_attention(pipe, runtime.attention)
    compile_transformer(pipe, runtime.compile)
    return pipe
