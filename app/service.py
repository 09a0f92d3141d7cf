"""What the demo page does, without any UI: validate a request, run full and accelerated, measure, compare."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import diffroute
from diffroute.eval.fidelity import psnr
from diffroute.imageio import to_pil
from diffroute.seeding import sample_generators
from diffroute.zoo import MODELS, call_defaults, load_pipeline

MAX_STEPS, MAX_BATCH, MAX_PROMPT_CHARS = 100, 8, 200


@dataclass
class Result:
    full: list
    fast: list
    full_s: float
    fast_s: float
    psnr_db: float | None
    stats: diffroute.CallStats


class DemoService:
    """Holds one pipeline; requests run one at a time (the lock), each with its own plan and generators."""

    def __init__(self, model: str = "emoji", device: str | None = None):
        self.model = model
        self.pipe = load_pipeline(model, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.arch = diffroute.architecture_map(self.pipe.transformer)
        self.lock = threading.Lock()
        entry = MODELS.get(model)
        self.examples = entry.prompts() if entry else []
        self.random_weights = bool(entry and entry.random_weights)
        self.pipe.set_progress_bar_config(disable=True)
        self._run("full", "warm-up", 2, 1.0, 0, 1)  # one-off costs (allocations, lazy inits) before the first timing
        diffroute.remove(self.pipe)
        self.pipe.set_progress_bar_config(desc="denoising", disable=False)

    def resolve(self, plan: str, schedule_file: str | None) -> diffroute.Plan:
        """The plan of a request; an uploaded schedule JSON wins over the picker and must fit the model."""
        spec = schedule_file if schedule_file else plan
        resolved = diffroute.resolve_plan(str(spec) if isinstance(spec, Path) else spec)
        resolved.check(self.arch)
        return resolved

    def validate(self, prompt: str, steps: int, batch: int) -> None:
        if not prompt or not prompt.strip():
            raise ValueError("Type a prompt first.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"The prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}.")
        if not 1 <= int(steps) <= MAX_STEPS:
            raise ValueError(f"Steps must be between 1 and {MAX_STEPS}, got {steps}.")
        if not 1 <= int(batch) <= MAX_BATCH:
            raise ValueError(f"Batch size must be between 1 and {MAX_BATCH}, got {batch}.")

    def _run(self, plan, prompt, steps, guidance, seed, batch):
        diffroute.apply(self.pipe, plan)
        gens = sample_generators(seed, range(batch), self.pipe.device)
        kwargs = {**call_defaults(self.model), "num_inference_steps": int(steps), "guidance_scale": float(guidance)}
        t0 = time.perf_counter()
        images = self.pipe([prompt] * batch, generator=gens, output_type="np", **kwargs).images
        return images, time.perf_counter() - t0, self.pipe.last_stats

    def generate(self, prompt, steps, guidance, seed, batch, plan="fora-3", schedule_file=None) -> Result:
        """Full compute and the chosen plan, same prompt and seeds; everything is validated before any work."""
        self.validate(prompt, steps, batch)
        resolved = self.resolve(plan, schedule_file)
        with self.lock:  # one pipeline, one request at a time: no plan or cache state is shared between requests
            try:
                full, full_s, _ = self._run("full", prompt, steps, guidance, seed, int(batch))
                fast, fast_s, stats = self._run(resolved, prompt, steps, guidance, seed, int(batch))
            finally:
                diffroute.remove(self.pipe)
        value = psnr(fast, full)
        return Result(to_pil(full), to_pil(fast), full_s, fast_s, value if value != float("inf") else None, stats)
