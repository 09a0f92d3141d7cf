"""Loading image folders for metrics, with every problem reported before any work starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def list_images(folder: str | Path) -> list[Path]:
    """Sorted image files of a folder; refuses a missing or empty folder and files that are not images."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist (or is not a folder).")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    others = [p.name for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if others and not images:
        raise ValueError(f"{str(folder)!r} holds no images, only other files (e.g. {others[:3]}).")
    if not images:
        raise ValueError(f"image folder {str(folder)!r} is empty: metrics need at least 2 images.")
    return images


def check_images(paths: list[Path]) -> tuple[int, int]:
    """Open every file's header: all must be images of one size. Returns (width, height)."""
    sizes = {}
    for p in paths:
        try:
            with Image.open(p) as im:
                sizes.setdefault(im.size, []).append(p.name)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{str(p)!r} is not a readable image ({e.__class__.__name__}).") from e
    if len(sizes) > 1:
        desc = "; ".join(f"{w}x{h}: {len(n)} files (e.g. {n[0]})" for (w, h), n in sizes.items())
        raise ValueError(f"images have mixed sizes ({desc}); resize them to one size first.")
    return next(iter(sizes))


def load_uint8(paths: list[Path]) -> torch.Tensor:
    """uint8 [N, 3, H, W] (RGB; alpha composited on white)."""
    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(_rgb8(im, p))
        except (UnidentifiedImageError, OSError) as e:  # e.g. a truncated file: its header reads, its pixels not
            raise ValueError(f"{str(p)!r} is not a readable image ({e}).") from None
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def _rgb8(im: Image.Image, path: Path) -> np.ndarray:
    """[H, W, 3] uint8 RGB of an image of any mode: alpha composited on white; 16-bit greys scaled to 8 bits (PIL's
    own conversion clips them at 255, which turned nearly every pixel white)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        grey = np.asarray(im, dtype=np.float64)
        if grey.min() < 0 or grey.max() > 65535:
            raise ValueError(f"{str(path)!r} holds 32-bit integer pixels outside 16 bits: save it as 8-bit PNG.")
        grey = np.rint(grey / 257.0).astype(np.uint8)  # 65535 -> 255
        return np.repeat(grey[..., None], 3, axis=-1)
    if im.mode == "F":
        raise ValueError(f"{str(path)!r} holds floating-point pixels of unknown range: save it as 8-bit PNG.")
    if im.mode in ("RGBA", "LA", "P", "PA"):
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def load_folder(folder: str | Path) -> torch.Tensor:
    paths = list_images(folder)
    check_images(paths)
    return load_uint8(paths)
