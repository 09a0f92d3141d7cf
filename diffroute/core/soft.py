"""The executor's training-only decisions, kept out of the inference path: soft blends of a component's fresh and
cached outputs, a block's soft gate and its blend with its own reuse, an FFN's soft width mask. Each has gradients
through its weights; a decider answers them only while a router trains (`core.decisions.Soft`, `SoftReuse`,
`SoftWidth`). Mixed into `Executor`."""

from __future__ import annotations

import torch

from diffroute.core import blocks, width
from diffroute.core.cache import rebuild, tensors_of
from diffroute.core.call_context import hidden_states_of


class SoftDecisions:
    """Carrying out training decisions; needs the executor's decider, cache, context and records."""

    def _soft_component(self, forward, b: int, c: int, decision, args: tuple, kwargs: dict):
        """`w * fresh + (1 - w) * cached` with gradients through `w` (a scalar, or one weight per sample). The cached
        side is what earlier steps stored; where the decider says so (`must_store`), the blend, detached, becomes the
        cached output (a student rolled through a trajectory keeps the cache it would have)."""
        key, n = (self.ctx.branch, b, c), self.ctx.batch_size
        fresh = forward(*args, **kwargs)
        cached = self.cache.get(key, n)
        self._record_component(b, c, n, n)
        if cached is None:  # nothing computed before: the component is its fresh output
            out = fresh
        else:
            out = rebuild(type(cached), _blend(decision.weight, tensors_of(fresh), tensors_of(cached)))
        if self.decider.must_store(self.ctx, b, c):  # (fresh buffers: the blend's graph reads the old)
            detached = [None if t is None else t.detach() for t in tensors_of(out)]
            self.cache.replace(key, rebuild(type(out), detached), self.ctx.step)
        return out

    def _soft_width(self, forward, b: int, c: int, decision, args: tuple, kwargs: dict):
        """The FFN's hidden units times the decision's mask, gradients through the mask."""
        n = self.ctx.batch_size
        self._record_component(b, c, n, n)
        return width.masked_ffn(self.arch.modules[b][c], hidden_states_of(args, kwargs), decision.mask)

    def _soft_block(self, forward, b: int, module, decision, args: tuple, kwargs: dict):
        """A block under a soft gate: `w * block(x) + (1 - w) * x`, gradients through `w`."""
        n = self.ctx.batch_size
        bound = blocks.bind(module, args, kwargs)
        out = blocks.call(forward, bound)
        self._block_forms[b] = blocks.form_of(out)
        self._record_block(b, n, n, whole=False)
        return blocks.gate(bound.arguments, out, decision.weight)

    def _soft_reuse_block(self, forward, b: int, module, decision, args: tuple, kwargs: dict):
        """`w * block(x) + (1 - w) * (x + cached residual)`, gradients through `w`. The block runs for every sample
        (the gradient needs its output), but with a hard `w` the values are inference's: rows at 1 are the block's
        output, rows at 0 their input plus cached residual, and the blended residual, detached, is what the block
        keeps (a computing row's fresh residual, a reusing row's old one), as `Rows` merges them."""
        n, key = self.ctx.batch_size, (self.ctx.branch, b, "block")
        bound = blocks.bind(module, args, kwargs)
        out = blocks.call(forward, bound)
        self._record_block(b, n, n, whole=False)
        fresh = blocks.residual(bound.arguments, out)
        cached = self.cache.get(key, n)
        if cached is None:  # nothing computed before: the block is its output
            kept, blended = fresh, out
        else:
            kept = rebuild(type(cached), _blend(decision.weight, tensors_of(fresh), tensors_of(cached)))
            reused = tensors_of(blocks.add_residual(bound.arguments, cached))
            blended = rebuild(type(out), _blend(decision.weight, tensors_of(out), reused))
        if self.decider.must_store_block(self.ctx, b):
            detached = [None if t is None else t.detach() for t in tensors_of(kept)]
            self.cache.replace(key, rebuild(type(kept), detached), self.ctx.step)
        return blended


def _blend(weight: torch.Tensor, fresh: list, old: list) -> list:
    """`w * fresh + (1 - w) * old` per stream; a stream with nothing on one side keeps the fresh one."""
    return [f if f is None or o is None else blocks.mix(weight, f, o) for f, o in zip(fresh, old)]
