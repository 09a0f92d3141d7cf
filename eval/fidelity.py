"""Fidelity of accelerated images to full-compute images: PSNR and SSIM (torchmetrics) on uint8-quantized images."""

from __future__ import annotations

import torch
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from diffroute.imageio import to_uint8


def _unit(images) -> torch.Tensor:
    """uint8 NCHW tensor, or float NHWC array in [0, 1] (quantized once), -> float64 NCHW in [0, 1]."""
    if isinstance(images, torch.Tensor) and images.dtype == torch.uint8:
        return images.double() / 255.0
    return to_uint8(images).double() / 255.0


def psnr_metric() -> PeakSignalNoiseRatio:
    """PSNR over the whole set (one MSE over all pixels), in dB; its states reduce across processes."""
    return PeakSignalNoiseRatio(data_range=1.0).set_dtype(torch.float64)


def ssim_metric() -> StructuralSimilarityIndexMeasure:
    return StructuralSimilarityIndexMeasure(data_range=1.0).set_dtype(torch.float64)


def update_fidelity(psnr_m, ssim_m, images, reference) -> None:
    a, b = _unit(images), _unit(reference)
    psnr_m.update(a, b)
    ssim_m.update(a, b)


def psnr(images, reference) -> float:
    m = psnr_metric()
    m.update(_unit(images), _unit(reference))
    return float(m.compute())


def ssim(images, reference) -> float:
    m = ssim_metric()
    m.update(_unit(images), _unit(reference))
    return float(m.compute())
