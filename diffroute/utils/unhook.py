"""Removing a diffusers hook so that the module is left as it was found.

`HookRegistry.remove_hook` puts back the forward it wrapped as an attribute of the instance (the bound method it
saved), so a module that had no `forward` of its own keeps one after its last hook is gone. `torch.compile` guards
on that attribute: a model compiled before a plan was applied recompiles once after the plan is removed. Written here
because diffusers does not restore the class's forward itself."""

from __future__ import annotations

import torch


def remove_hook(module: torch.nn.Module, name: str) -> None:
    """Remove the hook `name` from `module` (absent: nothing); with its last hook gone, the instance's `forward`
    attribute goes too where it is only the class's own method bound to it."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return
    registry.remove_hook(name, recurse=False)
    if registry.hooks:
        return
    own = module.__dict__.get("forward")
    if getattr(own, "__self__", None) is module and getattr(own, "__func__", None) is type(module).forward:
        del module.__dict__["forward"]
