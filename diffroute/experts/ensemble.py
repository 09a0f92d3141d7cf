"""`ExpertEnsemble`: K expert transformers and a router, a drop-in transformer for the pipelines (DDM inference).

At every call the router reads each sample's noisy latent, timestep and pooled caption and picks its expert(s):
`top1` (DDM's default: the argmax expert only), `topk` (the k best, their softmax weights renormalised), `full`
(every expert, softmax-weighted: DDM Eq. 4). Two baselines for evaluation skip the router: `random` (an expert
drawn per sample and step, which DDM shows collapses) and `expert:I` (expert I alone). Each expert runs once per
call on the rows routed to it (a sub-batch: no compute for rows it does not own), so a step costs one expert per
sample (top-1) plus the router. Inside our pipelines with classifier-free guidance, a sample's unconditional row
follows its conditional row (guidance stays inside one expert; the router reads the caption), so a sample's image
never depends on its batch-mates. Called bare, every row is routed on its own.

Caching plans apply per expert (`diffroute.apply(pipe, plan)`; see `core.parts`): each expert has its own cache and
decider state, kept per set of samples it ran. `last_routing` records which expert served each row at each step.
Linear mixing (`topk`, `full`) needs experts of one parametrisation (same scheduler and prediction type), which
experts fine-tuned from one model have.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from diffroute.core.call_context import paired_rows
from diffroute.core.context import StepTracker
from diffroute.errors import InputError
from diffroute.experts.router import ExpertRouter
from diffroute.utils.quiet import cast_model

SELECTIONS = ("top1", "topk", "full", "random")
# the expert's config fields the pipelines read from `transformer.config`, mirrored in the ensemble's config
MIRRORED = ("sample_size", "in_channels", "out_channels", "patch_size")


def check_selection(selection: str, num_experts: int, top_k: int = 2) -> None:
    """Refuse an unknown selection, an expert index out of range or a k that does not fit, with a message."""
    if selection.startswith("expert:"):
        index = selection.partition(":")[2]
        if not index.isdigit() or int(index) >= num_experts:
            raise InputError(f"selection {selection!r}: the expert index must be 0..{num_experts - 1}.")
        return
    if selection not in SELECTIONS:
        raise InputError(f"unknown selection {selection!r}; known: {', '.join(SELECTIONS)}, expert:I.")
    if selection == "topk" and not 1 <= top_k <= num_experts:
        raise InputError(f"top_k must be from 1 to {num_experts} (the experts); got {top_k}.")


@dataclass
class Routing:
    """Which expert served each row at each step of the last call: `experts[step][row]` (top-1; for `topk`/`full`
    the heaviest), `weights[step]` [rows, K], `timesteps[step]`, and the router's share of the call's FLOPs."""

    experts: list[list[int]] = field(default_factory=list)
    weights: list[torch.Tensor] = field(default_factory=list)
    timesteps: list[float] = field(default_factory=list)

    def switches(self) -> list[int]:
        """Per row: how often its expert changed along the trajectory."""
        if not self.experts:
            return []
        e = torch.tensor(self.experts)
        return (e[1:] != e[:-1]).sum(0).tolist()


class ExpertEnsemble(ModelMixin, ConfigMixin):
    """K experts of one transformer class and an `ExpertRouter`; called like the expert class."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        expert_class: str = "PixArtTransformer2DModel",
        expert_config: dict | None = None,
        num_experts: int = 2,
        router_config: dict | None = None,
        selection: str = "top1",
        top_k: int = 2,
        seed: int = 0,
        sample_size: int | None = None,
        in_channels: int | None = None,
        out_channels: int | None = None,
        patch_size: int | None = None,
    ):
        super().__init__()
        import diffusers

        if not 2 <= num_experts <= 64:
            raise InputError(f"an ensemble has 2 to 64 experts; got {num_experts}.")
        check_selection(selection, num_experts, top_k)
        cls = getattr(diffusers, expert_class, None)
        if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
            raise InputError(f"expert_class {expert_class!r} is not a diffusers model class.")
        expert_config = {k: v for k, v in (expert_config or {}).items() if not k.startswith("_")}
        self.experts = torch.nn.ModuleList(cls.from_config(expert_config) for _ in range(num_experts))
        router_config = {k: v for k, v in (router_config or {}).items() if not k.startswith("_")}
        self.router = ExpertRouter(**{**router_config, "num_experts": num_experts})
        self.register_to_config(**{k: expert_config.get(k) for k in MIRRORED})
        self.selection, self.top_k = selection, top_k
        self.last_routing = Routing()
        self._tracker = StepTracker()

    @classmethod
    def from_experts(cls, experts: list[torch.nn.Module], router: ExpertRouter, **kwargs) -> ExpertEnsemble:
        """An ensemble holding copies of `experts`' weights and `router`'s."""

        def public(config):
            return {k: v for k, v in dict(config).items() if not k.startswith("_")}

        first = experts[0]
        ensemble = cls(
            expert_class=type(first).__name__,
            expert_config=public(first.config),
            num_experts=len(experts),
            router_config=public(router.config),
            **kwargs,
        )

        for mine, theirs in zip(ensemble.experts, experts):
            if public(theirs.config) != public(first.config) or type(theirs) is not type(first):
                raise InputError("every expert must have the same class and configuration.")
            mine.load_state_dict(theirs.state_dict())
        ensemble.router.load_state_dict(router.state_dict())
        # eval, as from_pretrained loads it: the router's torch encoder takes its fused path only in eval mode, and
        # the two paths round differently
        return cast_model(ensemble.eval(), first.dtype)

    def set_selection(self, selection: str, top_k: int | None = None) -> None:
        """Choose how experts are picked from now on (saved with the model)."""
        top_k = self.top_k if top_k is None else top_k
        check_selection(selection, len(self.experts), top_k)
        self.selection, self.top_k = selection, top_k
        self.register_to_config(selection=selection, top_k=top_k)

    def diffroute_parts(self) -> list[torch.nn.Module]:
        """The transformers a caching plan routes (one executor each: see `core.parts`)."""
        return list(self.experts)

    # ---- routing ---------------------------------------------------------------------------------------------------
    def route(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None) -> torch.Tensor:
        """Weights [N, K] per row (zero: that expert does not run for the row)."""
        n, k = hidden_states.shape[0], len(self.experts)
        t = _per_row(timestep, n, hidden_states.device)
        if self.selection.startswith("expert:"):
            w = torch.zeros(n, k, device=hidden_states.device)
            w[:, int(self.selection.partition(":")[2])] = 1
            return w
        if self.selection == "random":  # seeded per step (the timestep), the same draw for a sample's two rows
            g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + int(t[0].item()))
            rows = n // 2 if paired_rows() and n % 2 == 0 else n
            pick = torch.randint(k, (rows,), generator=g)
            pick = torch.cat([pick, pick]) if rows != n else pick
            return torch.nn.functional.one_hot(pick, k).float().to(hidden_states.device)
        paired = bool(paired_rows()) and n % 2 == 0
        half = slice(n // 2, n) if paired else slice(0, n)  # route on the conditional rows
        mask = encoder_attention_mask[half] if encoder_attention_mask is not None else None
        logits = self.router(hidden_states[half], t[half], encoder_hidden_states[half], mask)
        probs = logits.softmax(-1)
        if self.selection == "top1":
            w = torch.nn.functional.one_hot(probs.argmax(-1), k).float()
        elif self.selection == "topk":
            top = probs.topk(self.top_k, dim=-1)
            w = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
            w = w / w.sum(-1, keepdim=True)
        else:
            w = probs
        return torch.cat([w, w]) if paired else w

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        added_cond_kwargs: dict | None = None,
        cross_attention_kwargs: dict | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        n = hidden_states.shape[0]
        parts = getattr(self, "_diffroute_executor", None)  # a caching plan over the experts (core.parts)
        if parts is not None:
            parts.begin(timestep, n)
        _, new_call = self._tracker.advance(timestep, n)
        if new_call:
            self.last_routing = Routing()
        with torch.no_grad():
            weights = self.route(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask)
        per_row = dict(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            timestep=_per_row(timestep, n, hidden_states.device) if timestep is not None else None,
            attention_mask=attention_mask,
            encoder_attention_mask=encoder_attention_mask,
        )
        shared = dict(added_cond_kwargs=added_cond_kwargs, cross_attention_kwargs=cross_attention_kwargs)
        out = None
        used = (weights > 0).any(0).nonzero().flatten().tolist()
        for e in used:
            rows = (weights[:, e] > 0).nonzero().flatten()
            every_row = len(rows) == n
            # All rows: the caller's tensors themselves, so that the expert's text projection, memoised per tensor
            # (core/invariant.py), computes once per call instead of at every step.
            args = {
                k: v.index_select(0, rows) if torch.is_tensor(v) and not every_row else v for k, v in per_row.items()
            }
            run = parts.run_part(e, tuple(rows.tolist())) if parts is not None else contextlib.nullcontext()
            with run:
                y = self.experts[e](**args, **shared, return_dict=False)[0]
            if out is None:
                out = torch.zeros((n, *y.shape[1:]), dtype=y.dtype, device=y.device)
            if len(used) == 1 and bool((weights[rows, e] == 1).all()):  # one expert, weight 1: its exact output
                out.index_copy_(0, rows, y)
            else:
                out.index_add_(0, rows, y * weights[rows, e].to(y.dtype).view(-1, *[1] * (y.ndim - 1)))
        self.last_routing.experts.append(weights.argmax(-1).tolist())
        self.last_routing.weights.append(weights.cpu())
        self.last_routing.timesteps.append(float(_per_row(timestep, n, "cpu")[0]) if timestep is not None else 0.0)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)


