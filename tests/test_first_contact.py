"""What a new user meets first: the top-level imports, pipelines built from a model's parts."""

import numpy as np
import torch


def test_load_pipeline_is_exported_at_the_top_level():
    import diffroute
    from diffroute.zoo import load_pipeline

    assert diffroute.load_pipeline is load_pipeline and "load_pipeline" in diffroute.__all__


def test_to_routed_on_a_vanilla_pipeline_built_from_the_emoji_parts_runs_at_the_models_size():
    from diffusers import PixArtAlphaPipeline

    import diffroute
    from diffroute.pipelines import to_routed

    zoo = diffroute.load_pipeline("emoji")
    parts = {k: zoo.components[k] for k in ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")}
    routed = to_routed(PixArtAlphaPipeline(**parts))
    assert routed.call_defaults == {"height": 32, "width": 32, "use_resolution_binning": False}
    kwargs = dict(num_inference_steps=2, output_type="np", clean_caption=False, max_sequence_length=32)
    a = routed(["grinning face"], generator=torch.Generator().manual_seed(0), **kwargs).images
    b = zoo(["grinning face"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == (1, 32, 32, 3) and np.array_equal(a, b)


def test_casting_one_loaded_pipeline_leaves_the_others_alone():
    """Pipelines loaded by name share no module that a cast or a device move of one of them would change."""
    import diffroute

    a = diffroute.load_pipeline("emoji")
    b = diffroute.load_pipeline("emoji", dtype=torch.bfloat16)
    assert b.text_encoder.dtype == torch.bfloat16 and a.text_encoder.dtype == torch.float32
    kwargs = dict(num_inference_steps=2, output_type="np")
    image = a(["grinning face"], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
