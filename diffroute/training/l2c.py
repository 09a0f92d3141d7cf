"""Training a Learning-to-Cache router on a pipeline's own sampling trajectories (the shared trainer, accelerate).

One training item is one recorded batch at one routed step k. The transformer replays step k-1 computing everything
(that fills the executor's cache), then step k computing everything (the target), then step k with the router's
soft weights `beta[k]` blending fresh and cached outputs. Loss: `MSE(routed, full) + lam * sum(beta[k])`, as the
reference code's `router_training_losses`; only the router's logits train, the transformer is frozen.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diffroute.core.arch import architecture_map
from diffroute.core.deciders import Decider
from diffroute.core.executor import Executor
from diffroute.plans import Plan
from diffroute.routers.l2c import L2CRouter
from diffroute.training.configs import L2CConfig
from diffroute.training.routers import check_batch_split, save_router, train_router
from diffroute.training.trajectories import output_of, record_calls
from diffroute.utils.io import atomic_write_json


class _ReplayPlan(Plan):
    """The plan a training replay runs under: `mode` says what the current transformer call does."""

    name = "l2c-training"

    def __init__(self):
        self.mode, self.beta = "fill", None

    def decider(self, arch, num_steps):
        return _ReplayDecider(self)


class _ReplayDecider(Decider):
    def __init__(self, plan: _ReplayPlan):
        self.plan = plan

    def decide(self, ctx, block, comp):
        return self.plan.beta[block, comp] if self.plan.mode == "route" else True

    def must_store(self, ctx, block, comp):
        return self.plan.mode == "fill"


class L2CLoss:
    """loss_fn for the shared trainer: items are (recorded batch, routed step) pairs."""

    def __init__(self, transformer, recordings, router: L2CRouter, cfg: L2CConfig):
        self.transformer, self.recordings, self.cfg = transformer, recordings, cfg
        self.plan = _ReplayPlan()
        self.executor = Executor(transformer, self.plan, num_inference_steps=router.config.num_steps).attach()
        self.items = [(i, k) for i in range(len(recordings)) for k in router.routed_steps()]

    def __call__(self, router, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        beta = router()  # through the (DDP-wrapped) module's forward, so gradients are reduced across processes
        losses = [self._item(beta, *self.items[int(j)]) for j in idx]
        return torch.stack(losses).mean() if losses else beta.sum() * 0

    def _item(self, beta: torch.Tensor, i: int, k: int) -> torch.Tensor:
        steps, ex, plan = self.recordings[i], self.executor, self.plan
        ex.end_call()  # a fresh cache for this item
        targets = []
        with torch.no_grad():
            plan.mode = "fill"
            for branch, (args, kwargs) in enumerate(steps[k - 1]):
                with ex.at_step(k - 1, branch):
                    self.transformer(*args, **kwargs)
            plan.mode = "target"
            for branch, (args, kwargs) in enumerate(steps[k]):
                with ex.at_step(k, branch):
                    targets.append(output_of(self.transformer(*args, **kwargs)).float())
        plan.mode, plan.beta = "route", beta[k]
        mse = 0.0
        for branch, (args, kwargs) in enumerate(steps[k]):
            with ex.at_step(k, branch):
                routed = output_of(self.transformer(*args, **kwargs)).float()
            mse = mse + torch.nn.functional.mse_loss(routed, targets[branch])
        ex.end_call()
        return mse / len(steps[k]) + self.cfg.lam * beta[k].sum()

    def close(self) -> None:
        self.executor.detach()


def train_l2c(pipe, prompts: list[str], call_kwargs: dict, cfg: L2CConfig, out: Path, accelerator) -> dict:
    """Record trajectories, train a router (resumable from `out`), save it as `out/router` with its schedule
    `out/schedule.json` and a summary `out/summary.json`; returns the summary (on every process)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    transformer = pipe.transformer
    num_steps = call_kwargs["num_inference_steps"]
    arch = architecture_map(transformer)
    torch.manual_seed(cfg.seed)  # the logits' N(0, 1) initialisation
    router = L2CRouter.for_model(
        arch, num_steps, pipe.scheduler, threshold=cfg.threshold, alternate=cfg.alternate, lam=cfg.lam
    )
    if len(router.routed_steps()) == 0:
        raise ValueError(f"{num_steps} steps leave no step to route: L2C needs at least 2 (3 with alternation).")
    check_batch_split(cfg.batch, accelerator)
    # Every process records every batch (the same seeds): cheap next to training, and no gathering of recordings.
    recordings = record_calls(pipe, prompts, cfg.seed, call_kwargs, cfg.prompts_per_batch)
    loss = L2CLoss(transformer, recordings, router, cfg)
    train_router("l2c", router, loss, cfg, transformer, out, accelerator)
    router = accelerator.unwrap_model(router)
    schedule = router.schedule()
    present = arch.present()  # FLUX's single blocks lack some components: count the cells that exist
    beta = router().detach()[:, present]
    routed = router.routed_steps()
    summary = {
        "method": "l2c",
        "lambda": cfg.lam,
        "threshold": cfg.threshold,
        "alternate": cfg.alternate,
        "iters": cfg.iters,
        "prompts": len(prompts),
        "num_steps": num_steps,
        "scheduler": router.config.scheduler,
        "computed_fraction": schedule.computed_fraction(present),
        "routed_steps_computed_fraction": float((beta[routed] > cfg.threshold).float().mean()),
        "beta_mean_routed": float(beta[routed].mean()),
        "seconds": time.time() - t0,
        "processes": accelerator.num_processes,
    }
    if accelerator.is_main_process:
        save_router(router, transformer, out, "the L2C router")
        schedule.provenance.update(name=out.name, method="l2c")
        schedule.save(out / "schedule.json")
        atomic_write_json(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    return summary
