"""Scoring one schedule on calibration prompts: analytic cost, measured latency, and quality against full compute."""

from __future__ import annotations

import warnings

import numpy as np

import diffroute
from diffroute.metrics import frechet
from diffroute.metrics.fidelity import per_image_psnr, psnr
from diffroute.search.cost import CostModel
from diffroute.utils.imageio import to_uint8
from diffroute.utils.seeding import sample_generators


class ScheduleEvaluator:
    """Generates the calibration prompts with a schedule (fixed seeds) and compares with full compute.

    Records `cost` (analytic FLOPs, relative), `latency` (measured transformer time relative to full),
    `latency_model` (predicted by a LatencyModel, when given), `psnr` (pooled), `psnr_mean` (per image, capped), and
    `fd` (with a feature module), `clip` (with a CLIP scorer) and `user` (with `quality_fn(images, full_images,
    prompts) -> float`, lower is better), so that a search can take any of them as objectives. For a schedule with
    a first-block check, which each image takes its own way, `cost` and `latency_model` are of what the call did:
    each cell counted by the share of images that computed it.

    With `fit_prompts`, each schedule's reuses are first fitted (`policies.fitting.fit_schedule`: one calibration
    call on those prompts, seeds following the scored prompts' so that no image is both fitted and scored) and its
    quality is that of the fitted schedule: the search then ranks schedules by what they give once fitted. Its cost is
    its cells' (a fitted reuse skips what a plain one skips); its `latency_model` prices its reuses as fitted
    stand-ins, where the latency table was measured with them (`measure_latency(fitted=True)`).
    """

    def __init__(
        self,
        pipe,
        prompts: list[str],
        seed: int,
        call_kwargs: dict,
        cost: CostModel,
        feature=None,
        clip_scorer=None,
        quality_fn=None,
        latency_model=None,
        fit_prompts: list[str] | None = None,
    ):
        self.pipe, self.prompts, self.seed, self.kwargs, self.cost = pipe, prompts, seed, call_kwargs, cost
        self.feature, self.clip_scorer, self.quality_fn = feature, clip_scorer, quality_fn
        self.latency_model, self.fit_prompts = latency_model, fit_prompts
        self.full, self.full_time, _ = self.generate("full")
        self.full_stats = frechet.stats_of_images(to_uint8(self.full), feature) if feature is not None else None

    def generate(self, plan) -> tuple[np.ndarray, float, object]:
        """Images, transformer seconds and the CallStats of one call with `plan`."""
        diffroute.apply(self.pipe, plan)
        try:
            gens = sample_generators(self.seed, range(len(self.prompts)), self.pipe.device)
            images = self.pipe(self.prompts, generator=gens, output_type="np", **self.kwargs).images
            stats = self.pipe.last_stats
            return images, stats.transformer_time_s, stats
        finally:
            diffroute.remove(self.pipe)

    def fitted(self, schedule):
        """`schedule` with its reuses fitted on `fit_prompts` (as it is, where it reuses nothing or checks images)."""
        from diffroute.plans.base import SchedulePlan
        from diffroute.policies.fitting import fit_schedule

        if not self.fit_prompts or schedule.check is not None or bool(schedule.compute.all()):
            return schedule
        after = range(len(self.prompts), len(self.prompts) + len(self.fit_prompts))

        def run():
            gens = sample_generators(self.seed, after, self.pipe.device)
            self.pipe(self.fit_prompts, generator=gens, output_type="latent", **self.kwargs)

        return fit_schedule(self.pipe, SchedulePlan(schedule), run, schedule.num_steps)[0]

    def __call__(self, schedule) -> dict:
        images, seconds, stats = self.generate(self.fitted(schedule))
        value = psnr(images, self.full)
        dynamic = schedule.check is not None
        out = {
            "cost": self.cost.realised_cost(stats) if dynamic else self.cost.relative_cost(schedule),
            "latency": seconds / self.full_time,
            "psnr": value if np.isfinite(value) else 99.0,
            # per image, capped: an identical image does not dominate
            "psnr_mean": float(per_image_psnr(images, self.full).mean()),
        }
        if self.latency_model is not None:
            model = self.latency_model
            fitted = True if self.fit_prompts else None  # (priced as the fitted stand-ins it will run)
            out["latency_model"] = model.realised(stats) if dynamic else model.relative(schedule, fitted)
        if self.feature is not None:
            with warnings.catch_warnings():  # few calibration images: FD is biased, but consistently so
                warnings.simplefilter("ignore")
                stats = frechet.stats_of_images(to_uint8(images), self.feature)
                out["fd"] = max(frechet.fd_from_stats(self.full_stats, stats)["value"], 0.0)
        if self.clip_scorer is not None:
            out["clip"] = float(self.clip_scorer(to_uint8(images), self.prompts).mean())
        if self.quality_fn is not None:
            out["user"] = float(self.quality_fn(images, self.full, self.prompts))
        return out
