"""Builders of the PixArt-α transformer and the KL VAE at the sizes diffroute uses (tiny tests, demo, emoji model)."""

from __future__ import annotations


def pixart_transformer(
    num_layers: int, hidden: int, head_dim: int, caption_channels: int, out_channels: int, sample_size: int = 8
):
    """PixArt-α transformer on `sample_size`² latents of 4 channels, patch 1, no resolution conditioning."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        sample_size=sample_size,
        num_layers=num_layers,
        patch_size=1,
        attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        caption_channels=caption_channels,
        in_channels=4,
        out_channels=out_channels,
        cross_attention_dim=hidden,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
    )


def kl_vae(block_out_channels: tuple[int, ...], norm_num_groups: int, latent_channels: int = 4, **extra):
    """AutoencoderKL for 32x32 RGB; each block after the first halves the resolution."""
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1,
        norm_num_groups=norm_num_groups,
        sample_size=32,
        **extra,
    )
