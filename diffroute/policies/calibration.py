"""TeaCache's calibration as a library call: from full-compute runs, fit the polynomial that maps the relative change
of block 0's modulated input to the relative change of the transformer's output (`diffroute calibrate` only parses
its arguments and calls this)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from diffroute.core.arch import architecture_map
from diffroute.policies.common import rel_l1
from diffroute.policies.teacache import modulated_input, save_calibration


def fit_teacache(transformer, run: Callable[[], None], degree: int = 4) -> dict:
    """Run `run()` (one or more full-compute pipeline calls of `transformer`), and fit the degree-`degree`
    polynomial; returns the coefficients (highest power first), the number of points and the fit's R²."""
    arch = architecture_map(transformer)
    mods, outs = [], []

    def on_block0(module, a, kw):
        mods.append(modulated_input(arch, a, kw).detach().float())

    def on_out(module, a, kw, output):
        outs.append((output[0] if isinstance(output, tuple) else output.sample).detach().float())

    h1 = arch.blocks[0].register_forward_pre_hook(on_block0, with_kwargs=True)
    h2 = transformer.register_forward_hook(on_out, with_kwargs=True)
    try:
        run()
    finally:
        h1.remove()
        h2.remove()
    x = torch.cat([rel_l1(b, a) for a, b in zip(mods[:-1], mods[1:])]).cpu().numpy()
    y = torch.cat([rel_l1(b, a) for a, b in zip(outs[:-1], outs[1:])]).cpu().numpy()
    coeffs = np.polyfit(x, y, degree)
    fit = np.polyval(coeffs, x)
    r2 = 1 - ((y - fit) ** 2).sum() / ((y - y.mean()) ** 2).sum()
    return {"coefficients": [float(c) for c in coeffs], "points": len(x), "r2": float(r2)}


def calibrate_teacache(pipe, run: Callable[[], None], out: Path, degree: int = 4, **extra) -> dict:
    """`fit_teacache` on `pipe`'s transformer (with no plan applied), saved as `out` for `teacache-T@out`."""
    import diffroute

    diffroute.remove(pipe)
    result = fit_teacache(pipe.transformer, run, degree)
    info = {**extra, "points": result["points"], "r2": result["r2"]}
    save_calibration(Path(out), architecture_map(pipe.transformer).model_class, np.array(result["coefficients"]), info)
    return {"out": str(out), **result, **extra}
