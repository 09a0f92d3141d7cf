"""Modules computed once per pipeline call: the text-conditioning projection (PixArt's and Sana's
`caption_projection`, SD3's and FLUX's `context_embedder`) is handed the same tensor at every step of a call, so
its output is the same at every step. `InvariantHook` computes it at the first step and hands the very same output
back at the others (bitwise what recomputing gives: same input, same weights). It exists for the steps a plan skips:
a step that reuses every block should not pay for work recomputed for nothing. On the 4M-parameter emoji model the
projection is about 0.7% of a full step and so close to a tenth of a step that reuses every block; on PixArt-α XL
it is ~0.2% of a step.

Memoised by tensor identity (the same object, unchanged since: `_version`), never by value, so a pipeline that
builds a new text tensor per step simply recomputes; one entry per distinct input of the call (FLUX's true CFG
alternates two). Not while autograd records (training reads gradients through a fresh graph at every step)."""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook

from diffroute.utils.unhook import remove_hook

INVARIANT_HOOK = "diffroute_invariant"
MAX_ENTRIES = 4  # distinct inputs per call (CFG in separate calls: two); more means inputs are not call-invariant


class InvariantHook(ModelHook):
    """Computes the module once per input tensor of a pipeline call; `forget()` at the end of a call (the counts
    stay readable), `clear()` at the start of the next."""

    def __init__(self):
        super().__init__()
        self.memo: list[tuple[torch.Tensor, int, object]] = []  # (input, its _version then, output)
        self.hits = self.misses = 0

    @torch.compiler.disable  # identity and version checks are Python: a compiled transformer calls this opaquely
    def new_forward(self, module, *args, **kwargs):
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, torch.Tensor) or torch.is_grad_enabled():
            return self.fn_ref.original_forward(*args, **kwargs)
        for seen, version, out in self.memo:
            if seen is x and version == x._version:
                self.hits += 1
                return out
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.misses += 1
        self.memo = [*self.memo[-(MAX_ENTRIES - 1) :], (x, x._version, out)]
        return out

    def forget(self) -> None:
        self.memo = []

    def clear(self) -> None:
        self.memo, self.hits, self.misses = [], 0, 0


def invariant_modules(model: torch.nn.Module, names: tuple[str, ...]) -> list[torch.nn.Module]:
    """The modules `names` (attributes of the transformer) that this instance has."""
    found = [getattr(model, n, None) for n in names]
    return [m for m in found if isinstance(m, torch.nn.Module)]


def attach_invariant(modules: list[torch.nn.Module]) -> list[InvariantHook]:
    hooks = []
    for m in modules:
        hook = InvariantHook()
        HookRegistry.check_if_exists_or_initialize(m).register_hook(hook, INVARIANT_HOOK)
        hooks.append(hook)
    return hooks


def detach_invariant(modules: list[torch.nn.Module]) -> None:
    for m in modules:
        remove_hook(m, INVARIANT_HOOK)
