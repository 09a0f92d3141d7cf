"""Routed pipelines load and save like the diffusers pipelines they extend."""

import numpy as np
from conftest import run
from diffusers import DiffusionPipeline, PixArtAlphaPipeline

from diffroute.pipelines import RoutedPixArtAlphaPipeline, RoutedPixArtSigmaPipeline, to_routed


def test_from_pretrained_and_from_pipe_return_the_subclass(tiny_pipes, tmp_path):
    pipe = tiny_pipes("pixart-alpha")
    pipe.save_pretrained(tmp_path / "p")
    vanilla = DiffusionPipeline.from_pretrained(tmp_path / "p")  # saved under the vanilla class name
    assert type(vanilla) is PixArtAlphaPipeline
    routed = RoutedPixArtAlphaPipeline.from_pretrained(tmp_path / "p")
    assert type(routed) is RoutedPixArtAlphaPipeline
    sigma = RoutedPixArtSigmaPipeline.from_pipe(routed)
    assert type(sigma) is RoutedPixArtSigmaPipeline and sigma.transformer is routed.transformer
    assert type(to_routed(vanilla)) is RoutedPixArtAlphaPipeline
    routed.set_progress_bar_config(disable=True)
    vanilla.set_progress_bar_config(disable=True)
    routed.enable_cache("full")
    assert np.array_equal(run(routed, "pixart-alpha", ["a cat"], [0]), run(vanilla, "pixart-alpha", ["a cat"], [0]))
