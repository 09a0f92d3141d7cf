"""Per-image learned gates (LazyDiT, Shen et al. AAAI 2025): per step, block and gated component, one weight vector
`w` reading that sample's input to the component; the sample recomputes the component, or reuses its own cached
output, from what its image is doing at that step.

Mechanism as in LazyDiT's code (ROUTING.md §7): `s = sigmoid(sum over tokens and channels of w * Z)` with `Z` the
component's input (for PixArt and DiT: the adaLN-modulated norm, LazyDiT's gate input), `m = 1 - s` the probability
of computing, compute iff `m >= threshold` (0.5); zero-initialised, so m = 0.5 and everything computes at first
(bitwise the plain model). A skipped component returns that sample's cached output, written only when it computes;
the block's own gates and residuals still apply. Decisions are per sample (each CFG row its own), or per prompt
(`per_prompt`: both CFG rows of a sample together, computing where their mean m passes the threshold; the batch is
taken to be diffusers' `[unconditional rows, conditional rows]`). Cross-attention (`attn2`) has no adaLN gate and
always computes, as LazyDiT gates only attention and MLP, unless gated on request (`ungated=()`: its gate reads its
input hidden states; a deviation, so that the gates can reach what a static plan reuses).

Deviations: each gate has a bias (the static part of its decision; zero at first, or a static plan's schedule with
`init_from`, so that training starts from that plan), and the token pooling may be a mean (`pooling="mean"`: the
logit's scale then does not grow with the token count) where LazyDiT sums; the weights are indexed by the sampler's
step (one router per step count and scheduler, refused elsewhere); training (training/gates.py) rolls the student
through whole trajectories with the cache it would hold at inference (HarmoniCa's step-wise training) rather than
LazyDiT's one-step pairs, and its decisions are straight-through (hard in the forward, the gradient of m backward)
where LazyDiT trains soft blends and thresholds at inference: soft blends of 0.5 taught gates a cache inference
never has.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from diffroute.core.arch import ArchitectureMap
from diffroute.core.deciders import Decider, per_prompt
from diffroute.plans import Plan
from diffroute.routers.fit import TrainedRouterChecks

UNGATED = ("attn2",)  # cross-attention: no adaLN modulation to read; computed unless gated on request
POOLINGS = ("sum", "mean")  # over tokens: LazyDiT sums; a mean keeps the logit's scale apart from the token count


class GateRouter(ModelMixin, ConfigMixin):
    """One weight vector per (step, block, gated component); `compute_probability(step, block, g, Z)` is m."""

    @register_to_config
    def __init__(
        self,
        num_steps: int,
        num_blocks: int,
        components: tuple[str, ...],
        gated: tuple[str, ...],
        dims: tuple[int, ...],  # per gated component: the channels of its input
        model_class: str,
        scheduler: str = "",
        threshold: float = 0.5,
        per_prompt: bool = False,
        rho: float = 0.0,
        backbone_probe: list[float] | None = None,
        backbone_dtype: str = "",
        pooling: str = "sum",
    ):
        super().__init__()
        if len(dims) != len(gated):
            raise ValueError(f"one input width per gated component: {len(gated)} components, {len(dims)} widths")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r}: one of {', '.join(POOLINGS)}")
        self.weight = torch.nn.Parameter(torch.zeros(num_steps, num_blocks, len(gated), max(dims)))  # LazyDiT: zeros
        # A bias per gate (not in LazyDiT, whose gates read the input only): the static part of a decision, which a
        # static plan's schedule can initialise (`init_from`); zero, like the weights, computes everything.
        self.bias = torch.nn.Parameter(torch.zeros(num_steps, num_blocks, len(gated)))

    @classmethod
    def for_model(
        cls, arch: ArchitectureMap, num_steps: int, dims: dict, scheduler=None, ungated=UNGATED, **kwargs
    ) -> GateRouter:
        """Gates for `arch` at `num_steps` steps; `dims` maps each gated component to its input's channel count."""
        gated = tuple(c for c in arch.components if c not in ungated and c in dims)
        name = "" if scheduler is None else type(scheduler).__name__
        widths = tuple(int(dims[c]) for c in gated)
        return cls(num_steps, arch.num_blocks, tuple(arch.components), gated, widths, arch.model_class, name, **kwargs)

    def compute_probability(self, step: int, block: int, g: int, z: torch.Tensor, params=None) -> torch.Tensor:
        """m per sample: 1 - sigmoid(w . Z summed over channels and pooled over tokens (sum or mean), plus the
        bias). Z is [rows, tokens, dim] or, for convolutional FFNs, [rows, dim, H, W]. `params`: (weight, bias) as
        a (DDP-wrapped) forward returned them."""
        weight, bias = (self.weight, self.bias) if params is None else params
        w = weight[step, block, g, : self.config.dims[g]].to(z.dtype)
        if self.config.pooling == "sum":  # LazyDiT's
            logit = (z * w).sum(dim=(1, 2)) if z.ndim == 3 else torch.einsum("bchw,c->b", z, w)
        else:
            logit = (z * w).sum(2).mean(1) if z.ndim == 3 else torch.einsum("bchw,c->bhw", z, w).mean(dim=(1, 2))
        return 1 - torch.sigmoid(logit.float() + bias[step, block, g].float())

    def init_from(self, schedule, strength: float = 2.0) -> None:
        """Start from a static plan: each gate's bias says the schedule's decision (compute: -strength, reuse or
        forecast: +strength), so before training the gates run that schedule (forecasts become reuses)."""
        cols = [schedule.components.index(name) for name in self.config.gated]
        compute = schedule.compute[: self.config.num_steps][:, :, cols]
        with torch.no_grad():
            self.bias[: compute.shape[0]] = torch.where(compute, -strength, strength)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:  # (the trainer's DDP wrapper calls forward)
        return self.weight, self.bias


