"""Training per-image gates (routers/gates.py) on the pipeline's own trajectories, HarmoniCa-style.

One item is one batch of prompts. The student (the frozen transformer under the gates) is rolled through every step
in order, with the cache it would hold at inference: decisions are straight-through (hard forward), a component
that skips returns that sample's cached output, and the cache is written only where it computes. Two rollouts:

- "student" (default; HarmoniCa's step-wise denoising training): the pipeline itself runs, from fresh noise each
  time, and its scheduler advances the **student's** latents; at each transformer call the full model runs first on
  the same input (the target; no gradient, no cache writes), then the student. Trained this way the gates see the
  drift their own skips cause, as they will at inference.
- "recorded" (teacher forcing, the first attempt): the inputs are the full trajectory's, recorded once, and the
  target is its recorded prediction; skipping then looks cheaper than it is, as no skip moves the latents.

Loss per transformer call: lambda_k * MSE(student prediction, target) + rho * the share of the step's FLOPs the
gated components compute (each weighted by its FLOPs, not by call count), averaged over the calls. lambda_k is 1, or
with `iepo_every` HarmoniCa's image-error proxy (IEPO), refreshed every that many iterations as its code does: with
fixed noise, the final latents are generated with the gates acting at steps 1..k and computing after; lambda_k is
how far they moved from those of steps 1..k-1 (the cumulative variant of its code; the paper's is the marginal one).
Deviations: lambda is divided by its mean over the steps (rho keeps one scale across refreshes) and floored at a
tenth of it (a step whose gates compute everything would otherwise get no weight and be pushed to skip unchecked
until the next refresh); a resumed run refreshes at its first iteration.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diffroute.core.arch import architecture_map
from diffroute.core.call_context import hidden_states_of
from diffroute.core.context import NamedCallHook, StepTracker, scheduler_step_source
from diffroute.core.executor import Executor
from diffroute.routers.gates import UNGATED, GatePlan, GateRouter
from diffroute.search.cost import count_flops
from diffroute.training.configs import GateConfig
from diffroute.training.routers import check_batch_split, save_router, train_router
from diffroute.training.trajectories import output_of, record_calls
from diffroute.utils.io import atomic_write_json
from diffroute.utils.seeding import sample_generators

ROLLOUTS = ("student", "recorded")
STUDENT_HOOK = "diffroute.gates_student"


class GateLoss:
    """loss_fn for the shared trainer: each item (a batch of prompts) is rolled out over its whole trajectory."""

    def __init__(self, pipe, chunks, recordings, router: GateRouter, share, cfg: GateConfig, call_kwargs: dict):
        self.pipe, self.transformer, self.cfg, self.share = pipe, pipe.transformer, cfg, share
        self.chunks, self.recordings, self.call_kwargs = chunks, recordings, call_kwargs
        self.plan = GatePlan(router, "gates-training", training=True)
        self.executor = Executor(self.transformer, self.plan, num_inference_steps=router.config.num_steps).attach()
        self.items = list(range(len(chunks) if cfg.rollout == "student" else len(recordings)))
        self.terms: list[torch.Tensor] = []
        self.hook = None
        if cfg.rollout == "student":  # outermost on the transformer: it runs the target, then the student
            from diffusers.hooks import HookRegistry

            self.hook = StudentStepHook(self, scheduler_step_source(pipe.scheduler), router.config.num_steps)
            HookRegistry.check_if_exists_or_initialize(self.transformer).register_hook(self.hook, STUDENT_HOOK)
        self.last_latents: torch.Tensor | None = None  # the student rollout's final latents (for tests)
        self.step_weights = torch.ones(router.config.num_steps)  # IEPO's lambda_k (ones without it)
        self.raw_lambda: torch.Tensor | None = None  # IEPO's last lambda before its normalisation
        self.refreshing = False  # True while IEPO generates: calls run the gates only, nothing is trained
        self.iterations = 0

    def __call__(self, router, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        self.plan.params = router()  # through the (DDP-wrapped) forward, so gradients are reduced across processes
        if self.cfg.iepo_every and self.iterations % self.cfg.iepo_every == 0:
            self.refresh_step_weights()
        self.iterations += 1
        if self.cfg.rollout == "student":
            seeds = torch.randint(0, 2**31 - 1, (len(idx),), generator=gen).tolist()  # fresh noise every rollout
            losses = [self.student_rollout(int(j), s) for j, s in zip(idx, seeds)]
        else:
            losses = [self._recorded_rollout(int(j)) for j in idx]
        return torch.stack(losses).mean()

    def student_rollout(self, i: int, seed: int) -> torch.Tensor:
        """Run the pipeline on prompt batch `i` (sample j seeded with seed + j) with the student deciding; returns
        the mean loss of its transformer calls."""
        self.terms = []
        self.last_latents = self._generate(self.chunks[i], seed)
        return torch.stack(self.terms).mean()

    def refresh_step_weights(self) -> torch.Tensor:
        """IEPO's lambda (see the module docstring), from prompt batch 0 with the run's seed; returns it."""
        num_steps = len(self.step_weights)
        finals = []
        self.refreshing = True
        try:
            with torch.no_grad():
                for k in range(num_steps):  # k = 0: no step gated (step 0 always computes): the full model
                    self.plan.last_gated_step = k
                    finals.append(self._generate(self.chunks[0], self.cfg.seed).float())
        finally:
            self.refreshing, self.plan.last_gated_step = False, None
        lam = torch.zeros(num_steps)
        for k in range(1, num_steps):
            lam[k] = (finals[k] - finals[k - 1]).pow(2).mean()
        self.raw_lambda, mean = lam, lam[1:].mean()
        self.step_weights = (lam / mean).clamp(min=0.1) if mean > 0 else torch.ones(num_steps)
        self.step_weights[0] = 1.0
        return self.step_weights

    def _generate(self, chunk: list[str], seed: int) -> torch.Tensor:
        """One pipeline call on `chunk` (sample j seeded with seed + j) through the hook; its final latents."""
        self.executor.end_call()  # a fresh cache for this trajectory
        self.hook.tracker.reset()
        gens = sample_generators(seed, range(len(chunk)), self.pipe.device)
        with torch.no_grad():
            out = self.pipe(chunk, generator=gens, output_type="latent", **self.call_kwargs)
        self.executor.end_call()
        self.plan.aux.clear()
        return out[0] if isinstance(out, tuple) else out.images

    def on_call(self, step: int, branch: int, forward):
        """What the student hook does with one of the pipeline's transformer calls."""
        if self.refreshing:
            with self.executor.at_step(step, branch):
                return forward()
        return self.call(step, branch, forward)

    def _recorded_rollout(self, i: int) -> torch.Tensor:
        self.terms = []
        self.executor.end_call()
        for k, branches in enumerate(self.recordings[i]):
            for branch, (args, kwargs, target) in enumerate(branches):
                self.call(k, branch, lambda args=args, kwargs=kwargs: self.transformer(*args, **kwargs), target)
        self.executor.end_call()
        self.plan.aux.clear()
        return torch.stack(self.terms).mean()

    def call(self, step: int, branch: int, forward, target: torch.Tensor | None = None):
        """One transformer call at (step, branch): the target (the full model on this very input, unless given),
        then the student, whose loss term is kept; returns the student's output."""
        ex, plan = self.executor, self.plan
        if target is None:
            plan.mode = "target"  # every component computes, the cache is left alone
            try:
                with torch.no_grad(), ex.at_step(step, branch):
                    target = output_of(forward())
            finally:
                plan.mode = "route"
        plan.aux.clear()
        with torch.enable_grad():  # (the pipeline's loop runs under no_grad)
            with ex.at_step(step, branch):
                out = forward()
            penalty = sum(self.share[b, c] * m.float().mean() for b, c, m in plan.aux)
            mse = torch.nn.functional.mse_loss(output_of(out).float(), target.float())
            self.terms.append(self.step_weights[step] * mse + self.cfg.rho * penalty)
        return out

    def close(self) -> None:
        if self.hook is not None:
            self.transformer._diffusers_hook.remove_hook(STUDENT_HOOK, recurse=False)
        self.executor.detach()


