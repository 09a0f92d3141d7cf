"""Every shipped model runs every plan the app offers for it (per-sample plans run blocks for some samples only:
every per-sample input a module reads, such as an MoE router's timestep, must follow those rows)."""

import numpy as np
import pytest
import torch
from conftest import run_cli

import diffroute
from diffroute.zoo.shipped import plans_for

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


@pytest.mark.parametrize(
    "model, plan, dtype, ok",
    [
        ("emoji", "emoji-elastic:elastic", None, False),  # the fine-tuned variant's router on the base weights
        ("emoji", "emoji-elastic:elastic", torch.bfloat16, False),
        ("emoji-elastic", "emoji-elastic:elastic", None, True),
        ("emoji-elastic", "emoji-elastic:elastic", torch.bfloat16, True),  # same weights, cast: still its backbone
        ("emoji", "emoji:l2c", None, True),  # trained in bf16, run in fp32
        ("emoji-elastic", "emoji:l2c", None, False),
    ],
)
def test_a_router_runs_only_on_the_backbone_it_was_trained_on(model, plan, dtype, ok):
    from diffroute.errors import PlanError

    pipe = diffroute.load_pipeline(model, dtype=dtype)
    if ok:
        pipe.enable_cache(plan)
    else:
        with pytest.raises(PlanError, match="was trained on other weights than this model's"):
            pipe.enable_cache(plan)


def test_training_records_the_backbone_probe(tmp_path):

    from diffroute.routers import load_router

    args = ["train", "l2c", "--model", "tiny-pixart", "--steps", "4", "--n", "2", "--prompts-per-batch", "2"]
    args += ["--iters", "1", "--prompt", "a red apple", "--prompt", "a cat", "--out", str(tmp_path / "run")]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    router = load_router(tmp_path / "run" / "router")
    assert len(router.config.backbone_probe) == 256 and router.config.backbone_dtype == "float32"
