"""The published transformer configurations of the models users run, built offline with random weights.

Speed, overhead and cache memory of a static plan depend on a transformer's shapes, not on its weights' values, so a
transformer built from the real configuration costs what the real one costs. Each entry holds the configuration as
published with the hub weights (its `config.json`), the resolution and text length the family is run at, whether
its pipeline batches a CFG pair, the inputs of one transformer call, and the analytic size of what a plan caches.
Depth can be reduced (`blocks=`): every block of a family has the same shapes, so per-block figures extrapolate
linearly (a step's cost is its embeddings and final layer plus depth times one block).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RealConfig:
    """One published transformer: its class and config, how it is called, and how big its cached outputs are."""

    model_class: str
    hub_id: str  # where the real weights live (never downloaded: only the shapes are used)
    config: dict
    resolution: int  # pixels per side the family is run at
    latent_factor: int  # pixels per latent pixel (VAE) times patch size: pixels per image token side
    text_tokens: int
    text_dim: int
    cfg: bool  # the pipeline runs a CFG pair per prompt (FLUX.1-dev embeds guidance instead)
    depth_keys: tuple[str, ...] = ("num_layers",)
    extra: dict = field(default_factory=dict)

    def image_tokens(self, resolution: int | None = None) -> int:
        side = (resolution or self.resolution) // self.latent_factor
        return side * side

    def depth(self) -> tuple[int, ...]:
        return tuple(self.config[k] for k in self.depth_keys)

    def build(self, blocks: tuple[int, ...] | None = None, device="cpu", dtype=torch.bfloat16, seed: int = 0):
        """The transformer with random weights (seeded), at full depth or with `blocks` per block list."""
        import diffusers

        from diffroute.utils.quiet import quiet_loading

        cfg = dict(self.config)
        if blocks is not None:
            keys = self.depth_keys
            if len(blocks) != len(keys) or not all(1 <= b <= cfg[k] for b, k in zip(blocks, keys)):
                raise ValueError(f"{self.model_class}: blocks must be {len(keys)} counts up to {self.depth()}.")
            cfg.update(zip(self.depth_keys, blocks))
        torch.manual_seed(seed)
        with torch.device(device):
            model = getattr(diffusers, self.model_class).from_config(cfg)
        with quiet_loading():  # (diffusers' note on casting with .to(): these random weights have no fp32 modules)
            return model.to(dtype).eval().requires_grad_(False)

    def rows(self, batch: int) -> int:
        """Rows per transformer call: a CFG pair per prompt where the pipeline batches one."""
        return 2 * batch if self.cfg else batch

    def call_inputs(self, batch: int, resolution: int | None = None, device="cpu", dtype=torch.bfloat16, seed=0):
        """Keyword arguments of one transformer call as the family's pipeline makes it (less the timestep)."""
        g = torch.Generator("cpu").manual_seed(seed)
        rows, res = self.rows(batch), resolution or self.resolution

        def randn(*shape):
            return torch.randn(*shape, generator=g).to(device, dtype)

        text = randn(rows, self.text_tokens, self.text_dim)
        side = res // self.latent_factor
        c = self.config
        if self.model_class == "FluxTransformer2DModel":
            ids = torch.zeros(side, side, 3)
            ids[..., 1] += torch.arange(side)[:, None]
            ids[..., 2] += torch.arange(side)[None, :]
            return {
                "hidden_states": randn(rows, side * side, c["in_channels"]),
                "encoder_hidden_states": text,
                "pooled_projections": randn(rows, c["pooled_projection_dim"]),
                "img_ids": ids.reshape(-1, 3).to(device, dtype),
                "txt_ids": torch.zeros(self.text_tokens, 3, device=device, dtype=dtype),
                "guidance": torch.full((rows,), 3.5, device=device, dtype=torch.float32),
            }
        latent = res // (self.latent_factor // c.get("patch_size", 1))
        inputs = {"hidden_states": randn(rows, c["in_channels"], latent, latent), "encoder_hidden_states": text}
        if self.model_class == "SD3Transformer2DModel":
            inputs["pooled_projections"] = randn(rows, c["pooled_projection_dim"])
        elif self.model_class == "DiTTransformer2DModel":
            del inputs["encoder_hidden_states"]
            inputs["class_labels"] = torch.arange(rows, device=device) % c["num_embeds_ada_norm"]
        else:  # PixArt and Sana: a T5/Gemma mask
            inputs["encoder_attention_mask"] = torch.ones(rows, self.text_tokens, device=device, dtype=dtype)
            if self.model_class == "PixArtTransformer2DModel":
                inputs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
        return inputs

    def timestep(self, t: float, rows: int, device="cpu") -> torch.Tensor:
        """The timestep as the pipeline passes it (FLUX: divided by 1000)."""
        scale = 1000.0 if self.model_class == "FluxTransformer2DModel" else 1.0
        return torch.full((rows,), t / scale, device=device)

    def cache_bytes(self, kind: str, batch: int, element_bytes: int, blocks=None, resolution=None) -> int:
        """Analytic bytes a plan caches at its peak: `components` (every component's output, as FORA keeps),
        `history` (two of each, as Taylor forecasts keep) or `blocks` (each block's residual, `+blocks`)."""
        r, n, m = self.rows(batch), self.image_tokens(resolution), self.text_tokens
        d = self.width()
        depth = blocks or self.depth()
        per_block = _CACHE_FORMULAS[self.model_class]
        total = 0
        for list_index, count in enumerate(depth):
            for b in range(count):
                last = list_index == len(depth) - 1 and b == count - 1
                total += per_block(kind if kind != "history" else "components", r, n, m, d, list_index, last, self)
        return total * element_bytes * (2 if kind == "history" else 1)

    def width(self) -> int:
        c = self.config
        return c["num_attention_heads"] * c["attention_head_dim"]


