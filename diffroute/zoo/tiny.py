"""Tiny random-weight versions of the real diffusers pipelines, built offline (as diffusers' own tests do)."""

from __future__ import annotations

import string

import torch

from diffroute.zoo.builders import kl_vae, pixart_transformer


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>"] + [f"\u2581{c}" for c in string.ascii_lowercase] + list(string.ascii_lowercase)
    pieces += list(string.digits + string.punctuation)
    return T5Tokenizer(vocab=[(p, -float(i)) for i, p in enumerate(pieces)], extra_ids=0)


def _clip_tokenizer():
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = list(bytes_to_unicode().values())
    vocab = {ch: i for i, ch in enumerate(alphabet + [a + "</w>" for a in alphabet])}
    for tok in ("<|startoftext|>", "<|endoftext|>"):
        vocab[tok] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _t5_encoder(d_model: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(
        T5Config(
            vocab_size=128,
            d_model=d_model,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    ).eval()


def _clip_text(projection: bool, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=hidden,
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        max_position_embeddings=77,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).eval()


def _vae(latent_channels: int = 4, blocks: int = 2, **extra):
    torch.manual_seed(0)
    return kl_vae((8,) * blocks, 8, latent_channels, **extra).eval()


def tiny_pixart(sigma: bool = False, num_layers: int = 2, hidden: int = 32):
    """PixArt-α (or Σ) with a 2-layer transformer; 16x16 images, 8x8 latents."""
    from diffusers import DPMSolverMultistepScheduler

    from diffroute.pipelines import RoutedPixArtAlphaPipeline, RoutedPixArtSigmaPipeline

    torch.manual_seed(0)
    transformer = pixart_transformer(num_layers, hidden, 16, caption_channels=32, out_channels=8).eval()
    cls = RoutedPixArtSigmaPipeline if sigma else RoutedPixArtAlphaPipeline
    return cls(
        tokenizer=_t5_tokenizer(),
        text_encoder=_t5_encoder(),
        vae=_vae(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def tiny_dit():
    """Class-conditional DiT, DDIM scheduler (no step counter: exercises the timestep-value path)."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from diffroute.pipelines import RoutedDiTPipeline

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        out_channels=8,
        num_embeds_ada_norm=1000,
    ).eval()
    return RoutedDiTPipeline(
        transformer=transformer, vae=_vae(), scheduler=DDIMScheduler(clip_sample=False), id2label={0: "cat", 1: "dog"}
    )


def tiny_sd3():
    """SD3 with one dual-attention layer and a context-pre-only last block; no T5 (SD3 allows that)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from diffroute.pipelines import RoutedStableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        dual_attention_layers=(0,),
    ).eval()
    return RoutedStableDiffusion3Pipeline(
        transformer=transformer,
        vae=_vae(shift_factor=0.0609, scaling_factor=1.5035),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=_clip_text(True),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_clip_text(True),
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )


def tiny_flux():
    """FLUX.1 with one double-stream and one single-stream block (guidance-distilled)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    from diffroute.pipelines import RoutedFluxPipeline

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,
    ).eval()
    return RoutedFluxPipeline(
        transformer=transformer,
        vae=_vae(latent_channels=4, blocks=2, shift_factor=0.0609, scaling_factor=1.5035),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=_clip_text(False),
        tokenizer=_clip_tokenizer(),
        text_encoder_2=_t5_encoder(),
        tokenizer_2=_t5_tokenizer(),
    )


def tiny_sana():
    """Sana with 2 blocks and a tiny Gemma-2 text encoder."""
    from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

    from diffroute.pipelines import RoutedSanaPipeline

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=4,
        cross_attention_dim=8,
        caption_channels=8,
        sample_size=8,
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=[1, 1],
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    torch.manual_seed(0)
    text_encoder = Gemma2Model(
        Gemma2Config(
            head_dim=16,
            hidden_size=8,
            intermediate_size=16,
            num_attention_heads=2,
            num_hidden_layers=1,
            num_key_value_heads=1,
            vocab_size=300,
            pad_token_id=0,
        )
    ).eval()
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>"] + list(
        string.ascii_lowercase + string.digits + string.punctuation + " "
    )
    tokenizer = GemmaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[])
    return RoutedSanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
    )


# Factory dict, DiT-style: name -> builder.
TINY_PIPELINES = {
    "pixart-alpha": tiny_pixart,
    "pixart-sigma": lambda: tiny_pixart(sigma=True),
    "dit": tiny_dit,
    "sd3": tiny_sd3,
    "flux": tiny_flux,
    "sana": tiny_sana,
}


def tiny_pixart_demo():
    """PixArt-α at the embedded model's size (6 blocks of width 192, 32x32 images, 8x8 latents), random weights."""
    from diffusers import DPMSolverMultistepScheduler

    from diffroute.pipelines import RoutedPixArtAlphaPipeline

    torch.manual_seed(0)
    transformer = pixart_transformer(6, 192, 64, caption_channels=32, out_channels=8).eval()
    torch.manual_seed(0)
    return RoutedPixArtAlphaPipeline(
        tokenizer=_t5_tokenizer(),
        text_encoder=_t5_encoder(),
        vae=kl_vae((32, 64, 64), 16).eval(),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
