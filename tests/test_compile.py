"""torch.compile: plans work on compiled transformers (whole or per block) and a static plan never recompiles."""

import numpy as np
import pytest
import torch
from conftest import NAMES, prompts, run

import diffroute
from diffroute.runtime.compiling import compile_transformer
from diffroute.zoo.tiny import TINY_PIPELINES

# The "eager" back-end runs dynamo's tracing, guards and graph breaks without inductor's code generation: the
# recompilation behaviour under test is dynamo's, and the images stay comparable bitwise.
BACKEND = "eager"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _fresh(name):
    pipe = TINY_PIPELINES[name]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("mode", ["whole", "regional"])
@pytest.mark.parametrize("name", NAMES)
def test_static_plan_compiles_once_and_matches_eager(name, mode):
    pipe, p = _fresh(name), prompts(name)
    diffroute.apply(pipe, "fora-2")
    eager = run(pipe, name, p, [0, 1])
    eager_map = pipe.last_stats.compute_map
    assert compile_transformer(pipe, mode, backend=BACKEND)
    first = run(pipe, name, p, [0, 1])
    compiled = _graphs()
    second = run(pipe, name, p, [0, 1])
    assert compiled > 0
    assert _graphs() == compiled, "a static plan recompiled on the second call of the same shape"
    np.testing.assert_array_equal(first, eager)
    np.testing.assert_array_equal(second, eager)
    assert pipe.last_stats.compute_map == eager_map


@pytest.mark.parametrize("name", ["pixart-alpha", "flux"])
def test_full_compiles_like_vanilla(name):
    pipe, p = _fresh(name), prompts(name)
    compile_transformer(pipe, "whole", backend=BACKEND)
    vanilla = run(pipe, name, p, [0, 1])
    vanilla_graphs = _graphs()
    diffroute.apply(pipe, "full")
    routed = run(pipe, name, p, [0, 1])
    after_first = _graphs()
    np.testing.assert_array_equal(routed, vanilla)
    run(pipe, name, p, [0, 1])
    assert _graphs() == after_first
    assert pipe.last_stats.computed_fraction == 1.0
    # `full` hooks no component: only the step hook's two opaque calls split the transformer's graph.
    assert after_first - vanilla_graphs <= 3


def test_plan_applies_to_a_torch_compile_wrapper():
    name = "pixart-alpha"
    pipe, p = _fresh(name), prompts(name)
    diffroute.apply(pipe, "fora-2")
    eager = run(pipe, name, p[:1], [0])
    diffroute.remove(pipe)
    pipe.transformer = torch.compile(pipe.transformer, backend=BACKEND)
    diffroute.apply(pipe, "fora-2")
    np.testing.assert_array_equal(run(pipe, name, p[:1], [0]), eager)
    assert pipe.last_stats.computed_fraction < 1.0


def test_unknown_compile_mode_is_refused():
    with pytest.raises(ValueError, match="Unknown compile mode"):
        compile_transformer(_fresh("dit"), "everything")


@pytest.mark.parametrize("plan", ["fbcache-0.1", "dbcache-F1B1-0.1", "taylor-3", "teacache-0.3", "emoji:fast"])
def test_every_kind_of_plan_runs_compiled(plan):
    """Dynamic policies (per-sample decisions, watched blocks), forecasts and shipped schedules under a compiled
    transformer: the same images and compute map as eager. The embedded model, since shipped schedules and
    TeaCache's calibration are made for it."""
    from diffroute.zoo import load_pipeline

    pipe = load_pipeline("emoji")
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    kwargs = dict(num_inference_steps=8, output_type="np")
    diffroute.apply(pipe, plan)
    eager = pipe(["grinning face", "red apple"], generator=gens, **kwargs).images
    eager_map = pipe.last_stats.compute_map
    compile_transformer(pipe, "whole", backend=BACKEND)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    compiled = pipe(["grinning face", "red apple"], generator=gens, **kwargs).images
    assert pipe.last_stats.compute_map == eager_map
    np.testing.assert_allclose(compiled, eager, atol=1e-5)
