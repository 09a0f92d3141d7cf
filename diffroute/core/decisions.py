"""The decisions a decider answers, as types, and the one rule that reads a decider's answer as one of them.

A component (attention, FFN, ...) at a step is computed, reused from the cache, forecast from its last two outputs,
stood in for by a fitted combination of them (`Fitted`; `Fit` while calibrating), computed for some samples only
(`Rows`), computed at a fraction of its hidden units (`Width`), or, in training, blended (`Soft`, `SoftWidth`). A
block decided as a whole is computed, reused from its residual (or a fitted combination of its last two, `Fitted`),
skipped (`Skip`), computed for some samples and reused (`Rows`) or skipped (`SkipRows`) for the others, or, in
training, gated (`Soft`) or blended with its own reuse (`SoftReuse`). Deciders may answer plain values (True, False, a
bool or float tensor); `typed` reads them once, so the executor dispatches on the type alone (one handler per type, in
`executor.py`, `block_level.py`, `fitted.py` and, for training, `soft.py`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


class Decision:
    """Base of every decision type."""


@dataclass(frozen=True)
class Compute(Decision):
    """Run it for every sample."""


@dataclass(frozen=True)
class Reuse(Decision):
    """A component: its cached output. A block: its input plus its cached residual."""


@dataclass(frozen=True)
class Forecast(Decision):
    """A component: a first-order forecast from its last two computed outputs (reuse while there is one only)."""


@dataclass(frozen=True)
class Fitted(Decision):
    """`a * newest + c * previous` of the last two computed outputs (a block: of its last two residuals, added to its
    input); (1, 0) is plain reuse. Per (step, cell) weights calibrated by `diffroute calibrate --method fit`."""

    a: float
    c: float = 0.0


@dataclass(frozen=True, eq=False)
class Fit(Decision):
    """Calibration of `Fitted`: compute the true output, pass `record` the least-squares terms (num, den) of the
    extrapolation weight that best predicts it from the last two cached outputs, and return the stand-in that weight
    gives, so that the run goes on from the state inference will have (HarmoniCa's point: fit on the trajectory the
    cache makes)."""

    record: Callable[[float, float], None]


@dataclass(frozen=True)
class Skip(Decision):
    """A block: its output is its input (Elastic-DiT's skip)."""


@dataclass(frozen=True, eq=False)
class Rows(Decision):
    """Per sample: rows where `compute` is True compute, the others reuse (`forecast`: forecast)."""

    compute: torch.Tensor
    forecast: bool = False


@dataclass(frozen=True, eq=False)
class SkipRows(Decision):
    """A block per sample: rows where `compute` is True run the block, the others skip it (output = input)."""

    compute: torch.Tensor


@dataclass(frozen=True, eq=False)
class Width(Decision):
    """An FFN computed with only this fraction of its hidden units (`diffroute.core.width`); a float, or a tensor with
    one fraction per sample of the call (samples are grouped by fraction; inside a block that runs for some samples
    only, the executor picks theirs). Not stored for reuse."""

    fraction: float | torch.Tensor


@dataclass(frozen=True, eq=False)
class Soft(Decision):
    """Training: `w * fresh + (1 - w) * cached` (a block: `w * block(x) + (1 - w) * x`), differentiable in `w`; a
    scalar or one weight per sample."""

    weight: torch.Tensor


@dataclass(frozen=True, eq=False)
class SoftReuse(Decision):
    """Training, a block: `w * block(x) + (1 - w) * (x + cached residual)`, differentiable in `w` (a scalar or one
    weight per sample). With a hard `w` (straight-through) it is inference's `Rows` exactly, cache included: the
    blended residual, detached, is what the block keeps (block-level gates, routers/gates.py)."""

    weight: torch.Tensor


@dataclass(frozen=True, eq=False)
class SoftWidth(Decision):
    """Training: an FFN's hidden units times `mask` ([samples, hidden units]), with gradients."""

    mask: torch.Tensor


COMPUTE, REUSE, FORECAST, SKIP = Compute(), Reuse(), Forecast(), Skip()


def typed(answer) -> Decision:
    """A decider's answer as a decision: True compute, False reuse, a bool tensor `Rows`, a float tensor `Soft`; a
    decision as it is. Anything else is a decider's bug, said at once (it was silently computed before)."""
    if answer is True:
        return COMPUTE
    if answer is False:
        return REUSE
    if isinstance(answer, Decision):
        return answer
    if isinstance(answer, torch.Tensor):
        return Soft(answer) if answer.is_floating_point() else Rows(answer)
    raise TypeError(f"a decider answered {answer!r}, which is no decision (see diffroute.core.decisions)")


def settled(decision: Rows | SkipRows, none: Decision) -> Decision:
    """A per-sample decision that every row agrees on, as that decision (one host read): all rows compute → COMPUTE,
    none → `none` (REUSE or SKIP); a mixed batch stays as it is."""
    if bool(decision.compute.all()):
        return COMPUTE
    if not bool(decision.compute.any()):
        return none
    return decision


def handler(table: dict, decision: Decision, where: str):
    """The handler of `decision`'s type in an executor's dispatch table; a type that does not apply there (a `Skip`
    for a component, a `Width` for a block) is said plainly."""
    found = table.get(type(decision))
    if found is None:
        raise TypeError(
            f"{type(decision).__name__} is no {where} decision; a {where} takes {sorted(t.__name__ for t in table)}"
        )
    return found
