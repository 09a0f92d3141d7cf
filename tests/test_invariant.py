"""The text projection computed once per call (`core/invariant.py`): under a plan that skips, the module runs once
per distinct input of a call and the images are bitwise those of recomputing it at every step; `full` hooks
nothing; a new input (or one changed in place) is recomputed, never served stale."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import NAMES, fresh_pipe, prompts, run

import diffroute
from diffroute.core.arch import ARCHITECTURES, spec_of
from diffroute.core.invariant import INVARIANT_HOOK, InvariantHook

WITH_TEXT = [n for n in NAMES if n != "dit"]  # DiT is class-conditional: nothing call-invariant


@pytest.mark.parametrize("name", WITH_TEXT)
def test_text_projection_runs_once_per_call_and_changes_nothing(name, monkeypatch):
    pipe = fresh_pipe(name)
    executor = diffroute.apply(pipe, "fora-2")
    cached = run(pipe, name, prompts(name), [0, 1])
    hooks = executor._invariant_hooks
    assert hooks, f"{name}: no call-invariant module hooked"
    calls = pipe.last_stats.transformer_calls
    # computed once per distinct input (CFG in separate calls, as FLUX's true CFG: two), handed back at every other
    # transformer call; the outputs are freed when the call ends
    assert all(h.misses <= 2 and h.hits == calls - h.misses > 0 and h.memo == [] for h in hooks)
    cls = type(pipe.transformer).__name__
    monkeypatch.setitem(ARCHITECTURES, cls, replace(spec_of(pipe.transformer), call_invariant=()))
    assert not diffroute.apply(pipe, "fora-2")._invariant_hooks
    np.testing.assert_array_equal(run(pipe, name, prompts(name), [0, 1]), cached)


def test_full_hooks_no_invariant_module():
    pipe = fresh_pipe("pixart-alpha")
    executor = diffroute.apply(pipe, "full")
    assert executor._invariant_hooks == []
    registry = getattr(pipe.transformer.caption_projection, "_diffusers_hook", None)
    assert registry is None or INVARIANT_HOOK not in registry.hooks
    diffroute.apply(pipe, "fora-2")  # (a plan that skips does hook it, and removing it unhooks it)
    assert INVARIANT_HOOK in pipe.transformer.caption_projection._diffusers_hook.hooks
    diffroute.remove(pipe)
    assert INVARIANT_HOOK not in pipe.transformer.caption_projection._diffusers_hook.hooks


def test_a_new_or_changed_input_is_recomputed():
    projection = fresh_pipe("pixart-alpha").transformer.caption_projection
    hook = InvariantHook()
    from diffusers.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(projection).register_hook(hook, INVARIANT_HOOK)
    x = torch.randn(2, 4, projection.linear_1.in_features)
    with torch.no_grad():
        first = projection(x)
        assert projection(x) is first and hook.hits == 1  # the same tensor: handed back
        assert torch.equal(projection(x.clone()), first) and hook.hits == 1  # an equal new tensor: recomputed
        x.mul_(2)  # changed in place: its version moved on
        assert torch.allclose(projection(x), projection.linear_2(projection.act_1(projection.linear_1(x))))
        assert hook.hits == 1
    with torch.enable_grad():
        projection(x)
        assert hook.hits == 1  # never while autograd records
    hook.clear()
    assert hook.memo == [] and hook.hits == hook.misses == 0