def _per_row(timestep, n: int, device) -> torch.Tensor:
    t = torch.as_tensor(timestep if timestep is not None else 0, device=device).reshape(-1)
    return t.expand(n) if t.numel() == 1 else t


def is_ensemble_folder(folder) -> bool:
    """True for a transformer folder saved by `ExpertEnsemble.save_pretrained`."""
    import json
    from pathlib import Path

    config = Path(folder) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text()).get("_class_name") == ExpertEnsemble.__name__
    except (ValueError, AttributeError):
        return False


def load_ensemble(folder, dtype: torch.dtype | None = None) -> ExpertEnsemble:
    """An ensemble saved in `folder`, from an untrusted folder: its config is checked against the weights' header
    on the meta device before anything is allocated, then the weights are read strictly (safetensors only)."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    from diffroute.utils.checked_load import check_against_weights, check_config_values
    from diffroute.utils.quiet import cast_model

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{folder} has no readable config.json: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("expert_config", {}), dict):
        raise InputError(f"{folder}/config.json is not an ensemble's config.")
    check_config_values(config, str(folder))
    check_config_values(config.get("expert_config") or {}, f"{folder} (expert_config)")
    check_config_values(config.get("router_config") or {}, f"{folder} (router_config)")
    weights = sorted(folder.glob("*.safetensors"))
    if len(weights) != 1:
        raise InputError(f"{folder} should hold one .safetensors weights file; found {len(weights)}")

    def build():
        return ExpertEnsemble.from_config(config)

    check_against_weights(build, weights[0], str(folder))
    model = build()
    state = load_file(weights[0])
    model.load_state_dict(state, strict=True)
    stored = next(v.dtype for v in state.values() if v.is_floating_point())
    return cast_model(model.eval(), dtype or stored)
