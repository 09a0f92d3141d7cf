"""Which backbone a trained router belongs to: a probe of its weights, recorded at training, checked at use.

A router learns one model's trajectories; run on other weights (the Elastic router of the fine-tuned `emoji-elastic`
on the base `emoji`) it decides without complaint and wrongly. The probe is a few hundred weights spread over the
transformer. They are compared in the coarser of the two dtypes (the training's and the run's), so the same weights
cast to bf16 or fp16 still match, while a fine-tune, which moves nearly every weight, does not.
"""

from __future__ import annotations

import torch

from diffroute.errors import PlanError

PROBES = 256
MAX_MISMATCH = 0.2  # share of probes allowed to differ (double rounding between fp16 and bf16 moves a few)


def _weights(transformer: torch.nn.Module) -> list[torch.Tensor]:
    # only the backbone's own parameters: hooks and routers attached for training are not part of it
    return [p.detach().reshape(-1) for _, p in sorted(transformer.named_parameters()) if p.is_floating_point()]


def _positions(sizes: list[int]) -> list[tuple[int, int]]:
    return [(i * len(sizes) // PROBES, (i * 7919) % sizes[i * len(sizes) // PROBES]) for i in range(PROBES)]


def backbone_probe(transformer: torch.nn.Module) -> tuple[list[float], str]:
    """(probe values as floats, the weights' dtype name) of `transformer`."""
    weights = _weights(transformer)
    values = [float(weights[t][k]) for t, k in _positions([w.numel() for w in weights])]
    return values, str(weights[0].dtype).replace("torch.", "")


def _coarse(a: str, b: str) -> torch.dtype:
    names = {a, b}
    return torch.bfloat16 if "bfloat16" in names else torch.float16 if "float16" in names else torch.float32


def check_backbone(name: str, probe: list[float] | None, dtype: str, transformer: torch.nn.Module) -> None:
    """PlanError when `transformer` is not the backbone `probe` was taken from (routers without one: not checked)."""
    if not probe:
        return
    weights = _weights(transformer)
    sizes = [w.numel() for w in weights]
    if len(probe) != PROBES or not sizes:
        raise PlanError(f"router {name!r} was trained on another architecture than this transformer's.")
    now = torch.stack([weights[t][k].float().cpu() for t, k in _positions(sizes)])
    coarse = _coarse(dtype, str(weights[0].dtype).replace("torch.", ""))
    differ = (torch.tensor(probe).to(coarse) != now.to(coarse)).float().mean()
    if differ > MAX_MISMATCH:
        raise PlanError(
            f"router {name!r} was trained on other weights than this model's ({differ:.0%} of its probe weights "
            "differ): it decides for the backbone it was trained with. Load that model (a fine-tuned router ships "
            "with its own zoo variant, e.g. emoji-elastic:elastic on --model emoji-elastic), or train one for this."
        )
