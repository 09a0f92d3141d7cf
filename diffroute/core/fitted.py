"""Fitted stand-ins: a reused component or block replaced by `a * newest + c * previous` of its last two computed
outputs (a block: of its last two residuals, added to its input), with weights calibrated per (step, cell) on the
plan's own trajectory. Plain reuse is (1, 0), TaylorSeer's first-order forecast (1 + w, -w) with w the ratio of step
gaps; the calibration fits w itself, by least squares against the true output. Mixed into `Executor`, as
`core.soft` is.

Fitted as an extrapolation (a + c = 1), not as two free weights: a free fit shrinks the stand-in toward zero (the
older output is a noisy regressor), which lowered the final image's PSNR on one shipped schedule (`emoji:blocks-swift`,
fp32: -0.8 dB against plain reuse) where the extrapolation never did. Written here, not taken from a library: one
number per cell, solved in closed form.

With one weight per run of blocks reused whole (`Schedule.fit_spans`, fitted from a `+spans` plan) the run's stand-in
is its input + a * R + c * R', R and R' the sums of its blocks' newest and previous residuals (each kept summed by the
cache until a block of the run computes again): the run costs `+spans`' one add plus one, instead of two per block.
It equals the blocks' own fitted stand-ins with that weight, chained (up to rounding)."""

from __future__ import annotations

import contextlib

import torch

from diffroute.core import blocks
from diffroute.core.cache import rebuild, tensors_of
from diffroute.core.decisions import COMPUTE
from diffroute.core.schedule import MAX_FIT_WEIGHT


def combine(history: list, a: float, c: float, base=None):
    """`base + a * history[0] + c * history[1]` per tensor of the output (no base: zero; one stored output or c = 0:
    the newest alone, times a). Each stream costs one new tensor and one in-place add: on a reused block, the two
    extra elementwise passes over plain reuse's one add are all a fitted stand-in adds. Weights given as tensors
    (training) take the path autograd can follow (`_mixed_trainable`)."""
    trainable = isinstance(a, torch.Tensor) or isinstance(c, torch.Tensor)
    newest = tensors_of(history[0])
    older = tensors_of(history[1]) if len(history) > 1 and (trainable or c != 0.0) else [None] * len(newest)
    bases = [None] * len(newest) if base is None else tensors_of(base)
    mixed = _mixed_trainable if trainable else _mixed
    # (None: a stream the block does not change, e.g. SD3's last block has no text output)
    out = [None if new is None else mixed(new, old, x, a, c) for new, old, x in zip(newest, older, bases)]
    return rebuild(type(history[0]), out)


def _mixed(new, old, x, a: float, c: float):
    """One stream of `combine`: out-of-place once, then in place."""
    if x is not None:
        out = blocks.plus(x, new, alpha=a)
    elif a == 1.0 and old is None:  # plain reuse: the stored tensor itself, as `Reuse` hands it out
        out = new
    else:
        out = new * a
    return out if old is None else out.add_(old, alpha=c)


def _mixed_trainable(new, old, x, a, c):
    """One stream of `combine` with gradients through the weights and the stored outputs (the cache must keep them
    with their graph, `FeatureCache(keep_graph=True)`: its buffers, written in place at later steps, would invalidate
    what autograd saved of them)."""
    out = new * a
    if old is not None:
        out = out + old * c
    return out if x is None else x + out


def _streams(inputs, like):
    """A block's input streams in the form of its residual `like`: hidden states, or (text, hidden)."""
    if isinstance(like, torch.Tensor):
        return inputs["hidden_states"]
    return (inputs.get("encoder_hidden_states"), inputs["hidden_states"])


