"""Rewriting a transformer's residual stream between blocks: the shared seam of DAR and DTR.

A `StreamRewrite` sees, per transformer call, the timestep (`begin_call`, from the shared call-context hook), then
each block's image-token input (`before`, which may replace it) and output (`after`, which may replace it). diffusers
hooks carry it out: a listener on the transformer's call context and one hook per block, all reversible (`detach`).
The text stream of joint-attention blocks (SD3, FLUX) passes untouched. Blocks are the unit (not the sublayers inside
them, whose residual adds live in diffusers' block code).
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook

from diffroute.core.arch import architecture_map
from diffroute.core.blocks import bind
from diffroute.core.call_context import CallInfo, add_call_listener, has_call_listener, remove_call_listener
from diffroute.errors import PlanError
from diffroute.surgery.config import drop_config_key
from diffroute.utils.unhook import remove_hook

CALL_LISTENER = "diffroute_stream"
BLOCK_HOOK = "diffroute_stream_block"


def stream_dim(transformer) -> int:
    """Width of the image-token stream between blocks (heads x head width in every supported family)."""
    return transformer.config["num_attention_heads"] * transformer.config["attention_head_dim"]


class StreamRewrite:
    """Subclasses implement `begin_call(t)` (t: [B] in the scheduler's units), `before(l, x)` and `after(l, out)`."""

    batch: int | None = None  # rows of the current transformer call (None between calls)

    def begin_call(self, timestep: torch.Tensor) -> None:
        pass

    def end_call(self) -> None:
        pass

    def before(self, block: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    def after(self, block: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden

    # ----- attaching ---------------------------------------------------------------------------------------------
    def attach(self, transformer: torch.nn.Module) -> StreamRewrite:
        if has_call_listener(transformer, CALL_LISTENER):
            raise PlanError(
                "this transformer's residual stream is rewritten already (DAR or DTR): one at a time; remove it first."
            )
        arch = architecture_map(transformer)
        self.num_blocks = arch.num_blocks
        add_call_listener(transformer, CALL_LISTENER, _CallListener(self))
        for b, block in enumerate(arch.blocks):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_BlockHook(self, b), BLOCK_HOOK)
        self._attached = (transformer, arch.blocks)
        return self

    def detach(self) -> None:
        transformer, blocks = self._attached
        remove_call_listener(transformer, CALL_LISTENER)
        for block in blocks:
            remove_hook(block, BLOCK_HOOK)
        self._attached = None


def refuse_twice(transformer: torch.nn.Module, name: str) -> None:
    """PlanError if the rewrite `name` (DAR, DTR) is applied to `transformer` already."""
    if getattr(transformer, f"_diffroute_{name.lower()}", None) is not None:
        raise PlanError(f"{name} is applied to this transformer already; remove_{name.lower()}(transformer) first.")


def install(transformer: torch.nn.Module, name: str, rewrite: StreamRewrite, config_key: str, settings: dict):
    """Attach `rewrite` as the transformer's `name` and record its settings in the transformer's config, so that a
    saved model loads with it (`surgery.loader`). Refused before anything changes if a rewrite holds the stream."""
    refuse_twice(transformer, name)
    rewrite.attach(transformer)
    setattr(transformer, f"_diffroute_{name.lower()}", rewrite)
    transformer.register_to_config(**{config_key: settings})
    return rewrite


def uninstall(transformer: torch.nn.Module, name: str, config_key: str) -> StreamRewrite:
    """Detach the rewrite `name`: the transformer computes as before it was applied; its config forgets it."""
    attr = f"_diffroute_{name.lower()}"
    rewrite = getattr(transformer, attr, None)
    if rewrite is None:
        raise PlanError(f"this transformer has no {name} to remove.")
    rewrite.detach()
    setattr(transformer, attr, None)
    drop_config_key(transformer, config_key)
    return rewrite


class _CallListener:
    def __init__(self, rewrite: StreamRewrite):
        self.rewrite = rewrite

    def begin(self, info: CallInfo) -> None:
        self.rewrite.batch = info.timestep.shape[0]
        self.rewrite.begin_call(info.timestep)

    def end(self) -> None:
        self.rewrite.end_call()
        self.rewrite.batch = None


class _BlockHook(ModelHook):
    def __init__(self, rewrite: StreamRewrite, block: int):
        super().__init__()
        self.rewrite, self.block = rewrite, block

    def pre_forward(self, module, *args, **kwargs):
        bound = bind(module, args, kwargs)
        hidden = bound.arguments["hidden_states"]
        if self.rewrite.batch is not None and hidden.shape[0] != self.rewrite.batch:
            # a plan that decides blocks per sample runs a block on some rows only; the rewrite holds the whole
            # batch's stream (DAR's sources, DTR's windows), so the two cannot be combined
            raise PlanError(
                "this model's residual stream is rewritten (DAR or DTR) and the plan runs blocks on some samples "
                "only (per-sample block decisions, e.g. dbcache or fbcache): use a per-step plan (full, fora-N, "
                "a schedule) on this model."
            )
        bound.arguments["hidden_states"] = self.rewrite.before(self.block, hidden)
        return bound.args[1:], bound.kwargs

    def post_forward(self, module, output):
        if isinstance(output, torch.Tensor):
            return self.rewrite.after(self.block, output)
        text, hidden = output
        return (text, self.rewrite.after(self.block, hidden))
