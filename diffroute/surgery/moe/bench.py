"""FFN benchmark (not a test): one block's dense FFN against its expert-choice MoE at several capacities, side by
side in one run: FLOPs (torch's FlopCounterMode) and wall-clock (median of repeats after a warm-up)."""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffroute.core.arch import architecture_map
from diffroute.surgery.moe.capacity import parse_capacity
from diffroute.surgery.moe.upcycle import upcycle_moe


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@torch.no_grad()
def bench_ffn(
    transformer,
    block: int = 1,
    num_experts: int = 6,
    shared: int = 2,
    ks: tuple[float, ...] = (1, 2, 3, 4, 6),
    batch: int = 32,
    tokens: int = 64,
    repeats: int = 20,
    seed: int = 0,
) -> list[dict]:
    """Rows of {ffn, k, flops, seconds, flops_ratio, time_ratio} for `block`'s FFN of a copy of `transformer`."""
    model = copy.deepcopy(transformer).eval()
    arch = architecture_map(model)
    site = arch.spec.ffn_sites[arch.block_names[block].split(".")[0]]
    if site.form == "flux-single":
        raise ValueError("bench moe times a block with a stand-alone FFN module; pick a double-stream block.")
    dense = getattr(arch.blocks[block], site.ffn)
    param = next(dense.parameters())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, param.shape[-1], generator=gen).to(param.device, param.dtype)
    base = {"flops": _flops(lambda: dense(x)), "seconds": _time(lambda: dense(x), repeats)}
    rows = [{"ffn": "dense", "k": float(num_experts), **base, "flops_ratio": 1.0, "time_ratio": 1.0}]
    (layer,) = upcycle_moe(model, num_experts, shared, blocks=[block])
    layer.set_timestep(torch.full((batch,), 500.0))
    for k in ks:
        layer.capacity = parse_capacity(f"static:{k:g}")
        flops, seconds = _flops(lambda: layer(x)), _time(lambda: layer(x), repeats)
        rows.append(
            {
                "ffn": f"moe k={k:g}",
                "k": float(k),
                "flops": flops,
                "seconds": seconds,
                "flops_ratio": flops / base["flops"],
                "time_ratio": seconds / base["seconds"],
            }
        )
    return rows
