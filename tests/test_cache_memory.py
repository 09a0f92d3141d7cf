"""Cache memory: `last_stats` reports the peak cache bytes and the analytic bound, and the peak stays within it."""

import pytest
import torch
from conftest import prompts, run

import diffroute
from diffroute.core.cache import tensors_of


def _bytes_per_step(pipe, name) -> int:
    """Bytes of all component outputs of one denoising step (all CFG calls), measured on a vanilla run with plain
    forward hooks: the bound is one such output per component per branch (times two for Taylor)."""
    arch = diffroute.architecture_map(pipe.transformer)
    total = [0]

    def hook(module, args, out):
        total[0] += sum(t.numel() * t.element_size() for t in tensors_of(out) if t is not None)

    handles = [m.register_forward_hook(hook) for row in arch.modules for m in row if m is not None]
    try:
        run(pipe, name, prompts(name), [0, 1])
    finally:
        for h in handles:
            h.remove()
    steps = 6
    assert total[0] % steps == 0
    return total[0] // steps


@pytest.mark.parametrize("name", ["pixart-alpha", "flux", "sd3"])
def test_peak_cache_bytes_within_the_analytic_bound(name, tiny_pipes):
    pipe = tiny_pipes(name)
    diffroute.remove(pipe)
    per_step = _bytes_per_step(pipe, name)
    for plan, history, fills in (("full", 1, False), ("fora-2", 1, True), ("taylor-3", 2, True)):
        diffroute.apply(pipe, plan)
        run(pipe, name, prompts(name), [0, 1])
        stats = pipe.last_stats
        assert stats.peak_cache_bytes <= history * per_step, plan
        if fills:  # every component is reused at some step: the cache reaches its bound
            assert stats.cache_bound_bytes == history * per_step, plan
            assert stats.peak_cache_bytes == stats.cache_bound_bytes, plan
        else:  # nothing is ever reused, so nothing is kept
            assert stats.peak_cache_bytes == stats.cache_bound_bytes == 0
        assert stats.max_memory_allocated_bytes is None  # CUDA only
    diffroute.remove(pipe)


def test_cache_bytes_halve_in_bf16():
    from diffroute.zoo.tiny import TINY_PIPELINES

    pipe = TINY_PIPELINES["pixart-alpha"]()
    pipe.set_progress_bar_config(disable=True)
    diffroute.apply(pipe, "fora-2")
    run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1])
    fp32 = pipe.last_stats.peak_cache_bytes
    pipe.to(dtype=torch.bfloat16)
    run(pipe, "pixart-alpha", prompts("pixart-alpha"), [0, 1])
    assert pipe.last_stats.peak_cache_bytes * 2 == fp32


def test_the_bound_counts_the_summed_residual_of_a_run_of_blocks(tiny_pipes):
    """`+spans` keeps, besides each block's residual, their sum for the run: with both blocks of the tiny model in
    one run, one more residual's bytes than `+blocks`, and the peak reaches that bound."""
    name = "pixart-alpha"
    pipe = tiny_pipes(name)
    bounds = {}
    for plan in ("fora-3+blocks", "fora-3+spans"):
        diffroute.apply(pipe, plan)
        run(pipe, name, prompts(name), [0, 1])
        stats = pipe.last_stats
        assert stats.peak_cache_bytes == stats.cache_bound_bytes > 0, plan
        bounds[plan] = stats.cache_bound_bytes
    diffroute.remove(pipe)
    assert bounds["fora-3+spans"] * 2 == bounds["fora-3+blocks"] * 3
