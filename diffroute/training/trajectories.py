"""Recorded transformer calls of full-compute sampling runs: the training pairs of trained deciders.

Trained deciders learn on the trajectories the model itself samples with the pipeline's own scheduler (DPM-Solver++
at 20 steps for the emoji model). Learning-to-Cache's reference code instead noises data latents and takes DDIM
steps, which only approximates the trajectories a multistep solver visits.
"""

from __future__ import annotations

from typing import Any

import torch

from diffroute.core.call_context import hidden_states_of
from diffroute.core.context import StepTracker, scheduler_step_source
from diffroute.utils.seeding import sample_generators

# One recorded pipeline call: [step][branch] -> (args, kwargs) of the transformer call (branch: CFG as two calls),
# with the call's prediction appended as a third entry when outputs are recorded.
Recording = list[list[tuple]]


def record_calls(
    pipe, prompts: list[str], seed: int, call_kwargs: dict, batch: int, outputs: bool = False
) -> list[Recording]:
    """Run the pipeline as it is (no plan) on `prompts` in batches; sample i is seeded with seed + i. Returns
    each batch's transformer inputs at every step (and with `outputs`, its prediction: a distillation target),
    detached copies on the pipeline's device."""
    num_steps = call_kwargs.get("num_inference_steps")
    recordings = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        tracker = StepTracker(scheduler_step_source(pipe.scheduler), num_steps)
        steps: Recording = []
        copies: dict[int, tuple] = {}  # the prompt embeddings are one tensor at every step: copy it once

        def hook(module, args, kwargs, tracker=tracker, steps=steps, copies=copies):
            hidden = hidden_states_of(args, kwargs)
            ctx, _ = tracker.advance(kwargs.get("timestep"), hidden.shape[0])
            while len(steps) <= ctx.step:
                steps.append([])
            steps[ctx.step].append((_copy(args, copies), _copy(kwargs, copies)))

        def keep_output(module, args, kwargs, out, steps=steps):
            last = next(s for s in reversed(steps) if s)  # the call just recorded
            last[-1] = (*last[-1], output_of(out).detach().clone())

        handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
        out_handle = pipe.transformer.register_forward_hook(keep_output, with_kwargs=True) if outputs else None
        try:
            gens = sample_generators(seed, range(start, start + len(chunk)), pipe.device)
            with torch.no_grad():
                pipe(chunk, generator=gens, output_type="latent", **call_kwargs)
        finally:
            handle.remove()
            if out_handle is not None:
                out_handle.remove()
        recordings.append(steps)
    return recordings


def output_of(out) -> torch.Tensor:
    """The prediction of a transformer call, whether it returned a tuple or an output object."""
    return out[0] if isinstance(out, (tuple, list)) else out.sample


def _copy(value: Any, copies: dict) -> Any:
    if isinstance(value, torch.Tensor):
        if id(value) not in copies:  # the original is held too, so that its id is not reused by a later tensor
            copies[id(value)] = (value, value.detach().clone())
        return copies[id(value)][1]
    if isinstance(value, dict):
        return {k: _copy(v, copies) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_copy(v, copies) for v in value)
    return value