def extrapolation_terms(history: list, target) -> tuple[float, float]:
    """The least-squares terms of the extrapolation `newest + w * (newest - previous)` closest to `target` over every
    element of the output (float64): w = num / den with num = <target - newest, step>, den = |step|^2, step = newest -
    previous. Sums of the terms of several batches (or CFG branches) give the pooled fit. (0, 0) with fewer than two
    stored outputs."""
    if len(history) < 2:
        return 0.0, 0.0
    flat = [torch.cat([t.detach().double().flatten() for t in tensors_of(h) if t is not None]) for h in history[:2]]
    y = torch.cat([t.detach().double().flatten() for t in tensors_of(target) if t is not None])
    step = flat[0] - flat[1]
    return float((y - flat[0]) @ step), float(step @ step)


def weights(num: float, den: float) -> tuple[float, float]:
    """(a, c) = (1 + w, -w) with w = num / den; plain reuse (1, 0) where there is no direction (den ~ 0) or where w
    leaves the range a schedule file accepts (two nearly equal outputs: an extrapolation far past them is noise)."""
    if den <= 1e-30:
        return 1.0, 0.0
    w = num / den
    if abs(w) > MAX_FIT_WEIGHT - 1:
        return 1.0, 0.0
    return 1.0 + w, -w


class FittedDecisions:
    """Carrying out `Fitted` and calibrating it (`Fit`); needs the executor's decider, cache, context and records."""

    _compute_all = False  # True while a calibrated block runs in full: its components' hooks stand aside

    @contextlib.contextmanager
    def _computing_all(self):
        self._compute_all = True
        try:
            yield
        finally:
            self._compute_all = False

    def _fitted(self, forward, b: int, c: int, decision, args: tuple, kwargs: dict):
        """The component's fitted stand-in; computed when nothing is cached yet."""
        key, n = (self.ctx.branch, b, c), self.ctx.batch_size
        history = self.cache.outputs(key, n)
        if not history:
            return self._compute(forward, b, c, COMPUTE, args, kwargs)
        self._record_component(b, c, 0, n)
        return combine(history, decision.a, decision.c)

    def _fit(self, forward, b: int, c: int, decision, args: tuple, kwargs: dict):
        """Calibration: the true output, the weights that best predict it, and the stand-in they give."""
        key, n = (self.ctx.branch, b, c), self.ctx.batch_size
        history = self.cache.outputs(key, n)
        if not history:
            return self._compute(forward, b, c, COMPUTE, args, kwargs)
        terms = extrapolation_terms(history, forward(*args, **kwargs))
        decision.record(*terms)
        self._record_component(b, c, 0, n)
        return combine(history, *weights(*terms))

    def _fitted_block(self, forward, b: int, module, decision, args: tuple, kwargs: dict):
        """The block's input plus the fitted combination of its last two residuals; computed when none is cached.
        The first block of a run that shares one weight (`Schedule.fit_spans`) stands in for the whole run."""
        n = self.ctx.batch_size
        run = self._run_sums(b, module, args, kwargs, slots=(0, 1))  # (None: block by block, with the run's weight)
        if run is not None:
            x, (newest, previous) = run
            return blocks.plus(x, newest, alpha=decision.a).add_(previous, alpha=decision.c)
        history = self.cache.outputs((self.ctx.branch, b, "block"), n)
        if not history:
            return self._compute_block(forward, b, module, COMPUTE, args, kwargs)
        self._record_block(b, 0, n)
        inputs = blocks.bind(module, args, kwargs).arguments
        return combine(history, decision.a, decision.c, base=_streams(inputs, history[0]))

    def _fit_block(self, forward, b: int, module, decision, args: tuple, kwargs: dict):
        """Calibration of a block reused whole: its true residual at this input, fitted as for a component."""
        n = self.ctx.batch_size
        history = self.cache.outputs((self.ctx.branch, b, "block"), n)
        if not history:
            return self._compute_block(forward, b, module, COMPUTE, args, kwargs)
        bound = blocks.bind(module, args, kwargs)
        with self._block_record(), self._computing_all():  # every component runs, uncounted: the true output
            true = blocks.residual(bound.arguments, blocks.call(forward, bound))
        terms = extrapolation_terms(history, true)
        decision.record(*terms)
        self._record_block(b, 0, n)
        return combine(history, *weights(*terms), base=_streams(bound.arguments, history[0]))
