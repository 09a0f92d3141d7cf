"""Fine-tuning an upcycled (or a baseline) emoji transformer on the emoji data: epsilon-MSE + z-loss, progressive
sparsification.

Variants, trained by the same loop on the same batches and seeds so that they compare:
- `moe`: slice-upcycled expert-choice MoE at the target capacity schedule. Progressive sparsification (Nucleus /
  DiffMoE): dense (k = E) for the first `dense_until` of the steps, then k decays linearly to the schedule by
  `sparse_from`; router z-loss `z_loss * mean(logsumexp(z)^2)` (EC-DLM's 1e-3);
- `dense`: the dense model fine-tuned for the same steps (the quality ceiling);
- `pruned`: the FFNs cut to their strongest `pruned_keep` of hidden units by magnitude, fine-tuned the same (equal
  FLOPs to the MoE at k = 2 of 6 with 2 shared slices: 4 of 8 slices).
The result is a pipeline folder (`out/model`), loadable by `load_pipeline`; `--ship` installs the MoE as the zoo
variant `emoji-moe`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffroute.io import atomic_write_json
from diffroute.zoo import emoji_data
from diffroute.zoo.train_emoji import EpsBatches
from diffroute.zoo.trainer import TrainConfig, batch_indices, train

from .upcycle import moe_layers, upcycle_moe

VARIANTS = ("moe", "dense", "pruned")


@dataclass
class MoEConfig:
    variant: str = "moe"
    iters: int = 1000  # training steps
    batch_size: int = 64
    lr: float = 1e-4
    num_experts: int = 6
    shared: int = 2
    capacity: str = "static:2"
    dense_until: float = 0.2  # fraction of the steps run dense (k = E)
    sparse_from: float = 0.6  # ... by which k has decayed to the schedule
    z_loss: float = 1e-3
    pruned_slices: int = 4  # of num_experts + shared slices, dropped by the `pruned` variant
    ema_decay: float = 0.999
    train_images: int = 0  # the first N training images only (0: all; small N for smoke tests)
    seed: int = 0
    bf16: bool = True


class _Student(torch.nn.Module):
    """The transformer, plus the progressive-sparsification schedule the trainer advances before each step."""

    def __init__(self, transformer, cfg: MoEConfig):
        super().__init__()
        self.transformer, self.cfg = transformer, cfg

    step = 0

    def before_step(self, step: int, steps: int) -> None:
        self.step = step
        p = step / max(steps, 1)
        mix = (
            1.0
            if p < self.cfg.dense_until
            else max(0.0, (self.cfg.sparse_from - p) / (self.cfg.sparse_from - self.cfg.dense_until))
        )
        for layer in moe_layers(self.transformer):
            layer.dense_mix = mix

    def forward(self, **kwargs):
        return self.transformer(**kwargs)


def prepare(transformer, cfg: MoEConfig):
    """Apply the variant's swap to the emoji transformer (blocks 1..5; block 0 stays dense)."""
    torch.manual_seed(cfg.seed)  # the routers' initialisation, the same in every process and every run
    if cfg.variant == "moe":
        upcycle_moe(transformer, cfg.num_experts, cfg.shared, capacity=cfg.capacity)
    elif cfg.variant == "pruned":
        kept = cfg.num_experts + cfg.shared - cfg.pruned_slices
        upcycle_moe(transformer, 0, kept, prune=cfg.pruned_slices)
    return transformer


def train_moe(pipe, cfg: MoEConfig, out: Path, accelerator) -> dict:
    """Fine-tune `pipe`'s transformer as `cfg.variant` (resumable from `out`); saves `out/model`; returns a summary."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = emoji_data.load()
    train_idx = torch.from_numpy(np.flatnonzero(~data["held_out"]))
    if cfg.train_images:
        train_idx = train_idx[: cfg.train_images]
    batches = EpsBatches(data, train_idx, pipe.vae, accelerator.device)
    transformer = prepare(pipe.transformer, cfg)
    student = _Student(transformer, cfg)
    layers = moe_layers(transformer)

    rank, world = accelerator.process_index, accelerator.num_processes

    def loss_fn(model, idx, gen):
        # Noise is drawn for the whole global batch from (seed, step) and each process keeps its rows, so that N
        # processes train exactly as one (the trainer's per-rank generator would give each rank other noise).
        global_idx = batch_indices(len(train_idx), student.step, cfg.batch_size, cfg.seed)
        assert torch.equal(global_idx[rank::world], idx)
        noise = torch.Generator().manual_seed(hash((cfg.seed, student.step)) & 0x7FFFFFFF)
        kwargs, eps = batches(global_idx, noise)
        kwargs = {k: v[rank::world] if torch.is_tensor(v) else v for k, v in kwargs.items()}
        eps = eps[rank::world]
        loss = F.mse_loss(model(**kwargs).sample.float(), eps)
        if layers and cfg.z_loss:
            z = [layer.last_z_loss for layer in layers if layer.last_z_loss is not None]
            for layer in layers:
                layer.last_z_loss = None  # this step's graph only
            if z:
                loss = loss + cfg.z_loss * torch.stack(z).mean()
        return loss

    tcfg = TrainConfig(
        steps=cfg.iters,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup=min(100, cfg.iters // 10 + 1),
        ema_decay=cfg.ema_decay,
        seed=cfg.seed,
        bf16=cfg.bf16,
        weight_decay=0.0,
    )
    ema = train(f"moe:{cfg.variant}", student, loss_fn, len(train_idx), tcfg, out / "train", accelerator)
    student = accelerator.unwrap_model(student)
    if ema is not None:
        student.load_state_dict(ema)
    student.before_step(cfg.iters, cfg.iters)  # the target schedule, no dense mix
    transformer.eval()
    summary = {
        "variant": cfg.variant,
        **asdict(cfg),
        "seconds": time.time() - t0,
        "processes": accelerator.num_processes,
    }
    if accelerator.is_main_process:
        pipe.save_pretrained(out / "model")
        atomic_write_json(out / "model" / "variant.json", {"base": "emoji"})  # shares emoji's data and metrics
        atomic_write_json(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    return summary
