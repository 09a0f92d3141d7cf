"""Elastic-DiT-style router (arXiv 2602.13993): per block and per sample, skip the block or run its MLP at a width.

One small gate per block reads the block's input tokens, modulated by the router's own adaLN from the timestep
(shift/scale on LN(x)), through `Linear(d -> h) + ReLU`, mean-pooled over tokens per sample, into a skip logit and
logits over MLP widths {1/4, 1/2, 3/4, 1} (prefix masks of the hidden units). Training uses hard straight-through
gates (forward `1[sigma(z) > 0.5]`, gradient of sigma) and a straight-through one-hot over widths; inference takes
the same hard decisions per sample (never the reference code's batch mean) and runs them for real: skipped samples
return the block's input, kept ones run the block with its MLP sliced to the chosen width.

Deviations, on purpose: the router embeds the timestep itself (sinusoidal + MLP) from our step context, instead of
reading a model-specific `temb` and inferring the step from its mean (fragile, and it leaks state between calls);
the training-free borderline block cache of the reference is left out.
"""

from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import Timesteps

from diffroute.core.arch import ArchitectureMap
from diffroute.core.deciders import Decider
from diffroute.core.decisions import SkipRows, SoftWidth, Width
from diffroute.core.width import hidden_units
from diffroute.errors import PlanError
from diffroute.plans import Plan
from diffroute.routers.fit import TrainedRouterChecks


class RouteGate(torch.nn.Module):
    """One block's gate: adaLN(LN(x), t) -> Linear + ReLU -> mean over tokens -> (skip logit, width logits)."""

    def __init__(self, dim: int, hidden: int, num_widths: int, time_dim: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim, elementwise_affine=False)
        self.ada = torch.nn.Linear(time_dim, 2 * dim)
        self.proj = torch.nn.Linear(dim, hidden)
        self.skip = torch.nn.Linear(hidden, 1)
        self.width = torch.nn.Linear(hidden, num_widths)
        torch.nn.init.zeros_(self.ada.weight)  # no modulation at the start
        torch.nn.init.zeros_(self.ada.bias)
        for head in (self.skip, self.width):
            torch.nn.init.normal_(head.weight, std=1e-3)
        torch.nn.init.constant_(self.skip.bias, math.log(0.7 / 0.3))  # keep probability 0.7, as the reference
        with torch.no_grad():
            self.width.bias.zero_()
            self.width.bias[-1] = 2.0  # full width favoured, as the reference

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shift, scale = self.ada(temb).unsqueeze(1).chunk(2, dim=-1)
        h = torch.relu(self.proj(self.norm(x) * (1 + scale) + shift)).mean(dim=1)
        return self.skip(h).squeeze(-1), self.width(h)


