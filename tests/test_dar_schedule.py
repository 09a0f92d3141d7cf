"""Skip schedules from DAR's weights: which blocks they reuse at which steps, their equal-compute control, and
running them on a DAR model through the executor."""

import numpy as np
import pytest
import torch
from conftest import fresh_pipe, prompts, run

from diffroute.core.arch import architecture_map
from diffroute.core.schedule import Schedule, ScheduleMismatchError
from diffroute.surgery.dar import apply_dar
from diffroute.surgery.dar_schedule import dar_skip_schedule
from diffroute.zoo.registry import load_pipeline


@pytest.fixture(scope="module")
def emoji_arch():
    return architecture_map(load_pipeline("emoji").transformer)  # 6 blocks


def _received(steps: int, blocks: int, seed: int = 0) -> torch.Tensor:
    """Random relative weights per step and source (source 0: the patch embedding)."""
    return 0.9 + 0.2 * torch.rand(steps, blocks + 1, generator=torch.Generator().manual_seed(seed))


def test_lowest_and_highest_reuse_the_blocks_picked_at_each_step(emoji_arch):
    received = _received(10, emoji_arch.num_blocks)
    received[:, 0] = 0.0  # the patch embedding is no block: never picked, however little weight it gets
    low = dar_skip_schedule(emoji_arch, received, skip=2, every=2, warmup=2, pick="lowest")
    high = dar_skip_schedule(emoji_arch, received, skip=2, every=2, warmup=2, pick="highest")
    reuse_steps = [3, 5, 7, 9]
    for sched, pick in ((low, "lowest"), (high, "highest")):
        skipped = ~sched.compute.all(dim=2)  # [steps, blocks]: a block reuses all its components or none
        assert (sched.compute.all(dim=2) | ~sched.compute.any(dim=2)).all()
        assert skipped.any(1).nonzero().flatten().tolist() == reuse_steps
        for s in reuse_steps:
            order = received[s, 1:].argsort(descending=pick == "highest")
            assert set(skipped[s].nonzero().flatten().tolist()) == set(order[:2].tolist())
            assert sched.provenance["picked"][str(s)] == sorted(order[:2].tolist())
    assert low.computed_fraction() == high.computed_fraction() == pytest.approx(1 - 4 * 2 / (10 * 6))
    assert not (~low.compute & ~high.compute).any()  # disjoint picks: 2 of 6 blocks lowest, 2 highest
    assert Schedule.from_dict(low.to_dict()).compute.equal(low.compute)  # saves and loads as a schedule file


def test_bad_weights_and_settings_are_refused(emoji_arch):
    with pytest.raises(ScheduleMismatchError, match="cover 3 blocks"):
        dar_skip_schedule(emoji_arch, _received(10, 3), skip=1)
    with pytest.raises(ValueError, match="skip must be 1 to 5"):
        dar_skip_schedule(emoji_arch, _received(10, 6), skip=6)
    with pytest.raises(ValueError, match="pick must be"):
        dar_skip_schedule(emoji_arch, _received(10, 6), skip=1, pick="middle")


def test_a_dar_model_runs_the_schedule_and_computes_what_it_says():
    name = "pixart-alpha"
    pipe = fresh_pipe(name)
    agg = apply_dar(pipe.transformer, "scratch")
    with torch.no_grad():
        agg.queries.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    ref = run(pipe, name, prompts(name), [0, 1], steps=6)
    arch = architecture_map(pipe.transformer)
    pipe.enable_cache(Schedule.full(arch, 6))  # computing everything is the model itself, bitwise
    assert np.array_equal(run(pipe, name, prompts(name), [0, 1], steps=6), ref)
    sched = dar_skip_schedule(arch, _received(6, arch.num_blocks), skip=1, every=2, warmup=1)
    pipe.enable_cache(sched)
    out = run(pipe, name, prompts(name), [0, 1], steps=6)
    stats = pipe.last_stats
    computed = torch.tensor(stats.compute_map, dtype=torch.float32)  # tiny PixArt blocks have every component
    assert torch.equal(computed.bool(), sched.compute)
    assert stats.computed_fraction == pytest.approx(sched.computed_fraction())
    assert np.abs(out - ref).max() > 1e-4  # the reused blocks' stale outputs reach the image
