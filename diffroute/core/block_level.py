"""The executor's decisions on whole blocks (`Plan.block_level`): a block reused from its residual, skipped, run for
some samples only, or under a soft training gate. Mixed into `Executor`; kept apart because a block is decided
differently from a component (its streams, its residual, its output's form)."""

from __future__ import annotations

import contextlib

import torch

from diffroute.core import blocks
from diffroute.core.cache import rebuild, tensors_of
from diffroute.core.call_context import sub_batch
from diffroute.core.decisions import COMPUTE, REUSE, SKIP, Rows, SkipRows, handler, settled, typed
from diffroute.core.hooks import KEEP


class BlockDecisions:
    """Carrying out block-level decisions; needs the executor's decider, cache, stats, context and block forms."""

    # ---- one block decided as a whole -----------------------------------------------------------------------------
    @torch.compiler.disable
    def block_stand_in(self, forward, b: int, module, args: tuple, kwargs: dict):
        """`stand_in` for a whole block: input plus cached residual (reuse), the block computed for some samples
        and reused for the others, None (compute) or KEEP (compute, then `keep_block`)."""
        if self.decider is None:
            return None
        if self._span_until is not None:  # inside a run of blocks whose summed residual its first block added
            if b == self._span_until:
                self._span_until = None
            return blocks.bind(module, args, kwargs).arguments["hidden_states"]
        if self.decider.reads_block_inputs:  # a router that decides from the block's tokens
            self.decider.block_inputs(self.ctx, b, blocks.bind(module, args, kwargs).arguments)
        decision = typed(self.decider.decide_block(self.ctx, b))
        # one handler per decision type (the training gate, Soft, lives in core.soft)
        return handler(self._block_handlers, decision, "block")(self, forward, b, module, decision, args, kwargs)

    def _compute_block(self, forward, b, module, decision, args, kwargs):
        n = self.ctx.batch_size
        self._record_block(b, n, n, whole=False)
        return KEEP if self.decider.must_store_block(self.ctx, b) else None

    def _reuse_block(self, forward, b, module, decision, args, kwargs):
        """Input plus the residual the block added at its last computation; computed when none is cached."""
        n = self.ctx.batch_size
        run = self._run_sums(b, module, args, kwargs, slots=(0,))
        if run is not None:  # a run of blocks reused whole: one add of their summed residuals
            x, (total,) = run
            return blocks.plus(x, total)
        res = self.cache.get((self.ctx.branch, b, "block"), n)
        if res is None:
            return self._compute_block(forward, b, module, COMPUTE, args, kwargs)
        self._record_block(b, 0, n)
        return blocks.add_residual(blocks.bind(module, args, kwargs).arguments, res)

    def _run_sums(self, b: int, module, args: tuple, kwargs: dict, slots: tuple[int, ...]):
        """Where the decider makes block `b` the first of a run of blocks reused whole (`block_span`) and the cache
        holds each slot's summed residuals of the run: the run's input and those sums, with the run's blocks counted
        as reused and the blocks after `b` set to pass their input through. Else None (block by block)."""
        end = self.decider.block_span(self.ctx, b)
        if end <= b:
            return None
        n, keys = self.ctx.batch_size, tuple((self.ctx.branch, j, "block") for j in range(b, end + 1))
        sums = [self.cache.summed(keys, n, slot=s) for s in slots]
        if any(total is None for total in sums):
            return None
        for j in range(b, end + 1):
            self._record_block(j, 0, n)
        self._span_until = end
        return blocks.bind(module, args, kwargs).arguments["hidden_states"], sums

    def _skip_block(self, forward, b, module, decision, args, kwargs):
        """The block's input in its output's form."""
        if b not in self._block_forms:  # its output's form, once per executor, from one sample (discarded; a
            # zero-row batch would break PixArt's modulation reshape)
            bound = blocks.bind(module, args, kwargs)
            first = torch.zeros(1, dtype=torch.long, device=bound.arguments["hidden_states"].device)
            with self._block_record():
                self._block_forms[b] = blocks.form_of(self._call_rows(forward, b, bound, first))
        self._record_block(b, 0, self.ctx.batch_size)
        return blocks.identity(blocks.bind(module, args, kwargs).arguments, self._block_forms[b])

    def _rows_block(self, forward, b, module, decision, args, kwargs):
        """Per sample: the computing rows run the block as one sub-batch, the others reuse their residual."""
        decision = settled(decision, REUSE)
        if not isinstance(decision, Rows):
            return handler(self._block_handlers, decision, "block")(self, forward, b, module, decision, args, kwargs)
        key = (self.ctx.branch, b, "block")
        store = self.decider.must_store_block(self.ctx, b)
        mixed = self._block_rows(forward, key, module, decision.compute, args, kwargs, store)
        if mixed is None:  # nothing cached yet: every row computes
            return self._compute_block(forward, b, module, COMPUTE, args, kwargs)
        self._record_block(b, int(decision.compute.sum()), self.ctx.batch_size)
        return mixed

    def _skip_rows_block(self, forward, b, module, decision, args, kwargs):
        """Per sample: the computing rows run the block, the others skip it."""
        settled_to = settled(decision, SKIP)
        if not isinstance(settled_to, SkipRows):
            return handler(self._block_handlers, settled_to, "block")(
                self, forward, b, module, settled_to, args, kwargs
            )
        self._record_block(b, int(decision.compute.sum()), self.ctx.batch_size)
        return self._skip_rows(forward, b, module, decision.compute, args, kwargs)

    @torch.compiler.disable
    def keep_block(self, b: int, module, args: tuple, kwargs: dict, out) -> None:
        """Store what a computed block added to its input, for later steps to reuse."""
        res = blocks.residual(blocks.bind(module, args, kwargs).arguments, out)
        self.cache.put((self.ctx.branch, b, "block"), res, self.ctx.step)

    def _record_block(self, b: int, n_computed: int, n: int, whole: bool = True) -> None:
        """Count a block's components: all of them (`whole`: reused, skipped, or run for some rows), or, when the
        block runs for every row, those without a hook of their own (the others count themselves)."""
        counted = self.present[b] if whole else self.present[b] & ~self._hooked[b]
        for c, yes in enumerate(counted.tolist()):
            if yes:
                self.stats.record(self.ctx.step, b, c, n_computed, n)
        self.stats.record_block_run(self.ctx.step, b, n_computed, n)

    @contextlib.contextmanager
    def _block_record(self):
        """Inside: the block runs for some rows only and its record counts its components (theirs stay quiet)."""
        self._quiet_components = True
        try:
            yield
        finally:
            self._quiet_components = False

    def _block_rows(self, forward, key, module, rows_mask: torch.Tensor, args: tuple, kwargs: dict, store=True):
        """Compute the block for the masked samples only; the others get input plus cached residual. The computed
        samples' outputs are the block's own (not input + residual, which rounds differently). The merged residual
        is cached when `store` (the decider's `must_store_block`)."""
        cached = self.cache.get(key, self.ctx.batch_size)
        if cached is None:
            return None
        rows, n = rows_mask.nonzero().squeeze(1), self.ctx.batch_size
        bound = blocks.bind(module, args, kwargs)
        part = blocks.rows_of(bound, rows, n)
        with sub_batch(rows, n), self._block_record():
            fresh = blocks.call(forward, part)
        fresh_res = tensors_of(blocks.residual(part.arguments, fresh))
        merged = [
            None if c is None else c.clone().index_copy_(0, rows, f) for c, f in zip(tensors_of(cached), fresh_res)
        ]
        res = rebuild(type(cached), merged)
        if store:
            self.cache.put(key, res, self.ctx.step)
        out = tensors_of(blocks.add_residual(bound.arguments, res))
        out = [None if o is None else o.index_copy_(0, rows, f) for o, f in zip(out, tensors_of(fresh))]
        return out[0] if isinstance(fresh, torch.Tensor) else tuple(out)

    def _call_rows(self, forward, b: int, bound, rows: torch.Tensor):
        """The block run for `rows` only; per-sample component decisions inside it select these rows."""
        with sub_batch(rows, self.ctx.batch_size):
            return blocks.call(forward, blocks.rows_of(bound, rows, self.ctx.batch_size))

    def _skip_rows(self, forward, b: int, module, rows_mask: torch.Tensor, args: tuple, kwargs: dict):
        """Run the block for the masked samples only; the others return their input."""
        rows = rows_mask.nonzero().squeeze(1)
        bound = blocks.bind(module, args, kwargs)
        with self._block_record():
            fresh = self._call_rows(forward, b, bound, rows)
        self._block_forms[b] = blocks.form_of(fresh)
        skipped = blocks.identity(bound.arguments, self._block_forms[b])
        out = [None if x is None else x.clone() for x in tensors_of(skipped)]
        out = [None if o is None else o.index_copy_(0, rows, f) for o, f in zip(out, tensors_of(fresh))]
        return out[0] if isinstance(fresh, torch.Tensor) else tuple(out)
