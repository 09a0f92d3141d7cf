"""The call context as its own hook: what routing modules read at each transformer call, with or without a plan.

One diffusers hook on the transformer, shared by every module that needs it, reads the call's input latent and
timestep and tells each listener before the call (`begin`) and after it (`end`). MoE capacity k(t), FeRA's band
routing and the DAR/DTR stream rewrites are listeners, so they follow the step in any pipeline, routed or vanilla,
and in training. (The executor's `StepTracker` adds the step index and CFG branch for caching plans; the modules
here need only the timestep, which the call carries.) The hook is removed with its last listener.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Protocol

import torch
from diffusers.hooks import HookRegistry, ModelHook

from diffroute.core.arch import spec_of
from diffroute.utils.unhook import remove_hook

HOOK = "diffroute_call_context"


@dataclass
class CallInfo:
    """One transformer call: its input latent, the timestep as passed, and per sample in the scheduler's units."""

    hidden_states: torch.Tensor
    raw_timestep: torch.Tensor | float | None
    timestep: torch.Tensor  # [B] on the latent's device; zeros when the call passes none


class CallListener(Protocol):
    def begin(self, info: CallInfo) -> None: ...

    def end(self) -> None: ...


class _CallContextHook(ModelHook):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale
        self.listeners: dict[str, CallListener] = {}

    def pre_forward(self, module, *args, **kwargs):
        hidden = hidden_states_of(args, kwargs)
        raw = kwargs.get("timestep")
        n = hidden.shape[0]
        if raw is None:
            t = torch.zeros(n, device=hidden.device)
        else:
            t = torch.as_tensor(raw).reshape(-1).float().to(hidden.device) * self.scale
            t = t.expand(n) if t.numel() == 1 else t
        info = CallInfo(hidden, raw, t)
        for listener in list(self.listeners.values()):
            listener.begin(info)
        return args, kwargs

    def post_forward(self, module, output):
        for listener in reversed(list(self.listeners.values())):
            listener.end()
        return output


def hidden_states_of(args: tuple, kwargs: dict, name: str = "hidden_states"):
    """The hidden states a module was called with: its first positional argument, or the keyword `name` (None if
    neither). Every hook that reads a call's input uses this one rule."""
    return args[0] if args else kwargs.get(name)


# (call batch, rows) while a block or component runs for some of the call's samples only (a per-sample plan).
_ROWS: contextvars.ContextVar[tuple[int, torch.Tensor] | None] = contextvars.ContextVar("diffroute_rows", default=None)


@contextlib.contextmanager
def sub_batch(rows: torch.Tensor, batch: int):
    """While a module runs for `rows` of a call of `batch` samples, per-sample call inputs that listeners recorded
    for the whole call (a timestep per sample, a width per sample) narrow to those rows: see `rows_of`. The executor
    enters it around every sub-batch it runs, so every module that reads per-sample call inputs follows it."""
    token = _ROWS.set((batch, rows))
    try:
        yield
    finally:
        _ROWS.reset(token)


def rows_of(values):
    """`values`, one per sample of the whole call ([B] tensor or list), narrowed to the samples running now; anything
    of another length (a shared scalar, a value already narrowed) is returned as it is."""
    active = _ROWS.get()
    if active is None or values is None:
        return values
    batch, rows = active
    if len(values) != batch:
        return values
    if isinstance(values, torch.Tensor):
        return values.index_select(0, rows.to(values.device))
    return [values[i] for i in rows.tolist()]


# Set by our pipelines for the length of a call: True when guidance batches each sample's rows as [unconditional
# rows; conditional rows] (PixArt, Sana, SD3 with CFG), False when every row is a sample of its own; None outside.
_PAIRED: contextvars.ContextVar[bool | None] = contextvars.ContextVar("diffroute_guidance_pairs", default=None)


@contextlib.contextmanager
def guidance_pairs(paired: bool | None):
    """While a pipeline call runs: whether rows i and i + n/2 of its transformer calls are one sample's
    unconditional and conditional rows. Modules that decide per sample (an expert ensemble's router) read it with
    `paired_rows()` so that both rows of a sample go the same way, and samples never depend on their batch-mates."""
    token = _PAIRED.set(paired)
    try:
        yield
    finally:
        _PAIRED.reset(token)


def paired_rows() -> bool | None:
    return _PAIRED.get()


def _hook(transformer) -> _CallContextHook | None:
    return HookRegistry.check_if_exists_or_initialize(transformer).get_hook(HOOK)


def add_call_listener(transformer, name: str, listener: CallListener) -> None:
    """Tell `listener` about every call of `transformer` from now on (installs the shared hook on first use)."""
    hook = _hook(transformer)
    if hook is None:
        spec = spec_of(transformer)  # FLUX is called with t / 1000, the others with the scheduler's timestep
        scale = spec.timestep_scale if spec is not None else 1.0
        hook = _CallContextHook(scale)
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(hook, HOOK)
    if name in hook.listeners:
        raise ValueError(f"a call listener named {name!r} is attached to this transformer already.")
    hook.listeners[name] = listener


def remove_call_listener(transformer, name: str) -> None:
    """Stop telling `name`; the hook goes with its last listener. Absent names are ignored."""
    hook = _hook(transformer)
    if hook is None:
        return
    hook.listeners.pop(name, None)
    if not hook.listeners:
        remove_hook(transformer, HOOK)


def has_call_listener(transformer, name: str) -> bool:
    hook = _hook(transformer)
    return hook is not None and name in hook.listeners
