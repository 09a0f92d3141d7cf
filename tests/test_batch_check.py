"""Checks decided per batch (`-batch`): `fbcache-T-batch` is diffusers' FirstBlockCache (the same images, at a
threshold where it skips some steps and computes others), and a checked schedule decided per batch never splits its
batch, while the same check per sample does."""

import numpy as np
import pytest
from conftest import fresh_pipe, prompts, run

import diffroute
from diffroute.core.schedule import Schedule
from diffroute.errors import InputError, PlanError
from diffroute.eval import peers
from diffroute.plans import resolve_plan

NAME = "pixart-alpha"
SEEDS = [0, 1]
THRESHOLDS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


def _skipping_threshold(pipe) -> float:
    """A threshold at which fbcache-T-batch skips some steps and computes others (random weights: found by trying)."""
    for t in THRESHOLDS:
        diffroute.apply(pipe, f"fbcache-{t}-batch")
        run(pipe, NAME, prompts(NAME), SEEDS)
        if 0.0 < 1.0 - pipe.last_stats.computed_fraction < 0.5:
            return t
    pytest.fail("no threshold made fbcache-T-batch skip part of the steps")


def _block_one_ran(pipe, generate) -> list[bool]:
    """Per transformer call of `generate()`: did block 1's self-attention run (not reused)?"""
    ran: list[bool] = []
    hooks = [
        pipe.transformer.register_forward_pre_hook(lambda *_: ran.append(False)),
        pipe.transformer.transformer_blocks[1].attn1.register_forward_pre_hook(lambda *_: ran.__setitem__(-1, True)),
    ]
    try:
        generate()
    finally:
        for h in hooks:
            h.remove()
    return ran


def test_fbcache_per_batch_is_diffusers_first_block_cache():
    pipe = fresh_pipe(NAME)
    t = _skipping_threshold(pipe)
    ours = []
    ours_ran = _block_one_ran(pipe, lambda: ours.append(run(pipe, NAME, prompts(NAME), SEEDS)))
    peers.activate(pipe, f"diffusers:fbc-{t}")  # diffusers' own hooks, with the cache context it asks for
    theirs = []
    theirs_ran = _block_one_ran(pipe, lambda: theirs.append(run(pipe, NAME, prompts(NAME), SEEDS)))
    peers.deactivate(pipe)
    # the same decision at every step (some skip, some compute) ...
    assert ours_ran == theirs_ran and True in ours_ran and False in ours_ran
    # ... and so the same images; only the order of the residual adds differs (one per block vs their sum)
    np.testing.assert_allclose(ours[0], theirs[0], atol=1e-6)


def test_a_checked_schedule_decided_per_batch_never_splits_its_batch():
    pipe = fresh_pipe(NAME)
    split = None
    for t in THRESHOLDS:  # a threshold at which the same check per sample splits the batch
        diffroute.apply(pipe, f"fora-3+blocks+fb{t}")
        run(pipe, NAME, prompts(NAME), SEEDS)
        if pipe.last_stats.plan_info["mixed_steps"]:
            split = t
            break
    assert split is not None, "no threshold split the batch per sample"
    diffroute.apply(pipe, f"fora-3+blocks+fb{split}-batch")
    run(pipe, NAME, prompts(NAME), SEEDS)
    info = pipe.last_stats.plan_info
    rows = 2 * len(prompts(NAME))  # CFG doubles the batch
    assert info["per"] == "batch" and info["mixed_steps"] == 0 and info["rows_checked"] > 0
    assert info["rows_followed"] % rows == 0  # whole batches follow or compute, never part of one


def test_check_per_is_validated_in_files_and_names(tmp_path):
    import json

    arch = diffroute.architecture_map(fresh_pipe(NAME).transformer)
    s = Schedule.fora(arch, 4, 2)
    d = {**s.to_dict(), "check": ["inf", 0.1, 0.1, 0.1], "check_per": "batch"}
    (tmp_path / "ok.json").write_text(json.dumps(d))
    loaded = Schedule.load(tmp_path / "ok.json")
    assert loaded.check_per == "batch" and loaded.to_dict()["check_per"] == "batch"
    assert diffroute.schedule_plan(loaded).per == "batch"
    (tmp_path / "bad.json").write_text(json.dumps({**d, "check_per": "image"}))
    with pytest.raises(InputError, match="'check_per' must be one of 'sample', 'prompt', 'batch'"):
        Schedule.load(tmp_path / "bad.json")
    assert resolve_plan("fbcache-0.2-batch").per == "batch" and resolve_plan("dbcache-F1B0-0.2-batch").per == "batch"
    with pytest.raises(PlanError, match="Unknown plan"):
        resolve_plan("fbcache-0.2-image")
    from diffroute.cli import search
    from diffroute.core.schedule import CHECK_PER

    assert search.CHECK_PER == CHECK_PER  # (the CLI spells them out so that --help loads no torch)
