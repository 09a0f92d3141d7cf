"""The expert router of DDM: p(cluster | x_t, t, caption), a small transformer over the noisy latent's patches.

DDM's router is a DiT-B/2 conditioned like the denoiser, whose learned CLS token feeds a linear head with K logits
(§3.3). Ours is the same shape at our scale: a CLS token, one token for the pooled caption embedding and one per
latent patch, the sinusoidal timestep embedding added to every token, `layers` pre-norm encoder blocks (torch's
own), a linear head on the CLS token. The default (width 96, 2 blocks) costs about 1% of one emoji expert's FLOPs
per step.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn


class ExpertRouter(ModelMixin, ConfigMixin):
    """Logits [N, K] over the experts for noisy latents, timesteps (the scheduler's units) and caption tokens."""

    @register_to_config
    def __init__(
        self,
        num_experts: int = 2,
        in_channels: int = 4,
        sample_size: int = 8,
        caption_channels: int = 384,
        width: int = 96,
        layers: int = 2,
        heads: int = 4,
        patch: int = 2,
    ):
        super().__init__()
        if sample_size % patch:
            raise ValueError(f"the router's patch ({patch}) must divide the latent size ({sample_size}).")
        tokens = (sample_size // patch) ** 2
        self.patchify = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.caption = nn.Linear(caption_channels, width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        self.pos = nn.Parameter(torch.randn(1, tokens + 2, width) * 0.02)
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_experts)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, caption: torch.Tensor, mask=None) -> torch.Tensor:
        """latents [N, C, H, W], timestep [N], caption token embeddings [N, L, D] with their mask [N, L] (1: real)."""
        x = self.patchify(latents.to(self.dtype)).flatten(2).transpose(1, 2)
        pooled = pool_caption(caption.to(self.dtype), mask)
        n = x.shape[0]
        x = torch.cat([self.cls.expand(n, -1, -1), self.caption(pooled)[:, None], x], 1) + self.pos
        temb = get_timestep_embedding(timestep.reshape(-1).float(), self.config.width).to(x.dtype)
        x = self.blocks(x + self.time(temb)[:, None])
        return self.head(self.norm(x[:, 0])).float()


def pool_caption(tokens: torch.Tensor, mask=None) -> torch.Tensor:
    """Mean of the caption's real tokens (all tokens without a mask)."""
    if mask is None:
        return tokens.mean(1)
    m = mask.to(tokens.dtype)[..., None]
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1)
