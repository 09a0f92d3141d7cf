"""Training decentralized experts and their router (DDM, §3), on the emoji data.

`train_expert`: the emoji transformer fine-tuned on one cluster of a partition with the shared ε-objective loop
(`finetune.train_on_data`), in full isolation: it reads only the partition file and its own cluster's images, so
each expert can train on another machine (`diffroute train expert --cluster I`). Warm-starting every expert (and
the FLOP-matched dense baseline) from the shipped model is a stated deviation: DDM trains from scratch.

`train_router`: `ExpertRouter` trained with cross-entropy against the clean sample's cluster over uniformly drawn
t (DDM Alg. 1), on every training image, then measured against t on the held-out images (labelled by their
nearest cluster centroid); the ensemble pipeline is assembled from the experts and saved as `out/model`.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffroute.data import emoji as emoji_data
from diffroute.errors import InputError
from diffroute.experts.partition import Partition, check_cluster, image_features
from diffroute.experts.router import ExpertRouter
from diffroute.training.configs import ExpertConfig, ExpertRouterConfig
from diffroute.training.eps import EpsBatches
from diffroute.training.finetune import Student, train_on_data
from diffroute.training.trainer import Trainable, TrainConfig, batch_indices, train
from diffroute.utils.io import atomic_write_json, read_json, readable_by_others

EXPERT_FILE = "expert.json"  # beside an expert's model: its partition and cluster


def check_expert(cfg: ExpertConfig) -> None:
    """Refuse a missing or broken partition, or a cluster it does not have, before any work."""
    if not cfg.partition:
        raise InputError("--partition is required (a partition.json from `diffroute train partition`).")
    partition = Partition.load(cfg.partition)
    check_cluster(cfg.cluster, partition.k)


def train_expert(pipe, cfg: ExpertConfig, out: Path, accelerator) -> dict:
    partition = Partition.load(cfg.partition, len(emoji_data.load()["images"]))
    items = partition.members(cfg.cluster)
    info = {"partition": partition.fingerprint(), "k": partition.k, "cluster": cfg.cluster, "images": len(items)}
    summary = train_on_data(
        pipe,
        Student(pipe.transformer),
        cfg,
        out,
        accelerator,
        f"expert {cfg.cluster}",
        items=items,
        extra_summary=info,
    )
    if accelerator.is_main_process:
        atomic_write_json(out / "model" / EXPERT_FILE, info)
    return {"method": "expert", **summary}


def check_router(cfg: ExpertRouterConfig) -> None:
    if not cfg.partition:
        raise InputError("--partition is required (the partition the experts were trained on).")
    partition = Partition.load(cfg.partition)
    folders = [f for f in cfg.experts.split(",") if f]
    if len(folders) != partition.k:
        raise InputError(
            f"--experts needs {partition.k} model folders (one per cluster, in order); got {len(folders)}."
        )
    for i, folder in enumerate(folders):
        info_path = Path(folder) / EXPERT_FILE
        if not info_path.is_file():
            raise InputError(f"{folder} is not an expert's model folder (no {EXPERT_FILE}); train it first.")
        info = read_json(info_path, "expert info")
        info = info if isinstance(info, dict) else {}
        if info.get("partition") != partition.fingerprint() or info.get("cluster") != i:
            raise InputError(
                f"{folder} was trained on cluster {info.get('cluster')} of partition {info.get('partition')}, "
                f"not cluster {i} of {partition.fingerprint()}: list the experts in cluster order."
            )


def train_router(pipe, cfg: ExpertRouterConfig, out: Path, accelerator) -> dict:
    """Train the router, measure it against t, and save the ensemble pipeline as `out/model`."""
    check_router(cfg)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = emoji_data.load()
    partition = Partition.load(cfg.partition, len(data["images"]))
    transformer = pipe.transformer
    router = ExpertRouter(
        num_experts=partition.k,
        in_channels=transformer.config.in_channels,
        sample_size=transformer.config.sample_size,
        caption_channels=transformer.config.caption_channels,
        width=cfg.width,
        layers=cfg.layers,
        heads=cfg.heads,
        patch=cfg.patch,
    )
    items = torch.from_numpy(partition.rows)
    labels = torch.from_numpy(partition.labels)
    batches = EpsBatches(data, items, pipe.vae, accelerator.device)
    rank, world = accelerator.process_index, accelerator.num_processes
    step = {"now": 0}

    def loss_fn(model, idx, gen):
        global_idx = batch_indices(len(items), step["now"], cfg.batch_size, cfg.seed)
        noise = torch.Generator().manual_seed(hash((cfg.seed, step["now"])) & 0x7FFFFFFF)
        kwargs, _ = batches(global_idx, noise)
        text, mask = kwargs["encoder_hidden_states"], kwargs["encoder_attention_mask"]
        drop = (torch.rand(len(global_idx), generator=noise) < cfg.caption_dropout).to(text.device)
        text = torch.where(drop[:, None, None], batches.null_emb.to(text.device), text)
        mask = torch.where(drop[:, None], batches.null_mask.to(mask.device), mask)
        mine = slice(rank, None, world)
        logits = model(kwargs["hidden_states"][mine], kwargs["timestep"][mine], text[mine], mask[mine])
        target = labels[global_idx][mine].to(logits.device)
        loss = F.cross_entropy(logits, target)
        return loss, {"accuracy": (logits.argmax(-1) == target).float().mean()}

    def before_step(s, _steps):
        step["now"] = s

    tcfg = TrainConfig(
        steps=cfg.iters,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        warmup=min(100, cfg.iters // 10 + 1),
        ema_decay=cfg.ema_decay or None,
        log_every=max(min(50, cfg.iters // 10), 1),
        seed=cfg.seed,
        bf16=cfg.bf16,
        checkpoint_every=max(min(250, cfg.iters // 10), 1),
    )
    trainable = Trainable(router, before_step=before_step)
    ema = train("experts-router", trainable, loss_fn, len(items), tcfg, out / "train", accelerator)
    router = accelerator.unwrap_model(router)
    if ema is not None:
        router.load_state_dict(ema)
    router.eval()
    accuracy = router_accuracy(router, partition, data, pipe.vae, accelerator.device)
    summary = {
        **asdict(cfg),
        "seconds": time.time() - t0,
        "router_parameters": sum(p.numel() for p in router.parameters()),
    }
    summary["accuracy_by_t"] = accuracy
    if accelerator.is_main_process:
        atomic_write_json(out / "router_accuracy.json", accuracy)
        plot_accuracy(accuracy, partition.k, out / "router_accuracy.png")
        save_ensemble(pipe, router, [f for f in cfg.experts.split(",") if f], out / "model", partition)
        atomic_write_json(out / "summary.json", summary)
    accelerator.wait_for_everyone()
    return {"method": "experts-router", **summary}


@torch.no_grad()
def router_accuracy(router, partition: Partition, data, vae, device, bins: int = 20, seed: int = 0) -> dict:
    """Top-1 accuracy of the router on the held-out images at `bins` evenly spread timesteps (their labels: the
    nearest centroid of their emoji-CLIP features); the prior (largest cluster's share) is what chance reaches."""
    held = torch.from_numpy(np.flatnonzero(data["held_out"]))
    labels = torch.from_numpy(partition.assign(image_features(data["images"][held.numpy()])))
    batches = EpsBatches(data, held, vae, device)
    ts = np.linspace(999, 0, bins).round().astype(int).tolist()
    n = len(held)
    captions = (batches.emb.to(device), batches.mask.to(device))
    # the empty caption (the unconditional branch's): what the latent alone tells, near chance at pure noise
    empty = (batches.null_emb.expand(n, -1, -1).to(device), batches.null_mask.expand(n, -1).to(device))
    acc, acc_empty = [], []
    for i, t in enumerate(ts):
        kwargs, _ = batches(torch.arange(n), torch.Generator().manual_seed(seed * 1000 + i))
        x, t_rows = kwargs["hidden_states"], torch.full_like(kwargs["timestep"], t)
        # (the batch drops 10% of captions as in training; routing at inference reads every caption)
        for out, (e, m) in ((acc, captions), (acc_empty, empty)):
            logits = router(x, t_rows, e, m)
            out.append(float((logits.argmax(-1).cpu() == labels).float().mean()))
    sizes = np.bincount(labels.numpy(), minlength=partition.k)
    return {
        "timesteps": ts,
        "accuracy": acc,
        "accuracy_empty_caption": acc_empty,
        "prior": float(sizes.max() / sizes.sum()),
        "n_images": n,
    }


def plot_accuracy(accuracy: dict, k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.plot(accuracy["timesteps"], accuracy["accuracy"], marker="o", ms=3, label="router (held-out)")
    if "accuracy_empty_caption" in accuracy:
        ax.plot(accuracy["timesteps"], accuracy["accuracy_empty_caption"], marker="o", ms=3, label="empty caption")
    ax.axhline(accuracy["prior"], color="gray", ls="--", lw=1, label="largest cluster's share")
    ax.axhline(1 / k, color="gray", ls=":", lw=1, label=f"uniform 1/{k}")
    ax.set_xlabel("timestep t (999 = pure noise)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_ylim(0, 1.02)
    ax.invert_xaxis()
    ax.legend(fontsize=7)
    ax.set_title(f"expert router, K = {k}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def save_ensemble(pipe, router, expert_folders: list[str], folder: Path, partition: Partition) -> None:
    """The emoji pipeline with an `ExpertEnsemble` of the experts' transformers as its transformer, whole or not
    at all."""
    from diffroute.experts.ensemble import ExpertEnsemble

    experts = [type(pipe.transformer).from_pretrained(Path(f) / "transformer") for f in expert_folders]
    ensemble = ExpertEnsemble.from_experts(experts, router)
    base = pipe.transformer
    pipe.register_modules(transformer=ensemble)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipe.save_pretrained(tmp)
        atomic_write_json(tmp / "variant.json", {"base": "emoji", "experts": partition.k})
        atomic_write_json(tmp / "partition.json", {"fingerprint": partition.fingerprint(), "k": partition.k})
        readable_by_others(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.register_modules(transformer=base)
