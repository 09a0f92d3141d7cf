"""Rewriting a transformer's residual stream between blocks: the shared seam of DAR and DTR.

A `StreamRewrite` sees, per transformer call, the timestep (`begin_call`), then each block's image-token input
(`before`, which may replace it) and output (`after`, which may replace it). diffusers hooks carry it out: one on the
transformer, one per block, all reversible (`detach`). The text stream of joint-attention blocks (SD3, FLUX) passes
untouched. Blocks are the unit (not the sublayers inside them, whose residual adds live in diffusers' block code).
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook

from diffroute.arch import architecture_map
from diffroute.blocks import bind
from diffroute.errors import PlanError

CALL_HOOK = "diffroute_stream_call"
BLOCK_HOOK = "diffroute_stream_block"
# FLUX passes t / 1000; the others pass the scheduler's timestep in [0, 1000) (MoE capacity reads this too).
TIMESTEP_SCALE = {"FluxTransformer2DModel": 1000.0}


def stream_dim(transformer) -> int:
    """Width of the image-token stream between blocks (heads x head width in every supported family)."""
    return transformer.config["num_attention_heads"] * transformer.config["attention_head_dim"]


class StreamRewrite:
    """Subclasses implement `begin_call(t)` (t: [B] in the scheduler's units), `before(l, x)` and `after(l, out)`."""

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
        if HookRegistry.check_if_exists_or_initialize(transformer).get_hook(CALL_HOOK) is not None:
            raise PlanError(
                "this transformer's residual stream is rewritten already (DAR or DTR): one at a time; remove it first."
            )
        arch = architecture_map(transformer)
        self.num_blocks = arch.num_blocks
        scale = TIMESTEP_SCALE.get(arch.model_class, 1.0)
        HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_CallHook(self, scale), CALL_HOOK)
        for b, block in enumerate(arch.blocks):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_BlockHook(self, b), BLOCK_HOOK)
        self._attached = (transformer, arch.blocks)
        return self

    def detach(self) -> None:
        transformer, blocks = self._attached
        HookRegistry.check_if_exists_or_initialize(transformer).remove_hook(CALL_HOOK, recurse=False)
        for block in blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(BLOCK_HOOK, recurse=False)
        self._attached = None


class _CallHook(ModelHook):
    def __init__(self, rewrite: StreamRewrite, scale: float):
        super().__init__()
        self.rewrite, self.scale = rewrite, scale

    def pre_forward(self, module, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        t = kwargs.get("timestep")
        t = torch.zeros(hidden.shape[0]) if t is None else torch.as_tensor(t).reshape(-1).float() * self.scale
        self.rewrite.begin_call(t.to(hidden.device).expand(hidden.shape[0]) if t.numel() == 1 else t.to(hidden.device))
        return args, kwargs

    def post_forward(self, module, output):
        self.rewrite.end_call()
        return output


class _BlockHook(ModelHook):
    def __init__(self, rewrite: StreamRewrite, block: int):
        super().__init__()
        self.rewrite, self.block = rewrite, block

    def pre_forward(self, module, *args, **kwargs):
        bound = bind(module, args, kwargs)
        bound.arguments["hidden_states"] = self.rewrite.before(self.block, bound.arguments["hidden_states"])
        return bound.args[1:], bound.kwargs

    def post_forward(self, module, output):
        if isinstance(output, torch.Tensor):
            return self.rewrite.after(self.block, output)
        text, hidden = output
        return (text, self.rewrite.after(self.block, hidden))
