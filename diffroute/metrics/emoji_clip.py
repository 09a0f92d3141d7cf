"""emoji-CLIP: a small image encoder trained against frozen MiniLM caption embeddings (locked-text tuning, LiT).

It gives the domain's CLIP score (100 * max(cos, 0) between image and caption embeddings) and features for FD.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


class ResBlock(nn.Module):
    """Pre-activation residual block (GroupNorm, SiLU, 3x3 conv) twice."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(8, ch),
            nn.SiLU(),
            nn.Conv2d(ch, ch, 3, padding=1),
            nn.GroupNorm(8, ch),
            nn.SiLU(),
            nn.Conv2d(ch, ch, 3, padding=1),
        )

    def forward(self, x):
        return x + self.body(x)


class EmojiCLIP(ModelMixin, ConfigMixin):
    """Image tower of emoji-CLIP; the text tower is the frozen all-MiniLM-L6-v2 (see diffroute.metrics.text)."""

    @register_to_config
    def __init__(self, width: int = 64, embed_dim: int = 384, image_size: int = 32):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1),
            ResBlock(w),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1),
            ResBlock(2 * w),  # 16x16
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1),
            ResBlock(4 * w),  # 8x8
            nn.Conv2d(4 * w, 4 * w, 3, stride=2, padding=1),
            ResBlock(4 * w),  # 4x4
            nn.GroupNorm(8, 4 * w),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.proj = nn.Linear(4 * w, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.659))  # log(1/0.07), as CLIP

    @property
    def feature_dim(self) -> int:
        return 4 * self.config.width

    def _prep(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] (or uint8) -> normalised input at the training size."""
        if images.dtype == torch.uint8:
            images = images.float() / 255.0
        size = self.config.image_size
        if images.shape[-1] != size or images.shape[-2] != size:
            images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        return images.to(self.dtype) * 2 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled image features [N, 4*width] (the feature space for FD)."""
        return self.net(self._prep(images))

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings [N, embed_dim], comparable with MiniLM sentence embeddings."""
        return nn.functional.normalize(self.proj(self.features(images)), dim=-1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_embeds(images)


def clip_score(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score: 100 * max(cos, 0)."""
    return 100 * (image_embeds * text_embeds).sum(-1).clamp(min=0)


# Shipped with the zoo's weights (a data folder, not a code dependency on the zoo).
EMOJI_CLIP_WEIGHTS = Path(__file__).parents[1] / "zoo" / "weights" / "emoji-clip"


def load_emoji_clip() -> EmojiCLIP:
    """The emoji-CLIP image tower (fp32, eval mode)."""
    if not EMOJI_CLIP_WEIGHTS.exists():
        raise FileNotFoundError(f"{EMOJI_CLIP_WEIGHTS} is missing: reinstall diffroute, or run `make train`.")
    return EmojiCLIP.from_pretrained(EMOJI_CLIP_WEIGHTS).float().eval()
