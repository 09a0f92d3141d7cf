"""Training per-image gates (routers/gates.py) on the pipeline's own trajectories, HarmoniCa-style.

One item is one batch of prompts. The student (the frozen transformer under the gates) is rolled through every step
in order, with the cache it would hold at inference: decisions are straight-through (hard forward), a component
that skips returns that sample's cached output, and the cache is written only where it computes. Three rollouts:

- "student" (default; HarmoniCa's step-wise denoising training): the pipeline itself runs, from fresh noise each
  time, and its scheduler advances the **student's** latents; at each transformer call the full model runs first on
  the same input (the target; no gradient, no cache writes), then the student. Trained this way the gates see the
  drift their own skips cause, as they will at inference.
- "recorded" (teacher forcing, the first attempt): the inputs are the full trajectory's, recorded once, and the
  target is its recorded prediction; skipping then looks cheaper than it is, as no skip moves the latents.
- "image": the loss is on the final image, not on each call: the full model generates from the same noise (no
  gradient), then the student generates with autograd on through the pipeline's whole loop (its scheduler steps
  included), and the loss is the MSE between the two final latents, backpropagated through every step. A decision's
  gradient is then its effect on the image the user sees, through all the steps after it. This is the "final-image
  loss" that IEPO only approximates (it reweights per-call errors); neither paper backpropagates through the
  trajectory (a deviation: affordable here as the emoji model is small; memory grows with the step count).

Loss per transformer call ("student", "recorded"): lambda_k * MSE(student prediction, target) + rho * the share of
the step's FLOPs the gated components (or blocks: `level="block"`) compute (each weighted by its FLOPs, not by call
count), averaged over calls. A block gate trains under `SoftReuse`: the block runs for every sample (for the
gradient) and a hard decision blends its output with input plus cached residual, which is inference's value exactly.
lambda_k is 1, or with `iepo_every` HarmoniCa's image-error proxy (IEPO), refreshed every that many iterations as
its code does: with fixed noise, the final latents are generated with the gates acting at steps 1..k and computing
after; lambda_k is how far they moved from those of steps 1..k-1 (the cumulative variant of its code; the paper's is
the marginal one). Deviations: lambda is divided by its mean over the steps (rho keeps one scale across refreshes)
and floored at a tenth of it (a step whose gates compute everything would otherwise get no weight and be pushed to
skip unchecked until the next refresh); a resumed run refreshes at its first iteration.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from diffroute.core.arch import architecture_map
from diffroute.core.call_context import hidden_states_of
from diffroute.core.context import NamedCallHook, StepTracker, scheduler_step_source
from diffroute.core.executor import Executor
from diffroute.routers.gates import BLOCK, LEVELS, UNGATED, GatePlan, GateRouter
from diffroute.search.cost import count_flops
from diffroute.training.configs import GateConfig
from diffroute.training.routers import check_batch_split, save_router, train_router
from diffroute.training.trajectories import output_of, record_calls
from diffroute.utils.grad import pipeline_modules, requires_grad
from diffroute.utils.io import atomic_write_json
from diffroute.utils.seeding import sample_generators
from diffroute.utils.unhook import remove_hook

ROLLOUTS = ("student", "recorded", "image")
STUDENT_HOOK = "diffroute.gates_student"


class GateLoss:
    """loss_fn for the shared trainer: each item (a batch of prompts) is rolled out over its whole trajectory."""

    def __init__(self, pipe, chunks, recordings, router: GateRouter, share, cfg: GateConfig, call_kwargs: dict):
        self.pipe, self.transformer, self.cfg, self.share = pipe, pipe.transformer, cfg, share
        self.chunks, self.recordings, self.call_kwargs = chunks, recordings, call_kwargs
        self.plan = GatePlan(router, "gates-training", training=True)
        self.executor = Executor(self.transformer, self.plan, num_inference_steps=router.config.num_steps).attach()
        self.items = list(range(len(recordings) if cfg.rollout == "recorded" else len(chunks)))
        self.terms: list[torch.Tensor] = []
        self.hook = None
        if cfg.rollout != "recorded":  # outermost on the transformer: it routes each call the pipeline makes
            from diffusers.hooks import HookRegistry

            self.hook = StudentStepHook(self, scheduler_step_source(pipe.scheduler), router.config.num_steps)
            HookRegistry.check_if_exists_or_initialize(self.transformer).register_hook(self.hook, STUDENT_HOOK)
        self.last_latents: torch.Tensor | None = None  # the student rollout's final latents (for tests)
        self.step_weights = torch.ones(router.config.num_steps)  # IEPO's lambda_k (ones without it)
        self.raw_lambda: torch.Tensor | None = None  # IEPO's last lambda before its normalisation
        self.refreshing = False  # True while IEPO generates: calls run the gates only, nothing is trained
        self.calls = 0  # transformer calls of the current image rollout
        self.metrics: dict[str, torch.Tensor] = {}  # summed over this iteration's rollouts: the log's extras
        self.iterations = 0

    def __call__(self, router, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        self.plan.params = router()  # through the (DDP-wrapped) forward, so gradients are reduced across processes
        if self.cfg.iepo_every and self.iterations % self.cfg.iepo_every == 0:
            self.refresh_step_weights()
        self.iterations += 1
        if self.cfg.rollout != "recorded":
            seeds = torch.randint(0, 2**31 - 1, (len(idx),), generator=gen).tolist()  # fresh noise every rollout
            rollout = self.student_rollout if self.cfg.rollout == "student" else self.image_rollout
            losses = [rollout(int(j), s) for j, s in zip(idx, seeds)]
        else:
            losses = [self._recorded_rollout(int(j)) for j in idx]
        metrics = {k: v / len(idx) for k, v in self.metrics.items()}  # the log's averages (image rollouts)
        self.metrics = {}
        return torch.stack(losses).mean(), metrics

    def cost(self, block: int, comp: int | None) -> torch.Tensor:
        """A gate's share of a step's FLOPs: its component's, or its whole block's (`comp` None)."""
        return self.share[block].sum() if comp is None else self.share[block, comp]

    def student_rollout(self, i: int, seed: int) -> torch.Tensor:
        """Run the pipeline on prompt batch `i` (sample j seeded with seed + j) with the student deciding; returns
        the mean loss of its transformer calls."""
        self.terms = []
        self.last_latents = self._generate(self.chunks[i], seed)
        return torch.stack(self.terms).mean()

    def image_rollout(self, i: int, seed: int) -> torch.Tensor:
        """Generate prompt batch `i` (sample j seeded with seed + j) with the full model, then with the student
        under autograd; returns MSE(final latents) + rho * the mean FLOP share the gates computed per call."""
        self.plan.mode = "target"
        try:
            target = self._generate(self.chunks[i], seed)
        finally:
            self.plan.mode = "route"
        self.calls, aux = 0, []
        self.last_latents = self._generate(self.chunks[i], seed, grad=True, aux=aux)
        if not self.last_latents.requires_grad:
            raise RuntimeError(
                f"{type(self.pipe).__name__}'s sampling loop cuts autograd: --rollout image needs a pipeline "
                "whose loop can run with gradients; use --rollout student."
            )
        penalty = sum(self.cost(b, c) * m.float().mean() for b, c, m in aux) / max(self.calls, 1)
        mse = torch.nn.functional.mse_loss(self.last_latents.float(), target.float())
        for key, value in (("image_mse", mse), ("computed_flop_share", penalty)):
            self.metrics[key] = self.metrics.get(key, 0.0) + value.detach()
        return mse + self.cfg.rho * penalty

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

    def _generate(self, chunk: list[str], seed: int, grad: bool = False, aux: list | None = None) -> torch.Tensor:
        """One pipeline call on `chunk` (sample j seeded with seed + j) through the hook; its final latents. With
        `grad`, autograd runs through the whole loop and the gates' decisions of the call are appended to `aux`."""
        self.executor.end_call()  # a fresh cache for this trajectory
        self.hook.tracker.reset()
        gens = sample_generators(seed, range(len(chunk)), self.pipe.device)
        call = self.pipe.call_with_grad if grad else self.pipe
        out = call(chunk, generator=gens, output_type="latent", **self.call_kwargs)
        self.executor.end_call()
        if aux is not None:
            aux.extend(self.plan.aux)
        self.plan.aux.clear()
        return out[0] if isinstance(out, tuple) else out.images

    def on_call(self, step: int, branch: int, forward):
        """What the student hook does with one of the pipeline's transformer calls."""
        if self.refreshing or self.cfg.rollout == "image":  # the loss is taken after the whole call
            self.calls += 1
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
            penalty = sum(self.cost(b, c) * m.float().mean() for b, c, m in plan.aux)
            mse = torch.nn.functional.mse_loss(output_of(out).float(), target.float())
            self.terms.append(self.step_weights[step] * mse + self.cfg.rho * penalty)
        return out

    def close(self) -> None:
        if self.hook is not None:
            remove_hook(self.transformer, STUDENT_HOOK)
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


