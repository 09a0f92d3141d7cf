"""TeaCache-style policy: accumulate a rescaled relative L1 change of the timestep-modulated input of block 0 and,
while the sum stays under the threshold, reuse the cached output of every component of every block (per sample).
Deviation from TeaCache, which skips the whole transformer and reuses its output residual: here the blocks still
run their timestep modulation and gates around the reused component outputs (our one executor, as in ECAD).

The rescaling polynomial maps input change to output change; `diffroute calibrate` fits it for a model on a few
prompts and writes `teacache.json` beside the pipeline's folders (found from the transformer's load path), or pass
`teacache-T@FILE`. Without a calibration the raw distance is used, and the stats say so. As in TeaCache, the first
and last steps always compute."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from diffroute.core.arch import ArchitectureMap
from diffroute.core.deciders import Decider
from diffroute.plans import Plan, register_plan
from diffroute.policies.common import rel_l1

CALIBRATION_FILE = "teacache.json"


def modulated_input(arch: ArchitectureMap, args, kwargs) -> torch.Tensor:
    fn = arch.spec.modulated_input if arch.spec is not None else None
    if fn is None:
        raise ValueError(f"TeaCache has no modulated-input rule for {arch.model_class}: give its ArchSpec one.")
    return fn(arch.blocks[0], args, kwargs)


def find_calibration(arch: ArchitectureMap) -> Path | None:
    """`teacache.json` in the pipeline folder the transformer was loaded from, if any."""
    origin = getattr(getattr(arch.model, "config", None), "_name_or_path", None)
    if origin and Path(origin).is_dir():
        path = Path(origin).parent / CALIBRATION_FILE
        return path if path.is_file() else None
    return None


def load_coefficients(path: Path, arch: ArchitectureMap) -> list[float]:
    from diffroute.errors import InputError
    from diffroute.utils.io import read_json

    d = read_json(path, "TeaCache calibration", max_bytes=2**20)
    if not isinstance(d, dict):
        raise InputError(f"TeaCache calibration {str(path)!r} must be a JSON object with model_class and coefficients.")
    if d.get("model_class") != arch.model_class:
        raise InputError(f"calibration {str(path)!r} is for {d.get('model_class')}, the model is {arch.model_class}.")
    coeffs = d.get("coefficients")
    if (
        not isinstance(coeffs, list)
        or not 1 <= len(coeffs) <= 16
        or not all(isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) for c in coeffs)
    ):
        raise InputError(f"calibration {str(path)!r}: 'coefficients' must be 1 to 16 finite numbers.")
    return [float(c) for c in coeffs]


class TeaCacheDecider(Decider):
    def __init__(self, arch: ArchitectureMap, num_steps: int, threshold: float, coefficients, source: str):
        self.arch, self.num_steps, self.threshold = arch, num_steps, threshold
        self.coefficients = coefficients  # highest power first, as numpy.polyfit returns them
        self.source = source
        self._prev: dict[int, torch.Tensor] = {}
        self._acc: dict[int, torch.Tensor] = {}
        self._compute: dict[int, torch.Tensor | bool] = {}

    def on_block_start(self, ctx, block, module, args, kwargs) -> None:
        mod = modulated_input(self.arch, args, kwargs).detach()
        prev = self._prev.get(ctx.branch)
        self._prev[ctx.branch] = mod
        first_or_last = ctx.step == 0 or ctx.step >= self.num_steps - 1
        if prev is None or prev.shape != mod.shape or first_or_last:
            self._compute[ctx.branch] = True
            self._acc[ctx.branch] = torch.zeros(mod.shape[0], device=mod.device)
            return
        d = rel_l1(mod, prev).float()
        if self.coefficients is not None:  # Horner's rule
            x, d = d, torch.zeros_like(d)
            for c in self.coefficients:
                d = d * x + c
            # A fitted polynomial can go negative outside its calibrated range; a negative change would lower the
            # accumulator and let it skip indefinitely.
            d = d.clamp_min(0)
        acc = self._acc[ctx.branch] + d
        compute = acc >= self.threshold
        self._acc[ctx.branch] = torch.where(compute, torch.zeros_like(acc), acc)
        self._compute[ctx.branch] = compute

    def decide(self, ctx, block, comp):
        return self._compute.get(ctx.branch, True)

    def info(self) -> dict:
        return {"policy": "teacache", "threshold": self.threshold, "calibration": self.source}


class TeaCachePlan(Plan):
    def __init__(self, threshold: float, name: str, calibration: str | None = None):
        self.threshold, self.name, self.calibration = threshold, name, calibration

    def check(self, arch: ArchitectureMap) -> None:
        if arch.spec is None or arch.spec.modulated_input is None:
            raise ValueError(f"TeaCache has no modulated-input rule for {arch.model_class}: give its ArchSpec one.")
        if self.calibration:
            load_coefficients(Path(self.calibration), arch)

    def observed_blocks(self, arch):
        return (0,)

    def content(self, arch: ArchitectureMap | None = None) -> dict:
        from diffroute.utils.fingerprint import file_digest

        path = Path(self.calibration) if self.calibration else (find_calibration(arch) if arch else None)
        return {"plan": self.name, "calibration": file_digest(path) if path and path.is_file() else None}

    def decider(self, arch, num_steps):
        path = Path(self.calibration) if self.calibration else find_calibration(arch)
        coeffs = load_coefficients(path, arch) if path else None
        return TeaCacheDecider(arch, num_steps, self.threshold, coeffs, str(path) if path else "uncalibrated")


def _teacache(m: re.Match) -> Plan:
    return TeaCachePlan(float(m.group(1)), m.group(0), m.group(2))


register_plan(
    r"teacache-([0-9]*\.?[0-9]+)(?:@(.+))?",
    _teacache,
    "teacache-T[@FILE]",
    "accumulated modulated-input change",
    ["teacache-0.3"],
)


def save_calibration(path: Path, model_class: str, coefficients, extra: dict) -> None:
    from diffroute.utils.io import atomic_write_json

    atomic_write_json(
        path,
        {
            "format": "diffroute.teacache/v1",
            "model_class": model_class,
            "coefficients": [float(c) for c in coefficients],
            **extra,
        },
    )
