"""Every shipped model runs every plan the app offers for it (per-sample plans run blocks for some samples only:
every per-sample input a module reads, such as an MoE router's timestep, must follow those rows)."""

import numpy as np
import pytest
import torch

import diffroute
from diffroute.shipped import plans_for

MODELS = ("emoji", "emoji-moe", "emoji-elastic")


@pytest.fixture(scope="module")
def pipes():
    cache = {}

    def get(model):
        if model not in cache:
            cache[model] = diffroute.load_pipeline(model)
            cache[model].set_progress_bar_config(disable=True)
        return cache[model]

    return get


@pytest.mark.parametrize("model", MODELS)
def test_every_offered_plan_runs_on_every_shipped_model(pipes, model):
    pipe = pipes(model)
    prompts = ["grinning face", "flag: japan"]  # two samples: per-sample plans can split the batch
    failures = []
    for plan in plans_for(model):
        pipe.enable_cache(plan)
        try:
            gens = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
            images = pipe(prompts, num_inference_steps=20, output_type="np", generator=gens).images
            if not np.isfinite(images).all():
                failures.append(f"{plan}: non-finite images")
        except Exception as e:  # collect them all: one report per model
            failures.append(f"{plan}: {type(e).__name__}: {e}")
        finally:
            pipe.disable_cache()
    assert not failures, "\n".join(failures)