class GatePlan(TrainedRouterChecks, Plan):
    """Runs a GateRouter: the ungated components carry no hooks; each gated one decides per sample (or prompt)."""

    cache_history = 1

    def __init__(self, router: GateRouter, name: str = "gates", training: bool = False):
        self.router, self.name, self.training = router, name, training
        self.default_num_steps = router.config.num_steps
        self.mode = "route"  # "target": the full model (no decisions, cache untouched)
        self.params: tuple | None = None  # training: (weight, bias) as this iteration's forward returned them
        self.aux: list[tuple[int, int, torch.Tensor]] = []  # training: (block, component, m) of this call
        self.last_gated_step: int | None = None  # training (IEPO): the gates act up to this step, then all computes

    def check(self, arch: ArchitectureMap) -> None:
        from diffroute.errors import PlanError

        c = self.router.config
        fits = arch.model_class == c.model_class and arch.num_blocks == c.num_blocks
        if not fits or arch.components != tuple(c.components):
            raise PlanError(
                f"gates {self.name!r} were trained for {c.model_class} with {c.num_blocks} blocks, not "
                f"{arch.model_class} with {arch.num_blocks}: train gates for this model (`diffroute train gates`)."
            )

    def retrain_hint(self, num_steps: int | None) -> str:
        return f"train gates for {num_steps} steps (`diffroute train gates --steps {num_steps}`)."

    def always_computed(self, arch: ArchitectureMap) -> torch.Tensor:
        mask = arch.present().clone()
        for c, name in enumerate(arch.components):
            if name in self.router.config.gated:
                mask[:, c] = False
        return mask

    def content(self, arch: ArchitectureMap | None = None) -> dict:
        """Name plus the router's weights, hashed byte for byte (a sum of the weights let two routers collide)."""
        from diffroute.utils.fingerprint import modules_digest

        return {"plan": self.name, "router": modules_digest({"router": self.router})}

    def decider(self, arch: ArchitectureMap, num_steps: int) -> Decider:
        if not self.training:
            self.check_call(num_steps)
        return _GateDecider(self, arch)


class _GateDecider(Decider):
    reads_component_inputs = True

    def __init__(self, plan: GatePlan, arch: ArchitectureMap):
        self.plan, self.router = plan, plan.router
        cfg = self.router.config
        self.gate_of = {arch.components.index(name): g for g, name in enumerate(cfg.gated)}
        self.m: dict[tuple[int, int], torch.Tensor] = {}
        self.skipped = self.calls = 0

    def component_inputs(self, ctx, block, comp, hidden) -> None:
        g = self.gate_of.get(comp)
        # step 0 computes everything: nothing is cached before it
        if g is None or self.plan.mode == "target" or not 0 < ctx.step < self.router.config.num_steps:
            return
        if self.plan.last_gated_step is not None and ctx.step > self.plan.last_gated_step:
            return
        m = self.router.compute_probability(ctx.step, block, g, hidden, self.plan.params)
        m = per_prompt(m) if self.router.config.per_prompt else m
        self.m[(block, comp)] = m
        if self.plan.training:
            self.plan.aux.append((block, comp, m))

    def decide(self, ctx, block, comp):
        m = self.m.pop((block, comp), None)
        if m is None or self.plan.mode == "target":
            return True
        if self.plan.training:  # straight-through: the forward computes or reuses exactly as inference will, so
            # the rolled-out cache is inference's; gradients flow through m (w * fresh + (1 - w) * cached)
            hard = (m >= self.router.config.threshold).to(m.dtype)
            return hard + m - m.detach()
        compute = m >= self.router.config.threshold
        self.calls += compute.numel()
        self.skipped = self.skipped + (~compute).sum()  # on the device: read once, by info()
        return compute

    def must_store(self, ctx, block, comp) -> bool:
        return self.plan.mode != "target"

    def info(self) -> dict:
        return {"gated_calls": self.calls, "gated_skipped": int(self.skipped)}
