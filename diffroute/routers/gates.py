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

Block-level gates (`level="block"`; not in LazyDiT, which gates components only): one gate per (step, block) reading
the block's input, normalised per token as the block's first norm does (without its affine part or modulation: the
modulated input is made inside the block, after the decision), pooled over tokens. A sample that skips returns its
input plus the residual its block added when it last computed (cache-dit's and our executor's block reuse: nothing of
the block runs), so a skip costs ~2% of a full block where a component skip still runs the block's norms and
modulation. Components then always compute inside a running block (a block gate and component gates in one router
would make training's cache differ from inference's: training runs a reused block for its gradient).

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
from diffroute.core.deciders import Decider, SoftReuse, per_prompt
from diffroute.plans import Plan
from diffroute.routers.fit import TrainedRouterChecks

UNGATED = ("attn2",)  # cross-attention: no adaLN modulation to read; computed unless gated on request
POOLINGS = ("sum", "mean")  # over tokens: LazyDiT sums; a mean keeps the logit's scale apart from the token count
LEVELS = ("component", "block")  # what one gate decides: a component (LazyDiT) or a whole block (its residual)
BLOCK = "block"  # the gated name of a block-level router's one gate per block


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
        level: str = "component",
    ):
        super().__init__()
        if level not in LEVELS:
            raise ValueError(f"level {level!r}: one of {', '.join(LEVELS)}")
        if level == "block" and tuple(gated) != (BLOCK,):
            raise ValueError(f"block-level gates gate {BLOCK!r} only (one gate per block), not {gated}")
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
        """Gates for `arch` at `num_steps` steps; `dims` maps each gated component to its input's channel count
        (block level: `{"block": the blocks' hidden width}`)."""
        if kwargs.get("level") == "block":
            gated = (BLOCK,)
        else:
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

    def init_from(self, schedule, strength: float = 2.0, present: torch.Tensor | None = None) -> None:
        """Start from a static plan: each gate's bias says the schedule's decision (compute: -strength, reuse or
        forecast: +strength), so before training the gates run that schedule (forecasts become reuses). Block level:
        a block reuses where the schedule reuses it whole or reuses all its (`present`) components, else computes
        (in full: the gates run no component stand-ins)."""
        if self.config.level == "block":
            compute = ~schedule.with_block_reuse(present).block_reuse[: self.config.num_steps, :, None]
        else:
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
        self.aux: list[tuple[int, int | None, torch.Tensor]] = []  # training: (block, component or None, m)
        self.last_gated_step: int | None = None  # training (IEPO): the gates act up to this step, then all computes

    @property
    def whole_blocks(self) -> bool:
        return self.router.config.level == "block"

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
        if self.whole_blocks:  # components run whenever their block does, unhooked
            return super().always_computed(arch)
        mask = arch.present().clone()
        for c, name in enumerate(arch.components):
            if name in self.router.config.gated:
                mask[:, c] = False
        return mask

    def block_level(self, arch: ArchitectureMap) -> torch.Tensor:
        return torch.full((arch.num_blocks,), self.whole_blocks, dtype=torch.bool)

    def content(self, arch: ArchitectureMap | None = None) -> dict:
        """Name plus the router's weights, hashed byte for byte (a sum of the weights let two routers collide)."""
        from diffroute.utils.fingerprint import modules_digest

        return {"plan": self.name, "router": modules_digest({"router": self.router})}

    def decider(self, arch: ArchitectureMap, num_steps: int) -> Decider:
        if not self.training:
            self.check_call(num_steps)
        return _GateDecider(self, arch)


class _GateDecider(Decider):
    """Component gates (`component_inputs`, `decide`) or block gates (`block_inputs`, `decide_block`), per the
    router's level; `aux` (training) gets (block, component index or None for the whole block, m)."""

    def __init__(self, plan: GatePlan, arch: ArchitectureMap):
        self.plan, self.router = plan, plan.router
        cfg = self.router.config
        self.reads_block_inputs = plan.whole_blocks
        self.reads_component_inputs = not plan.whole_blocks
        self.gate_of = {} if plan.whole_blocks else {arch.components.index(name): g for g, name in enumerate(cfg.gated)}
        self.m: dict[tuple[int, int | None], torch.Tensor] = {}
        self.skipped = self.calls = 0

    def _gating(self, step: int) -> bool:
        """Whether the gates act at `step`: never at step 0 (nothing is cached before it), nor for the target."""
        if self.plan.mode == "target" or not 0 < step < self.router.config.num_steps:
            return False
        return self.plan.last_gated_step is None or step <= self.plan.last_gated_step

    def _read(self, step: int, block: int, comp: int | None, g: int, z: torch.Tensor) -> None:
        m = self.router.compute_probability(step, block, g, z, self.plan.params)
        m = per_prompt(m) if self.router.config.per_prompt else m
        self.m[(block, comp)] = m
        if self.plan.training:
            self.plan.aux.append((block, comp, m))

    def component_inputs(self, ctx, block, comp, hidden) -> None:
        g = self.gate_of.get(comp)
        if g is not None and self._gating(ctx.step):
            self._read(ctx.step, block, comp, g, hidden)

    def block_inputs(self, ctx, block, arguments) -> None:
        if self._gating(ctx.step):  # the block's input as its first norm sees it, before the modulation
            x = arguments["hidden_states"]
            self._read(ctx.step, block, None, 0, torch.nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6))

    def _decision(self, key):
        m = self.m.pop(key, None)
        if m is None or self.plan.mode == "target":
            return None
        if self.plan.training:  # straight-through: the forward computes or reuses exactly as inference will, so
            # the rolled-out cache is inference's; gradients flow through m (w * fresh + (1 - w) * cached)
            hard = (m >= self.router.config.threshold).to(m.dtype)
            return hard + m - m.detach()
        compute = m >= self.router.config.threshold
        self.calls += compute.numel()
        self.skipped = self.skipped + (~compute).sum()  # on the device: read once, by info()
        return compute

    def decide(self, ctx, block, comp):
        d = self._decision((block, comp))
        return True if d is None else d

    def decide_block(self, ctx, block):
        d = self._decision((block, None))
        if d is None:
            return True
        return SoftReuse(d) if d.is_floating_point() else d  # (a float tensor alone would read as Elastic's gate)

    def must_store(self, ctx, block, comp) -> bool:
        return self.plan.mode != "target"

    def must_store_block(self, ctx, block) -> bool:
        return self.plan.mode != "target"

    def info(self) -> dict:
        return {"gated_calls": self.calls, "gated_skipped": int(self.skipped)}
