"""torch.compile for routed pipelines: the whole transformer or its blocks (regional), in place.

Plans work under either: the executor keeps its Python bookkeeping out of the traced graphs (see executor.py), so a
static plan compiles once per input shape and does not recompile at every step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only when a model is compiled: `diffroute --help` stays quick
    import torch

COMPILE_MODES = {
    "none": "eager (no torch.compile)",
    "whole": "transformer.compile(): one graph for the transformer, broken only around routed components",
    "regional": "compile each transformer block (diffusers' compile_repeated_blocks where the model declares its "
    "repeated blocks, else every block of diffroute's architecture map): faster to compile, same speed here",
}


def compiled_modules(transformer: torch.nn.Module, mode: str) -> list[torch.nn.Module]:
    """The modules that `mode` compiles."""
    if mode == "whole":
        return [transformer]
    if mode == "regional":
        names = getattr(transformer, "_repeated_blocks", None) or []
        blocks = [m for m in transformer.modules() if type(m).__name__ in names]
        if not blocks:
            from diffroute.core.arch import architecture_map

            blocks = list(architecture_map(transformer).blocks)
        return blocks
    raise ValueError(f"Unknown compile mode {mode!r}; known: {', '.join(COMPILE_MODES)}.")


def compile_transformer(target, mode: str = "whole", **compile_kwargs) -> list[torch.nn.Module]:
    """Compile the transformer of a pipeline (or a transformer) in place with `Module.compile`; returns the compiled
    modules. `compile_kwargs` go to torch.compile (backend, mode, dynamic, ...).

    `dynamic=False` unless asked otherwise: a denoising loop has static shapes, and the executor's frames (diffusers'
    hook wrapper, shared by the transformer and every routed component) see many shapes, which would make dynamo's
    automatic dynamic shapes recompile the shared frames with symbolic sizes and slower kernels."""
    transformer = getattr(target, "transformer", target)
    if mode == "none":
        return []
    compile_kwargs.setdefault("dynamic", False)
    modules = compiled_modules(transformer, mode)
    for m in modules:
        m.compile(**compile_kwargs)
    return modules
