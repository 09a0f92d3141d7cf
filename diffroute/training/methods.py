"""The registry of training methods: `diffroute train NAME` finds its settings, its trainer and what it trains on
here. A new method is its config (configs.py), its objective module and one `register_method` call.

Trainers are named as "module:function" and imported on use, so that listing the methods (the CLI's help) loads no
torch.
"""

from __future__ import annotations

import importlib
from dataclasses import MISSING, dataclass, field, fields

from diffroute.training import configs


@dataclass(frozen=True)
class Method:
    """One trainable method. `kind`: "router" (a decider trained on the model's own sampling trajectories, the
    transformer frozen or fine-tuned with it) or "data" (a changed transformer trained on the emoji data)."""

    name: str
    help: str
    config: type
    trainer: str  # "module:function"
    kind: str
    fixed: dict = field(default_factory=dict)  # config fields the method sets itself (LoRA: one expert, no FECL)
    check: str | None = None  # "module:function" refusing a bad config before any work
    overrides: dict = field(default_factory=dict)  # this method's own defaults where the config's do not fit it

    def defaults(self) -> dict:
        """The config's defaults (with this method's overrides), which the CLI shows and uses."""
        found = {f.name: f.default for f in fields(self.config) if f.default is not MISSING}
        return {k: v for k, v in {**found, **self.overrides}.items() if k not in self.fixed}

    def make_config(self, values) -> object:
        """The config from an argparse namespace (or any object) with attributes of the fields' names."""
        chosen = {f.name: getattr(values, f.name) for f in fields(self.config) if hasattr(values, f.name)}
        config = self.config(**{**chosen, **self.fixed})
        if self.check is not None:
            _resolve(self.check)(config)
        return config

    def train(self, *args, **kwargs):
        return _resolve(self.trainer)(*args, **kwargs)


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> None:
    if method.kind not in ("router", "data"):
        raise ValueError(f"a method's kind is 'router' or 'data', not {method.kind!r}")
    METHODS[method.name] = method


for _method in (
    Method(
        "l2c",
        "Learning-to-Cache: per-step logits deciding which components may reuse",
        configs.L2CConfig,
        "diffroute.training.l2c:train_l2c",
        "router",
    ),
    Method(
        "gates",
        "LazyDiT-style per-image gates: per step, block and component, from that sample's input (per sample)",
        configs.GateConfig,
        "diffroute.training.gates:train_gates",
        "router",
        check="diffroute.training.gates:check",
    ),
    Method(
        "elastic",
        "Elastic-DiT-style per-sample block skip and MLP-width router",
        configs.ElasticConfig,
        "diffroute.training.elastic:train_elastic",
        "router",
    ),
    Method(
        "moe",
        "upcycle the FFNs into expert-choice MoE and fine-tune (or a dense / pruned baseline)",
        configs.MoEConfig,
        "diffroute.training.moe:train_moe",
        "data",
        check="diffroute.training.moe:check",
    ),
    Method(
        "dar",
        "DAR: blocks read a timestep-adaptive mixture of all earlier outputs (retrofit fine-tune or from scratch)",
        configs.StreamConfig,
        "diffroute.training.streams:train_streams",
        "data",
        fixed={"method": "dar", "beta": 0.8, "alpha": 4.0},
        check="diffroute.training.streams:check",
    ),
    Method(
        "dtr",
        "DTR: timestep-dependent channel windows (from scratch by default)",
        configs.StreamConfig,
        "diffroute.training.streams:train_streams",
        "data",
        fixed={"method": "dtr", "mode": "retrofit", "query": "static+t"},
        overrides={"init": "scratch"},
        check="diffroute.training.streams:check",
    ),
    Method(
        "plain",
        "the baseline: the same training without any change (fine-tune or from scratch)",
        configs.StreamConfig,
        "diffroute.training.streams:train_streams",
        "data",
        fixed={"method": "plain", "mode": "retrofit", "query": "static+t", "beta": 0.8, "alpha": 4.0},
        check="diffroute.training.streams:check",
    ),
    Method(
        "expert",
        "one decentralized expert: the model fine-tuned on one cluster of a partition, in isolation",
        configs.ExpertConfig,
        "diffroute.training.experts:train_expert",
        "data",
        check="diffroute.training.experts:check_expert",
    ),
    Method(
        "experts-router",
        "the router of an expert ensemble (cluster of the clean sample from x_t, t, caption); saves the ensemble",
        configs.ExpertRouterConfig,
        "diffroute.training.experts:train_router",
        "data",
        check="diffroute.training.experts:check_router",
    ),
    Method(
        "fera",
        "FeRA: LoRA experts routed by the latent's frequency-band energies, adapting to a domain (Symbola)",
        configs.AdapterConfig,
        "diffroute.training.adapters:train_adapter",
        "data",
        fixed={"method": "fera"},
        overrides={"domain": "symbola"},
    ),
    Method(
        "lora",
        "the adaptation baseline: one peft LoRA on the same attention projections",
        configs.AdapterConfig,
        "diffroute.training.adapters:train_adapter",
        "data",
        fixed={"method": "lora", "num_experts": 1, "fecl": 0.0, "balance": 0.0},
        overrides={"domain": "symbola", "rank": 12},
    ),
):
    register_method(_method)
