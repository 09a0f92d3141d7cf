"""Training a transformer changed by our module surgery (MoE, DAR, DTR) or a baseline on the emoji model's data.

One loop for every such variant, on the shared accelerate trainer: epsilon-MSE with 10% caption dropout on the
emoji training images (never the held-out ones), EMA, bf16 autocast, resumable from `out/train`. Noise is drawn for
the whole global batch from (seed, step) and each process keeps its rows, so N processes train exactly as one (the
trainer's per-rank generator would give each rank other noise). The result is a pipeline folder `out/model` that
records its base model (`variant.json`), so `load_pipeline` and `eval compare --prompts heldout` take it.
Snapshots (`snapshots=N`) save the model N times along the way, for learning curves (quality against steps).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffroute.data import emoji as emoji_data
from diffroute.training.configs import DataTrainConfig
from diffroute.training.eps import EpsBatches
from diffroute.training.trainer import Trainable, TrainConfig, batch_indices, train
from diffroute.utils.checked_load import require_finite
from diffroute.utils.io import atomic_write_json, readable_by_others


class Student(torch.nn.Module):
    """The transformer, and a hook the trainer calls before each step (a schedule that follows training)."""

    def __init__(
        self,
        transformer,
        on_step: Callable[[int, int], None] | None = None,
        groups: Callable[[float], list[dict]] | None = None,  # what trains, when not every parameter
    ):
        super().__init__()
        self.transformer, self.on_step, self.step, self.groups = transformer, on_step, 0, groups

    def param_groups(self, lr: float) -> list[dict]:
        """The trainer's optimizer groups: `groups(lr)` when set, else every parameter at `lr`."""
        return self.groups(lr) if self.groups is not None else [{"params": list(self.parameters()), "lr": lr}]

    def before_step(self, step: int, steps: int) -> None:
        self.step = step
        if self.on_step is not None:
            self.on_step(step, steps)

    def forward(self, **kwargs):
        return self.transformer(**kwargs)


def train_on_data(
    pipe,
    student: Student,
    cfg: DataTrainConfig,
    out: Path,
    accelerator,
    name: str,
    aux_loss: Callable[[], torch.Tensor | None] | None = None,
    objective: Callable | None = None,
    param_groups: Callable[[float], list[dict]] | None = None,
    extra_summary: dict | None = None,
    items: np.ndarray | None = None,
) -> dict:
    """Train `student` (wrapping `pipe.transformer`, already changed); saves `out/model`; returns a summary.
    `objective(model, kwargs, eps)` replaces the epsilon-MSE (+ `aux_loss()`) and may return `(loss, metrics)` for
    the log; `param_groups(lr)` limits what trains (default: every parameter of the student); `extra_summary` joins
    the settings in `out/summary.json`; `items` (data rows, training images only) trains on a subset, e.g. one
    cluster of a partition (default: every training image)."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = emoji_data.domain(emoji_data.load(), cfg.domain)
    train_idx = torch.from_numpy(np.flatnonzero(~data["held_out"]))
    if items is not None:
        if not np.isin(items, train_idx.numpy()).all():
            raise ValueError("training items must be training images of the data set (never held-out ones).")
        train_idx = torch.from_numpy(np.asarray(items, dtype=np.int64))
    if cfg.train_images:
        train_idx = train_idx[: cfg.train_images]
    batches = EpsBatches(data, train_idx, pipe.vae, accelerator.device)
    rank, world = accelerator.process_index, accelerator.num_processes

    def loss_fn(model, idx, gen):
        global_idx = batch_indices(len(train_idx), student.step, cfg.batch_size, cfg.seed)
        assert torch.equal(global_idx[rank::world], idx)
        noise = torch.Generator().manual_seed(hash((cfg.seed, student.step)) & 0x7FFFFFFF)
        kwargs, eps = batches(global_idx, noise)
        kwargs = {k: v[rank::world] if torch.is_tensor(v) else v for k, v in kwargs.items()}
        if objective is not None:
            return objective(model, kwargs, eps[rank::world])
        loss = F.mse_loss(model(**kwargs).sample.float(), eps[rank::world])
        extra = aux_loss() if aux_loss is not None else None
        return loss if extra is None else loss + extra

    tcfg = TrainConfig(
        steps=cfg.iters,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup=min(100, cfg.iters // 10 + 1),
        ema_decay=cfg.ema_decay,
        log_every=max(min(50, cfg.iters // 10), 1),
        seed=cfg.seed,
        bf16=cfg.bf16,
        weight_decay=0.0,
        snapshot_every=max(cfg.iters // cfg.snapshots, 1) if cfg.snapshots else 0,
        checkpoint_every=max(min(250, cfg.iters // 10), 1),  # short runs too lose at most a tenth when stopped
    )
    student.groups = param_groups  # the method's choice of what trains (given to train() below)

    def snapshot(step: int, ema: dict | None) -> None:
        save_model(pipe, accelerator.unwrap_model(student), ema, cfg, out / "snapshots" / f"step-{step:06d}")

    trainable = Trainable(student, param_groups=student.param_groups, before_step=student.before_step)
    ema = train(name, trainable, loss_fn, len(train_idx), tcfg, out / "train", accelerator, snapshot)
    student = accelerator.unwrap_model(student)
    if ema is not None:
        student.load_state_dict(ema)
    student.before_step(cfg.iters, cfg.iters)  # the schedules' end state (e.g. no dense mix)
    pipe.transformer.eval()
    summary = {
        **asdict(cfg),
        **(extra_summary or {}),
        "seconds": time.time() - t0,
        "processes": accelerator.num_processes,
        "images_seen": cfg.iters * cfg.batch_size,  # training FLOPs are proportional (same model, same images)
    }
    if accelerator.is_main_process:
        save_model(pipe, student, None, cfg, out / "model")
        atomic_write_json(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    return summary


def save_model(pipe, student: Student, weights: dict | None, cfg: DataTrainConfig, folder: Path) -> None:
    """Save the pipeline with `weights` (e.g. the EMA) in its transformer as `folder`, whole or not at all; the
    student's own weights are put back afterwards, so training goes on unchanged."""
    require_finite(weights if weights is not None else student.state_dict(), f"model {folder}")
    keep = {k: v.detach().clone() for k, v in student.state_dict().items()} if weights is not None else None
    if weights is not None:
        student.load_state_dict(weights)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipe.save_pretrained(tmp)
        atomic_write_json(tmp / "variant.json", {"base": "emoji", "domain": cfg.domain})
        readable_by_others(tmp)  # mkdtemp makes it private
        shutil.rmtree(folder, ignore_errors=True)  # a run resumed before this step's checkpoint saves it again
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if keep is not None:
            student.load_state_dict(keep)