class ElasticRouter(ModelMixin, ConfigMixin):
    """A RouteGate per block plus the router's own timestep embedding."""

    @register_to_config
    def __init__(
        self,
        num_blocks: int,
        dim: int,
        model_class: str,
        hidden: int = 32,
        widths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0),
        time_dim: int = 64,
        num_steps: int = 20,
        scheduler: str = "",
        backbone_probe: list[float] | None = None,  # routing/backbone.py: the weights it was trained on
        backbone_dtype: str = "",
    ):
        super().__init__()
        self.time_proj = Timesteps(time_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_mlp = torch.nn.Sequential(torch.nn.Linear(time_dim, time_dim), torch.nn.SiLU())
        self.gates = torch.nn.ModuleList(RouteGate(dim, hidden, len(widths), time_dim) for _ in range(num_blocks))

    @classmethod
    def for_model(cls, transformer, num_steps: int, scheduler=None, **kwargs) -> ElasticRouter:
        from diffroute.core.arch import architecture_map

        arch = architecture_map(transformer)
        dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        name = "" if scheduler is None else type(scheduler).__name__
        return cls(arch.num_blocks, dim, arch.model_class, num_steps=num_steps, scheduler=name, **kwargs)

    def embed_time(self, timestep, rows: int, device) -> torch.Tensor:
        t = torch.as_tensor(timestep, device=device).float().reshape(-1)
        t = t.expand(rows) if t.numel() == 1 else t
        return self.time_mlp(self.time_proj(t).to(self.dtype))

    def forward(self, block: int, tokens: torch.Tensor, timestep) -> tuple[torch.Tensor, torch.Tensor]:
        """(skip logits [samples], width logits [samples, widths]) for `block` on its input tokens."""
        temb = self.embed_time(timestep, tokens.shape[0], tokens.device)
        return self.gates[block](tokens.to(self.dtype), temb)


def straight_through(probability: torch.Tensor) -> torch.Tensor:
    """Forward: 1 where probability > 0.5, else 0; backward: the gradient of the probability."""
    hard = (probability > 0.5).to(probability.dtype)
    return hard + probability - probability.detach()


def straight_through_one_hot(logits: torch.Tensor) -> torch.Tensor:
    """Forward: one-hot of the argmax; backward: the gradient of the softmax."""
    soft = logits.softmax(dim=-1)
    hard = torch.nn.functional.one_hot(soft.argmax(dim=-1), soft.shape[-1]).to(soft.dtype)
    return hard + soft - soft.detach()


class ElasticPlan(TrainedRouterChecks, Plan):
    """Every block decided as a whole by the router, and the FFN inside a kept block at the router's width.

    `training=True`: soft gates (straight-through) through the executor's soft block gate and masked FFN, and each
    call's keep probabilities and expected widths are appended to `aux` (the side channel the budget loss reads)."""

    decides_components_in_blocks = True

    def __init__(self, router: ElasticRouter, name: str = "elastic", training: bool = False):
        self.router, self.name, self.training = router, name, training
        self.default_num_steps = router.config.num_steps
        self.aux: list[dict] = []

    def check(self, arch: ArchitectureMap) -> None:
        cfg = self.router.config
        if (arch.model_class, arch.num_blocks) != (cfg.model_class, cfg.num_blocks):
            raise PlanError(
                f"router {self.name!r} was made for {cfg.model_class} with {cfg.num_blocks} blocks; the model is "
                f"{arch.model_class} with {arch.num_blocks}. Train one for this model."
            )

    def retrain_hint(self, num_steps: int | None) -> str:
        # Its budget r(t) and gates were trained on this sampler's timesteps; other step counts are untested.
        return f"train one for {num_steps} steps (`diffroute train elastic --steps {num_steps}`)."

    def block_level(self, arch: ArchitectureMap) -> torch.Tensor:
        return torch.ones(arch.num_blocks, dtype=torch.bool)

    def content(self, arch: ArchitectureMap | None = None) -> dict:
        """Name plus the router's weights (so that resumable results made with another router are not reused)."""
        from diffroute.utils.fingerprint import modules_digest

        return {"plan": self.name, "router": modules_digest({"router": self.router})}

    def always_computed(self, arch: ArchitectureMap) -> torch.Tensor:
        """Everything but the FFNs that can be sliced (those take width decisions)."""
        mask = arch.present().clone()
        for b, c in ffn_cells(arch):
            mask[b, c] = False
        return mask

    def decider(self, arch: ArchitectureMap, num_steps: int) -> Decider:
        self.check_call(num_steps)
        return _ElasticDecider(self, arch)


def ffn_cells(arch: ArchitectureMap) -> list[tuple[int, int]]:
    """(block, component) of each FFN that width decisions can slice (diffusers FeedForward with GELU/linear)."""
    cells = []
    for b, row in enumerate(arch.modules):
        for c, module in enumerate(row):
            try:
                hidden_units(module)
            except PlanError:
                continue
            cells.append((b, c))
    return cells


class _ElasticDecider(Decider):
    reads_block_inputs = True

    def __init__(self, plan: ElasticPlan, arch: ArchitectureMap):
        self.plan, self.router, self.arch = plan, plan.router, arch
        self.ffn_of_block = dict(ffn_cells(arch))
        self.widths = torch.tensor(plan.router.config.widths)
        self._keep: dict[int, torch.Tensor] = {}
        self._width: dict[int, torch.Tensor] = {}
        self._kept: torch.Tensor | None = None

    def block_inputs(self, ctx, block, arguments):
        skip_logit, width_logits = self.router(block, arguments["hidden_states"], ctx.timestep)
        prob = torch.sigmoid(skip_logit.float())
        if self.plan.training:
            self._keep[block] = straight_through(prob)
            self._width[block] = straight_through_one_hot(width_logits.float())
            widths = self.widths.to(prob.device)
            expected = (width_logits.float().softmax(dim=-1) * widths).sum(-1)  # soft expected width, as the reference
            self.plan.aux.append(
                {"step": ctx.step, "block": block, "keep": prob, "open": self._keep[block], "width": expected}
            )
        else:
            self._keep[block] = prob > 0.5
            self._width[block] = self.widths.to(prob.device)[width_logits.argmax(dim=-1)]
            self._tally(self._keep[block], self._width[block])

    def _tally(self, keep: torch.Tensor, width: torch.Tensor) -> None:
        """Per row of the batch (each CFG row too): blocks kept and their widths, for `info()`'s histogram data."""
        if self._kept is None or self._kept.shape != keep.shape:
            self._kept, self._widths, self._seen = torch.zeros_like(width), torch.zeros_like(width), 0
        self._kept += keep.to(width.dtype)
        self._widths += keep.to(width.dtype) * width
        self._seen += 1

    def info(self) -> dict:
        if self._kept is None:
            return {}
        return {
            "per_sample_block_fraction": (self._kept / self._seen).tolist(),
            "per_sample_mean_width": (self._widths / self._kept.clamp_min(1)).tolist(),
        }

    def decide_block(self, ctx, block):
        return self._keep[block] if self.plan.training else SkipRows(self._keep[block])

    def must_store_block(self, ctx, block):
        return False

    def decide(self, ctx, block, comp):
        if self.ffn_of_block.get(block) != comp:
            return True
        if self.plan.training:
            units = hidden_units(self.arch.modules[block][comp])
            prefix = _prefix_masks(self.router.config.widths, units, self._width[block].device)  # [widths, units]
            return SoftWidth(self._width[block] @ prefix)
        return Width(self._width[block])


def _prefix_masks(widths, units: int, device) -> torch.Tensor:
    ks = [max(1, round(w * units)) for w in widths]
    return (torch.arange(units, device=device)[None, :] < torch.tensor(ks, device=device)[:, None]).float()
