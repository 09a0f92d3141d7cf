"""Fidelity of accelerated images to full-compute images: PSNR and SSIM on uint8-quantized images (torchmetrics)."""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _quantized(images: np.ndarray) -> torch.Tensor:
    """[N, H, W, 3] floats in [0, 1] -> [N, 3, H, W] floats on the uint8 grid (rounded once), in [0, 1]."""
    q = np.clip(np.round(np.asarray(images, dtype=np.float64) * 255.0), 0, 255) / 255.0
    return torch.from_numpy(q).permute(0, 3, 1, 2)


def psnr(images: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB over the whole set (identical sets give +inf)."""
    return float(peak_signal_noise_ratio(_quantized(images), _quantized(reference), data_range=1.0))


def ssim(images: np.ndarray, reference: np.ndarray) -> float:
    return float(structural_similarity_index_measure(_quantized(images), _quantized(reference), data_range=1.0))