def input_widths(transformer, arch, call, ungated=UNGATED, level: str = "component") -> dict[str, int]:
    """Per component that can be gated (all but `ungated`): the channels of its input, read from one call. Block
    level: `{"block": the channels of the blocks' hidden states}`."""
    seen: dict[str, set] = {}
    hooks = []
    if level == "block":
        targets = [(block, BLOCK) for block in arch.blocks]
    else:
        named = [(m, arch.components[c]) for row in arch.modules for c, m in enumerate(row) if m is not None]
        targets = [(m, name) for m, name in named if name not in ungated]
    for module, name in targets:

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


def gate_groups(router: GateRouter, cfg: GateConfig):
    """The optimizer's groups: the biases (each gate's static part) at the run's rate, the weights (what reads the
    image) at `weight_lr_scale` times it; at 0 the weights stay at zero and the gates learn a static plan."""
    router.weight.requires_grad_(cfg.weight_lr_scale > 0)  # out of the gradient norm too, when frozen
    groups = lambda lr: [{"params": [router.bias], "lr": lr}]  # noqa: E731
    if cfg.weight_lr_scale == 0:
        return groups
    return lambda lr: groups(lr) + [{"params": [router.weight], "lr": lr * cfg.weight_lr_scale}]


def check(cfg: GateConfig) -> None:
    """Refuse settings that cannot train, before any work."""
    if cfg.rollout not in ROLLOUTS:
        raise ValueError(f"rollout {cfg.rollout!r}: one of {', '.join(ROLLOUTS)}")
    if cfg.iepo_every and cfg.rollout != "student":
        raise ValueError(
            "--iepo-every needs student rollouts (--rollout student): it weights their per-call losses "
            "(--rollout image already takes its loss on the final image)."
        )
    if cfg.weight_lr_scale < 0:
        raise ValueError(f"--weight-lr-scale {cfg.weight_lr_scale}: 0 or more (0: only the biases train)")
    if cfg.level not in LEVELS:
        raise ValueError(f"--level {cfg.level!r}: one of {', '.join(LEVELS)}")
    if cfg.level == "block" and cfg.cross_attention:
        raise ValueError("--cross-attention gates a component; --level block gates whole blocks (drop one of them).")


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
    if cfg.rollout == "image" and not hasattr(pipe, "call_with_grad"):
        raise ValueError(f"--rollout image needs a diffroute Routed*Pipeline; got {type(pipe).__name__}.")
    chunks = [prompts[i : i + cfg.prompts_per_batch] for i in range(0, len(prompts), cfg.prompts_per_batch)]
    # student rollouts record one batch only: its first call sizes the gates and counts the FLOPs
    recorded = prompts if cfg.rollout == "recorded" else chunks[0]
    recordings = record_calls(pipe, recorded, cfg.seed, call_kwargs, cfg.prompts_per_batch, outputs=True)
    first = recordings[0][0][0]
    cost = count_flops(transformer, arch, first[0], first[1])
    share = (cost.component_flops / cost.step_flops).float()  # [blocks, components]: each one's share of a step
    ungated = () if cfg.cross_attention else UNGATED
    dims = input_widths(transformer, arch, first, ungated, cfg.level)
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
        level=cfg.level,
    )
    if start is not None:
        router.init_from(start, present=arch.present())
    gated = router.config.gated
    loss = GateLoss(pipe, chunks, recordings, router, share, cfg, call_kwargs)
    # the rest of the pipeline frozen too: an image rollout runs the text encoder under autograd, and its weights
    # would otherwise get (and keep) gradients no optimizer steps on
    with requires_grad(pipeline_modules(pipe, but=transformer), False):
        train_router("gates", router, loss, cfg, transformer, out, accelerator, param_groups=gate_groups(router, cfg))
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
        "weight_lr_scale": cfg.weight_lr_scale,
        "iepo_weights": [round(float(w), 4) for w in loss.step_weights],
        "level": cfg.level,
        "gated": list(gated),
        "iters": cfg.iters,
        "prompts": len(prompts),
        "num_steps": num_steps,
        "scheduler": router.config.scheduler,
        # a step's FLOPs in the gated components: what the gates could save at most (the log's computed_flop_share
        # is what they computed)
        "gated_flop_share": float(
            share.sum() if cfg.level == "block" else share[:, [arch.components.index(c) for c in gated]].sum()
        ),
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
