"""Scoring one schedule on calibration prompts: analytic cost, and quality against the full-compute images."""

from __future__ import annotations

import numpy as np
import torch

import diffroute
from diffroute.eval import frechet
from diffroute.eval.fidelity import psnr
from diffroute.imageio import to_uint8

from .cost import CostModel


class ScheduleEvaluator:
    """Generates the calibration prompts with a schedule (fixed seeds) and compares with full compute."""

    def __init__(self, pipe, prompts: list[str], seed: int, call_kwargs: dict, cost: CostModel, feature=None):
        self.pipe, self.prompts, self.seed, self.kwargs, self.cost = pipe, prompts, seed, call_kwargs, cost
        self.feature = feature
        self.full = self.generate("full")
        self.full_stats = frechet.stats_of_images(to_uint8(self.full), feature) if feature is not None else None

    def generate(self, plan) -> np.ndarray:
        diffroute.apply(self.pipe, plan)
        try:
            gens = [
                torch.Generator(device=self.pipe.device).manual_seed(self.seed + i) for i in range(len(self.prompts))
            ]
            return self.pipe(self.prompts, generator=gens, output_type="np", **self.kwargs).images
        finally:
            diffroute.remove(self.pipe)

    def __call__(self, schedule) -> dict:
        images = self.generate(schedule)
        value = psnr(images, self.full)
        out = {"cost": self.cost.relative_cost(schedule), "psnr": value if np.isfinite(value) else 99.0}
        if self.feature is not None:
            import warnings

            with warnings.catch_warnings():  # few calibration images: FD is biased, but consistently so
                warnings.simplefilter("ignore")
                stats = frechet.stats_of_images(to_uint8(images), self.feature)
                out["fd"] = max(frechet.fd_from_stats(self.full_stats, stats)["value"], 0.0)
        return out
