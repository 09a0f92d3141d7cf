"""Saving images and making labelled grids (PIL), for the CLI, the demo and reports."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from diffroute.errors import NonFiniteImagesError
from diffroute.utils.io import atomic_write_bytes


def to_pil(images) -> list[Image.Image]:
    """PIL images from a float [N, H, W, 3] array in [0, 1] (rounded once to uint8) or a list of PIL images."""
    if isinstance(images, np.ndarray):
        return [Image.fromarray(a) for a in to_uint8(images).permute(0, 2, 3, 1).numpy()]
    return list(images)


def check_finite(images) -> None:
    """Raise NonFiniteImagesError if a float image batch holds NaN/inf (every image path of diffroute passes here)."""
    arr = np.asarray(images)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr.reshape(len(arr), -1))).any(axis=1).sum()) if arr.ndim > 1 else 1
        raise NonFiniteImagesError(
            f"{bad} of {len(arr)} generated images contain NaN or infinite values, so they are not reported. "
            "The sampler diverged: use fewer steps (many schedulers are unstable near their training timestep "
            "count), another scheduler, or float32 instead of half precision."
        )


def to_uint8(images: np.ndarray) -> torch.Tensor:
    """Float [N, H, W, 3] in [0, 1] -> uint8 [N, 3, H, W], quantized once by rounding (as metrics expect);
    refuses non-finite images."""
    check_finite(images)
    arr = np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def save_png(image: Image.Image, path) -> Path:
    buf = BytesIO()
    image.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def grid(rows: list[list[Image.Image]], labels: list[str] | None = None, scale: int = 1, pad: int = 2) -> Image.Image:
    """A grid with one row per list, optionally with a text label left of each row; images upscaled by `scale`."""
    w, h = rows[0][0].size
    w, h = w * scale, h * scale
    label_w = 8 + 7 * max((len(s) for s in labels), default=0) if labels else 0
    cols = max(len(r) for r in rows)
    out = Image.new("RGB", (label_w + cols * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(out)
    for i, row in enumerate(rows):
        y = pad + i * (h + pad)
        if labels:
            draw.text((4, y + h // 2 - 5), labels[i], fill="black")
        for j, img in enumerate(row):
            out.paste(img.resize((w, h), Image.NEAREST), (label_w + pad + j * (w + pad), y))
    return out
