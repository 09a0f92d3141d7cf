"""Fidelity of accelerated images to full-compute images: PSNR and SSIM (torchmetrics) on uint8-quantized images."""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.utilities import dim_zero_cat

from diffroute.utils.imageio import to_uint8


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


PSNR_CAP_DB = 60.0  # per-image PSNR is capped: an identical image (infinite PSNR) must not dominate a mean


class PerImageMSE(Metric):
    """Per-image mean squared error against the reference, kept per image with its sample index (gathered across
    processes, then put in index order), so that the set's PSNR can be reported both ways papers do: pooled (one MSE
    over all pixels) and as the mean of per-image PSNRs capped at PSNR_CAP_DB, each with a bootstrap band
    (2.5-97.5% percentiles over image resamples), and two plans can be compared image by image."""

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("mse", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(self, images: torch.Tensor, reference: torch.Tensor, indices=None) -> None:
        self.mse.append(per_image_mse(images, reference))
        start = sum(len(m) for m in self.mse[:-1])  # without indices: the order of the updates
        indices = range(start, start + len(images)) if indices is None else indices
        self.index.append(torch.as_tensor(list(indices), device=self.device))

    def compute(self) -> torch.Tensor:
        return dim_zero_cat(self.mse)[dim_zero_cat(self.index).argsort()]


def per_image_mse(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """One MSE per image of two [N, C, H, W] batches in [0, 1] (float64)."""
    return ((images - reference) ** 2).flatten(1).mean(1).double()


def per_image_psnr(images, reference) -> torch.Tensor:
    """PSNR of each image against its reference (uint8-quantized as everywhere here), capped at PSNR_CAP_DB."""
    return psnr_of_mse(per_image_mse(_unit(images), _unit(reference)))


def psnr_of_mse(mse: torch.Tensor) -> torch.Tensor:
    """dB for data range 1; capped at PSNR_CAP_DB."""
    return (-10 * torch.log10(mse.clamp_min(1e-30))).clamp_max(PSNR_CAP_DB)


def psnr_summary(mse: torch.Tensor, n_boot: int = 1000, seed: int = 0) -> dict:
    """Pooled PSNR (uncapped; None when every image is identical) and mean per-image PSNR (capped), with bootstrap
    bands (2.5-97.5% percentiles over `n_boot` resamples of the images, fixed seed: reproducible)."""
    mse = mse.double().sort().values  # the order processes gathered the images in must not change the intervals
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(mse), (n_boot, len(mse)), generator=g)
    boot = mse[idx]
    pooled = boot.mean(1)
    per_image = psnr_of_mse(boot).mean(1)

    def ci(x: torch.Tensor) -> list[float]:
        return [float(torch.quantile(x, 0.025)), float(torch.quantile(x, 0.975))]

    mean_mse = float(mse.mean())
    pooled_db = None if mean_mse == 0 else float(-10 * torch.log10(torch.tensor(mean_mse)))
    return {
        "psnr_vs_full_db": pooled_db,
        "psnr_vs_full_ci95": None if pooled_db is None else ci(-10 * torch.log10(pooled.clamp_min(1e-30))),
        "psnr_mean_vs_full_db": float(psnr_of_mse(mse).mean()),
        "psnr_mean_vs_full_ci95": ci(per_image),
    }


def paired_psnr_difference(mse_a: torch.Tensor, mse_b: torch.Tensor, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean over images of (per-image PSNR of a) - (per-image PSNR of b), both capped, with the bootstrap
    band of that mean (2.5-97.5% percentiles, the same image resamples for both: paired); `mse_*` in sample order.
    A band that excludes 0 says a is better (or worse) than b on these prompts beyond the spread of the images."""
    if mse_a.shape != mse_b.shape:
        raise ValueError(f"paired PSNR needs the same images: {len(mse_a)} vs {len(mse_b)}")
    diff = psnr_of_mse(mse_a.double()) - psnr_of_mse(mse_b.double())
    g = torch.Generator().manual_seed(seed)
    boot = diff[torch.randint(len(diff), (n_boot, len(diff)), generator=g)].mean(1)
    band = [float(torch.quantile(boot, 0.025)), float(torch.quantile(boot, 0.975))]
    return {"psnr_mean_diff_db": float(diff.mean()), "psnr_mean_diff_ci95": band}


def update_fidelity(mse_m, ssim_m, images, reference, indices=None) -> None:
    a, b = _unit(images), _unit(reference)
    mse_m.update(a, b, indices)
    ssim_m.update(a, b)


def psnr(images, reference) -> float:
    m = psnr_metric()
    m.update(_unit(images), _unit(reference))
    return float(m.compute())


def ssim(images, reference) -> float:
    m = ssim_metric()
    m.update(_unit(images), _unit(reference))
    return float(m.compute())
