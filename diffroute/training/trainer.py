"""A small, resumable training loop on accelerate: deterministic batches by step, EMA, safetensors checkpoints."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from diffroute.training.checkpoint import load_checkpoint, save_checkpoint


@dataclass
class TrainConfig:
    steps: int
    batch_size: int = 64  # global batch, split across processes
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup: int = 200
    ema_decay: float | None = None
    grad_clip: float = 1.0
    checkpoint_every: int = 250
    log_every: int = 50
    seed: int = 0
    bf16: bool = False  # autocast the forward pass to bfloat16 (CPUs with avx512_bf16 and GPUs multiply ~4x faster)
    snapshot_every: int = 0  # call on_snapshot(step, ema) every N steps (0: never), e.g. to save a learning curve


def batch_indices(n_items: int, step: int, batch_size: int, seed: int) -> torch.Tensor:
    """The global batch of a step: a fixed function of (seed, step), so a resumed run sees the same data."""
    per_epoch = max(n_items // batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[k * batch_size : (k + 1) * batch_size]


@dataclass
class Trainable:
    """What trains, declared (never discovered): the module, the optimizer's parameter groups `param_groups(lr)` (a
    router and its fine-tuned backbone at their own rates; None: every parameter at the config's rate) and
    `before_step(step, steps)`, run before each step (a capacity schedule that sparsifies as training goes on)."""

    model: torch.nn.Module
    param_groups: Callable[[float], list[dict]] | None = None
    before_step: Callable[[int, int], None] | None = None


# An objective: (model, this process's batch indices, a generator) -> (loss, metrics); metrics are scalars the log
# averages like the loss (a router's mean weights, a loss term). A bare loss is read as (loss, {}).
Objective = Callable[[torch.nn.Module, torch.Tensor, torch.Generator], "torch.Tensor | tuple[torch.Tensor, dict]"]


def update_ema(ema: dict, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights (buffers that are not floating point are copied)."""
    with torch.no_grad():
        for k, v in model.state_dict().items():
            ema[k].lerp_(v.detach(), 1 - decay) if v.is_floating_point() else ema[k].copy_(v)


def train(
    name: str,
    trainable: Trainable | torch.nn.Module,
    objective: Objective,
    n_items: int,
    cfg: TrainConfig,
    out_dir: Path,
    accelerator: Accelerator,
    on_snapshot: Callable[[int, dict | None], None] | None = None,
) -> dict | None:
    """Train `trainable` for cfg.steps with `objective`; returns EMA weights (or None). Resumes from out_dir's
    checkpoint if present. `on_snapshot(step, ema)` runs on the main process every `cfg.snapshot_every` steps, before
    that step's checkpoint (so a resumed run never skips one).

    The objective gets this process's share of the global batch and a generator seeded by (seed, step, rank) for its
    noise, so that the run is reproducible and resumable. A bare module trains all its parameters (`Trainable`).
    Values reach the host only at logging steps (the loss and metrics accumulate on the device).
    """
    if not isinstance(trainable, Trainable):
        trainable = Trainable(trainable)
    model, param_groups, before_step = trainable.model, trainable.param_groups, trainable.before_step
    out_dir.mkdir(parents=True, exist_ok=True)
    params = param_groups(cfg.lr) if param_groups is not None else model.parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()} if cfg.ema_decay else None
    start = load_checkpoint(out_dir, model, ema, optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + start + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * (s + start) / cfg.steps)),
    )
    rank, world = accelerator.process_index, accelerator.num_processes
    bar = tqdm(total=cfg.steps, initial=start, desc=name, disable=not accelerator.is_main_process, dynamic_ncols=True)
    log_path = out_dir / "log.jsonl"
    t0, running, metrics = time.time(), 0.0, {}
    model.train()
    for step in range(start, cfg.steps):
        if before_step is not None:
            before_step(step, cfg.steps)
        idx = batch_indices(n_items, step, cfg.batch_size, cfg.seed)[rank::world]
        gen = torch.Generator().manual_seed(hash((cfg.seed, step, rank)) & 0x7FFFFFFF)
        with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            result = objective(model, idx, gen)
        loss, extra = result if isinstance(result, tuple) else (result, {})
        loss = loss.float()
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        sched.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            update_ema(ema, accelerator.unwrap_model(model), cfg.ema_decay)
        running = running + loss.detach()
        for k, v in extra.items():
            metrics[k] = metrics.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v))
        bar.update(1)
        done = step + 1
        if done % cfg.log_every == 0 and accelerator.is_main_process:
            rec = {
                "step": done,
                "loss": float(running) / cfg.log_every,
                "lr": sched.get_last_lr()[0],
                "elapsed_s": time.time() - t0,
                **{k: float(v) / cfg.log_every for k, v in metrics.items()},
            }
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            running, metrics = 0.0, {}
        if on_snapshot is not None and cfg.snapshot_every and done % cfg.snapshot_every == 0:
            if accelerator.is_main_process:
                on_snapshot(done, ema)
        if (done % cfg.checkpoint_every == 0 or done == cfg.steps) and accelerator.is_main_process:
            save_checkpoint(out_dir, done, accelerator.unwrap_model(model), ema, optimizer, {"config": asdict(cfg)})
        accelerator.wait_for_everyone()
    bar.close()
    model.eval()
    return ema
