"""What the demo page does, without any UI: validate a request, run full and accelerated, measure, compare."""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import diffroute
from diffroute.metrics.fidelity import psnr
from diffroute.runtime import Runtime, load_with
from diffroute.utils.imageio import to_pil
from diffroute.utils.limits import is_guidance
from diffroute.utils.seeding import MAX_SEED, sample_generators
from diffroute.zoo import MODELS, call_defaults
from diffroute.zoo.shipped import plans_for

MAX_STEPS, MAX_BATCH, MAX_PROMPT_CHARS = 100, 8, 200
MAX_SCHEDULE_BYTES = 2**20
UPLOAD_HINT = "Upload a schedule JSON with the file picker (at most 1 MB), or pick a plan from the list."


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

    def __init__(self, model: str = "emoji", device: str | None = None, runtime: Runtime | None = None):
        self.model = model
        runtime = runtime or Runtime()
        device = device or runtime.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = load_with(model, replace(runtime, device=device))
        self.arch = diffroute.architecture_map(self.pipe.transformer)
        self.lock = threading.Lock()
        entry = MODELS.get(model)
        self.examples = entry.prompts() if entry else []
        self.random_weights = bool(entry and entry.random_weights)
        self.offered_plans = tuple(plans_for(model))
        self.pipe.set_progress_bar_config(disable=True)
        self._run("full", "warm-up", 2, 1.0, 0, 1)  # one-off costs (allocations, lazy inits) before the first timing
        diffroute.remove(self.pipe)
        self.pipe.set_progress_bar_config(desc="denoising", disable=False)

    def resolve(self, plan: str, schedule_file: str | None) -> diffroute.Plan:
        """The plan of a request: an uploaded schedule JSON (wins over the picker), or one of the offered names.

        Clients are untrusted: no path a client names is opened unless it lies in Gradio's upload folder (where
        Gradio stores what was uploaded), and the refusal reads the same whether or not such a path exists.
        """
        if schedule_file:
            path = uploaded_file(schedule_file)
            resolved = diffroute.schedule_plan(diffroute.Schedule.load(path), name=Path(path).stem)
        elif isinstance(plan, str) and plan in self.offered_plans:
            resolved = diffroute.resolve_plan(plan, allow_files=False)
        else:
            raise ValueError(f"Unknown plan {str(plan)[:60]!r}: pick one of {', '.join(self.offered_plans)}.")
        resolved.check(self.arch)
        return resolved

    def validate(self, prompt: str, steps, batch, guidance=4.5, seed=0) -> None:
        """One rule for the app and the CLI: a non-empty prompt, whole steps/batch in range, a finite guidance
        >= 0, a seed in torch's range."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("Type a prompt first.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"The prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}.")
        for name, value, top in (("Steps", steps, MAX_STEPS), ("Batch size", batch, MAX_BATCH)):
            if not _whole(value) or not 1 <= int(value) <= top:
                raise ValueError(f"{name} must be a whole number from 1 to {top}, got {value!r}.")
        if not is_guidance(guidance):
            raise ValueError(f"Guidance must be a finite number >= 0, got {guidance!r}.")
        if not _whole(seed) or not 0 <= int(seed) <= MAX_SEED:
            raise ValueError(f"Seed must be a whole number from 0 to {MAX_SEED}, got {seed!r}.")

    def _run(self, plan, prompt, steps, guidance, seed, batch):
        diffroute.apply(self.pipe, plan)
        gens = sample_generators(seed, range(batch), self.pipe.device)
        kwargs = {**call_defaults(self.model), "num_inference_steps": int(steps), "guidance_scale": float(guidance)}
        t0 = time.perf_counter()
        images = self.pipe([prompt] * batch, generator=gens, output_type="np", **kwargs).images
        return images, time.perf_counter() - t0, self.pipe.last_stats

    def generate(self, prompt, steps, guidance, seed, batch, plan="fora-3", schedule_file=None) -> Result:
        """Full compute and the chosen plan, same prompt and seeds; everything is validated before any work."""
        self.validate(prompt, steps, batch, guidance, seed)
        resolved = self.resolve(plan, schedule_file)
        with self.lock:  # one pipeline, one request at a time: no plan or cache state is shared between requests
            try:
                full, full_s, _ = self._run("full", prompt, steps, guidance, seed, int(batch))
                fast, fast_s, stats = self._run(resolved, prompt, steps, guidance, seed, int(batch))
            finally:
                diffroute.remove(self.pipe)
        value = psnr(fast, full)
        return Result(to_pil(full), to_pil(fast), full_s, fast_s, value if value != float("inf") else None, stats)


def _whole(value) -> bool:
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value == int(value)
    )


def uploaded_file(name) -> Path:
    """The path of a file a client uploaded through Gradio, or ValueError (the same one whatever the reason)."""
    from gradio.utils import get_upload_folder

    root = Path(get_upload_folder()).resolve()
    try:
        path = Path(str(name)).resolve()
        ok = root in path.parents and path.is_file() and path.stat().st_size <= MAX_SCHEDULE_BYTES
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise ValueError(UPLOAD_HINT)
    return path
