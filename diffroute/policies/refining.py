"""Fitted reuse refined on the final image: a fitted schedule's extrapolation weights (`policies/fitting.py`) trained
by gradient descent on how far the final latents the schedule gives are from full compute's from the same noise
(`LOSSES`), backpropagated through the whole sampling loop (`call_with_grad`, as the gates' `--rollout image`
does).

Why: the calibration fits each weight greedily, to the next output of its own cell. Where most of a step is
extrapolated those fits compound into later steps they do not see, and at the fast end the fitted schedules lost to
plain reuse (`emoji:blocks-faster-fit`, fp32). Here each weight's gradient is its effect on the image, through every
step after it. Started from the greedy weights; after each epoch the final-image error over all calibration prompts
is measured, and the weights with the lowest one (the start included) are kept, so the result is never worse than
the greedy fit on the prompts it was trained on. Only the cells the calibration fitted train (those it left at plain
reuse, with one stored output or no direction, stay so); the weights stay shared by every image (a static plan).
Deviation from HarmoniCa, whose loss is per step (`../shared/ROUTING.md` §8): the loss is on the final image, and
the gradient runs through the cached outputs too (the cache keeps them with their graph), so a weight also answers
for what later extrapolations read of the outputs it changed."""

from __future__ import annotations

from dataclasses import replace

import torch

from diffroute.core.deciders import ScheduleDecider
from diffroute.core.decisions import Fitted
from diffroute.core.fitted import weights as plain_or_fitted
from diffroute.core.schedule import MAX_FIT_WEIGHT, Schedule, run_starts
from diffroute.errors import PlanError
from diffroute.plans.base import SchedulePlan
from diffroute.utils.grad import pipeline_modules, requires_grad
from diffroute.utils.seeding import sample_generators


class _Refining(SchedulePlan):
    """The fitted schedule with its fitted cells' weights `(1 + w, -w)` read from the trainable vector `w`."""

    def __init__(self, schedule: Schedule, cells: list[tuple[int, int, int]], w: torch.Tensor):
        super().__init__(schedule, "refining")
        self.index, self.w = {cell: k for k, cell in enumerate(cells)}, w
        self.cache_keeps_graph = True  # a weight's gradient runs through the outputs later cells extrapolate from

    def decider(self, arch, num_steps: int) -> ScheduleDecider:
        # made at every call: the weights' graph is new each time

        def stand_in(t: int, b: int, i: int):
            k = self.index.get((t, b, i))
            return None if k is None else Fitted(1 + self.w[k], -self.w[k])  # None: the stored weights

        return ScheduleDecider(self.schedule, stand_in=stand_in)


def fitted_cells(schedule: Schedule) -> list[tuple[int, int, int]]:
    """(step, block, index) of every cell whose weights are not plain reuse's (1, 0); with `fit_spans`, of a run of
    blocks reused whole only its first block (the run's weight)."""
    a, c = schedule.fit[..., 0], schedule.fit[..., 1]
    cells = [tuple(x) for x in ((a != 1.0) | (c != 0.0)).nonzero().tolist()]
    if not schedule.fit_spans:
        return cells
    first, n = run_starts(schedule.block_reuse), schedule.fit.shape[2] - 1
    return [(t, b, i) for t, b, i in cells if i < n or first[t][b] == b]


