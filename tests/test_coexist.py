"""diffroute plans and diffusers' own caches on one transformer: the combination is refused in either order with a
clear message, and whichever was enabled first keeps working exactly as it did alone."""

import numpy as np
import pytest
import torch
from diffusers import FasterCacheConfig, FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

import diffroute
from diffroute.errors import PlanError
from tests.conftest import CALL_KWARGS, fresh_pipe

SEEDS = [0, 1]


def run(pipe):
    """Two images from the tiny FLUX, guidance-distilled (one transformer call per step, as FasterCache expects)."""
    kwargs = {k: v for k, v in CALL_KWARGS["flux"].items() if k not in ("negative_prompt", "true_cfg_scale")}
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    return pipe(["a red apple", "a cat"], generator=gens, num_inference_steps=6, output_type="np", **kwargs).images


def _configs(pipe):
    now = lambda: int(pipe.current_timestep)  # noqa: E731 - diffusers asks for a callback
    return {
        "fbc": FirstBlockCacheConfig(threshold=0.2),
        "pab": PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=now,
        ),
        "faster": FasterCacheConfig(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=now,
            attention_weight_callback=lambda _: 0.5,
            is_guidance_distilled=True,
        ),
    }


@pytest.mark.parametrize("cache", ["pab", "faster", "fbc"])
def test_a_diffusers_cache_enabled_after_a_plan_is_refused_and_the_plan_is_unchanged_after(cache):
    pipe = fresh_pipe("flux")
    pipe.enable_cache("fora-2")
    alone = run(pipe)
    pipe.transformer.enable_cache(_configs(pipe)[cache])
    with pytest.raises(PlanError, match="diffusers cache is enabled on this transformer"):
        run(pipe)
    pipe.transformer.disable_cache()
    assert np.array_equal(run(pipe), alone)
    pipe.disable_cache()


@pytest.mark.parametrize("cache", ["pab", "fbc"])
def test_a_plan_on_top_of_a_diffusers_cache_is_refused_and_the_cache_is_unchanged(cache):
    pipe = fresh_pipe("flux")
    vanilla = run(pipe)
    pipe.transformer.enable_cache(_configs(pipe)[cache])
    cached = run(pipe)
    with pytest.raises(PlanError, match="cannot be stacked"):
        pipe.enable_cache("fora-2")
    assert diffroute.get_executor(pipe) is None  # nothing of ours was left attached
    assert np.array_equal(run(pipe), cached)
    pipe.transformer.disable_cache()
    assert np.array_equal(run(pipe), vanilla)
