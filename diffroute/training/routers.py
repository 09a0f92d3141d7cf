"""What every router's training shares: the batch split check, the trainer settings, a frozen (or not) backbone."""

from __future__ import annotations

from pathlib import Path

from diffroute.training.trainer import Trainable, TrainConfig, train
from diffroute.utils.grad import requires_grad


def save_router(router, transformer, out, what: str) -> None:
    """Save a trained router as `out/router`: refused if not finite, stamped with its backbone's probe and dtype (so
    it is refused on other weights), readable by others (diffusers writes its weights 0600)."""
    from diffroute.routers.backbone import backbone_probe
    from diffroute.utils.checked_load import require_finite
    from diffroute.utils.io import readable_by_others

    require_finite(router.state_dict(), what)
    probe, dtype = backbone_probe(transformer)
    router.register_to_config(backbone_probe=probe, backbone_dtype=dtype)
    router.save_pretrained(out / "router")
    readable_by_others(out / "router")


def check_batch_split(batch: int, accelerator) -> None:
    """Refuse, before any work, a global batch that the processes cannot share evenly."""
    if batch % accelerator.num_processes:
        raise ValueError(f"--batch {batch} must be a multiple of the {accelerator.num_processes} processes.")


def train_router(
    name: str,
    model,
    loss,
    cfg,
    transformer,
    out: Path,
    accelerator,
    backbone_trains: bool = False,
    param_groups=None,
):
    """Run the shared trainer on `model` with `loss` (closed afterwards). The transformer's parameters train only
    with `backbone_trains`; their requires_grad flags are restored after: a flag can select another kernel (Sana's
    outputs move by ~1e-6), and `full` must stay bitwise vanilla."""
    tcfg = TrainConfig(
        steps=cfg.iters,
        batch_size=cfg.batch,
        lr=cfg.lr,
        warmup=max(cfg.iters // 20, 1),
        checkpoint_every=max(cfg.iters // 4, 1),
        log_every=max(cfg.iters // 30, 1),
        seed=cfg.seed,
        bf16=cfg.bf16,
    )
    with requires_grad([transformer], backbone_trains):
        try:
            train(name, Trainable(model, param_groups=param_groups), loss, len(loss.items), tcfg, out, accelerator)
        finally:
            loss.close()