def _single_stream(kind, r, n, m, d, list_index, last, cfg) -> int:
    """PixArt, Sana: attn1, attn2 and ff each give [rows, tokens, width]; a block's residual is one such tensor."""
    return (3 if kind == "components" else 1) * r * n * d


def _dit(kind, r, n, m, d, list_index, last, cfg) -> int:
    return (2 if kind == "components" else 1) * r * n * d


def _sd3(kind, r, n, m, d, list_index, last, cfg) -> int:
    """Joint blocks: attn gives (image, text), ff image, ff_context text; the last block is context-pre-only (no
    ff_context, and no text stream out)."""
    if kind == "components":
        return 2 * r * n * d + (1 if last else 2) * r * m * d
    return r * n * d + (0 if last else r * m * d)


def _flux(kind, r, n, m, d, list_index, last, cfg) -> int:
    """Double-stream blocks as SD3's; single-stream blocks run on image and text tokens together: attn and proj_out
    give [rows, n + m, width], proj_mlp [rows, n + m, mlp_ratio * width]; both kinds return (text, image)."""
    if list_index == 0:
        return (2 * r * n * d + 2 * r * m * d) if kind == "components" else r * (n + m) * d
    mlp = int(d * cfg.extra.get("mlp_ratio", 4.0))
    return r * (n + m) * (2 * d + mlp) if kind == "components" else r * (n + m) * d


_CACHE_FORMULAS = {
    "PixArtTransformer2DModel": _single_stream,
    "SanaTransformer2DModel": _single_stream,
    "DiTTransformer2DModel": _dit,
    "SD3Transformer2DModel": _sd3,
    "FluxTransformer2DModel": _flux,
}

_PIXART = dict(
    num_attention_heads=16,
    attention_head_dim=72,
    in_channels=4,
    out_channels=8,
    num_layers=28,
    cross_attention_dim=1152,
    attention_bias=True,
    patch_size=2,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    caption_channels=4096,
)

# The families as published (config.json of each hub repository), at the resolution users run them.
REAL_CONFIGS: dict[str, RealConfig] = {
    "pixart-alpha-xl": RealConfig(
        "PixArtTransformer2DModel",
        "PixArt-alpha/PixArt-XL-2-512x512",
        dict(_PIXART, sample_size=64, interpolation_scale=1, use_additional_conditions=False),
        resolution=512,
        latent_factor=16,
        text_tokens=120,
        text_dim=4096,
        cfg=True,
    ),
    "pixart-sigma-xl": RealConfig(
        "PixArtTransformer2DModel",
        "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
        dict(_PIXART, sample_size=128, interpolation_scale=2, use_additional_conditions=False),
        resolution=1024,
        latent_factor=16,
        text_tokens=300,
        text_dim=4096,
        cfg=True,
    ),
    "sd3-medium": RealConfig(
        "SD3Transformer2DModel",
        "stabilityai/stable-diffusion-3-medium-diffusers",
        dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            out_channels=16,
            pos_embed_max_size=192,
        ),
        resolution=1024,
        latent_factor=16,
        text_tokens=333,  # 77 CLIP + 256 T5
        text_dim=4096,
        cfg=True,
    ),
    "sana-1.6b": RealConfig(
        "SanaTransformer2DModel",
        "Efficient-Large-Model/Sana_1600M_1024px_diffusers",
        dict(
            in_channels=32,
            out_channels=32,
            num_attention_heads=70,
            attention_head_dim=32,
            num_layers=20,
            num_cross_attention_heads=20,
            cross_attention_head_dim=112,
            cross_attention_dim=2240,
            caption_channels=2304,
            mlp_ratio=2.5,
            attention_bias=False,
            sample_size=32,
            patch_size=1,
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        ),
        resolution=1024,
        latent_factor=32,
        text_tokens=300,
        text_dim=2304,
        cfg=True,
    ),
    "flux-dev": RealConfig(
        "FluxTransformer2DModel",
        "black-forest-labs/FLUX.1-dev",
        dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        resolution=1024,
        latent_factor=16,  # VAE 8x, then 2x2 latent patches packed into one token
        text_tokens=512,
        text_dim=4096,
        cfg=False,
        depth_keys=("num_layers", "num_single_layers"),
        extra={"mlp_ratio": 4.0},
    ),
    "dit-xl": RealConfig(
        "DiTTransformer2DModel",
        "facebook/DiT-XL-2-256",
        dict(
            num_attention_heads=16,
            attention_head_dim=72,
            in_channels=4,
            out_channels=8,
            num_layers=28,
            sample_size=32,
            patch_size=2,
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_zero",
        ),
        resolution=256,
        latent_factor=16,
        text_tokens=0,
        text_dim=1,
        cfg=True,
    ),
}
