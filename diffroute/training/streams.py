"""Training with a rewritten residual stream (DAR, DTR) or the plain baseline on the emoji data, from the shipped
weights (`init=shipped`: DAR's retrofit fine-tune against a plain fine-tune) or from scratch (`init=scratch`: the
emoji architecture freshly initialised, the same way for every method and seed). Same loop as the MoE variants."""

from __future__ import annotations

from pathlib import Path

import torch

from diffroute.errors import PlanError
from diffroute.surgery.dar import MODES, QUERIES, apply_dar
from diffroute.surgery.dtr import apply_dtr
from diffroute.training.configs import StreamConfig
from diffroute.training.finetune import Student, train_on_data

METHODS = ("dar", "dtr", "plain")


def check(cfg: StreamConfig) -> None:
    if cfg.method not in METHODS or cfg.init not in ("shipped", "scratch"):
        raise PlanError(f"method must be one of {METHODS} and init shipped or scratch; got {cfg.method}, {cfg.init}")
    if cfg.method == "dar" and (cfg.mode not in MODES or cfg.query not in QUERIES):
        raise PlanError(f"DAR: --mode one of {MODES}, --query one of {QUERIES}")
    if cfg.method == "dtr" and not (0 < cfg.beta <= 1 and cfg.alpha > 0):
        raise PlanError("DTR: need 0 < --beta <= 1 and --alpha > 0")


def prepare(pipe, cfg: StreamConfig):
    """The transformer to train: shipped or freshly initialised (seeded), with the method's rewrite attached."""
    check(cfg)
    torch.manual_seed(cfg.seed)
    transformer = pipe.transformer
    if cfg.init == "scratch":
        fresh = type(transformer).from_config(transformer.config)
        transformer = fresh.to(device=transformer.device, dtype=transformer.dtype)
        pipe.register_modules(transformer=transformer)
    if cfg.method == "dar":
        apply_dar(transformer, cfg.mode, cfg.query)
    elif cfg.method == "dtr":
        apply_dtr(transformer, cfg.beta, cfg.alpha)
    return transformer


def train_streams(pipe, cfg: StreamConfig, out: Path, accelerator) -> dict:
    transformer = prepare(pipe, cfg)
    summary = train_on_data(pipe, Student(transformer), cfg, out, accelerator, f"{cfg.method}:{cfg.init}")
    return {"method": cfg.method, **summary}
