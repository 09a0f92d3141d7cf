"""The diffusers hooks the executor places: on the transformer (step context, timing), on watched blocks (dynamic
policies see their inputs and outputs), on components and on blocks decided as a whole (stand in or compute)."""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook

from diffroute.core.call_context import hidden_states_of
from diffroute.core.context import NamedCallHook

STEP_HOOK = "diffroute_step"
BLOCK_HOOK = "diffroute_block"
COMPONENT_HOOK = "diffroute_component"
BLOCK_REUSE_HOOK = "diffroute_block_reuse"

# What `stand_in` answers when the component must compute and its output be kept for later steps.
KEEP = "keep"


class StepHook(NamedCallHook):
    """On the transformer: advances the step context (with the call's name where the pipeline gives one) and times
    each forward."""

    def __init__(self, executor):
        super().__init__()
        self.executor = executor

    def pre_forward(self, module, *args, **kwargs):
        hidden = hidden_states_of(args, kwargs)
        self.executor.on_transformer_start(kwargs.get("timestep"), hidden, self.call_name.name)
        return args, kwargs

    def post_forward(self, module, output):
        self.executor.on_transformer_end()
        return output


class BlockHook(ModelHook):
    """On a block a decider watches (dynamic policies): shows it the block's inputs and output."""

    def __init__(self, executor, block: int):
        super().__init__()
        self.executor, self.block = executor, block

    def pre_forward(self, module, *args, **kwargs):
        self.executor.on_block_start(self.block, module, args, kwargs)
        return args, kwargs

    def post_forward(self, module, output):
        self.executor.on_block_end(self.block, output)
        return output


class ComponentHook(ModelHook):
    """On one component of one block: compute it, or stand in for it (the block's gates still apply)."""

    def __init__(self, executor, block: int, comp: int):
        super().__init__()
        self.executor, self.block, self.comp = executor, block, comp

    @torch.compiler.disable(recursive=False)  # this frame stays Python; the component's forward may still compile
    def new_forward(self, module, *args, **kwargs):
        out = self.executor.stand_in(self.fn_ref.original_forward, self.block, self.comp, args, kwargs)
        if out is None or out is KEEP:
            keep = out is KEEP
            out = self.fn_ref.original_forward(*args, **kwargs)
            if keep:
                self.executor.keep(self.block, self.comp, out)
        return out


class BlockReuseHook(ModelHook):
    """On a block a plan decides as a whole (`Plan.block_level`): compute it, or stand in with its input plus the
    residual it added at its last computation. Its components carry no hooks."""

    def __init__(self, executor, block: int):
        super().__init__()
        self.executor, self.block = executor, block

    @torch.compiler.disable(recursive=False)  # as ComponentHook: this frame stays Python, the block may compile
    def new_forward(self, module, *args, **kwargs):
        out = self.executor.block_stand_in(self.fn_ref.original_forward, self.block, module, args, kwargs)
        if out is None or out is KEEP:
            keep = out is KEEP
            out = self.fn_ref.original_forward(*args, **kwargs)
            if keep:
                self.executor.keep_block(self.block, module, args, kwargs, out)
        return out
