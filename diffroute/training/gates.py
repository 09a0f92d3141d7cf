"""Training per-image gates (routers/gates.py) on the pipeline's own trajectories, HarmoniCa-style.

One item is one recorded batch with its whole trajectory. The student (the frozen transformer under soft gates) is
rolled through every step in order: each gated component outputs `m * fresh + (1 - m) * cached`, and that blend,
detached, becomes its cached output, so the cache is the one the student would hold at inference (stale by as many
steps as it skipped). Inputs are the recorded full trajectory's (teacher forcing: HarmoniCa advances the student's
own latents). Loss per transformer call: MSE(student prediction, the full model's recorded prediction) + rho * the
share of the step's FLOPs the gated components compute (each weighted by its FLOPs, not by call count), averaged.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diffroute.core.arch import architecture_map
from diffroute.core.executor import Executor
from diffroute.routers.gates import UNGATED, GatePlan, GateRouter
from diffroute.search.cost import count_flops
from diffroute.training.configs import GateConfig
from diffroute.training.routers import check_batch_split, save_router, train_router
from diffroute.training.trajectories import output_of, record_calls
from diffroute.utils.io import atomic_write_json


class GateLoss:
    """loss_fn for the shared trainer: items are recorded batches, each rolled out over its whole trajectory."""

    def __init__(self, transformer, recordings, router: GateRouter, share: torch.Tensor, cfg: GateConfig):
        self.transformer, self.recordings, self.cfg, self.share = transformer, recordings, cfg, share
        self.plan = GatePlan(router, "gates-training", training=True)
        self.executor = Executor(transformer, self.plan, num_inference_steps=router.config.num_steps).attach()
        self.items = list(range(len(recordings)))

    def __call__(self, router, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        self.plan.params = router()  # through the (DDP-wrapped) forward, so gradients are reduced across processes
        losses = [self._rollout(int(j)) for j in idx]
        return torch.stack(losses).mean()

    def _rollout(self, i: int) -> torch.Tensor:
        ex, plan, total, calls = self.executor, self.plan, 0.0, 0
        ex.end_call()  # a fresh cache for this trajectory
        for k, branches in enumerate(self.recordings[i]):
            for branch, (args, kwargs, target) in enumerate(branches):
                plan.aux.clear()
                with ex.at_step(k, branch):
                    pred = output_of(self.transformer(*args, **kwargs)).float()
                penalty = sum(self.share[b, c] * m.float().mean() for b, c, m in plan.aux)
                total = total + torch.nn.functional.mse_loss(pred, target.float()) + self.cfg.rho * penalty
                calls += 1
        ex.end_call()
        plan.aux.clear()
        return total / max(calls, 1)

    def close(self) -> None:
        self.executor.detach()


def input_widths(transformer, arch, call, ungated=UNGATED) -> dict[str, int]:
    """Per component that can be gated (all but `ungated`): the channels of its input, read from one call."""
    seen: dict[str, set] = {}
    hooks = []
    for row in arch.modules:
        for c, module in enumerate(row):
            name = arch.components[c]
            if module is None or name in ungated:
                continue

            def look(mod, args, kwargs, name=name):
                x = _hidden(args, kwargs)
                seen.setdefault(name, set()).add(x.shape[-1] if x.ndim == 3 else x.shape[1])

            hooks.append(module.register_forward_pre_hook(look, with_kwargs=True))
    try:
        with torch.no_grad():
            transformer(*call[0], **call[1])
    finally:
        for h in hooks:
            h.remove()
    mixed = {k: sorted(v) for k, v in seen.items() if len(v) != 1}
    if mixed:
        raise ValueError(f"components whose input width differs between blocks cannot share a gate: {mixed}")
    return {k: v.pop() for k, v in seen.items()}


def _hidden(args, kwargs):
    from diffroute.core.call_context import hidden_states_of

    return hidden_states_of(args, kwargs)


def initial_schedule(name: str, pipe, arch, num_steps: int):
    """The schedule of the static plan `name` that the gates start from, checked against this model and call."""
    from diffroute.errors import InputError
    from diffroute.plans import resolve_plan
    from diffroute.plans.base import is_schedule_plan

    plan = resolve_plan(name)
    if not is_schedule_plan(plan):
        raise InputError(f"--init {name}: gates start from a schedule plan (fora-N, emoji:l2c, a schedule file).")
    plan.check(arch)
    plan.check_model(pipe.transformer)
    plan.check_call(num_steps, pipe.scheduler)
    return plan.schedule_at(arch, num_steps)


def train_gates(pipe, prompts: list[str], call_kwargs: dict, cfg: GateConfig, out: Path, accelerator) -> dict:
    """Record trajectories with the full model's predictions, train gates (resumable from `out`), save them as
    `out/router` with a summary `out/summary.json`; returns the summary (on every process)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    transformer = pipe.transformer
    num_steps = call_kwargs["num_inference_steps"]
    if num_steps < 2:
        raise ValueError("gates need at least 2 steps: step 0 always computes (nothing is cached before it).")
    arch = architecture_map(transformer)
    check_batch_split(cfg.batch, accelerator)
    start = initial_schedule(cfg.init, pipe, arch, num_steps) if cfg.init else None  # refused before any work
    recordings = record_calls(pipe, prompts, cfg.seed, call_kwargs, cfg.prompts_per_batch, outputs=True)
    first = recordings[0][0][0]
    cost = count_flops(transformer, arch, first[0], first[1])
    share = (cost.component_flops / cost.step_flops).float()  # [blocks, components]: each one's share of a step
    ungated = () if cfg.cross_attention else UNGATED
    dims = input_widths(transformer, arch, first, ungated)
    router = GateRouter.for_model(
        arch,
        num_steps,
        dims,
        pipe.scheduler,
        ungated,
        threshold=cfg.threshold,
        per_prompt=cfg.per_prompt,
        rho=cfg.rho,
        pooling=cfg.pooling,
    )
    if start is not None:
        router.init_from(start)
    gated = router.config.gated
    loss = GateLoss(transformer, recordings, router, share, cfg)
    train_router("gates", router, loss, cfg, transformer, out, accelerator)
    router = accelerator.unwrap_model(router)
    summary = {
        "method": "gates",
        "rho": cfg.rho,
        "threshold": cfg.threshold,
        "per_prompt": cfg.per_prompt,
        "pooling": cfg.pooling,
        "init": cfg.init,
        "gated": list(gated),
        "iters": cfg.iters,
        "prompts": len(prompts),
        "num_steps": num_steps,
        "scheduler": router.config.scheduler,
        "gated_flop_share": float(share[:, [arch.components.index(c) for c in gated]].sum()),
        "seconds": time.time() - t0,
        "processes": accelerator.num_processes,
    }
    if accelerator.is_main_process:
        save_router(router, transformer, out, "the gates")
        atomic_write_json(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    return summary
