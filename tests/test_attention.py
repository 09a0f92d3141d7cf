"""Attention back-ends: plans work whichever processor computes attention; bad names are refused."""

import numpy as np
import pytest
from conftest import prompts, run

import diffroute
from diffroute.errors import InputError
from diffroute.runtime.attention import set_attention
from diffroute.zoo.tiny import TINY_PIPELINES


@pytest.fixture
def restore_dispatch():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    saved = _AttentionBackendRegistry.get_active_backend()[0]  # set_attention_backend also sets a global default
    yield
    _AttentionBackendRegistry.set_active_backend(saved)


def _fresh(name):
    pipe = TINY_PIPELINES[name]()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "name, backend",
    [("pixart-alpha", "classic"), ("dit", "classic"), ("pixart-sigma", "classic"), ("flux", "dispatch:_native_math")],
)
def test_plans_under_another_attention_backend(name, backend, restore_dispatch):
    pipe, p = _fresh(name), prompts(name)
    diffroute.apply(pipe, "fora-2")
    default = run(pipe, name, p, [0, 1])
    default_map = pipe.last_stats.compute_map
    diffroute.remove(pipe)
    before = {k: type(v) for k, v in _processors(pipe).items()}
    set_attention(pipe, backend)
    if backend == "classic":
        assert {k: type(v) for k, v in _processors(pipe).items()} != before
    vanilla = run(pipe, name, p, [0, 1])
    diffroute.apply(pipe, "full")
    np.testing.assert_array_equal(run(pipe, name, p, [0, 1]), vanilla)  # full == vanilla under this back-end too
    diffroute.apply(pipe, "fora-2")
    routed = run(pipe, name, p, [0, 1])
    assert pipe.last_stats.compute_map == default_map  # hooks sit on modules, not processors
    np.testing.assert_allclose(routed, default, atol=1e-4)  # another kernel, the same maths


def _processors(pipe):
    return {n: m.processor for n, m in pipe.transformer.named_modules() if hasattr(m, "processor")}


def test_unusable_backends_are_refused_with_the_way_out():
    with pytest.raises(InputError, match="dispatch:_native_math"):
        set_attention(_fresh("flux"), "classic")  # FLUX's processors are not plain SDPA
    with pytest.raises(InputError, match="do not dispatch"):
        set_attention(_fresh("pixart-alpha"), "dispatch:native")
    with pytest.raises(InputError, match="keep --attention default"):
        set_attention(_fresh("sana"), "classic")  # linear attention: nothing plain to replace
    with pytest.raises(InputError, match="Unknown attention"):
        set_attention(_fresh("dit"), "fastest")


def test_xformers_is_refused_without_the_package():
    pytest.importorskip("torch")
    try:
        import xformers  # noqa: F401

        pytest.skip("xformers is installed: covered by the CUDA tests")
    except ImportError:
        pass
    with pytest.raises(InputError, match="pip install xformers"):
        set_attention(_fresh("pixart-alpha"), "xformers")
