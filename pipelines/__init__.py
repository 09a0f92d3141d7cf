"""Drop-in diffusers pipelines with diffroute built in: `enable_cache(plan)`, `disable_cache()`, `last_stats`."""

from diffroute.pipelines.routed import (
    ROUTED_PIPELINES,
    RoutedDiTPipeline,
    RoutedFluxPipeline,
    RoutedPipelineMixin,
    RoutedPixArtAlphaPipeline,
    RoutedPixArtSigmaPipeline,
    RoutedSanaPipeline,
    RoutedStableDiffusion3Pipeline,
    to_routed,
)

__all__ = [
    "ROUTED_PIPELINES",
    "RoutedDiTPipeline",
    "RoutedFluxPipeline",
    "RoutedPipelineMixin",
    "RoutedPixArtAlphaPipeline",
    "RoutedPixArtSigmaPipeline",
    "RoutedSanaPipeline",
    "RoutedStableDiffusion3Pipeline",
    "to_routed",
]
