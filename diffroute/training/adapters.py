"""Adapting the emoji model to a new image domain (Symbola) with FeRA or a plain LoRA, the rest frozen.

Loss, FeRA: `MSE(eps_fera, eps) + fecl * FECL` (the paper's frequency-energy consistency loss, weight 0.1):
with `eps_base` from a no-grad forward with the experts off, `Delta = eps_fera - eps_base` and `rho = eps_fera - eps`,
`FECL = sum_b pi_b (|Delta_b| / |Delta| - |rho_b| / |rho|)^2` over the latent's frequency bands b (the same bands as
the router's), `pi_b` band b's share of rho's energy: the update the adapters make should put its energy where the
remaining error is. LoRA: the plain epsilon-MSE. Only the LoRA matrices (and FeRA's router) train.

Deviation, FeRA: `+ balance * (E sum_e mean_b(w_be)^2 - 1)`, a load-balancing term on the batch's mean routing
weights (Switch Transformer's soft form; zero when the experts are used equally on average, whatever each sample's
own weights). The paper has none; without it the router collapsed onto one expert here (README). It constrains only
the batch mean, so a sample (a timestep) may still pick its experts sharply.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from diffroute.errors import PlanError
from diffroute.surgery.fera import (
    adapter_parameters,
    apply_fera,
    apply_lora,
    disable_fera,
    enable_fera,
    frequency_bands,
    last_routing_weights,
)
from diffroute.training.configs import AdapterConfig
from diffroute.training.finetune import Student, train_on_data


def fecl_loss(pred: torch.Tensor, base: torch.Tensor, target: torch.Tensor, sigmas) -> torch.Tensor:
    """The frequency-energy consistency loss, per sample then averaged (see the module docstring)."""
    delta, rho = (pred - base).float(), (pred - target).float()
    d_bands, r_bands = frequency_bands(delta, sigmas), frequency_bands(rho, sigmas)

    def norms(bands):
        return torch.stack([b.flatten(1).norm(dim=1) for b in bands], dim=1)  # [B, bands]

    dn, rn = norms(d_bands), norms(r_bands)
    pi = rn.square() / rn.square().sum(1, keepdim=True).clamp_min(1e-12)
    d_share = dn / delta.flatten(1).norm(dim=1, keepdim=True).clamp_min(1e-12)
    r_share = rn / rho.flatten(1).norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (pi * (d_share - r_share).square()).sum(1).mean()


def balance_loss(weights: torch.Tensor) -> torch.Tensor:
    """`E sum_e mean_b(w_be)^2 - 1`: zero when the batch uses every expert equally on average, E - 1 when one
    expert takes everything."""
    mean = weights.float().mean(0)
    return mean.numel() * mean.square().sum() - 1


def train_adapter(pipe, cfg: AdapterConfig, out: Path, accelerator) -> dict:
    if cfg.method not in ("fera", "lora") or cfg.rank < 1 or cfg.num_experts < 1:
        raise PlanError("need method fera or lora, --rank >= 1 and --num-experts >= 1.")
    if cfg.balance < 0 or cfg.fecl < 0 or (cfg.alpha is not None and not cfg.alpha > 0):
        raise PlanError("need --balance >= 0, --fecl >= 0 and a positive --alpha.")
    if cfg.alpha is None:
        cfg = replace(cfg, alpha=1.0 if cfg.method == "fera" else cfg.rank / 4)
    transformer = pipe.transformer
    torch.manual_seed(cfg.seed)  # the adapters' initialisation, the same in every process
    if cfg.method == "fera":
        apply_fera(transformer, num_experts=cfg.num_experts, rank=cfg.rank, alpha=cfg.alpha)
    else:
        apply_lora(transformer, rank=cfg.rank, alpha=cfg.alpha)
    trained = adapter_parameters(transformer)
    for p in transformer.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    sigmas = tuple(transformer.config["diffroute_fera"]["sigmas"]) if cfg.method == "fera" else None

    def objective(model, kwargs, eps):
        pred = model(**kwargs).sample.float()
        loss = F.mse_loss(pred, eps)
        if cfg.method == "lora":
            return loss
        weights = last_routing_weights(transformer)  # this forward's, before the base forward below
        metrics = {f"weight_{e}": w for e, w in enumerate(weights.detach().float().mean(0).tolist())}
        if cfg.fecl:
            with torch.no_grad():
                disable_fera(transformer)
                base = model(**kwargs).sample.float()
                enable_fera(transformer)
            metrics["fecl"] = fecl = fecl_loss(pred, base, eps, sigmas)
            loss = loss + cfg.fecl * fecl
        metrics["balance"] = balance = balance_loss(weights)
        if cfg.balance:
            loss = loss + cfg.balance * balance
        return loss, {k: float(v) for k, v in metrics.items()}

    student = Student(transformer)
    n = sum(p.numel() for p in trained)
    try:
        summary = train_on_data(
            pipe,
            student,
            cfg,
            out,
            accelerator,
            f"{cfg.method}:{cfg.domain}",
            objective=objective,
            param_groups=lambda lr: [{"params": trained, "lr": lr}],
            extra_summary={"trained_parameters": n},
        )
    finally:
        for p in transformer.parameters():
            p.requires_grad_(True)
    return {"method": cfg.method, **summary}
