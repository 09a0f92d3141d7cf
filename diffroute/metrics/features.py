"""Feature extractors for Fréchet distances, as torch modules that torchmetrics' FID/KID accept (uint8 NCHW in).

Each has `extractor_id` and `resize` so that every score records how it was made.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


class EmojiClipFeatures(nn.Module):
    """emoji-CLIP pooled image features; resizes to 32x32 with antialiased bilinear."""

    extractor_id = "emoji-clip/pooled"
    resize = "bilinear-antialias-32"

    def __init__(self, model=None):
        super().__init__()
        if model is None:
            from diffroute.metrics.emoji_clip import load_emoji_clip

            model = load_emoji_clip()
        self.model = model
        self.num_features = model.feature_dim  # torchmetrics reads this instead of probing a 299x299 image

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(images).double()


def load_clip_model(name: str):
    """A transformers CLIPModel from a local folder or hub id, or one clear error saying what to give instead."""
    from transformers import CLIPModel

    if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(f"CLIP model folder {name!r} does not exist; give a folder saved by CLIPModel.")
    try:
        return CLIPModel.from_pretrained(name).eval()
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"cannot load a CLIP model from {name!r} ({first}). Give a local folder saved by "
            "transformers' CLIPModel, or a hub id on a machine that reaches the hub (HF_HUB_OFFLINE unset)."
        ) from None


class HFClipFeatures(nn.Module):
    """Image embeddings of a transformers CLIPModel (local folder or hub id), resized as its processor does."""

    resize = "clip-processor-bicubic-224"

    def __init__(self, name: str):
        super().__init__()
        self.model = load_clip_model(name)
        self.extractor_id = f"clip:{name}/image_embeds"
        self.size = self.model.config.vision_config.image_size
        self.num_features = self.model.config.projection_dim
        self.register_buffer("mean", torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bicubic", antialias=True).clamp(0, 1)
        out = self.model.get_image_features(pixel_values=(x - self.mean) / self.std)
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return out.double()


def inception_features(weights: str | None = None) -> nn.Module:
    """torchmetrics' FID InceptionV3 (needs the optional `fid` extra: torch-fidelity, which pulls torchvision)."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as e:  # pragma: no cover - depends on the extra
        raise ImportError("Inception features need `pip install diffroute[fid]` (torch-fidelity).") from e
    path = Path(weights) if weights else Path(os.environ.get("TORCH_HOME", Path.home() / ".cache/torch"))
    found = path if path.is_file() else next(iter(sorted(path.rglob("pt_inception-2015-12-05*.pth"))), None)
    if found is None:
        raise FileNotFoundError(
            "Inception weights (pt_inception-2015-12-05-6726825d.pth) not found under "
            f"{str(path)!r}: download them once where the internet is reachable and pass --weights FILE or set "
            "TORCH_HOME; or use --features emoji-clip / clip:<dir>."
        )
    try:
        import torch_fidelity  # noqa: F401
    except ImportError as e:
        raise ImportError("Inception features need `pip install diffroute[fid]` (torch-fidelity).") from e
    module = NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(found)
    )
    module.extractor_id = "inception-v3-compat/2048"
    module.resize = "torch-fidelity-bilinear-299"
    return module


def feature_extractor(spec: str, weights: str | None = None) -> nn.Module:
    """`inception`, `clip:<local dir or hub id>` or `emoji-clip`."""
    if spec == "emoji-clip":
        return EmojiClipFeatures()
    if spec == "inception":
        return inception_features(weights)
    if spec.startswith("clip:") and len(spec) > 5:
        return HFClipFeatures(spec[5:])
    raise ValueError(f"unknown features {spec!r}; use inception, clip:<local dir or hub id>, or emoji-clip.")