class StudentStepHook(NamedCallHook):
    """On the transformer during student rollouts: each call the pipeline makes goes through `GateLoss.call` at the
    step the pipeline's scheduler is at, and the student's prediction goes back to the pipeline."""

    def __init__(self, loss: GateLoss, step_source, num_steps: int):
        super().__init__()
        self.loss, self.tracker = loss, StepTracker(step_source, num_steps)

    def new_forward(self, module, *args, **kwargs):
        rows = hidden_states_of(args, kwargs).shape[0]
        ctx, _ = self.tracker.advance(kwargs.get("timestep"), rows, self.call_name.name)
        return self.loss.on_call(ctx.step, ctx.branch, lambda: self.fn_ref.original_forward(*args, **kwargs))


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
                x = hidden_states_of(args, kwargs)
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


def check(cfg: GateConfig) -> None:
    """Refuse settings that cannot train, before any work."""
    if cfg.rollout not in ROLLOUTS:
        raise ValueError(f"rollout {cfg.rollout!r}: one of {', '.join(ROLLOUTS)}")
    if cfg.iepo_every and cfg.rollout != "student":
        raise ValueError("--iepo-every needs student rollouts (--rollout student): it generates with the gates.")


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
    check(cfg)
    chunks = [prompts[i : i + cfg.prompts_per_batch] for i in range(0, len(prompts), cfg.prompts_per_batch)]
    # student rollouts record one batch only: its first call sizes the gates and counts the FLOPs
    recorded = prompts if cfg.rollout == "recorded" else chunks[0]
    recordings = record_calls(pipe, recorded, cfg.seed, call_kwargs, cfg.prompts_per_batch, outputs=True)
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
    loss = GateLoss(pipe, chunks, recordings, router, share, cfg, call_kwargs)
    train_router("gates", router, loss, cfg, transformer, out, accelerator)
    router = accelerator.unwrap_model(router)
    summary = {
        "method": "gates",
        "rho": cfg.rho,
        "threshold": cfg.threshold,
        "per_prompt": cfg.per_prompt,
        "pooling": cfg.pooling,
        "init": cfg.init,
        "rollout": cfg.rollout,
        "iepo_every": cfg.iepo_every,
        "iepo_weights": [round(float(w), 4) for w in loss.step_weights],
        "gated": list(gated),
        "iters": cfg.iters,
        "prompts": len(prompts),
        "num_steps": num_steps,
        "scheduler": router.config.scheduler,
        "gated_flop_share": float(share[:, [arch.components.index(c) for c in gated]].sum()),
        "seconds": time.time() - t0,
        "processes": accelerator.num_processes,
    }
    done_before = out / "summary.json"
    if loss.iterations == 0 and done_before.exists():  # a finished run called again: its training's own figures
        from diffroute.utils.io import read_json

        before = read_json(done_before, "summary")
        summary.update({k: before[k] for k in ("seconds", "iepo_weights") if k in before})
    if accelerator.is_main_process:
        save_router(router, transformer, out, "the gates")
        atomic_write_json(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    return summary
