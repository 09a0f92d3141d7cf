"""Training checkpoints without pickle: tensors (model, EMA, optimizer state) in safetensors, the rest in JSON."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffroute.errors import InputError
from diffroute.utils.checked_load import require_finite
from diffroute.utils.io import atomic_write_json, readable_by_others


def save_checkpoint(out_dir: Path, step: int, model, ema: dict | None, optimizer, extra: dict | None = None) -> None:
    """Write ckpt-{step}.safetensors, then point checkpoint.json at it (atomic), then drop older tensor files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().contiguous().cpu() for k, v in ema.items()})
    opt = optimizer.state_dict()
    for i, state in opt["state"].items():
        for k, v in state.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).detach().contiguous().cpu()
    require_finite({k: v for k, v in tensors.items() if not k.startswith("opt.")}, f"checkpoint at step {step}")
    tensors["rng.torch"] = torch.get_rng_state()
    name = f"ckpt-{step}.safetensors"
    tmp = out_dir / f".{name}.tmp"
    save_file(tensors, str(tmp))
    readable_by_others(tmp)
    tmp.replace(out_dir / name)
    atomic_write_json(
        out_dir / "checkpoint.json",
        {"step": step, "file": name, "param_groups": opt["param_groups"], "extra": extra or {}},
    )
    for old in out_dir.glob("ckpt-*.safetensors"):
        if old.name != name:
            old.unlink()


def load_checkpoint(out_dir: Path, model, ema: dict | None, optimizer) -> int:
    """Restore what save_checkpoint wrote; returns the step to continue from (0 when there is none)."""
    meta_path = out_dir / "checkpoint.json"
    if not meta_path.is_file():
        return 0
    try:
        meta = json.loads(meta_path.read_text())
        tensors = load_file(str(out_dir / meta["file"]))
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    except Exception as e:  # a corrupt file (safetensors raises its own types), another model's weights, ...
        raise InputError(
            f"the checkpoint in {out_dir} cannot be resumed ({type(e).__name__}: {str(e).splitlines()[0][:200]}): "
            "it is damaged or belongs to another model. Give a new --out (or delete that folder)."
        ) from e
    if ema is not None:
        for k in ema:
            ema[k].copy_(tensors[f"ema.{k}"])
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])


def load_ema(out_dir: Path) -> dict:
    """The EMA weights of the latest checkpoint in out_dir (for evaluating or exporting a run in progress)."""
    meta_path = Path(out_dir) / "checkpoint.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no checkpoint.json in {out_dir}: not a training run folder, or nothing saved yet")
    tensors = load_file(str(Path(out_dir) / json.loads(meta_path.read_text())["file"]))
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    if not ema:
        raise ValueError(f"the checkpoint in {out_dir} has no EMA weights")
    return ema
