"""The decision types: how a decider's plain answers read, agreed per-sample decisions, and answers that are no
decision (or a decision that does not apply where it is given) refused at the call instead of silently computed."""

import pytest
import torch
from conftest import run
from test_block_skip import _BlockPlan

import diffroute
from diffroute.core.deciders import Decider
from diffroute.core.decisions import (
    COMPUTE,
    FORECAST,
    REUSE,
    SKIP,
    Rows,
    SkipRows,
    Soft,
    Width,
    settled,
    typed,
)
from diffroute.plans import Plan


def test_plain_answers_read_as_their_types():
    assert typed(True) is COMPUTE and typed(False) is REUSE and typed(FORECAST) is FORECAST
    mask = torch.tensor([True, False])
    assert isinstance(typed(mask), Rows) and typed(mask).compute is mask
    assert isinstance(typed(torch.tensor(0.3)), Soft)
    assert isinstance(typed(Width(0.5)), Width)
    for bad in (None, 1, "forecast", 0.5):
        with pytest.raises(TypeError, match="no decision"):
            typed(bad)


def test_per_sample_decisions_that_agree_become_one():
    assert settled(Rows(torch.tensor([True, True])), REUSE) is COMPUTE
    assert settled(Rows(torch.tensor([False, False])), REUSE) is REUSE
    assert settled(SkipRows(torch.tensor([False, False])), SKIP) is SKIP
    mixed = Rows(torch.tensor([True, False]))
    assert settled(mixed, REUSE) is mixed


class _Answers(Plan):
    """Every component answers `answer` from the second step on."""

    name = "answers-test"

    def __init__(self, answer):
        self.answer = answer

    def decider(self, arch, num_steps):
        answer = self.answer

        class _D(Decider):
            def decide(self, ctx, block, comp):
                return True if ctx.step == 0 else answer

        return _D()


@pytest.mark.parametrize(
    "plan, needle",
    [
        (_Answers("maybe"), "'maybe', which is no decision"),
        (_Answers(SKIP), "Skip is no component decision"),
        (_BlockPlan(0, lambda step: Width(0.5)), "Width is no block decision"),
    ],
)
def test_an_answer_that_is_no_decision_is_refused_at_the_call(tiny_pipes, plan, needle):
    pipe = tiny_pipes("pixart-alpha")
    diffroute.apply(pipe, plan)
    try:
        with pytest.raises(TypeError, match=needle):
            run(pipe, "pixart-alpha", ["a red apple"], [0], steps=2)
    finally:
        diffroute.remove(pipe)
