"""diffusers' own caches on a transformer: found, and refused beside a plan."""

from __future__ import annotations

import torch

from diffroute.errors import PlanError

# diffusers' own caches (and layer skipping) decide, like a plan, what each block computes; stacked with a plan, each
# corrupts the other's state (PAB's counter does not advance on reused steps, FasterCache finds our hook where it
# looks for its own). So the combination is refused, in either order, and the other cache is left as it was.
FOREIGN_CACHE_HOOKS = (
    "faster_cache",
    "fbc_",
    "mag_cache",
    "pyramid_attention_broadcast",
    "sea_cache",
    "taylorseer_cache",
    "layer_skip",
)


def foreign_cache_hooks(transformer: torch.nn.Module, modules=None) -> list[str]:
    """Names of diffusers cache hooks registered anywhere in `transformer`, or on `modules` only (sorted, each once)."""
    found = set()
    for module in transformer.modules() if modules is None else modules:
        registry = getattr(module, "_diffusers_hook", None)
        for name in getattr(registry, "hooks", {}) if registry is not None else ():
            if name.startswith(FOREIGN_CACHE_HOOKS):
                found.add(name)
    return sorted(found)


def refuse_foreign_caches(transformer: torch.nn.Module, modules=None) -> None:
    """PlanError if a diffusers cache is on: a plan and such a cache cannot be stacked. `modules`: look only there."""
    found = foreign_cache_hooks(transformer, modules)
    if found:
        raise PlanError(
            f"a diffusers cache is enabled on this transformer ({', '.join(found)}): diffroute plans and diffusers' "
            "caches both decide what each block computes and cannot be stacked. Disable one of them "
            "(`pipe.transformer.disable_cache()`, or `pipe.disable_cache()` for the plan)."
        )
