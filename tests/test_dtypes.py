"""Half precision: routed construction keeps every component's dtype, and plans run in bf16 like vanilla."""

import numpy as np
import pytest
import torch
from conftest import NAMES, prompts, run

from diffroute.core.cache import tensors_of
from diffroute.pipelines import to_routed
from diffroute.zoo.tiny import TINY_PIPELINES


def _dtypes(pipe) -> dict:
    return {k: v.dtype for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}


def _vanilla(name, dtype=None):
    routed = TINY_PIPELINES[name]()
    vanilla = type(routed).__mro__[2](**routed.components)  # the diffusers class, the same modules
    if dtype is not None:
        vanilla.to(dtype=dtype)
    vanilla.set_progress_bar_config(disable=True)
    return vanilla


@pytest.mark.parametrize("name", NAMES)
def test_to_routed_keeps_dtypes_of_both_pipelines(name):
    vanilla = _vanilla(name)
    vanilla.transformer.to(torch.bfloat16)  # mixed: a bf16 transformer beside fp32 encoders
    before = _dtypes(vanilla)
    assert torch.bfloat16 in before.values() and torch.float32 in before.values()
    routed = to_routed(vanilla)
    assert _dtypes(routed) == before
    assert _dtypes(vanilla) == before  # the user's pipeline was not cast through the shared modules


def test_from_pipe_keeps_dtypes_and_still_casts_when_asked():
    from diffroute.pipelines import RoutedPixArtAlphaPipeline

    vanilla = _vanilla("pixart-alpha", torch.float16)
    assert set(_dtypes(RoutedPixArtAlphaPipeline.from_pipe(vanilla)).values()) == {torch.float16}
    cast = RoutedPixArtAlphaPipeline.from_pipe(vanilla, dtype=torch.bfloat16)
    assert set(_dtypes(cast).values()) == {torch.bfloat16}  # diffusers' behaviour when a dtype is given


def test_load_pipeline_loads_in_the_asked_dtype(tmp_path):
    from diffroute.zoo import load_pipeline

    _vanilla("pixart-alpha").save_pretrained(tmp_path / "p")
    pipe = load_pipeline(str(tmp_path / "p"), dtype=torch.bfloat16)
    assert set(_dtypes(pipe).values()) == {torch.bfloat16}
    assert set(_dtypes(load_pipeline(str(tmp_path / "p"))).values()) == {torch.float32}


def test_zoo_model_takes_dtype():
    from diffroute.zoo import load_pipeline

    pipe = load_pipeline("tiny-pixart", dtype=torch.bfloat16)
    assert set(_dtypes(pipe).values()) == {torch.bfloat16}


@pytest.mark.parametrize("name", ["pixart-alpha", "dit", "flux"])
def test_full_is_bitwise_vanilla_in_bf16_and_the_cache_keeps_bf16(name):
    import diffroute

    vanilla = _vanilla(name, torch.bfloat16)
    routed = to_routed(vanilla)
    p = prompts(name)
    ref = run(vanilla, name, p, [0, 1])
    diffroute.apply(routed, "full")
    np.testing.assert_array_equal(run(routed, name, p, [0, 1]), ref)
    diffroute.apply(routed, "fora-2")
    kept = []
    executor = diffroute.get_executor(routed)
    put = executor.cache.put
    executor.cache.put = lambda key, out, step=0: (kept.append(out), put(key, out, step))[-1]
    images = run(routed, name, p, [0, 1])
    diffroute.remove(routed)
    assert kept and {t.dtype for o in kept for t in tensors_of(o) if t is not None} == {torch.bfloat16}
    assert np.isfinite(images).all() and not np.array_equal(images, ref)