def log_error(latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample: log10 of the mean squared error of its final latents (-PSNR / 10 up to a constant)."""
    return torch.log10(_mse(latents, target))


def _mse(latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (latents - target).pow(2).flatten(1).mean(1) + 1e-12


def per_image(latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean of `log_error` over the batch: each image counts as it does in the mean per-image PSNR we report,
    not by the size of its error (a squared error over the batch alone, tried first, followed the few images with
    the largest errors and its gain on the calibration captions did not carry over to held-out ones)."""
    return log_error(latents, target).mean()


def per_image_and_pooled(latents: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`per_image` plus log10 of the batch's pooled MSE: the mean per-image PSNR and the pooled PSNR at once. The
    per-image term alone lets a few images' large errors grow while many small ones shrink, and those large errors
    are what the pooled PSNR and the FD between the image sets see (`emoji:blocks-brisk-fit`: FD 0.027 against
    plain reuse's 0.020)."""
    mse = _mse(latents, target)
    return torch.log10(mse).mean() + torch.log10(mse.mean())


LOSSES = {"per-image": per_image, "per-image+pooled": per_image_and_pooled}


def refine_schedule(
    pipe,
    schedule: Schedule,
    prompts: list[str],
    seed: int,
    call_kwargs: dict,
    epochs: int,
    batch: int = 8,
    lr: float = 0.02,
    progress: bool = True,
    loss: str = "per-image+pooled",
) -> tuple[Schedule, dict]:
    """`schedule` (fitted, at the call's step count) with its fitted weights refined on the final image over
    `prompts` (sample j seeded with seed + j, as the calibration's call), `batch` prompts per step of Adam at rate
    `lr`, `epochs` passes (each on fresh noise: samples seeded from seed + epoch * len(prompts)), minimising
    `LOSSES[loss]` of each batch. Returns it and a summary: the loss over the prompts at the calibration's seeds
    (batches weighted by their size) with plain reuse, the greedy weights and the kept ones, and the epoch they come
    from."""

    if schedule.fit is None:
        raise PlanError("refinement starts from a fitted schedule (`fit_schedule` first).")
    if loss not in LOSSES:
        raise PlanError(f"unknown refinement loss {loss!r}; one of {sorted(LOSSES)}.")
    if not hasattr(pipe, "call_with_grad"):
        raise PlanError(f"refinement needs a diffroute Routed*Pipeline (gradients through its loop); got {type(pipe)}.")
    cells = fitted_cells(schedule)
    if not cells:
        return schedule, {"cells_refined": 0}
    chunks = [(j, prompts[j : j + batch]) for j in range(0, len(prompts), batch)]

    def call(chunk, start, grad=False):
        gens = sample_generators(seed, range(start, start + len(chunk)), pipe.device)
        run = pipe.call_with_grad if grad else pipe
        return run(chunk, generator=gens, output_type="latent", **call_kwargs).images.float()

    # the weights alone train: no gradients for the pipeline's parameters
    with requires_grad(pipeline_modules(pipe), False):
        return _refine(pipe, schedule, cells, chunks, call, epochs, lr, progress, loss)


def _refine(pipe, schedule: Schedule, cells: list, chunks: list, call, epochs: int, lr: float, progress: bool, loss):
    """`refine_schedule`'s loop, with `call(chunk, first_index, grad)` generating one chunk's final latents."""
    import diffroute

    n, batch, objective = sum(len(chunk) for _, chunk in chunks), len(chunks[0][1]), LOSSES[loss]
    w = torch.tensor([-schedule.fit[t, b, i, 1].item() for t, b, i in cells], requires_grad=True)

    def full(start: int) -> list[torch.Tensor]:
        """Full compute's final latents of every chunk, sample j of the prompts seeded with seed + start + j."""
        with torch.no_grad():
            return [call(chunk, start + j) for j, chunk in chunks]

    def error(plan, targets) -> float:
        """The loss over all prompts under `plan` (seeds as the calibration's call)."""
        diffroute.apply(pipe, plan)
        try:
            with torch.no_grad():
                return float(sum(objective(call(chunk, j), t) * len(chunk) for (j, chunk), t in zip(chunks, targets)))
        finally:
            diffroute.remove(pipe)

    diffroute.remove(pipe)
    held = full(0)
    plain = error(SchedulePlan(replace(schedule, fit=None)), held) / n
    refining = _Refining(schedule, cells, w)
    history = [error(refining, held) / n]
    best, best_w = 0, w.detach().clone()
    optimizer = torch.optim.Adam([w], lr=lr)
    bar = _progress(epochs * len(chunks), progress)
    for epoch in range(1, epochs + 1):
        targets = full(epoch * n)  # fresh noise each epoch: the weights are not fitted to one draw of it
        diffroute.apply(pipe, refining)
        try:
            for (j, chunk), target in zip(chunks, targets):
                value = objective(call(chunk, epoch * n + j, grad=True), target)
                optimizer.zero_grad()
                value.backward()
                optimizer.step()
                with torch.no_grad():  # the range a schedule file accepts
                    w.clamp_(-(MAX_FIT_WEIGHT - 1), MAX_FIT_WEIGHT - 1)
                bar.update(1)
                bar.set_postfix(loss=f"{value.item():.3f}")
        finally:
            diffroute.remove(pipe)
        history.append(error(refining, held) / n)
        if history[-1] < history[best]:
            best, best_w = epoch, w.detach().clone()
    bar.close()
    fit = schedule.fit.clone()
    for (t, b, i), v in zip(cells, best_w.double().tolist()):
        fit[t, b, i] = torch.tensor(plain_or_fitted(v, 1.0), dtype=torch.float64)
    if schedule.fit_spans:  # the run's weight to every block of it
        fit = schedule.tied(fit)
    provenance = dict(schedule.provenance, refined_epochs=epochs, refined_lr=lr, refined_batch=batch)
    provenance["refined_loss"] = loss
    summary = {
        "cells_refined": len(cells),
        "loss": loss,
        "loss_plain_reuse": plain,
        "loss_greedy": history[0],
        "loss_refined": history[best],
        "loss_per_epoch": history,
        "kept_epoch": best,
    }
    return replace(schedule, provenance=provenance, fit=fit), summary


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="refining fitted weights", disable=not enabled, leave=False)
