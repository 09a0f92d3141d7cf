"""Parameters' `requires_grad` flags set for the duration of a block and restored after, as they were."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def requires_grad(modules: list[torch.nn.Module], flag: bool):
    """Every parameter of `modules` with `requires_grad=flag` inside; each one's own flag back after (a flag can
    select another kernel, so a frozen model must come back exactly as it was)."""
    saved = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for m in modules:
        m.requires_grad_(flag)
    try:
        yield
    finally:
        for p, was in saved:
            p.requires_grad_(was)


def pipeline_modules(pipe, but: torch.nn.Module | None = None) -> list[torch.nn.Module]:
    """The torch modules among a pipeline's components (text encoder, transformer, VAE...), less `but`."""
    return [m for m in pipe.components.values() if isinstance(m, torch.nn.Module) and m is not but]
