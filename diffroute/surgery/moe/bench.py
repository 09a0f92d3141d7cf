"""FFN benchmark (not a test): one block's dense FFN against its expert-choice MoE at several capacities, side by
side in one run: FLOPs (torch's FlopCounterMode) and wall-clock. Every timed variant runs once per round, in turn,
so that a slow spell of the machine hits all of them alike; a ratio to dense is taken per round and its median and
quartiles reported (a paired ratio: the medians of separate runs drift apart on a shared CPU)."""

from __future__ import annotations

import copy
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from diffroute.core.arch import architecture_map
from diffroute.surgery.moe.capacity import parse_capacity
from diffroute.surgery.moe.upcycle import upcycle_moe


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def _interleaved(fns: list, repeats: int) -> list[list[float]]:
    """Seconds per round for each function: a warm-up call each, then `repeats` rounds of one call each, in turn."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return times


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
    compile: bool = False,
) -> list[dict]:
    """Rows of {ffn, k, flops, seconds, flops_ratio, time_ratio, time_ratio_q1, time_ratio_q3} for `block`'s FFN of
    a copy of `transformer`; `compile` times dense and MoE both under torch.compile (one graph per capacity)."""
    model = copy.deepcopy(transformer).eval()
    arch = architecture_map(model)
    site = arch.spec.ffn_sites[arch.block_names[block].split(".")[0]]
    if site.form == "flux-single":
        raise ValueError("bench moe times a block with a stand-alone FFN module; pick a double-stream block.")
    dense = getattr(arch.blocks[block], site.ffn)
    param = next(dense.parameters())
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, param.shape[-1], generator=gen).to(param.device, param.dtype)
    dense_flops = _flops(lambda: dense(x))
    dense_fn = torch.compile(dense, dynamic=False) if compile else dense
    (layer,) = upcycle_moe(model, num_experts, shared, blocks=[block])
    layer.set_timestep(torch.full((batch,), 500.0))
    # one layer per capacity (they share the weights): the capacity is read at trace time by a compiled layer
    layers = []
    for k in ks:
        one = copy.copy(layer)
        one.capacity = parse_capacity(f"static:{k:g}")
        layers.append(one)
    flops = [_flops(lambda one=one: one(x)) for one in layers]
    timed = [torch.compile(one, dynamic=False) if compile else one for one in layers]
    fns = [lambda: dense_fn(x)] + [(lambda f=f: f(x)) for f in timed]
    times = _interleaved(fns, repeats)
    rows = [
        {
            "ffn": "dense",
            "k": float(num_experts),
            "flops": dense_flops,
            "seconds": statistics.median(times[0]),
            "flops_ratio": 1.0,
            "time_ratio": 1.0,
            "time_ratio_q1": 1.0,
            "time_ratio_q3": 1.0,
        }
    ]
    for k, f, t in zip(ks, flops, times[1:]):
        q1, q2, q3 = _quartiles([a / b for a, b in zip(t, times[0])])
        rows.append(
            {
                "ffn": f"moe k={k:g}",
                "k": float(k),
                "flops": f,
                "seconds": statistics.median(t),
                "flops_ratio": f / dense_flops,
                "time_ratio": q2,
                "time_ratio_q1": q1,
                "time_ratio_q3": q3,
            }
        )
    return rows
