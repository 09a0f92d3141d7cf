"""Fine-tuning an upcycled (or a baseline) emoji transformer on the emoji data: epsilon-MSE + a router logit penalty,
progressive sparsification.

Variants, trained by the same loop (`routing/finetune.py`) on the same batches and seeds so that they compare:
- `moe`: slice-upcycled expert-choice MoE at the target capacity schedule. Progressive sparsification (Nucleus /
  DiffMoE): dense (k = E) for the first `dense_until` of the steps, then k decays linearly to the schedule by
  `sparse_from`; router logit penalty `router_loss * mean(z^2)` (weighted as EC-DLM's z-loss, 1e-3; a softmax
  z-loss does not fit sigmoid gates, see surgery/moe/layer.py); routers start at zero, so step 0 is the dense model;
- `dense`: the dense model fine-tuned for the same steps (the quality ceiling);
- `pruned`: the FFNs cut to their strongest hidden units by magnitude (`pruned_slices` of the
  `num_experts + shared` slices dropped: 4 of 8 = the MoE's 50% FFN FLOPs at k = 2), fine-tuned the same.
The result is a pipeline folder (`out/model`), loadable by `load_pipeline`; `--ship` installs the MoE as a zoo
variant (`emoji-moe`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffroute.surgery.moe.upcycle import moe_layers, upcycle_moe
from diffroute.training.configs import MoEConfig
from diffroute.training.finetune import Student, train_on_data

VARIANTS = ("moe", "dense", "pruned")


def check(cfg: MoEConfig) -> None:
    """Refuse settings that cannot train, before any work."""
    from diffroute.surgery.moe import parse_capacity

    if not 0 <= cfg.dense_until <= cfg.sparse_from <= 1:
        raise ValueError("need 0 <= --dense-until <= --sparse-from <= 1.")
    parse_capacity(cfg.capacity).check(cfg.num_experts)


def prepare(transformer, cfg: MoEConfig):
    """Apply the variant's swap to the emoji transformer (blocks 1..5; block 0 stays dense)."""
    torch.manual_seed(cfg.seed)  # the routers' initialisation, the same in every process and every run
    if cfg.variant == "moe":
        init = cfg.router_init_std
        upcycle_moe(transformer, cfg.num_experts, cfg.shared, capacity=cfg.capacity, router_init_std=init)
    elif cfg.variant == "pruned":
        kept = cfg.num_experts + cfg.shared - cfg.pruned_slices
        upcycle_moe(transformer, 0, kept, prune=cfg.pruned_slices)
    return transformer


def dense_mix(cfg: MoEConfig, step: int, steps: int) -> float:
    """Progressive sparsification: 1 (dense) until `dense_until`, then linear to 0 at `sparse_from`."""
    p = step / max(steps, 1)
    if p < cfg.dense_until:
        return 1.0
    return max(0.0, (cfg.sparse_from - p) / max(cfg.sparse_from - cfg.dense_until, 1e-9))


def train_moe(pipe, cfg: MoEConfig, out: Path, accelerator) -> dict:
    """Fine-tune `pipe`'s transformer as `cfg.variant` (resumable from `out`); saves `out/model`; returns a summary."""
    transformer = prepare(pipe.transformer, cfg)
    layers = moe_layers(transformer)

    def on_step(step: int, steps: int) -> None:
        for layer in layers:
            layer.dense_mix = dense_mix(cfg, step, steps)

    def router_loss():
        z = [layer.last_router_loss for layer in layers if layer.last_router_loss is not None]
        for layer in layers:
            layer.last_router_loss = None  # this step's graph only
        return cfg.router_loss * torch.stack(z).mean() if z and cfg.router_loss else None

    student = Student(transformer, on_step)
    summary = train_on_data(pipe, student, cfg, out, accelerator, f"moe:{cfg.variant}", router_loss)
    return {"variant": cfg.variant, **summary}
